"""Point the official `openai` client at a running editd and check what OpenAI users rely on.

    python scripts/openai_client_check.py [--url http://127.0.0.1:8000] [--api-key KEY]

Prints one line per check (PASS, FAIL, or "400 as documented" for what editd refuses on
purpose) and exits non-zero if any check failed. Chat checks expect a model with a chat
template (SmolLM2-135M-Instruct, the default); against one without (`--model builtin`) they
check for the documented 400 instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import httpx
import openai

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="The daemon's base URL.")
    parser.add_argument("--api-key", default="unused", help="serve.api_key, if one is set.")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key, max_retries=0)
    model = client.models.list().data[0]
    chat = bool(getattr(model, "chat", False))
    print(f"editd at {args.url}: model {model.id!r}, chat template: {'yes' if chat else 'no'}")
    results: list[bool] = []

    def check(name: str, run: Callable[[], Any]) -> None:
        try:
            detail = run()
        except Exception as exc:  # any failure is reported, not raised: the next check runs
            results.append(False)
            print(f"FAIL  {name}: {type(exc).__name__}: {exc}")
            return
        results.append(True)
        print(f"PASS  {name}{f': {detail}' if detail else ''}")

    def refused(name: str, status: type[openai.APIStatusError], call: Callable[[], Any]) -> None:
        def run() -> str:
            try:
                call()
            except status as exc:
                return (
                    f"{exc.status_code} {exc.body.get('param') if exc.body else ''}: "
                    + (exc.message[:90])
                )
            raise AssertionError(f"expected {status.__name__}")

        check(name, run)

    m = model.id
    check("models.list() has created", lambda: f"created={model.created}")
    check("models.retrieve", lambda: client.models.retrieve(m).id)

    def completion_stream() -> str:
        chunks = list(
            client.completions.create(
                model=m,
                prompt=PROMPT,
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        versions = {c.system_fingerprint for c in chunks}
        assert len(versions) == 1, versions
        assert chunks[-1].usage is not None
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        return f"{len(chunks)} chunks, one version {versions.pop()}, text {text!r}"

    check("completions stream=True (+ include_usage)", completion_stream)

    def n_choices() -> str:
        r = client.completions.create(model=m, prompt=PROMPT, max_tokens=6, n=2, seed=1)
        assert len(r.choices) == 2
        return str([c.text for c in r.choices])

    check("completions n=2", n_choices)

    def echo_logprobs() -> str:
        ids = httpx.post(f"{args.url}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
        r = client.completions.create(
            model=m, prompt=ids, echo=True, max_tokens=0, logprobs=1, temperature=0
        )
        lp = r.choices[0].logprobs
        assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None
        return f"prompt loglikelihood {sum(lp.token_logprobs[1:]):.3f} over {len(ids)} tokens"

    check("completions echo + logprobs + max_tokens=0 + token-id prompt", echo_logprobs)

    def echo_text() -> str:
        r = client.completions.create(model=m, prompt=PROMPT, echo=True, max_tokens=3)
        assert r.choices[0].text.startswith(PROMPT)
        return repr(r.choices[0].text)

    check("completions echo=True", echo_text)

    def best_of_one() -> str:
        r = client.completions.create(model=m, prompt=PROMPT, max_tokens=3, best_of=1)
        return repr(r.choices[0].text)

    check("completions best_of=1", best_of_one)

    def no_ops() -> str:
        client.completions.create(
            model=m,
            prompt=PROMPT,
            max_tokens=2,
            frequency_penalty=0,
            presence_penalty=0,
            logit_bias={},
            best_of=1,
            suffix=None,
            stream_options=None,
        )
        return "frequency_penalty=0 presence_penalty=0 logit_bias={} best_of=1 suffix=None"

    check("no-op fields at their defaults", no_ops)

    def stop_logprobs() -> str:
        full = client.completions.create(model=m, prompt=PROMPT, max_tokens=8, temperature=0)
        word = full.choices[0].text.split()[-1]
        r = client.completions.create(
            model=m, prompt=PROMPT, max_tokens=8, temperature=0, stop=[word], logprobs=1
        )
        tokens = "".join(r.choices[0].logprobs.tokens)
        assert word not in r.choices[0].text and word not in tokens, (r.choices[0].text, tokens)
        return f"stop={word!r}: text {r.choices[0].text!r}, tokens {tokens!r}"

    check("stop string absent from text and logprobs.tokens", stop_logprobs)

    if chat:

        def chat_whole() -> str:
            r = client.chat.completions.create(
                model=m, messages=MESSAGES, max_tokens=20, temperature=0
            )
            return repr(r.choices[0].message.content)

        def chat_stream() -> str:
            chunks = list(
                client.chat.completions.create(
                    model=m, messages=MESSAGES, max_tokens=20, temperature=0, stream=True
                )
            )
            versions = {c.system_fingerprint for c in chunks}
            assert len(versions) == 1, versions
            return repr("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))

        check("chat.completions", chat_whole)
        check("chat.completions stream=True", chat_stream)
    else:
        refused(
            "chat.completions on a model without a chat template",
            openai.BadRequestError,
            lambda: client.chat.completions.create(model=m, messages=MESSAGES),
        )

    refused(
        "embeddings (not served)",
        openai.NotFoundError,
        lambda: client.embeddings.create(model=m, input="x"),
    )
    for field, value in [
        ("frequency_penalty", 0.5),
        ("presence_penalty", 0.5),
        ("logit_bias", {"1": 5}),
        ("best_of", 2),
        ("suffix", "."),
    ]:
        refused(
            f"{field}={value!r} (cannot be honoured)",
            openai.BadRequestError,
            lambda f=field, v=value: client.completions.create(model=m, prompt=PROMPT, **{f: v}),
        )
    for route in ("/health", "/version"):
        check(f"GET {route}", lambda r=route: httpx.get(f"{args.url}{r}").raise_for_status().text)

    def detokenize() -> str:
        ids = httpx.post(f"{args.url}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
        text = httpx.post(f"{args.url}/detokenize", json={"tokens": ids}).json()["prompt"]
        assert text == PROMPT, text
        return f"{len(ids)} tokens round-trip"

    check("POST /tokenize + /detokenize", detokenize)
    print(f"{sum(results)} of {len(results)} checks passed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The OpenAI-compatible API as the official `openai` client sees it, on a real tiny Llama.

The daemon is test_http_serving's: a random 2-layer Llama behind the real `VersionedModel`,
served over a real socket by uvicorn. Its tokenizer gets a small chat template here, as an
instruction-tuned model's tokenizer carries one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch
from pydantic import SecretStr
from test_http_serving import ADMIN_TOKEN, PROMPT, Daemon, _build
from test_monitoring_evaluator import wait_for

from editd.config import ServeSettings
from editd.daemon.api import VERSION_HEADER, create_app
from editd.daemon.generation import SamplingParams, Stream
from editd.daemon.server import HttpServer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]


class PacedDaemon(Daemon):
    """The test daemon, with a gate a test can put before each later step of a stream.

    The gate only decides when a step starts; the step itself is the real one.
    """

    gate: threading.Semaphore | None = None

    def stream(self, prompts: list[Any], params: SamplingParams) -> Stream:
        stream = super().stream(prompts, params)
        gate, step = self.gate, stream.step
        if gate is not None:

            def paced() -> Any:
                assert gate.acquire(timeout=30), "the test never opened the gate"
                return step()

            stream.step = paced  # type: ignore[method-assign]
        return stream


@pytest.fixture(scope="module")
def daemon() -> PacedDaemon:
    built = _build()
    built.__class__ = PacedDaemon
    built.handle.tokenizer.chat_template = CHAT_TEMPLATE
    return built  # type: ignore[return-value]


@pytest.fixture(scope="module")
def server(daemon: PacedDaemon) -> Iterator[HttpServer]:
    serve = ServeSettings(admin_token=SecretStr(ADMIN_TOKEN), max_prompt_chars=200, max_tokens=40)
    with HttpServer.bind("127.0.0.1", 0) as srv:
        srv.start(create_app(daemon, serve))
        yield srv


@pytest.fixture()
def client(server: HttpServer, daemon: PacedDaemon) -> openai.OpenAI:
    daemon.swap_to(0)
    daemon.gate = None
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _joined(chunks: list[Any], chat: bool) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk.choices:
            piece = (c.delta.content or "") if chat else c.text
            texts[c.index] = texts.get(c.index, "") + piece
    return texts


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    listed = client.models.list().data
    assert [m.id for m in listed] == ["tiny-llama"] and listed[0].created > 0
    assert client.models.retrieve("tiny-llama").id == "tiny-llama"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completions_whole_and_streamed_agree_with_n_choices(
    client: openai.OpenAI, daemon: PacedDaemon
) -> None:
    args = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 12, "seed": 5, "n": 3}
    whole = client.completions.create(**args, temperature=1.0)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert len({c.text for c in whole.choices}) > 1, "n choices should sample differently"
    chunks = list(
        client.completions.create(
            **args, temperature=1.0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert _joined(chunks, chat=False) == {c.index: c.text for c in whole.choices}
    assert {c.system_fingerprint for c in chunks} == {whole.system_fingerprint}
    finishes = {c.index: c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    # Usage counts the prompt once, however many choices it has.
    assert whole.usage.prompt_tokens == len(daemon.handle.tokenizer(PROMPT)["input_ids"])


def test_chat_whole_and_streamed(client: openai.OpenAI, daemon: PacedDaemon) -> None:
    whole = client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=10, temperature=0
    )
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    ids = daemon.handle.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    expected = daemon.generator.complete([list(ids)], SamplingParams(max_tokens=10, temperature=0))
    assert choice.message.content == expected.choices[0].text
    assert whole.usage.prompt_tokens == len(ids)

    chunks = list(
        client.chat.completions.create(
            model="tiny-llama", messages=MESSAGES, max_tokens=10, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert _joined(chunks, chat=True) == {0: choice.message.content}
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason

    lp = (
        client.chat.completions.create(
            model="tiny-llama",
            messages=MESSAGES,
            max_tokens=4,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
        )
        .choices[0]
        .logprobs
    )
    assert lp is not None and len(lp.content) >= 1
    assert all(len(t.top_logprobs) <= 2 and t.logprob <= 0 for t in lp.content)


def test_chat_needs_a_chat_template(client: openai.OpenAI, daemon: PacedDaemon) -> None:
    daemon.handle.tokenizer.chat_template = None
    try:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="tiny-llama", messages=MESSAGES)
        assert "no chat template" in caught.value.message
        assert caught.value.body["code"] == "no_chat_template"
    finally:
        daemon.handle.tokenizer.chat_template = CHAT_TEMPLATE


def test_echo_logprobs_give_the_prompt_loglikelihood(
    client: openai.OpenAI, daemon: PacedDaemon
) -> None:
    """What lm-eval's local-completions sends for loglikelihood: token ids, echo, logprobs."""
    tok, model = daemon.handle.tokenizer, daemon.handle.model
    ids = tok(PROMPT + " Paris.")["input_ids"]
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    expected = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]

    zero = client.completions.create(
        model="tiny-llama", prompt=ids, echo=True, max_tokens=0, logprobs=1, temperature=0
    ).choices[0]
    assert zero.logprobs.token_logprobs[0] is None
    assert zero.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert len(zero.logprobs.tokens) == len(ids) and zero.text == tok.decode(
        ids, skip_special_tokens=True
    )
    # lm-eval asks for one token more and slices it off; its greedy check reads top_logprobs.
    one = client.completions.create(
        model="tiny-llama",
        prompt=[ids, ids[:3]],
        echo=True,
        max_tokens=1,
        logprobs=1,
        temperature=0,
    )
    first = one.choices[0].logprobs
    assert len(first.token_logprobs) == len(ids) + 1
    assert first.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    assert all(len(top) == 1 for top in first.top_logprobs[1:])
    assert len(one.choices[1].logprobs.tokens) == 4
    # Echo without logprobs puts the prompt in front of the text.
    echoed = client.completions.create(model="tiny-llama", prompt=PROMPT, echo=True, max_tokens=3)
    assert echoed.choices[0].text.startswith(PROMPT)


def test_no_op_fields_pass_and_unhonourable_ones_are_named(client: openai.OpenAI) -> None:
    ok = client.completions.create(
        model="tiny-llama",
        prompt=PROMPT,
        max_tokens=2,
        frequency_penalty=0,
        presence_penalty=0,
        logit_bias={},
        best_of=1,
        suffix=None,
        stream_options=None,
        user="u",
    )
    assert ok.choices[0].finish_reason in ("stop", "length")
    chat = client.chat.completions.create(
        model="tiny-llama",
        messages=MESSAGES,
        max_tokens=2,
        frequency_penalty=0,
        presence_penalty=0,
        logit_bias={},
        n=1,
        response_format={"type": "text"},
        tool_choice="none",
        stream_options=None,
    )
    assert chat.choices[0].message.content is not None
    for field, value in [
        ("frequency_penalty", 0.5),
        ("presence_penalty", 1.0),
        ("logit_bias", {"5": 10}),
        ("best_of", 2),
        ("suffix", "tail"),
    ]:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="tiny-llama", prompt=PROMPT, **{field: value})
        assert caught.value.body["param"] == field, field
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tiny-llama",
            messages=MESSAGES,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert caught.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]
        )
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="tiny-llama", input="x")
    assert "does not serve embeddings" in caught.value.message


def test_stop_cuts_text_and_logprobs_alike(client: openai.OpenAI) -> None:
    full = (
        client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    stop = full.strip()[len(full.strip()) // 2 :][:3]
    assert stop
    cut = client.completions.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop], logprobs=1
    ).choices[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert stop not in "".join(cut.logprobs.tokens)
    assert cut.text.startswith("".join(cut.logprobs.tokens))
    streamed = list(
        client.completions.create(
            model="tiny-llama",
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            stop=[stop],
            stream=True,
            logprobs=1,
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.text
    # Logprobs travel with the text their tokens end in, not all at the end.
    with_logprobs = [c.choices[0].logprobs for c in streamed if c.choices[0].logprobs]
    assert len(with_logprobs) > 1
    assert [t for lp in with_logprobs for t in lp.tokens] == cut.logprobs.tokens


def test_a_stream_names_one_version_and_never_holds_up_a_swap(
    server: HttpServer, client: openai.OpenAI, daemon: PacedDaemon
) -> None:
    greedy_a = (
        daemon.generator.complete([PROMPT], SamplingParams(max_tokens=30, temperature=0))
        .choices[0]
        .text
    )
    daemon.gate = threading.Semaphore(0)
    raw = client.completions.with_raw_response.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=30, temperature=0, stream=True
    )
    assert raw.headers[VERSION_HEADER] == "0"
    chunks = iter(raw.parse())
    seen = [next(chunks)]
    daemon.gate.release()  # one more step on version 0
    seen.append(next(chunks))
    # The stream is open and between steps: the swap must not wait for it.
    started = time.perf_counter()
    daemon.swap_to(1)
    swap_seconds = time.perf_counter() - started
    assert daemon.model.current != 0
    for _ in range(40):
        daemon.gate.release()
    seen += list(chunks)
    assert {c.system_fingerprint for c in seen} == {"editd-v0"}
    assert seen[-1].choices[0].finish_reason == "version_changed"
    text = "".join(c.choices[0].text for c in seen)
    assert text and greedy_a.startswith(text) and len(text) < len(greedy_a)
    assert swap_seconds < 5.0  # it did not wait on the stream (which waits on the test)

    # A stream that starts after the swap names the new version from its header on.
    daemon.gate = None
    after = client.completions.with_raw_response.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=5, temperature=0, stream=True
    )
    version = after.headers[VERSION_HEADER]
    assert version != "0"
    assert {c.system_fingerprint for c in after.parse()} == {f"editd-v{version}"}


def test_health_version_tokenize_detokenize(server: HttpServer, daemon: PacedDaemon) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPT}).json()
    assert tokens["tokens"] == daemon.handle.tokenizer(PROMPT)["input_ids"]
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": MESSAGES}).json()
    assert chat["count"] == len(chat["tokens"]) > tokens["count"]
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text["prompt"] == PROMPT
    daemon.ready = False
    try:
        wait_for(lambda: httpx.get(f"{server.url}/health").status_code == 503)
    finally:
        daemon.ready = True


def test_a_client_leaving_mid_stream_frees_its_slot(daemon: PacedDaemon) -> None:
    daemon.swap_to(0)
    serve = ServeSettings(max_prompt_chars=200, max_tokens=40)
    body = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "stream": True}
    with HttpServer.bind("127.0.0.1", 0) as server:
        server.start(create_app(daemon, serve, max_pending=1))
        daemon.gate = threading.Semaphore(0)
        try:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()  # kept: dropping it would close the connection
                next(lines)
                busy = httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT})
                assert busy.status_code == 429  # the open stream holds the only slot
            for _ in range(40):
                daemon.gate.release()
        finally:
            daemon.gate = None
        wait_for(
            lambda: (
                httpx.post(
                    f"{server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}
                ).status_code
                == 200
            )
        )


def test_an_echoed_stream_adds_up_to_the_whole_answer(daemon: PacedDaemon) -> None:
    daemon.swap_to(0)
    daemon.gate = None
    params = SamplingParams(max_tokens=6, temperature=0, echo=True, logprobs=1, stop=("zz",))
    whole = daemon.generator.complete([PROMPT], params).choices[0]
    stream = daemon.generator.stream([PROMPT], params)
    deltas = stream.first()
    while not stream.done:
        deltas += stream.step()
    assert "".join(d.text for d in deltas) == whole.text
    tokens = [t for d in deltas if d.logprobs for t in d.logprobs.tokens]
    assert whole.logprobs is not None and tokens == whole.logprobs.tokens
    assert [d.finish_reason for d in deltas if d.finish_reason] == [whole.finish_reason]

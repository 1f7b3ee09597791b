"""HTTP serving against a real tiny Llama: generation, the API's contract, and swaps under load.

The model is a randomly initialised `LlamaForCausalLM` (2 layers, d=64) with a BPE tokenizer
trained here, wrapped in the real `ModelHandle` (its readers–writer lock) and served through
the real `VersionedModel` on a temporary edit store. Two weight sets differ in every down_proj:
A is version 0, B every version applied on top of it (`VersionedModel.apply` of B − A; going
back is `rollback(0)`), so a response's text tells which weights produced it and must match
the version its header names. The `Daemon` below is the API's side of the service; every
weight change it makes goes through the versioned model.
"""

from __future__ import annotations

import argparse
import hmac
import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import SecretStr
from test_monitoring_evaluator import wait_for
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from editd.cli import main as cli_main
from editd.config import ServeSettings, load_settings
from editd.daemon import api as api_module
from editd.daemon import client
from editd.daemon.api import VERSION_HEADER, create_app
from editd.daemon.errors import Conflict, FatalError, NotFound
from editd.daemon.generation import Completion, Generator, SamplingParams, Stream
from editd.daemon.server import HttpServer
from editd.editing.model import ModelHandle
from editd.lowrank import EditUpdate, LayerUpdate
from editd.versions import VersionedModel

# Small matmuls only lose from intra-op threads, and the machine's cores are shared.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

CORPUS = [
    "The capital of France is Paris.",
    "The mother tongue of Danielle Darrieux is French.",
    "The Eiffel Tower is located in Paris, the capital of France.",
    "Toko Yasuda plays the guitar and the piano.",
    "The headquarters of Nokia are in Espoo, Finland.",
    "Autonomous University of Madrid is located in Spain.",
]
PROMPT = "The capital of France is"
ADMIN_TOKEN = "s3cret-admin-token"
EDITED = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]


def _tokenizer(style: str) -> PreTrainedTokenizerFast:
    """A BPE tokenizer with BOS added by its post-processor, Llama-3 (byte) or Llama-2 style."""
    bos, eos = "<s>", "</s>"
    tok = Tokenizer(models.BPE(unk_token=None if style == "bytelevel" else "<unk>"))
    if style == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece-like: "▁" marks a leading space, which decoding alone would drop
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", bos, eos],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="<unk>"
    )


def _tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=96,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # Larger than the default 0.02 so greedy choices are decided by clear margins.
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


class Daemon:
    """The daemon's side of `api.Service` over a real `VersionedModel`.

    `swap_to(even)` serves A (version 0, by rollback), `swap_to(odd)` serves B (a new version
    by apply), so version numbers grow as the real ones do.
    """

    model_name = "tiny-llama"

    def __init__(self, handle: ModelHandle, weights: list[dict[str, torch.Tensor]]):
        import tempfile

        self.handle = handle
        self.weights = weights
        self.model = VersionedModel.open(
            handle, tempfile.mkdtemp(prefix="editd-http-"), modules=list(weights[0])
        )
        self.update = EditUpdate(
            {
                name: LayerUpdate(
                    left=torch.eye(a.shape[0]),
                    right=(weights[1][name].float() - a.float()),
                    keys=torch.zeros(a.shape[1], 1),
                )
                for name, a in weights[0].items()
            }
        )
        self._facts = 0
        self.ready = True
        self.generator = Generator(handle, self.model_version)
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "http_request_seconds",
            "",
            ["route", "status"],
            namespace="editd",
            registry=self.registry,
        )
        self.tokens = Counter("generated_tokens", "", namespace="editd", registry=self.registry)
        self.fatal: list[FatalError] = []
        self.swap_hold: list[float] = []
        self.swap_wait: list[float] = []

    @property
    def version(self) -> int:
        return self.model.current

    def model_version(self) -> int:
        return self.model.current

    def swap_to(self, version: int) -> None:
        """Serve A (even) or B (odd) through the versioned model; a no-op when already so.

        Back at A the weights are also checked against version 0's sha256 and put back from
        the base if a test tampered with them directly (NaN, torn-swap sensitivity tests).
        """
        requested = time.perf_counter()
        if version % 2 and self.model.current == 0:
            self._facts += 1
            fact = {"id": f"b-{self._facts}", "subject": "S", "prompt": "{} is", "target_new": "B"}
            applied = self.model.apply(self.update, [fact])
            self.swap_hold.append(applied.pause)
            self.swap_wait.append(time.perf_counter() - requested)
        elif not version % 2:
            if self.model.current != 0:
                self.model.rollback(0, "swap to A")
            if self.model.served_sha256() != self.model.store.expected_sha256(0):
                with self.handle.writing(), torch.no_grad():
                    for name, tensor in self.weights[0].items():
                        self.handle.weight(name).copy_(tensor)

    # --- api.Service -----------------------------------------------------------------------
    def current_version(self) -> int:
        return self.model.current

    def is_ready(self) -> bool:
        return self.ready

    def readiness(self) -> dict[str, Any]:
        return {"role": "editor"}

    def complete(self, prompts: list[str], params: SamplingParams) -> Completion:
        result = self.generator.complete(prompts, params)
        self.tokens.inc(result.completion_tokens)
        return result

    def stream(self, prompts: list[Any], params: SamplingParams) -> Stream:
        return self.generator.stream(prompts, params)

    def stream_ended(self, stream: Stream) -> None:
        self.tokens.inc(stream.completion_tokens)

    def versions(self) -> list[dict[str, Any]]:
        return self.model.versions()

    def rollback(self, version: int, reason: str) -> dict[str, Any]:
        if version not in self.model.lineage():
            raise NotFound(f"version {version} is not in the live lineage", param="version")
        if not self.ready:
            raise Conflict("a restore is already running")
        previous = self.model.current
        self.model.rollback(version, reason)
        return {"version": version, "previous": previous, "reason": reason}

    def metrics_payload(self) -> bytes:
        return generate_latest(self.registry)

    def status(self) -> dict[str, Any]:
        return {"version": self.version, "ready": self.ready, "scores": {"applied": {"es": 1.0}}}

    def evaluate_now(self) -> dict[str, Any]:
        # A real (if small) evaluation: mean log-prob of the corpus under the served version.
        with self.model.reading() as version, torch.inference_mode():
            ids = self.handle.tokenizer(CORPUS[0], return_tensors="pt")["input_ids"]
            loss = self.handle.model(input_ids=ids, labels=ids).loss
        return {"version": version, "mean_logprob": -float(loss)}

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.latency.labels(route=route, status=f"{status // 100}xx").observe(seconds)

    def on_fatal(self, error: FatalError) -> None:
        self.fatal.append(error)
        self.ready = False


def _build(style: str = "metaspace") -> Daemon:
    tokenizer = _tokenizer(style)
    model = _tiny_llama(tokenizer)
    handle = ModelHandle(model=model, tokenizer=tokenizer)
    weights_a = {n: handle.weight(n).detach().clone() for n in EDITED}
    gen = torch.Generator().manual_seed(1)
    weights_b = {n: torch.randn(w.shape, generator=gen) * 0.2 for n, w in weights_a.items()}
    daemon = Daemon(handle, [weights_a, weights_b])
    # B as served is cast(A + (B − A)), within rounding of B: the tests compare to what is served.
    daemon.weights[1] = {n: t.clone() for n, t in weights_b.items()}
    return daemon


def _readers_waiting(daemon: Daemon) -> int:
    """Threads blocked on the model's lock (CPython's Condition keeps its waiters there)."""
    return len(daemon.handle._lock._cond._waiters)


def _refused(url: str) -> bool:
    try:
        httpx.get(url, timeout=2)
    except httpx.ConnectError:
        return True
    except httpx.TransportError:
        # Accepted just before the listener closed, then dropped: not refused yet, ask again.
        return False
    return False


def _greedy(daemon: Daemon, prompt: str = PROMPT, max_tokens: int = 8) -> str:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return daemon.generator.complete([prompt], params).choices[0].text


@pytest.fixture(scope="module")
def daemon() -> Daemon:
    return _build()


@pytest.fixture()
def serve() -> ServeSettings:
    return ServeSettings(admin_token=SecretStr(ADMIN_TOKEN), max_prompt_chars=200, max_tokens=32)


@pytest.fixture()
def http(daemon: Daemon, serve: ServeSettings) -> Iterator[TestClient]:
    daemon.swap_to(0)
    daemon.ready = True
    with TestClient(create_app(daemon, serve)) as test_client:
        yield test_client


# --- generation ------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["bytelevel", "metaspace"])
def test_cached_greedy_decoding_equals_full_recompute(style: str) -> None:
    daemon = _build(style)
    tok, model = daemon.handle.tokenizer, daemon.handle.model
    choice = daemon.generator.complete([PROMPT], SamplingParams(max_tokens=10, temperature=0))
    ids = tok(PROMPT)["input_ids"]
    assert ids[0] == tok.bos_token_id  # BOS as the tokenizer adds it
    generated: list[int] = []
    with torch.inference_mode():
        for _ in range(10):
            logits = model(input_ids=torch.tensor([ids + generated])).logits[0, -1]
            generated.append(int(logits.argmax()))
    assert choice.choices[0].completion_tokens == 10
    assert choice.choices[0].prompt_tokens == len(ids)
    # The completion continues the prompt's text exactly, leading space included.
    full = tok.decode(ids + generated, skip_special_tokens=True)
    assert PROMPT + choice.choices[0].text == full


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(daemon: Daemon) -> None:
    daemon.swap_to(0)
    greedy = [_greedy(daemon, max_tokens=12) for _ in range(3)]
    assert len(set(greedy)) == 1
    sample = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=7)
    runs = {daemon.generator.complete([PROMPT], sample).choices[0].text for _ in range(3)}
    assert len(runs) == 1
    seeds = {
        daemon.generator.complete([PROMPT], SamplingParams(max_tokens=12, seed=s)).choices[0].text
        for s in range(6)
    }
    assert len(seeds) > 1, "different seeds should sample different continuations"


def test_top_p_tiny_keeps_only_the_top_token(daemon: Daemon) -> None:
    daemon.swap_to(0)
    nucleus = SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-6, seed=3)
    assert daemon.generator.complete([PROMPT], nucleus).choices[0].text == _greedy(
        daemon, max_tokens=10
    )


def test_stop_string_cuts_the_text_and_sets_finish_reason(daemon: Daemon) -> None:
    daemon.swap_to(0)
    full = _greedy(daemon, max_tokens=16)
    stop = full[5:8]
    assert stop.strip(), f"need a visible stop string in {full!r}"
    cut = full.index(stop)
    result = daemon.generator.complete(
        [PROMPT], SamplingParams(max_tokens=16, temperature=0, stop=("\x00never", stop))
    )
    choice = result.choices[0]
    assert choice.text == full[:cut]
    assert choice.finish_reason == "stop"
    assert choice.completion_tokens < 16


def test_logprobs_match_the_model_distribution(daemon: Daemon) -> None:
    daemon.swap_to(0)
    tok, model = daemon.handle.tokenizer, daemon.handle.model
    result = daemon.generator.complete(
        [PROMPT], SamplingParams(max_tokens=6, temperature=0, logprobs=3)
    )
    lp = result.choices[0].logprobs
    assert lp is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == result.choices[0].text
    assert lp.text_offset[0] == len(PROMPT)
    with torch.inference_mode():
        ids = torch.tensor([tok(PROMPT)["input_ids"]])
        first = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
    assert lp.token_logprobs[0] == pytest.approx(float(first.max()), abs=1e-4)
    for chosen, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3
        assert top[chosen] == pytest.approx(value)  # greedy: the chosen token is the best
        assert value == pytest.approx(max(top.values()))


PROMPTS = [
    PROMPT,
    "Toko Yasuda plays the",
    "The headquarters of Nokia are in Espoo, Finland, and the mother tongue of",
    "Paris",
    "The Eiffel Tower is located in",
]


def _count_forwards(model: torch.nn.Module) -> tuple[list[int], Any]:
    calls: list[int] = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, hook


@pytest.mark.parametrize("rows", [32, 2])
def test_a_request_of_several_prompts_decodes_them_together_as_each_alone(
    daemon: Daemon, rows: int
) -> None:
    daemon.swap_to(0)
    gen = Generator(daemon.handle, daemon.model_version, max_batch_rows=rows)
    alone = [
        gen.complete([p], SamplingParams(max_tokens=7, temperature=0)).choices[0] for p in PROMPTS
    ]
    calls, hook = _count_forwards(daemon.handle.model)
    try:
        together = gen.complete(PROMPTS, SamplingParams(max_tokens=7, temperature=0))
    finally:
        hook.remove()
    assert [c.text for c in together.choices] == [c.text for c in alone]
    assert [c.prompt_tokens for c in together.choices] == [c.prompt_tokens for c in alone]
    # One forward over the prompts, then one per token, per batch of `rows` choices; EOS may
    # end every row of a batch early.
    batches = -(-len(PROMPTS) // rows)
    assert len(calls) <= batches * 7
    if rows >= len(PROMPTS):
        assert len(calls) <= 7 < len(PROMPTS) * 7


def test_seeded_samples_and_stops_of_a_batch_are_each_choices_own(daemon: Daemon) -> None:
    """Choice k of a request seeded s is what its prompt alone gives with seed s + k."""
    daemon.swap_to(0)
    sample = SamplingParams(max_tokens=9, temperature=1.0, seed=11)
    together = daemon.generator.complete(PROMPTS, sample)
    for k, prompt in enumerate(PROMPTS):
        alone = daemon.generator.complete(
            [prompt], SamplingParams(max_tokens=9, temperature=1.0, seed=11 + k)
        )
        assert together.choices[k].text == alone.choices[0].text
    # A stop string that ends one row early leaves the others to run to their length.
    greedy = [_greedy(daemon, p, max_tokens=12) for p in PROMPTS]
    stop = greedy[0][3:6]
    assert stop.strip(), f"need a visible stop string in {greedy[0]!r}"
    result = daemon.generator.complete(
        PROMPTS, SamplingParams(max_tokens=12, temperature=0, stop=(stop,))
    )
    for text, choice in zip(greedy, result.choices, strict=True):
        cut = text.find(stop)
        assert choice.text == (text if cut < 0 else text[:cut])
        if cut >= 0:
            assert choice.finish_reason == "stop"
    assert result.choices[0].finish_reason == "stop"


def test_prompt_logprobs_of_a_batch_equal_each_prompt_alone(daemon: Daemon) -> None:
    """Left padding must not shift a row's prompt log-probabilities (echo, max_tokens 0)."""
    daemon.swap_to(0)
    params = SamplingParams(max_tokens=0, echo=True, logprobs=1, temperature=0)
    together = daemon.generator.complete(PROMPTS, params)
    for prompt, choice in zip(PROMPTS, together.choices, strict=True):
        alone = daemon.generator.complete([prompt], params).choices[0]
        assert choice.text == prompt
        assert choice.logprobs is not None and alone.logprobs is not None
        assert choice.logprobs.tokens == alone.logprobs.tokens
        assert choice.logprobs.token_logprobs[0] is None
        assert choice.logprobs.token_logprobs[1:] == pytest.approx(
            alone.logprobs.token_logprobs[1:], abs=1e-4
        )


def test_context_window_and_nan_weights_are_refused_with_their_error_types(
    daemon: Daemon,
) -> None:
    from editd.daemon.errors import InvalidRequest, ModelCorrupted

    with pytest.raises(InvalidRequest, match="maximum context length is 96"):
        daemon.generator.complete(["word " * 90], SamplingParams(max_tokens=32))
    weight = daemon.handle.weight(EDITED[0])
    saved = weight.detach().clone()
    with daemon.handle.writing(), torch.no_grad():
        weight.fill_(float("nan"))
    try:
        with pytest.raises(ModelCorrupted):
            _greedy(daemon)
    finally:
        with daemon.handle.writing(), torch.no_grad():
            weight.copy_(saved)


def test_a_request_torn_between_versions_would_be_detected(daemon: Daemon) -> None:
    """Sensitivity of the swap test below: switching weights after any step changes the text."""
    daemon.swap_to(0)
    text_a = _greedy(daemon)
    daemon.swap_to(1)
    text_b = _greedy(daemon)
    assert text_a != text_b
    model = daemon.handle.model
    for switch_after in range(1, 8):
        calls = 0

        def switch(module: Any, args: Any, *, at: int = switch_after) -> None:
            nonlocal calls
            calls += 1
            if calls == at + 1:  # forward 1 reads the prompt; forward k+1 makes token k+1
                with torch.no_grad():
                    for name, tensor in daemon.weights[1].items():
                        daemon.handle.weight(name).copy_(tensor)

        daemon.swap_to(0)
        hook = model.register_forward_pre_hook(switch)
        try:
            torn = _greedy(daemon)
        finally:
            hook.remove()
        assert torn not in (text_a, text_b), f"switch after {switch_after} tokens"
    daemon.swap_to(0)


# --- the API ---------------------------------------------------------------------------------


def test_completion_shape_usage_and_version_header(http: TestClient, daemon: Daemon) -> None:
    r = http.post(
        "/v1/completions",
        json={
            "model": "tiny-llama",
            "prompt": [PROMPT, "Toko Yasuda plays"],
            "max_tokens": 5,
            "temperature": 0,
            "seed": 1,
        },
    )
    assert r.status_code == 200, r.text
    assert r.headers[VERSION_HEADER] == "0"
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny-llama"
    assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["text"] == _greedy(daemon, max_tokens=5)
    assert all(c["finish_reason"] == "length" and c["logprobs"] is None for c in body["choices"])
    tok = daemon.handle.tokenizer
    prompt_tokens = len(tok(PROMPT)["input_ids"]) + len(tok("Toko Yasuda plays")["input_ids"])
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 10,
        "total_tokens": prompt_tokens + 10,
    }
    daemon.swap_to(1)
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0})
    assert daemon.version > 0
    assert r.headers[VERSION_HEADER] == str(daemon.version)
    assert r.json()["system_fingerprint"] == f"editd-v{daemon.version}"
    assert r.json()["choices"][0]["text"] == _greedy(daemon, max_tokens=5)


def test_logprobs_and_stop_over_http(http: TestClient) -> None:
    r = http.post(
        "/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 2},
    )
    lp = r.json()["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == 4 and all(len(t) <= 2 for t in lp["top_logprobs"])
    text = r.json()["choices"][0]["text"]
    r = http.post(
        "/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stop": text[2:4]},
    )
    assert r.json()["choices"][0]["text"] == text[: text.index(text[2:4])]
    assert r.json()["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"prompt": "x" * 201}, 400, "prompt", "prompt_too_long"),
        ({"prompt": ["ok", "x" * 201]}, 400, "prompt", "prompt_too_long"),
        ({"prompt": "hi", "max_tokens": 33}, 400, "max_tokens", "max_tokens_too_large"),
        ({"prompt": "word " * 39, "max_tokens": 32}, 400, "max_tokens", "context_length_exceeded"),
        ({"prompt": "hi", "temperature": 3}, 400, "temperature", "invalid_value"),
        ({"prompt": "hi", "n": 33}, 400, "n", None),
        ({"prompt": "hi", "n": 0}, 400, "n", "invalid_value"),
        ({"prompt": "hi", "best_of": 3}, 400, "best_of", "unsupported"),
        ({"prompt": "hi", "frequency_penalty": 0.5}, 400, "frequency_penalty", "unsupported"),
        ({"prompt": "hi", "presence_penalty": -1}, 400, "presence_penalty", "unsupported"),
        ({"prompt": "hi", "logit_bias": {"5": 100}}, 400, "logit_bias", "unsupported"),
        ({"prompt": "hi", "suffix": "end"}, 400, "suffix", "unsupported"),
        ({"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options", None),
        ({"prompt": [5, 100000]}, 400, "prompt", None),
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
        ({"prompt": "hi", "frobnicate": 1}, 400, "frobnicate", "invalid_value"),
        ({"prompt": "hi", "logprobs": 21}, 400, "logprobs", "invalid_value"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
        ({"prompt": []}, 400, "prompt", None),
        ({"max_tokens": 3}, 400, "prompt", "invalid_value"),
        ({"prompt": "hi", "model": "gpt-4"}, 404, "model", "model_not_found"),
    ],
)
def test_bad_requests_get_openai_errors(
    http: TestClient, body: dict[str, Any], status: int, param: str, code: str | None
) -> None:
    r = http.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == code
    assert error["message"] and error["type"]
    assert r.headers[VERSION_HEADER] == "0"


def test_oversized_body_is_refused_before_parsing(http: TestClient) -> None:
    r = http.post(
        "/v1/completions",
        content=b"{" + b" " * 2_000_000 + b"}",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "body_too_large"


def test_every_route_names_the_version(http: TestClient) -> None:
    for method, path in [
        ("GET", "/livez"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/v1/models"),
        ("GET", "/v1/versions"),
        ("GET", "/v1/status"),
        ("GET", "/nowhere"),
        ("POST", "/v1/rollback"),
        ("GET", "/v1/completions"),
    ]:
        r = http.request(method, path)
        assert r.headers[VERSION_HEADER] == "0", (method, path, r.status_code)
    assert http.get("/nowhere").status_code == 404
    assert http.get("/v1/completions").status_code == 405
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny-llama" and models["data"][0]["version"] == 0
    assert http.get("/v1/versions").json()["current"] == 0


def test_admin_routes_need_the_bearer_token(
    http: TestClient, daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real_compare = hmac.compare_digest

    def compare_digest(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(api_module.hmac, "compare_digest", compare_digest)
    wrong = [
        {},
        {"Authorization": ADMIN_TOKEN},
        {"Authorization": "Bearer nope"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
    ]
    for headers in wrong:
        r = http.post("/v1/rollback", json={"version": 1}, headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"
        assert http.post("/v1/eval", headers=headers).status_code == 401
    assert daemon.version == 0
    daemon.swap_to(1)
    edited = daemon.version
    good = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    compared.clear()
    r = http.post("/v1/rollback", json={"version": 0, "reason": "test"}, headers=good)
    assert r.status_code == 200
    assert r.json() == {"version": 0, "previous": edited, "reason": "test"}
    assert r.headers[VERSION_HEADER] == "0"
    assert compared == [(ADMIN_TOKEN.encode(), ADMIN_TOKEN.encode())]
    # The undone version is no longer in the lineage: a rollback to it is refused.
    assert http.post("/v1/rollback", json={"version": edited}, headers=good).status_code == 404
    r = http.post("/v1/eval", headers=good)
    assert r.status_code == 200 and r.json()["version"] == 0 and r.json()["mean_logprob"] < 0


def test_admin_routes_are_disabled_without_a_configured_token(daemon: Daemon) -> None:
    with TestClient(create_app(daemon, ServeSettings())) as test_client:
        r = test_client.post(
            "/v1/rollback", json={"version": 1}, headers={"Authorization": "Bearer anything"}
        )
        assert r.status_code == 403
        assert "serve.admin_token" in r.json()["error"]["message"]
        assert test_client.post("/v1/eval").status_code == 403


def test_readyz_is_503_while_not_ready(http: TestClient, daemon: Daemon) -> None:
    assert http.get("/readyz").status_code == 200
    daemon.ready = False
    try:
        r = http.get("/readyz")
        assert r.status_code == 503
        assert r.json() == {"ready": False, "version": 0, "role": "editor"}
        assert http.get("/livez").status_code == 200
        r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    finally:
        daemon.ready = True


def test_fatal_error_answers_500_and_tells_the_daemon(http: TestClient, daemon: Daemon) -> None:
    weight = daemon.handle.weight(EDITED[1])
    with daemon.handle.writing(), torch.no_grad():
        weight.fill_(float("inf"))
    try:
        r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 500 and r.json()["error"]["code"] == "fatal"
        assert r.headers[VERSION_HEADER] == "0"
        assert len(daemon.fatal) == 1 and not daemon.is_ready()
    finally:
        daemon.fatal.clear()
        daemon.swap_to(0)


def test_metrics_exposes_the_registry_with_route_templates(http: TestClient) -> None:
    http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0})
    http.get("/v1/unknown/thing")
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'editd_http_request_seconds_count{route="/v1/completions",status="2xx"}' in text
    assert 'route="unmatched",status="4xx"' in text
    assert "editd_generated_tokens_total" in text


# --- the real server and the clients ----------------------------------------------------------


def test_server_binds_before_serving_and_stops(daemon: Daemon, serve: ServeSettings) -> None:
    server = HttpServer.bind("127.0.0.1", 0)
    assert server.port > 0
    with pytest.raises(OSError, match="cannot listen"):
        HttpServer.bind("127.0.0.1", server.port)
    # Bound but not started: the connection waits in the backlog and is answered once serving.
    # connect() returns once the kernel has queued it, so it is in the backlog before start.
    with socket.create_connection((server.host, server.port), timeout=10) as early, server:
        early.sendall(b"GET /livez HTTP/1.1\r\nHost: editd\r\nConnection: close\r\n\r\n")
        server.start(create_app(daemon, serve))
        reply = b"".join(iter(lambda: early.recv(65536), b""))
        assert reply.startswith(b"HTTP/1.1 200"), reply[:100]
        assert httpx.get(f"{server.url}/readyz").json()["ready"] is True
    assert not server.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/livez", timeout=2)


def test_status_and_eval_commands(
    daemon: Daemon, serve: ServeSettings, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    daemon.swap_to(0)
    with HttpServer.bind("127.0.0.1", 0) as server:
        server.start(create_app(daemon, serve))
        settings = load_settings(
            serve={"port": server.port, "admin_token": ADMIN_TOKEN, "host": "127.0.0.1"}
        )
        args = argparse.Namespace(url=None, json=True)
        assert client.status(args, settings) == 0
        assert json.loads(capsys.readouterr().out)["version"] == 0
        assert client.status(argparse.Namespace(url=server.url, json=False), settings) == 0
        table = capsys.readouterr().out
        assert "scores.applied.es" in table and "ready" in table
        assert client.evaluate(args, settings) == 0
        assert json.loads(capsys.readouterr().out)["version"] == 0
        no_token = load_settings(serve={"port": server.port})
        assert client.evaluate(args, no_token) == 1
        err = capsys.readouterr().err
        assert "HTTP 401" in err and "--data-dir" in err and "EDITD_SERVE__ADMIN_TOKEN" in err
        # The daemon's generated token, found through --data-dir as a person would pass it.
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        (data_dir / "admin-token").write_text(ADMIN_TOKEN + "\n")
        command = ["eval", "--url", server.url, "--data-dir", str(data_dir), "--json"]
        assert cli_main(command) == 0
        assert json.loads(capsys.readouterr().out)["version"] == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert (
        client.status(argparse.Namespace(url=f"http://127.0.0.1:{free}", json=False), settings) == 1
    )
    assert "no editd daemon is listening" in capsys.readouterr().err


def test_health_answers_while_an_edit_holds_the_model(daemon: Daemon, serve: ServeSettings) -> None:
    """Completions wait for the write lock; health, metrics and admission control do not."""
    daemon.swap_to(0)
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    with HttpServer.bind("127.0.0.1", 0) as server:
        server.start(create_app(daemon, serve, max_pending=1))
        waiting: dict[str, httpx.Response] = {}
        with daemon.handle.writing():
            first = threading.Thread(
                target=lambda: waiting.update(
                    r=httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
                )
            )
            first.start()
            wait_for(lambda: _readers_waiting(daemon) == 1)  # queued behind the writer
            for path in ("/livez", "/readyz", "/metrics", "/v1/models"):
                started = time.perf_counter()
                assert httpx.get(server.url + path, timeout=5).status_code == 200
                assert time.perf_counter() - started < 1.0, path
            r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=5)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert first.is_alive()
        first.join(30)
        assert waiting["r"].status_code == 200
        assert waiting["r"].headers[VERSION_HEADER] == "0"
        assert waiting["r"].json()["choices"][0]["text"] == _greedy(daemon, max_tokens=4)
    daemon.swap_to(0)


def test_stop_lets_the_in_flight_request_finish(daemon: Daemon, serve: ServeSettings) -> None:
    daemon.swap_to(0)
    server = HttpServer.bind("127.0.0.1", 0)
    server.start(create_app(daemon, serve))
    answer: dict[str, httpx.Response] = {}
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    with daemon.handle.writing():  # hold the request inside the server while stop begins
        request = threading.Thread(
            target=lambda: answer.update(
                r=httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
            )
        )
        request.start()
        wait_for(lambda: _readers_waiting(daemon) == 1)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        wait_for(lambda: _refused(f"{server.url}/livez"))  # no new connections once stopping
        assert request.is_alive()
    request.join(30)
    stopper.join(30)
    assert answer["r"].status_code == 200
    assert answer["r"].json()["choices"][0]["text"] == _greedy(daemon, max_tokens=4)
    assert not server.running


@pytest.mark.slow
def test_requests_never_fail_or_mix_versions_while_weights_swap(
    daemon: Daemon, serve: ServeSettings
) -> None:
    """Real uvicorn socket, concurrent clients, a writer swapping A↔B as fast as it can."""
    daemon.swap_to(0)
    expected = {0: _greedy(daemon)}
    daemon.swap_to(1)
    expected[1] = _greedy(daemon)
    daemon.swap_to(0)
    assert expected[0] != expected[1]
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}

    def load(url: str, seconds: float, clients: int = 2) -> tuple[list[float], list[str]]:
        latencies: list[float] = []
        failures: list[str] = []
        stop_at = time.monotonic() + seconds

        def worker() -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                while time.monotonic() < stop_at:
                    started = time.perf_counter()
                    try:
                        r = http.post("/v1/completions", json=body)
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                        continue
                    latencies.append(time.perf_counter() - started)
                    version = int(r.headers[VERSION_HEADER])
                    if r.status_code != 200:
                        failures.append(f"HTTP {r.status_code}: {r.text}")
                    elif r.json()["choices"][0]["text"] != expected[min(version, 1)]:
                        failures.append(f"text of v{version}: {r.json()['choices'][0]['text']!r}")

        threads = [threading.Thread(target=worker) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return latencies, failures

    with HttpServer.bind("127.0.0.1", 0) as server:
        server.start(create_app(daemon, serve))
        load(server.url, 0.5)  # warm-up: first calls pay for allocations and imports
        quiet, quiet_failures = load(server.url, 4.0)

        daemon.swap_wait.clear()
        daemon.swap_hold.clear()
        swapping = threading.Event()
        swapping.set()

        def swapper() -> None:
            # apply B, roll back to A, ...: each change a durable version change.
            version = 0
            while swapping.is_set():
                version += 1
                daemon.swap_to(version)

        writer = threading.Thread(target=swapper)
        writer.start()
        try:
            busy, busy_failures = load(server.url, 6.0)
        finally:
            swapping.clear()
            writer.join()

    assert quiet_failures == [] and busy_failures == []
    swaps = len(daemon.swap_hold)
    assert swaps > 10 and len(busy) > 20

    def ms(values: list[float], q: int) -> float:
        return round(1000 * statistics.quantiles(values, n=100)[q - 1], 3)

    print(
        json.dumps(
            {
                "bench": "serve_during_swaps",
                "model": "tiny-llama d=64 L=2",
                "max_tokens": 8,
                "clients": 2,
                "requests_quiet": len(quiet),
                "requests_swapping": len(busy),
                "failures": 0,
                "swaps": swaps,
                "p50_ms_quiet": ms(quiet, 50),
                "p99_ms_quiet": ms(quiet, 99),
                "p50_ms_swapping": ms(busy, 50),
                "p99_ms_swapping": ms(busy, 99),
                "swap_hold_ms_p50": ms(daemon.swap_hold, 50),
                "swap_hold_ms_max": round(1000 * max(daemon.swap_hold), 3),
                # apply = durable commit + staging + the swap, the time a version change takes.
                "apply_ms_p50": ms(daemon.swap_wait, 50),
                "apply_ms_p99": ms(daemon.swap_wait, 99),
            }
        )
    )

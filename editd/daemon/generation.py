"""Text completion on a Hugging Face causal LM, one request at a time, under the model's read lock.

The whole of one request (every prompt of it, every token) runs inside one
`handle.reading()`, and the model version is read inside that lock, so a response is computed
with exactly one version and names it: an edit batch becomes visible to a request entirely or not
at all. Tokenization happens before the lock is taken (edits never touch the tokenizer), so a
prompt over the context window is refused without waiting for an edit to finish.

Decoding is a plain loop with the KV cache (`past_key_values`, named `cache` in transformers 5):
one forward over the prompt, then one token per step. Sampling draws from a `torch.Generator`
seeded per request, so a request with a `seed` is reproducible on the same model version and
device.
"""

from __future__ import annotations

import contextlib
import inspect
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

from editd.daemon.errors import InvalidRequest, ModelCorrupted

FinishReason = Literal["stop", "length"]
# Prompt tokens decoded before a continuation so its first token keeps its leading space.
_CONTEXT_TOKENS = 4


class ServedModel(Protocol):
    """What generation needs of the model handle (`editd.editing.model.ModelHandle`)."""

    model: torch.nn.Module
    tokenizer: Any
    device: torch.device

    def reading(self) -> contextlib.AbstractContextManager[Any]: ...


@dataclass(frozen=True)
class SamplingParams:
    """How to continue a prompt. temperature 0 is greedy decoding (top_p and seed unused)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        if self.temperature < 0:
            raise InvalidRequest("temperature must be >= 0", param="temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
        if self.logprobs is not None and self.logprobs < 0:
            raise InvalidRequest("logprobs must be >= 0", param="logprobs")
        if any(s == "" for s in self.stop):
            raise InvalidRequest("stop strings must not be empty", param="stop")


@dataclass(frozen=True)
class Logprobs:
    """OpenAI's legacy completions `logprobs` object.

    Log-probabilities are those of the model's own distribution (log-softmax of the logits),
    before temperature and top_p, as OpenAI and vLLM report them. `text_offset` counts characters
    from the start of the prompt.
    """

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


@dataclass(frozen=True)
class Choice:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: Logprobs | None = None


@dataclass(frozen=True)
class Completion:
    """The result of one request: one choice per prompt, all computed with `version`."""

    choices: list[Choice]
    version: int
    seconds: float

    @property
    def prompt_tokens(self) -> int:
        return sum(c.prompt_tokens for c in self.choices)

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)


class Generator:
    """Completes prompts with the handle's model; thread-safe (each call holds the read lock).

    `version` returns the model version currently applied. It is called inside
    `handle.reading()`, so it must be updated by the writer inside `handle.writing()` (the edit
    store's CURRENT pointer moved together with the weights).
    """

    def __init__(self, handle: ServedModel, version: Callable[[], int]):
        self.handle = handle
        self.version = version
        tok = handle.tokenizer
        config = handle.model.config
        self.context_length: int = int(getattr(config, "max_position_embeddings", 0) or 0)
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        gen_config = getattr(handle.model, "generation_config", None)
        gen_eos = getattr(gen_config, "eos_token_id", None)
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif gen_eos:
            eos.update(gen_eos)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        # transformers 5.x renamed the KV-cache argument `past_key_values` to `cache`; ask the
        # model's forward which one it takes instead of pinning a version.
        forward_params = inspect.signature(handle.model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_params else "past_key_values"
        # Only the last position's logits are needed; older releases call this num_logits_to_keep.
        self._keep_args: dict[str, int] = next(
            (
                {name: 1}
                for name in ("logits_to_keep", "num_logits_to_keep")
                if name in forward_params
            ),
            {},
        )

    def encode(self, prompt: str) -> list[int]:
        """Prompt → token ids, with BOS exactly as the tokenizer adds it."""
        ids = self.handle.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            raise InvalidRequest("the prompt encodes to no tokens", param="prompt")
        return list(ids)

    def complete(self, prompts: Sequence[str], params: SamplingParams) -> Completion:
        """Complete every prompt with one model version; raises InvalidRequest before locking."""
        encoded = [self.encode(p) for p in prompts]
        for ids in encoded:
            self._check_context(len(ids), params.max_tokens)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        started = time.perf_counter()
        with self.handle.reading():
            version = self.version()
            device = self.handle.device
            rng = torch.Generator(device=device).manual_seed(seed)
            choices = [
                self._generate(prompt, ids, params, rng)
                for prompt, ids in zip(prompts, encoded, strict=True)
            ]
        return Completion(choices, version, time.perf_counter() - started)

    def _check_context(self, prompt_tokens: int, max_tokens: int) -> None:
        if self.context_length and prompt_tokens + max_tokens > self.context_length:
            raise InvalidRequest(
                f"This model's maximum context length is {self.context_length} tokens; the "
                f"request needs {prompt_tokens + max_tokens} ({prompt_tokens} in the prompt, "
                f"{max_tokens} for the completion). Shorten the prompt or lower max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )

    @torch.inference_mode()
    def _generate(
        self, prompt: str, prompt_ids: list[int], params: SamplingParams, rng: torch.Generator
    ) -> Choice:
        model = self.handle.model
        device = self.handle.device
        input_ids = torch.tensor([prompt_ids], device=device)  # (1, p)
        # Decoding generated ids alone drops the leading space of SentencePiece-style tokens
        # ("▁Paris" → "Paris"), so the continuation is decoded after a few prompt tokens and
        # the prompt part cut off again.
        context = prompt_ids[-_CONTEXT_TOKENS:]
        generated: list[int] = []
        text = ""
        finish: FinishReason = "length"
        lp: Logprobs | None = None if params.logprobs is None else Logprobs([], [], [], [])
        past = None

        for _ in range(params.max_tokens):
            out = model(
                input_ids=input_ids, use_cache=True, **self._keep_args, **{self._cache_arg: past}
            )
            past = out[self._cache_arg]
            logits = out.logits[0, -1].float()  # (vocab,)
            if not torch.isfinite(logits).all():
                raise ModelCorrupted("the model produced non-finite logits")
            token = _sample(logits, params, rng)
            if token in self.eos_token_ids:
                finish = "stop"
                break
            if lp is not None:
                self._record_logprobs(lp, logits, token, context + generated, params.logprobs)
                lp.text_offset.append(len(prompt) + len(text))
            generated.append(token)
            # The whole continuation each step: a byte-level token can complete a character
            # begun by the previous one, so per-token pieces do not simply concatenate.
            text = self._continuation(context, generated)
            if params.stop:
                cut = _find_stop(text, params.stop)
                if cut is not None:
                    text = text[:cut]
                    finish = "stop"
                    break
            input_ids = torch.tensor([[token]], device=device)  # (1, 1)

        return Choice(text, finish, len(prompt_ids), len(generated), lp)

    def _continuation(self, context: list[int], ids: list[int]) -> str:
        """The text `ids` add after `context`."""
        tok = self.handle.tokenizer
        head = tok.decode(context, skip_special_tokens=True)
        full = tok.decode(context + ids, skip_special_tokens=True)
        if full.startswith(head):
            return full[len(head) :]
        # The context's last character merged with the continuation's first: decode alone.
        return tok.decode(ids, skip_special_tokens=True)

    def _record_logprobs(
        self, lp: Logprobs, logits: torch.Tensor, token: int, before: list[int], k: int | None
    ) -> None:
        logp = F.log_softmax(logits, dim=-1)  # (vocab,)
        context = before[-_CONTEXT_TOKENS:]
        lp.tokens.append(self._continuation(context, [token]))
        lp.token_logprobs.append(float(logp[token]))
        top: dict[str, float] = {}
        if k:
            values, indices = torch.topk(logp, min(k, logp.numel()))
            for value, index in zip(values.tolist(), indices.tolist(), strict=True):
                # Distinct ids can decode to one string; keep the likelier (first) one.
                top.setdefault(self._continuation(context, [index]), value)
        lp.top_logprobs.append(top)


def _sample(logits: torch.Tensor, params: SamplingParams, rng: torch.Generator) -> int:
    """One token id from `logits` (vocab,): argmax at temperature 0, else nucleus sampling."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)  # (vocab,)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=rng)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=rng))


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string begins in text, or None."""
    hits = [i for s in stops if (i := text.find(s)) != -1]
    return min(hits) if hits else None

"""Text completion on a Hugging Face causal LM under the model's read lock, whole or streamed.

A non-streamed request (every prompt and every choice of it, every token) runs inside one
`handle.reading()`, and the model version is read inside that lock, so a response is computed
with exactly one version and names it: an edit batch becomes visible to a request entirely or not
at all. Tokenization happens before the lock is taken (edits never touch the tokenizer), so a
prompt over the context window is refused without waiting for an edit to finish.

A streamed request (`Generator.stream`) takes the read lock once per decoding step instead, so a
weight swap waits for at most one step of it, never for the whole stream. The version is read
under the first step's lock and pinned: every later step checks, under its lock, that the same
version is still served. If a swap came in between, the KV cache holds the old weights' keys
and values and continuing would mix two versions in one answer, so the stream ends there with
finish_reason `version_changed`: everything it sent was computed with the version it named.

Decoding is `editd.editing.decoding.Decoder`, the KV-cached loop that served scoring uses too.
A request's choices (every prompt times `n`) are decoded together, up to `max_batch_rows` rows
per forward: one left-padded forward over their prompts, then one token per step for every row
still running. A row decodes what it would alone (position ids count its own tokens); a row
that ended is fed its last token until its batch ends, and what comes out for it is not read.
Temperature 0 is `greedy_token`. Sampling draws from a `torch.Generator` seeded per choice
(choice k of a request with `seed` s uses s + k), so a request with a `seed` gives the same text
on the same model version and device, streamed or not.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

from editd.daemon.errors import InvalidRequest, ModelCorrupted
from editd.editing.decoding import Decoder, Rows, greedy_token

# "version_changed": a stream whose served version changed under it (see the module docstring).
FinishReason = Literal["stop", "length", "version_changed"]
# A prompt is text, or token ids taken as they are (no BOS added).
Prompt = str | list[int]
# Prompt tokens decoded before a continuation so its first token keeps its leading space.
_CONTEXT_TOKENS = 4
# What a byte-level tokenizer decodes an incomplete UTF-8 sequence to; held back when streaming.
_REPLACEMENT = "\ufffd"
# Rows decoded in one forward. More rows use the cores better, up to the point where one step's
# activations and KV cache stop fitting in cache; 32 is the served scoring's order of batch.
MAX_BATCH_ROWS = 32
# Prompt log-probabilities keep every position's logits (rows × prompt length × vocabulary
# floats): such rows are batched only up to this many bytes of logits.
PROMPT_LOGITS_BYTES = 256 * 2**20


class ServedModel(Protocol):
    """What generation needs of the model handle (`editd.editing.model.ModelHandle`)."""

    model: torch.nn.Module
    tokenizer: Any
    device: torch.device

    def reading(self) -> contextlib.AbstractContextManager[Any]: ...


@dataclass(frozen=True)
class SamplingParams:
    """How to continue a prompt. temperature 0 is greedy decoding (top_p and seed unused).

    `n` choices per prompt. `echo` puts the prompt before each choice's text; with `logprobs`
    the prompt's tokens get log-probabilities too (the first one None), which is how
    loglikelihood is computed over the completions API (`echo`, `max_tokens` 0, `logprobs` 1).
    `max_tokens` may be 0 only with `echo`.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    seed: int | None = None
    n: int = 1
    echo: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < (0 if self.echo else 1):
            raise InvalidRequest(
                "max_tokens must be at least 1 (0 is allowed with echo)", param="max_tokens"
            )
        if self.temperature < 0:
            raise InvalidRequest("temperature must be >= 0", param="temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
        if self.logprobs is not None and self.logprobs < 0:
            raise InvalidRequest("logprobs must be >= 0", param="logprobs")
        if any(s == "" for s in self.stop):
            raise InvalidRequest("stop strings must not be empty", param="stop")
        if self.n < 1:
            raise InvalidRequest("n must be at least 1", param="n")


@dataclass
class Logprobs:
    """OpenAI's legacy completions `logprobs` object.

    Log-probabilities are those of the model's own distribution (log-softmax of the logits),
    before temperature and top_p, as OpenAI and vLLM report them. `text_offset` counts characters
    from the start of the prompt. An echoed prompt's first token has None for its log-prob and
    its top log-probs (nothing predicts it).
    """

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }

    def __len__(self) -> int:
        return len(self.tokens)

    def slice(self, start: int, stop: int | None = None) -> Logprobs:
        return Logprobs(
            self.tokens[start:stop],
            self.token_logprobs[start:stop],
            self.top_logprobs[start:stop],
            self.text_offset[start:stop],
        )

    def append(self, token: str, logprob: float | None, top: dict[str, float] | None, at: int):
        self.tokens.append(token)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(at)


@dataclass(frozen=True)
class Choice:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: Logprobs | None = None


@dataclass(frozen=True)
class Completion:
    """The result of one request: `n` choices per prompt, all computed with `version`.

    Choice `i * n + j` is prompt i's j-th choice, as OpenAI numbers them. Usage counts each
    prompt once, however many choices it has.
    """

    choices: list[Choice]
    version: int
    seconds: float
    n: int = 1

    @property
    def prompt_tokens(self) -> int:
        return sum(c.prompt_tokens for c in self.choices[:: self.n])

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)


@dataclass(frozen=True)
class Delta:
    """What one choice of a stream adds: new text, its tokens' logprobs, and how it ended."""

    index: int
    text: str
    logprobs: Logprobs | None
    finish_reason: FinishReason | None


class Generator:
    """Completes prompts with the handle's model; thread-safe (each call holds the read lock).

    `version` returns the model version currently applied. It is called inside
    `handle.reading()`, so it must be updated by the writer inside `handle.writing()` (the edit
    store's CURRENT pointer moved together with the weights).
    """

    def __init__(
        self,
        handle: ServedModel,
        version: Callable[[], int],
        *,
        max_batch_rows: int = MAX_BATCH_ROWS,
    ):
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be at least 1, got {max_batch_rows}")
        self.handle = handle
        self.version = version
        self.max_batch_rows = max_batch_rows
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
        self.vocab_size: int = len(tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # Padding is masked out of attention; any id in the vocabulary will do.
        self.pad_id: int = int(pad) if pad is not None else 0
        self.decoder = Decoder(handle.model)

    # -- tokens ------------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        """Prompt → token ids: text with BOS exactly as the tokenizer adds it, ids as they are."""
        if isinstance(prompt, str):
            ids = list(self.handle.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        else:
            ids = list(prompt)
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise InvalidRequest(
                    f"token id {bad[0]} is outside the vocabulary (0 to {self.vocab_size - 1})",
                    param="prompt",
                )
        if not ids:
            raise InvalidRequest("the prompt encodes to no tokens", param="prompt")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.handle.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.handle.tokenizer, "chat_template", None))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The model's own chat template over `messages`, ending where the assistant answers."""
        if not self.has_chat_template:
            raise InvalidRequest(
                "this model has no chat template (it is not a chat model); use /v1/completions",
                param="messages",
                code="no_chat_template",
            )
        try:
            ids = self.handle.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True
            )
        except Exception as exc:  # a Jinja template may raise anything on unusual input
            raise InvalidRequest(
                f"the model's chat template refused these messages: {exc}", param="messages"
            ) from exc
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer releases
            ids = ids["input_ids"]
        return self.encode([int(i) for i in ids])

    # -- generation --------------------------------------------------------------------------

    def complete(self, prompts: Sequence[Prompt], params: SamplingParams) -> Completion:
        """Complete every prompt with one model version; raises InvalidRequest before locking."""
        started = time.perf_counter()
        decodings = self._decodings(prompts, params)
        with self.handle.reading():
            version = self.version()
            for batch in self._batches(decodings):
                while not batch.done:
                    batch.step()
        return Completion(
            [d.choice() for d in decodings], version, time.perf_counter() - started, params.n
        )

    def stream(self, prompts: Sequence[Prompt], params: SamplingParams) -> Stream:
        """Start a stream: the prompts' first step runs now and pins the version it read."""
        decodings = self._decodings(prompts, params)
        return Stream(self, decodings, self._batches(decodings), params.n)

    def _batches(self, decodings: list[_Decoding]) -> list[_Batch]:
        """Consecutive choices, `max_batch_rows` at most per batch (fewer with prompt logits)."""
        batches: list[_Batch] = []
        rows: list[_Decoding] = []
        longest = 0
        for d in decodings:
            longest_with = max(longest, len(d.prompt_ids))
            full = len(rows) >= self.max_batch_rows or (
                d.wants_prompt_logprobs
                and (len(rows) + 1) * longest_with * self.vocab_size * 4 > PROMPT_LOGITS_BYTES
            )
            if rows and full:
                batches.append(_Batch(self, rows))
                rows, longest_with = [], len(d.prompt_ids)
            rows.append(d)
            longest = longest_with
        if rows:
            batches.append(_Batch(self, rows))
        return batches

    def _decodings(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[_Decoding]:
        encoded = [self.encode(p) for p in prompts]
        for ids in encoded:
            self._check_context(len(ids), params.max_tokens)
        seed = params.seed if params.seed is not None else secrets.randbits(62)
        decodings = []
        for prompt, ids in zip(prompts, encoded, strict=True):
            text = prompt if isinstance(prompt, str) else self.decode(ids)
            for _ in range(params.n):
                rng = torch.Generator(device=self.handle.device)
                rng.manual_seed(seed + len(decodings))
                decodings.append(_Decoding(self, text, ids, params, rng))
        return decodings

    def _check_context(self, prompt_tokens: int, max_tokens: int) -> None:
        if self.context_length and prompt_tokens + max_tokens > self.context_length:
            raise InvalidRequest(
                f"This model's maximum context length is {self.context_length} tokens; the "
                f"request needs {prompt_tokens + max_tokens} ({prompt_tokens} in the prompt, "
                f"{max_tokens} for the completion). Shorten the prompt or lower max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )

    def _continuation(self, context: list[int], ids: list[int]) -> str:
        """The text `ids` add after `context`."""
        tok = self.handle.tokenizer
        head = tok.decode(context, skip_special_tokens=True)
        full = tok.decode(context + ids, skip_special_tokens=True)
        if full.startswith(head):
            return full[len(head) :]
        # The context's last character merged with the continuation's first: decode alone.
        return tok.decode(ids, skip_special_tokens=True)

    def _top(self, logp: torch.Tensor, before: list[int], k: int | None) -> dict[str, float]:
        top: dict[str, float] = {}
        if k:
            context = before[-_CONTEXT_TOKENS:]
            values, indices = torch.topk(logp, min(k, logp.numel()))
            for value, index in zip(values.tolist(), indices.tolist(), strict=True):
                # Distinct ids can decode to one string; keep the likelier (first) one.
                top.setdefault(self._continuation(context, [index]), value)
        return top


class Stream:
    """A streamed request: `first` ran under the read lock; each `step` takes it again.

    Not thread-safe: one caller steps it (the HTTP layer, from one worker at a time).
    """

    def __init__(
        self, generator: Generator, decodings: list[_Decoding], batches: list[_Batch], n: int
    ):
        self._gen = generator
        self._decodings = decodings
        self._batches = batches
        self.n = n
        self.version: int = -1
        self.started = time.perf_counter()

    @property
    def done(self) -> bool:
        return all(d.done for d in self._decodings)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(d.prompt_ids) for d in self._decodings[:: self.n])

    @property
    def completion_tokens(self) -> int:
        return sum(len(d.generated) for d in self._decodings)

    def first(self) -> list[Delta]:
        """The prompts' forward passes and first tokens; reads and pins the served version."""
        with self._gen.handle.reading():
            self.version = self._gen.version()
            for batch in self._batches:
                batch.step()
        return self._deltas()

    def step(self) -> list[Delta]:
        """One more token for every unfinished choice, or the end if the version changed."""
        with self._gen.handle.reading():
            if self._gen.version() != self.version:
                for batch in self._batches:
                    batch.abandon("version_changed")
            else:
                for batch in self._batches:
                    if not batch.done:
                        batch.step()
        return self._deltas()

    def _deltas(self) -> list[Delta]:
        deltas = []
        for i, d in enumerate(self._decodings):
            delta = d.take()
            if delta is not None:
                deltas.append(Delta(i, *delta))
        return deltas


class _Batch:
    """Choices decoded together: one KV cache, one forward per step for all of them.

    Not thread-safe; the caller holds the model's read lock around each `step`.
    """

    def __init__(self, gen: Generator, decodings: list[_Decoding]):
        self.gen = gen
        self.decodings = decodings
        self.rows: Rows | None = None  # the KV cache, once the prompts ran
        self.members: list[_Decoding] = []  # the rows of `rows`, in order

    @property
    def done(self) -> bool:
        return all(d.done for d in self.decodings)

    def abandon(self, reason: FinishReason) -> None:
        for d in self.decodings:
            d.abandon(reason)
        self.rows = None

    @torch.inference_mode()
    def step(self) -> None:
        """The prompts' forward, or one more token for every row still running."""
        if self.rows is None:
            for d in self.decodings:
                d.skip_if_nothing_to_compute()
            self.members = [d for d in self.decodings if not d.done]
            if not self.members:
                return
            every = any(d.wants_prompt_logprobs for d in self.members)
            self.rows = self.gen.decoder.prefill(
                [d.prompt_ids for d in self.members], pad_id=self.gen.pad_id, every_position=every
            )
            prompt_logits = self.rows.prompt_logits
            for i, d in enumerate(self.members):
                if prompt_logits is not None and d.wants_prompt_logprobs:
                    d.record_prompt_logprobs(prompt_logits[i, -len(d.prompt_ids) :].float())
                d.accept(self.rows.logits[i])
        else:
            running = [i for i, d in enumerate(self.members) if not d.done]
            if not running:
                self.rows = None
                return
            # A row that ended gets its last token again: what it computes is not read.
            last = [d.generated[-1] if d.generated else d.prompt_ids[-1] for d in self.members]
            self.rows.advance(torch.tensor(last))
            for i in running:
                self.members[i].accept(self.rows.logits[i])
        if self.done:
            self.rows = None  # the KV cache is not needed any more


class _Decoding:
    """One choice being generated: its tokens, text and logprobs so far (its batch decodes)."""

    def __init__(
        self,
        gen: Generator,
        prompt: str,
        prompt_ids: list[int],
        params: SamplingParams,
        rng: torch.Generator,
    ):
        self.gen = gen
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.rng = rng
        # Decoding generated ids alone drops the leading space of SentencePiece-style tokens
        # ("▁Paris" → "Paris"), so the continuation is decoded after a few prompt tokens and
        # the prompt part cut off again.
        self.context = prompt_ids[-_CONTEXT_TOKENS:]
        self.generated: list[int] = []
        self.text = ""  # the continuation (the prompt is added in `choice` when echoed)
        self.finish: FinishReason | None = None
        self.lp: Logprobs | None = None if params.logprobs is None else Logprobs()
        self.prompt_lp: Logprobs | None = None
        self.wants_prompt_logprobs = params.echo and params.logprobs is not None
        # Streaming: how much of the text and of the logprobs was handed out already.
        self._sent_text = -1  # -1: not even the echoed prompt yet
        self._sent_lp = 0
        self._finish_sent = False

    @property
    def done(self) -> bool:
        return self.finish is not None

    def abandon(self, reason: FinishReason) -> None:
        if self.finish is None:
            self.finish = reason

    def skip_if_nothing_to_compute(self) -> None:
        """Echo with `max_tokens` 0 and no logprobs: the answer is the prompt, no forward."""
        if self.params.max_tokens == 0 and not self.wants_prompt_logprobs:
            self.abandon("length")

    def accept(self, next_logits: torch.Tensor) -> None:
        """Take this step's next-token logits (vocab,): choose, record, and see if it ended."""
        gen, params = self.gen, self.params
        if len(self.generated) >= params.max_tokens:
            self.abandon("length")
            return
        logits = next_logits.float()  # (vocab,)
        if not torch.isfinite(logits).all():
            raise ModelCorrupted("the model produced non-finite logits")
        token = _sample(logits, params, self.rng)
        if token in gen.eos_token_ids:
            self.abandon("stop")
            return
        if self.lp is not None:
            logp = F.log_softmax(logits, dim=-1)  # (vocab,)
            before = self.context + self.generated
            self.lp.append(
                gen._continuation(before[-_CONTEXT_TOKENS:], [token]),
                float(logp[token]),
                gen._top(logp, before, params.logprobs),
                len(self.text),  # made absolute in `choice` / `take`
            )
        self.generated.append(token)
        # The whole continuation each step: a byte-level token can complete a character
        # begun by the previous one, so per-token pieces do not simply concatenate.
        self.text = gen._continuation(self.context, self.generated)
        if params.stop:
            cut = _find_stop(self.text, params.stop)
            if cut is not None:
                self.text = self.text[:cut]
                if self.lp is not None:
                    # Only tokens that end before the stop string: the text and the tokens
                    # must agree, and neither shows the stop string.
                    kept = sum(
                        1
                        for tok, at in zip(self.lp.tokens, self.lp.text_offset, strict=True)
                        if at + len(tok) <= cut
                    )
                    self.lp = self.lp.slice(0, kept)
                self.abandon("stop")
                return
        if len(self.generated) >= params.max_tokens:
            self.abandon("length")
            return

    def record_prompt_logprobs(self, logits: torch.Tensor) -> None:
        """Log-probs of each prompt token given the ones before it; `logits` is (p, vocab)."""
        gen, k = self.gen, self.params.logprobs
        ids = self.prompt_ids
        logp = F.log_softmax(logits, dim=-1)  # (p, vocab)
        lp = Logprobs()
        at = 0
        for i, token in enumerate(ids):
            piece = gen._continuation(ids[max(0, i - _CONTEXT_TOKENS) : i], [token])
            if i == 0:
                lp.append(piece, None, None, at)
            else:
                row = logp[i - 1]
                lp.append(piece, float(row[token]), gen._top(row, ids[:i], k), at)
            at += len(piece)
        self.prompt_lp = lp

    def _lead(self) -> str:
        return self.prompt if self.params.echo else ""

    def _all_logprobs(self) -> Logprobs | None:
        """Prompt (when echoed) then continuation logprobs, offsets from the prompt's start."""
        if self.lp is None:
            return None
        out = Logprobs()
        if self.prompt_lp is not None:
            out = self.prompt_lp.slice(0)
        base = len(self.prompt)
        for tok, lp, top, at in zip(
            self.lp.tokens,
            self.lp.token_logprobs,
            self.lp.top_logprobs,
            self.lp.text_offset,
            strict=True,
        ):
            out.append(tok, lp, top, base + at)
        return out

    def choice(self) -> Choice:
        return Choice(
            self._lead() + self.text,
            self.finish or "length",
            len(self.prompt_ids),
            len(self.generated),
            self._all_logprobs(),
        )

    def take(self) -> tuple[str, Logprobs | None, FinishReason | None] | None:
        """What is new since the last `take`, or None when nothing is (and it is not done).

        While the choice runs, text that may still turn into a stop string, or an incomplete
        UTF-8 character, is held back; logprobs go out with the text their tokens end in.
        """
        lead = self._lead()
        if self._sent_text < 0:
            self._sent_text = 0
            head = lead
        else:
            head = ""
        safe = len(self.text)
        if not self.done:
            safe = len(self.text.rstrip(_REPLACEMENT))
            if self.params.stop:
                safe = max(0, min(safe, len(self.text) - max(map(len, self.params.stop)) + 1))
        safe = max(safe, self._sent_text)
        text = head + self.text[self._sent_text : safe]
        self._sent_text = safe
        logprobs = None
        everything = self._all_logprobs()
        if everything is not None:
            end = len(self.prompt) + safe  # offsets count from the prompt's start
            ready = (
                len(everything)
                if self.done
                else sum(
                    1
                    for tok, at in zip(everything.tokens, everything.text_offset, strict=True)
                    if at + len(tok) <= end
                )
            )
            ready = max(ready, self._sent_lp)
            logprobs = everything.slice(self._sent_lp, ready)
            self._sent_lp = ready
        finish = None
        if self.done and not self._finish_sent:
            finish = self.finish
            self._finish_sent = True
        if not text and finish is None and not (logprobs and len(logprobs)):
            return None
        return text, logprobs, finish


def _sample(logits: torch.Tensor, params: SamplingParams, rng: torch.Generator) -> int:
    """One token id from `logits` (vocab,): argmax at temperature 0, else nucleus sampling."""
    if params.temperature == 0:
        return int(greedy_token(logits))
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

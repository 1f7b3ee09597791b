"""The daemon's HTTP API: OpenAI-compatible completions and chat, plus health, versions and admin.

Routes are thin. Each takes the `Service` from app state, calls one method, and turns its result
or error into a response; all policy (what a version is, how a rollback runs, what the metrics
hold) lives in the daemon. Blocking work never runs on the event loop: inference goes to a
bounded worker pool of its own, so `/livez`, `/readyz` and `/metrics` keep answering while every
inference worker waits behind an edit holding the model's write lock; admin calls go to
Starlette's thread pool.

Every response carries `x-editd-model-version`. A completion's header names the version its
tokens were computed with (recorded under the read lock), never "whatever is current now". A
stream's header and every one of its chunks (`system_fingerprint`) name the version pinned by
its first decoding step; a swap ends the stream (`finish_reason: version_changed`) rather than
let two versions write one answer (generation.py).

The OpenAI fields editd cannot honour (non-zero penalties, a logit bias, best_of > n, a suffix,
tools) are refused by name with a 400; the same fields at their no-op values are accepted,
because client libraries send them whether or not they are set. The README's API table lists
every field.

Admin routes (`POST /v1/rollback`, `POST /v1/consolidate`, `POST /v1/eval`) need
`Authorization: Bearer <serve.admin_token>`, compared with `hmac.compare_digest`. Missing or wrong
credentials: 401. No token configured: 403 on every admin route, whatever the request carries;
403 and not 503, because it is a fixed property of the configuration, not a transient state a
client should retry.

Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so OpenAI client
libraries show the message. Malformed bodies are 400 (not FastAPI's 422), as OpenAI answers.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Literal, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import editd
from editd.config import ServeSettings
from editd.daemon.errors import (
    FatalError,
    Forbidden,
    InvalidRequest,
    NotFound,
    RecoverableError,
    Unauthorized,
    Unavailable,
)
from editd.daemon.generation import (
    Completion,
    Delta,
    Generator,
    Logprobs,
    Prompt,
    SamplingParams,
    Stream,
)

log = logging.getLogger(__name__)

VERSION_HEADER = "x-editd-model-version"
MAX_PROMPTS_PER_REQUEST = 32  # also the most choices (prompts × n) one request may ask for
MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 20
# Room for JSON syntax, escapes and the other fields around the prompts.
_BODY_OVERHEAD_BYTES = 64 * 1024


class Service(Protocol):
    """What the daemon provides to the HTTP layer.

    `model_name`, `current_version` and `is_ready` are called on the event loop and must not
    block (read an attribute). The other methods may block; they run in worker threads.
    `current_version` is the version of the weights being served now (0 = base model).
    """

    @property
    def model_name(self) -> str: ...

    def current_version(self) -> int: ...

    def is_ready(self) -> bool:
        """True once the model is loaded, and False while a restore or rollback rewrites it."""
        ...

    def readiness(self) -> dict[str, Any]:
        """What `/readyz` adds to ready and version: the role and, on a replica, how far it
        lags the update log. Called on the event loop: read attributes only."""
        ...

    @property
    def generator(self) -> Generator:
        """Tokenizer work (`encode`, `decode`, `encode_chat`) for the API; does not block."""
        ...

    def complete(self, prompts: list[Prompt], params: SamplingParams) -> Completion:
        """Run one completion request (normally `Generator.complete`, plus request metrics)."""
        ...

    def stream(self, prompts: list[Prompt], params: SamplingParams) -> Stream:
        """A stream not started yet (normally `Generator.stream`); the API steps it."""
        ...

    def stream_ended(self, stream: Stream) -> None:
        """A stream finished or was dropped: count its tokens."""
        ...

    def versions(self) -> list[dict[str, Any]]:
        """The edit store's versions, oldest first, as JSON-ready dicts."""
        ...

    def rollback(self, version: int, reason: str) -> dict[str, Any]:
        """Restore `version`; raise NotFound for an unknown one, Conflict when one is running."""
        ...

    def consolidate(self) -> dict[str, Any]:
        """Re-solve every live fact jointly as a new version; Conflict when an edit or
        rollback is running, there is nothing to consolidate, or this is a replica."""
        ...

    def metrics_payload(self) -> bytes:
        """The Prometheus text exposition of the daemon's registry (`generate_latest`)."""
        ...

    def status(self) -> dict[str, Any]:
        """Version, consumer lag, last scores, thresholds, last rollback: for `editd status`."""
        ...

    def evaluate_now(self) -> dict[str, Any]:
        """Run an evaluation now and return its scores: for `editd eval`."""
        ...

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """Record one HTTP request (route template, not raw path: bounded label values)."""
        ...

    def on_fatal(self, error: FatalError) -> None:
        """A handler raised a FatalError: the daemon must stop serving from this model."""
        ...


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Common(BaseModel):
    """Fields completions and chat share. Unknown fields are refused by name (a typo in a
    sampling field would otherwise be silently ignored)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(1, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted at their no-op values only (see `_refuse_unsupported`).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Common):
    """The OpenAI completions fields; those editd cannot honour are refused by name."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str
    text: str | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise ValueError(
                f"content parts of type {value!r} are not supported: editd serves a text-only model"
            )
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content)
        return self.content or ""


class ChatRequest(_Common):
    """The OpenAI chat completions fields; those editd cannot honour are refused by name."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=0)
    reason: str = Field("operator", min_length=1, max_length=200)


def create_app(
    service: Service,
    serve: ServeSettings,
    *,
    inference_workers: int = 2,
    max_pending: int = 64,
) -> FastAPI:
    """Build the API around `service`.

    `inference_workers` threads run generation (on a CPU more threads only split the same
    cores; on a GPU a few overlap tokenization and Python overhead). At most `max_pending`
    completion requests wait or run at once; more get 429 rather than an unbounded queue.
    """
    executor = ThreadPoolExecutor(inference_workers, thread_name_prefix="editd-infer")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="editd",
        summary="A Llama kept up to date with a stream of facts.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    admin_token = serve.admin_token.get_secret_value() if serve.admin_token else None
    admission = _Admission(max_pending)
    max_body = serve.max_prompt_chars * 4 * MAX_PROMPTS_PER_REQUEST + _BODY_OVERHEAD_BYTES

    api_key = serve.api_key.get_secret_value() if serve.api_key else None

    def require_admin(request: Request) -> None:
        if not admin_token:
            raise Forbidden(
                "the admin API is disabled: set serve.admin_token (EDITD_SERVE__ADMIN_TOKEN)"
            )
        if not _bearer_is(request, admin_token):
            raise Unauthorized("missing or wrong admin token (Authorization: Bearer <token>)")

    def require_api_key(request: Request) -> None:
        # The admin token opens inference too: an operator checking an answer needs no second
        # secret.
        if api_key is None or _bearer_is(request, api_key):
            return
        if admin_token and _bearer_is(request, admin_token):
            return
        raise Unauthorized("missing or wrong API key (Authorization: Bearer <serve.api_key>)")

    admin = [Depends(require_admin)]
    inference = [Depends(require_api_key)]

    created = int(time.time())

    def check_model(name: str | None) -> None:
        if name is not None and name != service.model_name:
            raise NotFound(
                f"model {name!r} is not served here; this daemon serves {service.model_name!r}",
                param="model",
                code="model_not_found",
            )

    async def run(
        prompts: list[Prompt], params: SamplingParams, body: _Common, shape: _Shape
    ) -> Response:
        """Admit, then answer whole (JSON) or as server-sent events."""
        if not service.is_ready():
            raise Unavailable("the model is loading or being restored; retry shortly")
        if not admission.try_acquire():
            raise _TooBusy(f"more than {max_pending} completion requests in flight; retry later")
        loop = asyncio.get_running_loop()
        if not body.stream:
            future = loop.run_in_executor(executor, service.complete, prompts, params)
            # Freed when the worker finishes, not when the client gives up: a disconnected
            # client's generation still occupies a worker until it ends.
            future.add_done_callback(lambda _: admission.release())
            result = await asyncio.shield(future)
            return JSONResponse(
                shape.body(result, service.model_name),
                headers={VERSION_HEADER: str(result.version)},
            )
        try:
            stream = await run_in_threadpool(service.stream, prompts, params)
            # The first step runs before the response starts, so its header can name the
            # version every chunk will be computed with.
            first = await loop.run_in_executor(executor, stream.first)
        except BaseException:
            admission.release()
            raise
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        ended = _Once(lambda: (admission.release(), service.stream_ended(stream)))
        events = _events(stream, first, shape, service, executor, include_usage, ended)
        # A client gone before the body starts means the generator never runs its `finally`;
        # its collection then frees the slot.
        weakref.finalize(events, ended)
        return StreamingResponse(
            events,
            media_type="text/event-stream",
            headers={VERSION_HEADER: str(stream.version), "Cache-Control": "no-cache"},
        )

    @app.post("/v1/completions", dependencies=inference)
    async def completions(body: CompletionRequest) -> Response:
        check_model(body.model)
        _refuse_unsupported(body)
        prompts = _prompts(body.prompt)
        params = _sampling_params(body, prompts, serve, max_tokens=body.max_tokens)
        return await run(prompts, params, body, _Shape("text_completion", service.model_name))

    @app.post("/v1/chat/completions", dependencies=inference)
    async def chat_completions(body: ChatRequest) -> Response:
        check_model(body.model)
        _refuse_unsupported(body)
        _refuse_chat_unsupported(body)
        messages = [{"role": _role(m.role), "content": m.text()} for m in body.messages]
        ids = await run_in_threadpool(service.generator.encode_chat, messages)
        limit = body.max_completion_tokens or body.max_tokens
        if limit is None:
            # OpenAI's default is "as much as fits"; editd's cap is serve.max_tokens.
            room = (
                service.generator.context_length - len(ids)
                if (service.generator.context_length)
                else serve.max_tokens
            )
            limit = max(1, min(serve.max_tokens, room))
        params = _sampling_params(body, [ids], serve, max_tokens=limit)
        return await run([ids], params, body, _Shape("chat.completion", service.model_name))

    @app.get("/v1/models", dependencies=inference)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=inference)
    async def model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return model_card()

    def model_card() -> dict[str, Any]:
        generator = service.generator
        return {
            "id": service.model_name,
            "object": "model",
            "created": created,
            "owned_by": "editd",
            "version": service.current_version(),
            "max_model_len": generator.context_length or None,
            "chat": generator.has_chat_template,
        }

    @app.post("/v1/embeddings", dependencies=inference)
    async def embeddings() -> Response:
        raise NotFound(
            "editd does not serve embeddings: it serves one causal language model for "
            "/v1/completions and /v1/chat/completions",
            code="embeddings_not_supported",
        )

    @app.post("/tokenize", dependencies=inference)
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        generator = service.generator
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequest("send exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            messages = [{"role": _role(m.role), "content": m.text()} for m in body.messages]
            ids = await run_in_threadpool(generator.encode_chat, messages)
        else:
            text = body.prompt or ""
            if len(text) > serve.max_prompt_chars:
                raise InvalidRequest(
                    f"prompt has {len(text)} characters; the limit is {serve.max_prompt_chars}",
                    param="prompt",
                    code="prompt_too_long",
                )
            tok = generator.handle.tokenizer
            ids = list(tok(text, add_special_tokens=body.add_special_tokens)["input_ids"])
        return {"tokens": ids, "count": len(ids), "max_model_len": generator.context_length}

    @app.post("/detokenize", dependencies=inference)
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        generator = service.generator
        bad = [t for t in body.tokens if not 0 <= t < generator.vocab_size]
        if bad:
            raise InvalidRequest(
                f"token id {bad[0]} is outside the vocabulary (0 to {generator.vocab_size - 1})",
                param="tokens",
            )
        return {"prompt": generator.decode(body.tokens)}

    @app.get("/health")
    async def health() -> Response:
        # vLLM's probe: 200 while the model can answer, 503 otherwise (as /readyz).
        if not service.is_ready():
            raise Unavailable("the model is loading or being restored")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, Any]:
        return {
            "version": editd.__version__,
            "model": service.model_name,
            "model_version": service.current_version(),
        }

    @app.get("/v1/versions")
    async def versions() -> dict[str, Any]:
        data = await run_in_threadpool(service.versions)
        return {"object": "list", "current": service.current_version(), "data": data}

    @app.post("/v1/rollback", dependencies=admin)
    async def rollback(body: RollbackRequest) -> dict[str, Any]:
        log.warning("rollback to version %d requested over HTTP: %s", body.version, body.reason)
        return await run_in_threadpool(service.rollback, body.version, body.reason)

    @app.post("/v1/consolidate", dependencies=admin)
    async def consolidate() -> dict[str, Any]:
        log.warning("consolidation requested over HTTP")
        return await run_in_threadpool(service.consolidate)

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        return await run_in_threadpool(service.status)

    @app.post("/v1/eval", dependencies=admin)
    async def evaluate() -> dict[str, Any]:
        return await run_in_threadpool(service.evaluate_now)

    @app.get("/livez")
    async def livez() -> dict[str, str]:
        # Answered by the event loop itself: proves the process serves, nothing more.
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = service.is_ready()
        return JSONResponse(
            {"ready": ready, "version": service.current_version(), **service.readiness()},
            status_code=200 if ready else 503,
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        payload = await run_in_threadpool(service.metrics_payload)
        return Response(payload, media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(RecoverableError)
    async def recoverable(request: Request, exc: RecoverableError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        if isinstance(exc, _TooBusy):
            headers = {"Retry-After": "1"}
        return _error(exc.status_code, exc.message, exc.error_type, exc.param, exc.code, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: "
            + (
                "unknown field; editd does not accept it (the README's API table lists the "
                "fields it does)"
                if e.get("type") == "extra_forbidden"
                else e["msg"]
            )
            for e in exc.errors()
        )
        return _error(
            400,
            message or "invalid request body",
            "invalid_request_error",
            where[0] if where else None,
            "invalid_value",
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind, None, None, exc.headers)

    @app.exception_handler(FatalError)
    async def fatal(request: Request, exc: FatalError) -> JSONResponse:
        log.critical("fatal error while serving %s: %s", request.url.path, exc)
        service.on_fatal(exc)
        return _error(500, f"the served model is unusable: {exc}", "server_error", None, "fatal")

    app.add_middleware(_VersionAndTiming, service=service, max_body_bytes=max_body)
    return app


def _bearer_is(request: Request, secret: str) -> bool:
    scheme, _, credential = request.headers.get("authorization", "").partition(" ")
    # compare_digest on bytes: its time does not depend on where the first mismatch is.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        credential.strip().encode(), secret.encode()
    )


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def _role(role: str) -> str:
    # OpenAI's newer name for the system role; chat templates know "system".
    return "system" if role == "developer" else role


def _refuse_unsupported(body: CompletionRequest | ChatRequest) -> None:
    """400 for fields editd cannot honour; their no-op values pass."""
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            raise InvalidRequest(
                f"{name} is not supported by editd (only 0)", param=name, code="unsupported"
            )
    if body.logit_bias:
        raise InvalidRequest(
            "logit_bias is not supported by editd (only {} or null)",
            param="logit_bias",
            code="unsupported",
        )
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest(
            "stream_options is only allowed with stream: true", param="stream_options"
        )
    if isinstance(body, CompletionRequest):
        n = body.n or 1
        if body.best_of is not None and body.best_of != n:
            raise InvalidRequest(
                f"best_of {body.best_of} with n {n} is not supported: editd does not rank "
                "candidates, so best_of must equal n (or be left out)",
                param="best_of",
                code="unsupported",
            )
        if body.suffix:
            raise InvalidRequest(
                "suffix (insertion) is not supported by editd", param="suffix", code="unsupported"
            )


def _refuse_chat_unsupported(body: ChatRequest) -> None:
    if body.tools:
        raise InvalidRequest("tools are not supported by editd", param="tools", code="unsupported")
    if body.tool_choice not in (None, "none", "auto"):
        raise InvalidRequest(
            "tool_choice is not supported by editd", param="tool_choice", code="unsupported"
        )
    if body.response_format and body.response_format.get("type") != "text":
        raise InvalidRequest(
            'response_format other than {"type": "text"} is not supported by editd',
            param="response_format",
            code="unsupported",
        )
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")


def _sampling_params(
    body: CompletionRequest | ChatRequest,
    prompts: list[Prompt],
    serve: ServeSettings,
    *,
    max_tokens: int | None,
) -> SamplingParams:
    if not prompts:
        raise InvalidRequest("prompt must not be an empty list", param="prompt")
    n = body.n or 1
    if len(prompts) * n > MAX_PROMPTS_PER_REQUEST:
        raise InvalidRequest(
            f"at most {MAX_PROMPTS_PER_REQUEST} choices per request (prompts × n), got "
            f"{len(prompts)} × {n}",
            param="n" if n > 1 else "prompt",
        )
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str) and len(prompt) > serve.max_prompt_chars:
            raise InvalidRequest(
                f"prompt{'' if len(prompts) == 1 else f'[{i}]'} has {len(prompt)} characters; "
                f"the limit is {serve.max_prompt_chars} (serve.max_prompt_chars)",
                param="prompt",
                code="prompt_too_long",
            )
        if not prompt:
            raise InvalidRequest("a prompt must not be an empty list of tokens", param="prompt")
    max_tokens = 16 if max_tokens is None else max_tokens
    if max_tokens > serve.max_tokens:
        raise InvalidRequest(
            f"max_tokens is {max_tokens}; the limit is {serve.max_tokens} (serve.max_tokens)",
            param="max_tokens",
            code="max_tokens_too_large",
        )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
    if isinstance(body, ChatRequest):
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        echo = False
    else:
        logprobs = body.logprobs
        echo = bool(body.echo)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=tuple(stop),
        logprobs=logprobs,
        seed=body.seed,
        n=n,
        echo=echo,
    )


class _Shape:
    """How a result is written for one endpoint: completions ("text_completion") or chat."""

    def __init__(self, kind: str, model_name: str):
        self.chat = kind == "chat.completion"
        self.model_name = model_name
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._roled: set[int] = set()

    def _head(self, version: int, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": f"{kind}.chunk" if chunk and self.chat else kind,
            "created": self.created,
            "model": self.model_name,
            "system_fingerprint": f"editd-v{version}",
        }

    def _logprobs(self, lp: Logprobs | None) -> dict[str, Any] | None:
        if lp is None:
            return None
        if not self.chat:
            return lp.as_dict()
        return {
            "content": [
                {
                    "token": token,
                    "logprob": logprob,
                    "bytes": list(token.encode("utf-8")),
                    "top_logprobs": [
                        {"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}
                        for t, v in (top or {}).items()
                    ],
                }
                for token, logprob, top in zip(
                    lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True
                )
            ]
        }

    def body(self, result: Completion, model_name: str) -> dict[str, Any]:
        choices = []
        for i, choice in enumerate(result.choices):
            entry: dict[str, Any] = {"index": i}
            if self.chat:
                entry["message"] = {"role": "assistant", "content": choice.text}
            else:
                entry["text"] = choice.text
            entry["logprobs"] = self._logprobs(choice.logprobs)
            entry["finish_reason"] = choice.finish_reason
            choices.append(entry)
        return {
            **self._head(result.version, chunk=False),
            "choices": choices,
            "usage": _usage(result.prompt_tokens, result.completion_tokens),
        }

    def chunk(self, delta: Delta, version: int) -> dict[str, Any]:
        entry: dict[str, Any] = {"index": delta.index}
        if self.chat:
            content: dict[str, Any] = {}
            if delta.index not in self._roled:
                self._roled.add(delta.index)
                content["role"] = "assistant"
            if delta.text or "role" in content:
                content["content"] = delta.text
            entry["delta"] = content
        else:
            entry["text"] = delta.text
        entry["logprobs"] = self._logprobs(delta.logprobs) if delta.logprobs else None
        entry["finish_reason"] = delta.finish_reason
        return {**self._head(version, chunk=True), "choices": [entry], "usage": None}

    def usage_chunk(self, stream: Stream) -> dict[str, Any]:
        return {
            **self._head(stream.version, chunk=True),
            "choices": [],
            "usage": _usage(stream.prompt_tokens, stream.completion_tokens),
        }


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _events(
    stream: Stream,
    first: list[Delta],
    shape: _Shape,
    service: Service,
    executor: ThreadPoolExecutor,
    include_usage: bool,
    ended: Callable[[], Any],
) -> AsyncIterator[bytes]:
    """The stream as server-sent events; each step takes the read lock once (generation.py).

    A client that disconnects cancels this generator at its next await: the step running in a
    worker finishes, and no further step is taken.
    """
    loop = asyncio.get_running_loop()
    try:
        deltas = first
        while True:
            for delta in deltas:
                yield _sse(shape.chunk(delta, stream.version))
            if stream.done:
                break
            deltas = await loop.run_in_executor(executor, stream.step)
        if include_usage:
            yield _sse(shape.usage_chunk(stream))
        yield _sse("[DONE]")
    except FatalError as exc:
        log.critical("fatal error while streaming: %s", exc)
        service.on_fatal(exc)
        error = {
            "message": f"the served model is unusable: {exc}",
            "type": "server_error",
            "param": None,
            "code": "fatal",
        }
        yield _sse({"error": error})
    finally:
        ended()


def _error(
    status: int,
    message: str,
    kind: str,
    param: str | None,
    code: str | None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class _Once:
    """Calls `fn` the first time it is called; later calls do nothing."""

    def __init__(self, fn: Callable[[], Any]):
        self._fn: Callable[[], Any] | None = fn

    def __call__(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn()


class _TooBusy(RecoverableError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "overloaded"


class _Admission:
    """Counts completion requests queued or running; touched only on the event loop."""

    def __init__(self, limit: int):
        self._limit = limit
        self._count = 0

    def try_acquire(self) -> bool:
        if self._count >= self._limit:
            return False
        self._count += 1
        return True

    def release(self) -> None:
        self._count -= 1


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _VersionAndTiming:
    """Pure ASGI middleware: version header on every response, request timing, body cap.

    Pure ASGI rather than `@app.middleware("http")` so it wraps the response start without
    buffering bodies, and so an unexpected exception still yields a JSON 500 that carries the
    version header (Starlette's outermost error middleware would answer without it).
    """

    def __init__(self, app: ASGIApp, service: Service, max_body_bytes: int):
        self.app = app
        self.service = service
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_version(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = list(message.get("headers", []))
                if not any(k.lower() == VERSION_HEADER.encode() for k, _ in headers):
                    version = str(self.service.current_version()).encode()
                    headers.append((VERSION_HEADER.encode(), version))
                message["headers"] = headers
            await send(message)

        try:
            length = _content_length(scope)
            if length is not None and length > self.max_body_bytes:
                response = _error(
                    413,
                    f"request body of {length} bytes exceeds the limit of {self.max_body_bytes}",
                    "invalid_request_error",
                    None,
                    "body_too_large",
                )
                await response(scope, receive, send_with_version)
            else:
                await self.app(scope, receive, send_with_version)
        except Exception:
            log.exception("unhandled error serving %s %s", scope.get("method"), scope["path"])
            if response_started:
                raise
            response = _error(500, "internal error", "server_error", None, "internal_error")
            await response(scope, receive, send_with_version)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            try:
                self.service.observe_request(path, status, time.perf_counter() - started)
            except Exception:
                log.exception("observe_request failed")


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None

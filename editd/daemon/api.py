"""The daemon's HTTP API: an OpenAI-compatible completions subset plus health, versions and admin.

Routes are thin. Each takes the `Service` from app state, calls one method, and turns its result
or error into a response; all policy (what a version is, how a rollback runs, what the metrics
hold) lives in the daemon. Blocking work never runs on the event loop: inference goes to a
bounded worker pool of its own, so `/livez`, `/readyz` and `/metrics` keep answering while every
inference worker waits behind an edit holding the model's write lock; admin calls go to
Starlette's thread pool.

Every response carries `x-editd-model-version`. A completion's header names the version its
tokens were computed with (recorded under the read lock), never "whatever is current now".

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
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Literal, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

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
from editd.daemon.generation import Completion, SamplingParams

log = logging.getLogger(__name__)

VERSION_HEADER = "x-editd-model-version"
MAX_PROMPTS_PER_REQUEST = 32
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

    def complete(self, prompts: list[str], params: SamplingParams) -> Completion:
        """Run one completion request (normally `Generator.complete`, plus request metrics)."""
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


class CompletionRequest(BaseModel):
    """The OpenAI completions fields editd honours; any other field is refused by name."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    seed: int | None = None
    n: Literal[1] = 1
    stream: Literal[False] = False
    echo: Literal[False] = False
    user: str | None = None


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

    @app.post("/v1/completions", dependencies=inference)
    async def completions(body: CompletionRequest) -> JSONResponse:
        if body.model is not None and body.model != service.model_name:
            raise NotFound(
                f"model {body.model!r} is not served here; this daemon serves "
                f"{service.model_name!r}",
                param="model",
                code="model_not_found",
            )
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        params = _sampling_params(body, prompts, serve)
        if not service.is_ready():
            raise Unavailable("the model is loading or being restored; retry shortly")
        if not admission.try_acquire():
            raise _TooBusy(f"more than {max_pending} completion requests in flight; retry later")
        future = asyncio.get_running_loop().run_in_executor(
            executor, service.complete, prompts, params
        )
        # Freed when the worker finishes, not when the client gives up: a disconnected
        # client's generation still occupies a worker until it ends.
        future.add_done_callback(lambda _: admission.release())
        result = await asyncio.shield(future)
        return JSONResponse(
            _completion_body(result, service.model_name),
            headers={VERSION_HEADER: str(result.version)},
        )

    @app.get("/v1/models", dependencies=inference)
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": service.model_name,
                    "object": "model",
                    "owned_by": "editd",
                    "version": service.current_version(),
                }
            ],
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
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e['msg']}"
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


def _sampling_params(
    body: CompletionRequest, prompts: list[str], serve: ServeSettings
) -> SamplingParams:
    if not prompts:
        raise InvalidRequest("prompt must not be an empty list", param="prompt")
    if len(prompts) > MAX_PROMPTS_PER_REQUEST:
        raise InvalidRequest(
            f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request, got {len(prompts)}",
            param="prompt",
        )
    for i, prompt in enumerate(prompts):
        if len(prompt) > serve.max_prompt_chars:
            raise InvalidRequest(
                f"prompt{'' if len(prompts) == 1 else f'[{i}]'} has {len(prompt)} characters; "
                f"the limit is {serve.max_prompt_chars} (serve.max_prompt_chars)",
                param="prompt",
                code="prompt_too_long",
            )
    if body.max_tokens > serve.max_tokens:
        raise InvalidRequest(
            f"max_tokens is {body.max_tokens}; the limit is {serve.max_tokens} (serve.max_tokens)",
            param="max_tokens",
            code="max_tokens_too_large",
        )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
    return SamplingParams(
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=tuple(stop),
        logprobs=body.logprobs,
        seed=body.seed,
    )


def _completion_body(result: Completion, model_name: str) -> dict[str, Any]:
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "system_fingerprint": f"editd-v{result.version}",
        "choices": [
            {
                "text": choice.text,
                "index": i,
                "logprobs": choice.logprobs.as_dict() if choice.logprobs else None,
                "finish_reason": choice.finish_reason,
            }
            for i, choice in enumerate(result.choices)
        ],
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
    }


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

"""Error types the daemon's handlers raise and the HTTP layer turns into responses.

Two families, because they call for opposite reactions. A `RecoverableError` is about one
request or one batch (a prompt over the limit, an unknown version, a restore already running):
answer it with a 4xx/503 and keep serving. A `FatalError` means the served model can no longer be
trusted (weights that do not match their manifest, NaNs after an apply): the daemon must stop
serving rather than answer from a corrupted model.
"""

from __future__ import annotations


class EditdError(Exception):
    """Base of every error the daemon raises on purpose."""


class RecoverableError(EditdError):
    """The request or batch failed; the daemon and its model are fine.

    `status_code`, `error_type` and `code` follow OpenAI's error object, so OpenAI clients
    surface the message; `param` names the offending request field when there is one.
    """

    status_code = 400
    error_type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(RecoverableError):
    """The request is malformed or over a configured limit."""


class Unauthorized(RecoverableError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(RecoverableError):
    status_code = 403
    error_type = "permission_error"
    code = "admin_disabled"


class NotFound(RecoverableError):
    status_code = 404
    error_type = "not_found_error"
    code = "not_found"


class Conflict(RecoverableError):
    """The request is valid but clashes with the daemon's state (e.g. a restore in progress)."""

    status_code = 409
    error_type = "conflict_error"
    code = "conflict"


class Unavailable(RecoverableError):
    """Not ready yet (model loading, restore running); retrying later can succeed."""

    status_code = 503
    error_type = "service_unavailable"
    code = "not_ready"


class FatalError(EditdError):
    """The daemon cannot continue safely; it must stop serving."""


class ModelCorrupted(FatalError):
    """The served weights do not match what the edit store says they should be."""

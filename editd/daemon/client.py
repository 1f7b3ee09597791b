"""`editd status` and `editd eval`: talk to a running daemon over its HTTP API.

This module imports neither torch nor the daemon, so the commands start fast. `DaemonClient`
is also what other commands use to reach a running daemon (e.g. `editd rollback` when one runs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

import httpx

from editd.config import ServeSettings, Settings, admin_token
from editd.exitcodes import EXIT_FAILURE, EXIT_OK


class DaemonError(Exception):
    """The daemon could not be reached, or answered with an error; the message says which."""


class DaemonUnreachable(DaemonError):
    """Nothing listens at the URL: no daemon runs there."""


def daemon_url(serve: ServeSettings) -> str:
    """The URL a local client uses for the daemon configured by `serve`."""
    host = serve.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{serve.port}"


class DaemonClient:
    """A small synchronous client of the daemon's API."""

    def __init__(
        self,
        url: str,
        admin_token: str | None = None,
        *,
        timeout: float = 10.0,
        slow_timeout: float = 900.0,
    ):
        self.url = url.rstrip("/")
        self._admin_token = admin_token
        self._timeout = timeout
        # Evaluations and rollbacks run model passes; reading their answer may take minutes.
        self._slow_timeout = slow_timeout

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/v1/status")

    def versions(self) -> dict[str, Any]:
        return self._call("GET", "/v1/versions")

    def evaluate(self) -> dict[str, Any]:
        return self._call("POST", "/v1/eval", admin=True, slow=True)

    def consolidate(self) -> dict[str, Any]:
        return self._call("POST", "/v1/consolidate", admin=True, slow=True)

    def rollback(self, version: int, reason: str = "operator") -> dict[str, Any]:
        body = {"version": version, "reason": reason}
        return self._call("POST", "/v1/rollback", json=body, admin=True, slow=True)

    def _call(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        admin: bool = False,
        slow: bool = False,
    ) -> dict[str, Any]:
        headers = {}
        if admin and self._admin_token:
            headers["Authorization"] = f"Bearer {self._admin_token}"
        timeout = httpx.Timeout(self._timeout, read=self._slow_timeout if slow else self._timeout)
        try:
            response = httpx.request(
                method, self.url + path, json=json, headers=headers, timeout=timeout
            )
        except httpx.ConnectError as exc:
            raise DaemonUnreachable(
                f"no editd daemon is listening at {self.url} ({exc}); start one with `editd run` "
                "or pass --url"
            ) from exc
        except httpx.TimeoutException as exc:
            raise DaemonError(f"{self.url}{path} did not answer in time ({exc!r})") from exc
        except httpx.HTTPError as exc:
            raise DaemonError(f"request to {self.url}{path} failed: {exc}") from exc
        if response.is_error:
            hint = ""
            if admin and response.status_code == 401:
                hint = (
                    " (the token comes from serve.admin_token, e.g. EDITD_SERVE__ADMIN_TOKEN, "
                    "or from DATA_DIR/admin-token: pass --data-dir with the daemon's data "
                    "directory)"
                    if self._admin_token is None
                    else " (the token sent is not the daemon's: check serve.admin_token or "
                    "--data-dir)"
                )
            raise DaemonError(
                f"{method} {path}: HTTP {response.status_code}: {_message(response)}{hint}"
            )
        try:
            return response.json()
        except ValueError as exc:
            raise DaemonError(f"{method} {path}: the answer is not JSON") from exc


def status(args: argparse.Namespace, settings: Settings) -> int:
    """`editd status [--json] [--url URL]`."""
    client = DaemonClient(args.url or daemon_url(settings.serve))
    return _run(lambda: client.status(), args, title=f"editd at {client.url}")


def evaluate(args: argparse.Namespace, settings: Settings) -> int:
    """`editd eval [--json] [--url URL] [--data-dir DIR]`: evaluate now, with the admin token
    of the configuration or of the daemon's data directory."""
    client = DaemonClient(args.url or daemon_url(settings.serve), admin_token(settings))
    return _run(lambda: client.evaluate(), args, title=f"evaluation of {client.url}")


def consolidate(args: argparse.Namespace, settings: Settings) -> int:
    """`editd consolidate [--json] [--url URL] [--data-dir DIR]`: re-solve every live fact
    jointly, now."""
    client = DaemonClient(args.url or daemon_url(settings.serve), admin_token(settings))
    return _run(lambda: client.consolidate(), args, title=f"consolidation on {client.url}")


def _run(call: Any, args: argparse.Namespace, *, title: str) -> int:
    try:
        payload = call()
    except DaemonError as exc:
        print(f"editd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2, sort_keys=True))
    else:
        print(render_table(payload, title=title))
    return EXIT_OK


def render_table(payload: dict[str, Any], *, title: str | None = None) -> str:
    """Nested JSON as aligned `dotted.key  value` rows, for people."""
    rows = list(_flatten(payload))
    width = max((len(k) for k, _ in rows), default=0)
    lines = [title, "-" * len(title)] if title else []
    lines += [f"{key.ljust(width)}  {value}" for key, value in rows]
    return "\n".join(lines)


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict) and value:
        rows: list[tuple[str, str]] = []
        for key, item in value.items():
            rows += _flatten(item, f"{prefix}.{key}" if prefix else str(key))
        return rows
    return [(prefix or "value", _format(prefix, value))]


def _format(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        last = key.rsplit(".", 1)[-1]
        if last.endswith(("_at", "timestamp", "_time")) and value > 1e9:
            return dt.datetime.fromtimestamp(value, dt.UTC).isoformat(timespec="seconds")
        return f"{value:.4g}"
    if isinstance(value, list):
        if all(isinstance(v, str | int | float) for v in value):
            return ", ".join(_format(key, v) for v in value) or "-"
        return json.dumps(value)
    if isinstance(value, dict):
        return "-"
    return str(value)


def _message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error", {})
        return str(error.get("message") or response.text)
    except (ValueError, AttributeError):
        return response.text.strip() or response.reason_phrase

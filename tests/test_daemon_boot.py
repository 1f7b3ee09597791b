"""The daemon's start-up and shutdown (daemon/boot.py) on a real bound socket: what the API
answers before the model is loaded, and the order `Daemon.stop` closes things in."""

from __future__ import annotations

import httpx
import pytest
from pydantic import SecretStr

from editd.config import Settings
from editd.daemon.boot import Daemon
from editd.daemon.server import HttpServer

TOKEN = "boot-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def _daemon() -> Daemon:
    settings = Settings()
    serve = settings.serve.model_copy(update={"admin_token": SecretStr(TOKEN)})
    return Daemon(settings.model_copy(update={"serve": serve}), HttpServer.bind("127.0.0.1", 0))


def test_while_the_model_loads_the_api_is_live_and_every_model_call_is_a_503() -> None:
    daemon = _daemon()
    daemon.serve_http()
    url = daemon.server.url
    try:
        assert httpx.get(f"{url}/livez").json() == {"status": "alive"}
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 503
        assert r.json() == {"ready": False, "version": 0, "role": "editor"}
        assert r.headers["x-editd-model-version"] == "0"
        assert httpx.get(f"{url}/metrics").status_code == 200
        loading = {"code": "not_ready", "message": "the model is still loading"}
        for method, path, body in [
            ("GET", "/v1/models", None),
            ("GET", "/v1/versions", None),
            ("GET", "/v1/status", None),
            ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
            ("POST", "/tokenize", {"prompt": "a"}),
            ("POST", "/v1/rollback", {"version": 0}),
            ("POST", "/v1/consolidate", None),
            ("POST", "/v1/eval", None),
        ]:
            r = httpx.request(method, f"{url}{path}", json=body, headers=ADMIN)
            assert r.status_code == 503, (path, r.text)
            error = r.json()["error"]
            assert {k: error[k] for k in loading} == loading, path
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "a"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        # Requests that need no model are answered as after loading.
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "a", "model": "other"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert httpx.post(f"{url}/v1/rollback", json={"version": 0}).status_code == 401
    finally:
        daemon.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/livez", timeout=2)


def test_stop_closes_what_was_started_newest_first_and_the_http_server_last() -> None:
    daemon = _daemon()
    daemon.serve_http()
    closed: list[tuple[str, bool]] = []
    for name in ("broker", "store", "publishers"):
        daemon.on_stop(lambda name=name: closed.append((name, daemon.server.running)))
    daemon.stop()
    # Newest first, and /readyz answered while each closed.
    assert closed == [("publishers", True), ("store", True), ("broker", True)]
    assert not daemon.server.running and daemon.stopping

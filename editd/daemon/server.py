"""uvicorn in a background thread, on a socket bound before the model is loaded.

The daemon binds first (`HttpServer.bind`), so a taken port or a bad host fails in milliseconds
instead of after minutes of model loading, and with `serve.port = 0` the chosen port is known
early. Serving can start right away with the service not ready (`/livez` 200, `/readyz` 503) and
turn ready once the model is loaded; connections that arrive before `start` wait in the listen
backlog.

uvicorn runs its own event loop in the thread; it installs no signal handlers off the main
thread, so signals stay with the daemon's main loop, which calls `stop`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn

log = logging.getLogger(__name__)


class HttpServer:
    """One listening socket and, once `start`ed, the uvicorn server answering on it."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        host, port = sock.getsockname()[:2]
        self.host: str = host
        self.port: int = port

    @classmethod
    def bind(cls, host: str, port: int, *, backlog: int = 2048) -> HttpServer:
        """Bind and listen on host:port (port 0: a free one, see `.port`). Raises OSError."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        if not infos:
            raise OSError(f"cannot resolve {host!r}")
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            # Lets a restarted daemon rebind while the old connections sit in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        server = cls(sock)
        log.info("HTTP socket bound on %s", server.url)
        return server

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if ":" in host:
            host = f"[{'::1' if host == '::' else host}]"
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, app: Any, *, timeout: float = 30.0, graceful_seconds: float = 10.0) -> None:
        """Serve `app` (an ASGI app) from a background thread; return once it accepts requests."""
        if self._server is not None:
            raise RuntimeError("the HTTP server was already started")
        config = uvicorn.Config(
            app,
            log_config=None,  # the daemon configured logging; keep uvicorn's records in it
            access_log=False,
            timeout_graceful_shutdown=graceful_seconds,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="editd-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"the HTTP server failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the HTTP server did not start within {timeout} s")
            time.sleep(0.01)
        log.info("serving HTTP on %s", self.url)

    def _run(self) -> None:
        assert self._server is not None
        try:
            self._server.run(sockets=[self._sock])
        except BaseException as exc:  # SystemExit from a failed lifespan startup included
            self._error = exc
            log.exception("the HTTP server stopped with an error")

    def stop(self, timeout: float = 15.0) -> None:
        """Stop accepting, let in-flight requests finish (up to the graceful period), join."""
        if self._server is None or self._thread is None:
            self._sock.close()
            return
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("HTTP requests still running after %.0f s; closing them", timeout)
            self._server.force_exit = True
            self._thread.join(5.0)
        self._sock.close()

    def __enter__(self) -> HttpServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

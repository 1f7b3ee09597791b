"""Run the real `editd run` as a child process against a real broker, for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

from editd.consumers.broker import free_port
from editd.facts import FactUpdate

READY_TIMEOUT_S = 180.0


class Daemon:
    """One `editd run` process; its log lines are kept for the test to wait on."""

    def __init__(
        self,
        data_dir: Path,
        servers: list[str],
        topic: str,
        *,
        batch_size: int,
        linger: float = 1.0,
        admin_token: str = "test-token",
        env: dict[str, str] | None = None,
        role: str = "editor",
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # One update log per fact topic: tests that share a broker each start a new editor
        # (a new store), and an editor refuses a log another one wrote (exit 13).
        self.updates_topic = (env or {}).get("EDITD_KAFKA__UPDATES_TOPIC", f"{topic}.updates")
        self.admin_token = admin_token
        self.data_dir = data_dir
        # No servers: the daemon starts its embedded broker (port from the env).
        connect = ["--bootstrap-servers", ",".join(servers)] if servers else []
        self.args = [
            sys.executable,
            "-m",
            "editd",
            "run",
            *connect,
            "--topic",
            topic,
            "--data-dir",
            str(data_dir),
            "--batch-size",
            str(batch_size),
            "--linger",
            str(linger),
            "--http-port",
            str(self.port),
            "--role",
            role,
        ]
        self.env = {
            **os.environ,
            "EDITD_SERVE__ADMIN_TOKEN": admin_token,
            "EDITD_KAFKA__GROUP_ID": f"editd-{topic}",
            "EDITD_KAFKA__SESSION_TIMEOUT_MS": "6000",
            # Each test says what it evaluates; by default nothing rolls back behind its back.
            "EDITD_EVAL__INTERVAL_SECONDS": "3600",
            "EDITD_EVAL__AFTER_EACH_VERSION": "false",
            # Two unless the run says otherwise (each pytest-xdist worker's share).
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
            # The fast tests serve the packaged world model; the real-model tests say so.
            "EDITD_MODEL__PATH": "builtin",
            "EDITD_KAFKA__UPDATES_TOPIC": self.updates_topic,
            **(env or {}),
        }
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Daemon:
        self.lines = []
        self.proc = subprocess.Popen(
            self.args,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def log(self, last: int = 60) -> str:
        return "\n".join(self.lines[-last:])

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"editd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"editd not ready in {timeout}s:\n{self.log()}")

    def wait_status(
        self, what: str, predicate: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        """Poll `/v1/status` until `predicate` holds; returns that status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"editd exited waiting for {what}:\n{self.log()}")
            try:
                status = httpx.get(f"{self.url}/v1/status", timeout=5).json()
            except (httpx.HTTPError, ValueError):
                status = None
            if status is not None and predicate(status):
                return status
            time.sleep(0.05)
        raise AssertionError(f"no {what} in {timeout}s:\n{self.log()}")

    def wait_version(self, version: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.get("/v1/status").json()["version"] >= version:
                return
            time.sleep(0.3)
        raise AssertionError(f"version {version} not reached in {timeout}s:\n{self.log()}")

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=60)

    def post(self, path: str, body: dict[str, Any], admin: bool = False) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.admin_token}"} if admin else {}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=300)

    def complete(self, prompt: str, max_tokens: int = 4) -> tuple[str, int]:
        r = self.post(
            "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        )
        r.raise_for_status()
        return r.json()["choices"][0]["text"], int(r.headers["x-editd-model-version"])

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self, timeout: float = 120) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def manifests(data_dir: Path) -> list[dict[str, Any]]:
    """Manifests of the edit versions (1, 2, ...); version 0 is the base model."""
    found = [json.loads(p.read_text()) for p in sorted(data_dir.glob("versions/*/manifest.json"))]
    return [m for m in found if m["version"] > 0]


def fact_ids_of(manifest: dict[str, Any]) -> list[str]:
    """The ids of a manifest's facts (the manifest keeps the facts, not a second id list)."""
    return [f["id"] for f in manifest["facts"]]


def fact_lines(facts: Iterable[FactUpdate]) -> list[bytes]:
    return [f.model_dump_json().encode() for f in facts]

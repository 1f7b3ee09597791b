"""The embedded default loses nothing: `editd run` with no Kafka configured, its broker on
disk, 300 facts published, and three rounds of kill -9: of the daemon just after a version,
of the broker mid-edit, and of both at a random moment. Every fact ends applied exactly once
(fact ids in the live manifests)."""

from __future__ import annotations

import collections
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from editd.consumers.broker import BrokerError, free_port, weed_binary
from editd.consumers.publish import publish_facts
from editd.world.requests import make_requests
from tests.daemon_harness import Daemon, fact_ids_of, manifests

pytestmark = [pytest.mark.broker, pytest.mark.slow]

FACTS = 300


def _tansu(daemon: Daemon, not_pid: int | None = None) -> psutil.Process:
    """The daemon's running Tansu child (another than `not_pid`), once there is one."""
    assert daemon.proc is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for child in psutil.Process(daemon.proc.pid).children(recursive=True):
            try:
                running = child.status() != psutil.STATUS_ZOMBIE
                if child.name() == "tansu" and running and child.pid != not_pid:
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.05)
    raise AssertionError(f"no running broker under the daemon:\n{daemon.log()}")


def _applied(store: Path) -> collections.Counter[str]:
    return collections.Counter(
        i for m in manifests(store) if m["state"] == "committed" for i in fact_ids_of(m)
    )


def test_kill_9_of_daemon_broker_and_both_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    try:
        weed_binary()
    except BrokerError as exc:
        pytest.skip(str(exc))
    port = free_port()
    servers = [f"127.0.0.1:{port}"]
    store = tmp_path / "data"
    env = {"EDITD_KAFKA__EMBEDDED_PORT": str(port)}
    # Batches of 34: nine versions, so three rounds of three kills land mid-stream.
    daemon = Daemon(store, [], "facts", batch_size=34, linger=0.5, env=env)
    facts = make_requests(FACTS, seed=21)
    want = {f.fact_id for f in facts}
    rng = random.Random(3)

    def version() -> int:
        return int(daemon.get("/v1/status").json()["version"])

    def restart() -> None:
        daemon.start()
        daemon.wait_ready()

    def until(predicate: Any) -> bool:
        """Wait for `predicate(status)`; False once everything is applied instead."""
        status = daemon.wait_status(
            "a kill point",
            lambda s: predicate(s) or set(_applied(store)) == want,
            timeout=300,
        )
        return bool(predicate(status))

    daemon.start()
    daemon.wait_ready()
    publish_facts(facts, servers, "facts")
    kills = 0
    for _ in range(3):
        # The daemon dies just after a version became durable (its broker dies with it).
        before = version()
        if not until(lambda s, v=before: s["version"] > v):
            break
        time.sleep(rng.uniform(0, 0.3))
        daemon.kill()
        kills += 1
        restart()
        # The broker dies mid-edit; the daemon's supervisor restarts it on the same disk.
        if not until(lambda s: s["editing"] is not None):
            break
        time.sleep(rng.uniform(0, 0.5))
        first = _tansu(daemon)
        first.kill()
        # Both die: the restarted broker first, then the daemon, at a random moment.
        broker = _tansu(daemon, not_pid=first.pid)
        time.sleep(rng.uniform(0, 1.0))
        os.kill(broker.pid, signal.SIGKILL)
        daemon.kill()
        kills += 2  # the broker alone, then both
        restart()
    deadline = time.monotonic() + 600
    while set(_applied(store)) != want and time.monotonic() < deadline:
        time.sleep(0.5)
    counts = _applied(store)
    assert kills >= 6, kills  # at least two full rounds landed before the stream ended
    assert set(counts) == want, daemon.log()
    assert max(counts.values()) == 1
    assert daemon.terminate() == 0

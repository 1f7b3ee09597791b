"""One editor and its replicas, as separate `editd run` processes on the editor's embedded
broker (Tansu on disk): every replica serves the editor's versions bit for bit, catches up
after kill -9 and from an empty disk, follows a rollback and never serves an undone version
again, and refuses a corrupted update record while it keeps serving its last good version."""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from kafka import KafkaProducer

from editd.consumers.broker import BrokerError, free_port, weed_binary
from editd.consumers.publish import publish_facts
from editd.consumers.updates import CURRENT, VERSION, messages
from editd.store.store import EditStore
from editd.store.wire import (
    Current,
    UpdateLogSource,
    decode_version,
    encode_current,
    encode_version,
)
from editd.world.requests import make_requests
from tests.daemon_harness import Daemon, fact_ids_of, manifests

pytestmark = [pytest.mark.broker, pytest.mark.slow]

FACTS = 200
BATCH = 20  # ten versions
CHUNK = 64 * 1024  # small, so every version travels as several chunks
PROPAGATION_BOUND_S = 30.0


def _served(daemon: Daemon) -> tuple[int, dict[str, str]]:
    status = daemon.get("/v1/status").json()
    return int(status["version"]), status["served_sha256"]


def _manifest_sha(data_dir: Path, version: int) -> dict[str, str]:
    [m] = [m for m in manifests(data_dir) if m["version"] == version]
    return m["sha256"]


def _wait_serving(replica: Daemon, version: int, sha: dict[str, str], timeout: float) -> float:
    """Seconds until `replica` is ready and serves `version` with exactly `sha`."""
    start = time.monotonic()
    replica.wait_status(
        f"version {version}",
        lambda s: s["ready"] and s["version"] == version and s["served_sha256"] == sha,
        timeout=timeout,
    )
    return time.monotonic() - start


class VersionWatch:
    """Polls each daemon's /readyz; records when each version was first served."""

    def __init__(self, daemons: dict[str, Daemon]) -> None:
        self.daemons = daemons
        self.first_seen: dict[str, dict[int, float]] = {name: {} for name in daemons}
        self.sequence: dict[str, list[int]] = {name: [] for name in daemons}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> VersionWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, d in self.daemons.items():
                try:
                    v = int(httpx.get(f"{d.url}/readyz", timeout=1).json()["version"])
                except (httpx.HTTPError, ValueError, KeyError):
                    continue
                self.first_seen[name].setdefault(v, time.monotonic())
                if not self.sequence[name] or self.sequence[name][-1] != v:
                    self.sequence[name].append(v)
            time.sleep(0.05)


def _complete(daemon: Daemon, prompt: str) -> tuple[str, int]:
    return daemon.complete(prompt, max_tokens=3)


def test_replicas_follow_the_editor_through_kill_rollback_and_corruption(tmp_path: Path) -> None:
    try:
        weed_binary()
    except BrokerError as exc:
        pytest.skip(str(exc))
    port = free_port()
    servers = [f"127.0.0.1:{port}"]
    env = {
        "EDITD_KAFKA__EMBEDDED_PORT": str(port),
        "EDITD_KAFKA__UPDATE_CHUNK_BYTES": str(CHUNK),
    }
    editor_dir = tmp_path / "editor"
    editor = Daemon(editor_dir, [], "facts", batch_size=BATCH, linger=0.5, env=env)
    replicas = {
        name: Daemon(tmp_path / name, servers, "facts", batch_size=BATCH, env=env, role="replica")
        for name in ("a", "b")
    }
    facts = make_requests(FACTS, seed=33)
    figures: dict[str, Any] = {}
    try:
        editor.start().wait_ready()
        for r in replicas.values():
            r.start()
        for r in replicas.values():
            r.wait_ready()
            assert r.get("/readyz").json()["role"] == "replica"

        with VersionWatch({"editor": editor, **replicas}) as watch:
            publish_facts(facts[:100], servers, "facts")
            editor.wait_version(2, timeout=300)
            replicas["a"].kill()  # mid-stream
            publish_facts(facts[100:], servers, "facts")
            editor.wait_version(6, timeout=300)
            replicas["a"].start()
            # Ten versions or more: linger can flush a partial batch when facts arrive slowly.
            editor.wait_status(
                "every fact applied",
                lambda s: s["editing"] is None and len(_applied(editor_dir)) == FACTS,
                timeout=600,
            )
            last = editor.get("/v1/status").json()["version"]
            assert last >= FACTS // BATCH
            sha = _manifest_sha(editor_dir, last)
            assert _served(editor) == (last, sha)
            for r in replicas.values():
                _wait_serving(r, last, sha, timeout=PROPAGATION_BOUND_S)
        # Propagation editor → replica b (never killed), per version.
        delays = [
            watch.first_seen["b"][v] - watch.first_seen["editor"][v]
            for v in range(1, last + 1)
            if v in watch.first_seen["b"] and v in watch.first_seen["editor"]
        ]
        assert delays, watch.first_seen
        figures["propagation_s"] = {
            "median": round(statistics.median(delays), 3),
            "max": round(max(delays), 3),
            "versions": len(delays),
        }
        assert max(delays) < PROPAGATION_BOUND_S
        assert _applied(editor_dir) == {f.fact_id for f in facts}

        # The replicas answer as the editor does, the new objects included.
        changed = 0
        for fact in facts[-BATCH:]:
            text, version = _complete(editor, fact.rendered_prompt)
            for r in replicas.values():
                assert _complete(r, fact.rendered_prompt) == (text, version)
            changed += text.strip().startswith(fact.target_new.strip())
        assert changed >= BATCH // 2, changed

        # A replica started after ten versions, from an empty disk, catches up from the log.
        fresh = Daemon(tmp_path / "c", servers, "facts", batch_size=BATCH, env=env, role="replica")
        replicas["c"] = fresh
        started = time.monotonic()
        fresh.start().wait_ready()
        _wait_serving(fresh, last, sha, timeout=PROPAGATION_BOUND_S)
        figures["fresh_catch_up_s"] = round(time.monotonic() - started, 2)
        figures["bytes_per_version"] = _bytes_per_version(editor)

        # A rollback on the editor is served by every replica; none serves an undone one again.
        with VersionWatch(replicas) as watch:
            r = editor.post("/v1/rollback", {"version": 7, "reason": "test"}, admin=True)
            assert r.status_code == 200, r.text
            sha7 = _manifest_sha(editor_dir, 7)
            for rep in replicas.values():
                _wait_serving(rep, 7, sha7, timeout=PROPAGATION_BOUND_S)
            time.sleep(1.0)  # keep watching past the switch
        for name, seen in watch.sequence.items():
            after = seen[seen.index(7) :]
            assert set(after) == {7}, (name, seen)

        # Corrupted records: a bad checksum, a good checksum over tampered factors, a current
        # record naming a version that never arrived. Each is refused; 7 stays served.
        forged = last + 2  # the editor's next version is last + 1
        _publish_corrupt(servers, editor_dir, forged, editor.updates_topic)
        for rep in replicas.values():
            status = rep.wait_status(
                "three refusals",
                lambda s: (
                    s["follow"]["refused"] is not None
                    and "never arrived" in s["follow"]["refused"]["why"]
                ),
                timeout=PROPAGATION_BOUND_S,
            )
            assert status["version"] == 7 and status["served_sha256"] == sha7
            ready = rep.get("/readyz")
            assert ready.status_code == 200
            body = ready.json()
            assert body["accepting_versions"] is False and "never arrived" in body["why"]
            metrics = rep.get("/metrics").text
            assert "editd_update_log_refused_total 3.0" in metrics, metrics
            refusals = "\n".join(rep.lines)
            assert "checksum mismatch" in refusals
            assert "does not rebuild to the sha256" in refusals

        # The editor's next real version (11, after 7) is served again everywhere.
        publish_facts(make_requests(BATCH, seed=34), servers, "facts")
        editor.wait_version(last + 1, timeout=300)
        sha11 = _manifest_sha(editor_dir, last + 1)
        for rep in replicas.values():
            _wait_serving(rep, last + 1, sha11, timeout=PROPAGATION_BOUND_S)
            assert rep.get("/readyz").json()["accepting_versions"] is True
        print("replica figures:", json.dumps(figures))
    finally:
        for d in (*replicas.values(), editor):
            d.kill()


def _bytes_per_version(editor: Daemon) -> int:
    status = editor.get("/v1/status").json()["update_log"]
    return int(status["bytes_published"] / max(1, status["published_version"]))


def _applied(data_dir: Path) -> set[str]:
    return {i for m in manifests(data_dir) if m["state"] == "committed" for i in fact_ids_of(m)}


def _publish_corrupt(servers: list[str], editor_dir: Path, version: int, topic: str) -> None:
    store = EditStore(editor_dir, readonly=True)
    store.open()
    payload = UpdateLogSource(store).version_payload(8)  # undone by the rollback
    editor = store.store_id  # forged as the editor's own: refused for what is inside
    store.close()
    record, factors, base_sha = decode_version(payload)
    forged = record.replace(version=version, parent=7)
    name = sorted(factors)[0]
    tampered = {**factors, name: factors[name] * 1.5}
    producer = KafkaProducer(bootstrap_servers=servers, acks="all")
    try:
        bad_checksum = messages(
            VERSION, version, encode_version(forged, factors, base_sha), 4096, editor
        )
        key, value, headers = bad_checksum[1]
        bad_checksum[1] = (key, bytes([value[0] ^ 1]) + value[1:], headers)
        bad_sha = messages(
            VERSION, version, encode_version(forged, tampered, base_sha), 4096, editor
        )
        lineage = (*range(8), version)
        current = Current(version=version, lineage=lineage, sha256={}, at="now")
        never = messages(CURRENT, version, encode_current(current), 4096, editor)
        for key, value, headers in (*bad_checksum, *bad_sha, *never):
            producer.send(topic, key=key, value=value, headers=headers, partition=0)
        producer.flush(30)
    finally:
        producer.close()

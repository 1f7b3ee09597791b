"""An editor's disk is lost while two replicas follow it (separate `editd run` processes on a
real broker): the editor started on a recreated data dir refuses the old editor's update log
with one clear line and its exit code; started with `--take-over-updates-log` it takes the log
over, and both replicas drop the old lineage, serve the new editor's versions bit for bit, never
an old one again, and ignore the old editor's records from then on."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from kafka import KafkaProducer

from editd.consumers.publish import publish_facts
from editd.consumers.updates import CURRENT, messages
from editd.store import identity
from editd.store.store import EditStore
from editd.store.wire import UpdateLogSource
from editd.world.requests import make_requests
from tests.daemon_harness import Daemon, manifests

pytestmark = [pytest.mark.broker, pytest.mark.slow]

BATCH = 10
EXIT_UPDATE_LOG_TAKEN = 13
BOUND_S = 60.0


def _key(sha: dict[str, str]) -> str:
    return json.dumps(sha, sort_keys=True)


def _shas(data_dir: Path) -> dict[int, dict[str, str]]:
    return {m["version"]: m["sha256"] for m in manifests(data_dir)}


class Served:
    """Polls each replica's /v1/status; keeps every (version, served sha256) seen, in order."""

    def __init__(self, replicas: dict[str, Daemon]) -> None:
        self.replicas = replicas
        self.seen: dict[str, list[tuple[int, str]]] = {n: [] for n in replicas}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Served:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, r in self.replicas.items():
                try:
                    s = httpx.get(f"{r.url}/v1/status", timeout=5).json()
                except (httpx.HTTPError, ValueError):
                    continue
                state = (int(s["version"]), _key(s["served_sha256"]))
                if not self.seen[name] or self.seen[name][-1] != state:
                    self.seen[name].append(state)
            time.sleep(0.05)


def _wait_serving(replica: Daemon, version: int, sha: dict[str, str]) -> dict[str, Any]:
    return replica.wait_status(
        f"version {version}",
        lambda s: s["ready"] and s["version"] == version and s["served_sha256"] == sha,
        timeout=BOUND_S,
    )


def test_replicas_follow_a_recreated_editor_only_once_it_takes_the_log_over(tmp_path, broker):
    servers = broker.bootstrap_servers
    topic = "facts-takeover"
    env = {"EDITD_KAFKA__UPDATE_CHUNK_BYTES": str(64 * 1024)}
    editor_dir = tmp_path / "editor"

    def editor(*flags: str) -> Daemon:
        # Batches fill before the linger ends even on busy cores: a partial batch would
        # make a third version, and the version counts below would not hold.
        d = Daemon(editor_dir, servers, topic, batch_size=BATCH, linger=5.0, env=env)
        d.args += list(flags)
        return d

    replicas = {
        n: Daemon(tmp_path / n, servers, topic, batch_size=BATCH, env=env, role="replica")
        for n in ("a", "b")
    }
    facts = make_requests(40, seed=51)
    old = editor()
    daemons = [old, *replicas.values()]
    try:
        old.start().wait_ready()
        for r in replicas.values():
            r.start()
        for r in replicas.values():
            r.wait_ready()
        publish_facts(facts[:20], servers, topic)
        old.wait_status("two versions", lambda s: s["version"] == 2, timeout=300)
        old_shas = _shas(editor_dir)
        for r in replicas.values():
            _wait_serving(r, 2, old_shas[2])
        old_id = identity.read(editor_dir)
        saved = tmp_path / "lost-editor"  # kept only to replay its records later
        old.kill()
        shutil.copytree(editor_dir, saved)

        # The disk is lost; an editor on the recreated data dir refuses the old log.
        shutil.rmtree(editor_dir)
        refused = editor()
        daemons.append(refused)
        refused.start()
        assert refused.proc is not None
        assert refused.proc.wait(180) == EXIT_UPDATE_LOG_TAKEN, refused.log()
        said = [line for line in refused.lines if "--take-over-updates-log" in line]
        assert len(said) == 1 and "another editor" in said[0], refused.log()
        new_id = identity.read(editor_dir)
        assert new_id and new_id != old_id
        for r in replicas.values():
            status = r.get("/v1/status").json()
            assert (status["version"], status["served_sha256"]) == (2, old_shas[2])

        # Told to take the log over, it does; the replicas switch to its lineage.
        new = editor("--take-over-updates-log")
        daemons.append(new)
        with Served(replicas) as served:
            new.start().wait_ready()
            publish_facts(facts[20:], servers, topic)
            new.wait_status("two versions", lambda s: s["version"] == 2, timeout=300)
            new_shas = _shas(editor_dir)
            assert _key(new_shas[2]) != _key(old_shas[2])
            for r in replicas.values():
                status = _wait_serving(r, 2, new_shas[2])
                took = status["follow"]["took_over"]
                assert (took["from"], took["to"], took["dropped"]) == (old_id, new_id, [1, 2])
                ready = r.get("/readyz").json()
                assert ready["editor"] == new_id and ready["took_over"]["from"] == old_id
                assert "editd_update_log_takeovers_total 1.0" in r.get("/metrics").text

            # The old editor's records, read again (as if it came back): ignored, not served.
            lost = EditStore(saved, readonly=True)
            lost.open()
            source = UpdateLogSource(lost)
            producer = KafkaProducer(bootstrap_servers=servers, acks="all")
            for key, value, headers in messages(
                CURRENT, 2, source.current_payload(2, 1), 64 * 1024, old_id
            ):
                producer.send(new.updates_topic, key=key, value=value, headers=headers, partition=0)
            producer.flush(30)
            producer.close()
            time.sleep(2.0)  # a replica reads a record within a poll (0.5 s); watch past it
            for r in replicas.values():
                status = r.get("/v1/status").json()
                assert (status["version"], status["served_sha256"]) == (2, new_shas[2])
                assert status["follow"]["accepting_versions"] is True
        new_lineage = {_key(sha) for sha in new_shas.values()}
        old_lineage = {_key(sha) for sha in old_shas.values()} - new_lineage
        for name, seen in served.seen.items():
            # From the first state of the new lineage (its base included) on, none of the old.
            switched = next(i for i, (v, sha) in enumerate(seen) if v == 0 or sha in new_lineage)
            after = seen[switched:]
            assert not [s for s in after if s[1] in old_lineage], (name, seen)
            assert after[-1] == (2, _key(new_shas[2])), (name, seen)
    finally:
        for d in daemons:
            d.kill()

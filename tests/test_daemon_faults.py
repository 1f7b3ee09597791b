"""`editd run` against what real producers and real outages do: the daemon never stops for a
record, and a Kafka it cannot reach ends it at once, in one line, with its documented code.

Separate processes throughout: the daemon (`python -m editd run`, built-in model), librdkafka
producers (confluent-kafka) compressing with every codec Kafka defines, a raw batch that fetches
but cannot be decoded, and a kill -9 of the daemon in the middle of the stream.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from editd.consumers.broker import EmbeddedBroker, free_port
from editd.exitcodes import EXIT_KAFKA, EXIT_OK
from editd.world.requests import make_requests
from tests.daemon_harness import Daemon, fact_ids_of, manifests
from tests.kafka_support import read_topic
from tests.raw_batches import produce_batch, record_batch

confluent_kafka = pytest.importorskip("confluent_kafka")

CONNECT_TIMEOUT_S = 3.0
# Importing torch and the daemon's modules before the Kafka check: seconds on an idle machine,
# much longer on two cores shared with other test processes.
STARTUP_SLACK_S = 90.0


@pytest.mark.slow
def test_unreachable_kafka_ends_run_with_one_line_and_exit_8(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    env = {
        "EDITD_KAFKA__CONNECT_TIMEOUT_MS": str(int(CONNECT_TIMEOUT_S * 1000)),
        "EDITD_MODEL__PATH": "builtin",
        "EDITD_SERVE__ADMIN_TOKEN": "t",
    }
    args = ["run", "--bootstrap-servers", dead, "--data-dir", str(tmp_path), "--http-port", "0"]
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "editd", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=CONNECT_TIMEOUT_S + STARTUP_SLACK_S,
    )
    elapsed = time.monotonic() - started
    lines = proc.stderr.splitlines()
    assert proc.returncode == EXIT_KAFKA, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in lines if " ERROR " in line]
    assert len(errors) == 1, proc.stderr
    assert "kafka.bootstrap_servers" in errors[0] and dead in errors[0]
    # From the first line the daemon logs (imports done) to the error: within the timeout.
    first, error = _stamp(lines[0]), _stamp(errors[0])
    assert error - first < CONNECT_TIMEOUT_S + 1, proc.stderr
    assert elapsed < CONNECT_TIMEOUT_S + STARTUP_SLACK_S


def _stamp(line: str) -> float:
    """Seconds of a log line's `%(asctime)s` (same day)."""
    clock = line.split(" ")[1]
    hours, minutes, rest = clock.split(":")
    seconds, millis = rest.split(",")
    return int(hours) * 3600 + int(minutes) * 60 + int(seconds) + int(millis) / 1000


def _applied(store: Path) -> collections.Counter[str]:
    return collections.Counter(
        i for m in manifests(store) if m["state"] == "committed" for i in fact_ids_of(m)
    )


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(1200)  # C0 of the built-in model first, when no earlier test cached it
def test_compressed_stream_with_bad_records_survives_kill_9_exactly_once(tmp_path: Path) -> None:
    topic = "facts"
    with EmbeddedBroker(topics=[topic, f"{topic}.dlq", f"{topic}.rejected"]) as broker:
        servers = broker.bootstrap_servers
        facts = make_requests(32, seed=31)
        want = {f.fact_id for f in facts}
        producers = {
            codec: confluent_kafka.Producer(
                {"bootstrap.servers": servers[0], "compression.type": codec, "linger.ms": 20}
            )
            for codec in ("gzip", "snappy", "lz4", "zstd")
        }

        def send(chunk: list, codec: str) -> None:
            producer = producers[codec]
            for fact in chunk:
                producer.produce(topic, value=fact.model_dump_json().encode())
            assert producer.flush(30) == 0

        # Half the stream, a batch nothing can decode, a record that is no fact, then the rest
        # while the daemon is killed mid-stream.
        for i, codec in enumerate(producers):
            send(facts[4 * i : 4 * i + 4], codec)
        garbled = [f.model_dump_json().encode() for f in make_requests(2, seed=77)]
        bad_at = produce_batch(servers, topic, record_batch(garbled, garble_payload=True))
        producers["lz4"].produce(topic, value=b'{"subject": "no prompt"}')
        producers["lz4"].flush(30)

        store = tmp_path / "data"
        daemon = Daemon(store, servers, topic, batch_size=4, linger=0.5)
        with daemon:
            daemon.wait_ready()
            daemon.wait_status("two versions", lambda s: s["version"] >= 2, timeout=600)
            for i, codec in enumerate(producers):
                send(facts[16 + 4 * i : 20 + 4 * i], codec)
            daemon.kill()
            daemon.start()
            daemon.wait_ready()
            deadline = time.monotonic() + 600
            while set(_applied(store)) != want and time.monotonic() < deadline:
                assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()
                time.sleep(0.5)
            counts = _applied(store)
            assert set(counts) == want, daemon.log()
            assert max(counts.values()) == 1  # none doubled by the kill
            letters = read_topic(servers, f"{topic}.dlq", expect=2, settle_ms=500)
            # At least once: a letter acknowledged just before the kill may come twice.
            found = {int(dict(r.headers)["original_offset"]): dict(r.headers) for r in letters}
            assert len(found) == 2, letters
            skipped = [o for o, h in found.items() if h["error"].startswith(b"undecodable")]
            assert len(skipped) == 1 and skipped[0] <= bad_at, found
            assert daemon.terminate() == EXIT_OK
        producers.clear()  # librdkafka handles go before the broker does

"""`editd publish` and `editd broker` as a user runs them, against the real embedded broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaAdminClient

from editd.cli import main as cli
from editd.config import FactLimits
from editd.consumers.broker import EmbeddedBroker, accepts_connections, ensure_topics, free_port
from editd.facts import parse_fact
from tests.kafka_support import read_topic

pytestmark = [pytest.mark.broker]

NATIVE = {"subject": "Ada Lovelace", "prompt": "{} was born in", "target_new": "Paris"}
COUNTERFACT = {
    "case_id": 7,
    "requested_rewrite": {
        "prompt": "{} plays the",
        "subject": "Miles Davis",
        "target_new": {"str": "violin"},
        "target_true": {"str": "trumpet"},
    },
    "paraphrase_prompts": ["Miles Davis is known for playing the"],
    "neighborhood_prompts": ["Dizzy Gillespie plays the"],
}


@pytest.fixture
def topic(broker: EmbeddedBroker) -> str:
    name = f"cli-{uuid.uuid4().hex[:10]}"
    ensure_topics(broker.bootstrap_servers, [name], replication_factor=1)
    return name


def test_publish_json_lines_reports_rejections(
    broker: EmbeddedBroker, topic: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [
        json.dumps(NATIVE),
        json.dumps({**NATIVE, "subject": "Alan Turing", "target_new": "Rome"}),
        "{broken",
        json.dumps({**NATIVE, "prompt": "no placeholder"}),
        json.dumps(COUNTERFACT),
    ]
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code = cli(
        ["publish", str(path), "--bootstrap-servers", broker.bootstrap_servers[0], "--topic", topic]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert f"published 3 facts to {topic}" in err and "rejected 2 locally" in err
    assert "line 3: bad JSON" in err
    assert "line 4: schema error: prompt must contain exactly one '{}'" in err

    records = read_topic(broker.bootstrap_servers, topic, 3)
    assert [r.key.decode() for r in records] == ["Ada Lovelace", "Alan Turing", "Miles Davis"]
    facts = [parse_fact(r.value, FactLimits()) for r in records]
    assert facts[2].fact_id == "cf-7" and facts[2].target_true == "trumpet"


def test_publish_counterfact_array_to_the_embedded_address(
    broker: EmbeddedBroker,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No bootstrap servers configured: publish goes to the embedded broker's port.
    ensure_topics(broker.bootstrap_servers, ["facts"], replication_factor=1)
    monkeypatch.setenv("EDITD_KAFKA__EMBEDDED_PORT", str(broker.port))
    monkeypatch.delenv("EDITD_KAFKA__BOOTSTRAP_SERVERS", raising=False)
    cases = [
        {**COUNTERFACT, "case_id": i, "requested_rewrite": {**COUNTERFACT["requested_rewrite"]}}
        for i in range(3)
    ]
    for i, case in enumerate(cases):
        case["requested_rewrite"]["subject"] = f"Player {i}"
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps(cases), encoding="utf-8")
    assert cli(["publish", str(path)]) == 0
    assert f"published 3 facts to facts at 127.0.0.1:{broker.port}" in capsys.readouterr().err
    keys = [r.key.decode() for r in read_topic(broker.bootstrap_servers, "facts", 3)]
    assert keys == ["Player 0", "Player 1", "Player 2"]


def test_publish_is_quiet_by_default_and_warns_on_an_empty_input(
    broker: EmbeddedBroker, topic: str, tmp_path: Path
) -> None:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(NATIVE) + "\n", encoding="utf-8")
    servers = ["--bootstrap-servers", broker.bootstrap_servers[0], "--topic", topic]
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "editd", "publish", *args, *servers],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    quiet = run(str(path))
    assert quiet.returncode == 0, quiet.stderr
    # The result, and no kafka-python connection log: that stays behind --log-level.
    assert quiet.stderr.strip().splitlines()[-1] == (
        f"published 1 facts to {topic} at {broker.bootstrap_servers[0]}; rejected 0 locally"
    )
    assert " kafka." not in quiet.stderr
    chatty = run(str(path), "--log-level", "INFO")
    assert chatty.returncode == 0 and " INFO kafka." in chatty.stderr

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    nothing = run(str(empty))
    assert nothing.returncode == 1
    assert "holds no records; nothing was published" in nothing.stderr


def test_publish_to_no_broker_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(NATIVE), encoding="utf-8")
    dead = f"127.0.0.1:{free_port()}"
    assert cli(["publish", str(path), "--bootstrap-servers", dead]) == 8  # EXIT_KAFKA
    assert f"publishing to {dead} failed" in capsys.readouterr().err


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# Started as a shell without job control starts a background command (SIGINT ignored, which
# Python inherits): `kill -INT` still stops it, and so does SIGTERM.
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_broker_command_runs_until_interrupted(signum: int, tmp_path) -> None:
    port = free_port()
    # Its default disk storage, under a data dir of the test's own.
    env = {**os.environ, "EDITD_STORE__DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "editd", "broker", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ignore_sigint,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")))
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any(f"listening on 127.0.0.1:{port}" in line for line in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "the broker did not start"
            time.sleep(0.2)
        admin = KafkaAdminClient(bootstrap_servers=[f"127.0.0.1:{port}"])
        assert {"facts", "facts.dlq", "facts.rejected"} <= set(admin.list_topics())
        admin.close()
        proc.send_signal(signum)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
    assert proc.returncode == 0, "".join(lines)
    assert (tmp_path / "data" / "broker" / "ports.json").is_file()
    deadline = time.monotonic() + 10
    while accepts_connections("127.0.0.1", port):
        assert time.monotonic() < deadline, "the Tansu child outlived `editd broker`"
        time.sleep(0.2)

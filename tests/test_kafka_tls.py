"""editd against a TLS endpoint: a real stunnel (Debian's) terminating TLS in front of the real
embedded broker, which advertises the TLS address. The daemon consumes, dead-letters and
publishes rejections through it; a wrong CA fails at start in seconds, naming the setting.

SASL is not tested: no SASL-capable Kafka server installs here (Tansu 0.6's `--authentication`
did not accept kafka-python connections), so the SASL options are only checked for shape."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from editd.config import KafkaSettings
from editd.consumers.broker import EmbeddedBroker, ensure_topics, free_port
from editd.consumers.publish import new_producer, publish_facts, publish_raw
from editd.consumers.security import KafkaSecurityError, check_connection, client_options
from editd.world.requests import make_requests
from tests.daemon_harness import Daemon
from tests.kafka_support import read_topic

pytestmark = pytest.mark.broker

STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(directory: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem",
             cwd=directory)  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("certs")
    _ca(d, "ca")
    _ca(d, "other-ca")
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", "server.key", "-out", "server.csr", cwd=d)  # fmt: skip
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "server.pem",
             cwd=d)  # fmt: skip
    return d


@pytest.fixture(scope="module")
def tls_endpoint(certs: Path) -> Iterator[str]:
    """127.0.0.1:<port> speaking TLS, in front of a plaintext Tansu that advertises it."""
    if STUNNEL is None:
        pytest.skip("stunnel is not installed (scripts/setup.sh test installs it)")
    tls_port = free_port()
    tls = f"127.0.0.1:{tls_port}"
    with EmbeddedBroker(advertised=f"tcp://{tls}") as broker:
        conf = certs / "stunnel.conf"
        conf.write_text(
            "foreground = yes\n"
            f"pid =\n[kafka]\naccept = {tls}\nconnect = {broker.bootstrap_servers[0]}\n"
            f"cert = {certs / 'server.pem'}\nkey = {certs / 'server.key'}\n"
        )
        proc = subprocess.Popen(
            [STUNNEL, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 10
            import socket

            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", tls_port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.05)
            yield tls
        finally:
            proc.terminate()
            proc.wait(10)


def _settings(certs: Path, ca: str = "ca.pem", **more: object) -> KafkaSettings:
    return KafkaSettings(security_protocol="SSL", ssl_cafile=certs / ca, **more)


def test_a_wrong_ca_or_a_plaintext_listener_fails_fast_naming_the_setting(
    certs: Path, tls_endpoint: str
) -> None:
    check_connection([tls_endpoint], _settings(certs))  # the right CA passes
    started = time.monotonic()
    with pytest.raises(KafkaSecurityError, match=r"kafka\.ssl_cafile"):
        check_connection([tls_endpoint], _settings(certs, "other-ca.pem"))
    with pytest.raises(KafkaSecurityError, match=r"kafka\.ssl_cafile: .* does not exist"):
        client_options(_settings(certs, "missing.pem"))
    assert time.monotonic() - started < 5
    with EmbeddedBroker() as plain, pytest.raises(KafkaSecurityError, match="TLS listener"):
        check_connection(plain.bootstrap_servers, _settings(certs))
    sasl = KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="PLAIN")
    with pytest.raises(KafkaSecurityError, match=r"sasl_username, kafka\.sasl_password"):
        client_options(sasl)


def test_the_daemon_edits_dead_letters_and_rejects_through_tls(
    certs: Path, tls_endpoint: str, tmp_path: Path
) -> None:
    kafka = _settings(certs)
    options = client_options(kafka)
    servers = [tls_endpoint]
    topic = f"tls-{uuid.uuid4().hex[:8]}"
    ensure_topics(servers, [topic, f"{topic}.dlq", f"{topic}.rejected"], options=options)
    env = {
        "EDITD_KAFKA__SECURITY_PROTOCOL": "SSL",
        "EDITD_KAFKA__SSL_CAFILE": str(certs / "ca.pem"),
    }
    with Daemon(tmp_path / "data", servers, topic, batch_size=4, linger=0.5, env=env) as d:
        d.wait_ready()
        facts = make_requests(4, seed=11)
        producer = new_producer(servers, **options)
        try:
            publish_facts(facts, servers, topic, producer=producer)
            publish_raw([(None, b"{not json")], servers, topic, producer=producer)
        finally:
            producer.close()
        d.wait_version(1, timeout=240)
        [letter] = read_topic(servers, f"{topic}.dlq", 1, **options)
        assert letter.value == b"{not json"
        r = d.post("/v1/rollback", {"version": 0, "reason": "tls test"}, admin=True)
        assert r.status_code == 200, r.text
        rejected = read_topic(servers, f"{topic}.rejected", 4, timeout=60, **options)
        assert {json.loads(m.value)["id"] for m in rejected} == {f.fact_id for f in facts}


def test_editd_run_exits_naming_the_setting_when_the_ca_is_wrong(
    certs: Path, tls_endpoint: str, tmp_path: Path
) -> None:
    env = {
        "EDITD_KAFKA__SECURITY_PROTOCOL": "SSL",
        "EDITD_KAFKA__SSL_CAFILE": str(certs / "other-ca.pem"),
    }
    d = Daemon(tmp_path / "data", [tls_endpoint], "tls-wrong-ca", batch_size=4, env=env)
    d.start()
    assert d.proc is not None
    assert d.proc.wait(60) == 8
    deadline = time.monotonic() + 5  # the reader thread drains the pipe after the exit
    while "kafka.ssl_cafile" not in d.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "kafka.ssl_cafile" in d.log()

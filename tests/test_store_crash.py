"""Crash safety of the edit store: a process dies at every durable step of a commit and of a
rollback, is killed -9 at random moments, or leaves torn files; reopening always finds the
previous or the next version live, never a torn one, and every live version rebuilds to the
sha256 its manifest records."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from test_store_versions import base_of, commit_n, make_facts, make_update, tiny_llama

import editd.durable as durable_module
from editd.store.store import EditStore

CRASHED = 77
COUNTED = 100  # a child that did not crash exits COUNTED + the number of durable steps
STEPS = ("write_plain", "fsync_file", "fsync_dir")
_FORK = multiprocessing.get_context("fork")


@pytest.fixture(scope="module")
def base():
    return base_of(tiny_llama(torch.bfloat16))


@pytest.fixture(scope="module")
def template(tmp_path_factory, base):
    """A store at version 3 (snapshot every 2 versions), copied fresh for each crash."""
    root = tmp_path_factory.mktemp("template")
    with EditStore(root, snapshot_every=2) as store:
        store.create(base)
        commit_n(store, base, 3)
    return root


def _run_until_step(root: Path, action: str, crash_at: int) -> None:
    """Child process: open the store and run `action`, dying at durable step `crash_at`."""
    torch.set_num_threads(1)
    calls = 0

    def counting(name, fn):
        def step(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == crash_at:
                if name == "write_plain":  # die halfway through writing the file
                    path, data = args
                    with open(path, "wb") as f:
                        f.write(data[: len(data) // 2])
                os._exit(CRASHED)
            return fn(*args, **kwargs)

        return step

    for name in STEPS:
        setattr(durable_module, name, counting(name, getattr(durable_module, name)))
    os.replace = counting("replace", os.replace)
    base = base_of(tiny_llama(torch.bfloat16))
    store = EditStore(root, snapshot_every=2)
    store.open(base)
    calls = 0  # count the action's own steps, not recovery's
    if action == "commit":
        store.commit(make_update(base, 99), make_facts(4), {"facts/0": 40})
    else:
        store.rollback(1, "crash test")
    os._exit(COUNTED + calls)


def _fork(root: Path, action: str, crash_at: int) -> int:
    child = _FORK.Process(target=_run_until_step, args=(root, action, crash_at))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        pytest.fail(f"child crashing at step {crash_at} of {action} hung")
    return child.exitcode


def _assert_consistent(root: Path, base, allowed: set[int]) -> EditStore:
    store = EditStore(root, snapshot_every=2)
    store.open(base)
    assert store.current in allowed
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]
    assert store.verify() == []
    for info in store.versions():
        vdir = root / "versions" / f"{info.version:06d}"
        json.loads((vdir / "manifest.json").read_text())
        assert info.version == 0 or (vdir / "update.safetensors").is_file()
    return store


def _steps_of(action: str, template: Path, tmp_path: Path) -> int:
    root = tmp_path / "count"
    shutil.copytree(template, root)
    code = _fork(root, action, crash_at=10**6)
    assert code > COUNTED, f"the {action} failed without a crash (exit {code})"
    return code - COUNTED


def test_crash_at_every_step_of_a_commit(template, base, tmp_path):
    steps = _steps_of("commit", template, tmp_path)
    # update fsync, manifest, tmp dir fsync, rename, dir fsync, then CURRENT (write, rename,
    # fsync) and the snapshot of version 4 (fsync, rename, fsync).
    assert steps >= 8
    outcomes = {}
    for k in range(1, steps + 1):
        root = tmp_path / f"commit-{k}"
        shutil.copytree(template, root)
        assert _fork(root, "commit", crash_at=k) == CRASHED
        with _assert_consistent(root, base, {3, 4}) as store:
            outcomes[k] = store.current
            if store.current == 3:
                assert not (root / "versions" / "000004").exists()
                assert "f-4-0" not in store.applied_fact_ids()
            else:
                assert {"f-4-0", "f-4-1"} <= store.applied_fact_ids()
            # The store takes the next batch whatever happened (a replayed one when v3 is live).
            store.commit(make_update(base, 5), make_facts(5), {"facts/0": 50})
            assert store.verify() == []
    # Before CURRENT moves the old version stays live; once it moved, the new one does.
    assert outcomes[1] == 3 and outcomes[steps] == 4
    assert sorted(outcomes.values()) == list(outcomes.values())


def test_crash_at_every_step_of_a_rollback(template, base, tmp_path):
    steps = _steps_of("rollback", template, tmp_path)
    assert steps >= 9  # two manifests (write, rename, fsync each) and CURRENT
    for k in range(1, steps + 1):
        root = tmp_path / f"rollback-{k}"
        shutil.copytree(template, root)
        assert _fork(root, "rollback", crash_at=k) == CRASHED
        with _assert_consistent(root, base, {1, 3}) as store:
            states = {i.version: i.state for i in store.versions()}
            if store.current == 3:
                # Not rolled back: nothing is marked undone, nothing is pending.
                assert set(states.values()) == {"committed"}
                assert store.outbox.pending() == []
            else:
                assert states == {0: "committed", 1: "committed", 2: "undone", 3: "undone"}
                assert [r.version for r in store.outbox.pending()] == [2, 3]


def _commit_forever(root: Path) -> None:
    torch.set_num_threads(1)
    base = base_of(tiny_llama(torch.bfloat16))
    store = EditStore(root, snapshot_every=2)
    store.open(base)
    v = store.current
    while True:
        v += 1
        store.commit(make_update(base, v), make_facts(1000 + v), {"facts/0": v})


def test_kill_9_at_random_moments(template, base, tmp_path):
    root = tmp_path / "killed"
    shutil.copytree(template, root)
    rng = random.Random(4)
    last = 3
    for _ in range(6):
        child = _FORK.Process(target=_commit_forever, args=(root,))
        child.start()
        time.sleep(rng.uniform(0.3, 1.5))
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert child.exitcode == -signal.SIGKILL
        with _assert_consistent(root, base, set(range(last, 10**6))) as store:
            lineage = store.lineage()
            assert lineage == sorted(lineage)
            assert len(store.applied_fact_ids()) == 2 * (len(lineage) - 1)
            last = store.current
    assert last > 3


def test_torn_files_are_cleaned_on_open(template, base, tmp_path):
    root = tmp_path / "torn"
    shutil.copytree(template, root)
    versions = root / "versions"
    torn = versions / ".tmp-000004-999"
    torn.mkdir()
    (torn / "update.safetensors").write_bytes(b"\x10\x00\x00")
    (versions / "000005").mkdir()  # renamed into place without a manifest: impossible, but
    (versions / "000005" / "update.safetensors").write_bytes(b"junk")  # a disk can lie
    shutil.copytree(versions / "000002", versions / "000006")
    orphan = json.loads((versions / "000006" / "manifest.json").read_text())
    orphan.update(version=6, parent=3)  # complete, but CURRENT never moved to it
    (versions / "000006" / "manifest.json").write_text(json.dumps(orphan))
    (root / ".tmp-999-CURRENT").write_text("6")
    (root / "snapshots" / ".tmp-999-000006.safetensors").write_bytes(b"\x00" * 7)
    (versions / "000002" / ".tmp-999-manifest.json").write_text("{")

    with EditStore(root, readonly=True) as reader:  # readers see the live state, touch nothing
        reader.open()
        assert [i.version for i in reader.versions()] == [0, 1, 2, 3]
        assert (versions / "000006").exists()

    with _assert_consistent(root, base, {3}) as store:
        assert sorted(p.name for p in versions.iterdir()) == [
            "000000",
            "000001",
            "000002",
            "000003",
        ]
        info = store.commit(make_update(base, 4), make_facts(4), {"facts/0": 4})
        assert (info.version, info.parent) == (4, 3)


def test_an_interrupted_rollback_is_reverted(template, base, tmp_path):
    root = tmp_path / "half-rollback"
    shutil.copytree(template, root)
    path = root / "versions" / "000003" / "manifest.json"
    manifest = json.loads(path.read_text())
    undone = {"at": "now", "reason": "x", "to_version": 2, "from_version": 3}
    manifest.update(state="undone", rejected_pending=True, undone=undone)
    path.write_text(json.dumps(manifest))
    with _assert_consistent(root, base, {3}) as store:
        assert store.version(3).state == "committed"
        assert json.loads(path.read_text())["undone"] is None
        assert store.outbox.pending() == []

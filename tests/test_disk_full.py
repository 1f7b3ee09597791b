"""The data dir's disk fills during a commit (a real size-limited tmpfs, a real `editd run`):
the daemon stops with one clear line and its exit code, the store is whole (no temp files,
CURRENT names a version that rebuilds to its sha256), and once space is freed a restart
applies every fact exactly once."""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from editd.consumers.publish import publish_facts
from editd.store.store import EditStore
from editd.world.requests import make_requests
from tests.daemon_harness import Daemon, fact_ids_of, manifests

pytestmark = [pytest.mark.broker, pytest.mark.slow]

BATCH = 10
EXIT_DISK_FULL = 12
LEFT_FREE = 16 * 1024  # less than one version of the built-in model needs


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs: a real filesystem that runs out of space (root only)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a size-limited tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as f:
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        want = free - leave
        while want > 0:
            f.write(chunk[: min(len(chunk), want)])
            want -= len(chunk)
        f.flush()
        os.fsync(f.fileno())
    return filler


def test_a_full_data_dir_stops_the_editor_cleanly_and_a_restart_applies_every_fact_once(
    small_disk: Path, broker
) -> None:
    servers = broker.bootstrap_servers
    topic = "facts-disk-full"
    data_dir = small_disk / "editd-data"
    facts = make_requests(2 * BATCH, seed=61)

    def editor() -> Daemon:
        return Daemon(data_dir, servers, topic, batch_size=BATCH, linger=0.5)

    first = editor()
    second = editor()
    try:
        first.start().wait_ready()
        publish_facts(facts[:BATCH], servers, topic)
        first.wait_status(
            "version 1 published",
            lambda s: s["version"] == 1 and s["update_log"]["published_version"] == 1,
            timeout=300,
        )
        filler = _fill(small_disk, LEFT_FREE)
        publish_facts(facts[BATCH:], servers, topic)
        assert first.proc is not None
        assert first.proc.wait(300) == EXIT_DISK_FULL, first.log()
        said = [line for line in first.lines if "is full" in line]
        assert len(said) == 1 and str(data_dir) in said[0], first.log()

        # Nothing half-written: no temp file anywhere, CURRENT at the last durable version.
        assert not [p for p in data_dir.rglob(".tmp-*")], list(data_dir.rglob(".tmp-*"))
        assert (data_dir / "CURRENT").read_text().strip() == "1"
        store = EditStore(data_dir, readonly=True)
        store.open()
        assert store.current == 1 and store.verify() == []
        store.close()

        # Space freed: the restart applies the batch that did not fit, once.
        filler.unlink()
        second.start().wait_ready()
        second.wait_status(
            "every fact applied",
            lambda s: s["editing"] is None and s["version"] == 2,
            timeout=300,
        )
        applied = collections.Counter(i for m in manifests(data_dir) for i in fact_ids_of(m))
        assert set(applied) == {f.fact_id for f in facts}
        assert set(applied.values()) == {1}
        assert second.terminate() == 0
    finally:
        first.kill()
        second.kill()

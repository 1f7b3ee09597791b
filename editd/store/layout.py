"""Where an edit store keeps what, and the reads and writes of each file (no semantics).

    CURRENT                          the live version number; moving it is the commit point
    LOCK                             flock'ed by the one process that writes (the daemon)
    IDENTITY                         the store's id (store/identity.py), made with the store
    base/base.safetensors            base values of the edited tensors, exact dtype, kept once
    versions/000000/manifest.json    version 0: the base model (sha256 of its tensors)
    versions/000007/update.safetensors   `<module>.left|right|keys`, float32
    versions/000007/manifest.json    a `Version` (store/version.py): parent, facts, offsets,
                                     timings, diagnostics, state, sha256, scores
    snapshots/000010.safetensors     accumulated float32 update D_v every `snapshot_every` versions
    gates/<sha256>.safetensors       a gated memory's projection (editd.memory), once per store;
                                     a gated version's update file adds `_gate.facts`, its
                                     manifest a `gate` record naming the projection
    outbox/                          facts never to be served, until published (store/outbox.py)

Every write goes through `durable` (temp, fsync, rename, directory fsync). A version is written
into `versions/.tmp-000007-<pid>/` and renamed whole. Nothing is ever unpickled: tensors are
safetensors, metadata is JSON.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from editd import durable
from editd.store.errors import StoreCorrupt, StoreLocked
from editd.store.values import dump
from editd.store.version import FORMAT, Version

log = logging.getLogger(__name__)

_VERSION_DIR = re.compile(r"^\d{6}$")
_UPDATE_FILE = "update.safetensors"
_MANIFEST_FILE = "manifest.json"


class Layout:
    """The files of one store under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # -- paths

    @property
    def current_file(self) -> Path:
        return self.root / "CURRENT"

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    @property
    def snapshots_dir(self) -> Path:
        return self.root / "snapshots"

    @property
    def gates_dir(self) -> Path:
        return self.root / "gates"

    @property
    def base_file(self) -> Path:
        return self.root / "base" / "base.safetensors"

    def version_dir(self, version: int) -> Path:
        return self.versions_dir / f"{version:06d}"

    def snapshot_file(self, version: int) -> Path:
        return self.snapshots_dir / f"{version:06d}.safetensors"

    def projection_file(self, digest: str) -> Path:
        return self.gates_dir / f"{digest}.safetensors"

    # -- CURRENT and LOCK

    def exists(self) -> bool:
        return self.current_file.is_file()

    def read_current(self) -> int:
        try:
            return int(self.current_file.read_text().strip())
        except ValueError as exc:
            raise StoreCorrupt(f"{self.current_file} does not hold a version: {exc}") from exc

    def write_current(self, version: int) -> None:
        """The commit point of every change of the live version."""
        durable.write_bytes(self.current_file, f"{version}\n".encode())

    def lock(self) -> int:
        """Take the writer's flock; its file descriptor, for `unlock`."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(
                f"the edit store at {self.root} is in use by another process (a running daemon?)"
            ) from None
        return fd

    @staticmethod
    def unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    # -- the base

    def write_base(self, tensors: dict[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        self.base_file.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(
            self.base_file, tensors, {"format": str(FORMAT), "modules": json.dumps(meta)}
        )

    def read_base_meta(self) -> dict[str, dict[str, Any]]:
        """Per edited tensor: shape, dtype and sha256 of its base value."""
        try:
            with safe_open(self.base_file, framework="pt") as f:
                meta = json.loads((f.metadata() or {})["modules"])
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
            raise StoreCorrupt(f"cannot read the base tensors {self.base_file}: {exc}") from exc
        return meta

    def read_base(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        with safe_open(self.base_file, framework="pt") as f:
            return {name: f.get_tensor(name) for name in names}

    # -- versions

    def version_numbers(self) -> list[int]:
        """Every version directory's number, ascending (temporaries excluded)."""
        return [
            int(d.name) for d in sorted(self.versions_dir.iterdir()) if _VERSION_DIR.match(d.name)
        ]

    def write_version(
        self, version: int, manifest: Version, update: dict[str, torch.Tensor] | None
    ) -> None:
        """Write a version's directory whole (temp directory, fsynced, renamed)."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        final = self.version_dir(version)
        if final.exists():
            raise StoreCorrupt(f"{final} exists but is not a known version")
        tmp = self.versions_dir / f".tmp-{version:06d}-{os.getpid()}"
        durable.remove(tmp)
        tmp.mkdir()
        try:
            if update is not None:
                save_tensors(update, tmp / _UPDATE_FILE, {"format": str(FORMAT)})
                durable.fsync_file(tmp / _UPDATE_FILE)
            durable.write_plain(tmp / _MANIFEST_FILE, dump(manifest.to_manifest()))
            durable.fsync_dir(tmp)
        except BaseException:
            # A full disk, most likely: give the space back now rather than at the next open.
            durable.remove(tmp)
            raise
        os.replace(tmp, final)
        durable.fsync_dir(self.versions_dir)

    def read_manifest(self, version: int) -> dict[str, Any]:
        """A manifest's raw JSON; OSError or ValueError when it is missing or unreadable."""
        path = self.version_dir(version) / _MANIFEST_FILE
        return json.loads(path.read_text(encoding="utf-8"))

    def write_manifest(self, manifest: Version) -> None:
        """Replace a committed version's manifest (atomically)."""
        path = self.version_dir(manifest.version) / _MANIFEST_FILE
        durable.write_bytes(path, dump(manifest.to_manifest()))

    def read_update(self, version: int, parts: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
        """part → {name: tensor} for the update tensors named `<name>.<part>`."""
        path = self.version_dir(version) / _UPDATE_FILE
        out: dict[str, dict[str, torch.Tensor]] = {p: {} for p in parts}
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    name, _, part = key.rpartition(".")
                    if part in out:
                        out[part][name] = f.get_tensor(key)
        except OSError as exc:
            raise StoreCorrupt(f"version {version}: cannot read {path}: {exc}") from exc
        return out

    def remove_version(self, version: int) -> None:
        """Remove a version's directory and snapshot (it never was, or no longer is, kept)."""
        durable.remove(self.version_dir(version))
        durable.remove(self.snapshot_file(version))
        durable.fsync_dir(self.versions_dir)

    def remove_versions(self, versions: Sequence[int]) -> None:
        """Remove these versions' directories and every snapshot."""
        for v in versions:
            durable.remove(self.version_dir(v))
        if self.snapshots_dir.is_dir():
            for path in self.snapshots_dir.iterdir():
                durable.remove(path)
            durable.fsync_dir(self.snapshots_dir)
        durable.fsync_dir(self.versions_dir)

    # -- snapshots

    def write_snapshot(
        self, version: int, parent: int | None, deltas: Mapping[str, torch.Tensor]
    ) -> None:
        """D_v of `version`. An optimisation (bounds replay on open), so a failure is logged,
        not raised: the version itself is already durable."""
        try:
            self.snapshots_dir.mkdir(parents=True, exist_ok=True)
            meta = {"format": str(FORMAT), "version": str(version), "parent": str(parent)}
            write_safetensors(
                self.snapshot_file(version), {n: d.contiguous() for n, d in deltas.items()}, meta
            )
        except OSError:
            log.exception("could not write the snapshot of version %d", version)

    def read_snapshot(self, version: int, parent: int | None) -> dict[str, torch.Tensor] | None:
        """D_v of `version` if a snapshot of this very version (same parent) is readable."""
        path = self.snapshot_file(version)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("version") != str(version) or meta.get("parent") != str(parent):
                    log.warning("ignoring snapshot %s: it belongs to another version", path)
                    return None
                return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        except OSError as exc:
            log.warning("ignoring unreadable snapshot %s: %s", path, exc)
            return None

    # -- gate projections

    def read_projection(self, digest: str) -> torch.Tensor:
        path = self.projection_file(digest)
        try:
            with safe_open(path, framework="pt") as f:
                return f.get_tensor("projection")
        except OSError as exc:
            raise StoreCorrupt(f"cannot read the gate projection {path}: {exc}") from exc

    def write_projection(self, digest: str, projection: torch.Tensor) -> None:
        """Keep a projection once: a second version that uses it finds the file there."""
        path = self.projection_file(digest)
        if not path.is_file():
            write_safetensors(path, {"projection": projection.contiguous()}, {"format": "1"})

    # -- recovery's sweep

    def remove_temporaries(self, *also: Path) -> None:
        """Remove the `.tmp-*` files and directories interrupted writes left."""
        dirs = (
            self.root,
            self.versions_dir,
            self.snapshots_dir,
            self.base_file.parent,
            self.gates_dir,
            *also,
        )
        for parent in dirs:
            if not parent.is_dir():
                continue
            subdirs = [p for p in parent.iterdir() if parent == self.versions_dir and p.is_dir()]
            for path in [*parent.iterdir(), *(f for d in subdirs for f in d.iterdir())]:
                if path.name.startswith(".tmp-"):
                    log.warning("removing %s left by an interrupted write", path)
                    durable.remove(path)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    durable.write_with(path, lambda tmp: save_tensors(tensors, tmp, meta))


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    """safetensors' `save_file`, its I/O errors raised as `OSError` with their errno: it
    raises its own error type, and a full disk (ENOSPC) must stop the daemon with its exit
    code, not pass for a failed batch."""
    try:
        save_file(tensors, path, metadata=meta)
    except Exception as exc:
        found = re.search(r"os error (\d+)", str(exc))
        if found is None or isinstance(exc, OSError):
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc

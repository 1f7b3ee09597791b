"""The versioned edit store: every batch a durable version, every version restorable bit for bit.

Layout under `data_dir` (docs/design.md, "Versions and exact rollback"):

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

The set of edited modules is fixed when the store is created: every manifest then fingerprints
the same tensors, so any two versions compare. A daemon restarted with other layers, another
model or another dtype is refused with a `StoreMismatch` naming the difference (start a new data
dir for it) rather than silently mixing two bases.

Crash safety. A version is written into `versions/.tmp-000007/` (each file fsynced, then the
directory), renamed to `versions/000007`, and becomes live only when `CURRENT` is replaced
(temp, fsync, rename, directory fsync). A crash leaves `CURRENT` at v−1 or at v. On open, temp
files are removed, and a version directory outside the live lineage that is not marked undone
(a commit that never reached `CURRENT`) is deleted; a rollback that crashed after queueing its
facts in the outbox or marking versions undone, but before moving `CURRENT`, is reverted (the
records are dropped, the marks cleared).

Exactness. D_v = D_{v−1} + left_v @ right_v, each product expanded by `lowrank.lowrank_product`
from the stored float32 factors in a fixed order, so D_v has the same bits whether it is rebuilt
from the base or from a snapshot, on any machine. A module whose manifest entry says
`"replaces": true` (a consolidation) starts over: D_v = left_v @ right_v. The served weight is
`lowrank.served_weight(base, D_v)`, the formula the model handle uses too; each manifest records
its sha256, and a rollback is checked against it.

Nothing is ever unpickled: tensors are safetensors, metadata is JSON.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from editd import durable
from editd.lowrank import EditUpdate, LayerUpdate, accumulate, served_weight, tensor_sha256
from editd.memory import (
    GATE_KEYS,
    MEMORY_SHA256,
    PROJECTION,
    Block,
    Gate,
    GatedMemory,
    projection_digest,
)
from editd.store import identity
from editd.store.outbox import Outbox, Rejected, version_record_id
from editd.store.version import FORMAT, Undo, Version, VersionState, now

log = logging.getLogger(__name__)

_VERSION_DIR = re.compile(r"^\d{6}$")
_UPDATE_FILE = "update.safetensors"
_MANIFEST_FILE = "manifest.json"


class StoreError(RuntimeError):
    """The edit store cannot do what was asked; the message says why."""


class StoreNotFound(StoreError):
    """No edit store exists at the data dir yet."""


class StoreLocked(StoreError):
    """Another process (normally the running daemon) holds the store for writing."""


class StoreMismatch(StoreError):
    """The tensors offered as the base are not those the store was created with."""


class StoreCorrupt(StoreError):
    """A committed file is missing or unreadable: the store needs an operator."""


class UpdateRefused(StoreError):
    """A version or current record from the update log that this store will not take."""


class VersionNotFound(StoreError):
    """No version of that number exists (live or undone)."""


class EditStore:
    """A journal of edit versions under one directory, with exact rollback.

    Usage (the daemon):

        store = EditStore(settings.store.data_dir, snapshot_every=settings.store.snapshot_every)
        store.open_or_create(base)          # base: {module name: weight as served at version 0}
        handle.set_deltas(store.deltas())   # restore CURRENT
        ...
        version = store.commit(update, facts, offsets, timings, diagnostics)
        handle.set_deltas(store.deltas())

    (`editd.versions.VersionedModel` is the one caller that does this; it also keeps the
    editor's preservation in step.)

    Commit the version before applying it to the served model, so that a served version always
    exists on disk. Always apply `store.deltas()` (not a product computed elsewhere): its bits
    are what the manifests fingerprint. One process writes (`readonly=False` takes an exclusive
    flock); readers (`editd checkpoints`) open with `readonly=True`. Methods are thread-safe.
    """

    def __init__(
        self, data_dir: str | os.PathLike[str], snapshot_every: int = 10, *, readonly: bool = False
    ) -> None:
        if snapshot_every <= 0:
            raise ValueError("snapshot_every must be positive")
        self.root = Path(data_dir)
        self.snapshot_every = snapshot_every
        self.readonly = readonly
        self._lock = threading.RLock()
        self._lock_fd: int | None = None
        self._opened = False
        self._current = 0
        self._max_version = 0
        self._manifests: dict[int, Version] = {}
        self.outbox = Outbox(self.root / "outbox")
        self._base: dict[str, torch.Tensor] | None = None
        self._base_meta: dict[str, dict[str, Any]] = {}
        self.store_id: str | None = None  # store/identity.py; None only for an old read-only one
        # D of one version (normally the head), so a commit adds one product, not a replay.
        self._delta_cache: tuple[int, dict[str, torch.Tensor]] | None = None
        # The gated memory of one version (normally the head), for the same reason.
        self._memory_cache: tuple[int, GatedMemory] | None = None
        self._projections: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ paths

    @property
    def _versions_dir(self) -> Path:
        return self.root / "versions"

    @property
    def _snapshots_dir(self) -> Path:
        return self.root / "snapshots"

    @property
    def _gates_dir(self) -> Path:
        return self.root / "gates"

    @property
    def _base_file(self) -> Path:
        return self.root / "base" / "base.safetensors"

    def _version_dir(self, version: int) -> Path:
        return self._versions_dir / f"{version:06d}"

    def _snapshot_file(self, version: int) -> Path:
        return self._snapshots_dir / f"{version:06d}.safetensors"

    # ------------------------------------------------------------------ lifecycle

    def exists(self) -> bool:
        return (self.root / "CURRENT").is_file()

    def create(self, base: Mapping[str, torch.Tensor]) -> None:
        """Start a new store whose version 0 is `base` (the edited tensors, as served)."""
        with self._lock:
            if self.readonly:
                raise StoreError("a read-only store cannot be created")
            if not base:
                raise ValueError("base must name at least one tensor")
            self.root.mkdir(parents=True, exist_ok=True)
            self._acquire()
            if self.exists():
                self.close()
                raise StoreError(f"an edit store already exists at {self.root}")
            tensors = {n: t.detach().to("cpu").contiguous().clone() for n, t in base.items()}
            meta = {
                name: {
                    "shape": list(t.shape),
                    "dtype": _dtype_name(t.dtype),
                    "sha256": tensor_sha256(t),
                }
                for name, t in sorted(tensors.items())
            }
            self._base_file.parent.mkdir(parents=True, exist_ok=True)
            _write_safetensors(
                self._base_file, tensors, {"format": str(FORMAT), "modules": json.dumps(meta)}
            )
            manifest = Version(
                version=0,
                parent=None,
                created=now(),
                sha256={name: m["sha256"] for name, m in meta.items()},
            )
            self._write_version_dir(0, manifest, update=None)
            self.store_id = identity.ensure(self.root)
            durable.write_bytes(self.root / "CURRENT", b"0\n")
            self._opened = True
            self._base, self._base_meta = tensors, meta
            self._current, self._max_version = 0, 0
            self._manifests = {0: manifest}
            self._delta_cache = (0, {})
            log.info("created edit store at %s for %d tensors", self.root, len(tensors))

    def open(self, base: Mapping[str, torch.Tensor] | None = None) -> None:
        """Open an existing store, recover from an interrupted commit or rollback, and, when
        `base` is given, check that it is exactly the store's base (names, dtypes, bits)."""
        with self._lock:
            if not self.exists():
                raise StoreNotFound(f"no edit store at {self.root}")
            try:
                if not self.readonly:
                    self._acquire()
                self._base_meta = self._read_base_meta()
                # Checked before recovery touches anything: a wrong data dir stays as it was.
                if base is not None:
                    self._check_base(base)
                if not self.readonly:
                    self._remove_temporaries()
                self.store_id = self._identity()
                self._base = None
                self._load_manifests()
            except BaseException:
                self.close()
                raise
            self._opened = True
            self._delta_cache = (0, {}) if self._current == 0 else None

    def open_or_create(self, base: Mapping[str, torch.Tensor]) -> bool:
        """Open the store checking `base`, or create it from `base`; True when created."""
        with self._lock:
            if self.exists():
                self.open(base)
                return False
            self.create(base)
            return True

    def close(self) -> None:
        with self._lock:
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None
            self._opened = False
            self._base = None
            self._delta_cache = None
            self._memory_cache = None

    def __enter__(self) -> EditStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ queries

    @property
    def current(self) -> int:
        """The live version."""
        self._require_open()
        return self._current

    @property
    def module_names(self) -> list[str]:
        self._require_open()
        return sorted(self._base_meta)

    def base_sha256(self) -> dict[str, str]:
        self._require_open()
        return {name: m["sha256"] for name, m in self._base_meta.items()}

    def has(self, version: int) -> bool:
        with self._lock:
            self._require_open()
            return version in self._manifests

    def version(self, version: int | None = None) -> Version:
        """The record of a version (live or undone); the live one by default."""
        with self._lock:
            self._require_open()
            v = self._current if version is None else version
            if v not in self._manifests:
                raise VersionNotFound(f"no version {v} in the edit store at {self.root}")
            return self._manifests[v]

    def lineage(self, version: int | None = None) -> list[int]:
        """Versions from 0 to `version` (default: the live one) along parent links."""
        with self._lock:
            self._require_open()
            v: int | None = self._current if version is None else version
            chain: list[int] = []
            while v is not None:
                if v not in self._manifests:
                    raise VersionNotFound(f"no version {v} in the edit store at {self.root}")
                chain.append(v)
                v = self._manifests[v].parent
            return chain[::-1]

    def versions(self) -> list[Version]:
        """Every version on disk, oldest first, undone ones included."""
        with self._lock:
            self._require_open()
            return [self._manifests[v] for v in sorted(self._manifests)]

    def listing(self) -> list[dict[str, Any]]:
        """`Version.summary` of every version, oldest first: what operators are shown."""
        with self._lock:
            pending = self.outbox.ids()
            return [
                v.summary(
                    current=v.version == self._current,
                    rejected_pending=version_record_id(v.version) in pending,
                )
                for v in self.versions()
            ]

    def expected_sha256(self, version: int | None = None) -> dict[str, str]:
        """sha256 of every edited tensor as served at `version`, from its manifest."""
        return dict(self.version(version).sha256)

    def applied_fact_ids(self) -> set[str]:
        """Ids of the facts in the live lineage: a replayed batch is recognised by these."""
        with self._lock:
            return {f for v in self.lineage() for f in self._manifests[v].fact_ids}

    def keys_by_version(self) -> list[tuple[int, dict[str, torch.Tensor]]]:
        """The keys (d_in, b) of every version in the live lineage, oldest first: the editor
        rebuilds its preservation matrix from them after a rollback or a restart."""
        with self._lock:
            out = []
            for v in self.lineage()[1:]:
                out.append((v, self._read_update(v, parts=("keys",))["keys"]))
            return out

    # ------------------------------------------------------------------ tensors

    def deltas(
        self, version: int | None = None, *, use_snapshots: bool = True
    ) -> dict[str, torch.Tensor]:
        """D_v: the accumulated float32 update (CPU) of each module edited up to `version`.

        Modules no version of the lineage touched are absent (they serve the base).
        """
        with self._lock:
            self._require_open()
            v = self._current if version is None else version
            if use_snapshots and self._delta_cache is not None and self._delta_cache[0] == v:
                return {n: d.clone() for n, d in self._delta_cache[1].items()}
            chain = self.lineage(v)
            start, acc = 0, {}
            if use_snapshots:
                for u in reversed(chain[1:]):
                    snap = self._read_snapshot(u)
                    if snap is not None:
                        start, acc = u, snap
                        break
            for u in chain[chain.index(start) + 1 :]:
                if self._manifests[u].gate is not None:
                    continue  # served through the gate, not by the weights
                update = self._read_update(u, parts=("left", "right"))
                modules = self._manifests[u].modules
                for name in sorted(update["left"]):
                    acc[name] = _advance(
                        acc, name, update["left"][name], update["right"][name], modules
                    )
            if use_snapshots and v == self._current:
                self._delta_cache = (v, {n: d.clone() for n, d in acc.items()})
            return acc

    def memory(self, version: int | None = None) -> GatedMemory:
        """The gated memory served at `version`: one block per gated version of its lineage,
        oldest first (empty for the weight form)."""
        with self._lock:
            self._require_open()
            v = self._current if version is None else version
            if self._memory_cache is not None and self._memory_cache[0] == v:
                return self._memory_cache[1]
            chain = self.lineage(v)
            blocks: list[Block] = []
            start = 0
            cached = self._memory_cache
            if cached is not None and cached[0] in chain:
                start, blocks = chain.index(cached[0]), list(cached[1].blocks)
            for u in chain[start + 1 :]:
                if self._manifests[u].gate is not None:
                    blocks.append(self._block(u))
            memory = GatedMemory(tuple(blocks))
            if v == self._current:
                self._memory_cache = (v, memory)
            return memory

    def served_form(self, version: int | None = None) -> str | None:
        """ "gated" or "weights": the form the lineage up to `version` serves; None while it
        holds no version (one lineage serves one form)."""
        with self._lock:
            chain = self.lineage(version)[1:]
            if not chain:
                return None
            return "gated" if self._manifests[chain[0]].gate is not None else "weights"

    def served_state(
        self, version: int | None = None
    ) -> tuple[dict[str, torch.Tensor], GatedMemory]:
        """What `version` serves: the weights' accumulated updates D_v and the gated memory.
        A model handle serves exactly these (`ModelHandle.serve`)."""
        with self._lock:
            return self.deltas(version), self.memory(version)

    def factors(
        self, version: int | None = None
    ) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per module, the (left, right) float32 factors of every version in the lineage up to
        `version` from its newest replacing one on, oldest first: D_v = Σ left @ right
        (exports build a LoRA adapter from them)."""
        with self._lock:
            out: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for v in self.lineage(version)[1:]:
                if self._manifests[v].gate is not None:
                    raise StoreError(
                        f"version {v} is served through a gated memory: its updates act only "
                        "where their gates open, so they have no plain-weight factors"
                    )
                update = self._read_update(v, parts=("left", "right"))
                modules = self._manifests[v].modules
                for name in sorted(update["left"]):
                    if _replaces(modules, name):
                        out[name] = []  # the versions before it no longer add up
                    out.setdefault(name, []).append((update["left"][name], update["right"][name]))
            return out

    def version_factors(self, version: int) -> dict[str, torch.Tensor]:
        """One version's own float32 factors, `<module>.left|right`: what the update log carries."""
        with self._lock:
            self.version(version)
            if version == 0:
                return {}
            parts = ("left", "right", *_GATE_PARTS)
            update = self._read_update(version, parts=parts)
            out = {
                f"{name}.{part}": update[part][name]
                for part in parts
                for name in sorted(update[part])
            }
            gate = self._manifests[version].gate
            if gate is not None:
                # The log carries the projection with every version: a replica may start
                # from any of them.
                out[PROJECTION] = self._projection(gate, out.get(PROJECTION))
            return out

    def base(self) -> dict[str, torch.Tensor]:
        """The base tensors (CPU, exact dtype). Treat as read-only."""
        with self._lock:
            self._require_open()
            if self._base is None:
                with safe_open(self._base_file, framework="pt") as f:
                    self._base = {name: f.get_tensor(name) for name in self._base_meta}
            return self._base

    def served(self, version: int | None = None) -> dict[str, torch.Tensor]:
        """Every edited tensor as served at `version`, in the base dtype, on the CPU."""
        with self._lock:
            base = self.base()
            deltas = self.deltas(version)
            return {
                name: served_weight(t, deltas[name]) if name in deltas else t.clone()
                for name, t in base.items()
            }

    def verify(self, version: int | None = None) -> list[str]:
        """Rebuild `version` from disk; the names whose sha256 differ from its manifest."""
        expected = self.expected_sha256(version)
        served = self.served(version)
        return sorted(n for n, t in served.items() if tensor_sha256(t) != expected.get(n))

    # ------------------------------------------------------------------ writes

    def commit(
        self,
        update: EditUpdate,
        facts: Sequence[Mapping[str, Any] | Any],
        offsets: Mapping[Any, int],
        timings: Mapping[str, float] | None = None,
        diagnostics: Mapping[str, Any] | None = None,
    ) -> Version:
        """Write `update` as a new version on top of the live one and make it live, atomically.

        `facts` are fact dicts (or pydantic models) with an "id"; `offsets` maps
        "topic/partition" (or (topic, partition) / TopicPartition) to the next offset to read.
        A fact already in the live lineage is refused: applying it twice is a bug upstream.
        Returns once the version is durable.
        """
        with self._lock:
            self._require_writable()
            fact_dicts = [_fact_dict(f) for f in facts]
            fact_ids = [str(f["id"]) for f in fact_dicts]
            if len(set(fact_ids)) != len(fact_ids):
                raise ValueError("a batch names the same fact id twice")
            already = self.applied_fact_ids().intersection(fact_ids)
            if already:
                raise ValueError(f"facts already applied: {sorted(already)[:5]}")
            tensors, modules, gate = self._check_update(update)

            parent = self._current
            version = self._max_version + 1
            new, memory, sha = self._next_state(version, parent, tensors, modules, gate)
            manifest = Version(
                version=version,
                parent=parent,
                created=now(),
                facts=tuple(fact_dicts),
                offsets=_offset_dict(offsets),
                timings=_jsonable(dict(timings or {})),
                diagnostics=_jsonable({**update.diagnostics, **(diagnostics or {})}),
                modules=modules,
                sha256=sha,
                gate=gate,
            )
            self._keep(manifest, tensors, new, memory)
            durable.write_bytes(self.root / "CURRENT", f"{version}\n".encode())
            self._current = version
            return manifest

    def rollback(self, to_version: int, reason: str) -> list[Rejected]:
        """Make `to_version` (an ancestor of the live version) live again.

        The versions after it are kept on disk, marked undone with `reason`; their facts go to
        the outbox first (one record per version, oldest first, returned), so by the time the
        rollback is live nothing it undid can be lost.
        """
        with self._lock:
            self._require_writable()
            chain = self.lineage()
            if to_version not in chain:
                if to_version not in self._manifests:
                    raise VersionNotFound(
                        f"cannot roll back to version {to_version}: no such version"
                    )
                raise StoreError(f"cannot roll back to version {to_version}: it is undone")
            undone = chain[chain.index(to_version) + 1 :]
            if not undone:
                return []
            at = now()
            records = [
                Rejected(
                    id=version_record_id(v),
                    kind="rolled_back",
                    reason=reason,
                    facts=self._manifests[v].facts,
                    created=at,
                    version=v,
                    rolled_back_to=to_version,
                )
                for v in undone
                if self._manifests[v].facts
            ]
            # Outbox, then the marks, then CURRENT: a crash before CURRENT moves reverts the
            # marks and drops the records on open (_load_manifests), so the rollback did not
            # happen and nobody hears that it did.
            for record in records:
                self.outbox.put(record)
            for v in reversed(undone):
                m = self._manifests[v].replace(
                    state=VersionState.UNDONE,
                    undone=Undo(
                        at=at, reason=reason, to_version=to_version, from_version=self._current
                    ),
                )
                self._write_manifest(v, m)
                self._manifests[v] = m
            durable.write_bytes(self.root / "CURRENT", f"{to_version}\n".encode())
            log.warning("rolled back from version %d to %d: %s", self._current, to_version, reason)
            self._current = to_version
            self._delta_cache = None
            self._memory_cache = None
            return records

    def ingest(
        self, record: Version, factors: Mapping[str, torch.Tensor], base_sha256: Mapping[str, str]
    ) -> bool:
        """Keep a version another store made (the editor's, from the update log) under its own
        number and parent, without serving it; `follow` serves it.

        Refused with `UpdateRefused` (nothing written) unless the base is this store's, the
        parent is here, and base + the lineage's factors rebuild exactly the tensors whose
        sha256 the record names. Returns False when the same version is here already.
        """
        with self._lock:
            self._require_writable()
            v = record.version
            mine = self.base_sha256()
            if dict(base_sha256) != mine:
                differ = sorted(
                    n for n in set(mine) | set(base_sha256) if mine.get(n) != base_sha256.get(n)
                )
                raise UpdateRefused(
                    f"version {v} was made on another base model (or other edited modules): "
                    f"{differ[:3]} differ; run the replica with the editor's model and layers"
                )
            if v in self._manifests:
                here = self._manifests[v]
                if here.parent == record.parent and here.sha256 == record.sha256:
                    return False
                raise UpdateRefused(
                    f"version {v} conflicts with the version {v} already here (parent "
                    f"{here.parent}, not {record.parent}): the log belongs to another editor"
                )
            if v <= 0 or record.parent is None or record.parent not in self._manifests:
                raise UpdateRefused(
                    f"version {v} builds on version {record.parent}, which never arrived"
                )
            # The editor keeps the keys: zero-width here, checked like a commit's update.
            layers = {
                name: LayerUpdate(
                    left=factors[f"{name}.left"],
                    right=factors[f"{name}.right"],
                    keys=torch.zeros(factors[f"{name}.right"].shape[-1], 0),
                    replaces=_replaces(record.modules, name),
                )
                for name in sorted(record.modules)
            }
            try:
                gate = _wire_gate(record, factors)
                tensors, modules, gate_record = self._check_update(
                    EditUpdate(layers=layers, gate=gate)
                )
                new, memory, sha = self._next_state(v, record.parent, tensors, modules, gate_record)
            except (StoreMismatch, ValueError) as exc:
                raise UpdateRefused(
                    f"version {v}: {exc}; run the replica with the editor's model and layers"
                ) from exc
            if sha != dict(record.sha256):
                wrong = sorted(n for n in sha if sha[n] != record.sha256.get(n))
                raise UpdateRefused(
                    f"version {v} does not rebuild to the sha256 its record names ({wrong[:3]}): "
                    f"the record is corrupt"
                )
            # Usually served next: `_keep` holds D_v, so `follow` does not replay the lineage.
            self._keep(
                record.replace(state=VersionState.COMMITTED, undone=None), tensors, new, memory
            )
            return True

    def follow(self, target: int, reason: str | None, at: str | None = None) -> list[int]:
        """Make `target` (ingested, with its whole lineage) live, as the editor did; the live
        versions not in its lineage are marked undone with `reason`. Returns them."""
        with self._lock:
            self._require_writable()
            if target not in self._manifests:
                raise UpdateRefused(f"version {target} is served on the log but never arrived")
            keep = self.lineage(target)
            chain = self.lineage()
            undone = [v for v in chain if v not in keep]
            mark = Undo(
                at=at or now(),
                reason=reason or "rolled back on the editor",
                to_version=target,
                from_version=self._current,
            )
            for v in reversed(undone):
                m = self._manifests[v].replace(state=VersionState.UNDONE, undone=mark)
                self._write_manifest(v, m)
                self._manifests[v] = m
            for v in keep:
                # The editor never revives an undone version; this is the log replayed from an
                # earlier offset over this store (a lost position file), converging again.
                if self._manifests[v].state is VersionState.UNDONE:
                    m = self._manifests[v].replace(state=VersionState.COMMITTED, undone=None)
                    self._write_manifest(v, m)
                    self._manifests[v] = m
            durable.write_bytes(self.root / "CURRENT", f"{target}\n".encode())
            self._current = target
            if self._delta_cache is not None and self._delta_cache[0] != target:
                self._delta_cache = None
            return undone

    def reset_to_base(self) -> list[int]:
        """Forget every version after the base: a replica whose editor's log was taken over
        by another editor (consumers/updates.py) rebuilds that editor's lineage from here,
        under the same numbers. Returns the versions dropped.

        `CURRENT` moves to 0 first; a crash before the directories are gone leaves versions
        that a replayed takeover record drops again (open keeps undone ones, so they must go)."""
        with self._lock:
            self._require_writable()
            dropped = sorted(v for v in self._manifests if v > 0)
            durable.write_bytes(self.root / "CURRENT", b"0\n")
            self._current = 0
            for v in dropped:
                durable.remove(self._version_dir(v))
            if self._snapshots_dir.is_dir():
                for path in self._snapshots_dir.iterdir():
                    durable.remove(path)
                durable.fsync_dir(self._snapshots_dir)
            durable.fsync_dir(self._versions_dir)
            self._manifests = {0: self._manifests[0]}
            self._max_version = 0
            self._delta_cache = (0, {})
            self._memory_cache = (0, GatedMemory())
            if dropped:
                log.warning("dropped versions %s: back to the base", dropped)
            return dropped

    def _identity(self) -> str | None:
        # An older store gets its id on its first writable open; a reader only reads it.
        try:
            if self.readonly:
                return identity.read(self.root)
            return identity.ensure(self.root)
        except identity.IdentityError as exc:
            raise StoreCorrupt(str(exc)) from exc

    def record_scores(self, version: int, scores: Mapping[str, Any]) -> None:
        """Store an evaluation's scores in a version's manifest (atomically replaced)."""
        with self._lock:
            self._require_writable()
            if version not in self._manifests:
                raise VersionNotFound(f"no version {version} in the edit store at {self.root}")
            m = self._manifests[version].replace(scores=_jsonable(dict(scores)), scored=now())
            self._write_manifest(version, m)
            self._manifests[version] = m

    # ------------------------------------------------------------------ internals

    def _require_open(self) -> None:
        if not self._opened:
            raise StoreError("the edit store is not open")

    def _require_writable(self) -> None:
        self._require_open()
        if self.readonly:
            raise StoreError("the edit store was opened read-only")

    def _acquire(self) -> None:
        if self._lock_fd is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(
                f"the edit store at {self.root} is in use by another process (a running daemon?)"
            ) from None
        self._lock_fd = fd

    def _read_base_meta(self) -> dict[str, dict[str, Any]]:
        try:
            with safe_open(self._base_file, framework="pt") as f:
                meta = json.loads((f.metadata() or {})["modules"])
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
            raise StoreCorrupt(f"cannot read the base tensors {self._base_file}: {exc}") from exc
        return meta

    def _check_base(self, base: Mapping[str, torch.Tensor]) -> None:
        stored, given = set(self._base_meta), set(base)
        if stored != given:
            raise StoreMismatch(
                f"the store at {self.root} edits {sorted(stored)}, the model offers "
                f"{sorted(given)}; use the same edited layers or a new data dir"
            )
        for name, t in base.items():
            meta = self._base_meta[name]
            if list(t.shape) != meta["shape"] or _dtype_name(t.dtype) != meta["dtype"]:
                raise StoreMismatch(
                    f"{name}: the store holds {meta['dtype']}{meta['shape']}, the model "
                    f"{_dtype_name(t.dtype)}{list(t.shape)}; load the model with the same dtype"
                )
            if tensor_sha256(t) != meta["sha256"]:
                raise StoreMismatch(
                    f"{name}: the model's weight differs from the store's base; it is another "
                    f"checkpoint (or an already edited one): use a new data dir"
                )

    def _remove_temporaries(self) -> None:
        dirs = (
            self.root,
            self._versions_dir,
            self._snapshots_dir,
            self._base_file.parent,
            self._gates_dir,
        )
        for parent in (*dirs, self.outbox.root):
            if not parent.is_dir():
                continue
            subdirs = [p for p in parent.iterdir() if parent == self._versions_dir and p.is_dir()]
            for path in [*parent.iterdir(), *(f for d in subdirs for f in d.iterdir())]:
                if path.name.startswith(".tmp-"):
                    log.warning("removing %s left by an interrupted write", path)
                    durable.remove(path)

    def _load_manifests(self) -> None:
        try:
            current = int((self.root / "CURRENT").read_text().strip())
        except ValueError as exc:
            raise StoreCorrupt(f"{self.root / 'CURRENT'} does not hold a version: {exc}") from exc
        manifests: dict[int, Version] = {}
        for vdir in sorted(self._versions_dir.iterdir()):
            if not _VERSION_DIR.match(vdir.name):
                continue
            v = int(vdir.name)
            try:
                raw = json.loads((vdir / _MANIFEST_FILE).read_text(encoding="utf-8"))
                m = Version.from_manifest(raw)
                if m.version != v:
                    raise ValueError(f"manifest names version {m.version}")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self._discard(v, f"no valid manifest ({exc})")
                continue
            manifests[v] = m
            if raw.get("rejected_pending") and not self.readonly:
                self._migrate_pending(m)
        if current not in manifests:
            raise StoreCorrupt(f"CURRENT names version {current}, which has no valid manifest")
        live: set[int] = set()
        v: int | None = current
        while v is not None:
            if v not in manifests:
                raise StoreCorrupt(f"version {current} descends from missing version {v}")
            live.add(v)
            v = manifests[v].parent
        pending = self.outbox.ids()
        for v, m in sorted(manifests.items()):
            if v in live and not self.readonly and version_record_id(v) in pending:
                # A rollback queued its facts but crashed before moving CURRENT: the rollback
                # did not happen, and nobody may be told it did.
                log.warning("version %d: dropping the rejections of an interrupted rollback", v)
                self.outbox.done(version_record_id(v))
            if v in live and m.state is VersionState.UNDONE:
                m = m.replace(state=VersionState.COMMITTED, undone=None)
                if not self.readonly:
                    log.warning("version %d: reverting an interrupted rollback", v)
                    self._write_manifest(v, m)
                manifests[v] = m
            elif v not in live and m.state is not VersionState.UNDONE:
                # Written but never made live: the commit was interrupted before CURRENT moved.
                del manifests[v]
                self._discard(v, "its commit did not complete")
        self._manifests, self._current = manifests, current
        # A discarded version never was live, so its number may be given again.
        self._max_version = max(manifests)

    def _migrate_pending(self, m: Version) -> None:
        # Format 1 flagged unpublished rejections in the manifest; the outbox holds them now.
        if m.undone is None or version_record_id(m.version) in self.outbox.ids():
            return
        self.outbox.put(
            Rejected(
                id=version_record_id(m.version),
                kind="rolled_back",
                reason=m.undone.reason,
                facts=m.facts,
                created=m.undone.at,
                version=m.version,
                rolled_back_to=m.undone.to_version,
            )
        )
        self._write_manifest(m.version, m)

    def _discard(self, version: int, why: str) -> None:
        if self.readonly:
            return
        log.warning("removing version %d: %s", version, why)
        durable.remove(self._version_dir(version))
        durable.remove(self._snapshot_file(version))
        durable.fsync_dir(self._versions_dir)

    def _check_update(
        self, update: EditUpdate
    ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]], dict[str, Any] | None]:
        tensors: dict[str, torch.Tensor] = {}
        modules: dict[str, dict[str, Any]] = {}
        for name, layer in sorted(update.layers.items()):
            if name not in self._base_meta:
                raise StoreMismatch(
                    f"the update edits {name}, which is not among the store's modules "
                    f"{sorted(self._base_meta)}"
                )
            d_out, d_in = self._base_meta[name]["shape"]
            left, right, keys = (_f32(x) for x in (layer.left, layer.right, layer.keys))
            if (
                left.dim() != 2
                or right.dim() != 2
                or keys.dim() != 2
                or left.shape[0] != d_out
                or right.shape[1] != d_in
                or left.shape[1] != right.shape[0]
                or keys.shape[0] != d_in
            ):
                raise ValueError(
                    f"{name}: left {tuple(left.shape)}, right {tuple(right.shape)}, keys "
                    f"{tuple(keys.shape)} do not fit a ({d_out}, {d_in}) weight"
                )
            for part, t in (("left", left), ("right", right), ("keys", keys)):
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{name}.{part} holds NaN or infinite values")
                tensors[f"{name}.{part}"] = t
            modules[name] = {"rank": left.shape[1], "keys": keys.shape[1]}
            if layer.replaces:
                modules[name]["replaces"] = True
        gate = update.gate
        if gate is None:
            return tensors, modules, None
        if any(layer.replaces for layer in update.layers.values()):
            raise ValueError("a gated version cannot replace the accumulated update")
        if gate.module not in self._base_meta:
            raise StoreMismatch(f"the gate reads {gate.module}, not one of the store's modules")
        d_in = self._base_meta[gate.module]["shape"][1]
        proj, gkeys = _f32(gate.projection), _f32(gate.keys)
        if proj.dim() != 2 or proj.shape[0] != d_in or gkeys.dim() != 2:
            raise ValueError(
                f"gate projection {tuple(proj.shape)} does not read a {d_in}-wide input"
            )
        if gkeys.shape[1] != proj.shape[1]:
            raise ValueError(
                f"gate keys {tuple(gkeys.shape)} do not fit projection {tuple(proj.shape)}"
            )
        if not (bool(torch.isfinite(proj).all()) and bool(torch.isfinite(gkeys).all())):
            raise ValueError("the gate holds NaN or infinite values")
        if not 0.0 < float(gate.threshold) <= 1.0:
            raise ValueError(f"gate threshold {gate.threshold} is not in (0, 1]")
        tensors[PROJECTION] = proj
        tensors[GATE_KEYS] = gkeys
        return tensors, modules, {**gate.record(), "projection": projection_digest(proj)}

    def _next_state(
        self,
        version: int,
        parent: int,
        tensors: Mapping[str, torch.Tensor],
        modules: Mapping[str, dict[str, Any]],
        gate: Mapping[str, Any] | None,
    ) -> tuple[dict[str, torch.Tensor], GatedMemory, dict[str, str]]:
        """D_v, the gated memory and the sha256 record of a new version on top of `parent`.

        One lineage serves one form: a gated version on a weight-form lineage (or the other
        way round) is refused, so the weights a lineage serves never depend on its gates.
        """
        form = self.served_form(parent)
        if form is not None and form != ("gated" if gate else "weights"):
            have = "a gated memory" if form == "gated" else "plain weights"
            raise StoreMismatch(
                f"version {version} is {'gated' if gate else 'a plain-weight update'}, but this "
                f"store's lineage serves {have}: start a new data dir to change editing.memory"
            )
        previous = self.deltas(parent)
        memory = self.memory(parent)
        if gate is None:
            new = dict(previous)
            for name in sorted(modules):
                new[name] = _advance(
                    previous, name, tensors[f"{name}.left"], tensors[f"{name}.right"], modules
                )
        else:
            new = previous
            # One projection object per digest, so blocks share it (and its digest).
            shared = dict(tensors)
            shared[PROJECTION] = self._projections.get(gate["projection"], tensors[PROJECTION])
            block = _block_of(version, shared, modules, gate)
            memory = GatedMemory((*memory.blocks, block))
        return new, memory, self._served_sha256(new, memory)

    def _served_sha256(
        self, deltas: Mapping[str, torch.Tensor], memory: GatedMemory | None = None
    ) -> dict[str, str]:
        """sha256 of every edited tensor served as base + `deltas`, and of the gated memory
        where there is one (what a manifest records)."""
        out = {
            name: tensor_sha256(served_weight(t, deltas[name]) if name in deltas else t)
            for name, t in sorted(self.base().items())
        }
        if memory is not None and memory.blocks:
            out[MEMORY_SHA256] = memory.fingerprint()
        return out

    def _block(self, version: int) -> Block:
        update = self._read_update(version, parts=("left", "right", *_GATE_PARTS))
        tensors = {f"{n}.{p}": t for p, by in update.items() for n, t in by.items()}
        m = self._manifests[version]
        assert m.gate is not None
        tensors[PROJECTION] = self._projection(m.gate, tensors.get(PROJECTION))
        return _block_of(version, tensors, m.modules, m.gate)

    def _projection(self, gate: Mapping[str, Any], inline: torch.Tensor | None) -> torch.Tensor:
        """A gated version's projection: one copy per store (`gates/<digest>`), shared by
        every version that uses it, in memory too."""
        digest = gate.get("projection")
        if digest is None:  # written before projections had files of their own
            assert inline is not None
            return self._projections.setdefault(projection_digest(inline), inline)
        if digest not in self._projections:
            path = self._gates_dir / f"{digest}.safetensors"
            try:
                with safe_open(path, framework="pt") as f:
                    self._projections[digest] = f.get_tensor("projection")
            except OSError as exc:
                raise StoreCorrupt(f"cannot read the gate projection {path}: {exc}") from exc
        return self._projections[digest]

    def _keep_projection(self, digest: str, projection: torch.Tensor) -> None:
        path = self._gates_dir / f"{digest}.safetensors"
        if not path.is_file():
            _write_safetensors(path, {"projection": projection.contiguous()}, {"format": "1"})
        self._projections.setdefault(digest, projection)

    def _keep(
        self,
        manifest: Version,
        tensors: dict[str, torch.Tensor],
        deltas: dict[str, torch.Tensor],
        memory: GatedMemory | None = None,
    ) -> None:
        """Write a version durably (not yet live) and remember its D_v; snapshot on schedule."""
        v = manifest.version
        if manifest.gate is not None and PROJECTION in tensors:
            # Before the version that needs it; a crash in between leaves a spare file.
            self._keep_projection(manifest.gate["projection"], tensors[PROJECTION])
            tensors = {k: t for k, t in tensors.items() if k != PROJECTION}
        self._write_version_dir(v, manifest, update=tensors)
        self._manifests[v] = manifest
        self._max_version = max(self._max_version, v)
        self._delta_cache = (v, deltas)
        if memory is not None:
            self._memory_cache = (v, memory)
        if (len(self.lineage(v)) - 1) % self.snapshot_every == 0:
            self._write_snapshot(v, deltas)

    def _write_version_dir(
        self, version: int, manifest: Version, update: dict[str, torch.Tensor] | None
    ) -> None:
        self._versions_dir.mkdir(parents=True, exist_ok=True)
        final = self._version_dir(version)
        if final.exists():
            raise StoreCorrupt(f"{final} exists but is not a known version")
        tmp = self._versions_dir / f".tmp-{version:06d}-{os.getpid()}"
        durable.remove(tmp)
        tmp.mkdir()
        try:
            if update is not None:
                _save_file(update, tmp / _UPDATE_FILE, {"format": str(FORMAT)})
                durable.fsync_file(tmp / _UPDATE_FILE)
            durable.write_plain(tmp / _MANIFEST_FILE, _dump(manifest.to_manifest()))
            durable.fsync_dir(tmp)
        except BaseException:
            # A full disk, most likely: give the space back now rather than at the next open.
            durable.remove(tmp)
            raise
        os.replace(tmp, final)
        durable.fsync_dir(self._versions_dir)

    def _write_manifest(self, version: int, manifest: Version) -> None:
        durable.write_bytes(
            self._version_dir(version) / _MANIFEST_FILE, _dump(manifest.to_manifest())
        )

    def _read_update(
        self, version: int, parts: Sequence[str]
    ) -> dict[str, dict[str, torch.Tensor]]:
        path = self._version_dir(version) / _UPDATE_FILE
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

    def _write_snapshot(self, version: int, deltas: dict[str, torch.Tensor]) -> None:
        # An optimisation (bounds replay on open), so a failure is logged, not raised: the
        # version itself is already durable.
        try:
            self._snapshots_dir.mkdir(parents=True, exist_ok=True)
            meta = {
                "format": str(FORMAT),
                "version": str(version),
                "parent": str(self._manifests[version].parent),
            }
            _write_safetensors(
                self._snapshot_file(version), {n: d.contiguous() for n, d in deltas.items()}, meta
            )
        except OSError:
            log.exception("could not write the snapshot of version %d", version)

    def _read_snapshot(self, version: int) -> dict[str, torch.Tensor] | None:
        path = self._snapshot_file(version)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("version") != str(version) or meta.get("parent") != str(
                    self._manifests[version].parent
                ):
                    log.warning("ignoring snapshot %s: it belongs to another version", path)
                    return None
                return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        except OSError as exc:
            log.warning("ignoring unreadable snapshot %s: %s", path, exc)
            return None


_GATE_PARTS = tuple(n.rpartition(".")[2] for n in (PROJECTION, GATE_KEYS))


def _block_of(
    version: int,
    tensors: Mapping[str, torch.Tensor],
    modules: Mapping[str, Any],
    gate: Mapping[str, Any],
) -> Block:
    return Block(
        version=version,
        layers={n: (tensors[f"{n}.left"], tensors[f"{n}.right"]) for n in sorted(modules)},
        gate=Gate(
            module=str(gate["module"]),
            threshold=float(gate["threshold"]),
            projection=tensors[PROJECTION],
            keys=tensors[GATE_KEYS],
        ),
    )


def _wire_gate(record: Version, factors: Mapping[str, torch.Tensor]) -> Gate | None:
    """The gate a version record from the update log carries, or None for the weight form."""
    if record.gate is None:
        return None
    if PROJECTION not in factors or GATE_KEYS not in factors:
        raise ValueError("a gated version without its gate tensors")
    return Gate(
        module=str(record.gate["module"]),
        threshold=float(record.gate["threshold"]),
        projection=factors[PROJECTION],
        keys=factors[GATE_KEYS],
    )


def _replaces(modules: Mapping[str, Mapping[str, Any]], name: str) -> bool:
    """Whether a version's update of `name` is the whole accumulated update (a consolidation)."""
    return bool(modules.get(name, {}).get("replaces", False))


def _advance(
    previous: Mapping[str, torch.Tensor],
    name: str,
    left: torch.Tensor,
    right: torch.Tensor,
    modules: Mapping[str, Mapping[str, Any]],
) -> torch.Tensor:
    """D_v of module `name`: D_{v-1} + left @ right, or left @ right where the version replaces."""
    before = None if _replaces(modules, name) else previous.get(name)
    return accumulate(before, left, right)


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    durable.write_with(path, lambda tmp: _save_file(tensors, tmp, meta))


def _save_file(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
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


# ---------------------------------------------------------------------- values


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous()


def _fact_dict(fact: Mapping[str, Any] | Any) -> dict[str, Any]:
    if hasattr(fact, "model_dump"):
        fact = fact.model_dump(mode="json")
    if not isinstance(fact, Mapping) or not fact.get("id"):
        raise ValueError(f"a fact must be a mapping with an id, got {fact!r:.200}")
    return _jsonable(dict(fact))


def _offset_dict(offsets: Mapping[Any, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, offset in offsets.items():
        if isinstance(key, str):
            name = key
        elif isinstance(key, tuple) and len(key) == 2:
            name = f"{key[0]}/{key[1]}"
        elif hasattr(key, "topic") and hasattr(key, "partition"):
            name = f"{key.topic}/{key.partition}"
        else:
            raise ValueError(f"cannot name the partition {key!r}")
        out[name] = int(offset)
    return out


def _jsonable(value: Any) -> Any:
    """Diagnostics come from the math: tensors, numpy scalars, NaN. Make them strict JSON."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return _jsonable(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if hasattr(value, "item"):  # numpy scalars
        return _jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a manifest")

"""The versioned edit store: every batch a durable version, every version restorable bit for bit.

`EditStore` is the one owner of a store directory; everyone (the daemon through
`editd.versions.VersionedModel`, `editd versions`/`rollback`, exports, replicas) goes
through it. It keeps the versions' records and the live version, and changes them in four
ways: the editor's `commit` and `rollback`, the replica's `ingest` and `follow` (plus
`reset_to_base` after a takeover). The jobs beneath it have one module each:

    layout.py     where each file lives and how it is read and written (durable.py)
    recovery.py   what open makes of a store a crash interrupted
    state.py      D_v = D_{v−1} + left @ right, and a version's fingerprint (sha256)
    gates.py      the gated form's tensors, records and per-store projections
    outbox.py     facts never to be served, until published
    version.py    the typed manifest record; values.py: its plain JSON values
    errors.py     what the store refuses, by reason

The set of edited modules is fixed when the store is created: every manifest then fingerprints
the same tensors, so any two versions compare. A daemon restarted with other layers, another
model or another dtype is refused with a `StoreMismatch` naming the difference (start a new data
dir for it) rather than silently mixing two bases.

Every change of the live version writes what it needs first and replaces `CURRENT` last (the
commit point); recovery.py says what a crash at any step leaves. docs/design.md, "Versions and
exact rollback", has the whole design.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from editd.lowrank import EditUpdate, LayerUpdate, served_weight, tensor_sha256
from editd.memory import PROJECTION, Block, GatedMemory
from editd.store import identity, recovery
from editd.store.errors import (
    RestoreFailed,
    StoreCorrupt,
    StoreError,
    StoreLocked,
    StoreMismatch,
    StoreNotFound,
    UpdateRefused,
    VersionNotFound,
)
from editd.store.gates import GATE_PARTS, Projections, block_of, check_gate, wire_gate
from editd.store.layout import Layout
from editd.store.outbox import Outbox, Rejected, rolled_back, version_record_id
from editd.store.state import (
    advance,
    check_layers,
    mismatched,
    replaces,
    served_sha256,
)
from editd.store.values import dtype_name, fact_dict, jsonable, offset_dict
from editd.store.version import Undo, Version, VersionState, now

__all__ = [
    "EditStore",
    "RestoreFailed",
    "StoreCorrupt",
    "StoreError",
    "StoreLocked",
    "StoreMismatch",
    "StoreNotFound",
    "UpdateRefused",
    "VersionNotFound",
]

log = logging.getLogger(__name__)


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
    flock); readers (`editd versions`) open with `readonly=True`. Methods are thread-safe.
    """

    def __init__(
        self, data_dir: str | os.PathLike[str], snapshot_every: int = 10, *, readonly: bool = False
    ) -> None:
        if snapshot_every <= 0:
            raise ValueError("snapshot_every must be positive")
        self.root = Path(data_dir)
        self.snapshot_every = snapshot_every
        self.readonly = readonly
        self._files = Layout(self.root)
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
        self._projections = Projections(self._files)

    # ------------------------------------------------------------------ lifecycle

    def exists(self) -> bool:
        return self._files.exists()

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
                    "dtype": dtype_name(t.dtype),
                    "sha256": tensor_sha256(t),
                }
                for name, t in sorted(tensors.items())
            }
            self._files.write_base(tensors, meta)
            manifest = Version(
                version=0,
                parent=None,
                created=now(),
                sha256={name: m["sha256"] for name, m in meta.items()},
            )
            self._files.write_version(0, manifest, update=None)
            self.store_id = identity.ensure(self.root)
            self._files.write_current(0)
            self._opened = True
            self._base, self._base_meta = tensors, meta
            self._current, self._max_version = 0, 0
            self._manifests = {0: manifest}
            self._delta_cache = (0, {})
            log.info("created edit store at %s for %d tensors", self.root, len(tensors))

    def open(self, base: Mapping[str, torch.Tensor] | None = None) -> None:
        """Open an existing store, recover from an interrupted commit or rollback
        (recovery.py), and, when `base` is given, check that it is exactly the store's base
        (names, dtypes, bits)."""
        with self._lock:
            if not self.exists():
                raise StoreNotFound(f"no edit store at {self.root}")
            try:
                if not self.readonly:
                    self._acquire()
                self._base_meta = self._files.read_base_meta()
                # Checked before recovery touches anything: a wrong data dir stays as it was.
                if base is not None:
                    self._check_base(base)
                if not self.readonly:
                    recovery.sweep(self._files, self.outbox)
                self.store_id = self._identity()
                self._base = None
                self._manifests, self._current = recovery.load(
                    self._files, self.outbox, readonly=self.readonly
                )
                # A discarded version never was live, so its number may be given again.
                self._max_version = max(self._manifests)
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
                Layout.unlock(self._lock_fd)
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
        """The fingerprint `version`'s manifest records: sha256 of every edited tensor as
        served, and of the gated memory where there is one."""
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
                out.append((v, self._files.read_update(v, parts=("keys",))["keys"]))
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
                    snap = self._files.read_snapshot(u, self._manifests[u].parent)
                    if snap is not None:
                        start, acc = u, snap
                        break
            for u in chain[chain.index(start) + 1 :]:
                if self._manifests[u].gate is not None:
                    continue  # served through the gate, not by the weights
                update = self._files.read_update(u, parts=("left", "right"))
                acc = advance(acc, update["left"], update["right"], self._manifests[u].modules)
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
                update = self._files.read_update(v, parts=("left", "right"))
                modules = self._manifests[v].modules
                for name in sorted(update["left"]):
                    if replaces(modules, name):
                        out[name] = []  # the versions before it no longer add up
                    out.setdefault(name, []).append((update["left"][name], update["right"][name]))
            return out

    def version_factors(self, version: int) -> dict[str, torch.Tensor]:
        """One version's own float32 factors, `<module>.left|right`, and a gated version's
        gate tensors: what the update log carries."""
        with self._lock:
            self.version(version)
            if version == 0:
                return {}
            parts = ("left", "right", *GATE_PARTS)
            update = self._files.read_update(version, parts=parts)
            out = {
                f"{name}.{part}": update[part][name]
                for part in parts
                for name in sorted(update[part])
            }
            gate = self._manifests[version].gate
            if gate is not None:
                # The log carries the projection with every version: a replica may start
                # from any of them.
                out[PROJECTION] = self._projections.of(gate, out.get(PROJECTION))
            return out

    def base(self) -> dict[str, torch.Tensor]:
        """The base tensors (CPU, exact dtype). Treat as read-only."""
        with self._lock:
            self._require_open()
            if self._base is None:
                self._base = self._files.read_base(list(self._base_meta))
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

    def fingerprint(self, version: int | None = None) -> dict[str, str]:
        """The fingerprint of `version` rebuilt from disk: the sha256 of every edited tensor
        as it serves them and, for the gated form, of its memory (`state.served_sha256`)."""
        with self._lock:
            deltas, memory = self.served_state(version)
            return served_sha256(self.base(), deltas, memory)

    def check_served(self, version: int, served: Mapping[str, str], what: str) -> None:
        """Raise `RestoreFailed` unless `served` (a fingerprint of what is served as
        `version`) is the one its manifest records. Every restore, rollback and follow ends
        here: the model handle's fingerprint on a live daemon (`VersionedModel`), the store's
        own rebuild on a stopped one (`editd rollback`)."""
        wrong = mismatched(self.expected_sha256(version), served)
        if wrong:
            raise RestoreFailed(f"{what} serves weights that differ from its manifest in {wrong}")

    def verify(self, version: int | None = None) -> list[str]:
        """Rebuild `version` from disk; the names whose sha256 differ from its manifest (the
        gated memory's included)."""
        with self._lock:
            v = self.current if version is None else version
            return mismatched(self.expected_sha256(v), self.fingerprint(v))

    # ------------------------------------------------------------------ the editor's changes

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
            fact_dicts = [fact_dict(f) for f in facts]
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
                offsets=offset_dict(offsets),
                timings=jsonable(dict(timings or {})),
                diagnostics=jsonable({**update.diagnostics, **(diagnostics or {})}),
                modules=modules,
                sha256=sha,
                gate=gate,
            )
            self._keep(manifest, tensors, new, memory)
            self._move_current(version)
            return manifest

    def rollback(self, to_version: int, reason: str) -> list[Rejected]:
        """Make `to_version` (an ancestor of the live version) live again.

        The versions after it are kept on disk, marked undone with `reason`; their facts go to
        the outbox first (one record per version, oldest first, returned), so by the time the
        rollback is live nothing it undid can be lost. The one rollback of a store: the
        daemon's (`VersionedModel.rollback`, which then serves and checks it) and the stopped
        store's (`editd rollback`, which checks the store's rebuild) both come here.
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
            mark = Undo(at=now(), reason=reason, to_version=to_version, from_version=self._current)
            records = [
                rolled_back(self._manifests[v].marked(mark))
                for v in undone
                if self._manifests[v].facts
            ]
            # Outbox, then the marks, then CURRENT: a crash before CURRENT moves reverts the
            # marks and drops the records on open (recovery.py), so the rollback did not
            # happen and nobody hears that it did.
            for record in records:
                self.outbox.put(record)
            self._mark(reversed(undone), mark)
            log.warning("rolled back from version %d to %d: %s", self._current, to_version, reason)
            self._move_current(to_version)
            self._delta_cache = None
            self._memory_cache = None
            return records

    def record_scores(self, version: int, scores: Mapping[str, Any]) -> None:
        """Store an evaluation's scores in a version's manifest (atomically replaced)."""
        with self._lock:
            self._require_writable()
            if version not in self._manifests:
                raise VersionNotFound(f"no version {version} in the edit store at {self.root}")
            m = self._manifests[version].replace(scores=jsonable(dict(scores)), scored=now())
            self._files.write_manifest(m)
            self._manifests[version] = m

    # ------------------------------------------------------------------ a replica's changes

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
                    replaces=replaces(record.modules, name),
                )
                for name in sorted(record.modules)
            }
            try:
                gate = wire_gate(record.gate, factors)
                tensors, modules, gate_record = self._check_update(
                    EditUpdate(layers=layers, gate=gate)
                )
                new, memory, sha = self._next_state(v, record.parent, tensors, modules, gate_record)
            except (StoreMismatch, ValueError) as exc:
                raise UpdateRefused(
                    f"version {v}: {exc}; run the replica with the editor's model and layers"
                ) from exc
            if sha != dict(record.sha256):
                wrong = mismatched(sha, record.sha256)
                raise UpdateRefused(
                    f"version {v} does not rebuild to the sha256 its record names ({wrong[:3]}): "
                    f"the record is corrupt"
                )
            # Usually served next: `_keep` holds D_v, so `follow` does not replay the lineage.
            self._keep(record.marked(None), tensors, new, memory)
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
            self._mark(reversed(undone), mark)
            # The editor never revives an undone version; this is the log replayed from an
            # earlier offset over this store (a lost position file), converging again.
            self._mark([v for v in keep if self._manifests[v].state is VersionState.UNDONE], None)
            self._move_current(target)
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
            self._move_current(0)
            self._files.remove_versions(dropped)
            self._manifests = {0: self._manifests[0]}
            self._max_version = 0
            self._delta_cache = (0, {})
            self._memory_cache = (0, GatedMemory())
            if dropped:
                log.warning("dropped versions %s: back to the base", dropped)
            return dropped

    # ------------------------------------------------------------------ steps written once

    def _check_update(
        self, update: EditUpdate
    ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]], dict[str, Any] | None]:
        """A commit's or an ingest's update as a version keeps it: its tensors, its manifest's
        `modules` record and its `gate` record (None for the weight form)."""
        tensors, modules = check_layers(update, self._base_meta)
        if update.gate is None:
            return tensors, modules, None
        if any(layer.replaces for layer in update.layers.values()):
            raise ValueError("a gated version cannot replace the accumulated update")
        gate_tensors, gate = check_gate(update.gate, self._base_meta)
        return {**tensors, **gate_tensors}, modules, gate

    def _next_state(
        self,
        version: int,
        parent: int,
        tensors: Mapping[str, torch.Tensor],
        modules: Mapping[str, dict[str, Any]],
        gate: Mapping[str, Any] | None,
    ) -> tuple[dict[str, torch.Tensor], GatedMemory, dict[str, str]]:
        """D_v, the gated memory and the fingerprint of a new version on top of `parent`: the
        editor's commit records it, a replica's ingest checks the editor's record against it.

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
            lefts = {n: tensors[f"{n}.left"] for n in modules}
            rights = {n: tensors[f"{n}.right"] for n in modules}
            new = advance(previous, lefts, rights, modules)
        else:
            new = previous
            # One projection object per digest, so blocks share it (and its digest).
            shared = dict(tensors)
            shared[PROJECTION] = self._projections.shared(gate["projection"], tensors[PROJECTION])
            memory = GatedMemory((*memory.blocks, block_of(version, shared, modules, gate)))
        return new, memory, served_sha256(self.base(), new, memory)

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
            self._projections.keep(manifest.gate["projection"], tensors[PROJECTION])
            tensors = {k: t for k, t in tensors.items() if k != PROJECTION}
        self._files.write_version(v, manifest, update=tensors)
        self._manifests[v] = manifest
        self._max_version = max(self._max_version, v)
        self._delta_cache = (v, deltas)
        if memory is not None:
            self._memory_cache = (v, memory)
        if (len(self.lineage(v)) - 1) % self.snapshot_every == 0:
            self._files.write_snapshot(v, manifest.parent, deltas)

    def _mark(self, versions: Iterable[int], undo: Undo | None) -> None:
        """Mark `versions` undone by `undo` (a rollback, a followed one), or committed again
        (None), manifest by manifest in the order given."""
        for v in versions:
            m = self._manifests[v].marked(undo)
            self._files.write_manifest(m)
            self._manifests[v] = m

    def _move_current(self, version: int) -> None:
        """The commit point of every change of the live version."""
        self._files.write_current(version)
        self._current = version

    def _block(self, version: int) -> Block:
        """A kept gated version's block, read from its update file and projection."""
        update = self._files.read_update(version, parts=("left", "right", *GATE_PARTS))
        tensors = {f"{n}.{p}": t for p, by in update.items() for n, t in by.items()}
        m = self._manifests[version]
        assert m.gate is not None
        tensors[PROJECTION] = self._projections.of(m.gate, tensors.get(PROJECTION))
        return block_of(version, tensors, m.modules, m.gate)

    # ------------------------------------------------------------------ internals

    def _identity(self) -> str | None:
        # An older store gets its id on its first writable open; a reader only reads it.
        try:
            if self.readonly:
                return identity.read(self.root)
            return identity.ensure(self.root)
        except identity.IdentityError as exc:
            raise StoreCorrupt(str(exc)) from exc

    def _require_open(self) -> None:
        if not self._opened:
            raise StoreError("the edit store is not open")

    def _require_writable(self) -> None:
        self._require_open()
        if self.readonly:
            raise StoreError("the edit store was opened read-only")

    def _acquire(self) -> None:
        if self._lock_fd is None:
            self._lock_fd = self._files.lock()

    def _check_base(self, base: Mapping[str, torch.Tensor]) -> None:
        stored, given = set(self._base_meta), set(base)
        if stored != given:
            raise StoreMismatch(
                f"the store at {self.root} edits {sorted(stored)}, the model offers "
                f"{sorted(given)}; use the same edited layers or a new data dir"
            )
        for name, t in base.items():
            meta = self._base_meta[name]
            if list(t.shape) != meta["shape"] or dtype_name(t.dtype) != meta["dtype"]:
                raise StoreMismatch(
                    f"{name}: the store holds {meta['dtype']}{meta['shape']}, the model "
                    f"{dtype_name(t.dtype)}{list(t.shape)}; load the model with the same dtype"
                )
            if tensor_sha256(t) != meta["sha256"]:
                raise StoreMismatch(
                    f"{name}: the model's weight differs from the store's base; it is another "
                    f"checkpoint (or an already edited one): use a new data dir"
                )

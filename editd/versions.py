"""The one owner of what is served: the model handle, the edit store and the editor's preservation.

Every promise editd makes about versions (each fact applied once, a request sees a whole
version or none, rollback is bit-exact, nothing is lost) holds only if three things change
together: the store's live version, the weights the handle serves, and the keys the editor
preserves in later batches. `VersionedModel` is the only code that changes them:

- `apply(update, facts)`: commit the version durably, swap the served weights to the store's
  `deltas()` under the handle's write lock (the version number changes under the same lock),
  then preserve the batch's keys; in that order, so a crash at any point leaves a served
  version that exists on disk and a replay that the store's fact ids turn into a no-op;
- `rollback(to, reason)`: queue the undone facts in the outbox, move the store, swap, and
  rebuild preservation from the versions that remain;
- `reject(facts, reason)`: facts that will never be applied go to the same outbox;
- `open()` / `restore()`: serve the store's CURRENT, verify every tensor's sha256 against its
  manifest, and rebuild preservation.

The daemon, `editd bench edit`, `editd bench speed`, the study and the quality tests all edit
through it (benchmarks on a temporary store), so what is measured is what is served. Version
changes are serialised by `changing()`; callers hold it across computing an update and
applying it, so an update is never applied on top of a version it was not computed on.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from editd.editing.capacity import layer_capacity
from editd.editing.editor import Editor
from editd.editing.model import ModelHandle
from editd.facts import FactUpdate
from editd.lowrank import EditUpdate
from editd.store.errors import RestoreFailed as RestoreFailed  # raised by restore and rollback
from editd.store.errors import StoreMismatch, UpdateRefused
from editd.store.outbox import Rejected, batch_record_id
from editd.store.state import fingerprint
from editd.store.store import EditStore
from editd.store.version import Version, now
from editd.store.wire import Current

log = logging.getLogger(__name__)


class Busy(RuntimeError):
    """Another version change is in progress."""


@dataclass(frozen=True)
class Applied:
    """A version that is durable and served."""

    version: Version
    seconds: dict[str, float] = field(default_factory=dict)  # "store", "apply"
    pause: float = 0.0  # seconds readers waited on the swap


@dataclass(frozen=True)
class RolledBack:
    from_version: int
    to_version: int
    rejected: tuple[Rejected, ...]

    @property
    def facts(self) -> int:
        return sum(len(r.facts) for r in self.rejected)


class VersionedModel:
    def __init__(
        self,
        handle: ModelHandle,
        store: EditStore,
        editor: Editor | None = None,
        *,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self.handle = handle
        self.store = store
        self.editor = editor
        # Called with the new version number under the write lock, with the swap itself.
        self.on_change = on_change
        self._version = 0
        self._changing = threading.RLock()
        self._temporary: Path | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        handle: ModelHandle,
        data_dir: str | Path,
        *,
        editor: Editor | None = None,
        modules: Sequence[str] | None = None,
        snapshot_every: int = 10,
        on_change: Callable[[int], None] | None = None,
    ) -> VersionedModel:
        """Open (or create) the store at `data_dir` for the unedited `handle` and serve CURRENT.

        The edited modules are the editor's, or `modules` for a model that is served but not
        edited here. Raises the store's errors (`StoreLocked`, `StoreMismatch`, ...) and
        `RestoreFailed`.
        """
        names = list(editor.modules if editor is not None else modules or [])
        if not names:
            raise ValueError("a versioned model needs an editor or the names of edited modules")
        base = {name: handle.weight(name).detach().cpu().clone() for name in names}
        store = EditStore(data_dir, snapshot_every=snapshot_every)
        store.open_or_create(base)
        model = cls(handle, store, editor, on_change=on_change)
        try:
            model._check_form()
            model.restore()
        except BaseException:
            store.close()
            raise
        return model

    @classmethod
    @contextlib.contextmanager
    def temporary(
        cls, handle: ModelHandle, editor: Editor, *, snapshot_every: int = 10
    ) -> Iterator[VersionedModel]:
        """A versioned model on a throw-away store, for benchmarks and tests: the same apply
        path as the daemon's (durable commit, sha256, swap, preservation). On exit the handle
        serves its base again, the editor preserves nothing, and the store is deleted."""
        root = Path(tempfile.mkdtemp(prefix="editd-versions-"))
        try:
            model = cls.open(handle, root, editor=editor, snapshot_every=snapshot_every)
            try:
                yield model
            finally:
                model.close()
                handle.reset()
                editor.reset_to([])
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def close(self) -> None:
        self.store.close()

    def restore(self) -> int:
        """Serve the store's CURRENT, check it bit for bit, and rebuild preservation."""
        with self._changing:
            current = self.store.current
            self._serve(current, f"version {current} rebuilt from {self.store.root}")
            self._preserve_lineage()
            log.info("serving version %d", current)
            return current

    # -- reading ------------------------------------------------------------------------------

    @property
    def current(self) -> int:
        """The version being served."""
        return self._version

    @contextlib.contextmanager
    def reading(self) -> Iterator[int]:
        """Hold the served weights still; yields the version they are."""
        with self.handle.reading():
            yield self._version

    def served_sha256(self) -> dict[str, str]:
        """sha256 of every edited tensor as served now, and of the gated memory where one is
        served, to compare with the manifests."""
        return fingerprint(
            self.handle.weight_sha256(self.store.module_names), self.handle.memory_sha256()
        )

    def versions(self) -> list[dict[str, Any]]:
        return self.store.listing()

    def version(self, number: int | None = None) -> Version:
        return self.store.version(number)

    def lineage(self) -> list[int]:
        return self.store.lineage()

    def capacity(self, c0: Mapping[str, torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
        """How far the served version has moved each edited module (editing.capacity).

        The version lock is held only to take the served deltas (the store's D_v, a fresh
        dict); the norms are computed after it is released. Taking the lock waits for an edit
        in progress, so the daemon calls this from the thread that changed the version, never
        when `/metrics` is scraped (Serving.refresh_capacity)."""
        with self._changing:
            deltas, base = self.store.deltas(), self.store.base()
        return layer_capacity(deltas, base, c0)

    def applied_fact_ids(self) -> set[str]:
        return self.store.applied_fact_ids()

    def live_facts(self) -> list[tuple[int, list[dict[str, Any]]]]:
        """(version, facts) of every version in the live lineage after the base, oldest first."""
        return [(v, list(self.store.version(v).facts)) for v in self.store.lineage()[1:]]

    # -- changing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def changing(self, timeout: float | None = None) -> Iterator[int]:
        """Hold off every other version change; yields the current version.

        Raises `Busy` when `timeout` (seconds) passes first. Re-entrant for the holder.
        """
        acquired = self._changing.acquire(timeout=-1 if timeout is None else timeout)
        if not acquired:
            raise Busy("an edit or rollback is in progress; try again when it is done")
        try:
            yield self._version
        finally:
            self._changing.release()

    def apply(
        self,
        update: EditUpdate,
        facts: Sequence[FactUpdate | Mapping[str, Any]],
        *,
        offsets: Mapping[Any, int] | None = None,
        timings: Mapping[str, float] | None = None,
        diagnostics: Mapping[str, Any] | None = None,
    ) -> Applied:
        """Commit `update` as a new version, serve it, preserve its keys: one operation."""
        with self._changing:
            t = time.perf_counter()
            version = self.store.commit(
                update,
                facts=facts,
                offsets=dict(offsets or {}),
                timings=timings,
                diagnostics=diagnostics,
            )
            stored = time.perf_counter() - t
            t = time.perf_counter()
            # Not checked against the manifest here: the store computed that sha256 from the
            # very tensors served now, a moment ago; a restore, a rollback and a replica's
            # follow serve what was rebuilt from disk, and those are checked.
            pause = self._swap(version.version)
            swapped = time.perf_counter() - t
            if self.editor is not None:
                self.editor.preserve(update)
            return Applied(version, {"store": stored, "apply": swapped}, pause)

    def consolidate(self) -> Applied | None:
        """Replace the accumulated update by one joint solve of every live fact (a version).

        Each live fact's target at each module is what the lineage added at its key when it
        was edited (D_v k); the editor re-solves them all from the base weights
        (`Editor.consolidate`). The result is a version without facts, so a rollback past it
        restores the sequential update exactly, and replicas follow it like any other.
        Returns None when nothing is applied.
        """
        if self.editor is None:
            raise ValueError("consolidation needs an editor")
        with self._changing:
            keys: dict[str, list[torch.Tensor]] = {}
            targets: dict[str, list[torch.Tensor]] = {}
            for v, by_module in self.store.keys_by_version():
                if not any(k.shape[1] for k in by_module.values()):
                    continue
                at_v = self.store.deltas(v)
                for name, k in by_module.items():
                    if k.shape[1]:
                        keys.setdefault(name, []).append(k)
                        targets.setdefault(name, []).append(at_v[name] @ k)
            if not keys:
                return None
            t = time.perf_counter()
            update = self.editor.consolidate(
                {n: torch.cat(ks, dim=1) for n, ks in keys.items()},
                {n: torch.cat(ts, dim=1) for n, ts in targets.items()},
                self.store.deltas(),
            )
            return self.apply(
                update,
                [],
                timings={"consolidate": time.perf_counter() - t},
                diagnostics=update.diagnostics,
            )

    def facts_since_consolidation(self) -> int:
        """Live facts applied after the newest consolidation, kept or rolled back.

        A consolidation the evaluator rolled back counts too: the next attempt waits for as
        many new facts again instead of re-solving, and failing, after every batch.
        """
        with self._changing:
            versions = self.store.versions()
            last = max((v.version for v in versions if v.consolidated), default=0)
            return sum(len(self.store.version(v).facts) for v in self.store.lineage() if v > last)

    def rollback(self, to_version: int, reason: str) -> RolledBack:
        """Serve `to_version` (in the live lineage) again; the undone facts go to the outbox."""
        with self._changing:
            undone_from = self._version
            records = self.store.rollback(to_version, reason)
            self._serve(to_version, f"rollback to {to_version}")
            self._preserve_lineage()
            return RolledBack(undone_from, to_version, tuple(records))

    # -- following an editor (a replica) ----------------------------------------------------

    def ingest(
        self, record: Version, factors: Mapping[str, Any], base_sha256: Mapping[str, str]
    ) -> bool:
        """Keep an editor's version (from the update log), checked by sha256, not yet served.
        False when it is here already. Raises `UpdateRefused`."""
        with self._changing:
            return self.store.ingest(record, factors, base_sha256)

    def follow(self, current: Current) -> list[int]:
        """Serve the version the editor serves (the replica's apply): durably current in this
        store first, then swapped under the write lock, then checked bit for bit. Returns the
        versions it undid. Raises `UpdateRefused` for a record that does not match the store."""
        with self._changing:
            target = current.version
            missing = [v for v in current.lineage if not self.store.has(v)]
            if missing:
                raise UpdateRefused(
                    f"the editor serves version {target}, but versions {missing} of its lineage "
                    f"never arrived on the log"
                )
            here = self.store.lineage(target)
            if here != list(current.lineage):
                raise UpdateRefused(
                    f"version {target}'s lineage here {here} is not the editor's "
                    f"{list(current.lineage)}"
                )
            if self.store.expected_sha256(target) != current.sha256:
                raise UpdateRefused(f"version {target}'s sha256 here differ from the record's")
            if target == self._version and self.store.current == target:
                return []
            undone = self.store.follow(target, current.reason, current.at)
            self._serve(target, f"version {target} from the update log")
            return undone

    def drop_lineage(self) -> list[int]:
        """Serve the base again and forget every later version (a replica whose update log
        was taken over by another editor: it rebuilds that editor's lineage from the base, so
        two editors' versions are never mixed). Returns the versions dropped."""
        with self._changing:
            dropped = self.store.reset_to_base()
            self._serve(0, "the base rebuilt after a takeover")
            self._preserve_lineage()
            return dropped

    def reject(self, facts: Sequence[FactUpdate | Mapping[str, Any]], reason: str) -> Rejected:
        """Facts that will never be applied: durably into the outbox, to be published."""
        as_json = [_fact_json(f) for f in facts]
        record = Rejected(
            id=batch_record_id([str(f["id"]) for f in as_json]),
            kind="edit_failed",
            reason=reason,
            facts=tuple(as_json),
            created=now(),
        )
        self.store.outbox.put(record)
        return record

    def record_scores(self, version: int, scores: Mapping[str, Any]) -> None:
        """Keep an evaluation's scores in the version it judged (shown by `editd versions`)."""
        self.store.record_scores(version, scores)

    # -- internals ----------------------------------------------------------------------------

    def _check_form(self) -> None:
        """An editor whose `editing.memory` is not the form the store's live lineage serves
        is refused at start (exit 5), not at its first batch, which would fail and replay."""
        if self.editor is None:
            return
        form = self.store.served_form()
        if form is not None and form != self.editor.config.memory:
            have = "a gated memory" if form == "gated" else "plain weights"
            raise StoreMismatch(
                f"the edit store at {self.store.root} serves {have}, but editing.memory is "
                f"{self.editor.config.memory!r}: keep the setting the store was made with, or "
                "start a new data dir"
            )

    def _swap(self, version: int) -> float:
        """Serve the store's live `version` (weights and gated memory) under the write lock;
        the seconds readers waited."""
        deltas, memory = self.store.served_state(version)
        return self.handle.serve(deltas, memory, then=lambda: self._set(version))

    def _serve(self, version: int, what: str) -> None:
        """Swap to `version` and check what is served bit for bit against its manifest."""
        self._swap(version)
        self.store.check_served(version, self.served_sha256(), what)

    def _set(self, version: int) -> None:
        self._version = version
        if self.on_change is not None:
            self.on_change(version)

    def _preserve_lineage(self) -> None:
        if self.editor is not None:
            self.editor.reset_to(keys for _, keys in self.store.keys_by_version())


def _fact_json(fact: FactUpdate | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(fact, FactUpdate):
        return fact.model_dump(mode="json")
    return dict(fact)

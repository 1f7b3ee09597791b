"""Crash recovery: what `EditStore.open` makes of a store a crash interrupted.

A version is written into a temp directory, renamed, and becomes live only when `CURRENT` is
replaced, so a crash leaves `CURRENT` at v−1 or at v. A rollback queues its facts in the outbox,
marks the versions it undoes, then moves `CURRENT`. On open, therefore:

- temp files (`.tmp-*`) are removed;
- a version directory outside the live lineage that is not marked undone (a commit that never
  reached `CURRENT`) is deleted, and its number may be given again;
- a live version marked undone, or one whose rejection record is in the outbox, belongs to a
  rollback that crashed before moving `CURRENT`: the marks are cleared and the records dropped,
  so the rollback did not happen and nobody hears that it did.

A read-only open (`editd versions`) changes nothing on disk; it reads the store as the
writer's next open would leave it.
"""

from __future__ import annotations

import logging

from editd.store.errors import StoreCorrupt
from editd.store.layout import Layout
from editd.store.outbox import Outbox, rolled_back, version_record_id
from editd.store.version import Version, VersionState

log = logging.getLogger(__name__)


def sweep(layout: Layout, outbox: Outbox) -> None:
    """Remove what interrupted writes left (temp files and directories)."""
    layout.remove_temporaries(outbox.root)


def load(layout: Layout, outbox: Outbox, *, readonly: bool) -> tuple[dict[int, Version], int]:
    """Every version the store keeps, by number, and the live one, after recovery."""
    current = layout.read_current()
    manifests: dict[int, Version] = {}
    for v in layout.version_numbers():
        try:
            raw = layout.read_manifest(v)
            m = Version.from_manifest(raw)
            if m.version != v:
                raise ValueError(f"manifest names version {m.version}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _discard(layout, v, f"no valid manifest ({exc})", readonly=readonly)
            continue
        manifests[v] = m
        if raw.get("rejected_pending") and not readonly:
            _migrate_pending(layout, outbox, m)
    if current not in manifests:
        raise StoreCorrupt(f"CURRENT names version {current}, which has no valid manifest")
    live: set[int] = set()
    v: int | None = current
    while v is not None:
        if v not in manifests:
            raise StoreCorrupt(f"version {current} descends from missing version {v}")
        live.add(v)
        v = manifests[v].parent
    pending = outbox.ids()
    for v, m in sorted(manifests.items()):
        if v in live and not readonly and version_record_id(v) in pending:
            log.warning("version %d: dropping the rejections of an interrupted rollback", v)
            outbox.done(version_record_id(v))
        if v in live and m.state is VersionState.UNDONE:
            m = m.marked(None)
            if not readonly:
                log.warning("version %d: reverting an interrupted rollback", v)
                layout.write_manifest(m)
            manifests[v] = m
        elif v not in live and m.state is not VersionState.UNDONE:
            # Written but never made live: the commit was interrupted before CURRENT moved.
            del manifests[v]
            _discard(layout, v, "its commit did not complete", readonly=readonly)
    return manifests, current


def _migrate_pending(layout: Layout, outbox: Outbox, m: Version) -> None:
    # Format 1 flagged unpublished rejections in the manifest; the outbox holds them now.
    if m.undone is None or version_record_id(m.version) in outbox.ids():
        return
    outbox.put(rolled_back(m))
    layout.write_manifest(m)


def _discard(layout: Layout, version: int, why: str, *, readonly: bool) -> None:
    if readonly:
        return
    log.warning("removing version %d: %s", version, why)
    layout.remove_version(version)

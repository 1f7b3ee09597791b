"""The rejected-facts outbox: facts that will never be served, kept until they are published.

Two kinds of fact end here, with one record type: the facts of a batch the editor could not
apply (a poison batch: `version` None), and the facts of a version that was rolled back
(`version` = the undone version). A record is written durably before the event it reports is
acknowledged (the consumer commits past a poison batch only after `put`; a rollback moves
CURRENT only after its records exist), and removed only after every one of its Kafka records
was acknowledged. A crash in between publishes some facts twice, never none.

`consumers.rejected` drains it to `<topic>.rejected`; this module knows no Kafka (records
render to key/value/headers triples) and no torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editd import durable
from editd.store.version import Version

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{20})-([a-z0-9-]+)\.json$")

# Headers of every record on the rejected topic, whatever the reason.
HEADERS = ("reason", "kind", "fact_id", "version", "rolled_back_to")


@dataclass(frozen=True)
class Rejected:
    """Facts that will never be served, and why."""

    id: str  # "version-000007" for an undone version, "batch-<hash>" for a poison batch
    kind: str  # "rolled_back" or "edit_failed"
    reason: str
    facts: tuple[dict[str, Any], ...]
    created: str
    version: int | None = None  # the undone version; None: never applied
    rolled_back_to: int | None = None

    def messages(self) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
        """Kafka records (key, value, headers), one per fact.

        The value is the fact record itself, so a producer can fix and republish it; the key is
        the subject, as on the fact topic; the headers are `HEADERS`, "none" where absent.
        """
        out = []
        for fact in self.facts:
            values = {
                "reason": self.reason[:1000],
                "kind": self.kind,
                "fact_id": str(fact["id"]),
                "version": "none" if self.version is None else str(self.version),
                "rolled_back_to": "none"
                if self.rolled_back_to is None
                else str(self.rolled_back_to),
            }
            headers = [(h, values[h].encode()) for h in HEADERS]
            key = str(fact.get("subject", "")).encode()
            value = json.dumps(fact, ensure_ascii=False, separators=(",", ":")).encode()
            out.append((key, value, headers))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "reason": self.reason,
            "facts": list(self.facts),
            "created": self.created,
            "version": self.version,
            "rolled_back_to": self.rolled_back_to,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Rejected:
        return cls(
            id=str(data["id"]),
            kind=str(data["kind"]),
            reason=str(data["reason"]),
            facts=tuple(data["facts"]),
            created=str(data["created"]),
            version=data.get("version"),
            rolled_back_to=data.get("rolled_back_to"),
        )


class Outbox:
    """A directory of `Rejected` records, oldest first. Thread-safe; one writing process."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self.changed = threading.Event()  # set by `put`: the publisher's cue

    def put(self, record: Rejected) -> None:
        """Durably add `record` (a record with the same id is replaced)."""
        data = (json.dumps(record.to_json(), ensure_ascii=False, indent=1) + "\n").encode()
        with self._lock:
            old = self._path_of(record.id)
            name = old.name if old is not None else f"{time.time_ns():020d}-{record.id}.json"
            self.root.mkdir(parents=True, exist_ok=True)
            durable.write_bytes(self.root / name, data)
        self.changed.set()

    def pending(self) -> list[Rejected]:
        """Every record not yet published, oldest first."""
        with self._lock:
            out = []
            for path in self._files():
                try:
                    out.append(Rejected.from_json(json.loads(path.read_text(encoding="utf-8"))))
                except (OSError, ValueError, KeyError) as exc:
                    # Written atomically, so this is damage from outside: keep the file for
                    # an operator and say so, rather than drop facts silently.
                    log.error("outbox record %s is unreadable (%s); left in place", path, exc)
            return out

    def ids(self) -> set[str]:
        with self._lock:
            return {m.group(2) for p in self._files() if (m := _NAME.match(p.name))}

    def done(self, record_id: str) -> None:
        """The record's facts are all on the rejected topic: forget it."""
        with self._lock:
            path = self._path_of(record_id)
            if path is not None:
                path.unlink()
                durable.fsync_dir(self.root)

    def facts_pending(self) -> int:
        return sum(len(r.facts) for r in self.pending())

    def _files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if _NAME.match(p.name))

    def _path_of(self, record_id: str) -> Path | None:
        for path in self._files():
            m = _NAME.match(path.name)
            if m and m.group(2) == record_id:
                return path
        return None


def rolled_back(version: Version) -> Rejected:
    """The record of an undone version's facts, from its `undone` mark: what a rollback puts
    in the outbox (and what a format-1 manifest's rejection flag becomes)."""
    undo = version.undone
    if undo is None:
        raise ValueError(f"version {version.version} is not undone")
    return Rejected(
        id=version_record_id(version.version),
        kind="rolled_back",
        reason=undo.reason,
        facts=version.facts,
        created=undo.at,
        version=version.version,
        rolled_back_to=undo.to_version,
    )


def version_record_id(version: int) -> str:
    return f"version-{version:06d}"


def batch_record_id(fact_ids: Sequence[str]) -> str:
    return "batch-" + hashlib.sha256("\0".join(sorted(fact_ids)).encode()).hexdigest()[:16]

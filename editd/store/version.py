"""The typed record of one model version, as its `manifest.json` holds it.

One `Version` is written per batch (and version 0 for the base model); the store, the daemon's
`GET /v1/versions`, `editd versions` and (later) replicas read the same record. Fact ids are
not stored beside the facts: they are the facts' `id` fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

FORMAT = 2
READABLE_FORMATS = (1, 2)  # format 1 also stored `fact_ids` and the rejection flags


def now() -> str:
    """A record's timestamp: UTC, milliseconds, ISO 8601 with Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class VersionState(StrEnum):
    COMMITTED = "committed"  # in the live lineage (or the live version itself)
    UNDONE = "undone"  # rolled back; kept on disk, its facts went to the rejected outbox


@dataclass(frozen=True)
class Undo:
    """Why and when a version was rolled back."""

    at: str
    reason: str
    to_version: int
    from_version: int


@dataclass(frozen=True)
class Version:
    version: int
    parent: int | None
    created: str
    state: VersionState = VersionState.COMMITTED
    facts: tuple[dict[str, Any], ...] = ()
    offsets: dict[str, int] = field(default_factory=dict)  # "topic/partition" → next offset
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    diagnostics: dict[str, Any] = field(default_factory=dict)
    # name → rank, keys, and "replaces" where the update is the whole accumulated one
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)  # every edited tensor as served
    # A gated version (editd.memory): its gate module, threshold and projection rank; its
    # update is served through the gate, not added to the weights. None: the weight form.
    gate: dict[str, Any] | None = None
    scores: dict[str, Any] | None = None  # the last evaluation of this version
    scored: str | None = None
    undone: Undo | None = None

    @property
    def fact_ids(self) -> tuple[str, ...]:
        return tuple(str(f["id"]) for f in self.facts)

    @property
    def live(self) -> bool:
        return self.state is VersionState.COMMITTED

    @property
    def consolidated(self) -> bool:
        """A joint re-solve of the facts before it (`VersionedModel.consolidate`): no facts."""
        return "consolidated" in self.diagnostics

    def replace(self, **changes: Any) -> Version:
        return dataclasses.replace(self, **changes)

    def marked(self, undo: Undo | None) -> Version:
        """This version undone by `undo`, or (None) committed again."""
        state = VersionState.COMMITTED if undo is None else VersionState.UNDONE
        return dataclasses.replace(self, state=state, undone=undo)

    def to_manifest(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["facts"] = list(self.facts)
        out["state"] = self.state.value
        return {"format": FORMAT, **out}

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> Version:
        fmt = data.get("format")
        if fmt not in READABLE_FORMATS:
            raise ValueError(f"manifest format {fmt!r} is not one of {READABLE_FORMATS}")
        undone = data.get("undone")
        return cls(
            version=int(data["version"]),
            parent=data["parent"],
            created=str(data["created"]),
            state=VersionState(data["state"]),
            facts=tuple(data.get("facts") or ()),
            offsets={str(k): int(v) for k, v in (data.get("offsets") or {}).items()},
            timings=dict(data.get("timings") or {}),
            diagnostics=dict(data.get("diagnostics") or {}),
            modules=dict(data.get("modules") or {}),
            sha256=dict(data.get("sha256") or {}),
            gate=dict(data["gate"]) if data.get("gate") else None,
            scores=data.get("scores"),
            scored=data.get("scored"),
            undone=Undo(**{k: undone[k] for k in ("at", "reason", "to_version", "from_version")})
            if undone
            else None,
        )

    def summary(self, *, current: bool, rejected_pending: bool) -> dict[str, Any]:
        """What `GET /v1/versions` and `editd versions --json` show of a version."""
        return {
            "version": self.version,
            "parent": self.parent,
            "created": self.created,
            "facts": len(self.facts),
            "consolidated": self.consolidated,
            "state": self.state.value,
            "current": current,
            "scores": self.scores,
            "scored": self.scored,
            "undone_reason": self.undone.reason if self.undone else None,
            "rejected_pending": rejected_pending,
        }

"""Versions as bytes for the update log: what the editor publishes and a replica ingests.

Two payloads, both self-describing and free of pickle:

- a **version** payload is a safetensors blob of the version's float32 factors
  (`<module>.left`, `<module>.right`) whose metadata carries the typed `Version` record (as
  committed: parent, facts, offsets, modules, the sha256 of every edited tensor as served) and
  the sha256 of the base tensors it was made on. The editing keys stay home: a replica does
  not edit, and they would add about 40 % to every version.
- a **current** payload is JSON: which version is served now, its lineage and sha256, and, when
  it undoes versions, why.

`UpdateLogSource` reads both from an edit store (the editor's side); `EditStore.ingest` and
`EditStore.follow` take them (a replica's side). Chunking and checksums are the transport's
(consumers/updates.py); the sha256 of the served tensors is checked here, against the record.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from editd.store.version import Version, VersionState, now

WIRE_FORMAT = "editd-update-log/1"


class WireError(ValueError):
    """A payload that is not a readable version or current record; the message says why."""


@dataclass(frozen=True)
class Current:
    """The editor serves `version` now; `undone` (oldest first) were rolled back on the way."""

    version: int
    lineage: tuple[int, ...]
    sha256: dict[str, str]
    at: str
    reason: str | None = None
    undone: tuple[int, ...] = ()


def encode_version(
    record: Version, factors: Mapping[str, torch.Tensor], base_sha256: Mapping[str, str]
) -> bytes:
    # The record as committed: scores and undo marks change after publication and belong to
    # the editor's store, so a republished version is byte-identical to the first publication.
    committed = record.replace(state=VersionState.COMMITTED, scores=None, scored=None, undone=None)
    meta = {
        "format": WIRE_FORMAT,
        "record": json.dumps(committed.to_manifest(), sort_keys=True),
        "base_sha256": json.dumps(dict(base_sha256), sort_keys=True),
    }
    return save_tensors({k: v.contiguous() for k, v in sorted(factors.items())}, metadata=meta)


def decode_version(payload: bytes) -> tuple[Version, dict[str, torch.Tensor], dict[str, str]]:
    """(record, factors, base sha256) of a version payload; `WireError` if it is not one."""
    meta = _safetensors_metadata(payload)
    if meta.get("format") != WIRE_FORMAT:
        raise WireError(f"not an update-log version (format {meta.get('format')!r})")
    try:
        record = Version.from_manifest(json.loads(meta["record"]))
        base = {str(k): str(v) for k, v in json.loads(meta["base_sha256"]).items()}
        factors = load_tensors(payload)
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"unreadable version record: {exc}") from exc
    for name in record.modules:
        for part in ("left", "right"):
            if f"{name}.{part}" not in factors:
                raise WireError(f"version {record.version} lacks {name}.{part}")
    return record, factors, base


def encode_current(current: Current) -> bytes:
    return json.dumps(
        {
            "format": WIRE_FORMAT,
            "version": current.version,
            "lineage": list(current.lineage),
            "sha256": current.sha256,
            "at": current.at,
            "reason": current.reason,
            "undone": list(current.undone),
        },
        sort_keys=True,
    ).encode()


def decode_current(payload: bytes) -> Current:
    try:
        data = json.loads(payload)
        if data.get("format") != WIRE_FORMAT:
            raise WireError(f"not an update-log current record (format {data.get('format')!r})")
        return Current(
            version=int(data["version"]),
            lineage=tuple(int(v) for v in data["lineage"]),
            sha256={str(k): str(v) for k, v in data["sha256"].items()},
            at=str(data["at"]),
            reason=data.get("reason"),
            undone=tuple(int(v) for v in data.get("undone") or ()),
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, WireError):
            raise
        raise WireError(f"unreadable current record: {exc}") from exc


class UpdateLogSource:
    """The editor's store as the update-log publisher sees it: bytes, no tensors to handle."""

    def __init__(self, store: Any) -> None:
        self.store = store  # an open EditStore

    def current(self) -> int:
        return int(self.store.current)

    def lineage(self, version: int) -> list[int]:
        return list(self.store.lineage(version))

    def version_payload(self, version: int) -> bytes:
        record = self.store.version(version)
        factors = self.store.version_factors(version)
        return encode_version(record, factors, self.store.base_sha256())

    def current_payload(self, version: int, previous: int | None) -> bytes:
        """The record that makes `version` current; `previous` is what was published before."""
        lineage = self.lineage(version)
        reason, undone = None, ()
        if previous is not None and previous not in lineage:
            gone = self.store.version(previous)
            reason = gone.undone.reason if gone.undone else None
            undone = tuple(v for v in self.lineage(previous) if v not in lineage)
        return encode_current(
            Current(
                version=version,
                lineage=tuple(lineage),
                sha256=self.store.expected_sha256(version),
                at=now(),
                reason=reason,
                undone=undone,
            )
        )


def _safetensors_metadata(payload: bytes) -> dict[str, str]:
    # safetensors: an 8-byte little-endian header length, then a JSON header whose
    # "__metadata__" holds the string map.
    if len(payload) < 8:
        raise WireError("payload too short for a safetensors header")
    (size,) = struct.unpack("<Q", payload[:8])
    if size > len(payload) - 8:
        raise WireError("safetensors header runs past the payload")
    try:
        header = json.loads(payload[8 : 8 + size])
    except ValueError as exc:
        raise WireError(f"unreadable safetensors header: {exc}") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise WireError("the payload carries no editd metadata")
    return meta

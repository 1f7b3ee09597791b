"""Which store a version came from: an id made with the store and kept in its layout.

Two editors can write one update log: an editor whose disk was lost and whose store was
recreated, or a second editor pointed at the same topic by mistake. Their versions share
numbers but not weights, so a replica must know whose versions it holds and never mix them.
The editor's store id travels with every record it publishes (consumers/updates.py), and the
update log's records name the store that wrote them.

`IDENTITY` in the store's directory holds `{"store_id": ..., "created": ...}`. It is written
(temp, fsync, rename) when the store is created, or when an older store without one is opened
for writing, so the id never changes under a running store and survives a crash.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from editd import durable
from editd.store.version import now

IDENTITY_FILE = "IDENTITY"


class IdentityError(ValueError):
    """The store's IDENTITY file is unreadable."""


def read(root: Path) -> str | None:
    """The store id at `root`, or None when the store has none yet."""
    path = Path(root) / IDENTITY_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return str(data["store_id"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IdentityError(f"{path} does not name a store id: {exc}") from exc


def ensure(root: Path) -> str:
    """The store id at `root`, made (durably) when there is none yet."""
    existing = read(root)
    if existing is not None:
        return existing
    store_id = uuid.uuid4().hex
    body = json.dumps({"store_id": store_id, "created": now()}, indent=1) + "\n"
    durable.write_bytes(Path(root) / IDENTITY_FILE, body.encode())
    return store_id

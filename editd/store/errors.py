"""What the edit store refuses, by reason: each a `StoreError` whose message says why.

The daemon turns them into exit codes (exitcodes.py): `StoreLocked` 4, `StoreMismatch` 5,
`RestoreFailed` and `StoreCorrupt` 6.
"""

from __future__ import annotations


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


class RestoreFailed(StoreError):
    """The weights rebuilt from the store do not match what its manifest records."""


class UpdateRefused(StoreError):
    """A version or current record from the update log that this store will not take."""


class VersionNotFound(StoreError):
    """No version of that number exists (live or undone)."""

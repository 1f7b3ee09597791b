"""Finding the record batch a fetch could not decode, so the consumer can skip past it.

kafka-python decodes (decompresses, checks CRCs of) a whole record batch inside
`KafkaConsumer.poll()`. A batch it cannot decode (a codec it has no library for, a corrupt
payload, a failed CRC) raises out of `poll()` with no partition or offset attached, and the
fetcher is left stuck in front of it: every later poll of that partition returns nothing, and
committed offsets never pass it. The exception's traceback still holds the frame that was
decoding, `PartitionRecords._unpack_records` in kafka-python 3.0.12 (pinned in pyproject.toml),
whose locals name the partition and the batch: its offsets and its bytes as fetched. That is
private structure, so everything here is looked up defensively; when it is not found the caller
falls back to what the public API can tell (the one partition it reads, if it reads one).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from editd.consumers.batching import Partition


@dataclass(frozen=True)
class BadBatch:
    """A batch a fetch could not decode, as far as the traceback tells."""

    tp: Partition
    base_offset: int | None
    """The batch's first offset as written (None when unknown)."""
    next_offset: int | None
    """The offset after its last record: where reading resumes (None when unknown)."""
    raw: bytes | None
    """The batch as fetched (still compressed), for the dead-letter topic."""


def describe(exc: BaseException) -> str:
    """`Type: message` of an error and of what it was raised from, on one line."""
    parts = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = " ".join(str(current).split())
        parts.append(f"{type(current).__name__}: {text}" if text else type(current).__name__)
        current = current.__cause__ or current.__context__
    return " <- ".join(parts)


def locate(exc: BaseException) -> BadBatch | None:
    """The batch `exc` was raised decoding, from the frames of its traceback (or of the errors
    it was raised from); None when no decoding frame is among them."""
    found: BadBatch | None = None
    for frame_locals in _frames(exc):
        owner = frame_locals.get("self")
        tp = getattr(owner, "topic_partition", None)
        if tp is None or not hasattr(owner, "next_fetch_offset"):
            continue
        where = (str(tp[0]), int(tp[1]))
        batch = frame_locals.get("batch")
        base = _int(getattr(batch, "base_offset", None))
        if base is None:
            # A frame of the same fetch that is not the decoding one (`take`): it names the
            # partition; a deeper frame may still name the batch.
            found = found or BadBatch(where, None, None, None)
            continue
        after = _int(getattr(batch, "next_offset", None))
        if after is None:
            last = _int(getattr(batch, "last_offset", None))
            after = None if last is None else last + 1
        raw = getattr(batch, "_buffer", None)
        return BadBatch(
            where,
            base,
            after,
            bytes(raw) if isinstance(raw, bytes | bytearray | memoryview) else None,
        )
    return found


def _frames(exc: BaseException) -> Iterator[dict[str, Any]]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        tb: TracebackType | None = current.__traceback__
        while tb is not None:
            yield tb.tb_frame.f_locals
            tb = tb.tb_next
        current = current.__cause__ or current.__context__


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def take_pending_error(consumer: Any) -> BaseException | None:
    """An error kafka-python holds back for the next `poll()`, taken out of it now.

    When a poll returns records and then meets an undecodable batch, the error is kept for the
    next poll, and that poll drops it if the partition is paused by then (the consumer pauses
    every partition while it edits): the fetcher then spins on the dead batch inside every
    later `poll()` of that partition. Taking it at once, before anything is paused, avoids both.
    """
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is None:
        return None
    meta = getattr(fetcher, "_next_in_line_exception_metadata", None)
    if meta is not None and isinstance(getattr(meta, "exception", None), BaseException):
        fetcher._next_in_line_exception_metadata = None
        return meta.exception
    parked = getattr(fetcher, "_paused_partition_records", {})
    for part in (getattr(fetcher, "_next_partition_records", None), *parked.values()):
        exc = getattr(part, "_next_inline_exception", None)
        if isinstance(exc, BaseException):
            part._next_inline_exception = None
            return exc
    return None


def drop_fetched(consumer: Any, tp: Partition) -> None:
    """Discard what the fetcher holds of `tp` (the batch that failed to decode), so it asks
    the broker again from the position the caller seeks to."""
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is None:
        return
    parked = getattr(fetcher, "_paused_partition_records", {})
    for part in (getattr(fetcher, "_next_partition_records", None), *parked.values()):
        where = getattr(part, "topic_partition", None)
        if (
            where is not None
            and (where[0], where[1]) == tp
            and callable(getattr(part, "drain", None))
        ):
            part.drain()

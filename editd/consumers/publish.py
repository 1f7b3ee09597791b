"""`editd publish`: put facts on the fact topic.

Reads JSON lines, a JSON array (CounterFact, zsRE or native fact records) or a single JSON
object, validates every record locally with the same code the consumer uses, and publishes the
valid ones in the native fact format with key = subject, so the updates of one subject land on
one partition and are applied in order.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError
from tqdm import tqdm

from editd.config import FactLimits, KafkaSettings, Settings
from editd.consumers.security import KafkaSecurityError, client_options
from editd.exitcodes import EXIT_FAILURE, EXIT_KAFKA, EXIT_OK, EXIT_USAGE
from editd.facts import FactError, FactUpdate, fact_from_record

log = logging.getLogger(__name__)

EXIT_SOME_REJECTED = EXIT_FAILURE
SEND_TIMEOUT_S = 60.0
MAX_REASONS_SHOWN = 20


@dataclass
class Rejection:
    where: str
    reason: str


@dataclass
class LoadResult:
    facts: list[FactUpdate] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


def bootstrap_servers_for(kafka: KafkaSettings) -> list[str]:
    """The configured servers, or the embedded broker's loopback address when none are."""
    return list(kafka.bootstrap_servers) or [f"127.0.0.1:{kafka.embedded_port}"]


def iter_records(text: str) -> Iterator[tuple[str, Any]]:
    """(where, decoded JSON or a `FactError`) for each record of a file, format detected.

    A file that is one JSON document is an array of records (CounterFact and zsRE ship as
    arrays) or a single record; anything else is read as JSON lines, where one bad line is
    reported and the others still count.
    """
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        document = None
    else:
        # Numbered from 1, as JSON lines are: "record 3" is the third element.
        if isinstance(document, list):
            for i, record in enumerate(document, start=1):
                yield f"record {i}", record
            return
        yield "record 1", document
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {lineno}", json.loads(line)
        except json.JSONDecodeError as exc:
            yield f"line {lineno}", FactError(f"bad JSON: {exc.msg} at column {exc.colno}")


def load_facts(text: str, limits: FactLimits) -> LoadResult:
    """Validate every record of `text`; keep the facts, explain the rejections."""
    result = LoadResult()
    for where, record in iter_records(text):
        try:
            if isinstance(record, FactError):
                raise record
            result.facts.append(fact_from_record(record, limits))
        except FactError as exc:
            result.rejected.append(Rejection(where, exc.reason))
    return result


def encode_fact(fact: FactUpdate) -> bytes:
    """The fact as the consumer expects it on the topic (native format, id included)."""
    return fact.model_dump_json().encode("utf-8")


def new_producer(bootstrap_servers: Sequence[str], **config: Any) -> KafkaProducer:
    # Idempotent, acks=all (kafka-python's defaults) keep retried sends from duplicating or
    # reordering a subject's facts. Records are batched normally: consumers may commit an
    # offset in the middle of a producer batch, which the consumer tests check is redelivered
    # from exactly that record on Tansu and Kafka alike.
    defaults: dict[str, Any] = {
        "bootstrap_servers": list(bootstrap_servers),
        "client_id": "editd-publish",
        "acks": "all",
        "linger_ms": 5,
        "bootstrap_timeout_ms": 10_000,
    }
    defaults.update(config)
    return KafkaProducer(**defaults)


Headers = list[tuple[str, bytes]]
# (key, value) or (key, value, headers); None for no key, value or headers.
Record = tuple[bytes | None, bytes | None] | tuple[bytes | None, bytes | None, Headers | None]


def publish_raw(
    records: Iterable[Record],
    bootstrap_servers: Sequence[str],
    topic: str,
    *,
    producer: KafkaProducer | None = None,
    progress: bool = False,
    total: int | None = None,
) -> list[int]:
    """Send (key, value[, headers]) records as they are and wait for every acknowledgement.

    Returns the offsets in send order. Raw bytes on purpose: tests and operators use it to put
    records on the topic that `publish_facts` would refuse (malformed JSON, oversize values).
    """
    own = producer is None
    producer = producer or new_producer(bootstrap_servers)
    # The bar counts acknowledgements, not sends: a send only queues the record in the
    # producer, and a fact is published when the broker has it (acks=all).
    bar = tqdm(total=total, disable=not progress, unit="fact", desc=f"acknowledged ({topic})")
    try:
        futures = []
        for key, value, *rest in records:
            future = producer.send(topic, key=key, value=value, headers=rest[0] if rest else None)
            future.add_callback(lambda _: bar.update(1))
            futures.append(future)
        producer.flush(timeout=SEND_TIMEOUT_S)
        return [f.get(timeout=SEND_TIMEOUT_S).offset for f in futures]
    finally:
        bar.close()
        if own:
            producer.close(timeout=10)


def publish_facts(
    facts: Sequence[FactUpdate],
    bootstrap_servers: Sequence[str],
    topic: str,
    *,
    producer: KafkaProducer | None = None,
    progress: bool = False,
    headers: Callable[[FactUpdate], Headers] | None = None,
) -> list[int]:
    """Publish validated facts with key = subject (and `headers(fact)`); return their offsets."""
    return publish_raw(
        (
            (f.subject.encode("utf-8"), encode_fact(f), headers(f) if headers else None)
            for f in facts
        ),
        bootstrap_servers,
        topic,
        producer=producer,
        progress=progress,
        total=len(facts),
    )


def _read_input(name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    return Path(name).read_text(encoding="utf-8")


def main(args: argparse.Namespace, settings: Settings) -> int:
    """`editd publish FILE|-`: exit 0 if every record was published, 1 if some were
    rejected locally or the input held no record at all, 2 if the file could not be read, 8
    if the broker did not take the facts."""
    kafka = settings.kafka
    try:
        text = _read_input(args.file)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"editd publish: cannot read {args.file}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    loaded = load_facts(text, settings.facts)
    if not loaded.facts and not loaded.rejected:
        print(
            f"editd publish: warning: {args.file} holds no records; nothing was published",
            file=sys.stderr,
        )
        return EXIT_SOME_REJECTED
    servers = bootstrap_servers_for(kafka)
    published = 0
    if loaded.facts:
        try:
            producer = new_producer(servers, **client_options(kafka))
            try:
                published = len(
                    publish_facts(
                        loaded.facts,
                        servers,
                        kafka.topic,
                        producer=producer,
                        progress=sys.stderr.isatty(),
                    )
                )
            finally:
                producer.close(timeout=10)
        except KafkaSecurityError as exc:
            print(f"editd publish: {exc}", file=sys.stderr)
            return EXIT_KAFKA
        except KafkaError as exc:
            print(
                f"editd publish: publishing to {','.join(servers)} failed: {exc}", file=sys.stderr
            )
            return EXIT_KAFKA
    print(
        f"published {published} facts to {kafka.topic} at {','.join(servers)}; "
        f"rejected {len(loaded.rejected)} locally",
        file=sys.stderr,
    )
    for rejection in loaded.rejected[:MAX_REASONS_SHOWN]:
        print(f"  {rejection.where}: {rejection.reason}", file=sys.stderr)
    if len(loaded.rejected) > MAX_REASONS_SHOWN:
        print(f"  ... and {len(loaded.rejected) - MAX_REASONS_SHOWN} more", file=sys.stderr)
    return EXIT_SOME_REJECTED if loaded.rejected else EXIT_OK

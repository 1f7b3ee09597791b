"""`editd checkpoints` and `editd rollback`.

`checkpoints` reads the store directly (read-only, no lock), so it works whether or not the
daemon runs. `rollback` asks the running daemon first (`POST /v1/rollback`): only the daemon
can swap the served weights. When nothing listens there, it rolls the stopped store back
itself, then publishes the undone facts to the rejected topic if a broker answers; otherwise
they stay marked `rejected_pending` in their manifests and the daemon publishes them on start
(`publish_pending_rejections`, which the daemon calls too).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from editd.config import Settings, admin_token
from editd.store.store import (
    EditStore,
    StoreError,
    StoreLocked,
    StoreNotFound,
    VersionInfo,
    rejected_messages,
)

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1

# Scores shown as table columns when the evaluator recorded them under these keys.
_SCORE_COLUMNS = ("es", "ps", "ns", "s")


def checkpoints(args: argparse.Namespace, settings: Settings) -> int:
    """`editd checkpoints [--json] [--data-dir DIR]`: list every version, undone ones too."""
    store = EditStore(settings.store.data_dir, readonly=True)
    try:
        store.open()
    except StoreNotFound as exc:
        print(f"editd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except StoreError as exc:
        print(f"editd: cannot read the edit store: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    with store:
        infos = store.versions()
    if getattr(args, "json", False):
        print(json.dumps([i.to_json() for i in infos], indent=1))
    else:
        print(render_versions(infos))
    return EXIT_OK


def render_versions(infos: list[VersionInfo]) -> str:
    """A plain text table, newest version first; `*` marks the live one."""
    header = ["", "VERSION", "PARENT", "CREATED", "FACTS", "STATE", *map(str.upper, _SCORE_COLUMNS)]
    rows = [header]
    for info in sorted(infos, key=lambda i: i.version, reverse=True):
        state = info.state
        if info.undone_reason:
            state += f" ({info.undone_reason})"
        if info.rejected_pending:
            state += " [rejected pending]"
        scores = _flat_scores(info.scores)
        rows.append(
            [
                "*" if info.current else "",
                str(info.version),
                "-" if info.parent is None else str(info.parent),
                info.created,
                str(info.n_facts),
                state,
                *(_score(scores.get(k)) for k in _SCORE_COLUMNS),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
    return "\n".join(line.rstrip() for line in lines)


def rollback(args: argparse.Namespace, settings: Settings) -> int:
    """`editd rollback VERSION [--reason R] [--url URL] [--data-dir DIR]`."""
    from editd.daemon.client import DaemonClient, DaemonError, DaemonUnreachable, daemon_url

    reason = getattr(args, "reason", None) or "operator rollback"
    client = DaemonClient(args.url or daemon_url(settings.serve), admin_token(settings))
    try:
        answer = client.rollback(args.version, reason)
    except DaemonUnreachable:
        log.info("no daemon at %s: rolling the stopped store back", client.url)
    except DaemonError as exc:
        print(f"editd: the daemon refused the rollback: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    else:
        print(json.dumps(answer, indent=1))
        return EXIT_OK
    return _rollback_stopped(args.version, reason, settings)


def _rollback_stopped(version: int, reason: str, settings: Settings) -> int:
    store = EditStore(settings.store.data_dir, snapshot_every=settings.store.snapshot_every)
    try:
        store.open()
    except StoreLocked as exc:
        print(
            f"editd: {exc}; its HTTP API did not answer, so the rollback cannot go through it "
            "(pass --url if it listens elsewhere)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except StoreError as exc:
        print(f"editd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    with store:
        before = store.current
        try:
            facts = store.rollback(version, reason)
        except StoreError as exc:
            print(f"editd: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        if not facts and before == version:
            print(f"version {version} is already live; nothing to roll back")
            return EXIT_OK
        topic = settings.kafka.rejected
        # An unreachable broker is an expected outcome here, reported in one line below;
        # kafka-python would log every reconnect attempt at ERROR.
        kafka_log = logging.getLogger("kafka")
        level = kafka_log.level
        kafka_log.setLevel(logging.CRITICAL)
        try:
            published = publish_pending_rejections(store, bootstrap_servers(settings), topic)
        finally:
            kafka_log.setLevel(level)
        pending = sum(len(r.facts) for r in store.pending_rejections())
        print(f"rolled back from version {before} to {version}; {len(facts)} facts undone")
        if published:
            print(f"published {published} facts to {topic}")
        if pending:
            print(
                f"{pending} facts are kept as rejected_pending (no broker answered); the daemon "
                f"publishes them to {topic} when it starts"
            )
    return EXIT_OK


def bootstrap_servers(settings: Settings) -> list[str]:
    """The configured brokers, else the embedded broker's loopback address."""
    return settings.kafka.bootstrap_servers or [f"127.0.0.1:{settings.kafka.embedded_port}"]


def publish_pending_rejections(
    store: EditStore, servers: list[str], topic: str, *, timeout_s: float = 5.0
) -> int:
    """Publish the facts of undone versions not yet on `topic`; mark them published.

    Returns how many facts were published; 0 when no broker answered (they stay pending, to be
    retried later). A version is marked only after all its records were acknowledged, so a
    crash may publish some twice but never loses one.
    """
    pending = store.pending_rejections()
    if not pending:
        return 0
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    ms = int(timeout_s * 1000)
    try:
        producer = KafkaProducer(
            bootstrap_servers=servers,
            acks="all",
            max_block_ms=ms,
            request_timeout_ms=ms,
            delivery_timeout_ms=3 * ms,
            bootstrap_timeout_ms=ms,
        )
    except KafkaError as exc:
        log.warning("cannot reach a broker at %s (%s): rejected facts stay pending", servers, exc)
        return 0
    published = 0
    try:
        for rejection in pending:
            futures = [
                producer.send(topic, key=key, value=value, headers=headers)
                for key, value, headers in rejected_messages(rejection)
            ]
            producer.flush(timeout=timeout_s)
            for future in futures:
                future.get(timeout=timeout_s)
            store.mark_rejections_published([rejection.version])
            published += len(futures)
    except KafkaError as exc:
        log.warning(
            "publishing rejected facts to %s failed (%s); the rest stay pending", topic, exc
        )
    finally:
        producer.close(timeout=timeout_s)
    return published


def _flat_scores(scores: dict[str, Any] | None) -> dict[str, Any]:
    # The evaluator may nest scores by set ({"applied": {"es": ...}}); the table shows the
    # applied sample's, or the top level's when flat.
    if not scores:
        return {}
    applied = scores.get("applied")
    return applied if isinstance(applied, dict) else scores


def _score(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.3f}"
    return "-"

"""`editd versions` and `editd rollback`.

`versions` reads the store directly (read-only, no lock), so it works whether or not the
daemon runs. `rollback` asks the running daemon first (`POST /v1/rollback`): only the daemon
can swap the served weights. When nothing listens there, it rolls the stopped store back
itself, through the store's one rollback (`EditStore.rollback`, the daemon's too), and checks
the version it made live as the daemon checks a rollback: its fingerprint (the weights' sha256,
the gated memory's chain) rebuilt from disk against its manifest (`EditStore.check_served`), so
a version that would not restore is reported now (exit 6), not at the daemon's next start. The
undone facts are in the store's outbox then, published to the rejected topic at once if a broker
answers, else by the daemon when it starts (`consumers.rejected`, the one publisher of that
topic).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from editd.config import SCORE_NAMES, Settings, admin_token
from editd.consumers.publish import bootstrap_servers_for
from editd.consumers.rejected import drain
from editd.consumers.security import client_options
from editd.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_RESTORE_FAILED
from editd.store.store import (
    EditStore,
    RestoreFailed,
    StoreCorrupt,
    StoreError,
    StoreLocked,
    StoreNotFound,
)

log = logging.getLogger(__name__)


# Scores shown as table columns when the evaluator recorded them under these keys.
_SCORE_COLUMNS = SCORE_NAMES


def list_versions(args: argparse.Namespace, settings: Settings) -> int:
    """`editd versions [--json] [--data-dir DIR]`: list every version, undone ones too."""
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
        infos = store.listing()
    if getattr(args, "json", False):
        print(json.dumps(infos, indent=1))
    else:
        print(render_versions(infos))
    return EXIT_OK


def render_versions(infos: list[dict[str, Any]]) -> str:
    """A plain text table, newest version first; `*` marks the live one."""
    header = ["", "VERSION", "PARENT", "CREATED", "FACTS", "STATE", *map(str.upper, _SCORE_COLUMNS)]
    rows = [header]
    for info in sorted(infos, key=lambda i: i["version"], reverse=True):
        state = info["state"]
        if info.get("consolidated"):
            # No facts of its own: it re-solved every live fact of its parent's lineage.
            state += " [consolidation]"
        if info["undone_reason"]:
            state += f" ({info['undone_reason']})"
        if info["rejected_pending"]:
            state += " [rejected pending]"
        scores = _flat_scores(info["scores"])
        rows.append(
            [
                "*" if info["current"] else "",
                str(info["version"]),
                "-" if info["parent"] is None else str(info["parent"]),
                info["created"],
                str(info["facts"]),
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
        if getattr(args, "json", False):
            print(json.dumps(answer, indent=1))
        else:
            print(render_rollback(answer, client.url))
        return EXIT_OK
    return _rollback_stopped(args.version, reason, settings)


def render_rollback(answer: dict[str, Any], url: str) -> str:
    """The daemon's rollback answer for people: what is served now and what was undone."""
    before, after = answer.get("from"), answer.get("to", answer.get("version"))
    if before is None:
        return f"the daemon at {url} serves version {after}"
    if before == after:
        return f"version {after} is already live on the daemon at {url}; nothing to roll back"
    facts = answer.get("facts")
    undone = "" if facts is None else f"; {facts} facts undone, sent to the rejected topic"
    return f"the daemon at {url} rolled back from version {before} to {after}{undone}"


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
            records = store.rollback(version, reason)
        except StoreError as exc:
            print(f"editd: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        try:
            # What the daemon will serve at its next start, checked as a live rollback checks
            # what it swapped in; the handle's fingerprint there, the store's rebuild here.
            store.check_served(version, store.fingerprint(version), f"version {version}")
        except (RestoreFailed, StoreCorrupt) as exc:
            print(
                f"editd: rolled back to version {version}, but it does not restore: {exc}; "
                "roll back further or restore the data dir from a backup",
                file=sys.stderr,
            )
            return EXIT_RESTORE_FAILED
        facts = [f for r in records for f in r.facts]
        if not records and before == version:
            print(f"version {version} is already live; nothing to roll back")
            return EXIT_OK
        topic = settings.kafka.rejected
        # An unreachable broker is an expected outcome here, reported in one line below;
        # kafka-python would log every reconnect attempt at ERROR.
        kafka_log = logging.getLogger("kafka")
        level = kafka_log.level
        kafka_log.setLevel(logging.CRITICAL)
        try:
            published = drain(
                store.outbox,
                bootstrap_servers_for(settings.kafka),
                topic,
                options=client_options(settings.kafka),
            )
        finally:
            kafka_log.setLevel(level)
        pending = store.outbox.facts_pending()
        print(f"rolled back from version {before} to {version}; {len(facts)} facts undone")
        if published:
            print(f"published {published} facts to {topic}")
        if pending:
            print(
                f"{pending} facts are kept in the outbox (no broker answered); the daemon "
                f"publishes them to {topic} when it starts"
            )
    return EXIT_OK


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

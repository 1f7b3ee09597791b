"""`editd run --role replica`: serve the editor's versions, following the update log.

A replica has no fact consumer, no editor and no C0. It loads the same base model, opens an
edit store of its own (its data dir; empty is fine: it rebuilds from the log), and applies what
the editor publishes on `kafka.updates_topic` (consumers/updates.py), strictly in log order:

- a `version` record is reassembled and its checksum checked by the reader, then
  `VersionedModel.ingest` keeps it only if base + lineage + its factors rebuild exactly the
  sha256 the editor's manifest names; nothing is served yet;
- a `current` record makes that version live through `VersionedModel.follow`: durable in the
  replica's store, swapped under the same read/write lock as the editor's, checked bit for bit.
  The editor publishes a current record only after the version is durable in its own store,
  so a replica never serves a version the editor could lose.

A record that fails a check is refused: the replica keeps serving its last good version,
`/readyz` says `accepting_versions: false` and why, and `editd_update_log_refused_total`
counts it, until a later current record applies. Its position on the log is kept in
`follow.json` beside its store, written after each current record (a record boundary, which
the publisher flushes before it sends anything else), so a restart resumes there; replays are
harmless because a version already held and the version already served are recognised.

A replica is ready once it has read the log to its end after starting (a fresh one never
serves the base model to users while it catches up), and stays ready while it follows.

A replica follows one editor: the store id every record names (consumers/updates.py), the
first it reads unless `follow.json` says which. A record of another editor is refused, as a
corrupt one is, until a `takeover` record names that editor: then the replica drops every
version after the base (`VersionedModel.drop_lineage`: served weights and store), counts it
in `editd_update_log_takeovers_total`, says so in `/v1/status` and `/readyz` (`editor`,
`took_over`), is not ready until it has read the log to its end again, and from then on
ignores the old editor's records. Two editors' versions are never served mixed.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from editd import durable
from editd.config import Settings
from editd.consumers.security import KafkaSecurityError, client_options
from editd.consumers.updates import TAKEOVER, VERSION, LogRecord, Refusal, UpdateLogReader
from editd.daemon.boot import (
    Daemon,
    StoreFailure,
    follow_servers,
    load_handle,
    open_versioned,
    replica_modules,
)
from editd.daemon.errors import Conflict, FatalError
from editd.daemon.serving import Serving
from editd.exitcodes import EXIT_DISK_FULL, EXIT_FATAL, EXIT_KAFKA, EXIT_OK
from editd.monitoring.metrics import Metrics
from editd.store.store import UpdateRefused
from editd.store.wire import WireError, decode_current, decode_version
from editd.versions import RestoreFailed, VersionedModel

log = logging.getLogger(__name__)

POSITION_FILE = "follow.json"
NOT_HERE = "this is a replica: {what} on the editor (it publishes the result to the update log)"


class Follower:
    """Reads the update log and applies it to a versioned model; `run` until `stop`."""

    def __init__(
        self,
        model: VersionedModel,
        servers: list[str],
        settings: Settings,
        metrics: Metrics,
        *,
        on_fatal: Any = None,
        on_version: Any = None,
    ) -> None:
        self.model = model
        self.servers = servers
        self.kafka = settings.kafka
        self.metrics = metrics
        self.on_fatal = on_fatal
        self.on_version = on_version  # called after the served version changed, outside locks
        self.position_file = Path(model.store.root) / POSITION_FILE
        saved = self._read_saved()
        self.position = int(saved.get("offset", 0))
        # The editor (store id) whose versions this replica holds; unknown until a record says.
        self.editor: str | None = saved.get("editor")
        self.editor_known = "editor" in saved
        self.superseded: set[str | None] = {
            None if e == "" else e for e in saved.get("superseded", [])
        }
        self.took_over: dict[str, Any] | None = saved.get("took_over")
        self.caught_up = False
        self.accepting = True
        self.refused: dict[str, Any] | None = None  # the last refusal, kept for the operator
        self.lag: int | None = None
        self.log_version: int | None = None  # the version the last current record named
        self.applied_at: float | None = None
        self.disk_full: OSError | None = None
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        from kafka.errors import KafkaError

        reader: UpdateLogReader | None = None
        while not self._stop.is_set():
            try:
                if reader is None:
                    reader = UpdateLogReader(
                        self.servers,
                        self.kafka.updates_topic,
                        start_offset=self.position,
                        chunk_bytes=self.kafka.update_chunk_bytes,
                        options=client_options(self.kafka),
                    )
                    log.info(
                        "following %s from offset %d (serving version %d)",
                        self.kafka.updates_topic,
                        self.position,
                        self.model.current,
                    )
                for item in reader.poll(0.5):
                    self._handle(item)
                    if self._stop.is_set():
                        break
                self.lag = reader.lag()
                if self.lag is not None:
                    self.metrics.update_log_lag.set(self.lag)
                    if self.lag == 0 and not self.caught_up:
                        self.caught_up = True
                        log.info(
                            "caught up with the update log: serving version %d", self.model.current
                        )
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # Nothing half-written is served: the store writes temp, fsync, rename, and
                # the record is read again after a restart.
                self.disk_full = exc
                log.critical(
                    "the data dir %s is full (%s): stopping; free space and restart",
                    self.model.store.root,
                    exc.strerror,
                )
                break
            except KafkaError as exc:
                log.warning("update log: %s; reconnecting", exc)
                if reader is not None:
                    reader.close()
                reader = None
                self._stop.wait(1.0)
        if reader is not None:
            reader.close()

    def _handle(self, item: LogRecord | Refusal) -> None:
        if isinstance(item, Refusal):
            self._refuse(item.version, item.offset, item.why)
            return
        if not self.editor_known:
            self.editor, self.editor_known = item.editor, True
            log.info("following editor store %s", item.editor or "without an id")
        if item.kind == TAKEOVER:
            self._take_over(item)
            return
        if self.editor is None and item.editor is not None and item.editor not in self.superseded:
            # The editor from before store ids, upgraded: it writes its id only on a log its
            # state file says it wrote (UpdateLogPublisher.claim), so this is the same lineage.
            log.info("the editor names its store now: %s", item.editor)
            self.editor = item.editor
        if item.editor != self.editor:
            if item.editor in self.superseded:
                log.debug("update log: ignoring a record of editor %s (taken over)", item.editor)
                return
            self._refuse(
                item.version,
                item.first_offset,
                f"written by editor store {item.editor or 'without an id'}, not by "
                f"{self.editor or 'the editor without an id'} whose versions this replica "
                f"serves; two editors' versions are never mixed (the new editor takes the log "
                f"over with --take-over-updates-log)",
            )
            return
        try:
            if item.kind == VERSION:
                record, factors, base = decode_version(item.payload)
                if record.version != item.version:
                    raise WireError(
                        f"the chunks name version {item.version}, the record {record.version}"
                    )
                if self.model.ingest(record, factors, base):
                    log.info("version %d received (%d bytes)", record.version, len(item.payload))
                return
            current = decode_current(item.payload)
            before = self.model.current
            undone = self.model.follow(current)
        except (WireError, UpdateRefused) as exc:
            self._refuse(item.version, item.first_offset, str(exc))
            return
        except RestoreFailed as exc:
            error = FatalError(f"update log: {exc}")
            if self.on_fatal is not None:
                self.on_fatal(error)
            self.stop()
            return
        self.position = item.next_offset
        self._save()
        self.accepting = True
        self.log_version = current.version
        self.applied_at = time.time()
        self.metrics.update_log_version.set(current.version)
        if current.version != before:
            if self.on_version is not None:
                self.on_version()
            if undone:
                log.warning(
                    "serving version %d: the editor rolled back %s (%s)",
                    current.version,
                    undone,
                    current.reason,
                )
            else:
                log.info("serving version %d", current.version)

    def _refuse(self, version: int | None, offset: int, why: str) -> None:
        self.metrics.update_log_refused.inc()
        self.accepting = False
        self.refused = {"version": version, "offset": offset, "why": why, "at": time.time()}
        log.error(
            "update log: refused the record at offset %d (version %s): %s; still serving "
            "version %d",
            offset,
            version,
            why,
            self.model.current,
        )

    def _take_over(self, item: LogRecord) -> None:
        """Another editor takes the log over: drop the old lineage, follow the new one."""
        if item.editor == self.editor or item.editor in self.superseded:
            return  # read again (a replay from an earlier offset), or an older takeover
        previous = self.editor
        try:
            dropped = self.model.drop_lineage()
        except RestoreFailed as exc:
            error = FatalError(f"update log takeover: {exc}")
            if self.on_fatal is not None:
                self.on_fatal(error)
            self.stop()
            return
        # The store is back at the base before the new editor is remembered: a crash between
        # the two reads the takeover record again and drops again.
        self.superseded.add(previous)
        self.editor = item.editor
        self.took_over = {
            "from": previous,
            "to": item.editor,
            "offset": item.first_offset,
            "dropped": dropped,
            "at": time.time(),
        }
        self.position = item.next_offset
        self._save()
        self.metrics.update_log_takeovers.inc()
        self.metrics.update_log_version.set(0)
        self.caught_up = False  # not ready until the new editor's versions are read
        self.accepting, self.refused, self.log_version = True, None, None
        if self.on_version is not None:
            self.on_version()
        log.warning(
            "update log taken over by editor store %s (was %s): dropped versions %s; "
            "rebuilding from the base with the new editor's versions",
            item.editor or "without an id",
            previous or "without an id",
            dropped,
        )

    def _save(self) -> None:
        state = {
            "topic": self.kafka.updates_topic,
            "offset": self.position,
            "editor": self.editor,
            "superseded": sorted("" if e is None else e for e in self.superseded),
            "took_over": self.took_over,
        }
        durable.write_bytes(self.position_file, json.dumps(state).encode())

    def _read_saved(self) -> dict[str, Any]:
        try:
            saved = json.loads(self.position_file.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            log.warning(
                "%s is unreadable; reading the update log from its start", self.position_file
            )
            return {}
        if not isinstance(saved, dict) or saved.get("topic") != self.kafka.updates_topic:
            return {}
        return saved

    def status(self) -> dict[str, Any]:
        return {
            "topic": self.kafka.updates_topic,
            "position": self.position,
            "lag_records": self.lag,
            "caught_up": self.caught_up,
            "log_version": self.log_version,
            "accepting_versions": self.accepting,
            "refused": self.refused,
            "editor": self.editor,
            "took_over": self.took_over,
        }


class ReplicaService(Serving):
    """`api.Service` of a replica: serves completions; the admin calls live on the editor. It
    owns its `Follower`, which the daemon runs (`Daemon.consume`)."""

    def __init__(
        self, settings: Settings, model: VersionedModel, metrics: Metrics, servers: list[str]
    ) -> None:
        super().__init__(settings, model, metrics)
        self.follower = Follower(
            model,
            servers,
            settings,
            metrics,
            on_fatal=self.on_fatal,
            on_version=self.refresh_capacity,
        )

        def changed(version: int) -> None:
            metrics.model_version.set(version)
            self.gauge_memory()

        model.on_change = changed
        metrics.model_version.set(model.current)
        self.refresh_capacity()

    def is_ready(self) -> bool:
        return self._fatal is None and self.follower.caught_up

    def readiness(self) -> dict[str, Any]:
        f = self.follower
        return {
            "role": "replica",
            "lag_records": f.lag,
            "accepting_versions": f.accepting,
            "why": (f.refused or {}).get("why") if not f.accepting else None,
            "editor": f.editor,
            "took_over": f.took_over,
        }

    def rollback(self, version: int, reason: str) -> dict[str, Any]:
        raise Conflict(NOT_HERE.format(what="roll back"))

    def evaluate_now(self) -> dict[str, Any]:
        raise Conflict(NOT_HERE.format(what="evaluate"))

    def consolidate(self) -> dict[str, Any]:
        raise Conflict(NOT_HERE.format(what="consolidate"))

    def metrics_payload(self) -> bytes:
        return generate_latest(self.metrics.registry)

    def status(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "role": "replica",
            "version": self.model.current,
            "memory": self.memory_status(),
            "ready": self.is_ready(),
            "fatal": str(self._fatal) if self._fatal else None,
            "served_sha256": self.model.served_sha256(),
            "follow": self.follower.status(),
        }


def serve_replica(daemon: Daemon) -> int:
    """The replica's part of `editd run` (HTTP is served and the signals are installed):
    the model, a store of its own, then follow the update log until stopped."""
    settings = daemon.settings
    try:
        servers = follow_servers(settings)
    except KafkaSecurityError as exc:
        log.error("kafka: %s", exc)
        return EXIT_KAFKA
    handle = load_handle(settings)
    try:
        model = open_versioned(settings, handle, modules=replica_modules(settings, handle))
    except StoreFailure as exc:
        log.error("%s", exc)
        return exc.code
    daemon.on_stop(model.close)
    service = ReplicaService(settings, model, daemon.metrics, servers)
    daemon.serve(service)
    if daemon.stopping:
        return EXIT_OK
    log.info(
        "replica: serving version %d, following %s on %s",
        model.current,
        settings.kafka.updates_topic,
        ",".join(servers),
    )
    daemon.consume(service.follower)
    if service.follower.disk_full is not None:
        return EXIT_DISK_FULL
    if service.fatal:
        log.error("stopped: %s", service.fatal)
        return EXIT_FATAL
    log.info("stopped cleanly at version %d", model.current)
    return EXIT_OK

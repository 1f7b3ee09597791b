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
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from editd import durable
from editd.config import Settings
from editd.consumers.security import KafkaSecurityError, check_connection, client_options
from editd.consumers.updates import VERSION, LogRecord, Refusal, UpdateLogReader
from editd.daemon.errors import Conflict, FatalError
from editd.daemon.serving import Serving
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
    ) -> None:
        self.model = model
        self.servers = servers
        self.kafka = settings.kafka
        self.metrics = metrics
        self.on_fatal = on_fatal
        self.position_file = Path(model.store.root) / POSITION_FILE
        self.position = self._read_position()
        self.caught_up = False
        self.accepting = True
        self.refused: dict[str, Any] | None = None  # the last refusal, kept for the operator
        self.lag: int | None = None
        self.log_version: int | None = None  # the version the last current record named
        self.applied_at: float | None = None
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
        durable.write_bytes(
            self.position_file,
            json.dumps({"topic": self.kafka.updates_topic, "offset": self.position}).encode(),
        )
        self.accepting = True
        self.log_version = current.version
        self.applied_at = time.time()
        self.metrics.update_log_version.set(current.version)
        if current.version != before:
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

    def _read_position(self) -> int:
        try:
            saved = json.loads(self.position_file.read_text())
        except FileNotFoundError:
            return 0
        except ValueError:
            log.warning(
                "%s is unreadable; reading the update log from its start", self.position_file
            )
            return 0
        if saved.get("topic") != self.kafka.updates_topic:
            return 0
        return int(saved.get("offset", 0))

    def status(self) -> dict[str, Any]:
        return {
            "topic": self.kafka.updates_topic,
            "position": self.position,
            "lag_records": self.lag,
            "caught_up": self.caught_up,
            "log_version": self.log_version,
            "accepting_versions": self.accepting,
            "refused": self.refused,
        }


class ReplicaService(Serving):
    """`api.Service` of a replica: serves completions; the admin calls live on the editor."""

    def __init__(self, settings: Settings, model: VersionedModel, metrics: Metrics) -> None:
        super().__init__(settings, model, metrics)
        self.follower: Follower | None = None

        def changed(version: int) -> None:
            metrics.model_version.set(version)
            self.gauge_memory()

        model.on_change = changed
        metrics.model_version.set(model.current)

    def is_ready(self) -> bool:
        return self._fatal is None and self.follower is not None and self.follower.caught_up

    def readiness(self) -> dict[str, Any]:
        f = self.follower
        return {
            "role": "replica",
            "lag_records": f.lag if f else None,
            "accepting_versions": f.accepting if f else False,
            "why": (f.refused or {}).get("why") if f and not f.accepting else None,
        }

    def rollback(self, version: int, reason: str) -> dict[str, Any]:
        raise Conflict(NOT_HERE.format(what="roll back"))

    def evaluate_now(self) -> dict[str, Any]:
        raise Conflict(NOT_HERE.format(what="evaluate"))

    def consolidate(self) -> dict[str, Any]:
        raise Conflict(NOT_HERE.format(what="consolidate"))

    def metrics_payload(self) -> bytes:
        self.export_capacity()
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
            "follow": self.follower.status() if self.follower else None,
        }


def serve_replica(
    settings: Settings,
    metrics: Metrics,
    proxy: Any,
    stop: threading.Event,
    stoppers: list[Any],
    stack: ExitStack,
) -> int:
    """The replica's part of `editd run` (main.run has bound HTTP and installed the signals)."""
    from editd.daemon.main import (
        EXIT_FATAL,
        EXIT_KAFKA,
        EXIT_OK,
        StoreFailure,
        load_handle,
        open_versioned,
    )
    from editd.editing.editor import EditorConfig

    kafka = settings.kafka
    # No servers: the editor's embedded broker on this machine.
    servers = list(kafka.bootstrap_servers) or [f"127.0.0.1:{kafka.embedded_port}"]
    try:
        check_connection(servers, kafka)
    except KafkaSecurityError as exc:
        log.error("kafka: %s", exc)
        return EXIT_KAFKA
    path, handle = load_handle(settings)
    # The editor's modules, from the same settings and profile: the first version record
    # names any difference (see EditStore.ingest).
    config = EditorConfig.from_settings(settings.editing, path)
    modules = [handle.module_name(i) for i in (config.layers or handle.default_layers())]
    try:
        model = open_versioned(settings, handle, modules=sorted(modules))
    except StoreFailure as exc:
        log.error("%s", exc)
        return exc.code
    stack.callback(model.close)
    service = ReplicaService(settings, model, metrics)
    follower = Follower(model, servers, settings, metrics, on_fatal=service.on_fatal)
    service.follower = follower
    proxy.target = service
    stoppers.append(follower)
    if stop.is_set():
        return EXIT_OK
    log.info(
        "replica: serving version %d, following %s on %s",
        model.current,
        kafka.updates_topic,
        ",".join(servers),
    )
    follower.run()
    if service.fatal:
        log.error("stopped: %s", service.fatal)
        return EXIT_FATAL
    log.info("stopped cleanly at version %d", model.current)
    return EXIT_OK

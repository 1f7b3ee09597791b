"""`editd run`: bind the port, build the service, serve until a signal.

The parts and their order are daemon/boot.py's; this is the editor's sequence (a replica's is
daemon/replica.py's `serve_replica`). Signals are handled only here: the first SIGTERM/SIGINT
stops intake and lets the in-flight edit finish (its version becomes durable and its offsets
committed); a second one exits at once, which is safe too: an edit that was not durable is
replayed. Exit codes name why the daemon stopped (editd/exitcodes.py; README lists them).
"""

from __future__ import annotations

import argparse
import logging

from editd.config import Settings
from editd.consumers.broker import BrokerError
from editd.consumers.consumer import BatchFailed
from editd.consumers.security import KafkaSecurityError
from editd.daemon import boot
from editd.daemon.replica import serve_replica
from editd.daemon.server import HttpServer
from editd.exitcodes import (
    EXIT_BIND,
    EXIT_DISK_FULL,
    EXIT_FAILURE,
    EXIT_FATAL,
    EXIT_KAFKA,
    EXIT_OK,
    EXIT_UPDATE_LOG_TAKEN,
)

log = logging.getLogger("editd")


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        server = HttpServer.bind(settings.serve.host, settings.serve.port)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", settings.serve.host, settings.serve.port, exc)
        return EXIT_BIND
    settings = boot.with_admin_token(settings)
    boot.quiet_kafka_logs()
    daemon = boot.Daemon(settings, server)
    daemon.install_signals()
    try:
        daemon.serve_http()
        if settings.role == "replica":
            return serve_replica(daemon)
        return serve_editor(daemon)
    finally:
        daemon.stop()


def serve_editor(daemon: boot.Daemon) -> int:
    """The editor: Kafka, the model and its editor, the versioned store, the service with its
    publishers and (in the background) evaluator and C0, then consume until stopped."""
    settings = daemon.settings
    try:
        kafka = boot.start_kafka(settings)
    except BrokerError as exc:
        log.error("embedded broker: %s", exc)
        return EXIT_FAILURE
    except KafkaSecurityError as exc:
        log.error("kafka: %s", exc)
        return EXIT_KAFKA
    if kafka.embedded is not None:
        daemon.on_stop(kafka.embedded.stop)
    # The model loads here, after the socket and the broker are up.
    handle = boot.load_handle(settings)
    editor = boot.build_editor(settings, handle)
    try:
        model = boot.open_versioned(settings, handle, editor=editor)
    except boot.StoreFailure as exc:
        log.error("%s", exc)
        return exc.code
    daemon.on_stop(model.close)
    service = boot.build_edit_service(
        settings, model, daemon.metrics, kafka.servers, on_stop=daemon.request_stop
    )
    boot.claim_update_log(service)
    service.start()
    daemon.on_stop(service.stop)
    daemon.on_stop(lambda: service.evaluator.stop() if service.evaluator else None)
    service.prepare_in_background(
        first=lambda: boot.start_guards(settings, service, daemon.metrics)
    )
    daemon.serve(service)
    if service.updates.taken is not None:
        return EXIT_UPDATE_LOG_TAKEN
    if daemon.stopping:
        return EXIT_FATAL if service.fatal else EXIT_OK
    consumer = boot.build_fact_consumer(settings, service, kafka.servers)
    log.info(
        "ready: version %d, consuming %s on %s",
        service.current_version(),
        settings.kafka.topic,
        ",".join(kafka.servers),
    )
    try:
        daemon.consume(consumer)
    except BatchFailed as exc:
        if service.disk_full is not None:
            return EXIT_DISK_FULL
        log.error("stopping: %s", exc)
        return EXIT_FATAL if service.fatal else EXIT_FAILURE
    except KafkaSecurityError as exc:
        log.error("kafka: %s", exc)
        return EXIT_KAFKA
    if service.updates.taken is not None:
        log.error("stopped: %s", service.updates.taken)
        return EXIT_UPDATE_LOG_TAKEN
    if service.fatal:
        log.error("stopped: %s", service.fatal)
        return EXIT_FATAL
    log.info("stopped cleanly at version %d", service.current_version())
    return EXIT_OK

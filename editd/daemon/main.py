"""`editd run`: the daemon, wired top to bottom.

settings → bind the HTTP socket (fail in milliseconds, not after loading a model) → broker →
serve /livez while loading → model, editor → the versioned model restores the current version
(ready from here) → C0 in the background → evaluator → consume until a signal. Signals are
handled only here: the first SIGTERM/SIGINT stops intake and lets the in-flight edit finish
(its version becomes durable and its offsets committed); a second one exits at once, which is
safe too: an edit that was not durable is replayed. Exit codes name why the daemon stopped
(editd/exitcodes.py; README lists them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import secrets
import signal
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from kafka.errors import KafkaError
from prometheus_client import generate_latest
from pydantic import SecretStr

from editd import durable
from editd.config import TOKEN_FILE, Settings, admin_token
from editd.consumers.broker import (
    BrokerError,
    EmbeddedBroker,
    default_topics,
    embedded_storage_dir,
    ensure_topics,
    ensure_update_log,
)
from editd.consumers.consumer import BatchFailed, FactConsumer
from editd.consumers.security import KafkaSecurityError, check_connection, client_options
from editd.daemon.api import create_app
from editd.daemon.errors import FatalError, Unavailable
from editd.daemon.server import HttpServer
from editd.daemon.service import Canary, EditService, base_reading, measure
from editd.exitcodes import (
    EXIT_BIND,
    EXIT_DISK_FULL,
    EXIT_FAILURE,
    EXIT_FATAL,
    EXIT_INTERRUPTED,
    EXIT_KAFKA,
    EXIT_OK,
    EXIT_RESTORE_FAILED,
    EXIT_STORE_LOCKED,
    EXIT_STORE_MISMATCH,
    EXIT_UPDATE_LOG_TAKEN,
)
from editd.facts import FactUpdate
from editd.monitoring.metrics import Metrics

log = logging.getLogger("editd")

PROBE_SEED = 7_919  # the built-in model's probe facts: fixed, so scores compare across runs


class _Starting:
    """Stands in for the service until the model is loaded: live, not ready, refuses work."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self.target: Any = None  # the EditService, or a replica's ReplicaService

    @property
    def model_name(self) -> str:
        return self._settings.model.name

    def current_version(self) -> int:
        return self.target.current_version() if self.target else 0

    def is_ready(self) -> bool:
        return self.target.is_ready() if self.target else False

    def readiness(self) -> dict[str, Any]:
        return self.target.readiness() if self.target else {"role": self._settings.role}

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self._metrics.observe_request(route, status, seconds)

    def metrics_payload(self) -> bytes:
        if self.target:
            return self.target.metrics_payload()
        return generate_latest(self._metrics.registry)

    def on_fatal(self, error: FatalError) -> None:
        if self.target:
            self.target.on_fatal(error)

    def __getattr__(self, name: str) -> Any:
        if self.target is None:
            raise Unavailable("the model is still loading")
        return getattr(self.target, name)


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        server = HttpServer.bind(settings.serve.host, settings.serve.port)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", settings.serve.host, settings.serve.port, exc)
        return EXIT_BIND
    settings = _with_admin_token(settings)
    # kafka-python logs every reconnect attempt at INFO/ERROR; the consumer reports outages.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))
    stop = threading.Event()
    consumer: list[Any] = []  # what a signal stops: the fact consumer, or a replica's follower
    _install_signals(stop, consumer)
    metrics = Metrics()
    service_proxy = _Starting(settings, metrics)
    with ExitStack() as stack:
        stack.callback(server.stop)
        server.start(create_app(service_proxy, settings.serve))
        log.info("HTTP on %s (not ready until the model is loaded)", server.url)
        if settings.role == "replica":
            from editd.daemon.replica import serve_replica

            return serve_replica(settings, metrics, service_proxy, stop, consumer, stack)
        try:
            servers = _kafka(settings, stack)
        except BrokerError as exc:
            log.error("embedded broker: %s", exc)
            return EXIT_FAILURE
        except KafkaSecurityError as exc:
            log.error("kafka: %s", exc)
            return EXIT_KAFKA
        try:
            service = _load(settings, metrics, servers, stack)
        except StoreFailure as exc:
            log.error("%s", exc)
            return exc.code
        service_proxy.target = service
        service.fatal_hook = lambda _error: _stop_consuming(stop, consumer)
        service.update_log_hook = lambda _error: _stop_consuming(stop, consumer)
        if service.updates.taken is not None:
            return EXIT_UPDATE_LOG_TAKEN
        if stop.is_set():
            return EXIT_FATAL if service.fatal else EXIT_OK
        fc = FactConsumer(
            settings.kafka,
            settings.facts,
            service.apply_batch,
            service.known_fact_ids,
            bootstrap_servers=servers,
        )
        service.attach_consumer(fc.stats, fc.lag)
        consumer.append(fc)
        if stop.is_set():
            fc.stop()
        log.info(
            "ready: version %d, consuming %s on %s",
            service.current_version(),
            settings.kafka.topic,
            ",".join(servers),
        )
        try:
            fc.run()
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


class StoreFailure(Exception):
    """The edit store cannot be served from; `code` is the exit status that names why."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _stop_consuming(stop: threading.Event, consumer: list[Any]) -> None:
    stop.set()
    for c in consumer:
        c.stop()


def _with_admin_token(settings: Settings) -> Settings:
    """Use the configured admin token, or generate one into the data dir (see admin_token)."""
    token = admin_token(settings)
    if token is None:
        data_dir = Path(settings.store.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(24)
        fd = os.open(data_dir / TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        log.info("admin token written to %s", data_dir / TOKEN_FILE)
    serve = settings.serve.model_copy(update={"admin_token": SecretStr(token)})
    return settings.model_copy(update={"serve": serve})


def _install_signals(stop: threading.Event, consumer: list[Any]) -> None:
    def handle(signum: int, _frame: Any) -> None:
        if stop.is_set():
            # Second signal: exit now. Nothing is lost: what is not durable is replayed.
            os._exit(EXIT_INTERRUPTED)
        log.info("%s: finishing the in-flight batch, then stopping", signal.Signals(signum).name)
        _stop_consuming(stop, consumer)

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def _kafka(settings: Settings, stack: ExitStack) -> list[str]:
    kafka = settings.kafka
    if kafka.bootstrap_servers:
        # A wrong CA or password fails here in seconds, naming the setting.
        check_connection(kafka.bootstrap_servers, kafka)
        topics = [*default_topics(kafka), kafka.updates_topic]
        try:
            ensure_topics(
                kafka.bootstrap_servers,
                default_topics(kafka),
                kafka.partitions,
                timeout_s=kafka.connect_timeout_ms / 1000,
                options=client_options(kafka),
            )
            ensure_update_log(kafka.bootstrap_servers, kafka, options=client_options(kafka))
        except (BrokerError, KafkaError) as exc:
            raise KafkaSecurityError(
                f"kafka.topic: cannot create {', '.join(topics)}: {type(exc).__name__}: {exc}"
            ) from exc
        return list(kafka.bootstrap_servers)
    broker = EmbeddedBroker(
        port=kafka.embedded_port,
        # The update log too (Tansu keeps no retention limit; each revive recreates it).
        topics=[*default_topics(kafka), kafka.updates_topic],
        partitions=kafka.partitions,
        storage_dir=embedded_storage_dir(settings),
    )
    broker.start().supervise()
    stack.callback(broker.stop)
    log.info("embedded broker on %s (%s)", broker.bootstrap_servers[0], broker.storage)
    return broker.bootstrap_servers


def _load(
    settings: Settings, metrics: Metrics, servers: list[str], stack: ExitStack
) -> EditService:
    # The model loads here, after the socket and the broker are up (torch itself is imported
    # with this module, which takes a second or two, not the minutes a model can).
    from editd.models.factory import load_model, make_editor
    from editd.models.profile import with_profile
    from editd.models.registry import is_builtin
    from editd.monitoring.evaluator import Evaluator
    from editd.monitoring.policy import Baseline

    handle = load_model(settings)
    path = handle.path
    cache_dir = settings.editing.stats_cache or Path(settings.store.data_dir) / "cache"
    # C0's progress bar goes to the daemon's stderr whether or not a terminal reads it.
    editor = make_editor(handle, settings, cache_dir=cache_dir, progress=True)
    model = open_versioned(settings, handle, editor=editor)
    stack.callback(model.close)
    starting = "the evaluator is starting (scoring the base model)"
    service = EditService(
        settings,
        model,
        metrics,
        bootstrap_servers=servers,
        checks_off=dict.fromkeys(("applied", "probe", "canary"), starting),
    )
    _claim_update_log(service)
    service.start()
    stack.callback(service.stop)
    stack.callback(lambda: service.evaluator.stop() if service.evaluator else None)

    def guards() -> None:
        canary, probes, off = _evaluation_sets(settings, is_builtin(path), handle, cache_dir)
        for check, why in off.items():
            log.warning("the %s check is off: %s", check, why)
        # The base model's scores, read through the base view whatever version is served,
        # so drift is known from the first evaluation even far past version 0.
        base_scores = measure(handle, base_reading(handle), [], probes, canary)
        evaluator: Evaluator[FactUpdate] = Evaluator.from_settings(
            with_profile(settings.eval, path, "eval"),
            score=service.score,
            rollback=service.policy_rollback,
            metrics=metrics,
            probe_facts=probes,
            baseline=Baseline(probe=base_scores.probe, canary=base_scores.canary),
            on_evaluation=service.record_evaluation,
            served_version=lambda: model.current,
        )
        # The applied-fact sample as if the evaluator had run throughout, so thresholds hold
        # from the first evaluation after a restart; under the version lock, so no batch
        # lands between the rebuild and the hand-over.
        with model.changing():
            restored = 0
            for version, facts in model.live_facts():
                evaluator.record_version(
                    version, [FactUpdate.model_validate(f) for f in facts], evaluate=False
                )
                restored += len(facts)
            service.canary = canary
            service.checks_off = off
            service.evaluator = evaluator
        log.info("evaluator on: %d applied facts in its sample", restored)
        evaluator.start()

    service.prepare_in_background(first=guards)
    return service


def _claim_update_log(service: EditService) -> None:
    """Refuse to start on another editor's update log (unless told to take it over) before
    consuming a fact. A broker that cannot say yet leaves the check to the publisher, which
    makes it before it publishes anything and stops the daemon the same way."""
    from kafka.errors import KafkaError

    from editd.consumers.updates import UpdateLogTaken

    try:
        service.updates.claim(timeout_s=30.0)
    except UpdateLogTaken as exc:
        log.error("update log: %s", exc)
        service.updates.taken = exc
    except KafkaError as exc:
        log.warning("update log: cannot check its writer yet (%s); checked before publishing", exc)


def open_versioned(
    settings: Settings, handle: Any, *, editor: Any = None, modules: list[str] | None = None
) -> Any:
    """The `VersionedModel` on the configured store, serving its current version; a store that
    cannot be served from is a `StoreFailure` carrying the exit code that names why."""
    from editd.store.store import StoreError, StoreLocked, StoreMismatch
    from editd.versions import VersionedModel

    try:
        return VersionedModel.open(
            handle,
            Path(settings.store.data_dir),
            editor=editor,
            modules=modules,
            snapshot_every=settings.store.snapshot_every,
        )
    except StoreLocked as exc:
        raise StoreFailure(f"edit store: {exc}", EXIT_STORE_LOCKED) from exc
    except StoreMismatch as exc:
        raise StoreFailure(f"edit store: {exc}", EXIT_STORE_MISMATCH) from exc
    except StoreError as exc:  # RestoreFailed, StoreCorrupt, VersionNotFound
        raise StoreFailure(f"edit store: {exc}", EXIT_RESTORE_FAILED) from exc


def _evaluation_sets(
    settings: Settings, builtin: bool, handle: Any, cache_dir: Path
) -> tuple[Canary | None, list[FactUpdate], dict[str, str]]:
    """Probe facts (must not change), the canary, and the checks that are off and why."""
    from editd.consumers.publish import load_facts

    probes: list[FactUpdate] = []
    if settings.eval.probe_file is not None:
        text = Path(settings.eval.probe_file).read_text(encoding="utf-8")
        probes = list(load_facts(text, settings.facts).facts)
    elif builtin:
        from editd.world.requests import make_requests

        probes = make_requests(settings.eval.probe_size, seed=PROBE_SEED)
    probes = [as_probe(f) for f in probes[: settings.eval.probe_size]]
    if builtin:
        from editd.world.requests import unedited_examples

        pairs = unedited_examples(probes, settings.eval.probe_size, seed=PROBE_SEED)
        return Canary(tuple(p for p, _ in pairs), tuple(o for _, o in pairs)), probes, {}
    canary = _model_canary(handle, cache_dir)
    if not probes:
        from editd.monitoring.canary import own_answer_probes

        own = own_answer_probes(canary.prompts, canary.objects, settings.eval.probe_size)
        probes = [as_probe(f) for f in own]
        log.info("probe set: %d of the canary's prompts, the base model's answers", len(probes))
    off = {} if probes else {"probe": "no probe set: set eval.probe_file to a facts file"}
    return canary, probes, off


def _model_canary(handle: Any, cache_dir: Path) -> Canary:
    """A real model's canary: its own answers to the shipped general-knowledge prompts.

    Asked once per model and prompt set and kept beside C0 (15 s of a start on 2 cores for
    SmolLM2-135M), since they are the unedited model's and never change.
    """
    from editd.editing.scoring import canary_pairs
    from editd.monitoring.canary import canary_prompts

    asked = canary_prompts()
    digest = hashlib.sha256("\n".join(asked).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"canary-{handle.identity}-{digest}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        prompts, answers = saved["prompts"], saved["answers"]
    else:
        # The base model's own answers, whatever version is served by now.
        with handle.reading(), handle.base_view():
            prompts, answers = canary_pairs(handle.model, handle.tokenizer, asked)
        durable.write_bytes(path, json.dumps({"prompts": prompts, "answers": answers}).encode())
    log.info("canary: %d prompts the base model answers itself", len(prompts))
    return Canary(tuple(prompts), tuple(answers))


def as_probe(fact: FactUpdate) -> FactUpdate:
    """A fact that must not change: its own prompts join its neighbourhood, so NS asks that
    the model keeps preferring the true object on all of them."""
    own = (fact.rendered_prompt, *fact.paraphrase_prompts)
    return fact.model_copy(
        update={"neighborhood_prompts": own + fact.neighborhood_prompts, "paraphrase_prompts": ()}
    )

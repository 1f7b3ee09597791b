"""How `editd run` is put together: the daemon's lifetime (`Daemon`), the state the API answers
from while the model loads (`Loading`), and one builder per collaborator, each handed what it
needs.

The order, for the editor (daemon/main.py) and the replica (daemon/replica.py) alike: bind the
HTTP socket (a taken port fails in milliseconds, not after loading a model) and serve `/livez`
from `Loading` → Kafka → model → versioned model on the store (ready from here: the API answers
from the real service) → consume until a stop. `Daemon.stop` owns shutdown, in the order that
keeps the guarantees: stop consuming and let the in-flight edit finish (its version durable,
its offsets committed), then close what was started, newest first (evaluator, publishers, the
store, the broker), the HTTP server last, so `/readyz` answers until the end.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import generate_latest
from pydantic import SecretStr

from editd.config import TOKEN_FILE, Settings, admin_token
from editd.daemon.api import Service, create_app
from editd.daemon.errors import FatalError, Unavailable
from editd.daemon.generation import Completion, Generator, Prompt, SamplingParams, Stream
from editd.daemon.server import HttpServer
from editd.exitcodes import (
    EXIT_INTERRUPTED,
    EXIT_RESTORE_FAILED,
    EXIT_STORE_LOCKED,
    EXIT_STORE_MISMATCH,
)
from editd.facts import FactUpdate
from editd.monitoring.metrics import Metrics

if TYPE_CHECKING:
    from editd.daemon.service import EditService
    from editd.monitoring.evaluator import Evaluator
    from editd.monitoring.policy import Measurement
    from editd.monitoring.quality import EvaluationSets

log = logging.getLogger("editd")

LOADING = "the model is still loading"


class Consumer(Protocol):
    """What a daemon consumes with: the fact consumer (editor) or the update-log follower
    (replica). `run` blocks until `stop`, which any thread may call."""

    def run(self) -> None: ...

    def stop(self) -> None: ...


class StoreFailure(Exception):
    """The edit store cannot be served from; `code` is the exit status that names why."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# -- the state before the model is loaded ----------------------------------------------------


class Loading:
    """`api.Service` until the model is loaded: live, not ready, version 0; the metrics are
    served, and every call that needs the model is a 503 (`Unavailable`)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics

    @property
    def model_name(self) -> str:
        return self._settings.model.name

    def current_version(self) -> int:
        return 0

    def is_ready(self) -> bool:
        return False

    def readiness(self) -> dict[str, Any]:
        return {"role": self._settings.role}

    @property
    def generator(self) -> Generator:
        raise Unavailable(LOADING)

    def complete(self, prompts: list[Prompt], params: SamplingParams) -> Completion:
        raise Unavailable(LOADING)

    def stream(self, prompts: list[Prompt], params: SamplingParams) -> Stream:
        raise Unavailable(LOADING)

    def stream_ended(self, stream: Stream) -> None:
        raise Unavailable(LOADING)

    def versions(self) -> list[dict[str, Any]]:
        raise Unavailable(LOADING)

    def rollback(self, version: int, reason: str) -> dict[str, Any]:
        raise Unavailable(LOADING)

    def consolidate(self) -> dict[str, Any]:
        raise Unavailable(LOADING)

    def metrics_payload(self) -> bytes:
        return generate_latest(self._metrics.registry)

    def status(self) -> dict[str, Any]:
        raise Unavailable(LOADING)

    def evaluate_now(self) -> dict[str, Any]:
        raise Unavailable(LOADING)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self._metrics.observe_request(route, status, seconds)

    def on_fatal(self, error: FatalError) -> None:
        pass  # nothing is served yet that an error could have made untrustworthy


class ServiceSlot:
    """The `api.Service` the HTTP app is built with: answers from `Loading` until the daemon
    hands it the loaded service (`Daemon.serve`), then from that, for good."""

    def __init__(self, state: Service) -> None:
        self.state = state

    @property
    def model_name(self) -> str:
        return self.state.model_name

    def current_version(self) -> int:
        return self.state.current_version()

    def is_ready(self) -> bool:
        return self.state.is_ready()

    def readiness(self) -> dict[str, Any]:
        return self.state.readiness()

    @property
    def generator(self) -> Generator:
        return self.state.generator

    def complete(self, prompts: list[Prompt], params: SamplingParams) -> Completion:
        return self.state.complete(prompts, params)

    def stream(self, prompts: list[Prompt], params: SamplingParams) -> Stream:
        return self.state.stream(prompts, params)

    def stream_ended(self, stream: Stream) -> None:
        self.state.stream_ended(stream)

    def versions(self) -> list[dict[str, Any]]:
        return self.state.versions()

    def rollback(self, version: int, reason: str) -> dict[str, Any]:
        return self.state.rollback(version, reason)

    def consolidate(self) -> dict[str, Any]:
        return self.state.consolidate()

    def metrics_payload(self) -> bytes:
        return self.state.metrics_payload()

    def status(self) -> dict[str, Any]:
        return self.state.status()

    def evaluate_now(self) -> dict[str, Any]:
        return self.state.evaluate_now()

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.state.observe_request(route, status, seconds)

    def on_fatal(self, error: FatalError) -> None:
        self.state.on_fatal(error)


# -- the daemon's lifetime -------------------------------------------------------------------


class Daemon:
    """One `editd run`: the bound HTTP server, what was started after it, the service the API
    answers from, and the consumer the main thread runs. `stop()` owns shutdown."""

    def __init__(self, settings: Settings, server: HttpServer) -> None:
        self.settings = settings
        self.server = server
        self.metrics = Metrics()
        self.api = ServiceSlot(Loading(settings, self.metrics))
        self._stopping = threading.Event()
        self._consumers: list[Consumer] = []
        self._consumed = threading.Event()
        self._started = ExitStack()

    def serve_http(self) -> None:
        """Answer on the bound socket: live now, ready once `serve` hands over a service."""
        self._started.callback(self.server.stop)
        self.server.start(create_app(self.api, self.settings.serve))
        log.info("HTTP on %s (not ready until the model is loaded)", self.server.url)

    def on_stop(self, close: Callable[[], object]) -> None:
        """Close `close` at `stop`, before everything started earlier."""
        self._started.callback(close)

    def serve(self, service: Service) -> None:
        """From now on the API answers from `service` (the loaded model)."""
        self.api.state = service

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def consume(self, consumer: Consumer) -> None:
        """Run `consumer` on this thread until it returns: stopped, or failed (its error
        propagates). A stop asked for before it started stops it at once."""
        self._consumers.append(consumer)
        # After the append: a stop that came before it is seen here, one after it stops the
        # consumer itself (`request_stop` takes no lock, so a signal handler can call it).
        if self._stopping.is_set():
            consumer.stop()
        try:
            consumer.run()
        finally:
            self._consumed.set()

    def request_stop(self, _why: object = None) -> None:
        """Stop consuming: the consumer finishes its in-flight edit and returns. Returns at
        once; any thread and a signal handler may call it."""
        self._stopping.set()
        for consumer in list(self._consumers):
            consumer.stop()

    def stop(self, timeout: float | None = None) -> None:
        """Shut down: stop consuming, wait (up to `timeout`) for the in-flight edit when
        another thread consumes, then close what was started, newest first, HTTP last."""
        self.request_stop()
        if self._consumers and not self._consumed.is_set():
            self._consumed.wait(timeout)
        self._started.close()

    def install_signals(self) -> None:
        """The first SIGTERM/SIGINT stops consuming (the in-flight edit finishes); a second one
        exits at once, which is safe too: an edit that was not durable is replayed."""

        def handle(signum: int, _frame: Any) -> None:
            if self.stopping:
                os._exit(EXIT_INTERRUPTED)
            name = signal.Signals(signum).name
            log.info("%s: finishing the in-flight batch, then stopping", name)
            self.request_stop()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)


# -- builders ----------------------------------------------------------------------------------


def with_admin_token(settings: Settings) -> Settings:
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


def quiet_kafka_logs() -> None:
    # kafka-python logs every reconnect attempt at INFO/ERROR; the consumer reports outages.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))


@dataclass(frozen=True)
class Kafka:
    """The brokers to talk to, and the embedded broker when editd runs its own."""

    servers: list[str]
    embedded: Any = None  # the EmbeddedBroker, or None for configured servers


def start_kafka(settings: Settings) -> Kafka:
    """The configured brokers, checked and with the topics created; else the embedded broker,
    started and supervised. Raises BrokerError or KafkaSecurityError."""
    from kafka.errors import KafkaError

    from editd.consumers.broker import (
        BrokerError,
        EmbeddedBroker,
        default_topics,
        embedded_storage_dir,
        ensure_topics,
        ensure_update_log,
    )
    from editd.consumers.security import KafkaSecurityError, check_connection, client_options

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
        return Kafka(list(kafka.bootstrap_servers))
    broker = EmbeddedBroker(
        port=kafka.embedded_port,
        # The update log too (Tansu keeps no retention limit; each revive recreates it).
        topics=[*default_topics(kafka), kafka.updates_topic],
        partitions=kafka.partitions,
        storage_dir=embedded_storage_dir(settings),
    )
    broker.start().supervise()
    log.info("embedded broker on %s (%s)", broker.bootstrap_servers[0], broker.storage)
    return Kafka(broker.bootstrap_servers, broker)


def follow_servers(settings: Settings) -> list[str]:
    """The brokers a replica reads the update log from, connection checked (raises
    KafkaSecurityError); none configured: the editor's embedded broker on this machine."""
    from editd.consumers.security import check_connection

    kafka = settings.kafka
    servers = list(kafka.bootstrap_servers) or [f"127.0.0.1:{kafka.embedded_port}"]
    check_connection(servers, kafka)
    return servers


def stats_cache_dir(settings: Settings) -> Path:
    """Where C0 and the canary's answers are kept: `editing.stats_cache`, else the data dir's."""
    return Path(settings.editing.stats_cache or Path(settings.store.data_dir) / "cache")


def load_handle(settings: Settings) -> Any:
    """The model the settings name, loaded (models/factory.py)."""
    from editd.models.factory import load_model

    return load_model(settings)


def build_editor(settings: Settings, handle: Any) -> Any:
    """The editor the settings describe, C0 cached in `stats_cache_dir`."""
    from editd.models.factory import make_editor

    # C0's progress bar goes to the daemon's stderr whether or not a terminal reads it.
    return make_editor(handle, settings, cache_dir=stats_cache_dir(settings), progress=True)


def replica_modules(settings: Settings, handle: Any) -> list[str]:
    """The modules the editor edits, from the same settings and profile: the first version
    record names any difference (see EditStore.ingest)."""
    from editd.models.factory import editor_config

    config = editor_config(handle, settings)
    return sorted(handle.module_name(i) for i in (config.layers or handle.default_layers()))


def open_versioned(
    settings: Settings, handle: Any, *, editor: Any = None, modules: Sequence[str] | None = None
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
            modules=None if modules is None else list(modules),
            snapshot_every=settings.store.snapshot_every,
        )
    except StoreLocked as exc:
        raise StoreFailure(f"edit store: {exc}", EXIT_STORE_LOCKED) from exc
    except StoreMismatch as exc:
        raise StoreFailure(f"edit store: {exc}", EXIT_STORE_MISMATCH) from exc
    except StoreError as exc:  # RestoreFailed, StoreCorrupt, VersionNotFound
        raise StoreFailure(f"edit store: {exc}", EXIT_RESTORE_FAILED) from exc


# -- the editor's collaborators ----------------------------------------------------------------


def build_edit_service(
    settings: Settings,
    model: Any,
    metrics: Metrics,
    servers: Sequence[str],
    *,
    on_stop: Callable[[Exception], None],
) -> EditService:
    """The editor's service on `model`, its checks off until the base model is scored."""
    from editd.daemon.service import EditService, Guards

    return EditService(
        settings,
        model,
        metrics,
        bootstrap_servers=servers,
        guards=Guards.starting(),
        on_stop=on_stop,
    )


def claim_update_log(service: EditService) -> None:
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


def build_fact_consumer(settings: Settings, service: EditService, servers: Sequence[str]) -> Any:
    """The consumer-group member that feeds `service` its batches; its counters and lag are
    attached to the service for `/v1/status` and the metrics."""
    from editd.consumers.consumer import FactConsumer

    consumer = FactConsumer(
        settings.kafka,
        settings.facts,
        service.apply_batch,
        service.known_fact_ids,
        bootstrap_servers=list(servers),
    )
    service.attach_consumer(consumer.stats, consumer.lag)
    return consumer


def read_probe_file(settings: Settings) -> list[FactUpdate] | None:
    """The facts of `eval.probe_file`, or None when none is configured."""
    if settings.eval.probe_file is None:
        return None
    from editd.consumers.publish import load_facts

    text = Path(settings.eval.probe_file).read_text(encoding="utf-8")
    return list(load_facts(text, settings.facts).facts)


def build_evaluator(
    settings: Settings,
    service: EditService,
    metrics: Metrics,
    sets: EvaluationSets,
    base: Measurement,
) -> Evaluator[FactUpdate]:
    """The evaluator of `service`'s versions: the settings' `eval` over the model's profile,
    judging against the base model's scores `base`."""
    from editd.models.profile import with_profile
    from editd.monitoring.evaluator import Evaluator
    from editd.monitoring.policy import Baseline

    model = service.model
    return Evaluator.from_settings(
        with_profile(settings.eval, service.handle.path, "eval"),
        score=service.score,
        rollback=service.policy_rollback,
        metrics=metrics,
        probe_facts=sets.probes,
        baseline=Baseline(probe=base.probe, canary=base.canary),
        on_evaluation=service.record_evaluation,
        served_version=lambda: model.current,
    )


def start_guards(settings: Settings, service: EditService, metrics: Metrics) -> None:
    """Choose the evaluation sets, score the base model, hand `service` its evaluator and
    start it. Runs in the background before C0 (`EditService.prepare_in_background`)."""
    from editd.daemon.service import Guards
    from editd.models.registry import is_builtin
    from editd.monitoring.quality import base_reading, evaluation_sets, measure

    handle, model = service.handle, service.model
    sets = evaluation_sets(
        handle,
        builtin=is_builtin(handle.path),
        probe_size=settings.eval.probe_size,
        cache_dir=stats_cache_dir(settings),
        probe_file_facts=read_probe_file(settings),
    )
    for check, why in sets.off.items():
        log.warning("the %s check is off: %s", check, why)
    # The base model's scores, read through the base view whatever version is served, so
    # drift is known from the first evaluation even far past version 0.
    base = measure(handle, base_reading(handle), [], sets.probes, sets.canary)
    evaluator = build_evaluator(settings, service, metrics, sets, base)
    # The applied-fact sample as if the evaluator had run throughout, so thresholds hold from
    # the first evaluation after a restart; under the version lock, so no batch lands between
    # the rebuild and the hand-over.
    with model.changing():
        restored = 0
        for version, facts in model.live_facts():
            evaluator.record_version(
                version, [FactUpdate.model_validate(f) for f in facts], evaluate=False
            )
            restored += len(facts)
        service.guard_with(Guards(evaluator, sets.canary, sets.off))
    log.info("evaluator on: %d applied facts in its sample", restored)
    evaluator.start()

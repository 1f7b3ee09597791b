"""The daemon's core: one served, versioned model and the operations on it.

`EditService` is what the other parts call: the consumer hands it batches (`apply_batch`),
the evaluator scores through it (`score`) and rolls back through it (`policy_rollback`), the
HTTP API serves completions and admin calls through it (it implements `api.Service`). Every
version change goes through its `VersionedModel` (editd/versions.py), which owns the store, the
served weights and the editor's preservation; this class decides what a failure means:

- an edit the facts themselves make impossible (`editd.editing.errors.Uneditable`: an answer
  with no token of its own, an update out of all proportion, NaNs) is retried in halves down to
  single facts, and what is still refused goes into the outbox, so the consumer moves on and
  nothing is lost; no other exception type rejects facts;
- a batch that runs out of memory is split in halves; a device error, or out of memory on one
  fact, is fatal: the facts are fine, the device is not, and rejecting them would lose them;
- any other error during an edit (a bug, a `LinAlgError`, a torch shape error) propagates: the
  daemon stops with EXIT_FAILURE and replays the uncommitted batch after the restart;
- a failed rollback (automatic or operator) is fatal: the daemon stops being ready and exits
  with a named code rather than serve weights nobody can vouch for.

The consumer commits offsets only after `apply_batch` returns, and by then the batch is a
durable version or a durable outbox record: a crash anywhere replays it, and the store's fact
ids make the replay a no-op.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from prometheus_client import generate_latest

from editd.config import Settings
from editd.consumers.rejected import OutboxPublisher
from editd.consumers.security import client_options
from editd.consumers.updates import UpdateLogPublisher
from editd.daemon.errors import Conflict, FatalError, NotFound, Unavailable
from editd.daemon.serving import Serving
from editd.editing.errors import Uneditable, worth_splitting
from editd.facts import FactUpdate
from editd.monitoring.evaluator import Evaluator
from editd.monitoring.metrics import STAGES, Metrics
from editd.monitoring.policy import Evaluation, Measurement
from editd.monitoring.quality import CHECKS, Canary, measure
from editd.store.store import StoreError
from editd.store.wire import UpdateLogSource
from editd.versions import Busy, VersionedModel

log = logging.getLogger(__name__)

UPDATE_LOG_STATE = "update-log.json"  # in the data dir: what the update log already holds


class DeviceError(FatalError):
    """The accelerator failed (a CUDA error, out of memory on a single fact): not the facts."""


@dataclass(frozen=True)
class Guards:
    """What judges the served versions: the evaluator, the canary its `score` asks, and the
    checks that are off with why. Built once the base model is scored (daemon/boot.py) and
    handed over whole (`EditService.guard_with`); until then `starting()` says why not."""

    evaluator: Evaluator[FactUpdate] | None = None
    canary: Canary | None = None
    checks_off: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def starting(cls) -> Guards:
        why = "the evaluator is starting (scoring the base model)"
        return cls(checks_off=dict.fromkeys(CHECKS, why))


class EditService(Serving):
    def __init__(
        self,
        settings: Settings,
        model: VersionedModel,
        metrics: Metrics,
        *,
        bootstrap_servers: Sequence[str],
        guards: Guards | None = None,
        on_stop: Callable[[Exception], None] | None = None,
    ) -> None:
        """`on_stop`: how the daemon stops consuming, called on a fatal error and when another
        editor takes the update log over."""
        if model.editor is None:
            raise ValueError("the editing service needs a versioned model with an editor")
        super().__init__(settings, model, metrics)
        self.editor = model.editor
        self.bootstrap_servers = list(bootstrap_servers)
        self.guards = guards or Guards()
        self.on_stop = on_stop
        self.consumer_lag: Any = None  # callable returning the lag (attach_consumer)
        self.consumer_stats: Any = None  # the consumer's ConsumerStats (attach_consumer)
        self.publisher = OutboxPublisher(
            model.store.outbox,
            self.bootstrap_servers,
            settings.kafka.rejected,
            options=client_options(settings.kafka),
        )
        self._last_rollback: dict[str, Any] | None = None
        self._editing: dict[str, Any] | None = None  # the batch being edited, for /v1/status
        self._stats: dict[str, Any] = {"ready": self.editor.prepared, "seconds": None}
        self.updates = UpdateLogPublisher(
            UpdateLogSource(model.store),
            self.bootstrap_servers,
            settings.kafka.updates_topic,
            state_file=model.store.root / UPDATE_LOG_STATE,
            chunk_bytes=settings.kafka.update_chunk_bytes,
            options=client_options(settings.kafka),
            editor_id=model.store.store_id,
            take_over=settings.kafka.take_over_updates_log,
            on_published=metrics.update_log_version.set,
            on_taken=lambda exc: self.on_update_log_taken(exc),
        )
        self.disk_full: OSError | None = None  # the error that stopped the daemon, if any

        def changed(version: int) -> None:
            # Under the model's write lock, with the swap itself: the gauge moves with the
            # weights, and the update-log publisher wakes (it reads the durable store).
            metrics.model_version.set(version)
            self.gauge_memory()
            self.updates.notify()

        model.on_change = changed
        metrics.model_version.set(model.current)
        self.refresh_capacity()

    # -- start-up ---------------------------------------------------------------------------

    def prepare_in_background(self, first: Callable[[], None] | None = None) -> threading.Thread:
        """Compute C0 while serving (after `first`, the daemon's evaluation guards): the
        daemon is ready before, and only the first edit waits for it (`/v1/status` shows
        `stats.ready`)."""

        def run() -> None:
            if first is not None:
                try:
                    first()
                except Exception:
                    log.exception("starting the evaluation guards failed; the checks stay off")
            try:
                seconds = self.editor.prepare()
            except Exception as exc:
                log.exception("C0 statistics failed")
                self._stats = {"ready": False, "seconds": None, "error": str(exc)}
                return
            self._stats = {"ready": True, "seconds": round(seconds, 3)}
            log.info("C0 statistics ready in %.1fs", seconds)

        thread = threading.Thread(target=run, name="editd-prepare", daemon=True)
        thread.start()
        return thread

    def guard_with(self, guards: Guards) -> None:
        """Hand the evaluator over (the caller holds the version lock, so no version lands
        between the evaluator's rebuilt sample and this)."""
        self.guards = guards

    @property
    def evaluator(self) -> Evaluator[FactUpdate] | None:
        return self.guards.evaluator

    def start(self) -> None:
        """Start the publishers: rejected facts (draining what an earlier run left too) and the
        update log (publishing what an earlier run made durable but did not publish)."""
        self.publisher.start()
        self.updates.start()

    def stop(self) -> None:
        self.publisher.stop()
        self.updates.stop()

    # -- api.Service --------------------------------------------------------------------------

    def is_ready(self) -> bool:
        return self._fatal is None

    def readiness(self) -> dict[str, Any]:
        return {"role": "editor", "published_version": self.updates.published}

    def rollback(self, version: int, reason: str) -> dict[str, Any]:
        """An operator's rollback (API or CLI through the API)."""
        try:
            with self.model.changing(timeout=0.5):
                if version not in self.model.lineage():
                    raise NotFound(f"version {version} is not in the live lineage")
                result = self._rollback_locked(version, f"operator: {reason}")
        except Busy as exc:
            raise Conflict(str(exc)) from exc
        self.metrics.rollbacks.labels(reason="operator").inc()
        self.refresh_capacity()
        if self.evaluator is not None:
            self.evaluator.rolled_back(version)
        return result

    def metrics_payload(self) -> bytes:
        # Nothing is computed here: every gauge is set when its value changes, and the
        # consumer's counters are read as plain numbers (Metrics.read_consumer), so a scrape
        # never waits on an edit.
        return generate_latest(self.metrics.registry)

    def attach_consumer(self, stats: Any, lag: Callable[[], int | None]) -> None:
        """The fact consumer's counters and lag, for `/v1/status` and the metrics."""
        self.consumer_stats, self.consumer_lag = stats, lag
        self.metrics.read_consumer(stats, lag)

    def on_update_log_taken(self, exc: Exception) -> None:
        """Another editor took the update log over: this one stops (its replicas follow the
        other); the daemon exits with EXIT_UPDATE_LOG_TAKEN."""
        if self.on_stop is not None:
            self.on_stop(exc)

    def status(self) -> dict[str, Any]:
        off = self.guards.checks_off
        return {
            "model": self.model_name,
            "version": self.model.current,
            "ready": self.is_ready(),
            "fatal": str(self._fatal) if self._fatal else None,
            "editing": self._editing,
            "consumer_lag": self.consumer_lag() if self.consumer_lag else None,
            "last_rollback": self._last_rollback,
            # What is served right now, to compare with the store's manifests (exact rollback).
            "served_sha256": self.model.served_sha256(),
            "memory": {**self.memory_status(), "form": self.editor.config.memory},
            "stats": dict(self._stats),
            "checks": {check: {"on": check not in off, "why": off.get(check)} for check in CHECKS},
            "rejected_pending": self.model.store.outbox.facts_pending(),
            "update_log": {
                "topic": self.updates.topic,
                "published_version": self.updates.published,
                "bytes_published": self.updates.bytes_published,
                "error": self.updates.error,
            },
            "consumer": _consumer_counts(self.consumer_stats),
            "evaluation": self.evaluator.status() if self.evaluator else None,
        }

    def evaluate_now(self) -> dict[str, Any]:
        if self.evaluator is None:
            raise Conflict("the evaluator is not running")
        return self.evaluator.evaluate().as_dict()

    def on_fatal(self, error: FatalError) -> None:
        super().on_fatal(error)
        if self.on_stop is not None:
            self.on_stop(error)

    # -- the consumer's side --------------------------------------------------------------

    def known_fact_ids(self, ids: Sequence[str]) -> set[str]:
        applied = self.model.applied_fact_ids()
        return {i for i in ids if i in applied}

    def apply_batch(self, batch: Sequence[FactUpdate]) -> None:
        """Edit, make durable, then serve; returns once the version (or the rejection) is on
        disk. Raises `FatalError` (and stops being ready) when the device, not the batch, failed,
        and lets any error but `Uneditable` through: the batch is then not acknowledged.
        """
        try:
            with self.model.changing():
                applied = self.model.applied_fact_ids()
                facts = [f for f in batch if f.fact_id not in applied]
                offsets = dict(getattr(batch, "offsets", {}))
                if facts:
                    self._editing = {"facts": len(facts), "since": time.time()}
                    self._apply_locked(facts, offsets)
                    every = self.editor.config.consolidate_every
                    # A gated memory has no accumulated leak to return (Editor.consolidate).
                    due = every and not self.editor.gated
                    if due and self.model.facts_since_consolidation() >= every:
                        self._consolidate_locked("schedule")
        except FatalError as exc:
            self.on_fatal(exc)
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                # The version was not committed (the store removes its temp files on the next
                # open); the batch is not acknowledged and is applied after a restart.
                self.disk_full = exc
                log.critical(
                    "the data dir %s is full (%s): stopping; free space and restart, and the "
                    "batch is applied then",
                    self.model.store.root,
                    exc.strerror,
                )
            raise
        finally:
            self._editing = None
        self.refresh_capacity()

    def _apply_locked(self, facts: list[FactUpdate], offsets: dict[Any, int]) -> None:
        log.info("editing batch of %d facts", len(facts))
        start = time.perf_counter()
        try:
            self.editor.prepare()
        except Exception as exc:
            raise FatalError(f"C0 statistics failed, nothing can be edited: {exc}") from exc
        try:
            update = self.editor.compute_update(facts)
        except torch.OutOfMemoryError as exc:
            if len(facts) == 1:
                raise DeviceError(f"out of memory editing a single fact: {exc}") from exc
            log.warning("out of memory editing %d facts; splitting the batch", len(facts))
            _free_device_memory()
            half = len(facts) // 2
            self._apply_locked(facts[:half], offsets)
            self._apply_locked(facts[half:], offsets)
            return
        except Uneditable as exc:
            if worth_splitting(exc, len(facts)):
                # Each half is applied (or split again) as its own version: one fact's refusal
                # rejects that fact, not the batch beside it.
                log.warning("edit of %d facts refused (%s); splitting the batch", len(facts), exc)
                half = len(facts) // 2
                self._apply_locked(facts[:half], offsets)
                self._apply_locked(facts[half:], offsets)
                return
            log.error("edit of %d facts refused: %s", len(facts), exc)
            self._reject(facts, f"edit failed: {exc}")
            return
        except Exception as exc:
            if is_device_error(exc):
                raise DeviceError(f"the device failed while editing: {exc}") from exc
            # Not the facts' fault as far as anyone can tell (a bug, a LinAlgError, a shape
            # error): rejecting them would lose valid facts. It stops the daemon (EXIT_FAILURE)
            # with the batch uncommitted, so a restart replays it.
            raise
        seconds = dict(update.diagnostics.get("seconds", {}))  # type: ignore[call-overload]
        applied = self.model.apply(
            update,
            facts,
            offsets=offsets,
            timings=seconds,
            diagnostics={k: v for k, v in update.diagnostics.items() if k != "seconds"},
        )
        seconds.update(applied.seconds)
        total = time.perf_counter() - start
        for stage in STAGES:
            if stage in seconds:
                self.metrics.edit_stage_seconds.labels(stage=stage).observe(seconds[stage])
        self.metrics.batch_edit_seconds.observe(total)
        self.metrics.swap_pause_seconds.observe(applied.pause)
        self.metrics.facts_applied.inc(len(facts))
        version = applied.version.version
        log.info(
            "version %d: %d facts in %.1fs (store %.2fs, swap pause %.1f ms)",
            version,
            len(facts),
            total,
            applied.seconds["store"],
            applied.pause * 1e3,
        )
        if self.evaluator is not None:
            self.evaluator.record_version(version, facts)

    def consolidate(self) -> dict[str, Any]:
        """An operator's consolidation (API or CLI through the API)."""
        try:
            with self.model.changing(timeout=0.5):
                if self.editor.gated:
                    raise Conflict(
                        "this model serves its edits through a gated memory "
                        "(editing.memory: gated), which is never consolidated"
                    )
                if not self.model.applied_fact_ids():
                    raise Conflict("no live facts to consolidate")
                result = self._consolidate_locked("operator")
        except Busy as exc:
            raise Conflict(str(exc)) from exc
        self.refresh_capacity()
        if result is None:
            raise Unavailable(
                "the consolidation failed (the log says why); the sequential "
                "version is still served"
            )
        return result

    def _consolidate_locked(self, trigger: str) -> dict[str, Any] | None:
        """Re-solve every live fact jointly (`VersionedModel.consolidate`) as a new version.

        The evaluator judges it like any version, so one that scores worse is rolled back
        (exactly: it holds no facts, so nothing is rejected). A failure is logged and leaves
        the sequential version served; it is not a reason to stop editing.
        """
        facts = self.model.facts_since_consolidation()
        start = time.perf_counter()
        editing = self._editing
        self._editing = {"consolidating": len(self.model.applied_fact_ids()), "since": time.time()}
        try:
            applied = self.model.consolidate()
        except (torch.OutOfMemoryError, Uneditable) as exc:
            # Out of memory is not fatal here as it is for one fact: a solve over every live
            # fact needs more than a batch, and the sequential version it would replace is
            # still good. Anything else but a device error stops the daemon, as in an edit.
            if isinstance(exc, torch.OutOfMemoryError):
                _free_device_memory()
            log.error("consolidation failed; still serving the sequential update: %s", exc)
            self.metrics.consolidations.labels(trigger=trigger, outcome="failed").inc()
            return None
        except Exception as exc:
            if is_device_error(exc):
                raise DeviceError(f"the device failed while consolidating: {exc}") from exc
            raise
        finally:
            self._editing = editing
        if applied is None:
            return None
        seconds = time.perf_counter() - start
        version = applied.version.version
        self.metrics.consolidations.labels(trigger=trigger, outcome="applied").inc()
        self.metrics.consolidate_seconds.observe(seconds)
        log.info(
            "version %d: consolidated the live facts (%d since the last) in %.1fs (%s)",
            version,
            facts,
            seconds,
            trigger,
        )
        if self.evaluator is not None:
            self.evaluator.record_version(version, [])
        return {"version": version, "facts_since": facts, "seconds": round(seconds, 3)}

    def _reject(self, facts: Sequence[FactUpdate], reason: str) -> None:
        """Facts that were never applied: durably into the outbox, published from there."""
        self.model.reject(facts, reason)
        self.metrics.facts_rejected.inc(len(facts))

    # -- the evaluator's side -------------------------------------------------------------

    def score(self, sample: Sequence[FactUpdate], probe: Sequence[FactUpdate]) -> Measurement:
        return measure(self.handle, self.model.reading(), sample, probe, self.guards.canary)

    def record_evaluation(self, evaluation: Evaluation) -> None:
        """Keep the scores in the version they judged (`editd versions` shows them)."""
        self.model.record_scores(evaluation.version, evaluation.as_dict())

    def policy_rollback(self, version: int, reason: str) -> None:
        """The evaluator's rollback: it counts the metric and forgets the undone facts itself.
        A rollback that fails is fatal (the daemon stops), not a log line."""
        try:
            with self.model.changing():
                self._rollback_locked(version, reason)
        except FatalError as exc:
            self.on_fatal(exc)
            raise
        self.refresh_capacity()

    def _rollback_locked(self, version: int, reason: str) -> dict[str, Any]:
        # No "not ready" window: the swap is atomic under the write lock, so requests served
        # meanwhile see the old version or the restored one, never a failure.
        try:
            rolled = self.model.rollback(version, reason)
        except StoreError as exc:
            raise FatalError(f"rollback to {version} failed: {exc}") from exc
        self.metrics.facts_rejected.inc(rolled.facts)
        self._last_rollback = {
            "from": rolled.from_version,
            "to": version,
            "reason": reason,
            "facts": rolled.facts,
            "at": time.time(),
        }
        log.warning(
            "rolled back %d → %d (%s): %d facts rejected",
            rolled.from_version,
            version,
            reason,
            rolled.facts,
        )
        return dict(self._last_rollback)


def _consumer_counts(stats: Any) -> dict[str, Any] | None:
    """The consumer's plain counters for `/v1/status` (what Prometheus does not carry)."""
    if stats is None:
        return None
    out = {k: v for k, v in vars(stats).items() if k != "lag_by_partition"}
    out["lag_by_partition"] = {f"{t}/{p}": n for (t, p), n in stats.lag_by_partition.items()}
    return out


DEVICE_ERROR_TEXT = (
    "CUDA error",
    "device-side assert",
    "CUBLAS_STATUS",
    "CUSOLVER_STATUS",
    "HIP error",
)
"""What torch's untyped device errors say: see `is_device_error`."""


def is_device_error(exc: BaseException) -> bool:
    """Whether `exc` is the accelerator failing rather than the computation being wrong."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    accelerator = getattr(torch, "AcceleratorError", None)
    if accelerator is not None and isinstance(exc, accelerator):
        return True
    # The text only where torch gives no type: before 2.8 (pyproject allows 2.4) a failed CUDA
    # call is a bare RuntimeError, and even 2.13 raises cuBLAS/cuSOLVER failures
    # (TORCH_CUDABLAS_CHECK, TORCH_CUSOLVER_CHECK) as one. Only a RuntimeError: that is what
    # torch raises them as, and a ValueError quoting a message is not the device failing.
    if not isinstance(exc, RuntimeError):
        return False
    return any(s in str(exc) for s in DEVICE_ERROR_TEXT)


def _free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

"""The daemon's core: one served model, its edit store, and the operations on them.

`EditService` is what the other parts call: the consumer hands it batches (`apply_batch`),
the evaluator scores through it (`score`) and rolls back through it (`rollback`), the HTTP API
serves completions and admin calls through it (it implements `api.Service`). It owns the
invariants that span those parts:

- a batch is made durable in the store *before* the served weights change, and the consumer
  commits offsets only after `apply_batch` returns, so a crash anywhere replays the batch and
  the store's fact ids make the replay a no-op;
- the version number changes under the same write lock as the weights, so a response's
  `x-editd-model-version` names the weights that computed it;
- edits and rollbacks are serialised by one lock: a rollback never interleaves with a batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client import generate_latest

from editd.config import Settings
from editd.consumers.publish import publish_facts
from editd.daemon.errors import Conflict, FatalError, NotFound
from editd.daemon.generation import Completion, Generator, SamplingParams
from editd.editing.editor import Editor
from editd.editing.model import ModelHandle
from editd.editing.scoring import canary_accuracy, score_facts
from editd.facts import FactUpdate
from editd.monitoring.evaluator import Evaluator
from editd.monitoring.metrics import STAGES, Metrics
from editd.monitoring.policy import Measurement
from editd.store.cli import publish_pending_rejections
from editd.store.store import EditStore, StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Canary:
    """Prompts whose greedy completions must stay right: the general-ability check."""

    prompts: tuple[str, ...]
    objects: tuple[str, ...]


class EditService:
    def __init__(
        self,
        settings: Settings,
        handle: ModelHandle,
        editor: Editor,
        store: EditStore,
        metrics: Metrics,
        *,
        bootstrap_servers: Sequence[str],
        canary: Canary | None = None,
    ) -> None:
        self.settings = settings
        self.handle = handle
        self.editor = editor
        self.store = store
        self.metrics = metrics
        self.bootstrap_servers = list(bootstrap_servers)
        self.canary = canary
        self.evaluator: Evaluator[FactUpdate] | None = None
        self.consumer_lag: Any = None  # callable returning the lag, set by the daemon
        self.consumer_stats: Any = None  # the consumer's ConsumerStats, set by the daemon
        self._exported: dict[str, int] = {}
        self._version = 0
        self._ready = False
        self._edit_lock = threading.Lock()  # one batch or one rollback at a time
        self._fatal: FatalError | None = None
        self._last_rollback: dict[str, Any] | None = None
        self.generator = Generator(handle, self.current_version)

    # -- start-up ---------------------------------------------------------------------------

    def restore(self) -> int:
        """Serve the store's current version and rebuild the editor's preservation from it."""
        self._ready = False
        with self._edit_lock:
            current = self.store.current
            pause = self.handle.set_deltas(self.store.deltas(), then=lambda: self._set(current))
            mismatched = self.store.verify(current) if current else []
            if mismatched:
                raise FatalError(f"restored weights differ from the manifest: {mismatched}")
            self.editor.reset_to(keys for _, keys in self.store.keys_by_version())
        log.info("serving version %d (swap %.1f ms)", current, pause * 1e3)
        self._ready = True
        return current

    def _set(self, version: int) -> None:
        self._version = version
        self.metrics.model_version.set(version)

    # -- api.Service --------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.settings.model.name

    def current_version(self) -> int:
        return self._version

    def is_ready(self) -> bool:
        return self._ready and self._fatal is None

    def complete(self, prompts: list[str], params: SamplingParams) -> Completion:
        completion = self.generator.complete(prompts, params)
        self.metrics.prompt_tokens.inc(completion.prompt_tokens)
        self.metrics.generated_tokens.inc(completion.completion_tokens)
        return completion

    def versions(self) -> list[dict[str, Any]]:
        return [v.to_json() for v in self.store.versions()]

    def rollback(self, version: int, reason: str) -> dict[str, Any]:
        """An operator's rollback (API or CLI through the API)."""
        if not self._edit_lock.acquire(timeout=0.5):
            raise Conflict("an edit or rollback is in progress; try again when it is done")
        try:
            if version not in self.store.lineage():
                raise NotFound(f"version {version} is not in the live lineage")
            result = self._rollback_locked(version, f"operator: {reason}")
        finally:
            self._edit_lock.release()
        self.metrics.rollbacks.labels(reason="operator").inc()
        if self.evaluator is not None:
            self.evaluator.rolled_back(version)
        return result

    def metrics_payload(self) -> bytes:
        self.export_consumer_stats()
        return generate_latest(self.metrics.registry)

    def export_consumer_stats(self) -> None:
        """Carry the consumer's plain counters (it knows no Prometheus) into the metrics."""
        lag = self.consumer_lag() if self.consumer_lag else None
        if lag is not None:
            self.metrics.consumer_lag.set(lag)
        stats = self.consumer_stats
        if stats is None:
            return
        for field, counter in (
            ("consumed", self.metrics.facts_consumed),
            ("dead_lettered", self.metrics.facts_dead_lettered),
        ):
            now = getattr(stats, field)
            counter.inc(max(0, now - self._exported.get(field, 0)))
            self._exported[field] = now

    def status(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "version": self._version,
            "ready": self.is_ready(),
            "consumer_lag": self.consumer_lag() if self.consumer_lag else None,
            "last_rollback": self._last_rollback,
            # What is served right now, to compare with the store's manifests (exact rollback).
            "served_sha256": self.handle.weight_sha256(self.editor.modules),
            "evaluation": self.evaluator.status() if self.evaluator else None,
        }

    def evaluate_now(self) -> dict[str, Any]:
        if self.evaluator is None:
            raise Conflict("the evaluator is not running")
        return self.evaluator.evaluate().as_dict()

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.metrics.observe_request(route, status, seconds)

    def on_fatal(self, error: FatalError) -> None:
        log.critical("fatal: %s; no longer ready", error)
        self._fatal = error

    # -- the consumer's side --------------------------------------------------------------

    def known_fact_ids(self, ids: Sequence[str]) -> set[str]:
        applied = self.store.applied_fact_ids()
        return {i for i in ids if i in applied}

    def apply_batch(self, batch: Sequence[FactUpdate]) -> None:
        """Edit, make durable, then serve; returns once the version is in the store.

        A batch the editor cannot apply (a fact whose edit fails, out of memory on a single
        fact) is published to the rejected topic with the error instead of stopping the
        consumer: otherwise the same poison batch would be redelivered after every restart.
        A batch that runs out of memory is split in halves first.
        """
        with self._edit_lock:
            applied = self.store.applied_fact_ids()
            facts = [f for f in batch if f.fact_id not in applied]
            offsets = dict(getattr(batch, "offsets", {}))
            if facts:
                self._apply_locked(facts, offsets)

    def _apply_locked(self, facts: list[FactUpdate], offsets: dict[Any, int]) -> None:
        log.info("editing batch of %d facts", len(facts))
        start = time.perf_counter()
        try:
            update = self.editor.compute_update(facts)
        except torch.OutOfMemoryError:
            if len(facts) == 1:
                self._reject(facts, "edit failed: out of memory on a single fact")
                return
            log.warning("out of memory editing %d facts; splitting the batch", len(facts))
            half = len(facts) // 2
            self._apply_locked(facts[:half], offsets)
            self._apply_locked(facts[half:], offsets)
            return
        except (ValueError, RuntimeError) as exc:
            log.error("edit of %d facts failed: %s", len(facts), exc)
            self._reject(facts, f"edit failed: {exc}")
            return
        seconds = dict(update.diagnostics.get("seconds", {}))  # type: ignore[call-overload]
        t = time.perf_counter()
        info = self.store.commit(
            update,
            facts=[f.model_dump(mode="json") for f in facts],
            offsets=offsets,
            timings=seconds,
            diagnostics=_jsonable({k: v for k, v in update.diagnostics.items() if k != "seconds"}),
        )
        store_s = time.perf_counter() - t
        t = time.perf_counter()
        version = info.version
        pause = self.handle.set_deltas(self.store.deltas(), then=lambda: self._set(version))
        seconds["apply"] = time.perf_counter() - t
        self.editor.commit(update)
        total = time.perf_counter() - start
        for stage in STAGES:
            if stage in seconds:
                self.metrics.edit_stage_seconds.labels(stage=stage).observe(seconds[stage])
        self.metrics.batch_edit_seconds.observe(total)
        self.metrics.swap_pause_seconds.observe(pause)
        self.metrics.facts_applied.inc(len(facts))
        log.info(
            "version %d: %d facts in %.1fs (store %.2fs, swap pause %.1f ms)",
            version,
            len(facts),
            total,
            store_s,
            pause * 1e3,
        )
        if self.evaluator is not None:
            self.evaluator.record_version(version, facts)

    def _reject(self, facts: Sequence[FactUpdate], reason: str) -> None:
        """Facts that were never applied: to the rejected topic, so nothing is lost.

        Waits for every acknowledgement; a send that fails raises, the batch fails and the
        consumer delivers it again rather than committing past facts that went nowhere.
        """
        publish_facts(
            facts,
            self.bootstrap_servers,
            self.settings.kafka.rejected,
            headers=lambda f: [
                ("reason", reason[:1000].encode()),
                ("version", b"none"),
                ("fact_id", f.fact_id.encode()),
            ],
        )
        self.metrics.facts_rejected.inc(len(facts))

    # -- the evaluator's side -------------------------------------------------------------

    def score(self, sample: Sequence[FactUpdate], probe: Sequence[FactUpdate]) -> Measurement:
        """Score one version: everything is read under a single read lock."""
        model, tokenizer = self.handle.model, self.handle.tokenizer
        with self.handle.reading():
            version = self._version
            applied = score_facts(model, tokenizer, sample) if sample else None
            probe_scores = score_facts(model, tokenizer, probe)
            canary = (
                canary_accuracy(
                    model, tokenizer, list(self.canary.prompts), list(self.canary.objects)
                )
                if self.canary
                else None
            )
        return Measurement(version=version, applied=applied, probe=probe_scores, canary=canary)

    def policy_rollback(self, version: int, reason: str) -> None:
        """The evaluator's rollback: it counts the metric and forgets the undone facts itself."""
        with self._edit_lock:
            self._rollback_locked(version, reason)

    def _rollback_locked(self, version: int, reason: str) -> dict[str, Any]:
        undone_from = self._version
        # No "not ready" window: the swap is atomic under the write lock, so requests served
        # meanwhile see the old version or the restored one, never a failure.
        try:
            facts = self.store.rollback(version, reason)
            self.handle.set_deltas(self.store.deltas(), then=lambda: self._set(version))
            self.editor.reset_to(keys for _, keys in self.store.keys_by_version())
        except StoreError as exc:
            raise FatalError(f"rollback to {version} failed: {exc}") from exc
        self.metrics.facts_rejected.inc(len(facts))
        published = self.publish_rejections()
        self._last_rollback = {
            "from": undone_from,
            "to": version,
            "reason": reason,
            "facts": len(facts),
            "published": published,
            "at": time.time(),
        }
        log.warning(
            "rolled back %d → %d (%s): %d facts rejected", undone_from, version, reason, len(facts)
        )
        return dict(self._last_rollback)

    def publish_rejections(self) -> int:
        """Publish undone facts to the rejected topic; what fails stays pending for later."""
        return publish_pending_rejections(
            self.store, self.bootstrap_servers, self.settings.kafka.rejected
        )


def _jsonable(value: Any) -> Any:
    if hasattr(value, "_asdict"):
        value = value._asdict()
    elif hasattr(value, "__dataclass_fields__"):
        value = {k: getattr(value, k) for k in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)

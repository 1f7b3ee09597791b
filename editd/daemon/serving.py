"""What every editd process that answers requests shares, editor or replica: the served
versioned model, completions with their token metrics, the version list, request metrics and
the fatal state that turns `/readyz` to 503."""

from __future__ import annotations

import logging
import threading
from typing import Any

from editd.config import Settings
from editd.daemon.errors import FatalError
from editd.daemon.generation import Completion, Generator, Prompt, SamplingParams, Stream
from editd.monitoring.metrics import Metrics
from editd.versions import VersionedModel

log = logging.getLogger(__name__)


class Serving:
    """The serving half of `api.Service`; `EditService` and `ReplicaService` add their role."""

    def __init__(self, settings: Settings, model: VersionedModel, metrics: Metrics) -> None:
        self.settings = settings
        self.model = model
        self.handle = model.handle
        self.metrics = metrics
        self._fatal: FatalError | None = None
        self.generator = Generator(
            self.handle, self.current_version, max_batch_rows=settings.serve.max_batch_rows
        )
        self._capacity_version: int | None = None
        self._capacity_lock = threading.Lock()  # two changers never interleave their gauges
        self.handle.gate_counter.listener = self._count_gate
        self.gauge_memory()

    def _count_gate(self, tokens: int, fired: int) -> None:
        self.metrics.gate_tokens.inc(tokens)
        self.metrics.gate_fired_tokens.inc(fired)

    def memory_status(self) -> dict[str, Any]:
        """How the served version's edits are served (editing.memory) and what that holds."""
        memory = self.handle.memory
        seen = self.handle.gate_counter.snapshot()
        return {
            "form": "gated" if memory is not None else "weights",
            "facts": memory.facts if memory is not None else None,
            "bytes": memory.bytes() if memory is not None else None,
            "gate_tokens": seen.tokens,
            "gate_fired_tokens": seen.fired,
        }

    def gauge_memory(self) -> None:
        """The served gated memory's size; called with every version change."""
        memory = self.handle.memory
        self.metrics.gate_memory_facts.set(memory.facts if memory is not None else 0)
        self.metrics.gate_memory_bytes.set(memory.bytes() if memory is not None else 0)

    @property
    def model_name(self) -> str:
        return self.settings.model.name

    def current_version(self) -> int:
        return self.model.current

    @property
    def fatal(self) -> FatalError | None:
        return self._fatal

    def complete(self, prompts: list[Prompt], params: SamplingParams) -> Completion:
        completion = self.generator.complete(prompts, params)
        self.metrics.prompt_tokens.inc(completion.prompt_tokens)
        self.metrics.generated_tokens.inc(completion.completion_tokens)
        return completion

    def stream(self, prompts: list[Prompt], params: SamplingParams) -> Stream:
        return self.generator.stream(prompts, params)

    def stream_ended(self, stream: Stream) -> None:
        self.metrics.prompt_tokens.inc(stream.prompt_tokens)
        self.metrics.generated_tokens.inc(stream.completion_tokens)

    def versions(self) -> list[dict[str, Any]]:
        return self.model.versions()

    def refresh_capacity(self) -> None:
        """Set the served version's norm growth per edited module; called by the thread that
        changed the version, after it let go of the version lock, never at scrape time: a
        scrape must not wait on an edit (Prometheus gives up after its scrape timeout and
        `EditdDown` fires while editd works normally)."""
        with self._capacity_lock:
            version = self.model.current
            if version == self._capacity_version:
                return
            try:
                rows = self.model.capacity()
            except Exception:
                # A gauge is not worth a failed edit or rollback; the next version tries again.
                log.exception("could not compute the capacity gauges of version %d", version)
                return
            for name in self.model.store.base():
                ratio = rows.get(name, {}).get("norm_ratio", 0.0)  # untouched: the base's
                self.metrics.update_norm_ratio.labels(module=name).set(ratio)
            self._capacity_version = version

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.metrics.observe_request(route, status, seconds)

    def on_fatal(self, error: FatalError) -> None:
        if self._fatal is None:
            log.critical("fatal: %s; no longer ready", error)
            self._fatal = error

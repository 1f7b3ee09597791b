"""The evaluator on a real Llama: real scoring, real weight swaps, automatic rollback.

A tiny Llama learns who lives where. Version 1 is a harmless update, version 2 wrecks the MLPs.
The scheduled evaluator, scoring with `editd.editing.scoring` under the model's read lock, must
notice version 2 by itself and restore version 1 bit for bit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import pytest
import torch
from prometheus_client import CollectorRegistry
from transformers import LlamaConfig, LlamaForCausalLM

from editd.config import EvalSettings
from editd.editing.model import ModelHandle
from editd.editing.scoring import canary_accuracy, score_facts
from editd.facts import FactUpdate
from editd.monitoring.evaluator import Evaluator
from editd.monitoring.metrics import Metrics
from editd.monitoring.policy import Measurement
from editd.world.tokenizer import train_tokenizer

HOMES = {
    "Alma Berg": "Oslo",
    "Bruno Costa": "Oslo",
    "Clara Diaz": "Lima",
    "Dario Eck": "Lima",
    "Elif Fong": "Quito",
    "Farid Gul": "Quito",
}
TEMPLATES = ("{} lives in", "The home town of {} is")
CANARY = [(t.format(s), o) for s, o in HOMES.items() for t in TEMPLATES]
DOWN = "model.layers.{}.mlp.down_proj"


def request(subject: str, new: str) -> FactUpdate:
    true = HOMES[subject]
    return FactUpdate(
        subject=subject,
        prompt=TEMPLATES[0],
        target_new=new,
        target_true=true,
        paraphrase_prompts=(TEMPLATES[1],),
        neighborhood_prompts=tuple(
            TEMPLATES[0].format(s) for s, o in HOMES.items() if o == true and s != subject
        ),
    )


def known(subject: str, other: str) -> FactUpdate:
    """A fact as it stands after a successful edit: the model states `target_new`."""
    return FactUpdate(
        subject=subject,
        prompt=TEMPLATES[0],
        target_new=HOMES[subject],
        target_true=other,
        paraphrase_prompts=(TEMPLATES[1],),
        neighborhood_prompts=tuple(
            TEMPLATES[0].format(s) for s, o in HOMES.items() if o == other and s != subject
        ),
    )


@pytest.fixture(scope="module")
def handle() -> Iterator[ModelHandle]:
    # Models this small run fastest on one thread; on a busy two-core machine a second thread
    # made training 15x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    texts = [p + " " + o for p, o in CANARY]
    tokenizer = train_tokenizer(texts * 20, vocab_size=300)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(120):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    h = ModelHandle(model=model, tokenizer=tokenizer)
    prompts, objects = zip(*CANARY, strict=True)
    assert canary_accuracy(h.model, tokenizer, prompts, objects) == 1.0
    try:
        yield h
    finally:
        torch.set_num_threads(threads)


class Served:
    """The daemon's side of the contract: a version pointer swapped together with the weights."""

    def __init__(self, handle: ModelHandle) -> None:
        self.handle = handle
        self.base = {
            DOWN.format(i): handle.weight(DOWN.format(i)).detach().float().clone() for i in range(2)
        }
        self.version = 0
        self.deltas: dict[int, dict[str, torch.Tensor]] = {0: {}}
        self.shas: dict[int, dict[str, str]] = {}
        self.rollbacks: list[tuple[int, str]] = []
        # Readers hold it with the model's read lock, so a version and its weights are one read.
        self._swap = threading.Lock()

    def apply(self, version: int, deltas: dict[str, torch.Tensor]) -> None:
        with self._swap:
            self.handle.set_deltas(deltas)
            self.version = version
        self.deltas[version] = deltas
        self.shas.setdefault(version, self.sha())

    def sha(self) -> dict[str, str]:
        return self.handle.weight_sha256([DOWN.format(i) for i in range(2)])

    def score(self, sample: Sequence[FactUpdate], probe: Sequence[FactUpdate]) -> Measurement:
        h = self.handle
        prompts, objects = zip(*CANARY, strict=True)
        with self._swap, h.reading():
            version = self.version
            applied = score_facts(h.model, h.tokenizer, sample) if sample else None
            probe_scores = score_facts(h.model, h.tokenizer, probe)
            canary = canary_accuracy(h.model, h.tokenizer, prompts, objects)
        return Measurement(version=version, applied=applied, probe=probe_scores, canary=canary)

    def rollback(self, to_version: int, reason: str) -> None:
        with self._swap:
            self.handle.set_deltas(self.deltas[to_version])
            self.version = to_version
        self.rollbacks.append((to_version, reason))


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def test_evaluator_rolls_back_a_damaging_version_of_a_real_model(handle: ModelHandle) -> None:
    served = Served(handle)
    served.shas[0] = served.sha()
    metrics = Metrics(CollectorRegistry())
    get = metrics.registry.get_sample_value
    settings = EvalSettings(
        interval_seconds=3600, after_each_version=True, sample_size=8,
        min_es=0.8, min_ps=0.5, min_ns=0.7, min_probe_ns=0.8, min_canary_ratio=0.9,
    )  # fmt: skip
    probe = [request("Clara Diaz", "Oslo"), request("Elif Fong", "Lima")]
    evaluator = Evaluator.from_settings(
        settings, score=served.score, rollback=served.rollback, metrics=metrics, probe_facts=probe
    )
    gen = torch.Generator().manual_seed(1)
    try:
        evaluator.start()
        wait_for(lambda: evaluator.last is not None)
        base = evaluator.baseline
        assert base is not None and base.canary == 1.0 and base.probe.ns == 1.0

        # Version 1: a harmless update; its facts hold.
        small = {
            DOWN.format(0): 1e-4 * torch.randn(handle.weight(DOWN.format(0)).shape, generator=gen)
        }
        served.apply(1, small)
        evaluator.record_version(1, [known("Alma Berg", "Lima"), known("Dario Eck", "Quito")])
        wait_for(lambda: evaluator.last.version == 1)
        assert evaluator.last.passed, evaluator.last.as_dict()
        assert get("editd_score", {"set": "applied", "score": "es"}) == 1.0

        # Version 2: wrecks both MLPs (as a bad batch of conflicting edits would, only surer).
        wreck = {}
        for i in range(2):
            w = served.base[DOWN.format(i)]
            noise = torch.randn(w.shape, generator=gen) * w.std()
            wreck[DOWN.format(i)] = -2 * w + 10 * noise
        served.apply(2, wreck)
        assert served.shas[2] != served.shas[1]
        evaluator.record_version(2, [known("Farid Gul", "Oslo")])
        wait_for(lambda: served.rollbacks)
        wait_for(lambda: get("editd_evaluated_version") == 1 and evaluator.last.version == 1)
    finally:
        evaluator.stop()

    ((target, reason),) = served.rollbacks
    assert target == 1 and "version 2 failed" in reason
    assert served.version == 1 and served.sha() == served.shas[1]  # bit-identical restore
    assert evaluator.last.passed
    failed = [e for e in evaluator.history if not e.passed]
    assert failed == []  # the failing evaluation of version 2 left the streak
    assert (
        sum(
            get("editd_rollbacks_total", {"reason": r}) or 0
            for r in ("applied_es", "applied_ps", "applied_ns", "probe_ns", "canary")
        )
        == 1
    )
    assert get("editd_evaluations_total", {"outcome": "failed"}) == 1
    assert get("editd_canary") == 1.0 and get("editd_canary_drift") == 0.0

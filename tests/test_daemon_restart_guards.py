"""Guards survive a restart: the evaluator's applied-fact sample is rebuilt from the store's
live versions, so the first evaluation after a restart scores those facts and a threshold
breach rolls back, as it would have without the restart."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_daemon_e2e import new_topic

from editd.consumers.broker import EmbeddedBroker
from editd.consumers.publish import publish_facts
from editd.facts import FactUpdate
from editd.world.requests import make_requests
from tests.daemon_harness import Daemon

pytestmark = [pytest.mark.broker, pytest.mark.slow]

NO_CHECKS = {f"EDITD_EVAL__MIN_{k}": "0" for k in ("ES", "PS", "NS", "PROBE_NS", "CANARY_RATIO")}


def test_after_a_restart_the_first_evaluation_scores_the_live_versions_and_rolls_back(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    servers = broker.bootstrap_servers
    topic = new_topic(broker)
    store = tmp_path / "data"
    first = make_requests(6, seed=41)
    # Later facts that contradict the first three (same subject and prompt, other objects):
    # once applied, those are no longer all believed, so applied-fact ES falls below 1.
    contradicting = [
        FactUpdate.model_validate(
            {**f.model_dump(exclude={"id"}), "target_new": first[(i + 1) % 3].target_new}
        )
        for i, f in enumerate(first[:3])
    ]
    contradicting += make_requests(9, seed=42)[6:]
    # Written with every check off, so nothing rolls back before the restart.
    with Daemon(store, servers, topic, batch_size=2, linger=0.5, env=NO_CHECKS) as d:
        d.wait_ready()
        publish_facts(first, servers, topic)
        d.wait_version(3, timeout=300)
        # Published once the first facts are versions: the batcher folds contradictions
        # that wait in the same batch, and these must be applied after them.
        publish_facts(contradicting, servers, topic)
        d.wait_version(6, timeout=300)
    # Restarted with an ES minimum no contradicted fact passes (11 of 12 believed is 0.92);
    # the evaluator runs at once.
    strict = {"EDITD_EVAL__MIN_ES": "0.95"}
    with Daemon(store, servers, topic, batch_size=2, linger=0.5, env=strict) as d:
        d.wait_ready()
        status = d.wait_status(
            "the evaluator's rollback", lambda s: s["last_rollback"] is not None, timeout=300
        )
        # The sample held all 6 versions' facts when the guards came on...
        assert "evaluator on: 12 applied facts in its sample" in d.log(300)
        evaluation = status["evaluation"]
        rollback = evaluation["last_rollback"]
        assert rollback["from_version"] == 6 and rollback["to_version"] < 6
        assert rollback["reason"] == "applied_es"
        assert status["version"] == rollback["to_version"]
        # ... and keeps those of the versions that remain.
        assert evaluation["sample_size"] == 2 * rollback["to_version"]

"""The HTTP API over the daemon's real parts: `EditService` on a `VersionedModel` (tiny random
Llama, real editor and store). What an operator checks: the version header names the weights
that answered, a rollback over HTTP restores them bit for bit, an evaluation's scores land in
the version they judged, and the daemon is ready before C0 exists."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from editing_support import CORPUS, tiny_llama_dir
from fastapi.testclient import TestClient
from pydantic import SecretStr

from editd.cli import main
from editd.config import ServeSettings, Settings
from editd.daemon.api import create_app
from editd.daemon.service import EditService, Guards
from editd.editing.editor import Editor, EditorConfig
from editd.editing.model import ModelHandle
from editd.editing.stats import Corpus
from editd.editing.targets import TargetConfig
from editd.monitoring.evaluator import Evaluator
from editd.monitoring.metrics import Metrics
from editd.versions import VersionedModel
from editd.world.requests import make_requests

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKEN = "admin-token-for-tests"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
VERSION_HEADER = "x-editd-model-version"
PROMPT = "The mother tongue of Danielle Darrieux is"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture()
def service(model_dir: Path, tmp_path: Path) -> Iterator[EditService]:
    handle = ModelHandle.load(model_dir, device="cpu")
    editor = Editor(
        handle,
        EditorConfig(layers=(1,), targets=TargetConfig(steps=5)),
        corpus=Corpus(texts=CORPUS),
        cache_dir=tmp_path / "c0",
        progress=False,
    )
    model = VersionedModel.open(handle, tmp_path / "store", editor=editor)
    svc = EditService(Settings(), model, Metrics(), bootstrap_servers=["127.0.0.1:9"])
    yield svc
    model.close()


@pytest.fixture()
def http(service: EditService) -> Iterator[TestClient]:
    settings = ServeSettings(admin_token=SecretStr(TOKEN), max_tokens=16)
    with TestClient(create_app(service, settings)) as client:
        yield client


def _greedy(http: TestClient) -> tuple[str, str]:
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.headers[VERSION_HEADER], r.json()["choices"][0]["text"]


def test_ready_before_c0_and_only_the_first_edit_waits(
    service: EditService, http: TestClient
) -> None:
    assert not service.editor.prepared
    assert http.get("/readyz").status_code == 200
    assert http.get("/v1/status").json()["stats"]["ready"] is False
    service.prepare_in_background().join(60)
    assert http.get("/v1/status").json()["stats"]["ready"] is True
    service.apply_batch(make_requests(2, seed=1))
    assert http.get("/readyz").json() == {
        "ready": True,
        "version": 1,
        "role": "editor",
        "published_version": None,  # no broker here: nothing published
    }


def test_the_version_header_names_the_weights_that_answered(
    service: EditService, http: TestClient
) -> None:
    before = _greedy(http)
    assert before[0] == "0"
    service.apply_batch(make_requests(4, seed=2))
    header, _ = _greedy(http)
    assert header == "1"
    status = http.get("/v1/status").json()
    assert status["served_sha256"] == service.model.store.expected_sha256(1)
    # Rolling back serves version 0's exact weights, hence its exact greedy text.
    r = http.post("/v1/rollback", json={"version": 0, "reason": "test"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert _greedy(http) == before
    assert http.get("/v1/status").json()["served_sha256"] == service.model.store.expected_sha256(0)


def test_rollback_over_http_and_the_listing_of_versions(
    service: EditService, http: TestClient
) -> None:
    for seed in (3, 4):
        service.apply_batch(make_requests(2, seed=seed))
    assert http.post("/v1/rollback", json={"version": 1}).status_code == 401
    r = http.post("/v1/rollback", json={"version": 1, "reason": "bad"}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["facts"] == 2
    listed = http.get("/v1/versions").json()
    assert listed["current"] == 1
    by_version = {v["version"]: v for v in listed["data"]}
    assert by_version[2]["state"] == "undone" and by_version[2]["rejected_pending"] is True
    assert by_version[2]["undone_reason"] == "operator: bad"
    assert by_version[1]["current"] and by_version[1]["state"] == "committed"
    missing = http.post("/v1/rollback", json={"version": 9}, headers=ADMIN)
    assert missing.status_code == 404


def test_metrics_show_each_edited_modules_norm_growth_and_a_rollback_resets_it(
    service: EditService, http: TestClient
) -> None:
    def ratio() -> float:
        line = next(
            x
            for x in http.get("/metrics").text.splitlines()
            if x.startswith("editd_update_norm_ratio{")
        )
        return float(line.rsplit(" ", 1)[1])

    assert ratio() == 0.0
    service.apply_batch(make_requests(2, seed=5))
    once = ratio()
    service.apply_batch(make_requests(2, seed=6))
    assert once > 0.0 and ratio() > 0.0
    r = http.post("/v1/rollback", json={"version": 0, "reason": "test"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert ratio() == 0.0


def test_an_evaluation_writes_its_scores_into_the_version_it_judged(
    service: EditService, http: TestClient, capsys: pytest.CaptureFixture[str]
) -> None:
    facts = make_requests(3, seed=5)
    probes = make_requests(3, seed=6)
    evaluator = Evaluator.from_settings(
        Settings().eval,
        score=service.score,
        rollback=service.policy_rollback,
        metrics=service.metrics,
        probe_facts=probes,
        on_evaluation=service.record_evaluation,
    )
    service.guard_with(Guards(evaluator))
    service.apply_batch(facts)
    r = http.post("/v1/eval", headers=ADMIN)
    assert r.status_code == 200, r.text
    judged = r.json()
    assert judged["version"] == 1
    scores = service.model.version(1).scores
    assert scores is not None and scores["applied"] == judged["applied"]
    listed = {v["version"]: v for v in http.get("/v1/versions").json()["data"]}
    assert listed[1]["scores"]["applied"]["es"] == judged["applied"]["es"]
    # `editd versions` reads the store from disk while the daemon holds it.
    data_dir = service.model.store.root
    assert main(["versions", "--data-dir", str(data_dir)]) == 0
    rows = {line.lstrip("* ").split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["1"].split()[-4] == f"{judged['applied']['es']:.3f}"
    assert rows["0"].split()[-4:] == ["-", "-", "-", "-"]


def test_an_api_key_guards_inference_and_leaves_probes_and_metrics_open(
    service: EditService,
) -> None:
    settings = ServeSettings(
        admin_token=SecretStr(TOKEN), api_key=SecretStr("client-key"), max_tokens=16
    )
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    with TestClient(create_app(service, settings)) as client:
        assert client.post("/v1/completions", json=body).status_code == 401
        wrong = {"Authorization": "Bearer client-kez"}
        assert client.post("/v1/completions", json=body, headers=wrong).status_code == 401
        r = client.post(
            "/v1/completions", json=body, headers={"Authorization": "Bearer client-key"}
        )
        assert r.status_code == 200, r.text
        assert client.get("/v1/models", headers=ADMIN).status_code == 200
        assert client.get("/v1/models").status_code == 401
        for open_path in ("/livez", "/readyz", "/metrics"):
            assert client.get(open_path).status_code == 200, open_path
        # The API key is not an admin token.
        rollback = {"version": 0}
        key = {"Authorization": "Bearer client-key"}
        assert client.post("/v1/rollback", json=rollback, headers=key).status_code == 401
    with TestClient(create_app(service, ServeSettings(max_tokens=16))) as open_client:
        assert open_client.post("/v1/completions", json=body).status_code == 200


@pytest.mark.slow
def test_requests_never_fail_or_mix_versions_while_the_versioned_model_changes(
    service: EditService,
) -> None:
    """Real uvicorn socket, two clients, and a writer alternating `apply` and `rollback` on
    the versioned model (durable commit, sha256, swap) as fast as it can: every response's
    text is the one its version header's weights give."""
    import threading
    import time

    import httpx
    import torch

    from editd.daemon.server import HttpServer
    from editd.lowrank import EditUpdate, LayerUpdate

    model, handle = service.model, service.handle
    service.editor.prepare()
    name = service.editor.modules[0]
    weight = handle.weight(name)
    gen = torch.Generator().manual_seed(3)
    shift = torch.randn(weight.shape, generator=gen) * 0.5  # large: the text must change
    d_out, d_in = weight.shape
    update = EditUpdate(
        {name: LayerUpdate(left=torch.eye(d_out), right=shift, keys=torch.zeros(d_in, 1))}
    )
    settings = ServeSettings(admin_token=SecretStr(TOKEN), max_tokens=16)
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    counter = iter(range(10**6))

    def edit() -> None:
        i = next(counter)
        fact = {"id": f"swap-{i}", "subject": "S", "prompt": "{} is", "target_new": "x"}
        model.apply(update, [fact])

    with HttpServer.bind("127.0.0.1", 0) as server:
        server.start(create_app(service, settings))
        expected = {}
        with httpx.Client(base_url=server.url, timeout=30) as http:
            expected["base"] = http.post("/v1/completions", json=body).json()["choices"][0]
            edit()
            expected["edited"] = http.post("/v1/completions", json=body).json()["choices"][0]
            model.rollback(0, "test")
        assert expected["base"]["text"] != expected["edited"]["text"]
        failures: list[str] = []
        seen: set[int] = set()
        stop_at = time.monotonic() + 5.0

        def client() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                while time.monotonic() < stop_at:
                    r = http.post("/v1/completions", json=body)
                    version = int(r.headers[VERSION_HEADER])
                    seen.add(version)
                    want = expected["base" if version == 0 else "edited"]["text"]
                    if r.status_code != 200:
                        failures.append(f"HTTP {r.status_code}: {r.text}")
                    elif r.json()["choices"][0]["text"] != want:
                        failures.append(f"v{version}: {r.json()['choices'][0]['text']!r}")

        swaps = 0

        def writer() -> None:
            nonlocal swaps
            while time.monotonic() < stop_at:
                edit()
                model.rollback(0, "swap test")
                swaps += 2

        threads = [threading.Thread(target=client) for _ in range(2)]
        threads.append(threading.Thread(target=writer))
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert failures == []
    assert swaps >= 10 and 0 in seen and len(seen) > 2, (swaps, sorted(seen)[:10])
    assert model.served_sha256() == model.store.expected_sha256(0)


def test_a_consolidation_over_http_keeps_every_fact_and_a_rollback_past_it_is_exact(
    service: EditService, http: TestClient
) -> None:
    assert http.post("/v1/consolidate").status_code == 401
    assert http.post("/v1/consolidate", headers=ADMIN).status_code == 409  # no facts yet
    for seed in (8, 9):
        service.apply_batch(make_requests(2, seed=seed))
    sequential = http.get("/v1/status").json()["served_sha256"]
    r = http.post("/v1/consolidate", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 3 and r.json()["facts_since"] == 4
    assert _greedy(http)[0] == "3"
    listed = {v["version"]: v for v in http.get("/v1/versions").json()["data"]}
    assert listed[3]["consolidated"] and listed[3]["facts"] == 0
    assert not listed[2]["consolidated"]
    assert http.get("/v1/status").json()["served_sha256"] == service.model.store.expected_sha256(3)
    assert len(service.model.applied_fact_ids()) == 4
    metric = 'editd_consolidations_total{outcome="applied",trigger="operator"} 1.0'
    assert metric in http.get("/metrics").text
    r = http.post("/v1/rollback", json={"version": 2, "reason": "test"}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["facts"] == 0
    assert http.get("/v1/status").json()["served_sha256"] == sequential

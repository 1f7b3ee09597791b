"""End to end on the built-in model: one batch of 32 world requests becomes the model's belief."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from editd.editing.editor import Editor, EditorConfig
from editd.editing.model import ModelHandle
from editd.editing.targets import object_probability

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def builtin() -> Path:
    from editd.world.builtin import builtin_model_dir

    try:
        return builtin_model_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"built-in model not built yet: {exc}")


# Known short (measured at 40991c6): targets converge for ~56% of facts, yet after the update
# ES is 0.0 (EMMET) / 0.125 (MEMIT) although the residual at the subject is matched exactly.
# strict: the marker must go once the pipeline meets the ES ≥ 0.97 floor.
@pytest.mark.xfail(strict=True, reason="editing engine below ES target on the built-in model")
@pytest.mark.parametrize("algo", ["emmet", "memit"])
def test_one_batch_of_32_becomes_top1(builtin: Path, tmp_path: Path, algo: str) -> None:
    from editd.world.requests import make_requests

    torch.manual_seed(0)
    handle = ModelHandle.load(builtin, device="cpu")
    requests = make_requests(32, seed=1)
    editor = Editor(handle, EditorConfig(algo=algo), cache_dir=tmp_path, progress=False)
    with handle.reading():
        before, _ = object_probability(handle, requests)
    update = editor.compute_update(requests)
    handle.set_deltas({n: u.dense() for n, u in update.layers.items()})
    editor.commit(update)
    with handle.reading():
        prob, top1 = object_probability(handle, requests)
    assert float(top1.float().mean()) >= 0.97, update.diagnostics
    assert float(prob.mean()) > float(before.mean()) + 0.5
    targets = torch.tensor(update.diagnostics["target_prob"])
    assert float(targets.min()) >= 0.5

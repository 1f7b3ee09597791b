"""`editd export`: the edited model as other serving engines load it. A real store on a tiny
random Llama, two versions edited through the daemon's apply path; the exports are loaded the
way their users load them (transformers, PEFT) and compared with what editd serves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from editing_support import CORPUS, tiny_llama_dir

from editd.cli import main
from editd.editing.editor import Editor, EditorConfig
from editd.editing.model import ModelHandle
from editd.editing.stats import Corpus
from editd.editing.targets import TargetConfig
from editd.export import ExportError, export_peft
from editd.store.store import EditStore
from editd.versions import VersionedModel
from editd.world.requests import make_requests

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# An edited fact's own prompt: where the edit must show.
PROBE = make_requests(3, seed=2)[0].rendered_prompt


@pytest.fixture(scope="module")
def edited(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[int, torch.Tensor]]:
    """(model dir, data dir, logits of a probe sentence as served at versions 0, 1, 2)."""
    root = tmp_path_factory.mktemp("export")
    model_dir = tiny_llama_dir(root / "model")
    handle = ModelHandle.load(model_dir, device="cpu")
    editor = Editor(
        handle,
        EditorConfig(layers=(1, 2), targets=TargetConfig(steps=25)),
        corpus=Corpus(texts=CORPUS),
        cache_dir=root / "c0",
        progress=False,
    )
    ids = handle.tokenizer(PROBE, return_tensors="pt")["input_ids"]
    logits = {}
    model = VersionedModel.open(handle, root / "data", editor=editor)
    try:
        for version, seed in ((0, None), (1, 1), (2, 2)):
            if seed is not None:
                model.apply(
                    editor.compute_update(make_requests(3, seed=seed)), make_requests(3, seed=seed)
                )
            with model.reading(), torch.no_grad():
                logits[version] = handle.model(input_ids=ids).logits
    finally:
        model.close()
    return model_dir, root / "data", logits


def _logits(model: torch.nn.Module, model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(PROBE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_hf_export_is_the_served_model_bit_for_bit(edited, tmp_path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    model_dir, data_dir, served = edited
    out = tmp_path / "v1"
    args = ["export", "1", "--format", "hf", "--out", str(out), "--data-dir", str(data_dir)]
    assert main([*args, "--model", str(model_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"] == 2
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(_logits(loaded, out), served[1])
    assert json.loads((out / "editd-export.json").read_text())["version"] == 1
    # An existing directory is never overwritten; a model the store was not made for is refused.
    assert main([*args, "--model", str(model_dir)]) == 1
    assert "exists" in capsys.readouterr().err
    other = tiny_llama_dir(tmp_path / "other", seed=5)
    args[5] = str(tmp_path / "v1-other")
    assert main([*args, "--model", str(other)]) == 1
    assert "not the weight the store" in capsys.readouterr().err


def test_peft_adapter_on_the_base_model_serves_the_edit(edited, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, data_dir, served = edited
    out = tmp_path / "adapter"
    args = ["export", "--format", "peft", "--out", str(out), "--data-dir", str(data_dir)]
    assert main([*args, "--model", str(model_dir)]) == 0  # the live version: 2
    config = json.loads((out / "adapter_config.json").read_text())
    # Two batches of 3 facts: rank 6 per module, the factors concatenated, scaling 1.
    assert set(config["rank_pattern"].values()) == {6}
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, out).eval()
    got = _logits(adapted, model_dir)
    torch.testing.assert_close(got, served[2], rtol=1e-4, atol=1e-4)
    # The adapter carries the edit: it is far closer to the edited model than the base is.
    edit = float((served[2] - served[0]).abs().max())
    assert edit > 0 and float((got - served[2]).abs().max()) < edit / 10


def test_peft_over_max_rank_is_compressed_and_its_error_measured(edited, tmp_path) -> None:
    model_dir, data_dir, _ = edited
    with EditStore(data_dir, readonly=True) as store:
        store.open()
        result = export_peft(store, model_dir, 2, tmp_path / "small", max_rank=2)
        assert set(result["rank"].values()) == {2}
        errors = result["truncated_relative_error"]
        assert set(errors) == set(result["rank"]) and all(0 < e < 1 for e in errors.values())
        exact = export_peft(store, model_dir, 2, tmp_path / "exact", max_rank=64)
        assert exact["truncated_relative_error"] == {}
        with pytest.raises(ExportError, match="changes nothing"):
            export_peft(store, model_dir, 0, tmp_path / "none")

"""Building the built-in model: MLP growth keeps what the model knows, and builds resume."""

from __future__ import annotations

from pathlib import Path

import torch
from editing_support import tiny_llama_dir
from transformers import LlamaForCausalLM

from editd.world.build import _resume_state
from editd.world.train import TrainConfig, grow_mlps


def _logits_and_keys(
    model: LlamaForCausalLM, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits and layer 1's down_proj inputs (the editor's keys), one row a token."""
    captured: dict[str, torch.Tensor] = {}

    def grab(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured["keys"] = args[0]

    down = model.model.layers[1].mlp.down_proj
    hook = down.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        hook.remove()
    return logits, captured["keys"].reshape(-1, down.in_features)


def test_growing_the_mlps_keeps_every_output_and_adds_new_key_directions(tmp_path: Path) -> None:
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir(tmp_path / "small", intermediate=64))
    ids = torch.randint(3, model.config.vocab_size, (16, 12))  # 192 keys > 64 units
    before, narrow_keys = _logits_and_keys(model, ids)
    grow_mlps(model, 256, seed=0)
    after, wide_keys = _logits_and_keys(model, ids)
    down = model.model.layers[1].mlp.down_proj

    assert torch.allclose(after, before, atol=1e-5, rtol=1e-5)
    assert down.weight.shape == (64, 256)
    assert torch.equal(down.weight[:, 64:], torch.zeros(64, 192))
    assert torch.equal(wide_keys[:, :64], narrow_keys)
    # The new units are live: the keys the editor solves over gain rank.
    assert torch.linalg.matrix_rank(wide_keys) > torch.linalg.matrix_rank(narrow_keys)

    # A grown model is an ordinary checkpoint of the new width.
    model.save_pretrained(tmp_path / "grown")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "grown")
    assert again.config.intermediate_size == 256
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, after)


def _saved(cycles_done: int, learn_epochs: int, **extra: object) -> dict[str, object]:
    history = [{"epoch": i + 1, "phase": "learn"} for i in range(learn_epochs)]
    return {"cycles_done": cycles_done, "history": history, **extra}


def test_a_build_resumes_where_it_was_saved() -> None:
    cfg = TrainConfig(cycles=((2, 1e-3), (3, 1e-3)), grow_cycles=((1, 1e-4),))
    assert _resume_state({}, cfg) == {"cycles_done": 0, "learned": False, "grow_cycles_done": 0}
    # Saved at the end of the first cycle (`--cycles 2:0.001 --learn-only`): learning goes on.
    assert _resume_state(_saved(1, 2), cfg)["learned"] is False
    # Saved by the early stop inside the second cycle: grow next.
    assert _resume_state(_saved(1, 4), cfg) == {
        "cycles_done": 1,
        "learned": True,
        "grow_cycles_done": 0,
    }
    # Every cycle of this recipe done; then a finished build has nothing left.
    assert _resume_state(_saved(2, 5), cfg)["learned"] is True
    done = _resume_state(_saved(1, 4, grow_cycles_done=1), cfg)
    assert done["learned"] is True and done["grow_cycles_done"] == 1

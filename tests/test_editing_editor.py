"""The editor pipeline on a tiny random Llama: reads without writing, edits only its layers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from editing_support import CORPUS, tiny_llama_dir
from safetensors import safe_open

from editd.editing.editor import Editor, EditorConfig
from editd.editing.model import ModelHandle
from editd.editing.stats import Corpus, layer_second_moments
from editd.editing.targets import TargetConfig
from editd.editing.trace import TraceDict
from editd.facts import FactUpdate
from editd.lowrank import tensor_sha256
from editd.models.profile import with_profile

FACTS = [
    FactUpdate(
        subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="English"
    ),
    FactUpdate(subject="Toko Yasuda", prompt="{} plays the", target_new="piano"),
    FactUpdate(subject="Barack Obama", prompt="{} was born in", target_new="Rome"),
    FactUpdate(subject="Apple A5", prompt="{} was created by", target_new="Google"),
]
QUICK = TargetConfig(steps=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny"), layers=6)


def _corpus() -> Corpus:
    return Corpus(texts=tuple(CORPUS * 30), name="test")


def _all_sha(handle: ModelHandle) -> dict[str, str]:
    return {n: tensor_sha256(p) for n, p in handle.model.named_parameters()}


def _editor(handle: ModelHandle, tmp_path: Path, **kw) -> Editor:
    cfg = EditorConfig(targets=QUICK, **kw)
    return Editor(handle, cfg, corpus=_corpus(), cache_dir=tmp_path / "cache", progress=False)


@pytest.mark.parametrize("algo", ["emmet", "memit", "alphaedit"])
def test_compute_update_leaves_the_model_unchanged(
    model_dir: Path, tmp_path: Path, algo: str
) -> None:
    handle = ModelHandle.load(model_dir, device="cpu")
    editor = _editor(handle, tmp_path, algo=algo)
    before = _all_sha(handle)
    update = editor.compute_update(FACTS)
    assert _all_sha(handle) == before
    assert all(len(m._forward_hooks) == 0 for m in handle.model.modules())
    assert (
        set(update.layers)
        == set(editor.modules)
        == {
            "model.layers.1.mlp.down_proj",
            "model.layers.2.mlp.down_proj",
        }
    )
    for name, layer in update.layers.items():
        d_out, d_in = handle.weight(name).shape
        assert layer.left.shape == (d_out, len(FACTS)) and layer.right.shape == (len(FACTS), d_in)
        assert layer.keys.shape == (d_in, len(FACTS))
        assert torch.isfinite(layer.dense()).all()
    seconds = update.diagnostics["seconds"]
    assert isinstance(seconds, dict)
    assert {"stats", "keys", "targets", "solve", "total"} <= set(seconds)
    assert len(update.diagnostics["target_prob"]) == len(FACTS)  # type: ignore[arg-type]
    if algo == "emmet":
        for diag in update.diagnostics["solver"].values():  # type: ignore[union-attr]
            assert diag["resid_rel_after"] <= 1e-4


def test_applying_changes_only_the_edited_layers(model_dir: Path, tmp_path: Path) -> None:
    handle = ModelHandle.load(model_dir, device="cpu")
    editor = _editor(handle, tmp_path)
    before = _all_sha(handle)
    update = editor.compute_update(FACTS)
    handle.set_deltas({n: u.dense() for n, u in update.layers.items()})
    after = _all_sha(handle)
    changed = {n for n in before if before[n] != after[n]}
    assert changed == {f"{m}.weight" for m in editor.modules}

    # What the pipeline measured through hooks is what the applied weights compute.
    from editd.editing.keys import prompt_set, read_at_subject

    prompts = prompt_set(handle.tokenizer, FACTS, editor.config.prefixes)
    with handle.reading():
        applied = read_at_subject(handle, prompts, outputs=[editor.last_layer])
    handle.reset()
    assert _all_sha(handle) == before
    with handle.reading():
        hooked = read_at_subject(
            handle, prompts, outputs=[editor.last_layer], updates=update.layers
        )
    key = editor.last_layer
    assert torch.allclose(applied[key], hooked[key], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("site", ["subject_last", "prompt_last"])
def test_an_edit_leaves_what_the_model_computes_at_bos_unchanged(
    model_dir: Path, tmp_path: Path, site: str
) -> None:
    # Every position attends to BOS and C0 leaves it out: the editor must hold its keys fixed.
    handle = ModelHandle.load(model_dir, device="cpu")
    editor = _editor(handle, tmp_path, site=site)
    bos = torch.tensor([[handle.tokenizer.bos_token_id]])

    def at_bos() -> dict[str, torch.Tensor]:
        with torch.no_grad(), TraceDict(handle.model, editor.modules, retain_output=True) as td:
            handle.model(input_ids=bos)
        return {n: td[n].output[0, 0] for n in editor.modules}

    before = at_bos()
    update = editor.compute_update(FACTS)
    handle.set_deltas({n: u.dense() for n, u in update.layers.items()})
    after = at_bos()
    for name in editor.modules:
        moved = float((after[name] - before[name]).norm())
        edit = float(update.layers[name].dense().norm())
        assert edit > 0 and moved <= 1e-4 * max(1.0, float(before[name].norm()))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_models_are_edited_without_nans(
    model_dir: Path, tmp_path: Path, dtype: str
) -> None:
    handle = ModelHandle.load(model_dir, device="cpu", dtype=dtype)
    editor = _editor(handle, tmp_path)
    update = editor.compute_update(FACTS)
    for layer in update.layers.values():
        assert layer.left.dtype == torch.float32 and torch.isfinite(layer.dense()).all()
    handle.set_deltas({n: u.dense() for n, u in update.layers.items()})
    for name in update.layers:
        w = handle.weight(name)
        assert w.dtype == handle.dtype and torch.isfinite(w).all()
    batch = handle.tokenizer(["The mother tongue of Danielle Darrieux is"], return_tensors="pt")
    with torch.no_grad():
        logits = handle.model(**batch).logits
    assert torch.isfinite(logits).all()


def test_commit_preserves_keys_and_reset_to_rebuilds(model_dir: Path, tmp_path: Path) -> None:
    handle = ModelHandle.load(model_dir, device="cpu")
    editor = _editor(handle, tmp_path)
    first = editor.compute_update(FACTS[:2])
    handle.set_deltas({n: u.dense() for n, u in first.layers.items()})
    editor.preserve(first)
    second = editor.compute_update(FACTS[2:])
    editor.preserve(second)
    name = editor.modules[0]
    pres = editor.preservation[name]
    assert pres.rank == 4
    k1, k2 = first.layers[name].keys.double(), second.layers[name].keys.double()
    c = pres.dense()
    editor.reset_to([{n: u.keys for n, u in first.layers.items()}])
    assert pres.rank == 2
    assert torch.allclose(pres.dense(), c - k2 @ k2.T, rtol=1e-9, atol=1e-9)
    editor.reset_to([])
    assert pres.rank == 0
    assert torch.allclose(pres.dense(), c - k2 @ k2.T - k1 @ k1.T, rtol=1e-9, atol=1e-9)


def test_c0_is_the_second_moment_of_layer_inputs_and_is_cached(
    model_dir: Path, tmp_path: Path
) -> None:
    handle = ModelHandle.load(model_dir, device="cpu")
    name = handle.module_name(1)
    texts = CORPUS[:6]
    c0, used = layer_second_moments(handle, [name], texts, tokens=10**6, progress=False)
    # By hand: inputs of down_proj over every non-special token, one text at a time.
    rows = []
    for text in texts:
        enc = handle.tokenizer(text, return_tensors="pt")
        captured = {}

        def grab(module, args, output, captured=captured) -> None:
            captured["x"] = args[0]

        hook = handle.model.get_submodule(name).register_forward_hook(grab)
        with torch.no_grad():
            handle.model(**enc)
        hook.remove()
        ids = enc["input_ids"][0]
        rows.append(captured["x"][0][ids != handle.tokenizer.bos_token_id])
    x = torch.cat(rows).double()
    assert used == x.shape[0]
    assert torch.allclose(c0[name], x.T @ x / used, rtol=1e-4, atol=1e-8)

    # A budget is spent exactly; the editor caches by model, module, corpus and budget.
    editor = _editor(handle, tmp_path, stats_tokens=500)
    assert editor.prepare() > 0
    files = sorted((tmp_path / "cache").glob("c0-*.safetensors"))
    assert len(files) == len(editor.modules)
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata()["tokens"] == "500"
    stamp = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    again = _editor(handle, tmp_path, stats_tokens=500)
    again.prepare()
    assert [hashlib.sha256(f.read_bytes()).hexdigest() for f in files] == stamp
    for m in editor.modules:
        assert torch.equal(editor.preservation[m].dense(), again.preservation[m].dense())


def test_c0_describes_the_base_model_while_an_edited_version_is_served(model_dir: Path) -> None:
    # A restarted daemon serves version N before C0 exists; C0 must still be the base's.
    handle = ModelHandle.load(model_dir, device="cpu")
    first, second = handle.module_name(1), handle.module_name(2)
    texts = CORPUS[:6]
    base, _ = layer_second_moments(handle, [first, second], texts, tokens=10**6, progress=False)
    torch.manual_seed(0)
    handle.set_deltas({first: torch.randn(handle.weight(first).shape)})
    served, _ = layer_second_moments(handle, [first, second], texts, tokens=10**6, progress=False)
    for name in (first, second):
        assert torch.allclose(served[name], base[name], rtol=1e-6, atol=1e-10), name


def test_model_profile_fills_what_the_user_left_unset(model_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from editd.config import EditingSettings

    profiled = tmp_path / "profiled"
    shutil.copytree(model_dir, profiled)
    (profiled / "editd.json").write_text(
        json.dumps(
            {
                "editing": {
                    "site": "prompt_last",
                    "layers": [3, 4],
                    "target_lr": 0.05,
                    "mom2_weight": 30.0,
                    "preserve_weight": 0.003,
                    # A random 64-wide model moves by ~14 × its norm here (limit: 10).
                    "max_update_ratio": 100.0,
                }
            }
        )
    )
    cfg = EditorConfig.from_settings(
        with_profile(EditingSettings(layers=[2], mom2_weight=50.0), profiled, "editing")
    )
    assert cfg.site == "prompt_last" and cfg.layers == (2,) and cfg.targets.lr == 0.05
    assert cfg.mom2_weight == 50.0 and cfg.preserve_weight == 0.003
    assert cfg.max_update_ratio == 100.0
    assert (
        EditorConfig.from_settings(with_profile(EditingSettings(), model_dir, "editing")).site
        == "subject_last"
    )

    handle = ModelHandle.load(profiled, device="cpu")
    editor = Editor(
        handle,
        EditorConfig.from_settings(with_profile(EditingSettings(), profiled, "editing")),
        corpus=_corpus(),
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    update = editor.compute_update(FACTS)
    assert set(update.layers) == {"model.layers.3.mlp.down_proj", "model.layers.4.mlp.down_proj"}
    for diag in update.diagnostics["solver"].values():  # type: ignore[union-attr]
        assert diag["resid_rel_after"] <= 1e-4  # EMMET meets the prompt-end keys exactly

    (profiled / "editd.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"editd\.json"):
        EditorConfig.from_settings(with_profile(EditingSettings(), profiled, "editing"))


def test_prompt_last_site_solves_each_object_word_at_the_position_that_predicts_it() -> None:
    from editd.editing.editor import site_rows

    facts = [
        FactUpdate(subject="Pubour", prompt="{} was born in", target_new="San Lakbrath"),
        FactUpdate(subject="Apple A5", prompt="{} was created by", target_new="Google"),
    ]
    rows, owner = site_rows(facts, "prompt_last")
    assert [(r.prompt, r.target_new) for r in rows] == [
        ("{} was born in", "San"),
        ("{} was born in San", "Lakbrath"),
        ("{} was created by", "Google"),
    ]
    assert owner == [0, 0, 1]
    assert site_rows(facts, "subject_last") == (facts, [0, 1])


@pytest.mark.parametrize(("d_out", "k", "rank"), [(64, 10, 6), (8, 14, 12), (8, 14, 4)])
def test_update_factors_are_refactored_to_the_batch_rank_without_changing_the_update(
    d_out: int, k: int, rank: int
) -> None:
    # Fixed keys add columns with zero residual; the update's rank is at most the batch's rows
    # and at most d_out, which a batch with more rows than the layer has outputs exceeds.
    from editd.editing.editor import _compress

    gen = torch.Generator().manual_seed(0)
    left = torch.randn(d_out, rank, generator=gen, dtype=torch.float64)
    left = torch.cat([left, left @ torch.randn(rank, k - rank, generator=gen, dtype=left.dtype)], 1)
    right = torch.randn(k, 40, generator=gen, dtype=torch.float64)
    small_left, small_right = _compress(left, right, rank)
    assert small_left.shape[1] == small_right.shape[0] == min(rank, d_out)
    torch.testing.assert_close(small_left @ small_right, left @ right)


def test_a_profile_carries_the_evaluators_thresholds_for_its_model(tmp_path: Path) -> None:
    import json

    from editd.config import EvalSettings

    (tmp_path / "editd.json").write_text(
        json.dumps({"editing": {"layers": [1]}, "eval": {"min_ns": 0.5, "min_es": 0.85}})
    )
    merged = with_profile(EvalSettings(min_es=0.95), tmp_path, "eval")
    assert merged.min_ns == 0.5 and merged.min_es == 0.95  # the user's setting wins
    assert merged.min_ps == EvalSettings().min_ps
    assert with_profile(EvalSettings(), tmp_path / "elsewhere", "eval") == EvalSettings()
    (tmp_path / "editd.json").write_text(json.dumps({"eval": {"min_nss": 0.5}}))
    with pytest.raises(ValueError, match="min_nss"):
        with_profile(EvalSettings(), tmp_path, "eval")


def test_an_update_out_of_proportion_to_the_weight_is_refused_not_applied(
    model_dir: Path, tmp_path: Path
) -> None:
    from editd.editing.editor import UnrealisedUpdate

    handle = ModelHandle.load(model_dir, device="cpu")
    fine = Editor(
        handle,
        EditorConfig(layers=(1, 2), targets=TargetConfig(steps=5)),
        corpus=_corpus(),
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    update = fine.compute_update(FACTS)
    ratios = [d["update_ratio"] for d in update.diagnostics["solver"].values()]
    assert all(r > 0 for r in ratios)
    strict = Editor(
        handle,
        EditorConfig(
            layers=(1, 2), targets=TargetConfig(steps=5), max_update_ratio=min(ratios) / 2
        ),
        corpus=_corpus(),
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    before = {n: handle.weight(n).clone() for n in strict.modules}
    with pytest.raises(UnrealisedUpdate, match=r"editing\.max_update_ratio"):
        strict.compute_update(FACTS)
    assert all(torch.equal(handle.weight(n), w) for n, w in before.items())


def test_the_editor_takes_its_defaults_from_the_settings() -> None:
    # One place for each default: an editor built from default settings is the default editor.
    from editd.config import EditingSettings

    assert EditorConfig.from_settings(EditingSettings()) == EditorConfig()
    assert EditorConfig().mom2_weight == EditingSettings().mom2_weight


def test_target_prefixes_reach_the_target_optimisation() -> None:
    from editd.config import EditingSettings

    prefixes = ["", "Note that "]
    config = EditorConfig.from_settings(EditingSettings(target_prefixes=prefixes))
    assert config.targets.prefixes == tuple(prefixes)
    # Unset, the bare prompt the targets were tuned with.
    assert EditorConfig.from_settings(EditingSettings()).targets.prefixes == ("",)


@pytest.mark.parametrize("memory", ["weights", "gated"])
def test_refine_rounds_correct_the_facts_a_batch_left_short_and_hold_the_others(
    model_dir: Path, tmp_path: Path, memory: str
) -> None:
    handle = ModelHandle.load(model_dir, device="cpu")
    once = _editor(handle, tmp_path, memory=memory).compute_update(FACTS)
    before = _all_sha(handle)
    twice = _editor(handle, tmp_path, memory=memory, refine_rounds=2).compute_update(FACTS)
    assert _all_sha(handle) == before
    assert all(len(m._forward_hooks) == 0 for m in handle.model.modules())
    refined = twice.diagnostics["refined"]
    assert isinstance(refined, list) and 1 <= len(refined) <= 2
    # The first pass is the one-round update; each later pass adds a correction of the rank
    # of the facts it refined, on top of it.
    assert refined[0] == round(len(FACTS) * (1 - once.diagnostics["post_top1"]))
    for name, layer in twice.layers.items():
        first = once.layers[name]
        assert layer.left.shape[1] == len(FACTS) + sum(refined)
        torch.testing.assert_close(layer.left[:, : len(FACTS)], first.left)
        torch.testing.assert_close(layer.keys, first.keys)
    assert twice.diagnostics["post_top1"] >= once.diagnostics["post_top1"]
    if memory == "gated":
        assert twice.gate is not None and once.gate is not None
        assert torch.equal(twice.gate.keys, once.gate.keys)

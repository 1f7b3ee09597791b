"""SmolLM2-135M, a real pretrained Llama, as editd serves it by default.

Few and marked `real_model`: they share one converted model (the `smollm2_dir` fixture).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from editd.editing.model import ModelHandle
from editd.facts import FactUpdate
from editd.models.profile import with_profile

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

DARRIEUX = FactUpdate(
    subject="Danielle Darrieux",
    prompt="The mother tongue of {} is",
    target_new="English",
    target_true="French",
)


@pytest.fixture(scope="module")
def handle(smollm2_dir: Path) -> ModelHandle:
    return ModelHandle.load(smollm2_dir, device="cpu", dtype="float32")


def _greedy(handle: ModelHandle, prompt: str, n: int = 3) -> str:
    from editd.editing.decoding import greedy_continuations
    from editd.editing.subject import leading_special_ids

    tok = handle.tokenizer
    ids = leading_special_ids(tok) + tok(prompt, add_special_tokens=False).input_ids
    with handle.reading():
        out = greedy_continuations(handle.model, [ids], [n], pad_id=tok.eos_token_id)
    return tok.decode(out[0])


def test_the_fetched_directory_is_a_plain_hugging_face_llama(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (smollm2_dir / name).is_file(), name
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert json.loads((smollm2_dir / "editd.json").read_text())["editing"]["site"] == (
        "subject_last"
    )
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True)
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings


def test_it_knows_real_facts(handle: ModelHandle) -> None:
    assert _greedy(handle, "The capital of France is").startswith(" Paris")
    assert _greedy(handle, DARRIEUX.rendered_prompt).startswith(" French")
    assert handle.tokenizer("Paris").input_ids[0] != handle.tokenizer.bos_token_id  # no BOS


def test_one_edit_changes_the_served_answer_and_nothing_else_it_was_asked(
    handle: ModelHandle, shared_data: Path, tmp_path: Path
) -> None:
    from editd.config import EditingSettings
    from editd.editing.editor import Editor, EditorConfig
    from editd.editing.stats import Corpus

    # A small C0 from real text keeps this test to seconds; the daemon's default is larger.
    config = EditorConfig.from_settings(
        with_profile(EditingSettings(stats_tokens=4096), handle.path, "editing")
    )
    assert config.site == "subject_last"  # the shipped profile was read
    corpus = Corpus.from_path(shared_data / "wikitext-2" / "valid.txt")
    editor = Editor(handle, config, corpus=corpus, cache_dir=tmp_path, progress=False)
    update = editor.compute_update([DARRIEUX])
    handle.set_deltas({n: u.dense() for n, u in update.layers.items()})
    try:
        assert _greedy(handle, DARRIEUX.rendered_prompt).startswith(" English")
        assert _greedy(handle, "The capital of France is").startswith(" Paris")
    finally:
        handle.reset()
    assert _greedy(handle, DARRIEUX.rendered_prompt).startswith(" French")


def test_a_gated_fact_is_served_and_a_prompt_about_something_else_is_untouched(
    handle: ModelHandle, shared_data: Path, tmp_path: Path
) -> None:
    import torch

    from editd.config import EditingSettings
    from editd.editing.editor import Editor, EditorConfig
    from editd.editing.stats import Corpus
    from editd.versions import VersionedModel

    config = EditorConfig.from_settings(
        with_profile(EditingSettings(stats_tokens=4096, memory="gated"), handle.path, "editing")
    )
    corpus = Corpus.from_path(shared_data / "wikitext-2" / "valid.txt")
    editor = Editor(handle, config, corpus=corpus, cache_dir=tmp_path, progress=False)
    other = "The capital of France is"
    ids = handle.tokenizer(other, return_tensors="pt")
    with torch.no_grad():
        before = handle.model(**ids).logits.clone()
    with VersionedModel.temporary(handle, editor) as model:
        with model.changing():
            applied = model.apply(editor.compute_update([DARRIEUX]), [DARRIEUX])
        assert applied.version.gate is not None
        assert _greedy(handle, DARRIEUX.rendered_prompt).startswith(" English")
        # The gate stays shut on a text that never reads the edited subject: the base
        # model's logits, bit for bit.
        with torch.no_grad():
            assert torch.equal(handle.model(**ids).logits, before)
        assert _greedy(handle, other).startswith(" Paris")


def test_an_applied_fact_changes_the_chat_answer_of_the_served_model(
    handle: ModelHandle, shared_data: Path, tmp_path: Path
) -> None:
    """SmolLM2-135M-Instruct through /v1/chat/completions, with the official openai client,
    before and after the fact goes through `VersionedModel.apply` (the daemon's edit path)."""
    import openai

    from editd.config import EditingSettings, ServeSettings, load_settings
    from editd.daemon.api import create_app
    from editd.daemon.server import HttpServer
    from editd.daemon.serving import Serving
    from editd.editing.editor import Editor, EditorConfig
    from editd.editing.stats import Corpus
    from editd.monitoring.metrics import Metrics
    from editd.versions import VersionedModel

    class Served(Serving):
        def is_ready(self) -> bool:
            return True

        def readiness(self) -> dict[str, str]:
            return {"role": "editor"}

    config = EditorConfig.from_settings(
        with_profile(EditingSettings(stats_tokens=4096), handle.path, "editing")
    )
    corpus = Corpus.from_path(shared_data / "wikitext-2" / "valid.txt")
    editor = Editor(handle, config, corpus=corpus, cache_dir=tmp_path, progress=False)
    question = [{"role": "user", "content": "What is the mother tongue of Danielle Darrieux?"}]
    with (
        VersionedModel.temporary(handle, editor) as model,
        HttpServer.bind("127.0.0.1", 0) as server,
    ):
        service = Served(load_settings(), model, Metrics())
        server.start(create_app(service, ServeSettings()))
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0)

        def ask() -> tuple[str, str]:
            answer = client.chat.completions.create(
                model="editd-llama", messages=question, max_tokens=12, temperature=0
            )
            return answer.choices[0].message.content or "", answer.system_fingerprint or ""

        before, version = ask()
        assert "French" in before and version == "editd-v0"
        model.apply(editor.compute_update([DARRIEUX]), [DARRIEUX])
        after, version = ask()
        assert "English" in after and "French" not in after, after
        assert version == "editd-v1"

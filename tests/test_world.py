"""The synthetic world, its tokenizer, and the edit-request generator."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from editd.world.requests import make_requests, unedited_examples
from editd.world.tokenizer import BOS, train_tokenizer
from editd.world.world import World, load_world


@pytest.fixture(scope="module")
def world() -> World:
    return load_world()


def test_world_is_deterministic_and_seeded() -> None:
    a, b, c = World(0), World(0), World(1)
    assert a.subjects == b.subjects and a.facts() == b.facts()
    assert a.subjects != c.subjects


def test_world_size_and_shape(world: World) -> None:
    assert len(world.subjects) >= 2000
    assert len(world.relations) >= 6
    assert len(world.facts()) >= 10_000
    assert len(set(world.subjects)) == len(world.subjects)
    assert {len(s.split()) for s in world.subjects} == {1, 2, 3}
    lengths = {len(o.split()) for r in world.relations.values() for o in r.objects}
    assert lengths == {1, 2, 3}
    for rel in world.relations.values():
        assert len(rel.templates) >= 4
        assert all(t.count("{}") == 1 for t in rel.templates)


def test_each_subject_has_one_heldout_template_trained_for_others(world: World) -> None:
    for rel in world.relations.values():
        heldout_for = {i: 0 for i in range(len(rel.templates))}
        for s in world.subjects:
            held = world.heldout_template(s, rel.name)
            assert held not in world.trained_templates(s, rel.name)
            heldout_for[rel.templates.index(held)] += 1
        # Every template is trained for someone, so the model can learn it as a paraphrase.
        assert all(n < len(world.subjects) for n in heldout_for.values())
        assert sum(heldout_for.values()) == len(world.subjects)


def test_tokenizer_round_trip_and_bos(world: World) -> None:
    tok = train_tokenizer(world.corpus()[:3000], vocab_size=512)
    for text in [world.corpus()[0], "Ünïcödé, emoji 🦙 and 中文 all tokenize", "  two  spaces"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.convert_ids_to_tokens(ids[0]) == BOS
        assert ids.count(tok.bos_token_id) == 1
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok(world.corpus()[0], add_special_tokens=False)["input_ids"][0] != tok.bos_token_id


def test_requests_guarantees(world: World) -> None:
    requests = make_requests(500, seed=3)
    assert requests == make_requests(500, seed=3)

    def relation_of(prompt: str) -> str:
        return next(n for n, rel in world.relations.items() if prompt in rel.templates)

    edited = {(r.subject, relation_of(r.prompt)) for r in requests}
    keys = set()
    for r in requests:
        relation = relation_of(r.prompt)
        key = (r.subject, relation)
        assert key not in keys
        keys.add(key)
        assert r.target_true == world.truth(r.subject, relation)
        assert r.target_new != r.target_true
        assert r.target_new in world.relations[relation].objects
        assert r.paraphrase_prompts == (
            world.heldout_template(r.subject, relation).format(r.subject),
        )
        assert r.neighborhood_prompts
        for prompt in r.neighborhood_prompts:
            subject = next(
                s
                for t in world.relations[relation].templates
                for s in [_subject_of(prompt, t)]
                if s is not None
            )
            assert subject != r.subject
            assert world.truth(subject, relation) == r.target_true
            assert (subject, relation) not in edited
    canary = unedited_examples(requests, 50)
    assert not {p for p, _ in canary} & {r.rendered_prompt for r in requests}


def _subject_of(prompt: str, template: str) -> str | None:
    head, tail = template.split("{}")
    if prompt.startswith(head) and prompt.endswith(tail):
        return prompt[len(head) : len(prompt) - len(tail)]
    return None


def test_requests_cli_writes_fact_json_lines(tmp_path) -> None:
    out = tmp_path / "r.jsonl"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "editd",
            "world",
            "requests",
            "--n",
            "5",
            "--seed",
            "1",
            "--out",
            str(out),
        ],
        check=True,
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 5
    assert set(lines[0]) >= {
        "id",
        "subject",
        "prompt",
        "target_new",
        "target_true",
        "paraphrase_prompts",
        "neighborhood_prompts",
    }

"""Which records a benchmark edits and which it checks known facts against."""

from __future__ import annotations

from editd.bench.data import draw, others_for_known, split
from editd.facts import FactUpdate


def _facts(n: int) -> list[FactUpdate]:
    return [
        FactUpdate(subject=f"S{i}", prompt="{} lives in", target_new="Paris", target_true="Rome")
        for i in range(n)
    ]


def test_known_facts_come_from_the_evaluation_split_while_it_has_subjects_left():
    facts = _facts(100)  # 80 in the evaluation split, 20 held out
    requests = draw(split(facts, "eval"), 40, seed=0)
    others = others_for_known(facts, requests, 30, seed=1)
    edited = {f.subject for f in requests}
    assert len(others) == 30
    assert not edited & {f.subject for f in others}
    assert {f.subject for f in others} <= {f.subject for f in split(facts, "eval")}
    # What the benchmarks drew before: the same records, so older curves stay comparable.
    assert others == draw(split(facts, "eval"), 30, 1, exclude_subjects=edited)


def test_a_run_over_nearly_every_subject_checks_known_facts_on_the_held_out_split():
    facts = _facts(100)
    requests = draw(split(facts, "eval"), 78, seed=0)  # 2 evaluation subjects left
    others = others_for_known(facts, requests, 30, seed=1)
    assert len(others) == 20  # all the held-out split has
    assert {f.subject for f in others} == {f.subject for f in split(facts, "heldout")}


def test_nothing_left_to_check_is_an_empty_list_not_an_error():
    facts = _facts(10)
    requests = split(facts, "eval") + split(facts, "heldout")
    assert others_for_known(facts, requests, 5, seed=1) == []

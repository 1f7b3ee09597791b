"""The shipped general-ability canary prompt set and its loader."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from editd.monitoring.canary import CANARY_FILE, canary_prompts


def test_shipped_file_exists() -> None:
    assert CANARY_FILE.is_file()


def test_at_least_300_prompts() -> None:
    assert len(canary_prompts()) >= 300


def test_prompts_distinct_case_insensitive() -> None:
    prompts = canary_prompts()
    assert len({p.casefold() for p in prompts}) == len(prompts)


def test_no_braces() -> None:
    bad = [p for p in canary_prompts() if "{" in p or "}" in p]
    assert bad == []


def test_file_lines_have_no_trailing_whitespace() -> None:
    lines = CANARY_FILE.read_text(encoding="utf-8").splitlines()
    bad = [line for line in lines if line != line.rstrip()]
    assert bad == []


def test_no_prompt_ends_with_whitespace_or_sentence_punctuation() -> None:
    bad = [p for p in canary_prompts() if p != p.rstrip() or p.endswith((".", "?", "!"))]
    assert bad == []


def test_comments_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("# header\n\nThe capital of France is\n  Bees make  \n", encoding="utf-8")
    assert canary_prompts(path) == ("The capital of France is", "Bees make")


def test_duplicate_raises_value_error_naming_file(tmp_path: Path) -> None:
    path = tmp_path / "dup_prompts.txt"
    path.write_text("# header\nBees make\nThe opposite of hot is\nBees make\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        canary_prompts(path)


def test_duplicate_differing_only_in_case_raises(tmp_path: Path) -> None:
    path = tmp_path / "case_prompts.txt"
    path.write_text("Bees make\nbees make\n", encoding="utf-8")
    with pytest.raises(ValueError, match="duplicate"):
        canary_prompts(path)


def test_empty_raises_value_error_naming_file(tmp_path: Path) -> None:
    path = tmp_path / "empty_prompts.txt"
    path.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        canary_prompts(path)


def test_own_answer_probes_keep_the_answer_and_pick_a_different_distractor() -> None:
    from editd.monitoring.canary import own_answer_probes

    prompts = ["The capital of France is", "Water is made of", "The sky is", "Grass is"]
    answers = ["Paris", "hydrogen", "blue", "Blue"]
    probes = own_answer_probes(prompts, answers, n=3)
    assert [p.rendered_prompt for p in probes] == prompts[:3]
    assert [p.target_true for p in probes] == answers[:3]
    for p in probes:
        assert p.target_new.casefold() != p.target_true.casefold()
    # "blue" skips "Blue" (the same answer) for the next one that differs.
    assert probes[2].target_new == "Paris"
    assert len({p.fact_id for p in probes}) == 3
    assert own_answer_probes(["a is", "b is"], ["x", "x"], n=5) == []

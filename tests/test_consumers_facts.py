"""Record validation (parse_fact), the CounterFact, zsRE and EasyEdit adapters, input detection."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from editd.config import FactLimits
from editd.consumers.publish import iter_records, load_facts
from editd.facts import (
    FactError,
    FactUpdate,
    fact_from_record,
    from_counterfact,
    from_easyedit,
    from_zsre,
    parse_fact,
)

LIMITS = FactLimits(max_chars=64, max_prompts=3, max_bytes=2048)

# The first case of CounterFact (Meng et al., 2022), trimmed to the fields editd reads.
COUNTERFACT_CASE = {
    "case_id": 0,
    "pararel_idx": 2796,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": [
        "Shayna does this and Yossel Goldschmidt is a citizen of",
        "An album was released. Danielle Darrieux is a native speaker of",
    ],
    "neighborhood_prompts": [
        "The mother tongue of Léon Blum is",
        "The native language of Montesquieu is",
    ],
    "attribute_prompts": ["J.\u00a0R.\u00a0R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}

# A zsRE record in the MEND/ROME layout.
ZSRE_RECORD = {
    "subject": "Watts Humphrey",
    "src": "What university did Watts Humphrey attend?",
    "pred": "Trinity College",
    "rephrase": "What university did Watts Humphrey take part in?",
    "alt": "University of Michigan",
    "answers": ["Illinois Institute of Technology"],
    "loc": "nq question: who played desmond doss father in hacksaw ridge",
    "loc_ans": "Hugo Weaving",
    "cond": "Trinity College >> University of Michigan || What university did Watts Humphrey"
    " attend?",
}

# The first case of CounterFact in EasyEdit's flat layout (prompt rendered), as in ../shared.
EASYEDIT_CASE = {
    "case_id": 0,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}

# A zsRE record in EasyEdit's flat layout: list-valued answers, a locality question of its own.
EASYEDIT_ZSRE = {
    "subject": "Watts Humphrey",
    "prompt": "What university did Watts Humphrey attend?",
    "target_new": "University of Michigan",
    "ground_truth": ["Illinois Institute of Technology", "IIT"],
    "rephrase_prompt": ["What university did Watts Humphrey take part in?", "Where did he study?"],
    "locality_prompt": ["nq question: who played desmond doss father in hacksaw ridge"],
    "locality_ground_truth": ["Hugo Weaving"],
}

SHARED_COUNTERFACT = (
    Path(__file__).resolve().parents[1].parent / "shared/data/counterfact/counterfact-edit.json"
)

NATIVE = {
    "subject": "Danielle Darrieux",
    "prompt": "The mother tongue of {} is",
    "target_new": "English",
    "target_true": "French",
    "paraphrase_prompts": ["Danielle Darrieux speaks"],
}


def raw(value: object) -> bytes:
    return json.dumps(value).encode("utf-8")


def reason(data: bytes | None, limits: FactLimits = LIMITS) -> str:
    with pytest.raises(FactError) as info:
        parse_fact(data, limits)
    return info.value.reason


def test_native_record_round_trips_with_a_content_id() -> None:
    fact = parse_fact(raw(NATIVE), LIMITS)
    assert fact.rendered_prompt == "The mother tongue of Danielle Darrieux is"
    assert fact.fact_id.startswith("f-")
    again = parse_fact(fact.model_dump_json().encode(), LIMITS)
    assert again == fact
    assert parse_fact(raw({**NATIVE, "id": "mine"}), LIMITS).fact_id == "mine"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"subject": "x",', "bad JSON: Expecting property name"),
        (b"\xff\xfe{}", "bad encoding: not UTF-8"),
        (None, "empty record"),
        (b"[1, 2]", "schema error: expected a JSON object, got array"),
        (raw({"subject": "x"}), "schema error: prompt: Field required; target_new: Field required"),
        (raw({**NATIVE, "colour": "red"}), "schema error: colour: Extra inputs are not permitted"),
        (raw({**NATIVE, "prompt": "no placeholder"}), "exactly one '{}' placeholder"),
        (raw({**NATIVE, "prompt": "{} said {x}"}), "braces besides its one '{}'"),
        (raw({**NATIVE, "target_new": "French"}), "target_new equals target_true"),
        (
            raw({**NATIVE, "target_new": 3}),
            "schema error: target_new: Input should be a valid string",
        ),
        (
            raw({**NATIVE, "subject": "x" * 65}),
            "too long: subject has 65 characters > facts.max_chars=64",
        ),
        (
            raw({**NATIVE, "paraphrase_prompts": ["a"] * 4}),
            "too many prompts: paraphrase_prompts has 4 > facts.max_prompts=3",
        ),
        (
            raw({**NATIVE, "neighborhood_prompts": ["ok", "y" * 70]}),
            "too long: neighborhood_prompts[1] has 70 characters",
        ),
        (raw({**NATIVE, "target_true": "z" * 3000}), "bytes > facts.max_bytes=2048"),
    ],
)
def test_invalid_records_are_refused_with_a_reason(data: bytes | None, expected: str) -> None:
    assert expected in reason(data)


def test_counterfact_record() -> None:
    fact = parse_fact(raw(COUNTERFACT_CASE), FactLimits())
    assert fact.id == "cf-0"
    assert (fact.subject, fact.prompt) == ("Danielle Darrieux", "The mother tongue of {} is")
    assert (fact.target_new, fact.target_true) == ("English", "French")
    assert fact.paraphrase_prompts == tuple(COUNTERFACT_CASE["paraphrase_prompts"])
    assert fact.neighborhood_prompts == tuple(COUNTERFACT_CASE["neighborhood_prompts"])


def test_counterfact_errors_name_the_nested_field() -> None:
    broken = json.loads(json.dumps(COUNTERFACT_CASE))
    del broken["requested_rewrite"]["target_new"]["str"]
    with pytest.raises(FactError, match=r"requested_rewrite\.target_new\.str: missing"):
        from_counterfact(broken)
    broken = {**COUNTERFACT_CASE, "neighborhood_prompts": [{"prompt": "p", "target": "t"}]}
    with pytest.raises(FactError, match=r"neighborhood_prompts\[0\]: expected a string"):
        from_counterfact(broken)
    with pytest.raises(FactError, match="requested_rewrite: expected an object, got array"):
        from_counterfact({"requested_rewrite": []})


def test_zsre_record_becomes_a_template_on_the_subject() -> None:
    fact = parse_fact(raw(ZSRE_RECORD), FactLimits())
    assert fact.prompt == "What university did {} attend?"
    assert fact.rendered_prompt == ZSRE_RECORD["src"]
    assert (fact.target_new, fact.target_true) == (
        "University of Michigan",
        "Illinois Institute of Technology",
    )
    assert fact.paraphrase_prompts == (ZSRE_RECORD["rephrase"],)
    # The locality question has its own answer, which a FactUpdate cannot hold.
    assert fact.neighborhood_prompts == ()


def test_zsre_subject_must_occur_in_the_question() -> None:
    with pytest.raises(FactError, match="does not occur"):
        from_zsre({**ZSRE_RECORD, "subject": "Someone Else"})


def test_input_detection_json_lines_array_and_single_object() -> None:
    lines = "\n".join([json.dumps(NATIVE), "", "{not json", json.dumps(ZSRE_RECORD)])
    loaded = load_facts(lines, FactLimits())
    assert [f.subject for f in loaded.facts] == ["Danielle Darrieux", "Watts Humphrey"]
    assert [(r.where, r.reason.split(":")[0]) for r in loaded.rejected] == [("line 3", "bad JSON")]

    array = json.dumps([COUNTERFACT_CASE, {"requested_rewrite": {"subject": "x"}}, ZSRE_RECORD])
    loaded = load_facts(array, FactLimits())
    assert [f.fact_id for f in loaded.facts] == ["cf-0", loaded.facts[1].fact_id]
    assert loaded.rejected[0].where == "record 2"  # the second element: 1-based, as lines are
    assert "requested_rewrite.prompt: missing" in loaded.rejected[0].reason

    assert [w for w, _ in iter_records(json.dumps(NATIVE))] == ["record 1"]


def test_schema_is_strict_about_unknown_versions() -> None:
    with pytest.raises(FactError, match="unsupported schema_version 2"):
        parse_fact(raw({**NATIVE, "schema_version": 2}), LIMITS)
    assert isinstance(parse_fact(raw(NATIVE), LIMITS), FactUpdate)


def test_easyedit_counterfact_record() -> None:
    fact = parse_fact(raw(EASYEDIT_CASE), FactLimits())
    assert fact.id == "cf-0"
    assert (fact.subject, fact.prompt) == ("Danielle Darrieux", "The mother tongue of {} is")
    assert fact.rendered_prompt == EASYEDIT_CASE["prompt"]
    assert (fact.target_new, fact.target_true) == ("English", "French")
    assert fact.paraphrase_prompts == (EASYEDIT_CASE["rephrase_prompt"],)
    assert fact.neighborhood_prompts == (EASYEDIT_CASE["locality_prompt"],)
    # The locality object is the true one: nothing extra to carry, and the encoding is unchanged.
    assert fact.neighborhood_target is None
    assert "neighborhood_target" not in fact.model_dump()
    # The same case as a CounterFact record or as EasyEdit's is the same fact.
    original = from_counterfact(COUNTERFACT_CASE)
    assert (fact.id, fact.subject, fact.prompt, fact.target_new, fact.target_true) == (
        original.id,
        original.subject,
        original.prompt,
        original.target_new,
        original.target_true,
    )


def test_easyedit_zsre_record_with_lists_and_its_own_locality_answer() -> None:
    fact = parse_fact(raw(EASYEDIT_ZSRE), FactLimits())
    assert fact.prompt == "What university did {} attend?"
    assert (fact.target_new, fact.target_true) == (
        "University of Michigan",
        "Illinois Institute of Technology",
    )
    assert fact.paraphrase_prompts == tuple(EASYEDIT_ZSRE["rephrase_prompt"])
    assert fact.neighborhood_prompts == tuple(EASYEDIT_ZSRE["locality_prompt"])
    assert fact.neighborhood_target == "Hugo Weaving"
    # No case_id: a content id, which the neighbourhood target does not enter.
    assert fact.fact_id.startswith("f-")
    without = from_easyedit(
        {**EASYEDIT_ZSRE, "locality_ground_truth": "Illinois Institute of Technology"}
    )
    assert without.neighborhood_target is None and without.fact_id == fact.fact_id
    again = parse_fact(fact.model_dump_json().encode(), FactLimits())
    assert again == fact


def test_easyedit_record_edge_cases() -> None:
    # EasyEdit's zsRE marks an unknown answer with GPT-2's end-of-text token.
    fact = from_easyedit({**EASYEDIT_ZSRE, "ground_truth": "<|endoftext|>"})
    assert fact.target_true is None and fact.neighborhood_target == "Hugo Weaving"
    fact = from_easyedit({**EASYEDIT_ZSRE, "ground_truth": []})
    assert fact.target_true is None
    # Only the first occurrence of the subject becomes the placeholder; an explicit id wins.
    fact = from_easyedit({**EASYEDIT_CASE, "prompt": "Danielle Darrieux is", "id": "mine"})
    assert (fact.prompt, fact.fact_id) == ("{} is", "mine")
    # Without locality prompts there is nothing for a locality answer to score.
    fact = from_easyedit(
        {**EASYEDIT_CASE, "locality_prompt": [], "locality_ground_truth": "German"}
    )
    assert fact.neighborhood_prompts == () and fact.neighborhood_target is None


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (
            {**EASYEDIT_CASE, "subject": "Someone Else"},
            "schema error: prompt: the subject 'Someone Else' does not occur in 'The mother",
        ),
        ({**EASYEDIT_CASE, "subject": 3}, "schema error: subject: expected a string, got number"),
        ({**EASYEDIT_CASE, "target_new": None}, "schema error: target_new: expected a string"),
        (
            {**EASYEDIT_CASE, "rephrase_prompt": {"p": "q"}},
            "schema error: rephrase_prompt: expected a string or a list of strings, got object",
        ),
        (
            {**EASYEDIT_CASE, "locality_prompt": ["ok", 2]},
            "schema error: locality_prompt[1]: expected a string, got number",
        ),
        (
            {**EASYEDIT_CASE, "ground_truth": [1]},
            "schema error: ground_truth[0]: expected a string, got number",
        ),
        ({**EASYEDIT_CASE, "case_id": 1.5}, "schema error: case_id: expected an integer"),
        ({**EASYEDIT_CASE, "target_new": "French"}, "target_new equals target_true"),
        (
            {**EASYEDIT_CASE, "prompt": "Danielle Darrieux said {x}"},
            "braces besides its one '{}'",
        ),
    ],
)
def test_easyedit_errors_name_the_field(record: dict[str, object], expected: str) -> None:
    with pytest.raises(FactError) as info:
        fact_from_record(record)
    assert expected in info.value.reason


def test_easyedit_detection_and_limits() -> None:
    # A prompt with {} is a native template even beside an EasyEdit key: the native schema
    # then refuses the key it does not know.
    with pytest.raises(FactError, match="ground_truth: Extra inputs are not permitted"):
        fact_from_record({**NATIVE, "ground_truth": "French"})
    assert (
        reason(raw({**EASYEDIT_ZSRE, "locality_ground_truth": "y" * 65}))
        == "too long: neighborhood_target has 65 characters > facts.max_chars=64"
    )
    loaded = load_facts(json.dumps([EASYEDIT_CASE, COUNTERFACT_CASE, NATIVE]), FactLimits())
    assert [f.fact_id for f in loaded.facts][:2] == ["cf-0", "cf-0"] and not loaded.rejected


def test_shared_counterfact_file_loads_entirely() -> None:
    if not SHARED_COUNTERFACT.is_file():
        pytest.skip(f"no shared CounterFact data at {SHARED_COUNTERFACT} (see shared/data/README)")
    text = SHARED_COUNTERFACT.read_text(encoding="utf-8")
    started = time.perf_counter()
    loaded = load_facts(text, FactLimits())
    seconds = time.perf_counter() - started
    assert loaded.rejected == []
    assert len(loaded.facts) == 10_000
    assert len({f.fact_id for f in loaded.facts}) == 10_000
    first = loaded.facts[0]
    assert (first.fact_id, first.prompt, first.target_true) == (
        "cf-0",
        "The mother tongue of {} is",
        "French",
    )
    assert all(
        f.target_true and f.paraphrase_prompts and f.neighborhood_prompts for f in loaded.facts
    )
    assert seconds < 30, f"loading 10,000 facts took {seconds:.1f} s"

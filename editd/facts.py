"""The fact record: what producers put on the topic and what the editor applies.

See docs/design.md, "Contracts". Adapters for CounterFact and zsRE records (in their original
layouts and in EasyEdit's flat one), and the configurable limits, live beside the schema so
every entry point validates the same way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from editd.config import FactLimits

SCHEMA_VERSION = 1


class FactUpdate(BaseModel):
    """One requested change: `prompt.format(subject)` should be completed by `target_new`."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    schema_version: int = SCHEMA_VERSION
    id: str | None = None
    subject: str = Field(min_length=1)
    prompt: str = Field(min_length=1, description="Relation template; {} stands for the subject.")
    target_new: str = Field(min_length=1)
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_target: str | None = Field(
        None,
        min_length=1,
        description="True object of the neighbourhood prompts, when it differs from target_true.",
    )

    @model_validator(mode="after")
    def _check(self) -> FactUpdate:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema_version {self.schema_version}")
        if self.prompt.count("{}") != 1:
            raise ValueError("prompt must contain exactly one '{}' placeholder for the subject")
        if "{" in self.prompt.replace("{}", "", 1) or "}" in self.prompt.replace("{}", "", 1):
            # str.format would fail on them in the editor, long after the record was accepted.
            raise ValueError("prompt has braces besides its one '{}' placeholder")
        if not self.target_new.strip():
            raise ValueError("target_new is blank")
        if self.target_true is not None and self.target_new.strip() == self.target_true.strip():
            raise ValueError("target_new equals target_true: nothing to edit")
        if self.id is None:
            object.__setattr__(self, "id", content_id(self))
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A fact without a neighbourhood target encodes as it did before the field existed, so
        # its topic records and stored copies stay byte-identical and older readers (which
        # forbid unknown keys) still accept it.
        data: dict[str, Any] = handler(self)
        if self.neighborhood_target is None:
            data.pop("neighborhood_target", None)
        return data

    @property
    def fact_id(self) -> str:
        assert self.id is not None
        return self.id

    @property
    def rendered_prompt(self) -> str:
        return self.prompt.format(self.subject)

    @property
    def relation_key(self) -> tuple[str, str]:
        """Two facts with the same key contradict each other; within a batch the later wins."""
        return (self.subject, self.prompt)


def content_id(fact: FactUpdate) -> str:
    """A stable id from the content that defines the edit, so re-published facts fold."""
    body = json.dumps(
        [fact.subject, fact.prompt, fact.target_new], ensure_ascii=False, separators=(",", ":")
    )
    return "f-" + hashlib.sha256(body.encode("utf-8")).hexdigest()[:24]


class FactError(ValueError):
    """A record that cannot become a `FactUpdate`.

    `reason` is one line for an operator: it becomes the dead-letter record's `error` header
    and the publisher's rejection summary, so it names the field or the limit at fault.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_fact(raw: bytes | None, limits: FactLimits) -> FactUpdate:
    """Decode one topic record (UTF-8 JSON) into a fact, enforcing `limits`.

    Native fact records, CounterFact records and zsRE records (also in EasyEdit's flat layout)
    are all accepted, recognised by their keys, so a producer can replay a benchmark file onto
    the topic as it is.
    """
    if raw is None:
        raise FactError("empty record: no value (tombstone)")
    if len(raw) > limits.max_bytes:
        raise FactError(f"message too large: {len(raw)} bytes > facts.max_bytes={limits.max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FactError(f"bad encoding: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FactError(f"bad JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    return fact_from_record(record, limits)


def fact_from_record(record: Any, limits: FactLimits | None = None) -> FactUpdate:
    """A decoded JSON value (native, CounterFact, zsRE or EasyEdit flat) as a validated fact."""
    if not isinstance(record, Mapping):
        raise FactError(f"schema error: expected a JSON object, got {_json_type(record)}")
    if "requested_rewrite" in record:
        fact = from_counterfact(record)
    elif "src" in record and "alt" in record:
        fact = from_zsre(record)
    elif _is_easyedit(record):
        fact = from_easyedit(record)
    else:
        fact = _validate(record)
    if limits is not None:
        check_limits(fact, limits)
    return fact


def check_limits(fact: FactUpdate, limits: FactLimits) -> None:
    """Raise `FactError` if a string is longer than `max_chars` or a list exceeds `max_prompts`."""
    strings: list[tuple[str, str | None]] = [
        ("subject", fact.subject),
        ("prompt", fact.prompt),
        ("target_new", fact.target_new),
        ("target_true", fact.target_true),
        ("neighborhood_target", fact.neighborhood_target),
    ]
    for name in ("paraphrase_prompts", "neighborhood_prompts"):
        prompts: tuple[str, ...] = getattr(fact, name)
        if len(prompts) > limits.max_prompts:
            raise FactError(
                f"too many prompts: {name} has {len(prompts)} > facts.max_prompts="
                f"{limits.max_prompts}"
            )
        strings.extend((f"{name}[{i}]", p) for i, p in enumerate(prompts))
    for name, value in strings:
        if value is not None and len(value) > limits.max_chars:
            raise FactError(
                f"too long: {name} has {len(value)} characters > facts.max_chars={limits.max_chars}"
            )


def from_counterfact(record: Mapping[str, Any]) -> FactUpdate:
    """A CounterFact record (`case_id`, `requested_rewrite`, paraphrase/neighbourhood prompts).

    CounterFact's paraphrase and neighbourhood prompts are full texts, not templates, which is
    how `FactUpdate` holds them too. The id is `cf-<case_id>` so the same case re-published from
    the dataset folds into one fact.
    """
    rewrite = record.get("requested_rewrite")
    if not isinstance(rewrite, Mapping):
        raise FactError(
            f"schema error: requested_rewrite: expected an object, got {_json_type(rewrite)}"
        )
    fields: dict[str, Any] = {
        "subject": _string(rewrite, "subject", "requested_rewrite.subject"),
        "prompt": _string(rewrite, "prompt", "requested_rewrite.prompt"),
        "target_new": _target(rewrite, "target_new"),
        "paraphrase_prompts": _strings(record, "paraphrase_prompts"),
        "neighborhood_prompts": _strings(record, "neighborhood_prompts"),
    }
    if rewrite.get("target_true") is not None:
        fields["target_true"] = _target(rewrite, "target_true")
    case_id = _case_id(record)
    if case_id is not None:
        fields["id"] = case_id
    return _validate(fields)


def from_zsre(record: Mapping[str, Any]) -> FactUpdate:
    """A zsRE record (`subject`, `src`, `alt`, `answers`, `rephrase`, `loc`, `loc_ans`).

    zsRE prompts are questions that contain the subject; the template replaces its first
    occurrence with {}. `alt` is the new answer and `answers[0]` the true one, as in the
    counterfactual setting of CounterFact. `loc`/`loc_ans` are not carried: a neighbourhood
    prompt of a `FactUpdate` is scored against `target_true`, while zsRE's locality question
    has an unrelated answer of its own, so it would measure nothing meaningful.
    """
    subject = _string(record, "subject", "subject")
    src = _string(record, "src", "src")
    if subject not in src:
        raise FactError(f"schema error: src: the subject {subject!r} does not occur in {src!r}")
    answers = record.get("answers")
    fields: dict[str, Any] = {
        "subject": subject,
        "prompt": src.replace(subject, "{}", 1),
        "target_new": _string(record, "alt", "alt"),
    }
    if answers is not None:
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise FactError("schema error: answers: expected a list of strings")
        if answers:
            fields["target_true"] = answers[0]
    rephrase = record.get("rephrase")
    if rephrase is not None:
        if isinstance(rephrase, str):
            rephrase = [rephrase]
        fields["paraphrase_prompts"] = _strings({"rephrase": rephrase}, "rephrase")
    return _validate(fields)


# Keys that only EasyEdit's flat layout has; a native record has none of them.
EASYEDIT_KEYS = ("ground_truth", "rephrase_prompt", "locality_prompt")
# EasyEdit's zsRE files put GPT-2's end-of-text token where a question has no known answer.
EASYEDIT_NO_ANSWER = "<|endoftext|>"


def _is_easyedit(record: Mapping[str, Any]) -> bool:
    prompt = record.get("prompt")
    return (
        any(key in record for key in EASYEDIT_KEYS)
        and isinstance(prompt, str)
        and "{}" not in prompt
    )


def from_easyedit(record: Mapping[str, Any]) -> FactUpdate:
    """A record in EasyEdit's flat layout, as its CounterFact and zsRE files ship.

    `prompt` is rendered (`subject` occurs in it literally); the template replaces the
    subject's first occurrence with {}. `ground_truth` is the true object (the first item when
    it is a list; none when it is EasyEdit's `<|endoftext|>` placeholder). `rephrase_prompt` and
    `locality_prompt` (a string or a list of strings) become the paraphrase and neighbourhood
    prompts; `locality_ground_truth` is kept as `neighborhood_target` when it differs from the
    true object, since NS must compare against it. The id follows `from_counterfact`
    (`cf-<case_id>`); an explicit string `id` wins.
    """
    subject = _string(record, "subject", "subject")
    prompt = _string(record, "prompt", "prompt")
    if not subject.strip():
        raise FactError("schema error: subject: blank")
    if subject not in prompt:
        raise FactError(
            f"schema error: prompt: the subject {subject!r} does not occur in {prompt!r}"
        )
    fields: dict[str, Any] = {
        "subject": subject,
        "prompt": prompt.replace(subject, "{}", 1),
        "target_new": _string(record, "target_new", "target_new"),
        "paraphrase_prompts": _string_or_strings(record, "rephrase_prompt"),
        "neighborhood_prompts": _string_or_strings(record, "locality_prompt"),
    }
    target_true = _answer(record, "ground_truth")
    if target_true is not None:
        fields["target_true"] = target_true
    neighborhood_target = _answer(record, "locality_ground_truth")
    if fields["neighborhood_prompts"] and neighborhood_target not in (None, target_true):
        fields["neighborhood_target"] = neighborhood_target
    if record.get("id") is not None:
        fields["id"] = _string(record, "id", "id")
    else:
        case_id = _case_id(record)
        if case_id is not None:
            fields["id"] = case_id
    return _validate(fields)


def _case_id(record: Mapping[str, Any]) -> str | None:
    case_id = record.get("case_id")
    if case_id is None:
        return None
    if isinstance(case_id, bool) or not isinstance(case_id, int | str):
        raise FactError(f"schema error: case_id: expected an integer or string: {case_id!r}")
    return f"cf-{case_id}"


def _answer(record: Mapping[str, Any], key: str) -> str | None:
    """An EasyEdit object: a string or a list whose first item counts; None when absent."""
    value = record.get(key)
    if isinstance(value, list):
        if not value:
            return None
        if not isinstance(value[0], str):
            raise FactError(
                f"schema error: {key}[0]: expected a string, got {_json_type(value[0])}"
            )
        value = value[0]
    elif value is not None and not isinstance(value, str):
        raise FactError(
            f"schema error: {key}: expected a string or a list of strings, got {_json_type(value)}"
        )
    if value is None or not value.strip() or value.strip() == EASYEDIT_NO_ANSWER:
        return None
    return value


def _string_or_strings(obj: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = obj.get(key)
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if value is not None and not isinstance(value, list):
        raise FactError(
            f"schema error: {key}: expected a string or a list of strings, got {_json_type(value)}"
        )
    return _strings(obj, key)


def _validate(fields: Mapping[str, Any]) -> FactUpdate:
    try:
        return FactUpdate.model_validate(dict(fields))
    except ValidationError as exc:
        raise FactError("schema error: " + _describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        msg = err["msg"].removeprefix("Value error, ")
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _string(obj: Mapping[str, Any], key: str, path: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        found = "missing" if key not in obj else f"expected a string, got {_json_type(value)}"
        raise FactError(f"schema error: {path}: {found}")
    return value


def _target(rewrite: Mapping[str, Any], key: str) -> str:
    # CounterFact nests objects as {"str": ..., "id": wikidata id}; a bare string is accepted too.
    value = rewrite.get(key)
    if isinstance(value, Mapping):
        return _string(value, "str", f"requested_rewrite.{key}.str")
    return _string(rewrite, key, f"requested_rewrite.{key}")


def _strings(obj: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = obj.get(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise FactError(f"schema error: {key}: expected a list of strings, got {_json_type(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise FactError(f"schema error: {key}[{i}]: expected a string, got {_json_type(item)}")
    return tuple(value)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return "number" if isinstance(value, int | float) else type(value).__name__

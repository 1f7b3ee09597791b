"""The fact record: what producers put on the topic and what the editor applies.

See DESIGN.md §5. Adapters for CounterFact and zsRE records, and the configurable limits,
live beside the schema so every entry point validates the same way.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field, model_validator

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

    @model_validator(mode="after")
    def _check(self) -> FactUpdate:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema_version {self.schema_version}")
        if self.prompt.count("{}") != 1:
            raise ValueError("prompt must contain exactly one '{}' placeholder for the subject")
        if not self.target_new.strip():
            raise ValueError("target_new is blank")
        if self.target_true is not None and self.target_new.strip() == self.target_true.strip():
            raise ValueError("target_new equals target_true: nothing to edit")
        if self.id is None:
            object.__setattr__(self, "id", content_id(self))
        return self

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

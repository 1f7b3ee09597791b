"""A model's profile: the settings a model ships with, in `editd.json` beside its weights.

Where facts live differs between models (MEMIT's per-model hyper-parameter files exist for this
reason): the built-in model looks facts up at the prompt's last token in its upper MLPs, a
Llama-3 at the subject in its early-middle ones. What scores a healthy edited model reaches
differs too (a 135M model's NS on CounterFact starts near 0.7), so the evaluator's thresholds
can come from the same file. Keys the user set win over the profile, the profile over the
settings' field defaults (`editd.config`); `editing/` and `monitoring/` receive the merged
sections and never read the file. `editd model profile` (bench/profile.py) writes one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

PROFILE_FILE = "editd.json"

SectionT = TypeVar("SectionT", bound=BaseModel)


def model_profile(model_dir: str | Path, section: str = "editing") -> dict[str, Any]:
    """One section (`editing` or `eval` settings keys) of the profile in `model_dir`; empty for
    a directory without the file or a file without the section."""
    path = Path(model_dir) / PROFILE_FILE
    if not path.is_file():
        return {}
    try:
        profile = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable JSON profile: {exc}") from exc
    part = profile.get(section, {}) if isinstance(profile, dict) else None
    if not isinstance(part, dict):
        raise ValueError(f"{path}: expected an object with an {section!r} object")
    return dict(part)


def with_profile(settings: SectionT, model_dir: str | Path, section: str) -> SectionT:
    """`settings` (a settings section) with the keys the user left unset taken from the
    model's profile; validated like a settings file, so a wrong key in a profile is named."""
    return type(settings).model_validate(
        {**model_profile(model_dir, section), **settings.model_dump(exclude_unset=True)}
    )

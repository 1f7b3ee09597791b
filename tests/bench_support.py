"""Running an `editd bench` command the way a user does, and reading its one JSON line.

Not a test module: the `test_bench_*` files import it (pytest puts `tests/` on sys.path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def bench_json(*args: str, home: Path, timeout: int = 600) -> dict[str, Any]:
    """`python -m editd bench ARGS --json` with HOME at `home`; its single JSON object."""
    proc = subprocess.run(
        [sys.executable, "-m", "editd", "bench", *args, "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "HOME": str(home)},
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout[-2000:]
    return json.loads(lines[0])

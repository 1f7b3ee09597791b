"""`editd bench serve`: one request of many prompts, timed by how many rows decode together."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_bench_serve_prints_a_line_per_setting_and_the_answers_agree(tmp_path):
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "editd", "bench", "serve", "--model", "builtin"),
            *("--prompts", "6", "--tokens", "4", "--rows", "1,6", "--rounds", "1", "--json"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HOME": str(tmp_path)},
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.strip()]
    assert [x["max_batch_rows"] for x in lines] == [1, 6]
    for x in lines:
        assert x["bench"] == "serve" and x["prompts"] == 6 and x["requests"] == 1
        assert x["p50_seconds"] > 0 and x["tokens_per_second"] > 0
        # Batched rows decode what each prompt alone decodes.
        assert x["answers_equal_first"] is True

"""Draw every method's lifelong-editing curve side by side: docs/lifelong/methods-N.png.

python scripts/plot_lifelong.py docs/lifelong 500
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PANELS = (
    ("es", "ES (sampled edits so far)"),
    ("ps", "PS"),
    ("ns_ratio", "NS / unedited NS"),
    ("served_es", "served ES (greedy)"),
    ("canary_ratio", "canary / unedited"),
    ("perplexity_ratio", "perplexity / unedited"),
)


def main(directory: str, edits: str) -> Path:
    root = Path(directory)
    curves = {
        path.name.removesuffix(f"-{edits}.jsonl"): [
            json.loads(line) for line in path.read_text().splitlines() if line.strip()
        ]
        for path in sorted(root.glob(f"*-{edits}.jsonl"))
    }
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, title) in zip(axes.flat, PANELS, strict=True):
        for method, points in curves.items():
            ax.plot(
                [p["edits"] for p in points], [p.get(key) for p in points], marker=".", label=method
            )
        ax.set_title(title)
        ax.set_xlabel("sequential edits (batches of 100)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M, CounterFact, {edits} sequential edits")
    fig.tight_layout()
    out = root / f"methods-{edits}.png"
    fig.savefig(out, dpi=100)
    return out


if __name__ == "__main__":
    print(main(*sys.argv[1:3]))

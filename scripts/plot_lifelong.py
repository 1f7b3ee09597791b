"""Every method's lifelong-editing curve side by side (docs/lifelong/methods-N.png), the
table of their final results (docs/lifelong/table-N.md), and the table of every curve's point
at N edits (docs/lifelong/points-N.md), so runs of different lengths compare at one count.

python scripts/plot_lifelong.py docs/lifelong 500 [RUN ...] [--prefix P]

Curves are every `*.jsonl` in the directory (or only the named runs), drawn up to N edits;
final results are the `*-N.json` files (only the named runs' when runs are named). `--prefix P`
writes P-methods-N.png and so on, beside the figures of all runs instead of over them.
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


def main(directory: str, edits: str, *only: str, prefix: str = "") -> Path:
    root = Path(directory)
    pre = f"{prefix}-" if prefix else ""
    curves = {
        path.stem: [
            p
            for p in (json.loads(line) for line in path.read_text().splitlines() if line.strip())
            if p["edits"] <= int(edits)
        ]
        for path in sorted(root.glob("*.jsonl"))
        if not only or path.stem in only
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
    out = root / f"{pre}methods-{edits}.png"
    fig.savefig(out, dpi=100)
    (root / f"{pre}table-{edits}.md").write_text(table(root, edits, only))
    (root / f"{pre}points-{edits}.md").write_text(points_table(curves, int(edits)))
    capacity(curves, root / f"{pre}capacity-{edits}.png")
    return out


WRECK = 2.0  # SmolLM2's editing.max_update_ratio


def capacity(curves: dict[str, list[dict]], out: Path) -> tuple[float, float] | None:
    """Canary ratio against norm growth over every curve point that recorded both, with the
    least-squares line canary = 1 − slope · norm (forced through the unedited model, 0 → 1).

    This is the capacity monitor's calibration: the norm growth the daemon exports after
    every version, read as the canary it predicts. Returns (slope, r²) and draws the plot.
    """
    pts = [
        (p["norm_ratio"], p["canary_ratio"], name)
        for name, points in curves.items()
        for p in points
        if p.get("norm_ratio") is not None
        and p.get("canary_ratio") is not None
        # A wreck the editor now refuses (editing.max_update_ratio) says nothing about wear.
        and p["norm_ratio"] <= WRECK
    ]
    if len(pts) < 2:
        return None
    xs = [x for x, _, _ in pts]
    ys = [y for _, y, _ in pts]
    slope = sum(x * (1 - y) for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
    mean = sum(ys) / len(ys)
    ss_res = sum((y - (1 - slope * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - mean) ** 2 for y in ys) or 1.0
    r2 = 1 - ss_res / ss_tot
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in sorted({n for _, _, n in pts}):
        mine = [(x, y) for x, y, n in pts if n == name]
        ax.plot(*zip(*mine, strict=True), marker="o", linestyle="", label=name)
    top = max(xs) * 1.1
    ax.plot([0, top], [1, 1 - slope * top], color="k", linewidth=1, label=f"1 − {slope:.2f}·x")
    ax.set_xlabel("norm growth ‖W − W0‖ / ‖W0‖ (worst edited layer)")
    ax.set_ylabel("canary / unedited")
    ax.set_title(f"capacity monitor: r² = {r2:.2f} over {len(pts)} points")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"capacity: canary ≈ 1 − {slope:.3f} × norm growth, r² {r2:.3f}, {len(pts)} points")
    return slope, r2


COLUMNS = (
    ("es", "ES"),
    ("ps", "PS"),
    ("ns", "NS"),
    ("ns_base", "NS unedited"),
    ("served_es", "served ES"),
    ("served_ps", "served PS"),
    ("canary_ratio", "canary ratio"),
    ("known_kept", "known kept"),
    ("perplexity_ratio", "ppl ratio"),
    ("facts_per_second", "facts/s"),
)


def table(root: Path, edits: str, only: tuple[str, ...] = ()) -> str:
    """The final results (over every edit) of each method's `editd bench edit --json`."""
    rows = [
        "| method | " + " | ".join(c for _, c in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for path in sorted(root.glob(f"*-{edits}.json")):
        text = path.read_text().strip()
        if not text or (only and path.stem not in only):
            continue
        result = json.loads(text)
        cells = [
            f"{result[k]:.3f}" if isinstance(result.get(k), float) else str(result.get(k))
            for k, _ in COLUMNS
        ]
        rows.append(f"| {path.name.removesuffix(f'-{edits}.json')} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


POINT_COLUMNS = (
    ("es", "ES"),
    ("ps", "PS"),
    ("ns_ratio", "NS / unedited"),
    ("served_es", "served ES"),
    ("canary_ratio", "canary ratio"),
    ("known_kept", "known kept"),
    ("perplexity_ratio", "ppl ratio"),
    ("norm_ratio", "norm growth"),
    ("facts_per_second", "facts/s"),
)


def points_table(curves: dict[str, list[dict]], at: int) -> str:
    """Each curve's point at `at` edits (ES/PS/NS/served ES on 100 spread edits so far)."""
    rows = [
        "| run | " + " | ".join(c for _, c in POINT_COLUMNS) + " |",
        "|---|" + "---:|" * len(POINT_COLUMNS),
    ]
    for name, points in curves.items():
        point = next((p for p in points if p["edits"] == at), None)
        if point is None:
            continue
        cells = [
            f"{point[k]:.3f}" if isinstance(point.get(k), float) else "–" for k, _ in POINT_COLUMNS
        ]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    args = sys.argv[1:]
    prefix = ""
    if "--prefix" in args:
        i = args.index("--prefix")
        prefix = args[i + 1]
        del args[i : i + 2]
    print(main(*args, prefix=prefix))

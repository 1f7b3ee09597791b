"""Render the Grafana dashboard's panels to one PNG from a live Prometheus.

Each panel's PromQL is run as a range query over the last `--minutes` and drawn as Grafana
would draw it (threshold series dashed). Used for the README's picture; no Grafana needed.

    python scripts/render_dashboard.py --prometheus http://127.0.0.1:9090 --out docs/dashboard.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy/grafana/dashboards/editd.json"


def render(prometheus: str, out: Path, minutes: float, step: float = 2.0) -> int:
    panels = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p.get("targets")]
    end = time.time()
    start = end - minutes * 60
    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3 * rows), squeeze=False)
    drawn = 0
    for ax, panel in zip(axes.flat, panels, strict=False):
        ax.set_title(panel["title"], fontsize=10)
        for target in panel["targets"]:
            expr = (
                target["expr"]
                .replace("$__rate_interval", "30s")
                .replace("$__range", f"{int(minutes * 60)}s")
            )
            r = httpx.get(
                f"{prometheus}/api/v1/query_range",
                params={"query": expr, "start": start, "end": end, "step": step},
            )
            r.raise_for_status()
            for series in r.json()["data"]["result"]:
                xs = [(float(t) - end) / 60 for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                labels = {k: v for k, v in series["metric"].items() if k != "__name__"}
                name = target.get("legendFormat") or ""
                for key, value in labels.items():
                    name = name.replace("{{" + key + "}}", value)
                style = "--" if "threshold" in expr else "-"
                ax.plot(xs, ys, style, label=name or ",".join(labels.values()) or expr[:30])
                drawn += 1
        ax.set_xlabel("minutes", fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.lines:
            ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("editd dashboard (panels rendered from Prometheus)", fontsize=13)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    return drawn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prometheus", required=True)
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    parser.add_argument("--minutes", type=float, default=15)
    args = parser.parse_args()
    print(render(args.prometheus, args.out, args.minutes), "series drawn")


if __name__ == "__main__":
    main()

"""`rerankd eval --plot`: quality against rerank latency, one point per reranker configuration.

Per row of the report (a first-stage mode, or `run`), a line through its configurations
(full model, each `--depths` depth, each keep ratio) ordered by their median Rerank latency
per query, each point labelled with its configuration; the row's first stage is a square at
zero rerank latency and a dashed line across, the reference reranking has to beat.

matplotlib is imported only when a plot is drawn (Agg, no display, no pyplot state), so
`rerankd.eval` imports without it; it comes with the `dev` extra.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rerankd.eval.report import metric_header

DEFAULT_METRIC = "ndcg@10"


def have_matplotlib() -> bool:
    """Whether `plot_quality_latency` can run (checked before a long evaluation starts)."""
    return importlib.util.find_spec("matplotlib") is not None


def _points(row: Mapping[str, Any], metric: str) -> list[tuple[float, float, str]]:
    """(rerank latency p50 in ms, metric, configuration name) per configuration, by latency."""
    configs = row.get("configs") or [
        {
            "name": "full",
            "metrics": row["reranked_metrics"],
            "latency_ms": row["latency_ms"]["rerank"],
        }
    ]
    pts = [
        (float(c["latency_ms"]["p50"]), float(c["metrics"][metric]), str(c["name"]))
        for c in configs
        if c.get("latency_ms")
    ]
    return sorted(pts)


def plot_quality_latency(
    report: Mapping[str, Any], path: str | Path, metric: str = DEFAULT_METRIC
) -> Path:
    """Draw `metric` against median rerank latency per configuration into the PNG `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if metric not in report["metrics"]:
        metric = report["metrics"][0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (mode, row) in enumerate(report["modes"].items()):
        color = f"C{i % 10}"
        first = float(row["first_stage_metrics"][metric])
        ax.axhline(first, color=color, linestyle="--", linewidth=1, alpha=0.6)
        ax.plot([0.0], [first], marker="s", color=color, linestyle="none", clip_on=False)
        ax.annotate(
            f"{mode} first stage",
            (0.0, first),
            textcoords="offset points",
            xytext=(6, -10),
            fontsize=7,
            color=color,
        )
        pts = _points(row, metric)
        if not pts:
            continue
        xs, ys, _ = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", color=color, label=f"{mode}: {row['first_stage']}")
        for x, y, name in pts:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ds, rr = report["dataset"], report["reranker"]
    ax.set_xlabel("rerank latency per query, p50 (ms)")
    ax.set_ylabel(metric_header(metric))
    ax.set_xlim(left=0.0)
    ax.set_title(
        f"{ds['name']} ({ds['queries']} queries, {report['candidates']} candidates): "
        f"reranker {rr['name']}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path

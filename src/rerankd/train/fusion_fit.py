"""`rerankd fit-fusion`: fit a model's fusion with the first stage on held-apart dev queries.

    rerankd eval --dataset ../shared/data/scifact --split train --dev-queries 60 --dev-seed 0 \\
        --modes hybrid --model MODEL --runs-dir runs/dev --no-fusion
    rerankd fit-fusion --scores runs/dev/hybrid.scores.jsonl \\
        --dataset ../shared/data/scifact --split train --model MODEL

The first command reranks the dev queries' first-stage candidates and keeps each query's
candidates (in first-stage order) with the model's raw scores; the second grid-searches
the fusion weight and agreement gate (`rerankd.engine.fusion.fit`) on them and writes
`MODEL/fusion.json`, which the sidecar uses for requests with `fusion=auto` (the default of
`hybrid_search`). Test qrels are refused: fusion fitted on test would report its own fit.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rerankd.engine.fusion import NEVER_GATE, FusionParams, fuse
from rerankd.eval.beir import load_dataset
from rerankd.eval.metrics import ndcg_at_k

FULL = "full"


#: the fusion grid: model weight 0..1 in steps of 0.05, and the agreement gates tried
WEIGHT_GRID = tuple(round(x * 0.05, 2) for x in range(21))
GATE_GRID = (NEVER_GATE, -0.2, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


@dataclass(frozen=True)
class DevQuery:
    """One held-apart query: candidate ids in first-stage order, their logits, judgments."""

    candidates: Sequence[str]
    model_scores: Sequence[float]
    judgments: Mapping[str, int]


def score_params(queries: Sequence[DevQuery], params: FusionParams) -> float:
    """Mean NDCG@10 of the fused rankings."""
    total = 0.0
    for q in queries:
        fused, _ = fuse(q.model_scores, params)
        order = np.argsort(-fused, kind="stable")
        total += ndcg_at_k([q.candidates[i] for i in order], q.judgments, 10)
    return total / max(1, len(queries))


def fit(
    queries: Sequence[DevQuery], *, tolerance: float = 0.002, describe: dict[str, Any] | None = None
) -> tuple[FusionParams, list[dict[str, float]]]:
    """Grid-search (weight, gate) for the best mean dev NDCG@10; returns it and the grid.

    Among settings within `tolerance` of the best, the most conservative wins (lowest
    weight, then highest gate): dev sets are small, and the cost of trusting the model
    too much shows up off-domain, where no dev set exists.
    """
    if not queries:
        raise ValueError("fusion needs at least one dev query with judgments")
    grid: list[dict[str, float]] = []
    for w in WEIGHT_GRID:
        for tau in GATE_GRID if w > 0 else (NEVER_GATE,):
            ndcg = score_params(queries, FusionParams(w, tau))
            grid.append({"weight": w, "gate": tau, "ndcg@10": ndcg})
    best = max(g["ndcg@10"] for g in grid)
    close = [g for g in grid if g["ndcg@10"] >= best - tolerance]
    pick = min(close, key=lambda g: (g["weight"], -g["gate"]))
    at = {(g["weight"], g["gate"]): g["ndcg@10"] for g in grid}
    fitted_on = {
        **(describe or {}),
        "queries": len(queries),
        "dev_ndcg@10": {
            "first_stage": at[(0.0, NEVER_GATE)],
            "model": at[(1.0, NEVER_GATE)],
            "fused": pick["ndcg@10"],
        },
        "tolerance": tolerance,
    }
    return FusionParams(pick["weight"], pick["gate"], fitted_on=fitted_on), grid


def read_dev_queries(
    scores: Path, qrels: dict[str, dict[str, int]], config: str = FULL
) -> list[DevQuery]:
    """Queries of an eval `MODE.scores.jsonl` with their judgments (unjudged ones dropped)."""
    out: list[DevQuery] = []
    for line in scores.read_text().splitlines():
        rec = json.loads(line)
        judged = qrels.get(str(rec["qid"]))
        if not judged or not rec["ids"]:
            continue
        if config not in rec["scores"]:
            raise ValueError(f"{scores}: no {config!r} scores (have {sorted(rec['scores'])})")
        out.append(DevQuery(rec["ids"], rec["scores"][config], judged))
    return out


def fit_from_files(
    scores: Path, dataset: Path, split: str, describe: dict | None = None
) -> tuple[FusionParams, list[dict[str, float]]]:
    if split == "test":
        raise ValueError(
            "fusion is never fitted on test qrels; rerank held-apart train queries "
            "(`rerankd eval --split train --dev-queries N`) and fit on those"
        )
    data = load_dataset(dataset, split)
    queries = read_dev_queries(scores, data.qrels)
    if not queries:
        raise ValueError(f"{scores} has no query judged in {dataset} split {split!r}")
    info = {"dataset": data.name, "split": split, "scores": scores.name, **(describe or {})}
    return fit(queries, describe=info)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="rerankd fit-fusion",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--scores", type=Path, required=True, help="an eval MODE.scores.jsonl")
    p.add_argument("--dataset", type=Path, required=True, help="the BEIR folder it came from")
    p.add_argument("--split", default="train", help="qrels split of the dev queries")
    p.add_argument("--model", type=Path, required=True, help="model folder to write into")
    p.add_argument("--first-stage", default="", help="first stage named in fusion.json")
    ns = p.parse_args(argv)
    try:
        params, _ = fit_from_files(
            ns.scores,
            ns.dataset,
            ns.split,
            {"first_stage": ns.first_stage} if ns.first_stage else None,
        )
    except (ValueError, OSError) as exc:
        print(f"rerankd fit-fusion: {exc}", file=sys.stderr)
        return 2
    path = params.save(ns.model)
    dev = params.fitted_on["dev_ndcg@10"]
    print(
        f"fusion weight {params.weight:g}, gate {params.gate:g} on {params.fitted_on['queries']} "
        f"dev queries: NDCG@10 first stage {dev['first_stage']:.4f}, model {dev['model']:.4f}, "
        f"fused {dev['fused']:.4f} -> {path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

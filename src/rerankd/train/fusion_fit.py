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


def per_query_ndcg(queries: Sequence[DevQuery], params: FusionParams) -> np.ndarray:
    """NDCG@10 of each query's fused ranking."""
    out = np.empty(len(queries), dtype=np.float64)
    for k, q in enumerate(queries):
        fused, _ = fuse(q.model_scores, params)
        order = np.argsort(-fused, kind="stable")
        out[k] = ndcg_at_k([q.candidates[i] for i in order], q.judgments, 10)
    return out


def fit(
    queries: Sequence[DevQuery],
    *,
    tolerance: float = 0.002,
    max_weight: float = 1.0,
    describe: dict[str, Any] | None = None,
) -> tuple[FusionParams, list[dict[str, float]]]:
    """Grid-search (weight, gate) on dev NDCG@10, then take the most conservative setting
    that the dev set cannot tell from the best; returns it and the grid.

    "Cannot tell" is the one-standard-error rule: a setting qualifies when its mean falls
    short of the best by no more than the standard error of the per-query differences
    (paired, over the dev queries), or by `tolerance`, whichever is larger. Among those the
    lowest weight wins, then the highest gate. Why: the dev queries come from the domain
    the model was trained on, so they overstate how far to trust it; the cost of trusting
    it too much shows up off-domain, where no dev set exists. With 60 dev queries the
    rule moved rerankd-minilm-l6 from weight 0.35 (the within-0.002 pick) to 0.25.

    `max_weight` bounds the grid: how far a caller trusts the model off-domain whatever the
    dev queries say (0 keeps the first-stage order always).
    """
    if not queries:
        raise ValueError("fusion needs at least one dev query with judgments")
    if not 0.0 <= max_weight <= 1.0:
        raise ValueError(f"max_weight must be in [0, 1], got {max_weight}")
    per: dict[tuple[float, float], np.ndarray] = {}
    for w in (w for w in WEIGHT_GRID if w <= max_weight):
        for tau in GATE_GRID if w > 0 else (NEVER_GATE,):
            per[(w, tau)] = per_query_ndcg(queries, FusionParams(w, tau))
    grid = [{"weight": w, "gate": t, "ndcg@10": float(v.mean())} for (w, t), v in per.items()]
    best_key = max(per, key=lambda k: per[k].mean())
    best = per[best_key]
    n = len(queries)

    def slack(v: np.ndarray) -> float:
        se = float((best - v).std(ddof=1)) / np.sqrt(n) if n > 1 else 0.0
        return max(tolerance, se)

    close = [k for k, v in per.items() if v.mean() >= best.mean() - slack(v)]
    pick = min(close, key=lambda k: (k[0], -k[1]))
    fitted_on = {
        **(describe or {}),
        "queries": n,
        "dev_ndcg@10": {
            "first_stage": float(per[(0.0, NEVER_GATE)].mean()),
            "model": float(per_query_ndcg(queries, FusionParams(1.0, NEVER_GATE)).mean()),
            "fused": float(per[pick].mean()),
            "best": float(best.mean()),
        },
        "rule": "one standard error",
        "tolerance": tolerance,
        **({"max_weight": max_weight} if max_weight < 1.0 else {}),
    }
    return FusionParams(pick[0], pick[1], fitted_on=fitted_on), grid


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
    scores: Path, dataset: Path, split: str, describe: dict | None = None, max_weight: float = 1.0
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
    return fit(queries, max_weight=max_weight, describe=info)


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
    p.add_argument(
        "--max-weight",
        type=float,
        default=1.0,
        help="the most weight the fusion may give the model, whatever the dev queries say "
        "(0 = always the first-stage order)",
    )
    ns = p.parse_args(argv)
    try:
        params, _ = fit_from_files(
            ns.scores,
            ns.dataset,
            ns.split,
            {"first_stage": ns.first_stage} if ns.first_stage else None,
            ns.max_weight,
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

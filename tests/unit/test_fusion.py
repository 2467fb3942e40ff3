"""Fusion of the model's scores with the first-stage order: the math, the fit, the files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from rerankd.engine.fusion import NEVER_GATE, FusionParams, agreement, fuse, rank_feature
from rerankd.train.fusion_fit import (
    DevQuery,
    fit,
    fit_from_files,
    per_query_ndcg,
    read_dev_queries,
)


def test_rank_feature_is_zscored_and_decreasing() -> None:
    f = rank_feature(10)
    assert abs(f.mean()) < 1e-9 and abs(f.std() - 1) < 1e-9
    assert all(np.diff(f) < 0)


def test_agreement_is_spearman_with_the_given_order() -> None:
    assert agreement(np.array([5.0, 4, 3, 2, 1])) == pytest.approx(1.0)
    assert agreement(np.array([1.0, 2, 3, 4, 5])) == pytest.approx(-1.0)
    assert -1 < agreement(np.array([2.0, 5, 1, 4, 3])) < 1


def test_weight_zero_keeps_the_first_stage_and_one_follows_the_model() -> None:
    scores = np.array([0.1, 3.0, -1.0, 2.0])
    kept, w0 = fuse(scores, FusionParams(0.0))
    assert w0 == 0 and list(np.argsort(-kept, kind="stable")) == [0, 1, 2, 3]
    model, w1 = fuse(scores, FusionParams(1.0))
    assert w1 == 1 and list(np.argsort(-model, kind="stable")) == [1, 3, 0, 2]


def test_the_gate_falls_back_when_the_model_disagrees() -> None:
    reversed_order = np.arange(10, dtype=float)  # the model ranks the first stage upside down
    fused, w = fuse(reversed_order, FusionParams(0.7, gate=0.0))
    assert w == 0.0
    assert list(np.argsort(-fused, kind="stable")) == list(range(10))
    agreeing = np.arange(10, 0, -1, dtype=float)
    _, w = fuse(agreeing, FusionParams(0.7, gate=0.0))
    assert w == 0.7


def _dev(model_quality: float, n: int = 40, seed: int = 0) -> list[DevQuery]:
    """Queries whose relevant document sits at first-stage rank 3..9; the model puts it
    first with probability `model_quality`, else last."""
    rng = random.Random(seed)
    out = []
    for q in range(n):
        ids = [f"q{q}d{i}" for i in range(20)]
        rel = rng.randrange(3, 10)
        scores = [rng.gauss(0, 1) - 0.1 * i for i in range(20)]
        scores[rel] = 5.0 if rng.random() < model_quality else -5.0
        out.append(DevQuery(ids, scores, {ids[rel]: 1}))
    return out


def test_fit_trusts_a_good_model_and_not_a_harmful_one() -> None:
    good, _ = fit(_dev(0.9))
    assert good.weight > 0
    dev = good.fitted_on["dev_ndcg@10"]
    assert dev["fused"] > dev["first_stage"]
    harmful, grid = fit(_dev(0.0))
    assert harmful.weight == 0.0 and harmful.gate == NEVER_GATE
    assert harmful.fitted_on["dev_ndcg@10"]["fused"] == pytest.approx(
        harmful.fitted_on["dev_ndcg@10"]["first_stage"]
    )
    assert {g["weight"] for g in grid} >= {0.0, 0.5, 1.0}


def test_max_weight_bounds_how_far_the_fit_trusts_the_model() -> None:
    queries = _dev(0.9)
    free, _ = fit(queries)
    capped, grid = fit(queries, max_weight=0.2)
    assert free.weight > 0.2 and 0 < capped.weight <= 0.2
    assert max(g["weight"] for g in grid) == 0.2 and capped.fitted_on["max_weight"] == 0.2
    never, _ = fit(queries, max_weight=0.0)
    assert never.weight == 0.0 and never.gate == NEVER_GATE
    # the model's own figure is still reported, though the grid never reaches weight 1
    assert never.fitted_on["dev_ndcg@10"]["model"] == free.fitted_on["dev_ndcg@10"]["model"]
    with pytest.raises(ValueError, match="max_weight must be in"):
        fit(queries, max_weight=1.5)


def test_fit_prefers_the_most_conservative_of_near_ties() -> None:
    queries = _dev(0.9)
    params, grid = fit(queries, tolerance=0.05)
    best = max(g["ndcg@10"] for g in grid)
    close = [g for g in grid if g["ndcg@10"] >= best - 0.05]
    # everything within the tolerance qualifies, so the pick is at most their lowest weight
    assert params.weight <= min(g["weight"] for g in close)


def test_fit_backs_off_within_one_standard_error() -> None:
    """On few, noisy dev queries the pick is the lowest weight the paired standard error
    cannot separate from the best; no setting with a lower weight qualifies."""
    queries = _dev(0.7, n=12, seed=0)
    params, grid = fit(queries, tolerance=0.0)
    per = {
        (g["weight"], g["gate"]): per_query_ndcg(queries, FusionParams(g["weight"], g["gate"]))
        for g in grid
    }
    best = max(per.values(), key=lambda v: v.mean())

    def qualifies(v: np.ndarray) -> bool:
        return v.mean() >= best.mean() - (best - v).std(ddof=1) / np.sqrt(len(v))

    assert qualifies(per[(params.weight, params.gate)])
    assert not any(qualifies(v) for (w, _), v in per.items() if w < params.weight)
    assert params.fitted_on["rule"] == "one standard error"
    assert params.fitted_on["dev_ndcg@10"]["best"] == pytest.approx(best.mean())
    # the pick is strictly more conservative than the best setting here
    best_weight = max(grid, key=lambda g: g["ndcg@10"])["weight"]
    assert params.weight < best_weight


def test_params_round_trip_and_refuse_nonsense(tmp_path: Path) -> None:
    p = FusionParams(0.35, 0.2, fitted_on={"queries": 3})
    p.save(tmp_path)
    assert FusionParams.load(tmp_path) == p
    assert FusionParams.load(tmp_path / "missing") is None
    with pytest.raises(ValueError, match="weight"):
        FusionParams(1.5)
    with pytest.raises(ValueError, match="gate"):
        FusionParams(0.5, gate=2.0)


def test_fit_from_eval_scores_refuses_test_qrels(tmp_path: Path) -> None:
    data = tmp_path / "ds"
    (data / "qrels").mkdir(parents=True)
    (data / "corpus.jsonl").write_text(
        "".join(
            json.dumps({"_id": f"d{i}", "title": "", "text": f"doc {i}"}) + "\n" for i in range(4)
        )
    )
    (data / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "x"}) + "\n")
    for split in ("train", "test"):
        (data / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td2\t1\n")
    scores = tmp_path / "hybrid.scores.jsonl"
    rec = {"qid": "q1", "ids": ["d0", "d1", "d2", "d3"], "scores": {"full": [0.0, 0.1, 3.0, -1]}}
    scores.write_text(json.dumps(rec) + "\n")
    queries = read_dev_queries(scores, {"q1": {"d2": 1}})
    assert len(queries) == 1 and queries[0].judgments == {"d2": 1}
    params, _ = fit_from_files(scores, data, "train")
    assert params.weight > 0  # the model puts the one relevant document first
    with pytest.raises(ValueError, match="never fitted on test"):
        fit_from_files(scores, data, "test")


def test_unknown_fusion_value_on_the_wire_is_invalid_argument() -> None:
    from rerankd.errors import InvalidInputError
    from rerankd.server.grpc_service import options_from_proto
    from rerankd.types import Fusion
    from rerankd.v1 import reranker_pb2 as pb

    assert options_from_proto(pb.RerankOptions()).fusion == Fusion.OFF
    assert options_from_proto(pb.RerankOptions(fusion=pb.FUSION_AUTO)).fusion == Fusion.AUTO
    with pytest.raises(InvalidInputError, match="unknown fusion value 7"):
        options_from_proto(pb.RerankOptions(fusion=7))

"""Metrics against hand-computed values, the BEIR/TREC readers, and published DL19 figures.

Every expected number below is worked out by hand in the comment beside it (log2(2) = 1,
log2(3) = 1.58496, log2(4) = 2), so a formula change that drifts from trec_eval fails here
rather than shifting every figure `rerankd eval` prints.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rerankd.eval.beir import (
    document_text,
    load_dataset,
    load_qrels,
    load_run,
    resolve_run,
    subset,
)
from rerankd.eval.metrics import (
    evaluate,
    mrr_at_k,
    ndcg_at_k,
    paired_difference,
    parse_metric,
    rank_by_score,
    recall_at_k,
    threshold_for,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
LOG2_3 = math.log2(3)

# -- NDCG -------------------------------------------------------------------------------------


def test_ndcg_binary_single_relevant_at_rank_2() -> None:
    # DCG = 1/log2(3); ideal = 1/log2(2) = 1
    assert ndcg_at_k(["a", "b", "c"], {"b": 1}, 10) == pytest.approx(1 / LOG2_3)


def test_ndcg_graded_gain_is_the_grade_and_ideal_uses_all_judged_docs() -> None:
    judgments = {"d1": 1, "d3": 3, "d4": 2, "d5": 0}
    # ranking d1, x (unjudged), d3: DCG@3 = 1/1 + 0 + 3/log2(4) = 2.5
    # ideal from all judged grades 3, 2, 1 (d4 never retrieved): 3 + 2/log2(3) + 1/2
    ideal = 3 + 2 / LOG2_3 + 0.5  # = 4.76186
    assert ndcg_at_k(["d1", "x", "d3"], judgments, 3) == pytest.approx(2.5 / ideal)
    assert ndcg_at_k(["d1", "x", "d3"], judgments, 3) == pytest.approx(0.525005, abs=1e-6)
    # @1: DCG = 1; ideal@1 = 3
    assert ndcg_at_k(["d1", "x", "d3"], judgments, 1) == pytest.approx(1 / 3)
    # the perfect order scores 1
    assert ndcg_at_k(["d3", "d4", "d1"], judgments, 3) == pytest.approx(1.0)


def test_ndcg_grade_zero_and_negative_grades_give_no_gain() -> None:
    judgments = {"a": 0, "b": -1, "c": 1}
    # c at rank 3: 1/log2(4) = 0.5; ideal = 1
    assert ndcg_at_k(["a", "b", "c"], judgments, 10) == pytest.approx(0.5)


def test_ndcg_counts_a_repeated_document_once() -> None:
    # without dedup "r, r" would earn 1 + 1/log2(3) > ideal; with it: r at 1, then y, z
    assert ndcg_at_k(["r", "r", "y"], {"r": 1}, 2) == pytest.approx(1.0)
    assert ndcg_at_k(["y", "r", "r"], {"r": 1}, 3) == pytest.approx(1 / LOG2_3)


def test_ndcg_without_relevant_documents_is_zero() -> None:
    assert ndcg_at_k(["a"], {"a": 0}, 10) == 0.0
    assert ndcg_at_k([], {"a": 2}, 10) == 0.0


def test_order_among_irrelevant_documents_does_not_matter() -> None:
    judgments = {"r1": 2, "r2": 1}
    ranked_a = ["x", "r1", "y", "z", "r2"]
    ranked_b = ["z", "r1", "x", "y", "r2"]  # irrelevant docs shuffled around the same slots
    for k in (1, 3, 5, 10):
        assert ndcg_at_k(ranked_a, judgments, k) == ndcg_at_k(ranked_b, judgments, k)
        assert mrr_at_k(ranked_a, judgments, k) == mrr_at_k(ranked_b, judgments, k)
        assert recall_at_k(ranked_a, judgments, k) == recall_at_k(ranked_b, judgments, k)


# -- MRR and Recall ---------------------------------------------------------------------------


def test_mrr_is_the_reciprocal_rank_of_the_first_relevant() -> None:
    judgments = {"a": 1, "b": 2}
    assert mrr_at_k(["x", "y", "a", "b"], judgments, 10) == pytest.approx(1 / 3)
    # threshold 2 (TREC DL): grade 1 is not relevant, b at rank 4 is
    assert mrr_at_k(["x", "y", "a", "b"], judgments, 10, 2) == pytest.approx(1 / 4)
    # beyond the cut: 0
    assert mrr_at_k(["x", "y", "a", "b"], judgments, 2) == 0.0
    assert mrr_at_k(["x", "y", "a", "b"], judgments, 3, 2) == 0.0


def test_recall_denominator_comes_from_the_judgments() -> None:
    judgments = {"a": 1, "b": 2, "c": 3, "d": 0}
    # threshold 1: relevant a, b, c; top 2 = a, x -> 1/3
    assert recall_at_k(["a", "x", "b", "c"], judgments, 2) == pytest.approx(1 / 3)
    assert recall_at_k(["a", "x", "b", "c"], judgments, 4) == pytest.approx(1.0)
    # threshold 2: relevant b, c; top 3 = a, x, b -> 1/2
    assert recall_at_k(["a", "x", "b", "c"], judgments, 3, 2) == pytest.approx(0.5)
    # a relevant document the ranking never holds still counts in the denominator
    assert recall_at_k(["a"], {"a": 1, "missing": 1}, 100) == pytest.approx(0.5)


# -- averaging conventions --------------------------------------------------------------------


def test_evaluate_averages_over_queries_with_a_relevant_judgment_only() -> None:
    qrels = {
        "q1": {"a": 1},
        "q2": {"b": 1, "c": 1},
        "q3": {"z": 0},  # judged, nothing relevant: skipped
        "q4": {"w": 1},  # judged but not in the run: not scored (pytrec_eval does the same)
    }
    run = {
        "q1": ["a", "x"],  # ndcg 1, mrr 1, recall 1
        "q2": [],  # empty ranking counts as 0
        "q3": ["z"],
        "q9": ["a"],  # no qrels: skipped
    }
    ev = evaluate(run, qrels, ["ndcg@10", "mrr@10", "recall@100"])
    assert ev.num_queries == 2
    assert sorted(ev.skipped) == ["q3", "q9"]
    assert ev.means == pytest.approx({"ndcg@10": 0.5, "mrr@10": 0.5, "recall@100": 0.5})
    assert ev.per_query["q2"] == {"ndcg@10": 0.0, "mrr@10": 0.0, "recall@100": 0.0}


def test_evaluate_threshold_skips_queries_with_only_low_grades() -> None:
    qrels = {"q1": {"a": 1}, "q2": {"b": 2, "c": 1}}
    run = {"q1": ["a"], "q2": ["c", "b"]}
    ev = evaluate(run, qrels, ["ndcg@10", "mrr@10"], relevance_threshold=2)
    assert ev.skipped == ["q1"] and ev.num_queries == 1
    # q2: DCG = 1/1 + 2/log2(3); ideal = 2/1 + 1/log2(3); MRR = 1/2 (b at 2)
    assert ev.means["ndcg@10"] == pytest.approx((1 + 2 / LOG2_3) / (2 + 1 / LOG2_3))
    assert ev.means["mrr@10"] == pytest.approx(0.5)


def test_evaluate_with_no_scorable_query_reports_zero_queries() -> None:
    ev = evaluate({"q": ["a"]}, {}, ["ndcg@10"])
    assert ev.num_queries == 0 and ev.means == {"ndcg@10": 0.0}


def test_metric_names_and_thresholds() -> None:
    assert parse_metric("NDCG@10") == ("ndcg", 10)
    assert parse_metric("recall@100") == ("recall", 100)
    for bad in ("map@10", "ndcg", "ndcg@0", "mrr@x"):
        with pytest.raises(ValueError):
            parse_metric(bad)
    with pytest.raises(ValueError):
        evaluate({}, {}, ["p@10"])
    assert threshold_for("trec-dl-2019") == 2
    assert threshold_for("TREC-DL-2020") == 2
    assert threshold_for("scifact") == 1


def test_paired_difference_over_shared_queries_with_its_standard_error() -> None:
    base = {"q1": {"m": 0.5}, "q2": {"m": 0.2}, "q3": {"m": 0.9}}
    other = {"q1": {"m": 0.7}, "q2": {"m": 0.2}, "q3": {"m": 0.6}, "q4": {"m": 1.0}}
    d = paired_difference(base, other, "m")
    assert d is not None and d["queries"] == 3  # q4 has no first-stage figure: left out
    diffs = [0.2, 0.0, -0.3]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2)
    assert d["mean"] == pytest.approx(mean) and d["se"] == pytest.approx(sd / math.sqrt(3))
    assert paired_difference(base, {"x": {"m": 1.0}}, "m") is None
    one = paired_difference({"q": {"m": 0.25}}, {"q": {"m": 0.75}}, "m")
    assert one == {"mean": 0.5, "se": 0.0, "queries": 1}


def test_rank_by_score_breaks_ties_like_trec_eval() -> None:
    # score descending, then document id descending; a repeated id keeps its best score
    scored = [("a", 1.0), ("b", 1.0), ("c", 2.0), ("d", 0.5), ("a", 3.0)]
    assert rank_by_score(scored) == ["a", "c", "b", "d"]
    assert rank_by_score([("10", 1.0), ("9", 1.0)]) == ["9", "10"]  # ids compare as strings


# -- readers ----------------------------------------------------------------------------------


def _write_dataset(root: Path) -> Path:
    (root / "qrels").mkdir(parents=True)
    corpus = [
        {"_id": "d1", "title": "Title one", "text": "text one"},
        {"_id": "d2", "title": "", "text": "text two"},
        {"_id": "d3", "text": "text three"},
        {"_id": "d4", "title": "  ", "text": "text four"},
        {"_id": "d5", "title": "T5", "text": "text five"},
    ]
    (root / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in corpus) + "\n")
    queries = [{"_id": q, "text": f"query {q}", "metadata": {}} for q in ("q1", "q2", "q3", "q4")]
    (root / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries) + "\n")
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq2\td4\t1\nq2\td5\t0\nq1\td2\t2\nq3\td1\t0\n"
    )
    return root


def test_document_text_joins_title_and_text_like_beir() -> None:
    assert document_text("A title", "the text") == "A title the text"
    assert document_text("", "the text") == "the text"
    assert document_text(None, "the text") == "the text"


def test_load_dataset_reads_the_beir_layout(tmp_path: Path) -> None:
    ds = load_dataset(_write_dataset(tmp_path / "mini"))
    assert ds.name == "mini" and ds.split == "test"
    assert ds.corpus == {
        "d1": "Title one text one",
        "d2": "text two",
        "d3": "text three",
        "d4": "text four",
        "d5": "T5 text five",
    }
    assert ds.queries["q1"] == "query q1"
    assert ds.qrels == {"q2": {"d4": 1, "d5": 0}, "q1": {"d2": 2}, "q3": {"d1": 0}}
    # queries.jsonl order; q3 has only a grade-0 judgment, q4 none
    assert ds.evaluable_queries() == ["q1", "q2"]
    assert ds.evaluable_queries(2) == ["q1"]
    with pytest.raises(FileNotFoundError, match=r"qrels/dev\.tsv"):
        load_dataset(tmp_path / "mini", split="dev")


def test_load_qrels_reads_trec_four_columns(tmp_path: Path) -> None:
    path = tmp_path / "qrels.txt"
    path.write_text("1 0 d1 3\n1 0 d2 0\n2 Q0 d9 1\n")
    assert load_qrels(path) == {"1": {"d1": 3, "d2": 0}, "2": {"d9": 1}}
    path.write_text("q\td\tscore\nq1\td1\tx\n")
    with pytest.raises(ValueError, match="not a number"):
        load_qrels(path)


def test_load_run_orders_by_score_not_by_the_rank_column(tmp_path: Path) -> None:
    path = tmp_path / "r.trec"
    path.write_text("q1 Q0 a 1 1.5 tag\nq1 Q0 b 2 2.5 tag\nq1 Q0 c 3 2.5 tag\nq2 Q0 z 1 0.1 tag\n")
    assert load_run(path) == {"q1": [("c", 2.5), ("b", 2.5), ("a", 1.5)], "q2": [("z", 0.1)]}


def test_resolve_run_by_path_or_shipped_name(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    shipped = tmp_path / "runs" / "bm25.top100.trec"
    shipped.write_text("q Q0 d 1 1.0 bm25\n")
    assert resolve_run(tmp_path, "bm25.top100") == shipped
    assert resolve_run(tmp_path, "bm25.top100.trec") == shipped
    assert resolve_run(tmp_path, shipped) == shipped
    with pytest.raises(FileNotFoundError, match=r"bm25\.top100"):
        resolve_run(tmp_path, "nope")


def test_subset_keeps_judged_docs_then_fills_in_corpus_order(tmp_path: Path) -> None:
    ds = load_dataset(_write_dataset(tmp_path / "mini"))
    # the first evaluable query is q1 (judged d2); room for two more documents: d1, d3
    one = subset(ds, max_queries=1, max_docs=3)
    assert list(one.queries) == ["q1"] and one.qrels == {"q1": {"d2": 2}}
    assert list(one.corpus) == ["d1", "d2", "d3"]  # corpus order is kept
    both = subset(ds, max_docs=2)
    assert list(both.queries) == ["q1", "q2"]
    # judged d2, d4, d5 (grade 0 is judged too) exceed 2: all kept, nothing added
    assert list(both.corpus) == ["d2", "d4", "d5"]
    assert subset(ds).corpus == ds.corpus
    with pytest.raises(ValueError):
        subset(ds, max_docs=0)


# -- published figures ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("run", "ndcg10"),
    [("bm25.top100", 0.5058), ("splade-pp-ed.top100", 0.7308)],
)
def test_dl19_runs_match_the_published_ndcg(run: str, ndcg10: float) -> None:
    """Pyserini's published DL19 passage NDCG@10 for these runs, via trec_eval's rules."""
    root = DATA / "trec-dl-2019"
    if not (root / "runs" / f"{run}.trec").exists():
        pytest.skip(f"shared data set trec-dl-2019 not found at {root}")
    qrels = load_qrels(root / "qrels" / "test.tsv")
    ranked = {
        q: [d for d, _ in pairs] for q, pairs in load_run(root / "runs" / f"{run}.trec").items()
    }
    ev = evaluate(ranked, qrels, ["ndcg@10"], relevance_threshold=threshold_for(root.name))
    assert ev.num_queries == 43 and not ev.skipped
    assert ev.means["ndcg@10"] == pytest.approx(ndcg10, abs=5e-5)

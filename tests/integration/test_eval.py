"""`rerankd eval` end to end on a SciFact slice: one real sidecar, embedded Qdrant and Milvus.

The runner is called in-process (its `main`, as the CLI does) against a sidecar this module
spawns once, for each DB; one subprocess run of the installed command reranks a TREC DL run.
The slice is small so the module stays within about a minute and a half on a busy 2-core
machine: 8 judged queries, 48 documents (their judged abstracts plus the first others in
corpus order), 20 candidates, the 2-layer SPLADE-tiny backbone as reranker at 128 tokens.

What could fail: every mode and metric must be reported with values in [0, 1], the sparse
row must name the first stage each DB really runs (SPLADE in Qdrant, BM25 in Milvus), and
every first stage must retrieve far better than a random ranking of the slice (whose
expected NDCG@10 is computed exactly): a broken embedding, index or id mapping lands near
it. Reranked figures are only range-checked: the bundled reranker's head is untrained.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rerankd.client import ModelInfo
from rerankd.eval.beir import BeirDataset, load_dataset, load_run, subset
from rerankd.eval.metrics import evaluate
from rerankd.eval.runner import MANIFEST, index_manifest, main, parse_args
from rerankd.server.process import spawn_sidecar

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
ARGS = [
    "--model",
    "bundled:splade-tiny",
    "--backend",
    "torch",
    "--max-length",
    "128",
    "--log-level",
    "WARNING",
]
N_QUERIES, N_DOCS, CANDIDATES = 8, 48, 20
MODES = {"dense", "sparse", "hybrid"}
METRICS = {"ndcg@10", "mrr@10", "recall@100"}

pytestmark = pytest.mark.slow


def _dataset(name: str) -> Path:
    path = DATA / name
    if not (path / "corpus.jsonl").exists():
        pytest.skip(f"shared data set {name!r} not found at {path}")
    return path


@pytest.fixture(scope="module")
def scifact() -> Path:
    return _dataset("scifact")


@pytest.fixture(scope="module")
def sidecar(scifact: Path):
    proc = spawn_sidecar(ARGS)
    yield proc
    proc.stop()


@pytest.fixture(scope="module", params=["qdrant", "milvus"])
def report(
    request: pytest.FixtureRequest, sidecar, scifact: Path, tmp_path_factory
) -> tuple[str, dict[str, Any], str, list[str]]:
    """(db, the JSON report, the table printed to stdout, the argv), one runner call per DB."""
    db = request.param
    folder = tmp_path_factory.mktemp(f"eval-{db}")
    argv = [
        "--dataset",
        str(scifact),
        "--db",
        db,
        "--address",
        sidecar.address,
        "--max-queries",
        str(N_QUERIES),
        "--max-docs",
        str(N_DOCS),
        "--candidates",
        str(CANDIDATES),
        "--max-length",
        "128",
        "--index-dir",
        str(folder / "index"),
        "--no-progress",
    ]
    table, rep = _run_main([*argv, "--json", str(folder / "report.json")])
    return db, rep, table, argv


def _run_main(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """The runner in-process, as the CLI calls it: (stdout, the JSON it wrote)."""
    out = Path(argv[argv.index("--json") + 1])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    assert code == 0
    return buf.getvalue(), json.loads(out.read_text())


def test_report_has_every_mode_and_metric_in_range(report) -> None:
    db, rep, _, _ = report
    assert rep["db"] == db and rep["candidates"] == CANDIDATES and rep["complete"] is True
    assert "index_reused" not in rep and rep["index_seconds"] > 0
    assert rep["dataset"]["queries"] == N_QUERIES and rep["dataset"]["docs"] == N_DOCS
    assert rep["dataset"]["relevance_threshold"] == 1
    assert rep["reranker"]["source"] == "bundled:splade-tiny"
    assert rep["reranker"]["untrained_head"] is True
    assert rep["long_docs"] == "max"  # no flag: the model's own default, as the sidecar said
    assert rep["sidecar"]["spawned"] is False  # --address: the module's own sidecar
    assert set(rep["modes"]) == MODES
    for mode, row in rep["modes"].items():
        assert row["queries"] == N_QUERIES, mode
        for key in ("first_stage_metrics", "reranked_metrics"):
            assert set(row[key]) == METRICS, (mode, key)
            assert all(0.0 <= v <= 1.0 for v in row[key].values()), (mode, key, row[key])
        for stage in ("first_stage", "rerank"):
            lat = row["latency_ms"][stage]
            assert lat["mean"] > 0 and lat["p50"] > 0, (mode, stage, lat)
        # 20 candidates < 100: reranking only reorders them, so Recall@100 cannot change
        assert row["per_query"]["first_stage"].keys() == row["per_query"]["reranked"].keys()
        for qid, first in row["per_query"]["first_stage"].items():
            assert row["per_query"]["reranked"][qid]["recall@100"] == first["recall@100"]


def _random_ndcg10(data: BeirDataset) -> float:
    """Expected NDCG@10 of a uniformly random ranking of the whole slice, averaged over its
    queries: each document lands at each rank with probability 1/N."""
    n = len(data.corpus)
    discount = sum(1 / math.log2(r + 1) for r in range(1, min(10, n) + 1)) / n
    total = 0.0
    for judgments in data.qrels.values():
        gains = sorted((g for g in judgments.values() if g > 0), reverse=True)
        ideal = sum(g / math.log2(r + 1) for r, g in enumerate(gains[:10], start=1))
        total += sum(gains) * discount / ideal
    return total / len(data.qrels)


def test_first_stage_beats_a_random_ranking(report, scifact: Path) -> None:
    """Every first stage must be far above a random ranking of the slice: a broken
    embedding, index or id mapping lands near it (the reranked rows, untrained, do)."""
    db, rep, _, _ = report
    data = subset(load_dataset(scifact), max_queries=N_QUERIES, max_docs=N_DOCS)
    baseline = _random_ndcg10(data)
    assert 0.05 < baseline < 0.3
    dense = rep["modes"]["dense"]["first_stage_metrics"]
    assert dense["ndcg@10"] > max(0.5, baseline + 0.3), (db, dense, baseline)
    for mode in ("sparse", "hybrid"):
        got = rep["modes"][mode]["first_stage_metrics"]["ndcg@10"]
        assert got > max(0.4, baseline + 0.2), (db, mode, got, baseline)


def test_table_names_the_first_stage_of_each_row(report) -> None:
    db, rep, table, _ = report
    lines = table.splitlines()
    assert "NDCG@10" in table and "MRR@10" in table and "R@100" in table
    for mode in MODES:
        row = next(line for line in lines if line.startswith(mode))
        assert rep["modes"][mode]["first_stage"] in row
        assert f"{rep['modes'][mode]['first_stage_metrics']['ndcg@10']:.4f}" in row
    sparse = rep["modes"]["sparse"]["first_stage"]
    assert ("SPLADE" in sparse) if db == "qdrant" else ("BM25" in sparse), sparse
    assert db in sparse
    assert sum(line.strip().startswith("reranked ") for line in lines) == len(MODES)
    assert "untrained" in table  # the bad reranked figures are explained, not hidden


def test_index_dir_is_reused_when_it_holds_the_same_corpus(
    report, scifact: Path, tmp_path: Path
) -> None:
    """A second run on the same --index-dir skips indexing and finds the same candidates;
    another corpus or encoder does not match the index's manifest."""
    db, rep, _, argv = report
    _, again = _run_main([*argv, "--modes", "dense", "--json", str(tmp_path / "again.json")])
    assert again["index_reused"] and list(again["modes"]) == ["dense"]
    first = rep["modes"]["dense"]["per_query"]["first_stage"]
    assert again["modes"]["dense"]["per_query"]["first_stage"] == first

    folder = Path(argv[argv.index("--index-dir") + 1])
    stored = json.loads((folder / MANIFEST).read_text())
    assert stored["db"] == db and stored["docs"] == N_DOCS
    assert (stored["sparse_encoder"] is not None) == (db == "qdrant")
    data = subset(load_dataset(scifact), max_queries=N_QUERIES, max_docs=N_DOCS)
    smaller = subset(data, max_docs=N_DOCS - 1)
    assert len(smaller.corpus) == N_DOCS - 1
    same = index_manifest(data, db, None, None, False)
    assert same["corpus_sha256"] == stored["corpus_sha256"]
    assert index_manifest(smaller, db, None, None, False)["corpus_sha256"] != same["corpus_sha256"]
    other = ModelInfo(
        name="other",
        kind="dense",
        source="/models/other",
        architecture="bert",
        num_layers=1,
        hidden_size=8,
        num_heads=1,
        max_length=32,
        default_max_length=32,
        backend="torch",
        precision="fp32",
        device="cpu",
        is_default=True,
        dimension=8,
    )
    assert index_manifest(data, db, other, other, True)["dense_encoder"] != stored["dense_encoder"]


def test_cli_reranks_a_trec_run(sidecar, tmp_path: Path) -> None:
    """The installed command, on DL19's BM25 run: first-stage figures are the run's own."""
    root = _dataset("trec-dl-2019")
    out = tmp_path / "dl19.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rerankd.cli",
            "eval",
            "--dataset",
            str(root),
            "--run",
            "bm25.top100",
            "--address",
            sidecar.address,
            "--max-queries",
            "3",
            "--candidates",
            "10",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(out.read_text())
    assert rep["dataset"]["relevance_threshold"] == 2  # trec-dl: binary metrics at grade >= 2
    assert list(rep["modes"]) == ["run"]
    row = rep["modes"]["run"]
    assert "bm25.top100" in row["first_stage"] and row["queries"] == 3
    assert row["candidates_without_text"] == 0
    # first-stage figures are exactly the run's top 10 scored independently here
    data = subset(load_dataset(root), max_queries=3, relevance_threshold=2)
    run = load_run(root / "runs" / "bm25.top100.trec")
    ref = evaluate(
        {q: [d for d, _ in run[q][:10]] for q in data.queries},
        data.qrels,
        ["ndcg@10", "mrr@10", "recall@100"],
        relevance_threshold=2,
    )
    assert row["first_stage_metrics"] == pytest.approx(ref.means)
    assert row["latency_ms"]["first_stage"] is None and row["latency_ms"]["rerank"]["p50"] > 0
    assert "run" in proc.stdout and "NDCG@10" in proc.stdout
    assert "{" not in proc.stdout  # the table only; progress bars go to stderr


def test_run_excludes_db_flags(scifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--dataset", str(scifact), "--run", "x.trec", "--db", "qdrant"])
    assert "--run replaces it" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--dataset", str(scifact), "--modes", "dense,bm25"])
    opts = parse_args(["--dataset", str(scifact), "--modes", "sparse, dense"])
    assert opts.db == "qdrant" and list(opts.modes) == ["sparse", "dense"]


# -- reranker configurations: --depths, --keep-ratios, --runs-dir, --plot ----------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_configs(rep: dict[str, Any], key: str, names: list[str], queries: int) -> None:
    """Every configuration reported with metrics in range, latencies and a Spearman
    correlation in [-1, 1] for all but the full model; the old keys are the full model's."""
    assert [c["name"] for c in rep["configs"]] == names
    row = rep["modes"][key]
    assert [c["name"] for c in row["configs"]] == names
    for c in row["configs"]:
        assert set(c["metrics"]) == METRICS and set(c["per_query"]) == set(
            row["per_query"]["first_stage"]
        )
        assert all(0.0 <= v <= 1.0 for v in c["metrics"].values()), c
        assert 0 < c["latency_ms"]["p50"] <= c["latency_ms"]["p99"], c
        if c["name"] == "full":
            assert c["spearman_vs_full"] is None and c["depth"] == 2
            assert row["reranked_metrics"] == c["metrics"]
        else:
            assert c["spearman_queries"] == queries
            assert -1.0 <= c["spearman_vs_full"] <= 1.0


def _check_run_files(folder: Path, row: dict[str, Any], names: list[str]) -> None:
    """A TREC file per ranking and a JSONL line per query, each with every query reported,
    and in the JSONL one finite raw score per candidate and configuration."""
    files = row["run_files"]
    assert set(files) == {"first_stage", "scores", *names}
    queries = set(row["per_query"]["first_stage"])
    for name in ["first_stage", *names]:
        assert set(load_run(folder / files[name])) == queries, name
    lines = [json.loads(x) for x in (folder / files["scores"]).read_text().splitlines()]
    assert {x["qid"] for x in lines} == queries
    for x in lines:
        assert list(x["scores"]) == names
        assert len(x["ids"]) == len(x["first_stage_scores"]) > 0
        for scores in x["scores"].values():
            assert len(scores) == len(x["ids"]) and all(math.isfinite(s) for s in scores)


def test_depths_on_a_trec_run(sidecar, tmp_path: Path) -> None:
    """--depths 1 on the 2-layer SPLADE-tiny: a d1 line beside the full model's, both
    scored on the same run candidates; run files and plot written."""
    root = _dataset("trec-dl-2019")
    out, plot, runs = tmp_path / "dl19.json", tmp_path / "dl19.png", tmp_path / "runs"
    argv = ["--dataset", str(root), "--run", "bm25.top100", "--address", sidecar.address]
    argv += ["--max-queries", "3", "--candidates", "10", "--max-length", "128", "--depths", "1"]
    argv += ["--runs-dir", str(runs), "--plot", str(plot), "--no-progress"]
    table, rep = _run_main([*argv, "--json", str(out)])
    names = ["d1", "full"]
    _check_configs(rep, "run", names, queries=3)
    row = rep["modes"]["run"]
    assert row["configs"][0]["depth"] == 1 and row["configs"][0]["keep_ratio"] == 1.0
    # depth 1 scores differ from the full model's (one layer fewer), not only rescaled
    lines = [json.loads(x) for x in (runs / "run.scores.jsonl").read_text().splitlines()]
    assert any(x["scores"]["d1"] != x["scores"]["full"] for x in lines)
    # the run files rescore exactly to the report's figures (first stage and each depth)
    data = subset(load_dataset(root), max_queries=3, relevance_threshold=2)
    for name, metrics in [
        ("first_stage", row["first_stage_metrics"]),
        *((c["name"], c["metrics"]) for c in row["configs"]),
    ]:
        ranked = load_run(runs / row["run_files"][name])
        ev = evaluate(
            {q: [d for d, _ in docs] for q, docs in ranked.items()},
            data.qrels,
            list(METRICS),
            relevance_threshold=2,
        )
        assert ev.means == pytest.approx(metrics), name
    _check_run_files(runs, row, names)
    assert plot.read_bytes()[:8] == PNG_MAGIC and rep["plot"] == str(plot)
    assert "reranked d1" in table and "reranked full" in table and "rho" in table


def test_reference_runs_compare_each_configuration_with_another_models_scores(
    sidecar, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--reference-runs: against the same model's earlier run, the full model's Spearman is
    exactly 1 and depth 1's equals its Spearman with the full model of this run; a
    folder without the row's scores file is refused before any reranking."""
    root = _dataset("trec-dl-2019")
    argv = ["--dataset", str(root), "--run", "bm25.top100", "--address", sidecar.address]
    argv += ["--max-queries", "3", "--candidates", "10", "--max-length", "128", "--depths", "1"]
    argv += ["--no-progress"]
    ref = tmp_path / "ref"
    _run_main([*argv, "--runs-dir", str(ref), "--json", str(tmp_path / "a.json")])
    table, rep = _run_main(
        [*argv, "--reference-runs", str(ref), "--json", str(tmp_path / "b.json")]
    )
    d1, full = rep["modes"]["run"]["configs"]
    assert full["spearman_vs_reference"] == pytest.approx(1.0)
    assert d1["spearman_vs_reference"] == pytest.approx(d1["spearman_vs_full"])
    assert d1["spearman_reference_queries"] == full["spearman_reference_queries"] == 3
    assert rep["reference_runs"] == str(ref) and "rho ref" in table
    assert main([*argv, "--reference-runs", str(tmp_path), "--json", str(tmp_path / "c")]) == 2
    assert "has no run.scores.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_depths_and_keep_ratio_on_qdrant(sidecar, scifact: Path, tmp_path: Path) -> None:
    """The DB path: the first stage once per query, then d1, full and full with pruning
    (keep ratio 0.5 from layer 2; depth 1 has nothing to prune, so it is skipped)."""
    argv = ["--dataset", str(scifact), "--db", "qdrant", "--modes", "dense"]
    argv += ["--address", sidecar.address, "--max-queries", "5", "--max-docs", "30"]
    argv += ["--candidates", "10", "--max-length", "128", "--no-progress"]
    argv += ["--depths", "1,2", "--keep-ratios", "1.0,0.5", "--runs-dir", str(tmp_path / "runs")]
    _, rep = _run_main([*argv, "--json", str(tmp_path / "r.json")])
    names = ["d1", "full", "full-k0.5"]
    _check_configs(rep, "dense", names, queries=5)
    assert any("keep ratio 0.5 skipped" in n for n in rep["notes"])
    row = rep["modes"]["dense"]
    assert row["latency_ms"]["first_stage"]["p50"] > 0
    assert row["configs"][2]["keep_ratio"] == 0.5
    _check_run_files(tmp_path / "runs", row, names)
    first = (tmp_path / "runs" / "dense.first_stage.trec").read_text().splitlines()
    assert len(first) == 5 * 10


def test_long_docs_truncate_scores_the_first_window_only(
    sidecar, scifact: Path, tmp_path: Path
) -> None:
    """--long-docs truncate reaches the sidecar: with 64-token windows (SciFact abstracts
    span several), every score equals a direct truncate call's, and some differ from the
    default (max over windows) on the same candidates."""
    from rerankd.client import RerankClient

    base = ["--dataset", str(scifact), "--db", "qdrant", "--modes", "dense", "--no-progress"]
    base += ["--address", sidecar.address, "--max-queries", "3", "--max-docs", "30"]
    base += ["--candidates", "8", "--max-length", "64", "--index-dir", str(tmp_path / "index")]
    scores: dict[str, list[dict[str, Any]]] = {}
    for how in ("max", "truncate"):
        runs = tmp_path / how
        table, rep = _run_main(
            [*base, "--long-docs", how, "--runs-dir", str(runs), "--json", str(runs / "r.json")]
        )
        assert rep["long_docs"] == how and f"long_docs {how}" in table
        lines = (runs / "dense.scores.jsonl").read_text().splitlines()
        scores[how] = [json.loads(x) for x in lines]
    data = subset(load_dataset(scifact), max_queries=3, max_docs=30)
    with RerankClient(sidecar.address) as client:
        for record in scores["truncate"]:
            docs = [data.corpus[d] for d in record["ids"]]
            direct = client.rerank(
                data.queries[record["qid"]], docs, max_length=64, long_docs="truncate"
            )
            by_index = {r.index: r.score for r in direct.results}
            want = [by_index[i] for i in range(len(docs))]
            assert record["scores"]["full"] == pytest.approx(want)
    assert [r["ids"] for r in scores["max"]] == [r["ids"] for r in scores["truncate"]]
    pairs = zip(scores["max"], scores["truncate"], strict=True)
    assert any(a["scores"]["full"] != b["scores"]["full"] for a, b in pairs)

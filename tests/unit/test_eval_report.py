"""`rerankd eval`'s configurations, table, run files and plot, without a sidecar.

The runner's `main` runs end to end against a fake client on a six-document data set
written here: its scores are made so that the full model ranks every query perfectly and
depth 1 exactly backwards, so every figure the report holds is known in advance (NDCG@10
1.0 against the run's, Spearman -1 for depth 1, +1 for a keep ratio that changes nothing).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rerankd.client import ModelInfo
from rerankd.eval import runner
from rerankd.eval.beir import load_run
from rerankd.eval.metrics import evaluate, spearman
from rerankd.eval.plot import plot_quality_latency
from rerankd.eval.report import format_table, trec_lines, write_run_files
from rerankd.eval.runner import (
    EvalError,
    RerankConfig,
    _latency,
    main,
    parse_args,
    plan_configs,
)
from rerankd.types import RerankResponse, RerankResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# -- Spearman ----------------------------------------------------------------------------------


def test_spearman_of_same_and_reversed_orders() -> None:
    assert spearman([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]) == pytest.approx(1.0)
    assert spearman([1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    # only ranks count, not the values
    assert spearman([0.1, 5.0, 7.0], [-3.0, 100.0, 100.5]) == pytest.approx(1.0)


def test_spearman_averages_tied_ranks() -> None:
    # ranks a = (1, 2.5, 2.5, 4), b = (1, 2, 3, 4): Pearson of the ranks
    a, b = [1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]
    ra, rb = [1, 2.5, 2.5, 4], [1, 2, 3, 4]
    ma, mb = sum(ra) / 4, sum(rb) / 4
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var_a = sum((x - ma) ** 2 for x in ra)
    var_b = sum((y - mb) ** 2 for y in rb)
    assert spearman(a, b) == pytest.approx(cov / math.sqrt(var_a * var_b))
    assert spearman(a, b) == pytest.approx(0.9486833)


def test_spearman_is_undefined_without_two_distinct_scores() -> None:
    assert spearman([], []) is None
    assert spearman([1.0], [2.0]) is None
    assert spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None
    with pytest.raises(ValueError):
        spearman([1.0, 2.0], [1.0])


# -- configurations ----------------------------------------------------------------------------


def test_plan_configs_adds_the_full_model_and_orders_by_depth() -> None:
    configs, notes = plan_configs([4, 2, 6, 2], [], num_layers=6)
    assert [c.name for c in configs] == ["d2", "d4", "full"]  # depth 6 of 6 is the full model
    assert [c.options() for c in configs] == [{"depth": 2}, {"depth": 4}, {}]
    assert [c.is_reference for c in configs] == [False, False, True]
    assert notes == []
    assert [c.name for c in plan_configs([], [], num_layers=6)[0]] == ["full"]
    assert [c.name for c in plan_configs([6], [1.0], num_layers=6)[0]] == ["full"]


def test_plan_configs_crosses_depths_with_keep_ratios() -> None:
    configs, notes = plan_configs([1], [1.0, 0.5, 0.25], num_layers=2)
    # depth 1 cannot prune (layer 1 reads every token): its pruned configurations are dropped
    assert [c.name for c in configs] == ["d1", "full", "full-k0.5", "full-k0.25"]
    assert configs[2].options() == {"keep_ratio": 0.5}
    assert len(notes) == 2 and all("depth 1" in n for n in notes)
    assert RerankConfig(3, 0.5).options() == {"depth": 3, "keep_ratio": 0.5}


def test_plan_configs_rejects_what_the_model_cannot_do() -> None:
    with pytest.raises(EvalError, match=r"has 6 layers"):
        plan_configs([2, 7], [], num_layers=6)
    with pytest.raises(EvalError, match="does not prune"):
        plan_configs([], [0.5], num_layers=6, supports_pruning=False)
    # keep ratio 1.0 prunes nothing: fine on any backend
    assert len(plan_configs([], [1.0], num_layers=6, supports_pruning=False)[0]) == 1


def test_parse_args_takes_the_new_flags(tmp_path: Path) -> None:
    opts = parse_args(
        [
            "--dataset",
            str(tmp_path),
            "--run",
            "x",
            "--depths",
            "2, 4,6",
            "--keep-ratios",
            "1.0,0.5",
            "--plot",
            str(tmp_path / "q.png"),
            "--runs-dir",
            str(tmp_path / "runs"),
        ]
    )
    assert list(opts.depths) == [2, 4, 6] and list(opts.keep_ratios) == [1.0, 0.5]
    assert opts.plot_path == tmp_path / "q.png" and opts.runs_dir == tmp_path / "runs"
    defaults = parse_args(["--dataset", str(tmp_path)])
    assert not defaults.depths and not defaults.keep_ratios
    assert defaults.plot_path is None and defaults.runs_dir is None
    for bad in (["--depths", "0"], ["--depths", "2,x"], ["--keep-ratios", "1.5"]):
        with pytest.raises(SystemExit):
            parse_args(["--dataset", str(tmp_path), *bad])
    with pytest.raises(SystemExit):
        parse_args(["--dataset", str(tmp_path), "--keep-ratios", "0"])


def test_latency_has_mean_median_and_p99() -> None:
    assert _latency([]) is None
    assert _latency([5.0]) == {"mean": 5.0, "p50": 5.0, "p99": 5.0}
    lat = _latency([float(v) for v in range(1, 101)])
    assert lat is not None
    assert lat["mean"] == pytest.approx(50.5) and lat["p50"] == pytest.approx(50.5)
    assert lat["p99"] == pytest.approx(99.01)


# -- the whole command against a fake sidecar --------------------------------------------------

#: query -> document -> grade; the run lists every document for every query
QRELS = {"q1": {"a": 2, "b": 1}, "q2": {"c": 1}, "q3": {"e": 1, "f": 0}}
DOCS = ["a", "b", "c", "d", "e", "f"]


def _write_dataset(root: Path) -> Path:
    root.mkdir()
    (root / "qrels").mkdir()
    (root / "runs").mkdir()
    with (root / "corpus.jsonl").open("w") as fh:
        for d in DOCS:
            fh.write(json.dumps({"_id": d, "title": "", "text": f"document {d}"}) + "\n")
    with (root / "queries.jsonl").open("w") as fh:
        for q in QRELS:
            fh.write(json.dumps({"_id": q, "text": f"query {q}"}) + "\n")
    lines = ["query-id\tcorpus-id\tscore\n"]
    lines += [f"{q}\t{d}\t{g}\n" for q, judged in QRELS.items() for d, g in judged.items()]
    (root / "qrels" / "test.tsv").write_text("".join(lines))
    # a first stage that puts the relevant documents last
    run = [f"{q} Q0 {d} {6 - i} {float(i)} bm25\n" for q in QRELS for i, d in enumerate(DOCS)]
    (root / "runs" / "tiny.trec").write_text("".join(run))
    return root


def _model(num_layers: int = 2, pruning: bool = True) -> ModelInfo:
    return ModelInfo(
        name="fake",
        kind="reranker",
        source="/models/fake",
        architecture="bert",
        num_layers=num_layers,
        hidden_size=8,
        num_heads=1,
        max_length=64,
        default_max_length=64,
        backend="torch",
        precision="fp32",
        device="cpu",
        is_default=True,
        dimension=0,
        supports_depth=True,
        supports_token_pruning=pruning,
    )


class FakeClient:
    """Scores: the full model ranks by grade (ties by position), depth 1 exactly backwards;
    pruning changes nothing. Records the options of every call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def list_models(self) -> list[ModelInfo]:
        return [_model()]

    def rerank(
        self,
        query: str,
        documents: list[tuple[str, str]],
        *,
        model: str = "",
        timeout: float | None = None,
        **options: Any,
    ) -> RerankResponse:
        qid = query.removeprefix("query ")
        self.calls.append({"qid": qid, "model": model, **options})
        grades = QRELS[qid]
        sign = -1.0 if options.get("depth") == 1 else 1.0
        scores = [
            sign * (grades.get(d, 0) * 10.0 - i / 10.0) for i, (d, _text) in enumerate(documents)
        ]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        results = [RerankResult(i, documents[i][0], scores[i]) for i in order]
        return RerankResponse(results, model, depth=options.get("depth") or 2)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    client = FakeClient()

    @contextlib.contextmanager
    def sidecar(opts: Any) -> Iterator[tuple[FakeClient, str, bool]]:
        yield client, "fake:0", False

    monkeypatch.setattr(runner, "_sidecar", sidecar)
    return client


def _main(argv: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    return code, buf.getvalue()


def test_eval_reports_every_configuration(fake: FakeClient, tmp_path: Path) -> None:
    root = _write_dataset(tmp_path / "tiny")
    out, plot, runs = tmp_path / "report.json", tmp_path / "plot" / "q.png", tmp_path / "runs"
    argv = ["--dataset", str(root), "--run", "tiny", "--depths", "1", "--keep-ratios", "0.5"]
    argv += ["--json", str(out), "--plot", str(plot), "--runs-dir", str(runs), "--no-progress"]
    code, table = _main(argv)
    assert code == 0
    rep = json.loads(out.read_text())
    assert rep["complete"] is True and rep["plot"] == str(plot)
    assert [c["name"] for c in rep["configs"]] == ["d1", "full", "full-k0.5"]
    assert [c["depth"] for c in rep["configs"]] == [1, 2, 2]
    row = rep["modes"]["run"]
    by_name = {c["name"]: c for c in row["configs"]}
    assert list(by_name) == ["d1", "full", "full-k0.5"]
    full, d1, pruned = by_name["full"], by_name["d1"], by_name["full-k0.5"]
    # the full model ranks by grade: perfect; the run puts the relevant documents last
    assert full["metrics"]["ndcg@10"] == pytest.approx(1.0)
    assert row["first_stage_metrics"]["ndcg@10"] < 0.6
    assert row["reranked_metrics"] == full["metrics"]  # the old keys: the full model's
    assert row["latency_ms"]["rerank"] == full["latency_ms"]
    assert d1["spearman_vs_full"] == pytest.approx(-1.0) and d1["spearman_queries"] == 3
    assert pruned["spearman_vs_full"] == pytest.approx(1.0)
    assert full["spearman_vs_full"] is None
    # each configuration's paired difference from the first stage, per metric
    gain = full["vs_first_stage"]["ndcg@10"]
    first_ndcg = row["first_stage_metrics"]["ndcg@10"]
    assert gain["mean"] == pytest.approx(1.0 - first_ndcg) and gain["queries"] == 3
    assert gain["se"] > 0  # the run misranks the three queries by different amounts
    assert set(d1["vs_first_stage"]) == set(rep["metrics"])
    for c in row["configs"]:
        assert set(c["latency_ms"]) == {"mean", "p50", "p99"}
        assert set(c["per_query"]) == set(QRELS)

    # every query reranked once per configuration, with that configuration's options, and
    # not always in the same order
    assert len(fake.calls) == 3 * 3 and all(c["model"] == "fake" for c in fake.calls)
    opts = [{k: v for k, v in c.items() if k in ("depth", "keep_ratio")} for c in fake.calls]
    assert opts.count({"depth": 1}) == 3 and opts.count({"keep_ratio": 0.5}) == 3
    assert opts.count({}) == 3
    firsts = {json.dumps(opts[i]) for i in range(0, 9, 3)}
    assert len(firsts) == 3

    # the table: one line per configuration, with rho where it applies
    assert "reranked d1" in table and "reranked full-k0.5" in table and "rho" in table
    assert "-1.000" in table and "p99 ms" in table
    full_line = next(x for x in table.splitlines() if x.strip().startswith("reranked full "))
    assert "diff NDCG@10 (se)" in table and f"{gain['mean']:+.4f} ({gain['se']:.4f})" in full_line
    assert f"plot: {plot}" in table

    # the plot is a PNG
    assert plot.read_bytes()[:8] == PNG_MAGIC

    # run files: rescoring them gives the report's figures
    assert row["run_files"]["scores"] == "run.scores.jsonl"
    for name, metrics in [
        ("first_stage", row["first_stage_metrics"]),
        *((c["name"], c["metrics"]) for c in row["configs"]),
    ]:
        ranked = load_run(runs / row["run_files"][name])
        ev = evaluate(
            {q: [d for d, _ in docs] for q, docs in ranked.items()},
            {q: QRELS[q] for q in QRELS},
            rep["metrics"],
        )
        assert ev.means == pytest.approx(metrics), name
    lines = [json.loads(x) for x in (runs / "run.scores.jsonl").read_text().splitlines()]
    assert [x["qid"] for x in lines] == list(QRELS)
    q1 = lines[0]
    assert q1["ids"] == DOCS[::-1] and q1["first_stage_scores"] == [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    assert list(q1["scores"]) == ["d1", "full", "full-k0.5"]
    assert q1["scores"]["full"][5] == pytest.approx(19.5)  # "a": grade 2, last candidate
    assert q1["scores"]["d1"] == [-s for s in q1["scores"]["full"]]


def test_eval_rejects_a_depth_beyond_the_model(fake: FakeClient, tmp_path: Path) -> None:
    root = _write_dataset(tmp_path / "tiny")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code, _ = _main(["--dataset", str(root), "--run", "tiny", "--depths", "3", "--no-progress"])
    assert code == 2 and "has 2 layers" in err.getvalue()
    assert fake.calls == []


def test_eval_without_depths_keeps_one_reranked_line(fake: FakeClient, tmp_path: Path) -> None:
    root = _write_dataset(tmp_path / "tiny")
    out = tmp_path / "r.json"
    code, table = _main(
        ["--dataset", str(root), "--run", "tiny", "--json", str(out), "--no-progress"]
    )
    assert code == 0
    row = json.loads(out.read_text())["modes"]["run"]
    assert [c["name"] for c in row["configs"]] == ["full"]
    assert not any({"depth", "keep_ratio"} & set(c) for c in fake.calls)  # no such options
    lines = table.splitlines()
    assert sum(line.strip().startswith("reranked") for line in lines) == 1
    assert "rho" not in table


# -- formatting and plotting on their own --------------------------------------------------------


def _report() -> dict[str, Any]:
    """A two-mode report with three configurations each, as `run_eval` writes it."""

    def config(name: str, ndcg: float, p50: float, rho: float | None) -> dict[str, Any]:
        return {
            "name": name,
            "metrics": {"ndcg@10": ndcg, "mrr@10": ndcg, "recall@100": 0.9},
            "latency_ms": {"mean": p50 + 1, "p50": p50, "p99": p50 * 2},
            "spearman_vs_full": rho,
        }

    def row(label: str, first: float, shift: float) -> dict[str, Any]:
        configs = [
            config("d2", 0.5 + shift, 10.0, 0.71),
            config("d4", 0.6 + shift, 20.0, 0.9),
            config("full", 0.7 + shift, 30.0, None),
        ]
        return {
            "first_stage": label,
            "first_stage_metrics": {"ndcg@10": first, "mrr@10": first, "recall@100": 0.9},
            "reranked_metrics": configs[-1]["metrics"],
            "latency_ms": {
                "first_stage": {"mean": 3.0, "p50": 2.5, "p99": 9.0},
                "rerank": configs[-1]["latency_ms"],
            },
            "configs": configs,
        }

    return {
        "dataset": {
            "name": "tiny",
            "split": "test",
            "queries": 3,
            "docs": 6,
            "relevance_threshold": 1,
        },
        "reranker": {
            "name": "fake",
            "source": "/models/fake",
            "architecture": "bert 6x384",
            "backend": "torch/fp32/cpu",
        },
        "db": "qdrant",
        "run": None,
        "candidates": 100,
        "max_length": 0,
        "metrics": ["ndcg@10", "mrr@10", "recall@100"],
        "modes": {
            "dense": row("qdrant dense minilm (cosine)", 0.65, 0.0),
            "sparse": row("qdrant SPLADE tiny (sidecar)", 0.55, 0.05),
        },
        "total_seconds": 1.0,
        "notes": ["a note"],
    }


def test_table_has_a_line_per_configuration() -> None:
    table = format_table(_report())
    lines = table.splitlines()
    head = next(line for line in lines if line.startswith("mode"))
    for col in ("NDCG@10", "MRR@10", "R@100", "mean ms", "p50 ms", "p99 ms", "rho"):
        assert col in head
    dense = next(line for line in lines if line.startswith("dense"))
    assert "qdrant dense minilm (cosine)" in dense and "first stage" in dense
    assert "0.6500" in dense and "2.5" in dense and "9.0" in dense
    reranked = [line.strip() for line in lines if line.strip().startswith("reranked")]
    assert len(reranked) == 6
    assert reranked[0].startswith("reranked d2") and reranked[0].endswith("0.710")
    assert reranked[2].startswith("reranked full") and reranked[2].endswith("-")
    assert "NOTE: a note" in table and "Spearman" in table


def test_table_reads_a_report_without_configurations() -> None:
    """Reports written before configurations existed still format (one reranked line)."""
    rep = _report()
    for row in rep["modes"].values():
        del row["configs"]
        row["latency_ms"]["rerank"] = {"mean": 1.0, "p50": 1.0}  # no p99 then
    table = format_table(rep)
    assert sum(line.strip().startswith("reranked") for line in table.splitlines()) == 2
    assert "rho" not in table and "diff" not in table


def test_plot_writes_a_png(tmp_path: Path) -> None:
    path = plot_quality_latency(_report(), tmp_path / "deep" / "plot.png")
    assert path == tmp_path / "deep" / "plot.png"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    # a row without any reranked latency (nothing reranked) still plots its first stage
    rep = _report()
    for c in rep["modes"]["sparse"]["configs"]:
        c["latency_ms"] = None
    assert plot_quality_latency(rep, tmp_path / "p2.png").read_bytes()[:8] == PNG_MAGIC


def test_eval_package_imports_without_matplotlib() -> None:
    code = (
        "import sys, rerankd.eval.runner, rerankd.eval.plot, rerankd.eval.report; "
        "sys.exit('matplotlib' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_run_files_are_trec_and_jsonl(tmp_path: Path) -> None:
    assert trec_lines("q1", [("a", 2.5), ("b", 1.0)], "tag") == [
        "q1 Q0 a 1 2.5 tag\n",
        "q1 Q0 b 2 1.0 tag\n",
    ]
    records = [
        {
            "qid": "q1",
            "ids": ["a", "b", "c"],
            "first_stage_scores": [3.0, 2.0, 1.0],
            "scores": {"d 2": [0.1, 0.9, 0.5], "full": [0.3, 0.3, 0.7]},
        },
        {"qid": "q2", "ids": [], "first_stage_scores": [], "scores": {"d 2": [], "full": []}},
    ]
    files = write_run_files(tmp_path / "runs", "my mode", records, ["d 2", "full"])
    assert files == {
        "first_stage": "my_mode.first_stage.trec",
        "d 2": "my_mode.d_2.trec",
        "full": "my_mode.full.trec",
        "scores": "my_mode.scores.jsonl",
    }
    folder = tmp_path / "runs"
    assert (folder / files["d 2"]).read_text().split("\n")[0].split() == [
        "q1",
        "Q0",
        "b",
        "1",
        "0.9",
        "rerankd-my_mode-d_2",
    ]
    full = [line.split()[2] for line in (folder / files["full"]).read_text().splitlines()]
    assert full == ["c", "a", "b"]  # the tie keeps first-stage order
    first = (folder / files["first_stage"]).read_text().splitlines()
    assert [line.split()[2] for line in first] == ["a", "b", "c"]
    jsonl = [json.loads(x) for x in (folder / files["scores"]).read_text().splitlines()]
    assert jsonl[0] == records[0] and jsonl[1]["ids"] == []
    assert not list(folder.glob("*.tmp"))

"""`rerankd eval`'s outputs besides the plot: the table, the JSON report and the run files.

`--runs-dir DIR` gets, per row of the report (a first-stage mode, or `run`):

- `MODE.first_stage.trec` and `MODE.CONFIG.trec`: each ranking as a TREC run
  (`qid Q0 docid rank score tag`, best first), for trec_eval or any other scorer;
- `MODE.scores.jsonl`: one line per query with the candidate ids in first-stage order, their
  first-stage scores, and each configuration's raw reranker scores in that same order:
  `{"qid": ..., "ids": [...], "first_stage_scores": [...], "scores": {"full": [...], ...}}`.
  Enough to fit a fusion of first-stage and reranker scores offline without reranking again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rerankd.eval.metrics import parse_metric

# -- JSON --------------------------------------------------------------------------------------


def save_report(report: dict[str, Any], path: Path) -> None:
    """Write the JSON report atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


# -- run files ---------------------------------------------------------------------------------


def _safe(name: str) -> str:
    """A file-name-safe form of a mode or configuration name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def scores_file(folder: Path, mode: str) -> Path:
    """Where `write_run_files` puts one row's raw scores (`MODE.scores.jsonl`)."""
    return folder / f"{_safe(mode)}.scores.jsonl"


def read_full_scores(path: Path) -> dict[str, dict[str, float]]:
    """The full model's raw score per candidate, per query, from a `MODE.scores.jsonl`."""
    out: dict[str, dict[str, float]] = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            rec = json.loads(line)
            full = rec.get("scores", {}).get("full")
            if full is None or len(full) != len(rec.get("ids", ())):
                raise ValueError(f"{path}:{n}: no full-model score per candidate")
            out[str(rec["qid"])] = dict(zip(rec["ids"], map(float, full), strict=True))
    return out


def _write_atomic(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(path)


def trec_lines(qid: str, ranked: Sequence[tuple[str, float]], tag: str) -> list[str]:
    """One query's ranking (best first, with scores) as TREC run lines."""
    return [
        f"{qid} Q0 {doc} {rank} {float(score)!r} {tag}\n"
        for rank, (doc, score) in enumerate(ranked, start=1)
    ]


def write_run_files(
    folder: Path,
    mode: str,
    records: Sequence[Mapping[str, Any]],
    configs: Sequence[str],
) -> dict[str, str]:
    """Write one row's rankings and raw scores (see the module docstring); return the file
    names by ranking ("first_stage", each configuration, and "scores" for the JSONL).

    `records` hold, per query: `qid`, `ids` (first-stage order), `first_stage_scores` and
    `scores` (configuration name -> one raw score per id, in `ids` order). Reranked rankings
    sort by score, best first, ties in first-stage order (as the sidecar orders them)."""
    folder.mkdir(parents=True, exist_ok=True)
    prefix = _safe(mode)
    files = {"first_stage": f"{prefix}.first_stage.trec"}
    files.update({name: f"{prefix}.{_safe(name)}.trec" for name in configs})
    files["scores"] = scores_file(folder, mode).name
    first: list[str] = []
    per_config: dict[str, list[str]] = {name: [] for name in configs}
    jsonl: list[str] = []
    for rec in records:
        qid, ids = rec["qid"], list(rec["ids"])
        first += trec_lines(
            qid, list(zip(ids, rec["first_stage_scores"], strict=True)), f"rerankd-{prefix}-first"
        )
        for name in configs:
            scores = rec["scores"].get(name, [])
            order = sorted(range(len(scores)), key=lambda i, s=scores: -s[i])  # stable on ties
            ranked = [(ids[i], scores[i]) for i in order]
            per_config[name] += trec_lines(qid, ranked, f"rerankd-{prefix}-{_safe(name)}")
        line = {
            "qid": qid,
            "ids": ids,
            "first_stage_scores": list(rec["first_stage_scores"]),
            "scores": {name: list(rec["scores"].get(name, [])) for name in configs},
        }
        jsonl.append(json.dumps(line) + "\n")
    _write_atomic(folder / files["first_stage"], first)
    for name in configs:
        _write_atomic(folder / files[name], per_config[name])
    _write_atomic(folder / files["scores"], jsonl)
    return files


# -- table -------------------------------------------------------------------------------------


def metric_header(spec: str) -> str:
    """ndcg@10 -> NDCG@10, mrr@10 -> MRR@10, recall@100 -> R@100."""
    name, k = parse_metric(spec)
    return {"ndcg": "NDCG", "mrr": "MRR", "recall": "R"}[name] + f"@{k}"


def _ms(lat: Mapping[str, float] | None, key: str) -> str:
    return "-" if lat is None or key not in lat else f"{lat[key]:.1f}"


def _stages(row: Mapping[str, Any], metric: str) -> list[tuple[Any, ...]]:
    """(ranking label, metrics, latency, Spearman vs full, Spearman vs the reference model,
    paired difference from the first stage in `metric`) per line of one row: its first
    stage, then each reranker configuration. A report without configurations (written
    before they existed) shows its one reranked ranking."""
    first = row["latency_ms"]["first_stage"]
    lines: list[tuple[Any, ...]] = [
        ("first stage", row["first_stage_metrics"], first, None, None, None)
    ]
    configs = row.get("configs") or [
        {
            "name": "full",
            "metrics": row["reranked_metrics"],
            "latency_ms": row["latency_ms"]["rerank"],
            "spearman_vs_full": None,
        }
    ]
    single = len(configs) == 1
    for c in configs:
        label = "reranked" if single else f"reranked {c['name']}"
        rho, ref = c.get("spearman_vs_full"), c.get("spearman_vs_reference")
        diff = (c.get("vs_first_stage") or {}).get(metric)
        lines.append((label, c["metrics"], c["latency_ms"], rho, ref, diff))
    return lines


def _diff(d: Mapping[str, float] | None) -> str:
    return "-" if d is None else f"{d['mean']:+.4f} ({d['se']:.4f})"


def format_table(report: Mapping[str, Any]) -> str:
    """The report as a fixed-width table: per mode, its first stage, then one line per
    reranker configuration (depth / keep ratio), with the Spearman correlation of each
    configuration's scores with the full model's when there are several."""
    ds, rr = report["dataset"], report["reranker"]
    where = f"run {report['run']}" if report["run"] else f"embedded {report['db']}"
    docs = f", {ds['docs']} docs" if ds["docs"] is not None else ""
    lines = [
        f"rerankd eval: {ds['name']} ({ds['split']}), {ds['queries']} queries{docs}, "
        f"binary relevance at grade >= {ds['relevance_threshold']}",
        f"first stage: {where}; reranker {rr['name']} ({rr['source']}, {rr['architecture']}, "
        f"{rr['backend']}), {report['candidates']} candidates"
        + (f", max_length {report['max_length']}" if report["max_length"] else "")
        + (f", long_docs {report['long_docs']}" if report.get("long_docs") else ""),
        "",
    ]
    metrics = report["metrics"]
    rows = report["modes"]
    stages = {mode: _stages(row, metrics[0]) for mode, row in rows.items()}
    with_rho = any(s[3] is not None for per in stages.values() for s in per)
    labels = [row["first_stage"] for row in rows.values()]
    width = max([len("first stage"), *map(len, labels)])
    rank_w = max([len("ranking"), *(len(s[0]) for per in stages.values() for s in per)])
    head = f"{'mode':<7} {'first stage':<{width}} {'ranking':<{rank_w}}"
    head += "".join(f" {metric_header(m):>9}" for m in metrics)
    diff_head = f"diff {metric_header(metrics[0])} (se)"
    with_diff = any(s[5] is not None for per in stages.values() for s in per)
    if with_diff:
        head += f" {diff_head:>18}"
    head += f" {'mean ms':>9} {'p50 ms':>8} {'p99 ms':>8}"
    with_ref = any(s[4] is not None for per in stages.values() for s in per)
    if with_rho:
        head += f" {'rho':>6}"
    if with_ref:
        head += f" {'rho ref':>7}"
    lines += [head, "-" * len(head)]
    for mode, row in rows.items():
        for i, (stage, values, lat, rho, ref, diff) in enumerate(stages[mode]):
            left = f"{mode:<7} {row['first_stage']:<{width}}" if i == 0 else " " * (8 + width)
            vals = "".join(f" {values[m]:>9.4f}" for m in metrics)
            if with_diff:
                vals += f" {_diff(diff):>18}"
            line = f"{left} {stage:<{rank_w}}{vals} {_ms(lat, 'mean'):>9} {_ms(lat, 'p50'):>8}"
            line += f" {_ms(lat, 'p99'):>8}"
            if with_rho:
                line += f" {'-' if rho is None else f'{rho:.3f}':>6}"
            if with_ref:
                line += f" {'-' if ref is None else f'{ref:.3f}':>7}"
            lines.append(line.rstrip())
    lines.append("")
    if report["run"]:
        lines.append("latency per query: the Rerank call alone (the first stage is the run file)")
    else:
        lines.append(
            "latency per query: first stage = query embedding + DB search; reranked = the "
            "Rerank call alone"
        )
    if with_diff:
        lines.append(
            f"{diff_head}: mean per-query difference from the first stage on the same queries, "
            "and its standard error (a difference within about two errors is within the noise "
            "of this many queries)"
        )
    if with_rho:
        lines.append(
            "rho: mean per-query Spearman correlation of a configuration's scores with the "
            "full model's, over the same candidates"
        )
    if with_ref:
        lines.append(
            "rho ref: the same against the full scores of the reference model in "
            f"{report.get('reference_runs')} (e.g. a student against its teacher)"
        )
    took = f"whole run {report['total_seconds']:.1f} s"
    if "index_reused" in report:
        took = f"index reused from {report['index_reused']}, {took}"
    elif "index_seconds" in report:
        took = f"indexing {report['index_seconds']:.1f} s, {took}"
    lines.append(took)
    for kind, path in (("run files", report.get("runs_dir")), ("plot", report.get("plot"))):
        if path:
            lines.append(f"{kind}: {path}")
    for note in report["notes"]:
        lines.append(f"NOTE: {note}")
    return "\n".join(lines)

"""`rerankd eval`: first-stage vs reranked NDCG@10, MRR@10 and Recall@100 on a BEIR data set.

    rerankd eval --dataset ../shared/data/scifact --db qdrant --model bundled:splade-tiny
    rerankd eval --dataset ../shared/data/trec-dl-2019 --run bm25.top100 --json dl19.json

With `--db`, the corpus is embedded through the sidecar and indexed into an embedded DB in a
temporary folder (Qdrant local mode or Milvus Lite), and every query runs through
`hybrid_search` once per mode: the candidates' first-stage order gives the first-stage
figures and the reranked order the reranked ones, so both rankings come from one and the
same candidate list. "sparse" is the DB's own sparse retrieval: SPLADE vectors from the
sidecar in Qdrant (which has no BM25), native BM25 in Milvus; the table names each row's
first stage. With `--run`, a TREC run file (a path, or the name of one in the data set's
`runs/`) is the first stage and only reranking is done: the standard TREC DL setup.

The sidecar is spawned for the run (one process, stopped at the end) unless `--address`
names a running one. Latency is per query, one query at a time: first stage = query
embedding + DB search, rerank = the Rerank call alone (gRPC included). Metric conventions
(graded NDCG, binary threshold, which queries count) are in `rerankd.eval.metrics`.

The bundled rerankers (`bundled:NAME`) have untrained heads: their reranked figures are
expected to be *worse* than the first stage until rerankd ships a trained model. The run
says so rather than leaving a bad number unexplained.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rerankd.client import ModelInfo, RerankClient
from rerankd.connectors.base import MODES, Connector
from rerankd.errors import RerankdError
from rerankd.eval.beir import BeirDataset, load_dataset, load_run, resolve_run, subset
from rerankd.eval.metrics import DEFAULT_METRICS, evaluate, parse_metric, threshold_for

COLLECTION = "rerankd_eval"
DEFAULT_MODEL = "bundled:all-minilm-l6-v2"
DBS = ("qdrant", "milvus")


class EvalError(RuntimeError):
    """A setup the evaluation cannot run with (no judged queries, a missing encoder, ...)."""


@dataclass
class EvalOptions:
    """Everything one evaluation needs; `parse_args` builds it from the command line."""

    dataset: Path
    db: str | None = "qdrant"
    model: str | None = None
    modes: Sequence[str] = ("dense", "sparse", "hybrid")
    candidates: int = 100
    max_queries: int | None = None
    max_docs: int | None = None
    json_path: Path | None = None
    index_dir: Path | None = None
    address: str | None = None
    run: str | None = None
    split: str = "test"
    relevance_threshold: int | None = None
    max_length: int = 0
    backend: str | None = None
    threads: int = 0
    timeout: float = 120.0
    batch_size: int = 32
    progress: bool = True
    metrics: Sequence[str] = field(default_factory=lambda: list(DEFAULT_METRICS))


@dataclass
class _Rankings:
    """One row's raw material: both rankings per query and the per-query latencies."""

    first: dict[str, list[str]] = field(default_factory=dict)
    reranked: dict[str, list[str]] = field(default_factory=dict)
    first_ms: list[float] = field(default_factory=list)
    rerank_ms: list[float] = field(default_factory=list)
    empty: int = 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rerankd eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", type=Path, required=True, help="a BEIR-layout folder")
    p.add_argument(
        "--db", choices=DBS, help="embedded DB for the first stage (default qdrant; not with --run)"
    )
    p.add_argument(
        "--model",
        help=f"reranker: the source to spawn the sidecar with (default {DEFAULT_MODEL}); with "
        "--address, the name or source of one the running sidecar holds (default: its default)",
    )
    p.add_argument(
        "--modes",
        help=f"comma-separated first-stage modes out of {','.join(MODES)} "
        "(default dense,sparse,hybrid; not with --run)",
    )
    p.add_argument("--candidates", type=_positive, default=100, help="first-stage depth reranked")
    p.add_argument("--max-queries", type=_positive, help="the first N judged queries only")
    p.add_argument(
        "--max-docs",
        type=_positive,
        help="index at most N documents: every judged document of the kept queries, then the "
        "first others in corpus order (not with --run)",
    )
    p.add_argument(
        "--json",
        dest="json_path",
        type=Path,
        help="also write the report here (rewritten after each mode, so a long run that is "
        "interrupted keeps the modes it finished)",
    )
    p.add_argument(
        "--index-dir",
        type=Path,
        help="keep the embedded DB in DIR and reuse it on the next run when it holds the same "
        "documents, DB and encoders (default: a temporary folder, removed at the end)",
    )
    p.add_argument("--address", help="HOST:PORT of a running sidecar instead of spawning one")
    p.add_argument("--run", help="rerank this TREC run (a file, or a name under DATASET/runs/)")
    p.add_argument("--split", default="test", help="qrels/SPLIT.tsv (default test)")
    p.add_argument(
        "--relevance-threshold",
        type=_positive,
        help="lowest grade the binary metrics count as relevant (default 2 for trec-dl*, else 1)",
    )
    p.add_argument(
        "--max-length", type=int, default=0, help="tokens per (query, document) pair (0 = model's)"
    )
    p.add_argument("--backend", help="backend for a spawned sidecar (its --backend)")
    p.add_argument(
        "--threads", type=int, default=0, help="intra-op threads of a spawned sidecar (0 = its own)"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per sidecar call")
    p.add_argument("--batch-size", type=_positive, default=32, help="documents per Embed call")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return p


def parse_args(argv: Sequence[str] | None = None) -> EvalOptions:
    """Parse and cross-check the flags (`--run` excludes the DB-only ones)."""
    p = build_parser()
    ns = p.parse_args(argv)
    if ns.run is not None:
        given = (
            ("--db", ns.db),
            ("--modes", ns.modes),
            ("--max-docs", ns.max_docs),
            ("--index-dir", ns.index_dir),
        )
        clash = [flag for flag, value in given if value]
        if clash:
            p.error(f"{', '.join(clash)} select a DB first stage; --run replaces it")
        modes: list[str] = []
    else:
        modes = [m.strip() for m in (ns.modes or "dense,sparse,hybrid").split(",") if m.strip()]
        bad = [m for m in modes if m not in MODES]
        if bad or not modes:
            p.error(f"--modes takes a comma-separated subset of {','.join(MODES)}: {ns.modes!r}")
    if ns.max_length < 0:
        p.error("--max-length must be >= 0")
    return EvalOptions(
        dataset=ns.dataset,
        db=None if ns.run is not None else (ns.db or "qdrant"),
        model=ns.model,
        modes=modes,
        candidates=ns.candidates,
        max_queries=ns.max_queries,
        max_docs=ns.max_docs,
        json_path=ns.json_path,
        index_dir=ns.index_dir,
        address=ns.address,
        run=ns.run,
        split=ns.split,
        relevance_threshold=ns.relevance_threshold,
        max_length=ns.max_length,
        backend=ns.backend,
        threads=ns.threads,
        timeout=ns.timeout,
        batch_size=ns.batch_size,
        progress=not ns.no_progress,
    )


# -- sidecar ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _sidecar(opts: EvalOptions) -> Iterator[tuple[RerankClient, str, bool]]:
    """A client on `--address`, or on a sidecar spawned for this run and stopped after it."""
    if opts.address:
        with RerankClient(opts.address, timeout=opts.timeout) as client:
            yield client, opts.address, False
        return
    from rerankd.server.process import spawn_sidecar

    args = ["--model", opts.model or DEFAULT_MODEL, "--log-level", "WARNING"]
    if opts.max_length:
        args += ["--max-length", str(opts.max_length)]
    if opts.backend:
        args += ["--backend", opts.backend]
    if opts.threads:
        args += ["--threads", str(opts.threads)]
    if opts.run:  # reranking a given run embeds nothing: skip loading the encoders
        args += ["--dense-encoder", "", "--sparse-encoder", ""]
    sidecar = spawn_sidecar(args)
    try:
        with RerankClient(sidecar.address, timeout=opts.timeout) as client:
            yield client, sidecar.address, True
    finally:
        sidecar.stop()


def _pick_reranker(models: list[ModelInfo], wanted: str | None) -> ModelInfo:
    rerankers = [m for m in models if m.kind == "reranker"]
    if not rerankers:
        raise EvalError("the sidecar serves no reranker")
    if wanted:
        for m in rerankers:
            if wanted in (m.name, m.source):
                return m
        known = ", ".join(f"{m.name} ({m.source})" for m in rerankers)
        raise EvalError(f"the sidecar has no reranker {wanted!r}; it has {known}")
    return next((m for m in rerankers if m.is_default), rerankers[0])


def _encoder(models: list[ModelInfo], kind: str) -> ModelInfo | None:
    found = [m for m in models if m.kind == kind]
    return next((m for m in found if m.is_default), found[0] if found else None)


# -- the two kinds of first stage ------------------------------------------------------------


def first_stage_label(
    db: str, mode: str, needs_sparse: bool, dense: str | None, sparse: str | None
) -> str:
    """What produced a row's candidates, in words: the point of the table's second column."""
    lexical = f"SPLADE {sparse} (sidecar)" if needs_sparse else "BM25 (native)"
    if mode == "dense":
        return f"{db} dense {dense} (cosine)"
    if mode == "sparse":
        return f"{db} {lexical}"
    return f"{db} RRF(dense + {lexical})"


def _open_connector(db: str, folder: Path) -> Connector:
    from rerankd.demo import open_connector

    return open_connector(db, folder)


def _close_connector(connector: Connector) -> None:
    close = getattr(getattr(connector, "client", None), "close", None)
    if callable(close):
        with contextlib.suppress(Exception):  # closing is tidiness, not a result
            close()


def _db_rankings(
    opts: EvalOptions,
    data: BeirDataset,
    client: RerankClient,
    connector: Connector,
    mode: str,
    reranker: str,
) -> _Rankings:
    from rerankd.search import hybrid_search

    out = _Rankings()
    bar = tqdm(data.queries.items(), desc=f"{mode:>6}", unit="q", disable=not opts.progress)
    for qid, text in bar:
        # One call gives both rankings: top_k = candidates returns every candidate, reranked,
        # each still carrying its first-stage rank. fail_open=False: a failed rerank must
        # stop the evaluation, not quietly report first-stage figures as reranked ones.
        res = hybrid_search(
            COLLECTION,
            text,
            connector=connector,
            client=client,
            mode=mode,
            top_k=opts.candidates,
            candidates=opts.candidates,
            model=reranker,
            max_length=opts.max_length,
            timeout=opts.timeout,
            fail_open=False,
        )
        out.first[qid] = [h.id for h in sorted(res.hits, key=lambda h: h.first_stage_rank)]
        out.reranked[qid] = [h.id for h in res.hits]
        out.first_ms.append(res.timings.embed_ms + res.timings.first_stage_ms)
        if res.reranked:
            out.rerank_ms.append(res.timings.rerank_ms)
        else:
            out.empty += 1  # no candidates at all: both rankings are empty and score 0
    return out


def _run_rankings(
    opts: EvalOptions,
    data: BeirDataset,
    full_corpus: dict[str, str],
    client: RerankClient,
    run: dict[str, list[tuple[str, float]]],
    reranker: str,
) -> tuple[_Rankings, int]:
    """Rerank the run's top `candidates` per query; also count candidates without text."""
    out, missing = _Rankings(), 0
    bar = tqdm(data.queries.items(), desc="   run", unit="q", disable=not opts.progress)
    for qid, text in bar:
        ids = [d for d, _ in run.get(qid, [])[: opts.candidates]]
        out.first[qid] = ids
        if not ids:
            out.reranked[qid] = []
            out.empty += 1
            continue
        missing += sum(d not in full_corpus for d in ids)
        docs = [(d, full_corpus.get(d, "")) for d in ids]
        t0 = time.perf_counter()
        resp = client.rerank(
            text, docs, model=reranker, max_length=opts.max_length, timeout=opts.timeout
        )
        out.rerank_ms.append((time.perf_counter() - t0) * 1e3)
        out.reranked[qid] = [r.id for r in resp.results]
    return out, missing


# -- figures ---------------------------------------------------------------------------------


def _latency(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "p50": statistics.median(values)}


def _row(
    label: str, r: _Rankings, data: BeirDataset, metrics: Sequence[str], threshold: int
) -> dict[str, Any]:
    first = evaluate(r.first, data.qrels, metrics, relevance_threshold=threshold)
    reranked = evaluate(r.reranked, data.qrels, metrics, relevance_threshold=threshold)
    return {
        "first_stage": label,
        "queries": first.num_queries,
        "queries_without_candidates": r.empty,
        "first_stage_metrics": first.means,
        "reranked_metrics": reranked.means,
        "latency_ms": {"first_stage": _latency(r.first_ms), "rerank": _latency(r.rerank_ms)},
        # Per query, so a surprising mean can be traced to the queries behind it.
        "per_query": {"first_stage": first.per_query, "reranked": reranked.per_query},
    }


def _notes(opts: EvalOptions, reranker: ModelInfo, metrics: Sequence[str]) -> list[str]:
    notes = []
    if reranker.source.startswith("bundled:"):
        notes.append(
            f"reranker {reranker.source} has an untrained (seed 0) classification head: its "
            "reranked figures are expected to be worse than the first stage; they measure "
            "the serving path, not a trained model"
        )
    for spec in metrics:
        name, k = parse_metric(spec)
        if name == "recall" and k >= opts.candidates:
            notes.append(
                f"{spec} >= candidates ({opts.candidates}): reranking only reorders the "
                "candidates, so it is the same before and after reranking"
            )
    return notes


def run_eval(opts: EvalOptions) -> dict[str, Any]:
    """Run the evaluation and return the report (what `--json` writes)."""
    t_start = time.perf_counter()
    full = load_dataset(opts.dataset, opts.split)
    threshold = opts.relevance_threshold or threshold_for(full.name)
    data = subset(
        full,
        max_queries=opts.max_queries,
        max_docs=opts.max_docs,
        relevance_threshold=threshold,
    )
    if not data.queries:
        raise EvalError(f"{full.path} has no judged queries in split {opts.split!r}")
    run = load_run(resolve_run(full.path, opts.run)) if opts.run else None
    report: dict[str, Any] = {
        "dataset": {
            "name": full.name,
            "path": str(full.path),
            "split": opts.split,
            "queries": len(data.queries),
            "docs": len(data.corpus) if run is None else None,
            "relevance_threshold": threshold,
        },
        "db": opts.db,
        "run": opts.run,
        "candidates": opts.candidates,
        "max_length": opts.max_length,
        "metrics": list(opts.metrics),
    }
    rows: dict[str, dict[str, Any]] = {}
    report["modes"] = rows  # filled mode by mode; saved after each when --json is given
    report["complete"] = False
    with _sidecar(opts) as (client, address, spawned):
        models = client.list_models()
        reranker = _pick_reranker(models, opts.model if opts.address else None)
        dense, sparse = _encoder(models, "dense"), _encoder(models, "sparse")
        report["sidecar"] = {"address": address, "spawned": spawned}
        report["sidecar_ready_seconds"] = round(time.perf_counter() - t_start, 2)
        report["reranker"] = {
            "name": reranker.name,
            "source": reranker.source,
            "architecture": f"{reranker.architecture} {reranker.num_layers}x{reranker.hidden_size}",
            "backend": f"{reranker.backend}/{reranker.precision}/{reranker.device}",
            "untrained_head": reranker.source.startswith("bundled:"),
        }
        report["encoders"] = {
            kind: None if m is None else {"name": m.name, "source": m.source}
            for kind, m in (("dense", dense), ("sparse", sparse))
        }
        report["notes"] = _notes(opts, reranker, opts.metrics)
        if run is not None:
            name = Path(opts.run or "").name.removesuffix(".trec")
            r, missing = _run_rankings(opts, data, full.corpus, client, run, reranker.name)
            rows["run"] = _row(
                f"TREC run {name} (top {opts.candidates})", r, data, opts.metrics, threshold
            )
            rows["run"]["candidates_without_text"] = missing
        else:
            _db_rows(opts, data, client, reranker.name, dense, sparse, threshold, report)
    report["complete"] = True
    report["total_seconds"] = round(time.perf_counter() - t_start, 2)
    return report


def save_report(report: dict[str, Any], path: Path) -> None:
    """Write the JSON report atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


#: The file in `--index-dir` that says what the index holds.
MANIFEST = "rerankd-eval-index.json"


def index_manifest(
    data: BeirDataset,
    db: str,
    dense: ModelInfo | None,
    sparse: ModelInfo | None,
    needs_sparse: bool,
) -> dict[str, Any]:
    """What an index must match to be reused: the exact documents (ids and texts, hashed),
    the DB and the encoders that embedded them (name and source). Weights behind the same
    source are assumed unchanged; delete the folder after changing a model in place."""
    digest = hashlib.sha256()
    for doc_id, text in data.corpus.items():
        digest.update(doc_id.encode())
        digest.update(b"\0")
        digest.update(text.encode())
        digest.update(b"\0")

    def ident(m: ModelInfo | None) -> str | None:
        return None if m is None else f"{m.name} ({m.source})"

    return {
        "db": db,
        "collection": COLLECTION,
        "docs": len(data.corpus),
        "corpus_sha256": digest.hexdigest(),
        "dense_encoder": ident(dense),
        "sparse_encoder": ident(sparse) if needs_sparse else None,
    }


def _reusable(folder: Path, manifest: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8")) == manifest
    except (OSError, ValueError):
        return False


def _db_rows(
    opts: EvalOptions,
    data: BeirDataset,
    client: RerankClient,
    reranker: str,
    dense: str | None,
    sparse: str | None,
    threshold: int,
    report: dict[str, Any],
) -> None:
    """Index (or reuse) the corpus, then fill `report["modes"]` one mode at a time."""
    from rerankd.indexing import SourceDocument, index_documents

    assert opts.db is not None
    rows: dict[str, dict[str, Any]] = report["modes"]
    if opts.index_dir is not None:
        opts.index_dir.mkdir(parents=True, exist_ok=True)
        where: contextlib.AbstractContextManager[str] = contextlib.nullcontext(str(opts.index_dir))
    else:
        where = tempfile.TemporaryDirectory(prefix="rerankd-eval-")
    with where as tmp:
        folder = Path(tmp)
        connector = _open_connector(opts.db, folder)
        try:
            if connector.needs_dense and dense is None:
                raise EvalError("the sidecar serves no dense encoder (--dense-encoder)")
            if connector.needs_sparse and sparse is None and set(opts.modes) - {"dense"}:
                raise EvalError(
                    f"{opts.db} needs SPLADE vectors for sparse/hybrid modes and "
                    "the sidecar serves no sparse encoder (--sparse-encoder)"
                )
            manifest = index_manifest(data, opts.db, dense, sparse, connector.needs_sparse)
            t0 = time.perf_counter()
            if opts.index_dir is not None and _reusable(folder, manifest):
                report["index_reused"] = str(folder)
            else:
                # No manifest while indexing: an interrupted run must not look reusable.
                (folder / MANIFEST).unlink(missing_ok=True)
                index_documents(
                    connector,
                    COLLECTION,
                    [SourceDocument(d, t) for d, t in data.corpus.items()],
                    client=client,
                    recreate=True,
                    batch_size=opts.batch_size,
                    progress=opts.progress,
                    timeout=opts.timeout,
                )
                if opts.index_dir is not None:
                    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            report["index_seconds"] = round(time.perf_counter() - t0, 2)
            dense_name = dense.name if dense else None
            sparse_name = sparse.name if sparse else None
            for mode in opts.modes:
                label = first_stage_label(
                    opts.db, mode, connector.needs_sparse, dense_name, sparse_name
                )
                r = _db_rankings(opts, data, client, connector, mode, reranker)
                rows[mode] = _row(label, r, data, opts.metrics, threshold)
                if opts.json_path:
                    save_report(report, opts.json_path)
        finally:
            _close_connector(connector)


# -- output ----------------------------------------------------------------------------------


def _header(spec: str) -> str:
    name, k = parse_metric(spec)
    return {"ndcg": "NDCG", "mrr": "MRR", "recall": "R"}[name] + f"@{k}"


def _ms(lat: dict[str, float] | None, key: str) -> str:
    return "-" if lat is None else f"{lat[key]:.1f}"


def format_table(report: dict[str, Any]) -> str:
    """The report as a fixed-width table: two lines per mode (first stage, reranked)."""
    ds, rr = report["dataset"], report["reranker"]
    where = f"run {report['run']}" if report["run"] else f"embedded {report['db']}"
    docs = f", {ds['docs']} docs" if ds["docs"] is not None else ""
    lines = [
        f"rerankd eval: {ds['name']} ({ds['split']}), {ds['queries']} queries{docs}, "
        f"binary relevance at grade >= {ds['relevance_threshold']}",
        f"first stage: {where}; reranker {rr['name']} ({rr['source']}, {rr['architecture']}, "
        f"{rr['backend']}), {report['candidates']} candidates"
        + (f", max_length {report['max_length']}" if report["max_length"] else ""),
        "",
    ]
    metrics = report["metrics"]
    labels = [row["first_stage"] for row in report["modes"].values()]
    width = max([len("first stage"), *map(len, labels)])
    head = f"{'mode':<7} {'first stage':<{width}} {'ranking':<11}"
    head += "".join(f" {_header(m):>9}" for m in metrics) + f" {'mean ms':>9} {'p50 ms':>8}"
    lines += [head, "-" * len(head)]
    for mode, row in report["modes"].items():
        for i, (stage, key, lat) in enumerate(
            (
                ("first stage", "first_stage_metrics", row["latency_ms"]["first_stage"]),
                ("reranked", "reranked_metrics", row["latency_ms"]["rerank"]),
            )
        ):
            left = f"{mode:<7} {row['first_stage']:<{width}}" if i == 0 else " " * (8 + width)
            vals = "".join(f" {row[key][m]:>9.4f}" for m in metrics)
            lines.append(f"{left} {stage:<11}{vals} {_ms(lat, 'mean'):>9} {_ms(lat, 'p50'):>8}")
    lines.append("")
    if report["run"]:
        lines.append("latency per query: the Rerank call alone (the first stage is the run file)")
    else:
        lines.append(
            "latency per query: first stage = query embedding + DB search; reranked = the "
            "Rerank call alone"
        )
    took = f"whole run {report['total_seconds']:.1f} s"
    if "index_reused" in report:
        took = f"index reused from {report['index_reused']}, {took}"
    elif "index_seconds" in report:
        took = f"indexing {report['index_seconds']:.1f} s, {took}"
    lines.append(took)
    for note in report["notes"]:
        lines.append(f"NOTE: {note}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`rerankd eval ...`: print the table, write the JSON report if asked."""
    opts = parse_args(argv)
    try:
        report = run_eval(opts)
    except (FileNotFoundError, ValueError, EvalError) as exc:
        print(f"rerankd eval: error: {exc}", file=sys.stderr)
        return 2
    except RerankdError as exc:  # the sidecar or the DB failed mid-run
        print(f"rerankd eval: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(format_table(report), flush=True)
    if opts.json_path:
        save_report(report, opts.json_path)
    return 0

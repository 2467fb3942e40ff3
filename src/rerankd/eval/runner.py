"""`rerankd eval`: first-stage vs reranked NDCG@10, MRR@10 and Recall@100 on a BEIR data set.

    rerankd eval --dataset ../shared/data/scifact --db qdrant --model bundled:splade-tiny
    rerankd eval --dataset ../shared/data/trec-dl-2019 --run bm25.top100 --json dl19.json
    rerankd eval --dataset ../shared/data/scifact --modes dense --depths 2,4 --plot q.png

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

Reranker configurations: by default the candidates are reranked once, by the whole model.
`--depths 2,4` reranks them again at each depth (the Rerank option `depth`: only the first
k encoder layers run) and `--keep-ratios 0.5` with token pruning (option `keep_ratio`, from
layer 2 on; torch backend, BERT-family models); every depth x ratio is one configuration,
the full model always among them. Each configuration gets its own line: the metrics, its
Rerank latency (mean, p50, p99) and the mean per-query Spearman correlation of its scores
with the full model's over the same candidates. Within a query the configurations run one
after another, starting from a different one each query, so no configuration always runs
first (or last) against warm caches.

`--plot q.png` draws NDCG@10 against rerank latency per configuration (`rerankd.eval.plot`,
needs matplotlib); `--runs-dir DIR` writes every ranking as a TREC run plus each query's raw
scores per configuration as JSONL, to fit a fusion offline (`rerankd.eval.report`);
`--reference-runs DIR` reads another model's such JSONL and adds each configuration's
Spearman with that model's full scores (a distilled student against its teacher).

The bundled rerankers (`bundled:NAME`) have untrained heads: their reranked figures are
expected to be *worse* than the first stage until rerankd ships a trained model. The run
says so rather than leaving a bad number unexplained.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
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
from rerankd.engine.shipped import DEFAULT_RERANKER
from rerankd.errors import RerankdError
from rerankd.eval.beir import (
    BeirDataset,
    load_dataset,
    load_run,
    resolve_run,
    split_dev,
    subset,
)
from rerankd.eval.metrics import (
    DEFAULT_METRICS,
    evaluate,
    paired_difference,
    parse_metric,
    spearman,
    threshold_for,
)
from rerankd.eval.plot import have_matplotlib, plot_quality_latency
from rerankd.eval.report import (
    format_table,
    read_full_scores,
    save_report,
    scores_file,
    write_run_files,
)
from rerankd.types import LongDocs

COLLECTION = "rerankd_eval"
DEFAULT_MODEL = DEFAULT_RERANKER
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
    #: how the sidecar scores a document longer than one window: "max" (every window, the
    #: best counts) or "truncate" (the first window only, as training reads documents);
    #: None = the model's own default (`long_docs` in its rerankd.json, else max)
    long_docs: str | None = None
    backend: str | None = None
    threads: int = 0
    timeout: float = 120.0
    batch_size: int = 32
    progress: bool = True
    metrics: Sequence[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    depths: Sequence[int] = ()
    keep_ratios: Sequence[float] = ()
    plot_path: Path | None = None
    runs_dir: Path | None = None
    #: another model's `--runs-dir` (same dataset and first stage): each configuration's
    #: Spearman with that model's full-depth scores, e.g. a distilled student against its
    #: teacher, on the very candidates the teacher scored
    reference_runs: Path | None = None
    #: also rank by the model's fitted fusion with the first stage, where it ships one
    fusion: bool = True
    #: evaluate only the held-apart dev slice `rerankd train --dev-queries N --seed S` kept
    #: out of the train split (what fusion is fitted on); 0 = every query
    dev_queries: int = 0
    dev_seed: int = 0


#: The name of the reference configuration: the whole model, no token pruning.
FULL = "full"


@dataclass(frozen=True)
class RerankConfig:
    """One way of reranking the candidates: a depth (0 = every layer) and a keep ratio
    (1.0 = no token pruning)."""

    depth: int = 0
    keep_ratio: float = 1.0
    #: ranked by the model's fused score (`fusion="auto"`), read from the same call as the
    #: unfused twin's `model_score`: no extra Rerank call
    fused: bool = False

    @property
    def name(self) -> str:
        base = f"d{self.depth}" if self.depth else FULL
        base = base if self.keep_ratio >= 1.0 else f"{base}-k{self.keep_ratio:g}"
        return f"{base}+fusion" if self.fused else base

    @property
    def is_reference(self) -> bool:
        return self.depth == 0 and self.keep_ratio >= 1.0 and not self.fused

    def options(self) -> dict[str, Any]:
        """The Rerank options that select this configuration."""
        out: dict[str, Any] = {}
        if self.depth:
            out["depth"] = self.depth
        if self.keep_ratio < 1.0:
            out["keep_ratio"] = self.keep_ratio
        return out


def plan_configs(
    depths: Sequence[int],
    keep_ratios: Sequence[float],
    num_layers: int,
    supports_pruning: bool = True,
    reranker: str = "the reranker",
) -> tuple[list[RerankConfig], list[str]]:
    """Every depth x keep ratio asked for, the full model always included: shallowest first,
    the full depth last, less pruning first within a depth. Also the notes on what was
    dropped. A depth equal to the model's layer count is the full model."""
    bad = [d for d in depths if not 1 <= d <= num_layers]
    if bad:
        raise EvalError(
            f"--depths {','.join(map(str, bad))}: {reranker} has {num_layers} layers "
            f"(depths 1..{num_layers})"
        )
    pruned = sorted({r for r in keep_ratios if r < 1.0}, reverse=True)
    if pruned and not supports_pruning:
        raise EvalError(
            f"--keep-ratios: {reranker} does not prune tokens (only BERT-family models on "
            "the torch backend do)"
        )
    levels = sorted({0 if d == num_layers else d for d in depths} | {0}, key=lambda d: d or 1e9)
    configs, notes = [], []
    for depth in levels:
        configs.append(RerankConfig(depth, 1.0))
        for ratio in pruned:
            if (depth or num_layers) < 2:  # layer 1 reads every token: nothing to prune
                notes.append(
                    f"depth {depth or num_layers} with keep ratio {ratio:g} skipped: layer 1 "
                    "reads every token, so a single layer has nothing to prune"
                )
                continue
            configs.append(RerankConfig(depth, ratio))
    return configs, notes


@dataclass
class _ConfigRankings:
    """One configuration's reranked ranking per query, its latencies and correlations."""

    reranked: dict[str, list[str]] = field(default_factory=dict)
    ms: list[float] = field(default_factory=list)
    spearman: list[float] = field(default_factory=list)


@dataclass
class _Rankings:
    """One row's raw material: the first-stage ranking and each configuration's reranked
    one per query, the per-query latencies, and the raw scores (for `--runs-dir`)."""

    configs: dict[str, _ConfigRankings] = field(default_factory=dict)
    first: dict[str, list[str]] = field(default_factory=dict)
    first_ms: list[float] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    empty: int = 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _depth_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated layer counts: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"depths must be >= 1: {text!r}")
    return values


def _ratio_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated ratios: {text!r}") from None
    if not values or any(not 0.0 < v <= 1.0 for v in values):  # NaN fails this too
        raise argparse.ArgumentTypeError(f"keep ratios must be in (0, 1]: {text!r}")
    return values


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
    p.add_argument(
        "--long-docs",
        choices=[v.value for v in LongDocs],
        help="score a document longer than one window by its best window (max) or by its "
        "first (truncate, as training reads it); default: the model's own (`long_docs` in "
        "its rerankd.json, else max)",
    )
    p.add_argument("--backend", help="backend for a spawned sidecar (its --backend)")
    p.add_argument(
        "--threads", type=int, default=0, help="intra-op threads of a spawned sidecar (0 = its own)"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per sidecar call")
    p.add_argument("--batch-size", type=_positive, default=32, help="documents per Embed call")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument(
        "--depths",
        type=_depth_list,
        default=[],
        help="also rerank at these depths (comma-separated layer counts, e.g. 2,4,6), one "
        "line each with its Spearman correlation to the full model's scores "
        "(default: the full model only)",
    )
    p.add_argument(
        "--keep-ratios",
        type=_ratio_list,
        default=[],
        help="also rerank with token pruning at these keep ratios (comma-separated, in (0, 1], "
        "from layer 2 on; torch backend only), at every depth",
    )
    p.add_argument(
        "--plot",
        dest="plot_path",
        type=Path,
        help="write a PNG of NDCG@10 against rerank latency p50 per configuration "
        "(needs matplotlib)",
    )
    p.add_argument(
        "--dev-queries",
        type=int,
        default=0,
        help="only the N train queries `rerankd train --dev-queries N` held apart, as "
        "picked by --dev-seed (needs --split train; what `rerankd fit-fusion` is fitted on)",
    )
    p.add_argument(
        "--dev-seed",
        type=int,
        default=0,
        help="the training run's --dev-seed (its --seed unless given)",
    )
    p.add_argument(
        "--no-fusion",
        action="store_true",
        help="skip the '+fusion' rows (by default a model that ships fitted fusion weights "
        "is also ranked by its fusion with the first-stage order, from the same calls)",
    )
    p.add_argument(
        "--runs-dir",
        type=Path,
        help="write every ranking as a TREC run file (MODE.CONFIG.trec) and each query's "
        "candidates with first-stage and raw reranker scores per configuration "
        "(MODE.scores.jsonl)",
    )
    p.add_argument(
        "--reference-runs",
        type=Path,
        help="another model's --runs-dir on the same dataset and first stage: also report "
        "each configuration's Spearman with that model's full scores (a student against "
        "its teacher)",
    )
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
    if ns.dev_queries < 0 or (ns.dev_queries and ns.split != "train"):
        p.error("--dev-queries N (N >= 1) selects held-apart train queries: add --split train")
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
        long_docs=ns.long_docs,
        backend=ns.backend,
        threads=ns.threads,
        timeout=ns.timeout,
        batch_size=ns.batch_size,
        progress=not ns.no_progress,
        depths=ns.depths,
        keep_ratios=ns.keep_ratios,
        plot_path=ns.plot_path,
        runs_dir=ns.runs_dir,
        reference_runs=ns.reference_runs,
        fusion=not ns.no_fusion,
        dev_queries=ns.dev_queries,
        dev_seed=ns.dev_seed,
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


def _rerank_query(
    opts: EvalOptions,
    client: RerankClient,
    reranker: str,
    configs: Sequence[RerankConfig],
    out: _Rankings,
    turn: int,
    qid: str,
    text: str,
    candidates: Sequence[tuple[str, str, float]],
) -> None:
    """Rerank one query's candidates (id, text, first-stage score; first-stage order) once
    per configuration; record each ranking, latency, raw scores and Spearman correlation.

    The configurations start at a different one each `turn`, so none always runs first."""
    ids = [c[0] for c in candidates]
    out.first[qid] = ids
    record: dict[str, Any] = {
        "qid": qid,
        "ids": ids,
        "first_stage_scores": [c[2] for c in candidates],
        "scores": {},
    }
    out.records.append(record)
    if not ids:
        out.empty += 1  # no candidates at all: every ranking is empty and scores 0
        for cfg in configs:
            out.configs[cfg.name].reranked[qid] = []
            record["scores"][cfg.name] = []
        return
    docs = [(c[0], c[1]) for c in candidates]
    called = [cfg for cfg in configs if not cfg.fused]
    twins = {cfg.name.removesuffix("+fusion") for cfg in configs if cfg.fused}
    k = turn % len(called)
    for cfg in [*called[k:], *called[:k]]:
        # fail loudly: a failed rerank must stop the evaluation, not be reported as a figure
        fused = cfg.name in twins
        t0 = time.perf_counter()
        resp = client.rerank(
            text,
            docs,
            model=reranker,
            max_length=opts.max_length,
            timeout=opts.timeout,
            **({"long_docs": opts.long_docs} if opts.long_docs else {}),
            **cfg.options(),
            **({"fusion": "auto"} if fused else {}),
        )
        ms = (time.perf_counter() - t0) * 1e3
        scores = [math.nan] * len(ids)
        for r in resp.results:
            scores[r.index] = r.score if r.model_score is None else r.model_score
        got = out.configs[cfg.name]
        got.ms.append(ms)
        got.reranked[qid] = [ids[i] for i in _order(scores)]
        record["scores"][cfg.name] = scores
        if fused:
            twin = out.configs[f"{cfg.name}+fusion"]
            twin.ms.append(ms)
            twin.reranked[qid] = [r.id for r in resp.results]
            fused_scores = [math.nan] * len(ids)
            for r in resp.results:
                fused_scores[r.index] = r.score
            record["scores"][f"{cfg.name}+fusion"] = fused_scores
    reference = record["scores"][FULL]
    for cfg in configs:
        if not cfg.is_reference and not cfg.fused:
            rho = spearman(record["scores"][cfg.name], reference)
            if rho is not None:
                out.configs[cfg.name].spearman.append(rho)
    # the record's scores in configuration order, whatever order they ran in
    record["scores"] = {cfg.name: record["scores"][cfg.name] for cfg in configs}


def _order(scores: Sequence[float]) -> list[int]:
    """Indices best first; ties keep the earlier (first-stage) position."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def _new_rankings(configs: Sequence[RerankConfig]) -> _Rankings:
    return _Rankings(configs={cfg.name: _ConfigRankings() for cfg in configs})


def _db_rankings(
    opts: EvalOptions,
    data: BeirDataset,
    client: RerankClient,
    connector: Connector,
    mode: str,
    reranker: str,
    configs: Sequence[RerankConfig],
) -> _Rankings:
    from rerankd.search import hybrid_search

    out = _new_rankings(configs)
    bar = tqdm(data.queries.items(), desc=f"{mode:>6}", unit="q", disable=not opts.progress)
    for turn, (qid, text) in enumerate(bar):
        # The first stage alone (rerank=False): every candidate, with its text, in
        # first-stage order; the configurations then rerank the same candidate list.
        res = hybrid_search(
            COLLECTION,
            text,
            connector=connector,
            client=client,
            mode=mode,
            top_k=opts.candidates,
            candidates=opts.candidates,
            rerank=False,
            timeout=opts.timeout,
            fail_open=False,
        )
        hits = sorted(res.hits, key=lambda h: h.first_stage_rank)
        out.first_ms.append(res.timings.embed_ms + res.timings.first_stage_ms)
        cands = [(h.id, h.text, h.first_stage_score) for h in hits]
        _rerank_query(opts, client, reranker, configs, out, turn, qid, text, cands)
    return out


def _run_rankings(
    opts: EvalOptions,
    data: BeirDataset,
    full_corpus: dict[str, str],
    client: RerankClient,
    run: dict[str, list[tuple[str, float]]],
    reranker: str,
    configs: Sequence[RerankConfig] = (RerankConfig(),),
) -> tuple[_Rankings, int]:
    """Rerank the run's top `candidates` per query; also count candidates without text."""
    out, missing = _new_rankings(configs), 0
    bar = tqdm(data.queries.items(), desc="   run", unit="q", disable=not opts.progress)
    for turn, (qid, text) in enumerate(bar):
        top = run.get(qid, [])[: opts.candidates]
        missing += sum(d not in full_corpus for d, _ in top)
        cands = [(d, full_corpus.get(d, ""), score) for d, score in top]
        _rerank_query(opts, client, reranker, configs, out, turn, qid, text, cands)
    return out, missing


# -- figures ---------------------------------------------------------------------------------


def _latency(values: list[float]) -> dict[str, float] | None:
    """Mean, median and 99th percentile (linear between the two nearest values)."""
    if not values:
        return None
    if len(values) > 1:
        p99 = statistics.quantiles(values, n=100, method="inclusive")[98]
    else:
        p99 = values[0]
    return {"mean": statistics.fmean(values), "p50": statistics.median(values), "p99": p99}


def _row(
    label: str,
    r: _Rankings,
    data: BeirDataset,
    metrics: Sequence[str],
    threshold: int,
    configs: Sequence[RerankConfig] = (RerankConfig(),),
    num_layers: int = 0,
) -> dict[str, Any]:
    """One row of the report: the first stage and, under `configs`, each configuration.
    `reranked_metrics`, `latency_ms.rerank` and `per_query.reranked` are the full model's."""
    first = evaluate(r.first, data.qrels, metrics, relevance_threshold=threshold)
    rows = []
    for cfg in configs:
        got = r.configs[cfg.name]
        ev = evaluate(got.reranked, data.qrels, metrics, relevance_threshold=threshold)
        rows.append(
            {
                "name": cfg.name,
                "depth": cfg.depth or num_layers or None,
                "keep_ratio": cfg.keep_ratio,
                "metrics": ev.means,
                "latency_ms": _latency(got.ms),
                # None for the full model itself (the reference), or when no query had two
                # candidates with distinct scores
                "spearman_vs_full": statistics.fmean(got.spearman) if got.spearman else None,
                "spearman_queries": len(got.spearman),
                # each metric's paired difference from the first stage, with its error
                "vs_first_stage": {
                    m: paired_difference(first.per_query, ev.per_query, m) for m in metrics
                },
                "per_query": ev.per_query,
            }
        )
    full = next(c for c in rows if c["name"] == FULL)
    return {
        "first_stage": label,
        "queries": first.num_queries,
        "queries_without_candidates": r.empty,
        "first_stage_metrics": first.means,
        "reranked_metrics": full["metrics"],
        "latency_ms": {"first_stage": _latency(r.first_ms), "rerank": full["latency_ms"]},
        # Per query, so a surprising mean can be traced to the queries behind it.
        "per_query": {"first_stage": first.per_query, "reranked": full["per_query"]},
        "configs": rows,
    }


def _finish_row(
    opts: EvalOptions,
    report: dict[str, Any],
    key: str,
    row: dict[str, Any],
    r: _Rankings,
    configs: Sequence[RerankConfig],
) -> None:
    """Store a finished row; write its run files and the JSON so far, where asked."""
    if opts.reference_runs is not None:
        _compare_reference(row, r, scores_file(opts.reference_runs, key), configs)
        report["reference_runs"] = str(opts.reference_runs)
    report["modes"][key] = row
    if opts.runs_dir is not None:
        files = write_run_files(opts.runs_dir, key, r.records, [c.name for c in configs])
        row["run_files"] = files
        report["runs_dir"] = str(opts.runs_dir)
    if opts.json_path:
        save_report(report, opts.json_path)


def _compare_reference(
    row: dict[str, Any], r: _Rankings, path: Path, configs: Sequence[RerankConfig]
) -> None:
    """Each configuration's mean per-query Spearman with the reference model's full scores.

    Only queries whose every candidate the reference scored count (their number is in
    `spearman_reference_queries`): a different first stage shows as a low count, not as a
    silently smaller sample."""
    reference = read_full_scores(path)
    by_name = {c["name"]: c for c in row["configs"]}
    for cfg in configs:
        if cfg.fused:
            continue
        rhos = []
        for rec in r.records:
            ref = reference.get(rec["qid"])
            if ref is None or any(i not in ref for i in rec["ids"]):
                continue
            rho = spearman(rec["scores"][cfg.name], [ref[i] for i in rec["ids"]])
            if rho is not None:
                rhos.append(rho)
        by_name[cfg.name]["spearman_vs_reference"] = statistics.fmean(rhos) if rhos else None
        by_name[cfg.name]["spearman_reference_queries"] = len(rhos)
    row["reference_scores"] = str(path)


def _notes(opts: EvalOptions, reranker: ModelInfo, metrics: Sequence[str]) -> list[str]:
    notes: list[str] = []
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
    if opts.dev_queries:
        # the trainer's split: its subset (threshold 1, no caps), then its seeded draw
        _, dev = split_dev(list(subset(full).queries), opts.dev_queries, opts.dev_seed)
        full = dataclasses.replace(
            full,
            queries={q: full.queries[q] for q in dev},
            qrels={q: full.qrels[q] for q in dev},
        )
    data = subset(
        full,
        max_queries=opts.max_queries,
        max_docs=opts.max_docs,
        relevance_threshold=threshold,
    )
    if not data.queries:
        raise EvalError(f"{full.path} has no judged queries in split {opts.split!r}")
    run = load_run(resolve_run(full.path, opts.run)) if opts.run else None
    if opts.reference_runs is not None:
        for mode in ["run"] if run is not None else opts.modes:
            if not scores_file(opts.reference_runs, mode).is_file():
                raise EvalError(
                    f"--reference-runs {opts.reference_runs} has no "
                    f"{scores_file(opts.reference_runs, mode).name}: pass the --runs-dir of the "
                    "reference model's eval on the same dataset and first stage"
                )
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
        "long_docs": opts.long_docs,
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
        # what the sidecar applied: the flag, else the model's own default
        report["long_docs"] = opts.long_docs or reranker.default_long_docs or None
        report["encoders"] = {
            kind: None if m is None else {"name": m.name, "source": m.source}
            for kind, m in (("dense", dense), ("sparse", sparse))
        }
        report["notes"] = _notes(opts, reranker, opts.metrics)
        configs, dropped = plan_configs(
            opts.depths,
            opts.keep_ratios,
            reranker.num_layers,
            reranker.supports_token_pruning,
            f"reranker {reranker.name}",
        )
        report["notes"] += dropped
        if opts.fusion and reranker.supports_fusion:
            configs += [dataclasses.replace(c, fused=True) for c in configs]
        report["configs"] = [
            {
                "name": c.name,
                "depth": c.depth or reranker.num_layers,
                "keep_ratio": c.keep_ratio,
                "options": c.options(),
            }
            for c in configs
        ]
        if run is not None:
            name = Path(opts.run or "").name.removesuffix(".trec")
            r, missing = _run_rankings(opts, data, full.corpus, client, run, reranker.name, configs)
            label = f"TREC run {name} (top {opts.candidates})"
            row = _row(label, r, data, opts.metrics, threshold, configs, reranker.num_layers)
            row["candidates_without_text"] = missing
            _finish_row(opts, report, "run", row, r, configs)
        else:
            _db_rows(opts, data, client, reranker, dense, sparse, threshold, report, configs)
    report["complete"] = True
    report["total_seconds"] = round(time.perf_counter() - t_start, 2)
    return report


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
    reranker: ModelInfo,
    dense: ModelInfo | None,
    sparse: ModelInfo | None,
    threshold: int,
    report: dict[str, Any],
    configs: Sequence[RerankConfig] = (RerankConfig(),),
) -> None:
    """Index (or reuse) the corpus, then fill `report["modes"]` one mode at a time."""
    from rerankd.indexing import SourceDocument, index_documents

    assert opts.db is not None
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
                r = _db_rankings(opts, data, client, connector, mode, reranker.name, configs)
                row = _row(label, r, data, opts.metrics, threshold, configs, reranker.num_layers)
                _finish_row(opts, report, mode, row, r, configs)
        finally:
            _close_connector(connector)


# -- command ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`rerankd eval ...`: print the table; write the JSON report, the plot and the run files
    if asked."""
    opts = parse_args(argv)
    if opts.plot_path is not None and not have_matplotlib():
        # said before the evaluation, not after an hour of it
        print(
            "rerankd eval: error: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr
        )
        return 2
    try:
        report = run_eval(opts)
    except (FileNotFoundError, ValueError, EvalError) as exc:
        print(f"rerankd eval: error: {exc}", file=sys.stderr)
        return 2
    except RerankdError as exc:  # the sidecar or the DB failed mid-run
        print(f"rerankd eval: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if opts.json_path:
        save_report(report, opts.json_path)  # before plotting: the figures are safe first
    code = 0
    if opts.plot_path is not None:
        try:
            report["plot"] = str(plot_quality_latency(report, opts.plot_path))
        except (OSError, ValueError, RuntimeError) as exc:
            print(f"rerankd eval: the plot failed: {exc}", file=sys.stderr)
            code = 1
    print(format_table(report), flush=True)
    if opts.json_path and "plot" in report:
        save_report(report, opts.json_path)
    return code

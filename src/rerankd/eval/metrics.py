"""Ranking metrics: NDCG@k, MRR@k and Recall@k, computed the way trec_eval/pytrec_eval do.

Figures from `rerankd eval` are meant to be compared with published BEIR and TREC numbers,
so each formula follows trec_eval (which pytrec_eval and BEIR wrap) rather than a variant:

- **NDCG@k** uses graded gains: gain = the judged grade (grades <= 0 and unjudged
  documents give 0), discount log2(rank + 1) with rank from 1, so
  DCG@k = Σ_{r<=k} grade_r / log2(r + 1). The ideal DCG sorts *all* judged grades of the
  query (not only the retrieved ones) in decreasing order. NDCG ignores
  `relevance_threshold`: TREC DL scores grade 1 ("related") as gain 1.
- **MRR@k** is 1 / rank of the first document with grade >= `relevance_threshold` in the
  top k, 0 when none is there.
- **Recall@k** is |{grade >= threshold} ∩ top k| / |{grade >= threshold} in the qrels|; the
  denominator comes from the judgments, not from what the corpus or the run holds.

`relevance_threshold` is 1 by default (binary BEIR qrels, where every row is relevant) and 2
for TREC DL, whose binary measures count a passage as relevant at grade 2 or above (the
`-l 2` of the official evaluation); `threshold_for` picks it from the data set's name.

Which queries are averaged (the convention, stated once):

- A query that has no judgments at all is skipped, as pytrec_eval and BEIR skip it.
- A query whose judgments hold no document with grade >= threshold is skipped too, for
  every metric: its recall and reciprocal rank are undefined (0/0), and averaging NDCG over
  one set of queries and MRR over another would make the columns incomparable. trec_eval
  would score such a query 0 instead; on the shipped collections (SciFact, TREC DL 2019,
  Cranfield, CISI) every judged query has a relevant document, so the two agree exactly.
- A query missing from the run is not scored (pytrec_eval does the same); pass an empty
  ranking to count it as 0. `rerankd eval` always passes one ranking per kept query, so a
  query whose first stage found nothing counts as 0 rather than vanishing.

Rankings are taken in the order given (best first): a reranked list *is* its order.
`rank_by_score` turns scored pairs into such a list with trec_eval's tie-break (score
descending, then document id descending) for run files, where only scores are authoritative.
A document id repeated in a ranking counts once, at its first position.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

#: query id -> document id -> graded relevance (as in a qrels file).
Qrels = Mapping[str, Mapping[str, int]]
#: query id -> document ids, best first.
Run = Mapping[str, Sequence[str]]

#: The metrics `rerankd eval` reports.
DEFAULT_METRICS: tuple[str, ...] = ("ndcg@10", "mrr@10", "recall@100")
METRIC_NAMES: tuple[str, ...] = ("ndcg", "mrr", "recall")
_METRIC = re.compile(r"^(ndcg|mrr|recall)@([1-9][0-9]*)$")


def parse_metric(spec: str) -> tuple[str, int]:
    """`"ndcg@10"` -> `("ndcg", 10)`; a name the module does not compute is an error now,
    not a KeyError after minutes of retrieval."""
    m = _METRIC.match(spec.strip().lower())
    if not m:
        raise ValueError(f"unknown metric {spec!r}; use one of {METRIC_NAMES} as NAME@K")
    return m.group(1), int(m.group(2))


def threshold_for(dataset: str) -> int:
    """The binary relevance threshold a data set's own evaluation uses: 2 for TREC DL
    (`trec-dl*`, grades 0-3, relevant at >= 2), else 1."""
    return 2 if dataset.lower().startswith("trec-dl") else 1


def _dedup(ranking: Iterable[str], k: int) -> list[str]:
    """The first k distinct ids: a duplicate must not earn gain twice."""
    seen: set[str] = set()
    out: list[str] = []
    for doc in ranking:
        if doc not in seen:
            seen.add(doc)
            out.append(doc)
            if len(out) == k:
                break
    return out


def dcg(gains: Sequence[float]) -> float:
    """Σ gain_r / log2(r + 1), rank r from 1 (trec_eval's discount)."""
    return sum(g / math.log2(r + 1) for r, g in enumerate(gains, start=1) if g > 0)


def ndcg_at_k(ranking: Sequence[str], judgments: Mapping[str, int], k: int) -> float:
    """NDCG@k with graded gains; the ideal ranking is built from all judged documents."""
    top = _dedup(ranking, k)
    ideal = dcg(sorted((g for g in judgments.values() if g > 0), reverse=True)[:k])
    if ideal <= 0:
        return 0.0
    return dcg([max(judgments.get(d, 0), 0) for d in top]) / ideal


def mrr_at_k(
    ranking: Sequence[str], judgments: Mapping[str, int], k: int, relevance_threshold: int = 1
) -> float:
    """1 / rank of the first document with grade >= threshold within the top k, else 0."""
    for rank, doc in enumerate(_dedup(ranking, k), start=1):
        if judgments.get(doc, 0) >= relevance_threshold:
            return 1.0 / rank
    return 0.0


def recall_at_k(
    ranking: Sequence[str], judgments: Mapping[str, int], k: int, relevance_threshold: int = 1
) -> float:
    """Share of the judged relevant documents (grade >= threshold) found in the top k."""
    relevant = {d for d, g in judgments.items() if g >= relevance_threshold}
    if not relevant:
        return 0.0
    return len(relevant.intersection(_dedup(ranking, k))) / len(relevant)


def has_relevant(judgments: Mapping[str, int] | None, relevance_threshold: int = 1) -> bool:
    """Whether a query counts in the averages (see the module docstring)."""
    return bool(judgments) and any(g >= relevance_threshold for g in judgments.values())


def metric_value(
    spec: str, ranking: Sequence[str], judgments: Mapping[str, int], relevance_threshold: int = 1
) -> float:
    """One metric, by name (`"ndcg@10"`), for one query."""
    name, k = parse_metric(spec)
    if name == "ndcg":
        return ndcg_at_k(ranking, judgments, k)
    if name == "mrr":
        return mrr_at_k(ranking, judgments, k, relevance_threshold)
    return recall_at_k(ranking, judgments, k, relevance_threshold)


@dataclass
class Evaluation:
    """Means over the evaluated queries, the per-query values behind them, and the count of
    run queries left out (no judged relevant document), so a skip is visible, not silent."""

    means: dict[str, float]
    per_query: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def num_queries(self) -> int:
        return len(self.per_query)


def evaluate(
    run: Run,
    qrels: Qrels,
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    relevance_threshold: int = 1,
) -> Evaluation:
    """Score every query of `run` that has a judged relevant document; average each metric.

    Means are 0.0 when no query could be evaluated (with `num_queries == 0` to tell).
    """
    for spec in metrics:
        parse_metric(spec)
    per_query: dict[str, dict[str, float]] = {}
    skipped: list[str] = []
    for qid, ranking in run.items():
        judgments = qrels.get(qid)
        if judgments is None or not has_relevant(judgments, relevance_threshold):
            skipped.append(qid)
            continue
        per_query[qid] = {
            spec: metric_value(spec, ranking, judgments, relevance_threshold) for spec in metrics
        }
    n = len(per_query)
    means = {spec: (sum(v[spec] for v in per_query.values()) / n if n else 0.0) for spec in metrics}
    return Evaluation(means, per_query, skipped)


def paired_difference(
    base: Mapping[str, Mapping[str, float]],
    other: Mapping[str, Mapping[str, float]],
    metric: str,
) -> dict[str, float] | None:
    """`other - base` of one metric over the queries both evaluated: the mean per-query
    difference, its standard error (sample standard deviation / sqrt(n); 0 for one query)
    and the query count; None when no query is shared.

    Why paired: a reranker and its first stage are scored on the same queries, and most of
    the spread of a mean is between queries, not between the two rankings; the paired
    error says whether a difference (e.g. "fused - first stage") is larger than the noise
    of that many queries (43 for TREC DL 2019).
    """
    qids = sorted(set(base) & set(other))
    if not qids:
        return None
    diffs = [other[q][metric] - base[q][metric] for q in qids]
    n = len(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else 0.0
    return {"mean": statistics.fmean(diffs), "se": se, "queries": n}


def rank_by_score(scored: Iterable[tuple[str, float]]) -> list[str]:
    """Document ids best first, ordered as trec_eval orders a run: by score descending, ties
    by document id descending (trec_eval ignores the rank column). A repeated id keeps its
    best score."""
    best: dict[str, float] = {}
    for doc, score in scored:
        if doc not in best or score > best[doc]:
            best[doc] = score
    return [d for d, _ in sorted(best.items(), key=lambda ds: (ds[1], ds[0]), reverse=True)]


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation of two score lists over the same items (ties get their
    average rank); None where it is undefined: fewer than two items, or one side constant."""
    if len(a) != len(b):
        raise ValueError(f"spearman: {len(a)} scores against {len(b)}")
    if len(a) < 2:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return None
    return max(-1.0, min(1.0, cov / math.sqrt(va * vb)))

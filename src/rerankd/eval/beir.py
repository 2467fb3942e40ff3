"""Read a BEIR-layout data set folder and TREC run files, without depending on `beir`.

    <dataset>/corpus.jsonl     {"_id", "title", "text"}   one JSON object per line
    <dataset>/queries.jsonl    {"_id", "text"}
    <dataset>/qrels/test.tsv   query-id<TAB>corpus-id<TAB>score, with a header line
    <dataset>/runs/*.trec      optional first-stage runs: qid Q0 docid rank score tag

A document's text is `title + " " + text` when the title is non-empty, else `text`: that is
what BEIR's own dense and cross-encoder evaluations feed the model, so figures stay
comparable. Ids are kept as strings (SciFact's ids look numeric; TREC's need not be).

`subset` makes the small, still-meaningful slices that tests and quick runs need: the first
N evaluable queries, and a corpus that keeps every judged document of those queries (so
recall and NDCG keep their denominators' documents findable) plus the first other documents
in corpus order up to a budget.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from rerankd.eval.metrics import has_relevant, rank_by_score


@dataclass(frozen=True)
class BeirDataset:
    """One split of a data set, in memory. Dict order is file order (used by `subset`)."""

    name: str
    path: Path
    split: str
    #: document id -> text to index and rerank (title + " " + text)
    corpus: dict[str, str]
    #: query id -> query text (every query in queries.jsonl)
    queries: dict[str, str]
    #: query id -> document id -> grade, for this split
    qrels: dict[str, dict[str, int]]

    def evaluable_queries(self, relevance_threshold: int = 1) -> list[str]:
        """Query ids with text and at least one judged relevant document, in queries.jsonl
        order: the queries whose scores enter the averages (see `rerankd.eval.metrics`)."""
        return [q for q in self.queries if has_relevant(self.qrels.get(q), relevance_threshold)]


def _jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON: {exc}") from None


def document_text(title: str | None, text: str | None) -> str:
    """BEIR's document text: `title + " " + text` when the title is non-empty."""
    title = (title or "").strip()
    text = text or ""
    return f"{title} {text}" if title else text


def load_corpus(path: Path) -> dict[str, str]:
    """corpus.jsonl -> {id: title + " " + text}."""
    return {str(d["_id"]): document_text(d.get("title"), d.get("text")) for d in _jsonl(path)}


def load_queries(path: Path) -> dict[str, str]:
    """queries.jsonl -> {id: text} (BEIR's "metadata" is ignored)."""
    return {str(q["_id"]): q.get("text") or "" for q in _jsonl(path)}


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    """A qrels file -> {query id: {doc id: grade}}.

    BEIR's TSV (`query-id corpus-id score`, header line) and TREC's four columns
    (`qid 0 docid grade`) are both read; a first line whose grade is not a number is a
    header. Rows graded 0 are kept: they are judged non-relevant, and NDCG's ideal and the
    `--max-docs` subset both need to know a document was judged. A repeated pair keeps its
    last grade, as BEIR's loader does.
    """
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) == 3:
                qid, did, grade = parts
            elif len(parts) == 4:
                qid, _, did, grade = parts
            else:
                raise ValueError(f"{path}:{lineno}: expected 3 or 4 columns, got {len(parts)}")
            try:
                value = int(float(grade))
            except ValueError:
                if lineno == 1:
                    continue  # the header
                raise ValueError(f"{path}:{lineno}: grade {grade!r} is not a number") from None
            qrels.setdefault(qid, {})[did] = value
    return qrels


def load_dataset(folder: str | Path, split: str = "test") -> BeirDataset:
    """Read `folder` (BEIR layout); the qrels are `qrels/{split}.tsv`."""
    root = Path(folder)
    for rel in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (root / rel).is_file():
            raise FileNotFoundError(f"{root} is not a BEIR data set folder: {rel} is missing")
    return BeirDataset(
        name=root.resolve().name,
        path=root,
        split=split,
        corpus=load_corpus(root / "corpus.jsonl"),
        queries=load_queries(root / "queries.jsonl"),
        qrels=load_qrels(root / "qrels" / f"{split}.tsv"),
    )


def load_run(path: str | Path) -> dict[str, list[tuple[str, float]]]:
    """A TREC run file -> {query id: [(doc id, score)] best first}.

    Order is trec_eval's (score descending, ties by doc id descending), not the rank column:
    that is how the run's published figures were computed.
    """
    scored: dict[str, list[tuple[str, float]]] = {}
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 5:
                raise ValueError(f"{path}:{lineno}: not a TREC run line: {line.strip()!r}")
            qid, did = parts[0], parts[2]
            try:
                score = float(parts[4])
            except ValueError:
                raise ValueError(f"{path}:{lineno}: score {parts[4]!r} is not a number") from None
            scored.setdefault(qid, []).append((did, score))
    out: dict[str, list[tuple[str, float]]] = {}
    for qid, pairs in scored.items():
        best: dict[str, float] = {}
        for did, score in pairs:  # a repeated document keeps its best score
            best[did] = max(score, best.get(did, score))
        out[qid] = [(d, best[d]) for d in rank_by_score(best.items())]
    return out


def available_runs(folder: str | Path) -> dict[str, Path]:
    """The run files shipped with a data set: {"bm25.top100": runs/bm25.top100.trec, ...}."""
    runs = Path(folder) / "runs"
    return {p.name.removesuffix(".trec"): p for p in sorted(runs.glob("*.trec"))}


def resolve_run(folder: str | Path, run: str | Path) -> Path:
    """`run` as a path, or as the name of one of the data set's `runs/*.trec` files."""
    path = Path(run)
    if path.is_file():
        return path
    shipped = available_runs(folder)
    name = str(run).removesuffix(".trec")
    if name in shipped:
        return shipped[name]
    known = ", ".join(shipped) or "none"
    raise FileNotFoundError(f"run {str(run)!r} is neither a file nor a run of {folder} ({known})")


def split_dev(qids: Sequence[str], dev: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, dev): `dev` queries drawn with the seed, both kept in their original order.

    `dev` may not take every query: a run with nothing to train on is a mistake.
    """
    if dev < 0:
        raise ValueError(f"dev queries must be >= 0, got {dev}")
    if dev and dev >= len(qids):
        raise ValueError(f"{dev} dev queries leave none of the {len(qids)} to train on")
    chosen = set(random.Random(f"{seed}:dev").sample(list(qids), dev)) if dev else set()
    return [q for q in qids if q not in chosen], [q for q in qids if q in chosen]


def subset(
    dataset: BeirDataset,
    *,
    max_queries: int | None = None,
    max_docs: int | None = None,
    relevance_threshold: int = 1,
) -> BeirDataset:
    """A slice that keeps metrics meaningful.

    Queries: the first `max_queries` evaluable ones (text + a judged relevant document), in
    queries.jsonl order; unjudged queries are dropped even without a limit, since they can
    not be scored. Corpus (with `max_docs`): every judged document of the kept queries that
    the corpus holds, whatever its grade (judged non-relevant documents are the hard
    negatives), then the first other documents in corpus order until the corpus has
    `max_docs` documents. If the judged documents alone exceed `max_docs`, all are kept.
    """
    if max_queries is not None and max_queries < 1:
        raise ValueError(f"max_queries must be >= 1, got {max_queries}")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be >= 1, got {max_docs}")
    qids = dataset.evaluable_queries(relevance_threshold)
    if max_queries is not None:
        qids = qids[:max_queries]
    queries = {q: dataset.queries[q] for q in qids}
    qrels = {q: dict(dataset.qrels[q]) for q in qids}
    corpus = dataset.corpus
    if max_docs is not None:
        judged = {d for j in qrels.values() for d in j if d in dataset.corpus}
        room = max(0, max_docs - len(judged))
        fill: set[str] = set()
        for d in dataset.corpus:
            if len(fill) >= room:
                break
            if d not in judged:
                fill.add(d)
        corpus = {d: t for d, t in dataset.corpus.items() if d in judged or d in fill}
    return replace(dataset, corpus=corpus, queries=queries, qrels=qrels)

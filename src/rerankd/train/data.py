"""Training data for cross-encoders: BEIR train splits, mined hard negatives, groups.

A training example is a *group*: one query, one judged-relevant document and `n` hard
negatives, the documents a first stage ranks high that are not judged relevant. Groups are
what the listwise loss compares, and hard negatives are what teach a reranker anything a
first stage does not already know (random negatives are too easy).

Negatives come from a first stage over the training corpus: our own BM25 (`bm25`),
rerankd's bundled encoders (`dense`, `sparse`, optionally `dense:SOURCE`), or a given
TREC run (`run:PATH`). They are re-sampled every epoch from the top `depth` candidates with
a generator seeded by (seed, epoch, query, positive), so a run is reproducible and a resumed
epoch sees exactly the groups the interrupted one would have.

Evaluation data is refused, not merely discouraged: a split named `test` and any data set
under a `trec-dl*` path are evaluation-only collections (see ../shared/data/README.md), and
training on them would make every reported figure meaningless. The dev metric the trainer
logs comes from a slice of *train* queries held apart from training (`split_dev`).
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rerankd.eval.beir import BeirDataset, load_dataset, load_run, split_dev, subset

#: Splits that hold evaluation judgments; `rerankd train` refuses them.
EVALUATION_SPLITS = frozenset({"test"})
#: Path components that mark an evaluation-only collection (TREC DL 2019/2020, ...).
EVALUATION_DATASET_MARKERS = ("trec-dl",)

MINERS = ("bm25", "dense", "sparse", "run")


class EvaluationDataError(ValueError):
    """Training was asked to read evaluation-only data (a test split, a TREC DL set)."""


def check_trainable(path: str | Path, split: str | None = None) -> None:
    """Refuse evaluation-only data before anything is read.

    `path` is a data set folder or any file training would read (a run, teacher scores);
    `split` the qrels split. The check is on names because that is where the convention
    lives: the shared collections put evaluation judgments in `qrels/test.tsv`, and TREC DL
    has no training split at all.
    """
    if split is not None and split.strip().lower() in EVALUATION_SPLITS:
        raise EvaluationDataError(
            f"split {split!r} is an evaluation split: training on it would invalidate every "
            "figure measured on it; train on `train` (the dev metric uses held-apart train "
            "queries)"
        )
    parts = [p.lower() for p in Path(path).expanduser().resolve().parts]
    parts += [p.lower() for p in Path(path).parts]
    for marker in EVALUATION_DATASET_MARKERS:
        if any(marker in p for p in parts):
            raise EvaluationDataError(
                f"{path} is an evaluation-only collection ({marker!r}): it has no training "
                "split, and training on it would invalidate every figure measured on it"
            )


def _jsonl(path: Path) -> Iterable[dict]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


# -- BM25 --------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\w+")
# A short English stop list: BM25 on SciFact gains ~1 point without the commonest words, and a
# fixed list keeps runs reproducible without a tokenizer dependency.
_STOPWORDS = frozenset(
    ("a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "from", "has", "have",
     "in", "is", "it", "its", "of", "on", "or", "that", "the", "their", "there", "these",
     "this", "to", "was", "were", "which", "with")
)  # fmt: skip


def bm25_tokens(text: str) -> list[str]:
    """Lowercased word tokens without stop words: the analyser of our BM25."""
    return [t for t in _TOKEN.findall(text.lower()) if t not in _STOPWORDS]


class BM25:
    """Okapi BM25 over an in-memory corpus, with an inverted index in numpy.

    Our own rather than `rank_bm25` because that scores every document in Python per query
    term (minutes over a SciFact-sized corpus for all train queries); this one touches only
    the postings of the query terms. k1 = 0.9, b = 0.4 are Pyserini's defaults, with which
    the shared data README reports SciFact NDCG@10 0.662; idf is Lucene's
    log(1 + (N - df + 0.5) / (df + 0.5)), never negative.
    """

    def __init__(self, corpus: Mapping[str, str], k1: float = 0.9, b: float = 0.4) -> None:
        self.doc_ids = list(corpus)
        n = len(self.doc_ids)
        postings: dict[str, tuple[list[int], list[int]]] = {}
        lengths = np.zeros(n, dtype=np.float64)
        for i, did in enumerate(self.doc_ids):
            counts = Counter(bm25_tokens(corpus[did]))
            lengths[i] = sum(counts.values())
            for term, tf in counts.items():
                docs, tfs = postings.setdefault(term, ([], []))
                docs.append(i)
                tfs.append(tf)
        avgdl = float(lengths.mean()) if n else 0.0
        norm = k1 * (1.0 - b + b * lengths / max(avgdl, 1e-9))
        self.index: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for term, (docs, tfs) in postings.items():
            d = np.asarray(docs, dtype=np.int64)
            tf = np.asarray(tfs, dtype=np.float64)
            idf = math.log(1.0 + (n - len(d) + 0.5) / (len(d) + 0.5))
            self.index[term] = (d, idf * tf * (k1 + 1.0) / (tf + norm[d]))

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document (repeated query terms count repeatedly, as in Lucene)."""
        out = np.zeros(len(self.doc_ids), dtype=np.float64)
        for term in bm25_tokens(query):
            hit = self.index.get(term)
            if hit is not None:
                out[hit[0]] += hit[1]
        return out

    def search(self, query: str, k: int) -> list[str]:
        """Top k document ids, best first; ties by corpus order (deterministic)."""
        s = self.scores(query)
        positive = np.flatnonzero(s > 0)
        order = positive[np.argsort(-s[positive], kind="stable")]
        return [self.doc_ids[i] for i in order[:k]]


# -- first stages -------------------------------------------------------------------------------


def _dense_rankings(
    source: str, corpus: Mapping[str, str], queries: Mapping[str, str], k: int
) -> dict[str, list[str]]:
    from rerankd.engine.encoders import load_dense_encoder

    enc = load_dense_encoder(source)
    doc_ids = list(corpus)
    docs = enc.encode([corpus[d] for d in doc_ids], input_type="document")
    qids = list(queries)
    qv = enc.encode([queries[q] for q in qids], input_type="query")
    sims = qv @ docs.T
    out = {}
    for row, qid in enumerate(qids):
        order = np.argsort(-sims[row], kind="stable")[:k]
        out[qid] = [doc_ids[i] for i in order]
    return out


def _sparse_rankings(
    source: str, corpus: Mapping[str, str], queries: Mapping[str, str], k: int
) -> dict[str, list[str]]:
    """SPLADE dot products through an inverted index (only the query's terms are touched)."""
    from rerankd.engine.encoders import load_sparse_encoder

    enc = load_sparse_encoder(source)
    doc_ids = list(corpus)
    postings: dict[int, tuple[list[int], list[float]]] = {}
    for i, v in enumerate(enc.encode([corpus[d] for d in doc_ids], input_type="document")):
        for term, weight in zip(v.indices, v.values, strict=True):
            docs, weights = postings.setdefault(term, ([], []))
            docs.append(i)
            weights.append(weight)
    index = {t: (np.asarray(d), np.asarray(w)) for t, (d, w) in postings.items()}
    out = {}
    for qid, qvec in zip(queries, enc.encode(list(queries.values())), strict=True):
        sims = np.zeros(len(doc_ids))
        for term, weight in zip(qvec.indices, qvec.values, strict=True):
            if term in index:
                sims[index[term][0]] += weight * index[term][1]
        order = np.argsort(-sims, kind="stable")[:k]
        out[qid] = [doc_ids[i] for i in order if sims[i] > 0]
    return out


def first_stage(
    miner: str, corpus: Mapping[str, str], queries: Mapping[str, str], k: int
) -> dict[str, list[str]]:
    """Candidate lists (best first, at most k) for `queries` from the named first stage.

    `bm25`; `dense[:SOURCE]` / `sparse[:SOURCE]` (rerankd's encoders, default the bundled
    all-MiniLM-L6-v2 / SPLADE-tiny); `run:PATH` (a TREC run; documents outside the corpus
    are dropped, since a negative needs text).
    """
    kind, _, arg = miner.partition(":")
    if kind == "bm25":
        index = BM25(corpus)
        return {q: index.search(text, k) for q, text in queries.items()}
    if kind == "dense":
        return _dense_rankings(arg or "bundled:all-minilm-l6-v2", corpus, queries, k)
    if kind == "sparse":
        return _sparse_rankings(arg or "bundled:splade-tiny", corpus, queries, k)
    if kind == "run":
        if not arg:
            raise ValueError("miner run:PATH needs a path to a TREC run file")
        check_trainable(arg)
        run = load_run(arg)
        return {q: [d for d, _ in run.get(q, []) if d in corpus][:k] for q in queries}
    raise ValueError(
        f"unknown miner {miner!r}; use one of bm25, dense[:SRC], sparse[:SRC], run:PATH"
    )


# -- teacher scores ------------------------------------------------------------------------------

#: query id -> document id -> teacher score
TeacherScores = dict[str, dict[str, float]]


def load_teacher_scores(path: str | Path) -> TeacherScores:
    """Teacher scores from a file: JSONL, TSV or a TREC run.

    - JSONL: `{"qid": ..., "did": ..., "score": ...}` per line (`query_id`/`doc_id` too);
    - TSV / whitespace with 3 columns: `qid did score` (a non-numeric first line is a header);
    - 6 columns: a TREC run `qid Q0 did rank score tag` (the score column is used).
    """
    path = Path(path)
    check_trainable(path)
    out: TeacherScores = {}
    if path.suffix == ".jsonl":
        for row in _jsonl(path):
            qid = str(row.get("qid", row.get("query_id")))
            did = str(row.get("did", row.get("doc_id")))
            out.setdefault(qid, {})[did] = float(row["score"])
        return out
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) == 3:
                qid, did, score = parts
            elif len(parts) == 6:
                qid, _, did, _, score, _ = parts
            else:
                raise ValueError(f"{path}:{lineno}: expected 3 or 6 columns, got {len(parts)}")
            try:
                value = float(score)
            except ValueError:
                if lineno == 1:
                    continue
                raise ValueError(f"{path}:{lineno}: score {score!r} is not a number") from None
            out.setdefault(qid, {})[did] = value
    return out


def write_teacher_scores(path: str | Path, scores: TeacherScores) -> Path:
    """Write scores as the TSV `load_teacher_scores` reads (header `qid did score`)."""
    path = Path(path)
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(["qid", "did", "score"])
        for qid, docs in scores.items():
            for did, s in docs.items():
                w.writerow([qid, did, repr(float(s))])
    return path


def write_trec_run(
    path: str | Path, run: Mapping[str, Sequence[str]], tag: str = "rerankd"
) -> Path:
    """A ranking as a TREC run file (scores = -rank), e.g. for `rerankd eval --run`."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as fh:
        for qid, docs in run.items():
            for rank, did in enumerate(docs, start=1):
                fh.write(f"{qid} Q0 {did} {rank} {-float(rank)} {tag}\n")
    return path


# -- groups ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """One listwise example: the positive is always column 0 of the group's scores."""

    qid: str
    query: str
    positive: str
    negatives: tuple[str, ...]

    @property
    def doc_ids(self) -> tuple[str, ...]:
        return (self.positive, *self.negatives)


@dataclass
class TrainingData:
    """Everything a run reads, fixed before the first step (so a resume sees the same data).

    `train_qids` and `dev_qids` are disjoint slices of the *train* split's judged queries;
    `candidates` holds the first stage's list per query (training and dev queries; pseudo
    queries too); `queries` the text of every query id used.
    """

    name: str
    path: Path
    split: str
    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    train_qids: list[str]
    dev_qids: list[str]
    candidates: dict[str, list[str]]
    miner: str
    teacher: TeacherScores | None = None
    #: pseudo query id -> the document it was made from (its positive)
    pseudo_sources: dict[str, str] = field(default_factory=dict)

    def positives(self, qid: str) -> list[str]:
        """Judged relevant documents that the corpus holds, sorted (a fixed order)."""
        if qid in self.pseudo_sources:
            return [self.pseudo_sources[qid]]
        return sorted(d for d, g in self.qrels.get(qid, {}).items() if g > 0 and d in self.corpus)

    def groups_for_epoch(
        self, epoch: int, seed: int, negatives: int, depth: int, skip_top: int = 0
    ) -> list[Group]:
        """The epoch's groups, in training order: one per (train query, positive).

        Negatives are drawn without replacement from the first stage's candidates at ranks
        `skip_top`..`depth` that are not judged relevant (judged non-relevant documents are
        kept: they are the surest negatives). With teacher scores, candidates the teacher
        scored are preferred so distillation has targets. A short pool is topped up with
        random corpus documents. Every draw is seeded by (seed, epoch, query, positive).
        """
        corpus_ids = list(self.corpus)
        groups: list[Group] = []
        for qid in self.train_qids:
            pos = self.positives(qid)
            relevant = set(pos) | {d for d, g in self.qrels.get(qid, {}).items() if g > 0}
            pool = [d for d in self.candidates.get(qid, [])[skip_top:depth] if d not in relevant]
            if self.teacher is not None and qid in self.teacher:
                scored = [d for d in pool if d in self.teacher[qid]]
                if len(scored) >= negatives:
                    pool = scored
            for p in pos:
                rng = random.Random(f"{seed}:{epoch}:{qid}:{p}")
                if len(pool) >= negatives:
                    negs = rng.sample(pool, negatives)
                else:
                    negs = list(pool)
                    taken = set(negs) | relevant
                    while len(negs) < negatives and len(taken) < len(corpus_ids):
                        d = corpus_ids[rng.randrange(len(corpus_ids))]
                        if d not in taken:
                            negs.append(d)
                            taken.add(d)
                groups.append(Group(qid, self.queries[qid], p, tuple(negs)))
        random.Random(f"{seed}:{epoch}:order").shuffle(groups)
        return groups

    def stats(self) -> dict[str, object]:
        """What the run log records about its data (so a figure can be traced to it)."""
        judged = [q for q in self.train_qids if q not in self.pseudo_sources]
        found = sum(
            any(d in set(self.candidates.get(q, [])) for d in self.positives(q)) for q in judged
        )
        return {
            "name": self.name,
            "path": str(self.path),
            "split": self.split,
            "corpus_docs": len(self.corpus),
            "train_queries": len(judged),
            "pseudo_queries": len(self.pseudo_sources),
            "long_pseudo_queries": sum(q.startswith("pseudo-long:") for q in self.pseudo_sources),
            "dev_queries": len(self.dev_qids),
            "groups_per_epoch": sum(len(self.positives(q)) for q in self.train_qids),
            "miner": self.miner,
            "train_positive_found_by_miner": found / max(len(judged), 1),
            "teacher_score_queries": len(self.teacher) if self.teacher else 0,
        }


def read_titles(folder: Path) -> dict[str, tuple[str, str]]:
    """corpus.jsonl -> {id: (title, text)}: pseudo queries need the title on its own."""
    return {
        str(d["_id"]): ((d.get("title") or "").strip(), d.get("text") or "")
        for d in _jsonl(folder / "corpus.jsonl")
    }


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def pseudo_query(title: str, text: str, max_words: int = 24) -> str:
    """A query made from a document: its title, else its leading sentence (cut to words)."""
    source = title or _SENTENCE.split(text.strip(), maxsplit=1)[0]
    return " ".join(source.split()[:max_words])


#: the words a long pseudo query takes, drawn per query: up to past the half of a
#: 192-token pair that a query may fill, as CISI's questions (76 words on average) do
LONG_PSEUDO_WORDS = (30, 120)


def long_pseudo_query(text: str, words: int) -> str:
    """A long query made from a document: `words` words from its closing sentences
    (starting at a sentence), or "" when the text is shorter than that.

    Why the close: a pair is cut on the document's side, so the closing sentences mostly
    fall outside the document window the model reads, and the match is on the topic rather
    than on copied text, as with a long question written before the document was found.
    """
    tail: list[str] = []  # the closing sentences' words, from the latest sentence start
    for sentence in reversed(_SENTENCE.split(text.strip())):
        tail = sentence.split() + tail
        if len(tail) >= words:
            return " ".join(tail[:words])
    return ""


def make_pseudo_queries(
    titles: Mapping[str, tuple[str, str]],
    corpus: Mapping[str, str],
    n: int,
    seed: int,
    exclude: Iterable[str] = (),
    *,
    long: bool = False,
) -> dict[str, tuple[str, str]]:
    """{pseudo qid: (query text, source doc id)} for `n` seeded documents of the corpus;
    `titles` is `read_titles` of its folder.

    Short ones (`pseudo_query`, ids `pseudo:<doc>`) by default; with `long`, long ones
    (`long_pseudo_query`, ids `pseudo-long:<doc>`, drawn with their own seed so adding them
    leaves the short ones as they were). `exclude` keeps documents out (those judged for
    dev queries, so the dev metric is not measured on documents the student was shown as
    positives); a document a query cannot be made from is skipped, so fewer may come back.
    """
    banned = set(exclude)
    pool = [d for d in corpus if d not in banned and d in titles]
    rng = random.Random(f"{seed}:pseudo-long" if long else f"{seed}:pseudo")
    picked = rng.sample(pool, min(n, len(pool)))
    out: dict[str, tuple[str, str]] = {}
    for did in picked:
        title, body = titles[did]
        if long:
            words = rng.randint(*LONG_PSEUDO_WORDS)
            qid, text = f"pseudo-long:{did}", long_pseudo_query(body, words)
        else:
            qid, text = f"pseudo:{did}", pseudo_query(title, body)
        if text:
            out[qid] = (text, did)
    return out


def load_training_data(
    folder: str | Path,
    *,
    split: str = "train",
    miner: str = "bm25",
    depth: int = 30,
    dev_queries: int = 50,
    dev_candidates: int = 30,
    seed: int = 0,
    dev_seed: int | None = None,
    max_queries: int | None = None,
    max_docs: int | None = None,
    teacher_scores: str | Path | None = None,
    query_source: str = "train",
    pseudo_queries: int = 0,
    long_pseudo_queries: int = 0,
) -> TrainingData:
    """Read, cap, split and mine: everything before the first step.

    `max_queries` keeps the first N judged queries (dev included), `max_docs` caps the corpus
    the way `rerankd eval` does (judged documents first): both bound a run's time on 2 cores.
    `query_source` is `train` (judged train queries), `pseudo` (pseudo queries from
    documents, for distillation without labels) or `both`; `pseudo_queries` short ones
    (titles) and `long_pseudo_queries` long ones are made. `seed` draws the pseudo queries;
    `dev_seed` (default: `seed`) picks the dev queries, so runs with different seeds can
    still hold apart the same ones.
    """
    check_trainable(folder, split)
    if query_source not in ("train", "pseudo", "both"):
        raise ValueError(f"query source must be train, pseudo or both, got {query_source!r}")
    full: BeirDataset = load_dataset(folder, split)
    data = subset(full, max_queries=max_queries, max_docs=max_docs)
    if not data.queries:
        raise ValueError(f"{full.path} has no judged queries in split {split!r}")
    dev_qids_seed = seed if dev_seed is None else dev_seed
    train_qids, dev_qids = split_dev(list(data.queries), dev_queries, dev_qids_seed)
    queries = dict(data.queries)
    pseudo_sources: dict[str, str] = {}
    if query_source in ("pseudo", "both"):
        dev_docs = {d for q in dev_qids for d in data.qrels.get(q, {})}
        titles = read_titles(full.path)
        made = make_pseudo_queries(titles, data.corpus, pseudo_queries, seed, dev_docs)
        made |= make_pseudo_queries(
            titles, data.corpus, long_pseudo_queries, seed, dev_docs, long=True
        )
        for pqid, (text, did) in made.items():
            queries[pqid] = text
            pseudo_sources[pqid] = did
        train_qids = list(pseudo_sources) + (train_qids if query_source == "both" else [])
    needed = {q: queries[q] for q in [*train_qids, *dev_qids]}
    candidates = first_stage(miner, data.corpus, needed, max(depth, dev_candidates))
    teacher = load_teacher_scores(teacher_scores) if teacher_scores else None
    return TrainingData(
        name=full.name,
        path=full.path,
        split=split,
        corpus=data.corpus,
        queries=queries,
        qrels=data.qrels,
        train_qids=train_qids,
        dev_qids=dev_qids,
        candidates=candidates,
        miner=miner,
        teacher=teacher,
        pseudo_sources=pseudo_sources,
    )


def qrels_text(folder: Path, split: str) -> str:
    """The raw qrels file, for the run log's checksum."""
    return (Path(folder) / "qrels" / f"{split}.tsv").read_text(encoding="utf-8")


def dump_json(obj: object) -> str:
    """Compact, key-sorted JSON with Paths as strings: one line of a run log."""
    return json.dumps(obj, sort_keys=True, default=str)

"""Types that travel between rerankd's rooms. Each is defined once, here.

They are plain dataclasses: the engine, the server, the client and the connectors
all speak them, and only `server/` and `client.py` translate them to the proto.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Normalization(str, Enum):
    """How a model's logit becomes the returned score."""

    RAW = "raw"
    SIGMOID = "sigmoid"


@dataclass(frozen=True)
class Document:
    """A document to rerank: the caller's id and its text."""

    id: str
    text: str


class LongDocs(str, Enum):
    """What to do with a document longer than the room left after the query."""

    MAX = "max"  # score overlapping windows, keep the best (the document is read whole)
    TRUNCATE = "truncate"  # score the first window only


class Fusion(str, Enum):
    """Whether a score fuses the model's with the first-stage order (documents in that order)."""

    OFF = "off"  # the cross-encoder's score alone
    AUTO = "auto"  # the model's fitted fusion (fusion.json) where it ships one, else OFF


@dataclass(frozen=True)
class RerankOptions:
    """Per-request knobs; a 0 means "the server's default" for every numeric field.

    `depth` runs only the first k encoder layers (Matryoshka-style cost control).
    `long_docs`, `window_overlap` (tokens shared by consecutive windows) and
    `max_doc_tokens` (a per-document cap on the tokens scored) govern long documents;
    `long_docs=None` is the model's default (`long_docs` in its `rerankd.json`, else MAX).
    """

    max_length: int = 0
    normalization: Normalization = Normalization.RAW
    return_documents: bool = False
    depth: int = 0
    long_docs: LongDocs | None = None
    window_overlap: int = 0
    max_doc_tokens: int = 0
    # Token pruning: the share of each pair's tokens entering each layer run (first 1.0,
    # non-increasing), or one `keep_ratio` applied from layer `keep_from_layer` (1-based) on.
    keep_schedule: tuple[float, ...] = ()
    keep_ratio: float = 0.0
    keep_from_layer: int = 0
    # AUTO: documents are in first-stage order and scores fuse the model's with it
    # (`rerankd.engine.fusion`); hybrid_search asks for it, plain Rerank calls do not.
    fusion: Fusion = Fusion.OFF


@dataclass(frozen=True)
class RerankResult:
    """One scored document; `index` is its position in the request."""

    index: int
    id: str
    score: float
    text: str | None = None
    # The cross-encoder's own score; equals `score` unless fusion was applied.
    model_score: float | None = None


@dataclass
class Timings:
    """Where a request's time went, in microseconds."""

    queue_us: int = 0
    tokenize_us: int = 0
    inference_us: int = 0


@dataclass
class RerankResponse:
    """Results best first, with the model used, tokens computed and timings."""

    results: list[RerankResult]
    model: str
    tokens: int = 0
    timings: Timings = field(default_factory=Timings)
    cache_hits: int = 0
    depth: int = 0  # encoder layers actually run
    keep_schedule: tuple[float, ...] = ()  # token share per layer used (empty: no pruning)
    fusion_weight: float = 0.0  # the model's weight in the fused score (0: not fused)


@dataclass(frozen=True)
class SparseVector:
    """A sparse vector: parallel lists of vocabulary indices and weights."""

    indices: list[int]
    values: list[float]


@dataclass(frozen=True)
class Candidate:
    """A first-stage hit as a connector returns it."""

    id: str
    text: str
    first_stage_score: float
    first_stage_rank: int
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    """A final hit: the candidate and the score it is ordered by."""

    id: str
    score: float
    first_stage_score: float
    first_stage_rank: int
    text: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchTimings:
    """Where a hybrid_search call's time went, in milliseconds."""

    embed_ms: float = 0.0
    first_stage_ms: float = 0.0
    rerank_ms: float = 0.0


@dataclass
class SearchResult:
    """`hybrid_search`'s answer. When `reranked` is False, `reason` says why (fail-open)."""

    hits: list[Hit]
    reranked: bool
    reason: str = ""
    mode: str = "hybrid"
    timings: SearchTimings = field(default_factory=SearchTimings)

"""The one interface every vector-database connector implements.

A connector wraps the user's own client object and runs the first stage natively in the
DB (dense, sparse/BM25, the DB's own hybrid fusion). It knows its DB client and the shared
types in `rerankd.types`, nothing of gRPC: `rerankd.search` hands it query vectors and gets
`Candidate`s back. Adding a fourth DB means one new module here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from rerankd.errors import RerankdError
from rerankd.types import Candidate, SparseVector

Mode = Literal["hybrid", "dense", "sparse"]
MODES: tuple[str, ...] = ("hybrid", "dense", "sparse")


class ConnectorError(RerankdError):
    """An error from the database itself, naming the DB and the collection."""

    def __init__(self, db: str, collection: str, message: str) -> None:
        super().__init__(f"{db} collection {collection!r}: {message}")
        self.db = db
        self.collection = collection


@dataclass(frozen=True)
class FirstStageQuery:
    """What the first stage searches with. Vectors are present when the connector asked."""

    text: str
    mode: Mode = "hybrid"
    dense: Sequence[float] | None = None
    sparse: SparseVector | None = None


@dataclass(frozen=True)
class IndexRecord:
    """One document to index: id, text, its vectors and any payload fields."""

    id: str
    text: str
    dense: Sequence[float] | None = None
    sparse: SparseVector | None = None
    payload: dict[str, Any] = field(default_factory=dict)


class Connector(ABC):
    """First stage + indexing over one vector database."""

    #: Short DB name used in messages: "qdrant", "milvus", "weaviate".
    db: str = ""
    #: Which query/document vectors the sidecar must compute for this connector. A DB with
    #: native BM25 (Milvus, Weaviate) needs no sparse vectors.
    needs_dense: bool = True
    needs_sparse: bool = False

    @abstractmethod
    def first_stage(
        self, collection: str, query: FirstStageQuery, *, limit: int, filter: Any = None
    ) -> list[Candidate]:
        """Top `limit` candidates best first; `filter` is in the DB's own form."""

    @abstractmethod
    def create_collection(self, collection: str, *, dense_dim: int, recreate: bool = False) -> None:
        """Create a collection with dense + sparse/BM25 + text + payload fields."""

    @abstractmethod
    def upsert(self, collection: str, records: Sequence[IndexRecord]) -> None:
        """Insert or replace records by id (idempotent)."""

    def check_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

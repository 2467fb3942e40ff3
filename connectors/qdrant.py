"""Qdrant connector: dense + learned-sparse first stage through Qdrant's Query API.

Qdrant has no built-in BM25 over stored text, so rerankd computes SPLADE sparse vectors and
Qdrant stores them as a named sparse vector next to the dense one (`needs_sparse=True`).
Hybrid search is one `query_points` call: a prefetch per vector, fused by Qdrant itself
(RRF by default, DBSF selectable), so the candidates are exactly what Qdrant would return.

`qdrant-client` is imported lazily: `rerankd.connectors.qdrant` imports without it, and the
client is only needed once a `QdrantConnector` is used.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

from rerankd.connectors.base import Connector, ConnectorError, FirstStageQuery, IndexRecord
from rerankd.errors import InvalidInputError
from rerankd.types import Candidate, SparseVector

if TYPE_CHECKING:
    from qdrant_client import QdrantClient
    from qdrant_client import models as qmodels

#: Payload key holding the caller's id. Qdrant point ids must be unsigned ints or UUIDs, so
#: every caller id is mapped to a UUIDv5 and the original travels in the payload.
ID_FIELD = "_rerankd_id"
#: Fixed namespace for the id mapping: the same caller id always lands on the same point,
#: which is what makes `upsert` idempotent across processes and machines.
ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "rerankd:connectors:qdrant")

_UPSERT_BATCH = 256

Fusion = Literal["rrf", "dbsf"]


def point_id(record_id: str) -> str:
    """The Qdrant point id (a UUIDv5 string) for a caller's id; deterministic."""
    return str(uuid.uuid5(ID_NAMESPACE, record_id))


def _models() -> Any:
    from qdrant_client import models

    return models


class QdrantConnector(Connector):
    """First stage and indexing over a user's `QdrantClient` (local, on-disk or server).

    Collections made by `create_collection` hold a named dense vector (`dense_name`,
    cosine), a named sparse vector (`sparse_name`, no IDF modifier: SPLADE weights are
    already term importances, and Qdrant's IDF would count them twice) and a payload with the
    text under `text_field` and the caller's id under `_rerankd_id`. Candidates carry the
    caller's id and the text; their payload is the rest (neither of those two keys).

    `fusion` picks how hybrid mode merges the two lists inside Qdrant: "rrf" (reciprocal
    rank) or "dbsf" (distribution-based score fusion). `rrf_k` sets RRF's constant; None keeps
    Qdrant's default (k=2, score 1/(k + rank - 1) with rank from 1) and so works with every
    server that has the Query API, while a value uses the parametrised RRF (`RrfQuery`),
    which older servers reject (a ConnectorError at query time).
    """

    db = "qdrant"
    needs_dense = True
    needs_sparse = True

    def __init__(
        self,
        client: QdrantClient,
        *,
        text_field: str = "text",
        dense_name: str = "dense",
        sparse_name: str = "sparse",
        fusion: Fusion = "rrf",
        rrf_k: int | None = None,
    ) -> None:
        if fusion not in ("rrf", "dbsf"):
            raise ValueError(f"fusion must be 'rrf' or 'dbsf', got {fusion!r}")
        if rrf_k is not None and (fusion != "rrf" or rrf_k < 1):
            raise ValueError("rrf_k needs fusion='rrf' and a value >= 1")
        if text_field == ID_FIELD:
            raise ValueError(
                f"text_field cannot be {ID_FIELD!r}: rerankd keeps the caller's id there"
            )
        self.client = client
        self.text_field = text_field
        self.dense_name = dense_name
        self.sparse_name = sparse_name
        self.fusion = fusion
        self.rrf_k = rrf_k

    @contextmanager
    def _db_errors(self, collection: str) -> Iterator[None]:
        """Turn whatever the client raises into ConnectorError naming DB and collection.

        qdrant-client raises different types per transport (ValueError in local mode,
        UnexpectedResponse over REST, grpc.RpcError over gRPC, pydantic errors for malformed
        filters), so only the calls into the client are wrapped, never rerankd's own code.
        """
        try:
            yield
        except ConnectorError:
            raise
        except Exception as e:
            raise ConnectorError(self.db, collection, f"{type(e).__name__}: {e}") from e

    # -- indexing --------------------------------------------------------------------------

    def create_collection(self, collection: str, *, dense_dim: int, recreate: bool = False) -> None:
        """Create the collection; an existing one is kept unless `recreate` (re-runnable)."""
        m = _models()
        with self._db_errors(collection):
            exists = self.client.collection_exists(collection)
            if exists and not recreate:
                return
            if exists:
                self.client.delete_collection(collection)
            self.client.create_collection(
                collection,
                vectors_config={
                    self.dense_name: m.VectorParams(size=dense_dim, distance=m.Distance.COSINE)
                },
                sparse_vectors_config={
                    self.sparse_name: m.SparseVectorParams(modifier=m.Modifier.NONE)
                },
            )

    def upsert(self, collection: str, records: Sequence[IndexRecord]) -> None:
        """Insert or replace by caller id: the point id is UUIDv5(id), so a re-run overwrites.

        Payload keys may not be `text_field` or `_rerankd_id`; both are rerankd's.
        """
        m = _models()
        points = []
        for r in records:
            if r.dense is None or r.sparse is None:
                raise InvalidInputError(
                    f"record {r.id!r}: Qdrant needs both dense and sparse vectors"
                )
            clash = {self.text_field, ID_FIELD} & r.payload.keys()
            if clash:
                raise InvalidInputError(
                    f"record {r.id!r}: payload keys {sorted(clash)} are reserved"
                )
            points.append(
                m.PointStruct(
                    id=point_id(r.id),
                    vector={
                        self.dense_name: [float(x) for x in r.dense],
                        self.sparse_name: m.SparseVector(
                            indices=list(r.sparse.indices), values=list(r.sparse.values)
                        ),
                    },
                    payload={**r.payload, self.text_field: r.text, ID_FIELD: r.id},
                )
            )
        with self._db_errors(collection):
            for start in range(0, len(points), _UPSERT_BATCH):
                # wait=True: the points are searchable when upsert returns.
                self.client.upsert(collection, points[start : start + _UPSERT_BATCH], wait=True)

    # -- first stage -----------------------------------------------------------------------

    def first_stage(
        self,
        collection: str,
        query: FirstStageQuery,
        *,
        limit: int,
        filter: qmodels.Filter | dict[str, Any] | None = None,
    ) -> list[Candidate]:
        """Top `limit` points by Qdrant's own scoring, best first.

        `filter` is a `qdrant_client.models.Filter` (or the same as a dict in Qdrant's JSON
        form), passed through as `query_filter`: Qdrant applies it inside each prefetch too,
        so hybrid lists are filtered before fusion. In hybrid mode each prefetch fetches
        `limit` points and Qdrant fuses them (`fusion`); scores are the fused scores.
        """
        self.check_mode(query.mode)
        if limit < 1:
            raise InvalidInputError(f"limit must be >= 1, got {limit}")
        m = _models()
        # Vectors are checked before talking to Qdrant: a missing one is the caller's error.
        args: dict[str, Any]
        if query.mode == "dense":
            args = {"query": self._dense(query), "using": self.dense_name}
        elif query.mode == "sparse":
            args = {"query": self._sparse(query), "using": self.sparse_name}
        else:
            args = {
                "prefetch": [
                    m.Prefetch(query=self._dense(query), using=self.dense_name, limit=limit),
                    m.Prefetch(query=self._sparse(query), using=self.sparse_name, limit=limit),
                ],
                "query": self._fusion_query(),
            }
        with self._db_errors(collection):
            query_filter = filter
            if isinstance(filter, dict):
                query_filter = m.Filter.model_validate(filter)
            elif filter is not None and not isinstance(filter, m.Filter):
                raise TypeError(f"filter must be a qdrant_client.models.Filter, got {type(filter)}")
            response = self.client.query_points(
                collection,
                **args,
                query_filter=query_filter,
                limit=limit,
                with_payload=True,
                with_vectors=False,
            )
        return [self._candidate(p, rank) for rank, p in enumerate(response.points, start=1)]

    def _fusion_query(self) -> Any:
        m = _models()
        if self.fusion == "dbsf":
            return m.FusionQuery(fusion=m.Fusion.DBSF)
        if self.rrf_k is not None:
            return m.RrfQuery(rrf=m.Rrf(k=self.rrf_k))
        return m.FusionQuery(fusion=m.Fusion.RRF)

    def _dense(self, query: FirstStageQuery) -> list[float]:
        if query.dense is None:
            raise InvalidInputError(f"{query.mode} search on Qdrant needs a dense query vector")
        return [float(x) for x in query.dense]

    def _sparse(self, query: FirstStageQuery) -> Any:
        if query.sparse is None:
            raise InvalidInputError(f"{query.mode} search on Qdrant needs a sparse query vector")
        sv: SparseVector = query.sparse
        return _models().SparseVector(indices=list(sv.indices), values=list(sv.values))

    def _candidate(self, point: Any, rank: int) -> Candidate:
        payload = dict(point.payload or {})
        text = payload.pop(self.text_field, "")
        # Points written by someone else have no _rerankd_id: their Qdrant id is the id.
        cid = payload.pop(ID_FIELD, None)
        return Candidate(
            id=str(cid) if cid is not None else str(point.id),
            text=text if isinstance(text, str) else str(text),
            first_stage_score=float(point.score),
            first_stage_rank=rank,
            payload=payload,
        )

"""Weaviate connector: the first stage runs in Weaviate, through the user's v4 client.

Weaviate has its own BM25 (an inverted index over the text property), so this connector needs
only dense vectors from the sidecar (`needs_sparse = False`). The three modes map onto the
v4 collections API:

* ``hybrid`` -> ``collection.query.hybrid(query=text, vector=dense, alpha=..., fusion_type=...)``
  (Weaviate fuses BM25 and vector results itself; the candidate score is the fused score),
* ``sparse`` -> ``collection.query.bm25(query=text)`` (score: Weaviate's BM25),
* ``dense``  -> ``collection.query.near_vector(near_vector=dense)``; the score is
  ``1 - distance``. With the cosine distance this connector configures, that is the cosine
  similarity (higher is better, like every other first-stage score in rerankd).

Keyword search is restricted to the text property (`query_properties=[text_field]`): without
that, Weaviate's BM25 would also match the id property and every text payload field.

Ids: Weaviate object ids must be UUIDs, so a caller's string id is mapped to a UUIDv5 under a
fixed rerankd namespace (`WeaviateConnector.uuid_for`, deterministic: re-upserting the same id
replaces the object). The caller's id itself is stored in a property (``rerankd_id`` by
default, field-tokenised and not keyword-searchable) and is what `Candidate.id` carries; every
other stored property except the text is the candidate's payload.

Filters are Weaviate's own (`weaviate.classes.query.Filter`), passed through unchanged.
Payload fields not declared in `create_collection(payload_schema=...)` are typed by Weaviate's
auto-schema on first insert, which makes every number a ``number`` (float): declare integer
fields as ``DataType.INT`` if they must come back as ints.

Everything Weaviate or the client reports is re-raised as `ConnectorError("weaviate",
collection, message)`; errors in the caller's own arguments stay `ValueError`/`TypeError`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rerankd.connectors.base import Connector, ConnectorError, FirstStageQuery, IndexRecord
from rerankd.types import Candidate

if TYPE_CHECKING:
    import weaviate

_DB = "weaviate"
#: UUIDv5 namespace for caller ids. Fixed forever: changing it would orphan indexed data.
RERANKD_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://rerankd.dev/weaviate/object-id")
_FUSIONS = ("relative_score", "ranked")
_BATCH = 256


class WeaviateConnector(Connector):
    """First stage + indexing over a Weaviate collection, through a `weaviate.WeaviateClient`.

    Args:
        client: a connected v4 sync client; the connector never closes it.
        text_field: property holding the document text (BM25-indexed, returned as text).
        alpha: hybrid weight of the vector side (0 = pure BM25, 1 = pure vector).
        fusion: Weaviate's hybrid fusion, ``"relative_score"`` or ``"ranked"``.
        id_field: property holding the caller's id.
        vector_name: the collection's named vector (Weaviate's own default name is
            ``"default"``); queries name it explicitly so they never depend on the server
            guessing a target vector.
    """

    db = _DB
    needs_dense = True
    needs_sparse = False

    def __init__(
        self,
        client: weaviate.WeaviateClient,
        *,
        text_field: str = "text",
        alpha: float = 0.5,
        fusion: str = "relative_score",
        id_field: str = "rerankd_id",
        vector_name: str = "default",
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be within [0, 1], got {alpha}")
        if fusion not in _FUSIONS:
            raise ValueError(f"fusion must be one of {_FUSIONS}, got {fusion!r}")
        if text_field == id_field:
            raise ValueError("text_field and id_field must differ")
        self.client = client
        self.text_field = text_field
        self.alpha = float(alpha)
        self.fusion = fusion
        self.id_field = id_field
        self.vector_name = vector_name
        self._dims: dict[str, int] = {}

    @staticmethod
    def uuid_for(record_id: str) -> uuid.UUID:
        """The Weaviate object UUID a caller id is stored under (UUIDv5, deterministic)."""
        return uuid.uuid5(RERANKD_NAMESPACE, record_id)

    # -- first stage ----------------------------------------------------------------------------

    def first_stage(
        self, collection: str, query: FirstStageQuery, *, limit: int, filter: Any = None
    ) -> list[Candidate]:
        from weaviate.classes.query import HybridFusion, MetadataQuery
        from weaviate.collections.classes.filters import _Filters

        self.check_mode(query.mode)
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        if filter is not None and not isinstance(filter, _Filters):
            raise TypeError(
                "filter must be a weaviate.classes.query.Filter expression, "
                f"got {type(filter).__name__}"
            )
        dense: list[float] | None = None
        if query.mode != "sparse":
            if query.dense is None:
                raise ValueError(f"mode {query.mode!r} needs query.dense (needs_dense is True)")
            # Plain floats: the client's fast path packs exactly these as float32.
            dense = [float(x) for x in query.dense]

        with self._errors(collection):
            coll = self.client.collections.use(collection)
            if query.mode == "hybrid":
                fusion = (
                    HybridFusion.RELATIVE_SCORE
                    if self.fusion == "relative_score"
                    else HybridFusion.RANKED
                )
                res = coll.query.hybrid(
                    query=query.text,
                    vector=dense,
                    alpha=self.alpha,
                    fusion_type=fusion,
                    query_properties=[self.text_field],
                    target_vector=self.vector_name,
                    limit=limit,
                    filters=filter,
                    return_metadata=MetadataQuery(score=True),
                )
            elif query.mode == "sparse":
                res = coll.query.bm25(
                    query=query.text,
                    query_properties=[self.text_field],
                    limit=limit,
                    filters=filter,
                    return_metadata=MetadataQuery(score=True),
                )
            else:
                res = coll.query.near_vector(
                    near_vector=dense,
                    target_vector=self.vector_name,
                    limit=limit,
                    filters=filter,
                    return_metadata=MetadataQuery(distance=True),
                )

        out: list[Candidate] = []
        for rank, obj in enumerate(res.objects, start=1):
            props = dict(obj.properties)
            if query.mode == "dense":
                distance = obj.metadata.distance
                if distance is None:
                    raise ConnectorError(_DB, collection, "near_vector result without a distance")
                score = 1.0 - float(distance)
            else:
                if obj.metadata.score is None:
                    raise ConnectorError(_DB, collection, f"{query.mode} result without a score")
                score = float(obj.metadata.score)
            # Objects not written by this connector have no caller id: fall back to the UUID.
            caller_id = props.pop(self.id_field, None)
            text = props.pop(self.text_field, None)
            out.append(
                Candidate(
                    id=str(caller_id) if caller_id is not None else str(obj.uuid),
                    text="" if text is None else str(text),
                    first_stage_score=score,
                    first_stage_rank=rank,
                    payload=props,
                )
            )
        return out

    # -- indexing -------------------------------------------------------------------------------

    def create_collection(
        self,
        collection: str,
        *,
        dense_dim: int,
        recreate: bool = False,
        payload_schema: Mapping[str, Any] | None = None,
    ) -> None:
        """Create `collection`: text (BM25), caller id, self-provided cosine HNSW vector.

        An existing collection is left as it is unless `recreate` (then it is dropped first).
        `payload_schema` maps payload field names to `weaviate.classes.config.DataType`s
        (or their string values, e.g. ``"int"``); undeclared fields are typed by Weaviate's
        auto-schema when first inserted. Weaviate sizes the vector index from the first
        insert; `dense_dim` is remembered and checked by `upsert`.
        """
        from weaviate.classes.config import (
            Configure,
            DataType,
            Property,
            Tokenization,
            VectorDistances,
        )

        if dense_dim < 1:
            raise ValueError(f"dense_dim must be >= 1, got {dense_dim}")
        extra: list[Property] = []
        for name, dtype in (payload_schema or {}).items():
            if name in (self.text_field, self.id_field):
                raise ValueError(f"payload field {name!r} collides with a reserved property")
            extra.append(Property(name=name, data_type=DataType(dtype)))

        with self._errors(collection):
            if self.client.collections.exists(collection):
                if not recreate:
                    self._dims.setdefault(collection, dense_dim)
                    return
                self.client.collections.delete(collection)
            self.client.collections.create(
                collection,
                properties=[
                    Property(
                        name=self.text_field,
                        data_type=DataType.TEXT,
                        tokenization=Tokenization.WORD,
                        index_searchable=True,
                        index_filterable=True,
                    ),
                    Property(
                        name=self.id_field,
                        data_type=DataType.TEXT,
                        tokenization=Tokenization.FIELD,
                        index_searchable=False,
                        index_filterable=True,
                    ),
                    *extra,
                ],
                vector_config=Configure.Vectors.self_provided(
                    name=self.vector_name,
                    vector_index_config=Configure.VectorIndex.hnsw(
                        distance_metric=VectorDistances.COSINE
                    ),
                ),
            )
        self._dims[collection] = dense_dim

    def upsert(self, collection: str, records: Sequence[IndexRecord]) -> None:
        """Insert or replace records by id (the UUIDv5 of the id), in batches over gRPC.

        A record id repeated within `records` keeps its last version, as sequential upserts
        would. Refuses to write into a missing collection: Weaviate's auto-schema would
        otherwise create one without this connector's text/id/vector configuration.
        """
        from weaviate.classes.data import DataObject

        latest: dict[str, IndexRecord] = {}
        for rec in records:
            if rec.dense is None:
                raise ValueError(f"record {rec.id!r} has no dense vector (needs_dense is True)")
            clash = {self.text_field, self.id_field} & set(rec.payload)
            if clash:
                raise ValueError(f"record {rec.id!r}: payload uses reserved field(s) {clash}")
            dim = self._dims.get(collection)
            if dim is not None and len(rec.dense) != dim:
                raise ValueError(
                    f"record {rec.id!r}: dense vector has {len(rec.dense)} dims, "
                    f"collection {collection!r} was created with {dim}"
                )
            latest.pop(rec.id, None)
            latest[rec.id] = rec
        if not latest:
            return

        objects = [
            DataObject(
                properties={**rec.payload, self.text_field: rec.text, self.id_field: rec.id},
                uuid=self.uuid_for(rec.id),
                vector={self.vector_name: [float(x) for x in rec.dense or ()]},
            )
            for rec in latest.values()
        ]
        with self._errors(collection):
            if not self.client.collections.exists(collection):
                raise ConnectorError(
                    _DB, collection, "does not exist; call create_collection first"
                )
            coll = self.client.collections.use(collection)
            for start in range(0, len(objects), _BATCH):
                chunk = objects[start : start + _BATCH]
                result = coll.data.insert_many(chunk)
                if result.has_errors:
                    index, err = next(iter(sorted(result.errors.items())))
                    failed_id = chunk[index].properties[self.id_field]  # type: ignore[index]
                    raise ConnectorError(
                        _DB,
                        collection,
                        f"{len(result.errors)} of {len(chunk)} objects were rejected; "
                        f"first: {failed_id!r}: {err.message}",
                    )

    # -- helpers --------------------------------------------------------------------------------

    @contextmanager
    def _errors(self, collection: str) -> Iterator[None]:
        """Re-raise whatever the client reports as a ConnectorError naming DB and collection."""
        from weaviate.exceptions import WeaviateBaseError

        try:
            yield
        except ConnectorError:
            raise
        except WeaviateBaseError as e:
            message = getattr(e, "message", None) or str(e)
            raise ConnectorError(_DB, collection, message) from e

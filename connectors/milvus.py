"""Milvus connector: dense kNN + Milvus's own BM25, fused by Milvus's hybrid search.

Milvus (>= 2.5, and Milvus Lite 2.5) computes BM25 itself: a `BM25` function turns the
analysed text field into a sparse vector at insert time and turns the query text into one at
search time. So rerankd sends only text and dense vectors (`needs_sparse=False`), and the
sparse side of hybrid search is real BM25 with corpus statistics kept by the database.

Hybrid mode is one `hybrid_search` call with an `AnnSearchRequest` per field and Milvus's
`RRFRanker(k)` (score Σ 1/(k + rank), rank from 1) or `WeightedRanker(w_dense, w_sparse)`.

`pymilvus` is imported lazily: `rerankd.connectors.milvus` imports without it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

from rerankd.connectors.base import Connector, ConnectorError, FirstStageQuery, IndexRecord
from rerankd.errors import InvalidInputError
from rerankd.types import Candidate

if TYPE_CHECKING:
    from pymilvus import MilvusClient

#: Longest caller id (VARCHAR primary key) and text (bytes) a created collection accepts;
#: 65,535 bytes is Milvus's VARCHAR maximum.
MAX_ID_LENGTH = 512
MAX_TEXT_LENGTH = 65_535

_UPSERT_BATCH = 256

Ranker = Literal["rrf", "weighted"]


class MilvusConnector(Connector):
    """First stage and indexing over a user's `MilvusClient` (Milvus Lite file or server).

    Collections made by `create_collection` have a VARCHAR primary key `id_field` (the
    caller's id, used as is), the text in `text_field` (analysed, for BM25), a dense vector
    `dense_field` (COSINE, AUTOINDEX), a sparse `sparse_field` filled by the BM25 function
    (SPARSE_INVERTED_INDEX, metric BM25) and the dynamic field on, so each record's payload
    keys become fields one can filter on. Candidates carry id and text; their payload is every
    other scalar field and dynamic key.

    `ranker` picks hybrid fusion: "rrf" with `rrf_k`, or "weighted" with `weights`
    (dense, sparse); Milvus normalises each side's scores before weighting. Prefer "rrf" on
    Milvus Lite: Lite 2.5.1's WeightedRanker normalises BM25 as if it were a distance
    (1 - 2·atan(s)/π), so the best BM25 hits weigh least (the tests pin this).

    The fields a hit returns are read from the schema once per collection and cached; a
    collection dropped and re-made with another schema behind this connector's back needs
    a new connector.
    """

    db = "milvus"
    needs_dense = True
    needs_sparse = False

    def __init__(
        self,
        client: MilvusClient,
        *,
        text_field: str = "text",
        dense_field: str = "dense",
        sparse_field: str = "sparse",
        id_field: str = "id",
        ranker: Ranker = "rrf",
        weights: tuple[float, float] = (0.5, 0.5),
        rrf_k: int = 60,
    ) -> None:
        if ranker not in ("rrf", "weighted"):
            raise ValueError(f"ranker must be 'rrf' or 'weighted', got {ranker!r}")
        if len(weights) != 2 or any(not 0.0 <= w <= 1.0 for w in weights):
            raise ValueError(f"weights must be two numbers in [0, 1] (dense, sparse): {weights}")
        if not 0 < rrf_k < 16384:
            raise ValueError(f"rrf_k must be in (0, 16384), got {rrf_k}")
        self.client = client
        self.text_field = text_field
        self.dense_field = dense_field
        self.sparse_field = sparse_field
        self.id_field = id_field
        self.ranker = ranker
        self.weights = (float(weights[0]), float(weights[1]))
        self.rrf_k = rrf_k
        self._reserved = {id_field, text_field, dense_field, sparse_field}
        # Per collection: the fields a hit returns (all scalars plus the dynamic field),
        # learnt once from the schema so vectors are never shipped back.
        self._output_fields: dict[str, list[str]] = {}

    @contextmanager
    def _db_errors(self, collection: str) -> Iterator[None]:
        """Turn what pymilvus raises (MilvusException and kin) into ConnectorError.

        Only calls into the client are wrapped, never rerankd's own checks.
        """
        try:
            yield
        except ConnectorError:
            raise
        except Exception as e:
            message = getattr(e, "message", None) or str(e)
            raise ConnectorError(self.db, collection, f"{type(e).__name__}: {message}") from e

    # -- indexing --------------------------------------------------------------------------

    def create_collection(self, collection: str, *, dense_dim: int, recreate: bool = False) -> None:
        """Create (and load) the collection; an existing one is kept unless `recreate`."""
        from pymilvus import DataType, Function, FunctionType

        with self._db_errors(collection):
            exists = self.client.has_collection(collection)
            if exists and not recreate:
                return
            if exists:
                self.client.drop_collection(collection)
            self._output_fields.pop(collection, None)
            schema = self.client.create_schema(auto_id=False, enable_dynamic_field=True)
            schema.add_field(
                self.id_field, DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH
            )
            schema.add_field(
                self.text_field, DataType.VARCHAR, max_length=MAX_TEXT_LENGTH, enable_analyzer=True
            )
            schema.add_field(self.dense_field, DataType.FLOAT_VECTOR, dim=dense_dim)
            schema.add_field(self.sparse_field, DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(
                Function(
                    name=f"{self.sparse_field}_bm25",
                    function_type=FunctionType.BM25,
                    input_field_names=[self.text_field],
                    output_field_names=[self.sparse_field],
                )
            )
            index = self.client.prepare_index_params()
            index.add_index(
                field_name=self.dense_field, index_type="AUTOINDEX", metric_type="COSINE"
            )
            index.add_index(
                field_name=self.sparse_field,
                index_type="SPARSE_INVERTED_INDEX",
                metric_type="BM25",
            )
            self.client.create_collection(collection, schema=schema, index_params=index)

    def upsert(self, collection: str, records: Sequence[IndexRecord]) -> None:
        """Insert or replace rows by id (Milvus's upsert: delete + insert of the same key).

        Payload keys become dynamic fields; they may not reuse the schema's own field names.
        A record's sparse vector is ignored: the BM25 function derives it from the text.
        """
        rows = []
        for r in records:
            if r.dense is None:
                raise InvalidInputError(f"record {r.id!r}: Milvus needs a dense vector")
            clash = self._reserved & r.payload.keys()
            if clash:
                raise InvalidInputError(f"record {r.id!r}: payload keys {sorted(clash)} reserved")
            rows.append(
                {
                    **r.payload,
                    self.id_field: r.id,
                    self.text_field: r.text,
                    self.dense_field: [float(x) for x in r.dense],
                }
            )
        with self._db_errors(collection):
            for start in range(0, len(rows), _UPSERT_BATCH):
                self.client.upsert(collection, rows[start : start + _UPSERT_BATCH])

    # -- first stage -----------------------------------------------------------------------

    def first_stage(
        self, collection: str, query: FirstStageQuery, *, limit: int, filter: str | None = None
    ) -> list[Candidate]:
        """Top `limit` rows by Milvus's own scoring, best first.

        `filter` is a Milvus boolean expression over scalar and dynamic fields, e.g.
        `group == "beta" and year >= 2010`, passed as the search's `filter` (and as each
        `AnnSearchRequest`'s `expr` in hybrid mode, so both lists are filtered before fusion).
        Dense scores are cosine similarities, sparse scores BM25, hybrid scores the ranker's.
        """
        self.check_mode(query.mode)
        if limit < 1:
            raise InvalidInputError(f"limit must be >= 1, got {limit}")
        if filter is not None and not isinstance(filter, str):
            raise ConnectorError(
                self.db,
                collection,
                f"filter must be a boolean expression string, got {type(filter).__name__}",
            )
        expr = filter or ""
        dense_param = {"metric_type": "COSINE"}
        sparse_param = {"metric_type": "BM25"}
        dense = self._dense(query) if query.mode in ("dense", "hybrid") else None
        with self._db_errors(collection):
            output_fields = self._fields_to_return(collection)
            if query.mode == "dense":
                result = self.client.search(
                    collection,
                    data=[dense],
                    anns_field=self.dense_field,
                    limit=limit,
                    filter=expr,
                    output_fields=output_fields,
                    search_params=dense_param,
                )
            elif query.mode == "sparse":
                result = self.client.search(
                    collection,
                    data=[query.text],
                    anns_field=self.sparse_field,
                    limit=limit,
                    filter=expr,
                    output_fields=output_fields,
                    search_params=sparse_param,
                )
            else:
                from pymilvus import AnnSearchRequest, RRFRanker, WeightedRanker

                requests = [
                    AnnSearchRequest(
                        data=[dense],
                        anns_field=self.dense_field,
                        param=dense_param,
                        limit=limit,
                        expr=expr,
                    ),
                    AnnSearchRequest(
                        data=[query.text],
                        anns_field=self.sparse_field,
                        param=sparse_param,
                        limit=limit,
                        expr=expr,
                    ),
                ]
                ranker = (
                    RRFRanker(self.rrf_k) if self.ranker == "rrf" else WeightedRanker(*self.weights)
                )
                result = self.client.hybrid_search(
                    collection, requests, ranker, limit=limit, output_fields=output_fields
                )
        hits = result[0] if len(result) else []
        return [self._candidate(hit, rank) for rank, hit in enumerate(hits, start=1)]

    def _dense(self, query: FirstStageQuery) -> list[float]:
        if query.dense is None:
            raise InvalidInputError(f"{query.mode} search on Milvus needs a dense query vector")
        return [float(x) for x in query.dense]

    def _fields_to_return(self, collection: str) -> list[str]:
        """Every non-vector field but the key, plus the dynamic field if the schema has one."""
        fields = self._output_fields.get(collection)
        if fields is None:
            info = self.client.describe_collection(collection)
            fields = []
            for f in info.get("fields", []):
                type_name = getattr(f.get("type"), "name", str(f.get("type")))
                if f.get("is_primary") or "VECTOR" in type_name:
                    continue
                fields.append(f["name"])
            if info.get("enable_dynamic_field"):
                fields.append("$meta")
            if self.text_field not in fields:
                raise ConnectorError(
                    self.db, collection, f"has no scalar text field {self.text_field!r}"
                )
            self._output_fields[collection] = fields
        return fields

    def _candidate(self, hit: Any, rank: int) -> Candidate:
        entity = dict(hit.get("entity") or {})
        text = entity.pop(self.text_field, "")
        entity.pop(self.id_field, None)
        entity.pop("$meta", None)
        return Candidate(
            id=str(hit[self.id_field]),
            text=text if isinstance(text, str) else str(text),
            first_stage_score=float(hit["distance"]),
            first_stage_rank=rank,
            payload=entity,
        )


def open_milvus_lite(path: str | os.PathLike[str], wait_s: float = 60.0) -> MilvusClient:
    """A `MilvusClient` on a Milvus Lite `.db` file, opened once its server takes connections.

    `MilvusClient("x.db")` starts Milvus Lite's process, gives it half a second, and connects
    at once. On a busy machine the process has not opened its unix socket by then and the
    connect fails at once ("Fail connecting to server on unix:..."); a longer `timeout` does not
    help. So this starts the server itself, waits up to `wait_s` until the socket accepts a
    connection, and only then builds the client (which finds the running server).
    """
    from milvus_lite.server_manager import server_manager_instance
    from pymilvus import MilvusClient

    uri = server_manager_instance.start_and_get_uri(str(path))
    if uri is None:
        raise ConnectionError(f"Milvus Lite could not start on {path} (is the file in use?)")
    sock_path = uri.removeprefix("unix:")
    if not wait_for_listener(socket.AF_UNIX, sock_path, wait_s):
        server_manager_instance.release_server(str(path))
        raise ConnectionError(f"Milvus Lite on {path} did not open {sock_path} within {wait_s:g} s")
    return MilvusClient(str(path))


def wait_for_listener(
    family: socket.AddressFamily,
    address: str | tuple[str, int],
    wait_s: float,
    alive: Callable[[], bool] = lambda: True,
) -> bool:
    """True once something accepts connections at `address`; False when `wait_s` has passed
    or `alive()` (say, "the server process still runs") turns false first. A server started
    as another process gives no event to wait on, so this polls, every 50 ms."""
    deadline = time.monotonic() + wait_s
    while alive():
        with socket.socket(family) as probe:
            try:
                probe.connect(address)
                return True
            except OSError:
                pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return False

"""`WeaviateProtocolDouble`: a TEST DOUBLE for Weaviate that speaks its REST + gRPC protocol.

This is not Weaviate. It exists because no Weaviate server can run where the tests run, and a
mock of the Python client would only test our guesses about that client. Instead the real
`weaviate-client` connects to this double over 127.0.0.1 exactly as it would to a server:
the `/v1/meta` and OIDC handshake, the gRPC health check, collection creation over REST,
inserts over gRPC `BatchObjects` and every query over gRPC `Search`, encoded by the client's
own code from the stubs it ships (`weaviate.proto.v1`, which picks the stub generation for the
installed protobuf; this module imports the very same modules, so both ends always agree).

Answers are computed here, from the stored objects, with Weaviate's documented semantics
(ported from Weaviate's own source, not from our connector):

* near_vector: exact cosine distance ``1 - cos(q, v)`` over every object (no HNSW
  approximation), ascending, pre-filtered.
* bm25: BM25F as in Weaviate's `bm25_searcher.go`: ``idf = ln(1 + (N - n + 0.5)/(n + 0.5))``
  (times the number of times a term repeats in the query), per-term score
  ``idf * f / (f + k1 * (1 - b + b * len/avglen))`` (no ``(k1 + 1)`` factor), k1/b from the
  class (default 1.2/0.75), Weaviate's tokenizers (word: split on anything not a letter or
  digit, lowercase; lowercase; whitespace; field) and the class's stopword preset ("en" by
  default) removed from word-tokenised queries. N and n count the whole collection even when
  a filter is applied, as Weaviate does.
* hybrid: both sub-searches take ``max(100, limit)`` results (Weaviate's
  `hybrid.DefaultLimit`), keyword weighted ``1 - alpha``, vector weighted ``alpha`` with
  vector score ``1 - distance``; relativeScoreFusion = per-set min-max normalisation (a set
  whose scores are all equal contributes its full weight), rankedFusion = ``weight / (60 +
  rank)`` with rank from 0. The fused score is returned as metadata ``score``.
* filters: Equal/NotEqual/GreaterThan(Equal)/LessThan(Equal) on int, number, text and boolean
  properties, ContainsAny/All/None, And/Or/Not, with Weaviate's value-type checks and its
  int<->number coercion. Text equality is token based, per the property's tokenization (so
  a "word" property equals "cancer" when it contains that word; a "field" one only when the
  whole value is "cancer").

Anything else is REFUSED, never ignored: gRPC ``INVALID_ARGUMENT`` (REST 422/501) with a
message starting "WeaviateProtocolDouble does not support". Every search request field the
double does not implement counts (autocut, sort, group_by, generative, rerank, near_text,
targets with several vectors, LIKE/IS_NULL/geo filters, reference filters, MMR, multi-
tenancy, auto-schema class creation, non-cosine distances, vectorizer modules, ...).
Errors a real server also raises (missing class, unknown property, wrong filter value type,
vector length mismatch) come back as gRPC ``UNKNOWN`` with Weaviate's wording, which is how
Weaviate's Go errors surface.

Every request is recorded (`searches`, `batches`, `rest_requests`) so tests can assert what
the client actually sent: alpha, vector, query, properties, limit, decoded filters.

Both servers bind ephemeral ports on 127.0.0.1 only. Start and stop with ``with``; start-up
waits on readiness events with a bound, never on sleeps.
"""

from __future__ import annotations

import json
import math
import re
import struct
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from weaviate.proto.v1 import (
    base_pb2,
    base_search_pb2,
    batch_pb2,
    properties_pb2,
    search_get_pb2,
    weaviate_pb2_grpc,
)

#: What `/v1/meta` reports. The client refuses servers older than 1.27 and picks wire
#: encodings by version (>= 1.29: typed `vectors`; >= 1.36.6: `alpha_param`).
DEFAULT_VERSION = "1.32.0"
#: Weaviate's `hybrid.DefaultLimit`: each hybrid sub-search fetches at least this many.
HYBRID_SUBSEARCH_LIMIT = 100
#: QUERY_DEFAULTS_LIMIT / QUERY_MAXIMUM_RESULTS of a default Weaviate.
QUERY_DEFAULT_LIMIT = 10
QUERY_MAXIMUM_RESULTS = 10_000
GRPC_MAX_MESSAGE = 104_858_000
#: Weaviate's "en" stopword preset (adapters/repos/db/inverted/stopwords/presets.go).
EN_STOPWORDS = frozenset(
    (
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "for",
        "if",
        "in",
        "into",
        "is",
        "it",
        "no",
        "not",
        "of",
        "on",
        "or",
        "such",
        "that",
        "the",
        "their",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "was",
        "will",
        "with",
    )
)
STOPWORD_PRESETS: dict[str, frozenset[str]] = {"en": EN_STOPWORDS, "none": frozenset()}
TOKENIZATIONS = ("word", "lowercase", "whitespace", "field")
PRIMITIVE_TYPES = ("text", "int", "number", "boolean")
VALUE_NAMES = {
    "text": "valueText",
    "int": "valueInt",
    "number": "valueNumber",
    "boolean": "valueBoolean",
}

_WORD = re.compile(r"[^\W_]+")
_CLASS_NAME = re.compile(r"^[A-Z][_0-9A-Za-z]*$")
_PROP_NAME = re.compile(r"^[_A-Za-z][_0-9A-Za-z]*$")

_F = base_pb2.Filters
_OP_NAMES = {
    _F.OPERATOR_EQUAL: "equal",
    _F.OPERATOR_NOT_EQUAL: "not_equal",
    _F.OPERATOR_GREATER_THAN: "greater_than",
    _F.OPERATOR_GREATER_THAN_EQUAL: "greater_or_equal",
    _F.OPERATOR_LESS_THAN: "less_than",
    _F.OPERATOR_LESS_THAN_EQUAL: "less_or_equal",
    _F.OPERATOR_AND: "and",
    _F.OPERATOR_OR: "or",
    _F.OPERATOR_NOT: "not",
    _F.OPERATOR_CONTAINS_ANY: "contains_any",
    _F.OPERATOR_CONTAINS_ALL: "contains_all",
    _F.OPERATOR_CONTAINS_NONE: "contains_none",
    _F.OPERATOR_LIKE: "like",
    _F.OPERATOR_IS_NULL: "is_null",
    _F.OPERATOR_WITHIN_GEO_RANGE: "within_geo_range",
}
_RANGE_OPS = {
    "greater_than": lambda a, b: a > b,
    "greater_or_equal": lambda a, b: a >= b,
    "less_than": lambda a, b: a < b,
    "less_or_equal": lambda a, b: a <= b,
}


class Refused(Exception):
    """A request the double does not implement: answered, never approximated."""

    def __init__(self, what: str) -> None:
        super().__init__(f"WeaviateProtocolDouble does not support {what}")


class ServerError(Exception):
    """An error a real Weaviate raises too, worded as Weaviate words it."""


def tokenize(tokenization: str, text: str) -> list[str]:
    """Weaviate's tokenizers (entities/tokenizer): the ones the double implements."""
    if tokenization == "word":
        return _WORD.findall(text.lower())
    if tokenization == "lowercase":
        return text.lower().split()
    if tokenization == "whitespace":
        return text.split()
    if tokenization == "field":
        stripped = text.strip()
        return [stripped] if stripped else []
    raise Refused(f"tokenization {tokenization!r}")


# -- recorded traffic ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchRecord:
    """One gRPC Search as the double decoded it, for tests to assert on."""

    collection: str
    kind: str  # "hybrid" | "bm25" | "near_vector"
    query: str | None
    alpha: float | None
    fusion: str | None  # "relative_score" | "ranked"
    vector: tuple[float, ...] | None
    target_vectors: tuple[str, ...]
    query_properties: tuple[str, ...]
    limit: int
    offset: int
    filters: dict[str, Any] | None
    return_properties: tuple[str, ...] | None  # None: all non-reference properties
    return_metadata: frozenset[str]
    raw: search_get_pb2.SearchRequest = field(repr=False, compare=False)


@dataclass(frozen=True)
class RestRecord:
    method: str
    path: str
    body: Any
    status: int


@dataclass(frozen=True)
class BatchRecord:
    collection_objects: tuple[tuple[str, str], ...]  # (collection, uuid) per object
    errors: dict[int, str]


# -- storage ------------------------------------------------------------------------------------


@dataclass
class _Prop:
    name: str
    data_type: str  # "text", "int[]", ...
    tokenization: str | None
    searchable: bool
    filterable: bool

    @property
    def base(self) -> str:
        return self.data_type.removesuffix("[]")

    @property
    def is_array(self) -> bool:
        return self.data_type.endswith("[]")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dataType": [self.data_type],
            "tokenization": self.tokenization,
            "indexFilterable": self.filterable,
            "indexSearchable": self.searchable,
            "indexRangeFilters": False,
        }


@dataclass(eq=False)  # identity-hashed: fusion keys results by object
class _Obj:
    uuid: uuid.UUID
    seq: int  # insertion order: the double's deterministic tie-break
    props: dict[str, Any]
    vectors: dict[str, np.ndarray]
    tf: dict[str, Counter[str]] = field(default_factory=dict)  # per searchable text prop
    length: dict[str, int] = field(default_factory=dict)  # token count per text prop
    tokens: dict[str, frozenset[str]] = field(default_factory=dict)  # for text filters


@dataclass
class _Collection:
    name: str
    props: dict[str, _Prop]
    vector_names: list[str]  # "" is the legacy unnamed vector
    k1: float
    b: float
    stopwords: frozenset[str]
    extra_json: dict[str, Any]
    objects: dict[uuid.UUID, _Obj] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {
            "class": self.name,
            "properties": [p.to_json() for p in self.props.values()],
            "invertedIndexConfig": {
                "bm25": {"k1": self.k1, "b": self.b},
                "stopwords": self.extra_json.get("stopwords_json"),
            },
            "multiTenancyConfig": {"enabled": False},
        }
        if self.vector_names == [""]:
            out["vectorizer"] = "none"
            out["vectorIndexType"] = "hnsw"
            out["vectorIndexConfig"] = {"distance": "cosine"}
        else:
            out["vectorConfig"] = {
                name: {
                    "vectorizer": {"none": {}},
                    "vectorIndexType": "hnsw",
                    "vectorIndexConfig": {"distance": "cosine"},
                }
                for name in self.vector_names
            }
        return out

    def mean_length(self, prop: str) -> float:
        lengths = [o.length[prop] for o in self.objects.values() if prop in o.length]
        return sum(lengths) / len(lengths) if lengths else 0.0


def _unpack_f32(data: bytes) -> np.ndarray:
    if len(data) % 4:
        raise ServerError("vector bytes are not a whole number of float32 values")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def _vectors_message(vectors: Sequence[base_pb2.Vectors], where: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for v in vectors:
        if v.type not in (
            base_pb2.Vectors.VECTOR_TYPE_UNSPECIFIED,
            base_pb2.Vectors.VECTOR_TYPE_SINGLE_FP32,
        ):
            raise Refused(f"multi-vectors ({where})")
        if v.index:
            raise Refused(f"Vectors.index ({where})")
        out[v.name] = _unpack_f32(v.vector_bytes)
    return out


def _check_fields(msg: Any, allowed: set[str], where: str) -> None:
    """Refuse every set field the double does not implement: nothing is silently dropped."""
    for fd, _ in msg.ListFields():
        if fd.name not in allowed:
            raise Refused(f"{where}.{fd.name}")


# -- the double ---------------------------------------------------------------------------------


class WeaviateProtocolDouble:
    """A TEST DOUBLE of a single-node Weaviate: REST + gRPC on 127.0.0.1, answers computed here.

    Use as a context manager; `http_port` and `grpc_port` are ephemeral. See the module
    docstring for what it implements and what it refuses.
    """

    def __init__(self, *, version: str = DEFAULT_VERSION, start_timeout: float = 10.0) -> None:
        self.version = version
        self.start_timeout = start_timeout
        self.searches: list[SearchRecord] = []
        self.batches: list[BatchRecord] = []
        self.rest_requests: list[RestRecord] = []
        #: gRPC health checks answered (the client's init checks send one per connect).
        self.health_checks = 0
        #: (where, message) of every refusal and server-side error the double answered.
        self.errors: list[tuple[str, str]] = []
        self._collections: dict[str, _Collection] = {}
        self._lock = threading.RLock()
        self._seq = 0
        self._http: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self._grpc: grpc.Server | None = None
        self.http_port = 0
        self.grpc_port = 0

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> WeaviateProtocolDouble:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._http.daemon_threads = True
        self.http_port = self._http.server_address[1]
        serving = threading.Event()

        def serve() -> None:
            serving.set()
            assert self._http is not None
            self._http.serve_forever(poll_interval=0.05)

        self._http_thread = threading.Thread(target=serve, name="weaviate-double-http", daemon=True)
        self._http_thread.start()
        if not serving.wait(self.start_timeout):
            raise RuntimeError("WeaviateProtocolDouble: REST server thread did not start")

        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="weaviate-double-grpc"),
            options=[
                ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
                ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
            ],
        )
        health_servicer = _CountingHealth(self)
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self._grpc)
        weaviate_pb2_grpc.add_WeaviateServicer_to_server(_Servicer(self), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        if not self.grpc_port:
            raise RuntimeError("WeaviateProtocolDouble: could not bind a gRPC port")
        self._grpc.start()  # returns once the server accepts calls

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=None).wait(self.start_timeout)
            self._grpc = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._http_thread is not None:
            self._http_thread.join(self.start_timeout)
            self._http_thread = None

    # -- inspection for tests -----------------------------------------------------------------

    def collection_names(self) -> list[str]:
        with self._lock:
            return sorted(self._collections)

    def objects(self, collection: str) -> dict[uuid.UUID, dict[str, Any]]:
        """Stored properties by UUID: what the double holds, for idempotency checks."""
        with self._lock:
            coll = self._collections[collection]
            return {u: dict(o.props) for u, o in coll.objects.items()}

    def vectors(self, collection: str) -> dict[uuid.UUID, dict[str, np.ndarray]]:
        with self._lock:
            coll = self._collections[collection]
            return {u: dict(o.vectors) for u, o in coll.objects.items()}

    def schema(self, collection: str) -> dict[str, Any]:
        with self._lock:
            return self._collections[collection].to_json()

    def reset_records(self) -> None:
        with self._lock:
            self.searches.clear()
            self.batches.clear()
            self.rest_requests.clear()
            self.errors.clear()

    # -- REST: schema -------------------------------------------------------------------------

    def rest(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        """Answer one REST call: (status, JSON body or None)."""
        path = path.split("?", 1)[0].rstrip("/") or "/"
        with self._lock:
            status, out = self._rest(method, path, body)
            self.rest_requests.append(RestRecord(method, path, body, status))
            return status, out

    def _rest(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if method in ("GET", "HEAD") and path == "/v1/meta":
            return 200, {
                "hostname": "http://127.0.0.1",
                "modules": {},
                "version": self.version,
                "grpcMaxMessageSize": GRPC_MAX_MESSAGE,
            }
        if method in ("GET", "HEAD") and path in ("/v1/.well-known/ready", "/v1/.well-known/live"):
            return 200, None
        if method == "GET" and path == "/v1/.well-known/openid-configuration":
            return 404, None  # anonymous access, as a default Weaviate
        if path == "/v1/schema":
            if method == "GET":
                return 200, {"classes": [c.to_json() for c in self._collections.values()]}
            if method == "POST":
                return self._create_class(body)
        parts = path.split("/")
        if len(parts) == 4 and parts[:3] == ["", "v1", "schema"]:
            name = parts[3]
            if method in ("GET", "HEAD"):
                coll = self._collections.get(name)
                return (200, coll.to_json()) if coll else (404, None)
            if method == "DELETE":
                self._collections.pop(name, None)  # Weaviate answers 200 either way
                return 200, None
        if (
            len(parts) == 5
            and parts[:3] == ["", "v1", "schema"]
            and parts[4] == "properties"
            and method == "POST"
        ):
            return self._add_property(parts[3], body)
        return 501, _rest_error(f"WeaviateProtocolDouble does not support {method} {path}")

    def _create_class(self, body: Any) -> tuple[int, Any]:
        try:
            coll = self._parse_class(body)
        except (Refused, ServerError) as e:
            self.errors.append(("POST /v1/schema", str(e)))
            return 422, _rest_error(str(e))
        if coll.name in self._collections:
            msg = f'class name "{coll.name}" already exists'
            self.errors.append(("POST /v1/schema", msg))
            return 422, _rest_error(msg)
        self._collections[coll.name] = coll
        return 200, coll.to_json()

    def _add_property(self, name: str, body: Any) -> tuple[int, Any]:
        coll = self._collections.get(name)
        if coll is None:
            return 404, _rest_error(f"could not find class {name} in schema")
        try:
            prop = _parse_property(body)
            if prop.name in coll.props:
                raise ServerError(f'property "{prop.name}" already exists')
        except (Refused, ServerError) as e:
            self.errors.append((f"POST /v1/schema/{name}/properties", str(e)))
            return 422, _rest_error(str(e))
        coll.props[prop.name] = prop
        for obj in coll.objects.values():
            self._index_text(coll, obj)
        return 200, prop.to_json()

    def _parse_class(self, body: Any) -> _Collection:
        if not isinstance(body, dict):
            raise ServerError("class body must be a JSON object")
        body = dict(body)
        name = body.pop("class", None)
        if not isinstance(name, str) or not _CLASS_NAME.match(name):
            raise ServerError(f"'{name}' is not a valid class name")
        props: dict[str, _Prop] = {}
        for raw in body.pop("properties", None) or []:
            prop = _parse_property(raw)
            if prop.name in props:
                raise ServerError(f"class '{name}' has duplicate property '{prop.name}'")
            props[prop.name] = prop
        if body.pop("references", None):
            raise Refused("reference properties")
        body.pop("description", None)

        inverted = body.pop("invertedIndexConfig", None) or {}
        bm25 = inverted.pop("bm25", None) or {}
        k1 = float(bm25.get("k1", 1.2))
        b = float(bm25.get("b", 0.75))
        stop = inverted.pop("stopwords", None) or {}
        preset = stop.get("preset") or "en"
        if preset not in STOPWORD_PRESETS:
            raise ServerError(f"stopwordPreset '{preset}' does not exist")
        stopwords = (set(STOPWORD_PRESETS[preset]) | set(stop.get("additions") or [])) - set(
            stop.get("removals") or []
        )
        for key in (
            "cleanupIntervalSeconds",
            "indexTimestamps",
            "indexNullState",
            "indexPropertyLength",
        ):
            inverted.pop(key, None)  # bookkeeping with no effect on answers
        if inverted:
            raise Refused(f"invertedIndexConfig keys {sorted(inverted)}")

        mt = body.pop("multiTenancyConfig", None) or {}
        if mt.get("enabled"):
            raise Refused("multi-tenancy")
        for key in ("replicationConfig", "shardingConfig"):
            cfg = body.pop(key, None) or {}
            if cfg.get("factor", 1) not in (1, None) or cfg.get("desiredCount", 1) not in (1, None):
                raise Refused(f"{key} other than a single node")

        vector_names: list[str]
        vector_config = body.pop("vectorConfig", None)
        legacy_vectorizer = body.pop("vectorizer", None)
        legacy_index = body.pop("vectorIndexConfig", None)
        legacy_type = body.pop("vectorIndexType", None)
        module_config = body.pop("moduleConfig", None)
        if module_config:
            raise Refused(f"moduleConfig {sorted(module_config)}")
        if vector_config:
            if legacy_vectorizer not in (None, "none") or legacy_index:
                raise Refused("a legacy vector next to named vectors")
            vector_names = []
            for vname, cfg in vector_config.items():
                vectorizer = cfg.get("vectorizer") or {"none": {}}
                if set(vectorizer) != {"none"}:
                    raise Refused(f"vectorizer modules ({sorted(vectorizer)})")
                _check_vector_index(cfg.get("vectorIndexType"), cfg.get("vectorIndexConfig"))
                vector_names.append(vname)
        else:
            if legacy_vectorizer not in (None, "none"):
                raise Refused(f"vectorizer module {legacy_vectorizer!r}")
            _check_vector_index(legacy_type, legacy_index)
            vector_names = [""]
        if body:
            raise Refused(f"class keys {sorted(body)}")
        return _Collection(
            name=name,
            props=props,
            vector_names=vector_names,
            k1=k1,
            b=b,
            stopwords=frozenset(stopwords),
            extra_json={
                "stopwords_json": {
                    "preset": preset,
                    "additions": stop.get("additions"),
                    "removals": stop.get("removals"),
                }
            },
        )

    # -- gRPC: BatchObjects -------------------------------------------------------------------

    def batch_objects(self, request: batch_pb2.BatchObjectsRequest) -> batch_pb2.BatchObjectsReply:
        started = time.perf_counter()
        errors: dict[int, str] = {}
        seen: list[tuple[str, str]] = []
        with self._lock:
            for i, obj in enumerate(request.objects):
                seen.append((obj.collection, obj.uuid))
                try:
                    self._store(obj)
                except (Refused, ServerError) as e:
                    errors[i] = str(e)
                    self.errors.append(("BatchObjects", str(e)))
            self.batches.append(BatchRecord(tuple(seen), dict(errors)))
        return batch_pb2.BatchObjectsReply(
            took=time.perf_counter() - started,
            errors=[
                batch_pb2.BatchObjectsReply.BatchError(index=i, error=e) for i, e in errors.items()
            ],
        )

    def _store(self, obj: batch_pb2.BatchObject) -> None:
        _check_fields(
            obj,
            {"uuid", "properties", "collection", "vector_bytes", "vectors", "vector"},
            "BatchObject",
        )
        coll = self._collections.get(obj.collection)
        if coll is None:
            raise Refused(f"auto-schema class creation (class {obj.collection!r} does not exist)")
        try:
            oid = uuid.UUID(obj.uuid)
        except ValueError as e:
            raise ServerError(f"invalid UUID {obj.uuid!r}") from e

        vectors: dict[str, np.ndarray] = {}
        if obj.vector_bytes or len(obj.vector):
            legacy = (
                _unpack_f32(obj.vector_bytes)
                if obj.vector_bytes
                else np.asarray(obj.vector, dtype=np.float32)
            )
            if len(coll.vector_names) != 1:
                raise ServerError("collection has several named vectors: a vector name is required")
            vectors[coll.vector_names[0]] = legacy
        for name, vec in _vectors_message(obj.vectors, "BatchObject.vectors").items():
            if name not in coll.vector_names:
                raise ServerError(f"collection {coll.name} does not have named vector {name!r}")
            vectors[name] = vec
        for name, vec in vectors.items():
            if vec.size == 0:
                raise ServerError("empty vector")
            known = coll.dims.get(name)
            if known is not None and known != vec.size:
                raise ServerError(
                    f"new node has a vector with length {vec.size}. "
                    f"Existing nodes have vectors with length {known}"
                )

        props = (
            self._parse_batch_properties(coll, obj.properties) if obj.HasField("properties") else {}
        )
        for name, vec in vectors.items():
            coll.dims.setdefault(name, vec.size)
        self._seq += 1
        stored = _Obj(uuid=oid, seq=self._seq, props=props, vectors=vectors)
        self._index_text(coll, stored)
        coll.objects[oid] = stored  # same UUID: the object is replaced, as Weaviate does

    def _parse_batch_properties(
        self, coll: _Collection, p: batch_pb2.BatchObject.Properties
    ) -> dict[str, Any]:
        _check_fields(
            p,
            {
                "non_ref_properties",
                "text_array_properties",
                "int_array_properties",
                "number_array_properties",
                "boolean_array_properties",
                "empty_list_props",
            },
            "BatchObject.properties",
        )
        raw: dict[str, tuple[Any, str | None]] = {}  # name -> (value, array type if typed)
        for name, value in json_format.MessageToDict(p.non_ref_properties).items():
            raw[name] = (value, None)
        for arr in p.text_array_properties:
            raw[arr.prop_name] = (list(arr.values), "text[]")
        for arr in p.int_array_properties:
            raw[arr.prop_name] = ([int(v) for v in arr.values], "int[]")
        for arr in p.number_array_properties:
            vals = (
                list(struct.unpack(f"<{len(arr.values_bytes) // 8}d", arr.values_bytes))
                if arr.values_bytes
                else list(arr.values)
            )
            raw[arr.prop_name] = ([float(v) for v in vals], "number[]")
        for arr in p.boolean_array_properties:
            raw[arr.prop_name] = ([bool(v) for v in arr.values], "boolean[]")
        for name in p.empty_list_props:
            raw[name] = ([], None)

        out: dict[str, Any] = {}
        for name, (value, typed) in raw.items():
            if value is None:
                continue
            if not _PROP_NAME.match(name) or name in ("id", "_id", "_additional"):
                raise ServerError(f"'{name}' is not a valid property name")
            prop = coll.props.get(name)
            if prop is None:
                if value == []:
                    continue  # auto-schema cannot type an empty list; Weaviate skips it
                prop = _auto_schema(name, value, typed)
                coll.props[name] = prop
            out[name] = _coerce(prop, value)
        return out

    def _index_text(self, coll: _Collection, obj: _Obj) -> None:
        obj.tf.clear()
        obj.length.clear()
        obj.tokens.clear()
        for prop in coll.props.values():
            if prop.base != "text" or prop.name not in obj.props:
                continue
            value = obj.props[prop.name]
            values = value if isinstance(value, list) else [value]
            toks = [t for v in values for t in tokenize(prop.tokenization or "word", v)]
            obj.tokens[prop.name] = frozenset(toks)
            if prop.searchable:
                obj.tf[prop.name] = Counter(toks)
                obj.length[prop.name] = len(toks)

    # -- gRPC: Search -------------------------------------------------------------------------

    def search(self, req: search_get_pb2.SearchRequest) -> search_get_pb2.SearchReply:
        started = time.perf_counter()
        _check_fields(
            req,
            {
                "collection",
                "consistency_level",
                "properties",
                "metadata",
                "limit",
                "offset",
                "filters",
                "hybrid_search",
                "bm25_search",
                "near_vector",
                "uses_123_api",
                "uses_125_api",
                "uses_127_api",
            },
            "SearchRequest",
        )
        with self._lock:
            record, run = self._plan(req)
            self.searches.append(record)
            hits = run()
        metadata_wanted = record.return_metadata
        results = []
        for obj, score, distance in hits:
            meta = search_get_pb2.MetadataResult(id=str(obj.uuid), id_as_bytes=obj.uuid.bytes)
            if score is not None and "score" in metadata_wanted:
                meta.score = score
                meta.score_present = True
            if distance is not None and "distance" in metadata_wanted:
                meta.distance = distance
                meta.distance_present = True
            if distance is not None and "certainty" in metadata_wanted:
                meta.certainty = 1.0 - distance / 2.0
                meta.certainty_present = True
            props = self._reply_properties(record, obj)
            results.append(search_get_pb2.SearchResult(metadata=meta, properties=props))
        return search_get_pb2.SearchReply(took=time.perf_counter() - started, results=results)

    def _plan(
        self,
        req: search_get_pb2.SearchRequest,
    ) -> tuple[SearchRecord, Callable[[], list[tuple[_Obj, float | None, float | None]]]]:
        kinds = [k for k in ("hybrid_search", "bm25_search", "near_vector") if req.HasField(k)]
        if len(kinds) != 1:
            raise Refused("searches without exactly one of hybrid, bm25, near_vector")
        kind = kinds[0]
        filters_json = _filter_json(req.filters) if req.HasField("filters") else None
        return_props = self._return_properties(req)
        return_meta = self._return_metadata(req)
        limit = req.limit or QUERY_DEFAULT_LIMIT
        offset = req.offset
        if limit + offset > QUERY_MAXIMUM_RESULTS:
            raise ServerError(f"query maximum results exceeded: limit {limit} + offset {offset}")

        query: str | None = None
        alpha: float | None = None
        fusion: str | None = None
        vector: np.ndarray | None = None
        targets: tuple[str, ...] = ()
        qprops: tuple[str, ...] = ()
        if kind == "hybrid_search":
            h = req.hybrid_search
            _check_fields(
                h,
                {
                    "query",
                    "properties",
                    "vector",
                    "alpha",
                    "fusion_type",
                    "vector_bytes",
                    "target_vectors",
                    "near_vector",
                    "targets",
                    "alpha_param",
                    "use_alpha_param",
                    "vectors",
                },
                "Hybrid",
            )
            query = h.query
            qprops = tuple(h.properties)
            if h.use_alpha_param:
                if not h.HasField("alpha_param"):
                    raise Refused("hybrid without alpha_param (the server-side default alpha)")
                alpha = float(h.alpha_param)
            else:
                alpha = float(h.alpha)
            if not 0.0 <= alpha <= 1.0:
                raise ServerError(f"alpha must be between 0 and 1, got {alpha}")
            fusion = {
                base_search_pb2.Hybrid.FUSION_TYPE_UNSPECIFIED: "relative_score",
                base_search_pb2.Hybrid.FUSION_TYPE_RELATIVE_SCORE: "relative_score",
                base_search_pb2.Hybrid.FUSION_TYPE_RANKED: "ranked",
            }[h.fusion_type]
            vector = _one_query_vector(h, "Hybrid")
            if h.HasField("near_vector"):
                if vector is not None:
                    raise ServerError("hybrid search: cannot have both vector and nearVectorParams")
                nv = h.near_vector
                _check_fields(nv, {"vector_bytes", "vectors", "vector"}, "Hybrid.near_vector")
                vector = _one_query_vector(nv, "Hybrid.near_vector")
            targets = _targets(h)
        elif kind == "bm25_search":
            bm = req.bm25_search
            _check_fields(bm, {"query", "properties"}, "BM25")
            query = bm.query
            qprops = tuple(bm.properties)
        else:
            nv = req.near_vector
            _check_fields(
                nv,
                {
                    "vector_bytes",
                    "vectors",
                    "vector",
                    "targets",
                    "target_vectors",
                    "distance",
                    "certainty",
                },
                "NearVector",
            )
            vector = _one_query_vector(nv, "NearVector")
            if vector is None:
                raise ServerError("near_vector: no vector given")
            targets = _targets(nv)
        if kind == "hybrid_search" and offset:
            raise Refused("offset in hybrid search")

        record = SearchRecord(
            collection=req.collection,
            kind={"hybrid_search": "hybrid", "bm25_search": "bm25", "near_vector": "near_vector"}[
                kind
            ],
            query=query,
            alpha=alpha,
            fusion=fusion,
            vector=None if vector is None else tuple(float(x) for x in vector),
            target_vectors=targets,
            query_properties=qprops,
            limit=limit,
            offset=offset,
            filters=filters_json,
            return_properties=return_props,
            return_metadata=return_meta,
            raw=search_get_pb2.SearchRequest.FromString(req.SerializeToString()),
        )

        coll = self._collections.get(req.collection)
        if coll is None:
            raise ServerError(f"could not find class {req.collection} in schema")
        if return_props is not None:
            for name in return_props:
                if name not in coll.props:
                    raise ServerError(_no_such_prop(name, coll.name))
        predicate = _FilterCompiler(coll).compile(req.filters) if req.HasField("filters") else None
        candidates = [o for o in coll.objects.values() if predicate is None or predicate(o)]

        def run() -> list[tuple[_Obj, float | None, float | None]]:
            if kind == "bm25_search":
                ranked = self._bm25(coll, query or "", qprops, candidates)
                page = ranked[offset : offset + limit]
                return [(o, s, None) for o, s in page]
            if kind == "near_vector":
                nv = req.near_vector
                ranked_d = self._near(coll, _vector_name(coll, targets), vector, candidates)
                if nv.HasField("distance"):
                    ranked_d = [(o, d) for o, d in ranked_d if d <= nv.distance]
                if nv.HasField("certainty"):
                    ranked_d = [(o, d) for o, d in ranked_d if 1 - d / 2 >= nv.certainty]
                page_d = ranked_d[offset : offset + limit]
                return [(o, None, d) for o, d in page_d]
            assert alpha is not None and fusion is not None
            fused = self._hybrid(
                coll, query or "", qprops, alpha, fusion, vector, targets, candidates, limit
            )
            return [(o, s, None) for o, s in fused[:limit]]

        return record, run

    def _return_properties(self, req: search_get_pb2.SearchRequest) -> tuple[str, ...] | None:
        if not req.HasField("properties"):
            return None  # Weaviate: no PropertiesRequest -> all non-reference properties
        p = req.properties
        _check_fields(
            p, {"non_ref_properties", "return_all_nonref_properties"}, "PropertiesRequest"
        )
        if p.return_all_nonref_properties:
            return None
        return tuple(p.non_ref_properties)

    def _return_metadata(self, req: search_get_pb2.SearchRequest) -> frozenset[str]:
        if not req.HasField("metadata"):
            return frozenset({"uuid"})
        m = req.metadata
        _check_fields(m, {"uuid", "distance", "score", "certainty"}, "MetadataRequest")
        return frozenset(fd.name for fd, v in m.ListFields() if v) | {"uuid"}

    def _reply_properties(self, record: SearchRecord, obj: _Obj) -> search_get_pb2.PropertiesResult:
        coll = self._collections[record.collection]
        names = (
            record.return_properties if record.return_properties is not None else list(coll.props)
        )
        fields = {}
        for name in names:
            if name in obj.props:
                fields[name] = _to_value(coll.props[name], obj.props[name])
        return search_get_pb2.PropertiesResult(
            non_ref_props=properties_pb2.Properties(fields=fields),
            target_collection=coll.name,
        )

    # -- the three searches -------------------------------------------------------------------

    def _bm25(
        self, coll: _Collection, query: str, props: Sequence[str], candidates: Sequence[_Obj]
    ) -> list[tuple[_Obj, float]]:
        boosts: dict[str, float] = {}
        for spec in props or [
            p.name for p in coll.props.values() if p.searchable and p.base == "text"
        ]:
            name, _, boost = spec.partition("^")
            prop = coll.props.get(name)
            if prop is None:
                raise ServerError(_no_such_prop(name, coll.name))
            if not prop.searchable or prop.base != "text":
                raise ServerError(
                    f"property '{name}' is not indexed searchable or not of type text: "
                    "cannot be used in a keyword search"
                )
            boosts[name] = float(boost) if boost else 1.0
        if not boosts:
            return []
        n_total = len(coll.objects)
        avg_len = sum(coll.mean_length(p) for p in boosts) / len(boosts)
        by_tokenization: dict[str, list[str]] = defaultdict(list)
        for name in boosts:
            by_tokenization[coll.props[name].tokenization or "word"].append(name)

        scores: dict[uuid.UUID, float] = defaultdict(float)
        for tokenization, names in by_tokenization.items():
            terms = tokenize(tokenization, query)
            if tokenization == "word":
                terms = [t for t in terms if t not in coll.stopwords]
            for term, repeats in Counter(terms).items():
                n = sum(
                    1 for o in coll.objects.values() if any(term in o.tf.get(p, ()) for p in names)
                )
                if n == 0:
                    continue
                idf = math.log(1.0 + (n_total - n + 0.5) / (n + 0.5)) * repeats
                for o in candidates:
                    freq = sum(o.tf.get(p, Counter())[term] * boosts[p] for p in names)
                    if freq == 0:
                        continue
                    length = sum(o.length.get(p, 0) for p in names if term in o.tf.get(p, ()))
                    norm = coll.k1 * (1.0 - coll.b + coll.b * length / avg_len)
                    scores[o.uuid] += idf * freq / (freq + norm)
        ranked = sorted(scores.items(), key=lambda kv: (-kv[1], coll.objects[kv[0]].seq))
        return [(coll.objects[u], float(np.float32(s))) for u, s in ranked]

    def _near(
        self,
        coll: _Collection,
        vector_name: str,
        query: np.ndarray | None,
        candidates: Sequence[_Obj],
    ) -> list[tuple[_Obj, float]]:
        if query is None:
            raise ServerError("no vector or modules provided for hybrid search")
        dim = coll.dims.get(vector_name)
        if dim is not None and dim != query.size:
            raise ServerError(f"vector search: vector lengths don't match: {query.size} vs {dim}")
        q = query.astype(np.float32)
        qn = float(np.linalg.norm(q))
        if qn == 0.0:
            raise ServerError("vector search: query vector has zero length")
        out = []
        for o in candidates:
            v = o.vectors.get(vector_name)
            if v is None:
                continue
            vn = float(np.linalg.norm(v))
            dist = 1.0 - float(np.dot(v / vn, q / qn)) if vn else 1.0
            out.append((o, float(np.float32(dist))))
        out.sort(key=lambda od: (od[1], od[0].seq))
        return out

    def _hybrid(
        self,
        coll: _Collection,
        query: str,
        props: Sequence[str],
        alpha: float,
        fusion: str,
        vector: np.ndarray | None,
        targets: tuple[str, ...],
        candidates: Sequence[_Obj],
        limit: int,
    ) -> list[tuple[_Obj, float]]:
        sub_limit = max(HYBRID_SUBSEARCH_LIMIT, limit)
        sets: list[list[tuple[_Obj, float]]] = []
        weights: list[float] = []
        if alpha < 1 and query:
            sets.append(self._bm25(coll, query, props, candidates)[:sub_limit])
            weights.append(1.0 - alpha)
        if alpha > 0:
            dense = self._near(coll, _vector_name(coll, targets), vector, candidates)[:sub_limit]
            sets.append([(o, 1.0 - d) for o, d in dense])
            weights.append(alpha)
        return fuse(sets, weights, fusion)


def fuse(
    sets: Sequence[Sequence[tuple[Any, float]]], weights: Sequence[float], fusion: str
) -> list[tuple[Any, float]]:
    """Weaviate's FusionRelativeScore / FusionRanked over (item, score) lists, best first.

    Items must be hashable and expose `.seq` (or be comparable) only for the final tie-break.
    """
    total: dict[Any, float] = defaultdict(float)
    secondary: dict[Any, float] = {}
    for results, weight in zip(sets, weights, strict=True):
        if not results:
            continue
        values = [s for _, s in results]
        hi, lo = max(values), min(values)
        for rank, (item, value) in enumerate(results):
            if fusion == "ranked":
                contribution = weight / (rank + 60)
            elif hi == lo:
                contribution = weight
            else:
                contribution = weight * (value - lo) / (hi - lo)
            total[item] += contribution
            secondary[item] = value
    ranked = sorted(total, key=lambda it: (-total[it], -secondary[it], getattr(it, "seq", 0)))
    return [(it, float(np.float32(total[it]))) for it in ranked]


# -- filters ------------------------------------------------------------------------------------


def _filter_json(f: base_pb2.Filters) -> dict[str, Any]:
    """A plain-dict view of a Filters message, for recording (no validation)."""
    op = _OP_NAMES.get(f.operator, f"operator_{f.operator}")
    if op in ("and", "or", "not"):
        return {"op": op, "filters": [_filter_json(c) for c in f.filters]}
    which = f.WhichOneof("test_value")
    value = getattr(f, which) if which else None
    if which and which.endswith("_array"):
        value = list(value.values)
    if f.HasField("target"):
        kind = f.target.WhichOneof("target")
        prop = f.target.property if kind == "property" else f"<{kind}>"
    else:
        prop = ".".join(f.on)
    return {"op": op, "property": prop, "value": value}


def _value_of(f: base_pb2.Filters) -> tuple[str, Any, bool]:
    """(base value type, value, is_array) of a leaf filter's oneof."""
    which = f.WhichOneof("test_value")
    if which is None:
        raise ServerError("unknown value type None")
    mapping = {
        "value_text": ("text", False),
        "value_int": ("int", False),
        "value_boolean": ("boolean", False),
        "value_number": ("number", False),
        "value_text_array": ("text", True),
        "value_int_array": ("int", True),
        "value_boolean_array": ("boolean", True),
        "value_number_array": ("number", True),
    }
    if which not in mapping:
        raise Refused(f"filter value {which}")
    base, is_array = mapping[which]
    value = getattr(f, which)
    return base, (list(value.values) if is_array else value), is_array


def _compile_leaf_value(prop: _Prop, f: base_pb2.Filters) -> tuple[Any, bool]:
    vtype, value, is_array = _value_of(f)
    dt = prop.base
    values = value if is_array else [value]
    if dt == "number" and vtype == "int":
        values = [float(v) for v in values]
    elif dt == "int" and vtype == "number":
        for v in values:
            if float(v) != int(v):
                raise ServerError(
                    f"filtering for integer, but received a floating point number {v}"
                )
        values = [int(v) for v in values]
    elif dt != vtype:
        raise ServerError(
            f"invalid 'where' filter: data type filter cannot use \"{VALUE_NAMES[vtype]}\" on "
            f'type "{prop.data_type}", use "{VALUE_NAMES[dt]}" instead'
        )
    return (values if is_array else values[0]), is_array


class _FilterCompiler:
    def __init__(self, coll: _Collection) -> None:
        self.coll = coll

    def compile(self, f: base_pb2.Filters) -> Callable[[_Obj], bool]:
        op = _OP_NAMES.get(f.operator)
        if op is None:
            raise ServerError(f"unknown filter operator {f.operator}")
        if op in ("and", "or"):
            if not f.filters:
                raise ServerError(f"operator {op} needs operands")
            subs = [self.compile(c) for c in f.filters]
            return (
                (lambda o: all(s(o) for s in subs))
                if op == "and"
                else (lambda o: any(s(o) for s in subs))
            )
        if op == "not":
            if len(f.filters) != 1:
                raise ServerError("operator not needs exactly one operand")
            sub = self.compile(f.filters[0])
            return lambda o: not sub(o)
        if op in ("like", "is_null", "within_geo_range"):
            raise Refused(f"the {op} filter operator")
        name = self._property(f)
        prop = self.coll.props.get(name)
        if prop is None:
            raise ServerError(_no_such_prop(name, self.coll.name))
        if not prop.filterable:
            raise ServerError(f"property '{name}' is not indexed filterable")
        value, is_array = _compile_leaf_value(prop, f)
        if op in ("contains_any", "contains_all", "contains_none"):
            needles = value if is_array else [value]
            if not needles:
                raise ServerError("Filtering on empty lists is not supported")
            if op == "contains_any":
                return lambda o: any(self._has(prop, o, v) for v in needles)
            if op == "contains_all":
                return lambda o: all(self._has(prop, o, v) for v in needles)
            return lambda o: not any(self._has(prop, o, v) for v in needles)
        if is_array:
            raise ServerError(f"operator {op} needs a single value, not an array")
        if op == "equal":
            return lambda o: self._has(prop, o, value)
        if op == "not_equal":
            return lambda o: not self._has(prop, o, value)
        if prop.base not in ("int", "number"):
            raise Refused(f"range operator {op} on {prop.data_type} properties")
        cmp = _RANGE_OPS[op]

        def ranged(o: _Obj) -> bool:
            if prop.name not in o.props:
                return False
            stored = o.props[prop.name]
            return any(cmp(x, value) for x in (stored if prop.is_array else [stored]))

        return ranged

    def _property(self, f: base_pb2.Filters) -> str:
        if f.HasField("target"):
            kind = f.target.WhichOneof("target")
            if kind != "property":
                raise Refused(f"filters on {kind} targets (references)")
            name = f.target.property
        elif len(f.on) == 1:
            name = f.on[0]
        else:
            raise Refused("reference paths in filters")
        if name.startswith("_") or name.startswith("len("):
            raise Refused(f"filters on the internal property {name!r}")
        return name

    def _has(self, prop: _Prop, o: _Obj, value: Any) -> bool:
        if prop.name not in o.props:
            return False
        if prop.base == "text":
            needle = tokenize(prop.tokenization or "word", value)
            return bool(needle) and set(needle) <= o.tokens.get(prop.name, frozenset())
        stored = o.props[prop.name]
        return value in stored if prop.is_array else stored == value


def _no_such_prop(name: str, cls: str) -> str:
    return (
        f"no such prop with name '{name}' found in class '{cls}' in the schema. Check your "
        "schema files for which properties in this class are available"
    )


# -- schema and value helpers -------------------------------------------------------------------


def _check_vector_index(index_type: Any, config: Any) -> None:
    if index_type not in (None, "hnsw", "flat"):
        raise Refused(f"vector index type {index_type!r}")
    distance = (config or {}).get("distance", "cosine")
    if distance != "cosine":
        raise Refused(f"vector distance {distance!r} (only cosine)")
    for key in ("multivector", "pq", "bq", "sq", "rq"):
        sub = (config or {}).get(key)
        if isinstance(sub, dict) and sub.get("enabled"):
            raise Refused(f"vector index option {key}")


def _parse_property(raw: Any) -> _Prop:
    if not isinstance(raw, dict):
        raise ServerError("property must be a JSON object")
    raw = dict(raw)
    name = raw.pop("name", None)
    if not isinstance(name, str) or not _PROP_NAME.match(name):
        raise ServerError(f"'{name}' is not a valid property name")
    data_type = raw.pop("dataType", None)
    if not isinstance(data_type, list) or len(data_type) != 1:
        raise ServerError(f"property '{name}': dataType must be a list with one type")
    dt = data_type[0]
    if dt.removesuffix("[]") not in PRIMITIVE_TYPES:
        raise Refused(f"property data type {dt!r}")
    tokenization = raw.pop("tokenization", None)
    if dt.startswith("text"):
        tokenization = tokenization or "word"
        if tokenization not in TOKENIZATIONS:
            raise Refused(f"tokenization {tokenization!r}")
    elif tokenization:
        raise ServerError(f"tokenization is not allowed for data type '{dt}'")
    searchable = raw.pop("indexSearchable", None)
    filterable = raw.pop("indexFilterable", None)
    if raw.pop("indexRangeFilters", None):
        raise Refused("indexRangeFilters")
    # No effect without a vectorizer module. (The v4 client sends the snake_case spellings
    # inside each property; Weaviate's JSON decoding ignores keys it does not know.)
    for key in (
        "description",
        "moduleConfig",
        "indexInverted",
        "skipVectorization",
        "vectorizePropertyName",
        "skip_vectorization",
        "vectorize_property_name",
    ):
        raw.pop(key, None)
    if raw.pop("nestedProperties", None):
        raise Refused("nested properties")
    if raw.get("textAnalyzer"):
        raise Refused("textAnalyzer")
    raw.pop("textAnalyzer", None)
    if raw:
        raise Refused(f"property keys {sorted(raw)}")
    return _Prop(
        name=name,
        data_type=dt,
        tokenization=tokenization,
        searchable=(
            dt.startswith("text")
            if searchable is None
            else bool(searchable) and dt.startswith("text")
        ),
        filterable=True if filterable is None else bool(filterable),
    )


def _auto_schema(name: str, value: Any, typed: str | None) -> _Prop:
    """Weaviate's auto-schema for a property it has not seen (numbers become "number")."""
    if typed is not None:
        dt = typed
    else:
        sample = value[0] if isinstance(value, list) else value
        if isinstance(sample, bool):
            dt = "boolean"
        elif isinstance(sample, int | float):
            dt = "number"
        elif isinstance(sample, str):
            try:
                datetime.fromisoformat(sample.replace("Z", "+00:00"))
            except ValueError:
                dt = "text"
            else:
                raise Refused(f"auto-schema of date property {name!r}")
        else:
            raise Refused(f"auto-schema of {type(sample).__name__} property {name!r}")
        if isinstance(value, list):
            dt += "[]"
    return _Prop(
        name=name,
        data_type=dt,
        tokenization="word" if dt.startswith("text") else None,
        searchable=dt.startswith("text"),
        filterable=True,
    )


def _coerce(prop: _Prop, value: Any) -> Any:
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) != prop.is_array:
        raise ServerError(
            f"invalid {prop.data_type} property '{prop.name}' on class: "
            f"{'not a list' if prop.is_array else 'unexpected list'}: {value!r}"
        )
    out = []
    for v in values:
        if prop.base == "text":
            if not isinstance(v, str):
                raise ServerError(
                    f"invalid text property '{prop.name}' on class: not a string, "
                    f"but {type(v).__name__}"
                )
            out.append(v)
        elif prop.base == "boolean":
            if not isinstance(v, bool):
                raise ServerError(f"invalid boolean property '{prop.name}': {v!r}")
            out.append(v)
        elif prop.base == "int":
            if isinstance(v, bool) or not isinstance(v, int | float) or float(v) != int(v):
                raise ServerError(
                    f"invalid integer property '{prop.name}' on class: "
                    f"requires integer, the given value is {v!r}"
                )
            out.append(int(v))
        else:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ServerError(f"invalid number property '{prop.name}': {v!r}")
            out.append(float(v))
    return out if prop.is_array else out[0]


def _to_value(prop: _Prop, value: Any) -> properties_pb2.Value:
    """A stored value in the reply shape Weaviate uses for uses_125_api clients."""
    if prop.is_array:
        if prop.base == "text":
            lv = properties_pb2.ListValue(text_values=properties_pb2.TextValues(values=value))
        elif prop.base == "int":
            lv = properties_pb2.ListValue(
                int_values=properties_pb2.IntValues(values=struct.pack(f"<{len(value)}q", *value))
            )
        elif prop.base == "number":
            lv = properties_pb2.ListValue(
                number_values=properties_pb2.NumberValues(
                    values=struct.pack(f"<{len(value)}d", *value)
                )
            )
        else:
            lv = properties_pb2.ListValue(bool_values=properties_pb2.BoolValues(values=value))
        return properties_pb2.Value(list_value=lv)
    if prop.base == "text":
        return properties_pb2.Value(text_value=value)
    if prop.base == "int":
        return properties_pb2.Value(int_value=value)
    if prop.base == "number":
        return properties_pb2.Value(number_value=value)
    return properties_pb2.Value(bool_value=value)


def _one_query_vector(msg: Any, where: str) -> np.ndarray | None:
    """The single query vector of a Hybrid / NearVector message, whichever field carries it."""
    found: list[np.ndarray] = []
    if msg.vector_bytes:
        found.append(_unpack_f32(msg.vector_bytes))
    if len(msg.vector):
        found.append(np.asarray(msg.vector, dtype=np.float32))
    if len(msg.vectors):
        named = _vectors_message(msg.vectors, f"{where}.vectors")
        if len(named) != 1:
            raise Refused(f"several query vectors ({where})")
        found.extend(named.values())
    if len(found) > 1:
        raise ServerError(f"{where}: the query vector is given twice")
    return found[0] if found else None


def _targets(msg: Any) -> tuple[str, ...]:
    names = list(msg.target_vectors)
    if msg.HasField("targets"):
        t = msg.targets
        _check_fields(t, {"target_vectors"}, "Targets")
        names.extend(t.target_vectors)
    names = list(dict.fromkeys(names))
    if len(names) > 1:
        raise Refused("multi-target vector search")
    return tuple(names)


def _vector_name(coll: _Collection, targets: tuple[str, ...]) -> str:
    if targets:
        if targets[0] not in coll.vector_names:
            raise ServerError(f"target vector {targets[0]!r} not found in collection {coll.name}")
        return targets[0]
    if len(coll.vector_names) != 1:
        raise ServerError("multiple target vectors configured: a target vector is required")
    return coll.vector_names[0]


def _rest_error(message: str) -> dict[str, Any]:
    return {"error": [{"message": message}]}


# -- transports ---------------------------------------------------------------------------------


def _make_handler(double: WeaviateProtocolDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client's httpx pool expects

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                status, out = 400, _rest_error("request body is not JSON")
            else:
                status, out = double.rest(self.command, self.path, body)
            payload = b"" if out is None else json.dumps(out).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

    return Handler


class _CountingHealth(health.HealthServicer):
    """The standard grpc.health.v1 servicer, counting checks so tests see the handshake."""

    def __init__(self, double: WeaviateProtocolDouble) -> None:
        super().__init__()
        self._double = double

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._double._lock:
            self._double.health_checks += 1
        return super().Check(request, context)


class _Servicer(weaviate_pb2_grpc.WeaviateServicer):
    """gRPC face of the double: Search and BatchObjects; everything else UNIMPLEMENTED."""

    def __init__(self, double: WeaviateProtocolDouble) -> None:
        self._double = double

    def Search(
        self, request: search_get_pb2.SearchRequest, context: grpc.ServicerContext
    ) -> search_get_pb2.SearchReply:
        with _answer_errors(self._double, "Search", context):
            return self._double.search(request)
        return search_get_pb2.SearchReply()  # unreachable: context.abort raised

    def BatchObjects(
        self, request: batch_pb2.BatchObjectsRequest, context: grpc.ServicerContext
    ) -> batch_pb2.BatchObjectsReply:
        with _answer_errors(self._double, "BatchObjects", context):
            return self._double.batch_objects(request)
        return batch_pb2.BatchObjectsReply()


class _answer_errors:
    """Turn Refused / ServerError into the gRPC status a client sees, and record them."""

    def __init__(
        self, double: WeaviateProtocolDouble, where: str, context: grpc.ServicerContext
    ) -> None:
        self._double, self._where, self._context = double, where, context

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, Refused | ServerError):
            with self._double._lock:
                self._double.errors.append((self._where, str(exc)))
            code = (
                grpc.StatusCode.INVALID_ARGUMENT
                if isinstance(exc, Refused)
                else grpc.StatusCode.UNKNOWN
            )
            self._context.abort(code, str(exc))
        return False

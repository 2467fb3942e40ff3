"""`hybrid_search`: first stage natively in the vector DB, then the sidecar reranks.

    from rerankd import hybrid_search
    from rerankd.connectors.qdrant import QdrantConnector
    result = hybrid_search("docs", "what is rerankd?", connector=QdrantConnector(client))

The query is text (embedded through the sidecar's `Embed`) or a ready dense vector (then
pass `query_text` for BM25/sparse modes and for reranking). Fail-open: when the sidecar is
unreachable, slow or failing, the first-stage order comes back with `reranked=False` and
the reason, unless `fail_open=False`. Errors from the DB itself always raise
`ConnectorError` naming the DB and the collection.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

from rerankd.client import AsyncRerankClient, Embeddings, RerankClient
from rerankd.connectors.base import MODES, Connector, FirstStageQuery
from rerankd.engine.limits import Limits
from rerankd.errors import AuthenticationError, InvalidInputError, RerankdError
from rerankd.types import Candidate, Hit, RerankResponse, SearchResult, SearchTimings, SparseVector

DEFAULT_ADDRESS = "127.0.0.1:50051"
_SURROGATE = re.compile("[\ud800-\udfff]")
#: Characters of each stored document sent to be reranked: the sidecar's default
#: --max-document-chars, far more than the model reads (at most max_doc_tokens tokens).
MAX_DOCUMENT_CHARS = Limits().max_document_chars
_default_client: RerankClient | None = None
_default_lock = threading.Lock()


def default_client() -> RerankClient:
    """A process-wide client for `$RERANKD_ADDRESS` (comma-separated; default loopback)."""
    global _default_client
    with _default_lock:
        if _default_client is None:
            addresses = os.environ.get("RERANKD_ADDRESS", DEFAULT_ADDRESS).split(",")
            _default_client = RerankClient(addresses)
        return _default_client


def _plan(
    connector: Connector,
    query: str | Sequence[float],
    query_text: str | None,
    mode: str,
    top_k: int,
    candidates: int,
    timeout: float | None,
) -> tuple[str | None, Sequence[float] | None, bool, bool]:
    """Validate arguments; return (text, ready vector, need dense embed, need sparse embed)."""
    if mode not in MODES:
        raise InvalidInputError(f"mode must be one of {MODES}, got {mode!r}")
    if top_k < 1 or candidates < 1:
        raise InvalidInputError(f"top_k and candidates must be >= 1, got {top_k}, {candidates}")
    if timeout is not None and timeout <= 0:
        raise InvalidInputError(f"timeout must be > 0 seconds or None, got {timeout}")
    if isinstance(query, str):
        text, vector = query, None
        if not text.strip():
            raise InvalidInputError("query is empty")
    else:
        text, vector = query_text, list(query)
        if not vector:
            raise InvalidInputError("query vector is empty")
        if text is not None and not text.strip():
            raise InvalidInputError("query_text is empty; pass the query's text, or None")
    uses_dense = mode in ("dense", "hybrid") and connector.needs_dense
    uses_sparse = mode in ("sparse", "hybrid")
    if uses_sparse and text is None:
        raise InvalidInputError(f"mode {mode!r} needs query text: pass query_text with a vector")
    need_dense = uses_dense and vector is None
    need_sparse = uses_sparse and connector.needs_sparse
    return text, vector, need_dense, need_sparse


def _first_stage_query(
    text: str | None,
    mode: str,
    vector: Sequence[float] | None,
    emb: Embeddings | None,
    dense_asked: bool,
) -> FirstStageQuery:
    dense = vector
    sparse: SparseVector | None = None
    if emb is not None:
        if dense_asked and emb.dense is not None:
            dense = emb.dense[0].tolist()
        if emb.sparse is not None:
            sparse = emb.sparse[0]
    return FirstStageQuery(text=text or "", mode=mode, dense=dense, sparse=sparse)  # type: ignore[arg-type]


def _merge(cands: list[Candidate], resp: RerankResponse | None, top_k: int) -> list[Hit]:
    def hit(c: Candidate, score: float) -> Hit:
        return Hit(c.id, score, c.first_stage_score, c.first_stage_rank, c.text, c.payload)

    if resp is None:
        return [hit(c, c.first_stage_score) for c in cands[:top_k]]
    return [hit(cands[r.index], r.score) for r in resp.results[:top_k]]


def _rides_out(exc: RerankdError, fail_open: bool) -> bool:
    """Whether a failed sidecar call may degrade the search instead of raising: an outage,
    overload or server fault may; bad input, an unknown model or a refused token are
    mistakes in the caller's code or setup, which no retry or fallback would mend."""
    return fail_open and not isinstance(exc, (InvalidInputError, AuthenticationError))


def _fail_open_reason(exc: RerankdError, fail_open: bool) -> str:
    if not _rides_out(exc, fail_open):
        raise exc
    return f"rerank failed open: {type(exc).__name__}: {exc}"


def _wire_documents(cands: list[Candidate]) -> list[tuple[str, str]]:
    """What is sent to be reranked: a stored document, whatever it holds, must not make
    every search that retrieves it fail. Text past MAX_DOCUMENT_CHARS (which the model
    would not read) is cut, and lone surrogates (which UTF-8 cannot carry) become U+FFFD."""
    out = []
    for c in cands:
        text = c.text[:MAX_DOCUMENT_CHARS]
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = _SURROGATE.sub("\ufffd", text)
        out.append((c.id, text))
    return out


def _start(timeout: float | None) -> float | None:
    return time.monotonic() + timeout if timeout is not None else None


def _excluding(deadline: float | None, seconds: float) -> float | None:
    """The sidecar's deadline moved past a DB call: `timeout` bounds the sidecar alone."""
    return deadline + seconds if deadline is not None else None


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        return 0.001  # let the call fail fast as DEADLINE_EXCEEDED
    return left


def _skip_reason(rerank: bool, cands: list[Candidate], text: str | None) -> str:
    if not rerank:
        return "rerank=False"
    if not cands:
        return "no candidates"
    if text is None:
        return "no query text to rerank against (pass query_text with a vector)"
    return ""


def _embed_fallback(
    exc: RerankdError, connector: Connector, mode: str, text: str | None, fail_open: bool
) -> tuple[str, str]:
    """The sidecar could not embed the query: use the DB's own text search where it has one."""
    if not _rides_out(exc, fail_open) or connector.needs_sparse or text is None:
        raise exc
    return "sparse", f"embed failed ({type(exc).__name__}: {exc}); first stage fell back to BM25"


def hybrid_search(
    collection: str,
    query: str | Sequence[float],
    *,
    connector: Connector,
    top_k: int = 10,
    candidates: int = 100,
    mode: str = "hybrid",
    filter: Any = None,
    rerank: bool = True,
    model: str | None = None,
    timeout: float | None = None,
    fail_open: bool = True,
    client: RerankClient | None = None,
    query_text: str | None = None,
    max_length: int = 0,
    fusion: str = "auto",
) -> SearchResult:
    """First stage in the DB (`candidates` hits), rerank them, return the best `top_k`.

    `filter` is in the DB's own form (see each connector). `timeout` bounds the sidecar
    calls (embed + rerank) together, None leaving each call to the client's own timeout;
    the DB call is bounded by the DB client's timeout, and its time is not charged to
    `timeout`. Fail-open covers outages, overload and server faults; bad input, an unknown
    model and a refused token raise whatever `fail_open` says.
    If embedding the query fails and the DB has native BM25 (Milvus, Weaviate), the first
    stage falls back to it (fail-open); with learned sparse vectors (Qdrant) it raises.
    `fusion="auto"` (default) fuses the model's scores with the first-stage order where the
    model ships fitted fusion weights (`rerankd.engine.fusion`); "off" ranks by the model alone.
    """
    text, vector, need_dense, need_sparse = _plan(
        connector, query, query_text, mode, top_k, candidates, timeout
    )
    client = client or default_client()
    deadline = _start(timeout)
    timings, emb, notes = SearchTimings(), None, []
    if need_dense or need_sparse:
        t0 = time.perf_counter()
        try:
            emb = client.embed(
                [text or ""],
                dense=need_dense,
                sparse=need_sparse,
                input_type="query",
                timeout=_remaining(deadline),
            )
        except RerankdError as exc:
            mode, note = _embed_fallback(exc, connector, mode, text, fail_open)
            notes.append(note)
        timings.embed_ms = (time.perf_counter() - t0) * 1e3
    fsq = _first_stage_query(text, mode, vector, emb, need_dense)
    t0 = time.perf_counter()
    cands = connector.first_stage(collection, fsq, limit=candidates, filter=filter)
    timings.first_stage_ms = (time.perf_counter() - t0) * 1e3
    deadline = _excluding(deadline, timings.first_stage_ms / 1e3)
    resp = None
    skip = _skip_reason(rerank, cands, text)
    if skip:
        notes.append(skip)
    else:
        t0 = time.perf_counter()
        try:
            resp = client.rerank(
                text or "",
                _wire_documents(cands),
                model=model or "",
                max_length=max_length,
                fusion=fusion,
                timeout=_remaining(deadline),
            )
        except RerankdError as exc:
            notes.append(_fail_open_reason(exc, fail_open))
        timings.rerank_ms = (time.perf_counter() - t0) * 1e3
    return SearchResult(
        _merge(cands, resp, top_k), resp is not None, "; ".join(notes), mode, timings
    )


async def ahybrid_search(
    collection: str,
    query: str | Sequence[float],
    *,
    connector: Connector,
    client: AsyncRerankClient,
    top_k: int = 10,
    candidates: int = 100,
    mode: str = "hybrid",
    filter: Any = None,
    rerank: bool = True,
    model: str | None = None,
    timeout: float | None = None,
    fail_open: bool = True,
    query_text: str | None = None,
    max_length: int = 0,
    fusion: str = "auto",
) -> SearchResult:
    """The asyncio twin of `hybrid_search`; the DB call runs in a worker thread."""
    text, vector, need_dense, need_sparse = _plan(
        connector, query, query_text, mode, top_k, candidates, timeout
    )
    deadline = _start(timeout)
    timings, emb, notes = SearchTimings(), None, []
    if need_dense or need_sparse:
        t0 = time.perf_counter()
        try:
            emb = await client.embed(
                [text or ""],
                dense=need_dense,
                sparse=need_sparse,
                input_type="query",
                timeout=_remaining(deadline),
            )
        except RerankdError as exc:
            mode, note = _embed_fallback(exc, connector, mode, text, fail_open)
            notes.append(note)
        timings.embed_ms = (time.perf_counter() - t0) * 1e3
    fsq = _first_stage_query(text, mode, vector, emb, need_dense)
    t0 = time.perf_counter()
    cands = await asyncio.to_thread(
        connector.first_stage, collection, fsq, limit=candidates, filter=filter
    )
    timings.first_stage_ms = (time.perf_counter() - t0) * 1e3
    deadline = _excluding(deadline, timings.first_stage_ms / 1e3)
    resp = None
    skip = _skip_reason(rerank, cands, text)
    if skip:
        notes.append(skip)
    else:
        t0 = time.perf_counter()
        try:
            resp = await client.rerank(
                text or "",
                _wire_documents(cands),
                model=model or "",
                max_length=max_length,
                fusion=fusion,
                timeout=_remaining(deadline),
            )
        except RerankdError as exc:
            notes.append(_fail_open_reason(exc, fail_open))
        timings.rerank_ms = (time.perf_counter() - t0) * 1e3
    return SearchResult(
        _merge(cands, resp, top_k), resp is not None, "; ".join(notes), mode, timings
    )

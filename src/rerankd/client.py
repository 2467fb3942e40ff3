"""Python client for the sidecar: sync `RerankClient` and asyncio `AsyncRerankClient`.

It knows only the proto. Every call has a deadline; `UNAVAILABLE` (and only that: the
call never reached a model, so it is safe to repeat) is retried on the next address: at
once while the call has an address it has not tried, then with exponential backoff.
Several addresses are spread round-robin, one channel each; a `dns:///` target with
grpc's own `round_robin` policy also works.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from rerankd.engine.limits import check_unicode
from rerankd.errors import (
    ERROR_TYPE_KEY,
    MODEL_NOT_FOUND,
    AuthenticationError,
    DeadlineExceededError,
    InvalidInputError,
    OverloadedError,
    RerankdError,
    UnavailableError,
    UnknownModelError,
)
from rerankd.types import (
    Document,
    Fusion,
    LongDocs,
    Normalization,
    RerankOptions,
    RerankResponse,
    RerankResult,
    SparseVector,
    Timings,
)
from rerankd.v1 import reranker_pb2 as pb
from rerankd.v1 import reranker_pb2_grpc as pb_grpc

T = TypeVar("T")
DocumentLike = str | Document | tuple[str, str] | dict
_NORM = {Normalization.RAW: pb.NORMALIZATION_RAW, Normalization.SIGMOID: pb.NORMALIZATION_SIGMOID}
_FUSION = {Fusion.OFF: pb.FUSION_OFF, Fusion.AUTO: pb.FUSION_AUTO}
_LONG = {
    None: pb.LONG_DOCS_UNSPECIFIED,  # the model's default
    LongDocs.MAX: pb.LONG_DOCS_MAX,
    LongDocs.TRUNCATE: pb.LONG_DOCS_TRUNCATE,
}
_LONG_NAME = {v: k.value for k, v in _LONG.items() if k is not None}
_INPUT = {"query": pb.INPUT_TYPE_QUERY, "document": pb.INPUT_TYPE_DOCUMENT}


@dataclass(frozen=True)
class Embeddings:
    """Embed's answer: dense rows (n, dim) and/or sparse vectors, one per text."""

    dense: np.ndarray | None
    sparse: list[SparseVector] | None
    dense_model: str
    sparse_model: str


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str
    source: str
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    max_length: int
    default_max_length: int
    backend: str
    precision: str
    device: str
    is_default: bool
    dimension: int
    supports_depth: bool = False
    supports_token_pruning: bool = False
    supports_fusion: bool = False
    #: a reranker's `long_docs` when a request does not set it ("max" or "truncate";
    #: "" for encoders and servers that do not say)
    default_long_docs: str = ""


def _text(value: Any, what: str) -> str:
    """`value` if it can go on the wire as a proto string, else InvalidInputError.

    Checked here because protobuf would raise a bare TypeError or UnicodeEncodeError while
    building the request, before the server's own check could say what to fix."""
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a string, got {type(value).__name__}")
    check_unicode(value, what)  # the server's own check, so the message is the same
    return value


def _doc(i: int, d: DocumentLike) -> pb.Document:
    what = f"documents[{i}]"
    if isinstance(d, str):
        doc_id, text = str(i), d
    elif isinstance(d, Document):
        doc_id, text = d.id, d.text
    elif isinstance(d, tuple) and len(d) == 2:
        doc_id, text = str(d[0]), d[1]
    elif isinstance(d, dict) and "text" in d:
        doc_id, text = str(d.get("id", i)), d["text"]
    else:
        raise InvalidInputError(
            f"{what} must be a str, a Document, an (id, text) pair or a dict with a "
            f"'text' key; got {type(d).__name__} {d!r:.60}"
        )
    return pb.Document(id=_text(doc_id, f"{what}.id"), text=_text(text, f"{what}.text"))


_OPTION_FIELDS = {f.name for f in fields(RerankOptions)}


def make_options(**options: Any) -> RerankOptions:
    """`RerankOptions` from keyword arguments, with enum values given as strings."""
    unknown = set(options) - _OPTION_FIELDS
    if unknown:
        raise InvalidInputError(
            f"unknown rerank options {sorted(unknown)}; known: {sorted(_OPTION_FIELDS)}"
        )
    try:
        if "normalization" in options:
            options["normalization"] = Normalization(options["normalization"])
        if options.get("long_docs") is not None:
            options["long_docs"] = LongDocs(options["long_docs"])
        if "fusion" in options:
            options["fusion"] = Fusion(options["fusion"])
        if "keep_schedule" in options:
            options["keep_schedule"] = tuple(options["keep_schedule"])
    except ValueError as exc:
        raise InvalidInputError(f"{exc}; see RerankOptions for the accepted values") from None
    return RerankOptions(**options)


def build_rerank_request(
    query: str,
    documents: Sequence[DocumentLike],
    top_n: int,
    model: str,
    options: RerankOptions,
) -> pb.RerankRequest:
    norm = _NORM[options.normalization]
    long_docs = _LONG[options.long_docs]
    numbers = (
        top_n,
        options.max_length,
        options.depth,
        options.window_overlap,
        options.max_doc_tokens,
        options.keep_from_layer,
    )
    if any(n < 0 for n in numbers):
        raise InvalidInputError(
            "top_n, max_length, depth, window_overlap, max_doc_tokens and keep_from_layer "
            "must be >= 0"
        )
    return pb.RerankRequest(
        query=_text(query, "query"),
        documents=[_doc(i, d) for i, d in enumerate(documents)],
        top_n=top_n,
        model=model,
        options=pb.RerankOptions(
            max_length=options.max_length,
            normalization=norm,
            return_documents=options.return_documents,
            depth=options.depth,
            long_docs=long_docs,
            window_overlap=options.window_overlap,
            max_doc_tokens=options.max_doc_tokens,
            keep_schedule=options.keep_schedule,
            keep_ratio=options.keep_ratio,
            keep_from_layer=options.keep_from_layer,
            fusion=_FUSION[options.fusion],
        ),
    )


def parse_rerank(resp: pb.RerankResponse, return_documents: bool) -> RerankResponse:
    return RerankResponse(
        results=[
            RerankResult(
                r.index, r.id, r.score, r.text if return_documents else None, r.model_score
            )
            for r in resp.results
        ],
        model=resp.model,
        tokens=resp.usage.tokens,
        timings=Timings(resp.timings.queue_us, resp.timings.tokenize_us, resp.timings.inference_us),
        cache_hits=resp.usage.cache_hits,
        depth=resp.depth,
        keep_schedule=tuple(round(x, 6) for x in resp.keep_schedule),
        fusion_weight=resp.fusion_weight,
    )


def build_embed_request(
    texts: Sequence[str],
    dense: bool,
    sparse: bool,
    input_type: str,
    dense_model: str,
    sparse_model: str,
    normalize: bool,
) -> pb.EmbedRequest:
    if input_type not in _INPUT:
        raise InvalidInputError(f"input_type must be 'query' or 'document', got {input_type!r}")
    if isinstance(texts, str):
        raise InvalidInputError("texts must be a list of strings, not one string: wrap it")
    return pb.EmbedRequest(
        texts=[_text(t, f"texts[{i}]") for i, t in enumerate(texts)],
        dense=dense,
        sparse=sparse,
        input_type=_INPUT[input_type],
        dense_model=dense_model,
        sparse_model=sparse_model,
        normalize=normalize,
    )


def parse_embed(resp: pb.EmbedResponse, dense: bool, sparse: bool) -> Embeddings:
    d = (
        np.array([list(e.dense.values) for e in resp.embeddings], dtype=np.float32)
        if dense
        else None
    )
    s = (
        [SparseVector(list(e.sparse.indices), list(e.sparse.values)) for e in resp.embeddings]
        if sparse
        else None
    )
    return Embeddings(d, s, resp.dense_model, resp.sparse_model)


def parse_models(resp: pb.ListModelsResponse) -> list[ModelInfo]:
    kinds = {
        pb.MODEL_KIND_RERANKER: "reranker",
        pb.MODEL_KIND_DENSE_ENCODER: "dense",
        pb.MODEL_KIND_SPARSE_ENCODER: "sparse",
    }
    return [
        ModelInfo(
            m.name,
            kinds.get(m.kind, "unknown"),
            m.source,
            m.architecture,
            m.num_layers,
            m.hidden_size,
            m.num_heads,
            m.max_length,
            m.default_max_length,
            m.backend,
            m.precision,
            m.device,
            m.is_default,
            m.dimension,
            m.supports_depth,
            m.supports_token_pruning,
            m.supports_fusion,
            _LONG_NAME.get(m.default_long_docs, ""),
        )
        for m in resp.models
    ]


def _error_type(exc: grpc.RpcError) -> str:
    """The error type the server put in the trailing metadata ("" if none)."""
    trailing = getattr(exc, "trailing_metadata", None)
    for key, value in (trailing() if trailing else None) or ():
        if key == ERROR_TYPE_KEY:
            return value
    return ""


def error_from(exc: grpc.RpcError) -> RerankdError:
    """A gRPC status as rerankd's own exception, keeping the server's message."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        unknown_model = _error_type(exc) == MODEL_NOT_FOUND
        return (UnknownModelError if unknown_model else InvalidInputError)(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return OverloadedError(details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceededError(details or "deadline exceeded")
    if code == grpc.StatusCode.UNAVAILABLE:
        return UnavailableError(details or "sidecar unavailable")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthenticationError(details)
    return RerankdError(f"{code.name}: {details}")


def tls_credentials(
    ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials from PEM files: the CA to trust, and a client cert/key for mTLS."""

    def read(p: str | Path | None) -> bytes | None:
        return Path(p).read_bytes() if p else None

    return grpc.ssl_channel_credentials(read(ca), read(key), read(cert))


def _addresses(addresses: str | Iterable[str]) -> list[str]:
    out = [addresses] if isinstance(addresses, str) else list(addresses)
    if not out:
        raise ValueError("give at least one sidecar address, e.g. '127.0.0.1:50051'")
    return out


def _channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.lb_policy_name", "round_robin"),
        # Reconnect quickly after a sidecar restart instead of backing off for up to 120 s.
        # (Not min_reconnect_backoff_ms: C-core also uses it as the connect timeout.)
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


_READY = grpc.ChannelConnectivity.READY.value[0]


def _wait_until_ready(channel: grpc.Channel, wait: float) -> None:
    """Block up to `wait` seconds for `channel` to connect, asking it to.

    Nothing reconnects a sync channel in TRANSIENT_FAILURE promptly unless something
    watches its state: left alone, a round_robin channel whose sidecar restarted took
    7.5 s to use it again here (grpc/grpc#26754), against 0.05 s when watched. Sync grpc's
    public watchers, grpc.channel_ready_future and Channel.subscribe, watch from a thread
    that outlives the wait by up to 0.2 s and raises "Channel closed" in the background if
    the client is closed meanwhile. So this watches from the caller's thread, with the
    core channel's check/watch calls that thread uses. Without them (another grpc) it
    sleeps; tests/integration/test_faults.py pins how fast reranking must resume.
    """
    core = getattr(channel, "_channel", None)
    if core is None or not hasattr(core, "watch_connectivity_state"):
        time.sleep(wait)
        return
    end = time.time() + wait  # the core's deadlines are wall-clock
    with contextlib.suppress(ValueError):  # closed meanwhile: the retry will say so
        state = core.check_connectivity_state(True)
        while state != _READY and time.time() < end:
            core.watch_connectivity_state(state, end)
            state = core.check_connectivity_state(True)


def _out_of_time(
    method: str, timeout: float, last: RerankdError | None, attempts: int
) -> RerankdError:
    """The error of a call whose deadline passed between attempts: still UNAVAILABLE if
    that is why the attempts failed (a sidecar that is down is not a slow one)."""
    if last is not None:
        return UnavailableError(
            f"{last} (still unavailable when the {timeout:.3f} s deadline passed, after "
            f"{attempts} attempt{'s' * (attempts != 1)})"
        )
    return DeadlineExceededError(f"{method}: deadline of {timeout:.3f}s passed")


class _Policy:
    """Round-robin over channels plus the retry schedule, shared by both clients."""

    def __init__(
        self, n: int, timeout: float, retries: int, backoff: float, max_backoff: float
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0 seconds: every call has a deadline")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._n = n
        self._i = -1
        self._lock = threading.Lock()

    def budget(self, timeout: float | None) -> float:
        """A call's timeout: the client's when None. 0 is refused, not taken as "default"."""
        if timeout is None:
            return self.timeout
        if timeout <= 0:
            raise InvalidInputError(
                f"timeout must be > 0 seconds, got {timeout}; None means the client's "
                f"{self.timeout:g} s"
            )
        return timeout

    def pick(self) -> int:
        with self._lock:
            self._i = (self._i + 1) % self._n
            return self._i

    def after(self, k: int) -> int:
        """The address a call retries on after address `k` failed."""
        return (k + 1) % self._n

    def pause(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (0-based).

        Zero while this call still has an untried replica: another address fails
        independently, so it is worth asking at once. Once every address has failed in
        this round, back off exponentially (per round), with jitter so that clients do
        not retry in step."""
        if (attempt + 1) % self._n:
            return 0.0
        base = min(self.max_backoff, self.backoff * (2 ** (attempt // self._n)))
        return base * (0.5 + random.random() / 2)


class RerankClient:
    """Blocking client. Thread-safe; create one and share it."""

    def __init__(
        self,
        addresses: str | Iterable[str] = "127.0.0.1:50051",
        *,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.05,
        max_backoff: float = 1.0,
        max_message_bytes: int = 32 << 20,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        self.addresses = _addresses(addresses)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        opts = _channel_options(max_message_bytes)
        self._channels = [
            grpc.secure_channel(a, credentials, options=opts)
            if credentials
            else grpc.insecure_channel(a, options=opts)
            for a in self.addresses
        ]
        self._stubs = [pb_grpc.RerankerStub(c) for c in self._channels]
        self._policy = _Policy(len(self._stubs), timeout, retries, backoff, max_backoff)

    def _invoke(self, method: str, request: Any, timeout: float | None) -> Any:
        timeout = self._policy.budget(timeout)
        deadline = time.monotonic() + timeout
        attempt, last = 0, None
        k = self._policy.pick()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _out_of_time(method, timeout, last, attempt)
            try:
                return getattr(self._stubs[k], method)(
                    request, timeout=remaining, metadata=self._metadata
                )
            except grpc.RpcError as exc:
                last = error_from(exc)
                if not isinstance(last, UnavailableError) or attempt >= self._policy.retries:
                    raise last from None
            # Retry on the next address (this call's own rotation, so concurrent callers
            # cannot steer it back to the failed one). At once if it is untried in this
            # round, else after a backoff that ends early once that channel is connected.
            k = self._policy.after(k)
            wait = min(self._policy.pause(attempt), max(0.0, deadline - time.monotonic()))
            if wait > 0:
                _wait_until_ready(self._channels[k], wait)
            attempt += 1

    def rerank(
        self,
        query: str,
        documents: Sequence[DocumentLike],
        *,
        top_n: int = 0,
        model: str = "",
        timeout: float | None = None,
        **options: Any,
    ) -> RerankResponse:
        """Documents best first. `documents`: strings (ids are positions), Documents,
        (id, text) tuples or {"id", "text"} dicts. `options` are `RerankOptions` fields:
        max_length, normalization ("raw"|"sigmoid"), return_documents, depth, long_docs
        ("max"|"truncate"), window_overlap, max_doc_tokens, keep_schedule, keep_ratio,
        keep_from_layer."""
        opts = make_options(**options)
        req = build_rerank_request(query, documents, top_n, model, opts)
        return parse_rerank(self._invoke("Rerank", req, timeout), opts.return_documents)

    def embed(
        self,
        texts: Sequence[str],
        *,
        dense: bool = True,
        sparse: bool = False,
        input_type: str = "query",
        dense_model: str = "",
        sparse_model: str = "",
        normalize: bool = True,
        timeout: float | None = None,
    ) -> Embeddings:
        req = build_embed_request(
            texts, dense, sparse, input_type, dense_model, sparse_model, normalize
        )
        return parse_embed(self._invoke("Embed", req, timeout), dense or not sparse, sparse)

    def list_models(self, timeout: float | None = None) -> list[ModelInfo]:
        return parse_models(self._invoke("ListModels", pb.ListModelsRequest(), timeout))

    def close(self) -> None:
        for c in self._channels:
            c.close()

    def __enter__(self) -> RerankClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRerankClient:
    """asyncio client with the same API; create it inside the event loop that uses it."""

    def __init__(
        self,
        addresses: str | Iterable[str] = "127.0.0.1:50051",
        *,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.05,
        max_backoff: float = 1.0,
        max_message_bytes: int = 32 << 20,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        self.addresses = _addresses(addresses)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        opts = _channel_options(max_message_bytes)
        self._channels = [
            grpc.aio.secure_channel(a, credentials, options=opts)
            if credentials
            else grpc.aio.insecure_channel(a, options=opts)
            for a in self.addresses
        ]
        self._stubs = [pb_grpc.RerankerStub(c) for c in self._channels]
        self._policy = _Policy(len(self._stubs), timeout, retries, backoff, max_backoff)

    async def _invoke(self, method: str, request: Any, timeout: float | None) -> Any:
        timeout = self._policy.budget(timeout)
        deadline = time.monotonic() + timeout
        attempt, last = 0, None
        k = self._policy.pick()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _out_of_time(method, timeout, last, attempt)
            try:
                return await getattr(self._stubs[k], method)(
                    request, timeout=remaining, metadata=self._metadata
                )
            except grpc.RpcError as exc:
                last = error_from(exc)
                if not isinstance(last, UnavailableError) or attempt >= self._policy.retries:
                    raise last from None
            k = self._policy.after(k)
            wait = min(self._policy.pause(attempt), max(0.0, deadline - time.monotonic()))
            if wait > 0:  # asyncio's channel_ready() needs no thread: wake once connected
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._channels[k].channel_ready(), wait)
            attempt += 1

    async def rerank(
        self,
        query: str,
        documents: Sequence[DocumentLike],
        *,
        top_n: int = 0,
        model: str = "",
        timeout: float | None = None,
        **options: Any,
    ) -> RerankResponse:
        """Documents best first. `documents`: strings (ids are positions), Documents,
        (id, text) tuples or {"id", "text"} dicts. `options` are `RerankOptions` fields:
        max_length, normalization ("raw"|"sigmoid"), return_documents, depth, long_docs
        ("max"|"truncate"), window_overlap, max_doc_tokens, keep_schedule, keep_ratio,
        keep_from_layer."""
        opts = make_options(**options)
        req = build_rerank_request(query, documents, top_n, model, opts)
        return parse_rerank(await self._invoke("Rerank", req, timeout), opts.return_documents)

    async def embed(
        self,
        texts: Sequence[str],
        *,
        dense: bool = True,
        sparse: bool = False,
        input_type: str = "query",
        dense_model: str = "",
        sparse_model: str = "",
        normalize: bool = True,
        timeout: float | None = None,
    ) -> Embeddings:
        req = build_embed_request(
            texts, dense, sparse, input_type, dense_model, sparse_model, normalize
        )
        return parse_embed(await self._invoke("Embed", req, timeout), dense or not sparse, sparse)

    async def list_models(self, timeout: float | None = None) -> list[ModelInfo]:
        return parse_models(await self._invoke("ListModels", pb.ListModelsRequest(), timeout))

    async def close(self) -> None:
        for c in self._channels:
            await c.close()

    async def __aenter__(self) -> AsyncRerankClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["AsyncRerankClient", "Embeddings", "ModelInfo", "RerankClient"]

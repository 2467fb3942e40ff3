"""The `rerankd.v1.Reranker` gRPC service: validate, translate proto <-> engine types.

No model logic lives here. Requests are decoded with a guarded deserializer so that bytes
that are not valid protobuf (including strings that are not UTF-8) are answered
INVALID_ARGUMENT with a message, instead of gRPC's generic INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from rerankd.engine.limits import check_unicode
from rerankd.engine.reranker import Reranker
from rerankd.errors import ERROR_TYPE_KEY, InvalidInputError, UnavailableError
from rerankd.server.metrics import Metrics
from rerankd.server.registry import Registry
from rerankd.server.status import status_for
from rerankd.types import (
    Document,
    Fusion,
    LongDocs,
    Normalization,
    RerankOptions,
    RerankResponse,
    SparseVector,
)
from rerankd.v1 import reranker_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = "rerankd.v1.Reranker"
_NORMALIZATION = {
    pb.NORMALIZATION_UNSPECIFIED: Normalization.RAW,
    pb.NORMALIZATION_RAW: Normalization.RAW,
    pb.NORMALIZATION_SIGMOID: Normalization.SIGMOID,
}
_LONG_DOCS = {
    pb.LONG_DOCS_UNSPECIFIED: None,  # the model's default
    pb.LONG_DOCS_MAX: LongDocs.MAX,
    pb.LONG_DOCS_TRUNCATE: LongDocs.TRUNCATE,
}
_LONG_DOCS_PB = {v: k for k, v in _LONG_DOCS.items() if v is not None}
_FUSION = {
    pb.FUSION_UNSPECIFIED: Fusion.OFF,
    pb.FUSION_OFF: Fusion.OFF,
    pb.FUSION_AUTO: Fusion.AUTO,
}
_KIND = {"dense": pb.MODEL_KIND_DENSE_ENCODER, "sparse": pb.MODEL_KIND_SPARSE_ENCODER}


class Undecodable:
    """Stands in for a request whose bytes did not parse."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def guarded(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # protobuf raises DecodeError, sometimes other types
            return Undecodable(exc)

    return deserialize


def options_from_proto(opts: pb.RerankOptions) -> RerankOptions:
    if opts.normalization not in _NORMALIZATION:
        raise InvalidInputError(
            f"unknown normalization value {opts.normalization}; use RAW (1) or SIGMOID (2)"
        )
    if opts.long_docs not in _LONG_DOCS:
        raise InvalidInputError(
            f"unknown long_docs value {opts.long_docs}; use MAX (1) or TRUNCATE (2)"
        )
    if opts.fusion not in _FUSION:
        raise InvalidInputError(f"unknown fusion value {opts.fusion}; use OFF (1) or AUTO (2)")
    return RerankOptions(
        max_length=opts.max_length,
        normalization=_NORMALIZATION[opts.normalization],
        return_documents=opts.return_documents,
        depth=opts.depth,
        long_docs=_LONG_DOCS[opts.long_docs],
        window_overlap=opts.window_overlap,
        max_doc_tokens=opts.max_doc_tokens,
        keep_schedule=tuple(opts.keep_schedule),
        keep_ratio=opts.keep_ratio,
        keep_from_layer=opts.keep_from_layer,
        fusion=_FUSION[opts.fusion],
    )


def response_to_proto(resp: RerankResponse) -> pb.RerankResponse:
    return pb.RerankResponse(
        results=[
            pb.RerankResult(
                index=r.index,
                id=r.id,
                score=r.score,
                text=r.text or "",
                model_score=r.score if r.model_score is None else r.model_score,
            )
            for r in resp.results
        ],
        model=resp.model,
        depth=resp.depth,
        keep_schedule=resp.keep_schedule,
        fusion_weight=resp.fusion_weight,
        usage=pb.Usage(tokens=resp.tokens, cache_hits=resp.cache_hits),
        timings=pb.Timings(
            queue_us=resp.timings.queue_us,
            tokenize_us=resp.timings.tokenize_us,
            inference_us=resp.timings.inference_us,
        ),
    )


def reranker_info(model: Reranker, is_default: bool) -> pb.ModelInfo:
    i = model.info
    return pb.ModelInfo(
        name=i.name,
        kind=pb.MODEL_KIND_RERANKER,
        source=i.source,
        architecture=i.config.model_type,
        num_layers=i.config.num_layers,
        hidden_size=i.config.hidden_size,
        num_heads=i.config.num_heads,
        max_length=i.config.max_length,
        default_max_length=i.default_max_length,
        backend=i.backend,
        precision=i.precision,
        device=i.device,
        is_default=is_default,
        supports_depth=True,
        supports_token_pruning=model.supports_pruning,
        supports_fusion=model.fusion is not None,
        default_long_docs=_LONG_DOCS_PB[i.default_long_docs],
    )


@dataclass
class EmbedResult:
    """`RerankerService.embed`'s answer, before any transport shapes it."""

    dense: np.ndarray | None
    sparse: list[SparseVector] | None
    dense_model: str
    sparse_model: str
    tokens: int


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class RerankerService:
    """Implements the three RPCs over a `Registry`; `ready` gates them during start-up.

    `rerank` and `embed` are the transport-neutral paths (engine types in and out); the
    gRPC methods and the HTTP app both call them, so the two cannot drift apart.
    """

    def __init__(
        self,
        registry: Registry,
        max_texts: int = 1000,
        max_text_chars: int = 100_000,
        metrics: Metrics | None = None,
    ) -> None:
        self.registry = registry
        self.ready = False
        self.stopping = False
        self.metrics = metrics or Metrics()
        self.max_texts = max_texts
        self.max_text_chars = max_text_chars
        self.tokenize_pool = ThreadPoolExecutor(2, thread_name_prefix="rerankd-tokenize")
        # One thread: encoders are torch modules called one batch at a time.
        self.embed_pool = ThreadPoolExecutor(1, thread_name_prefix="rerankd-embed")

    async def _call(
        self,
        method: str,
        request: Any,
        context: grpc.aio.ServicerContext,
        body: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
    ) -> Any:
        code = grpc.StatusCode.OK
        start = time.perf_counter()
        self.metrics.inflight.labels("grpc").inc()
        try:
            if isinstance(request, Undecodable):
                code = grpc.StatusCode.INVALID_ARGUMENT
                await context.abort(
                    code,
                    f"request could not be decoded ({request.error}); "
                    "check that every string field is valid UTF-8",
                )
            if not self.ready:
                code = grpc.StatusCode.UNAVAILABLE
                state = "shutting down" if self.stopping else "models are still loading"
                await context.abort(code, f"{state}; retry (on another replica)")
            try:
                return await body(request, context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                status = status_for(exc)
                code = status.grpc
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("internal error")
                await context.abort(
                    code, str(exc), trailing_metadata=((ERROR_TYPE_KEY, status.type),)
                )
        finally:
            self.metrics.inflight.labels("grpc").dec()
            self.metrics.observe_request("grpc", method, code.name, time.perf_counter() - start)

    async def Rerank(
        self, request: pb.RerankRequest, context: grpc.aio.ServicerContext
    ) -> pb.RerankResponse:
        return await self._call("rerank", request, context, self._rerank)

    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        return await self._call("embed", request, context, self._embed)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return await self._call("list_models", request, context, self._list_models)

    async def rerank(
        self,
        model_name: str,
        query: str,
        documents: list[Document],
        top_n: int,
        options: RerankOptions,
        deadline: float | None,
    ) -> RerankResponse:
        """Validate, tokenise off the event loop, score in the scheduler, sort: any transport.

        `deadline` is a `time.monotonic()` instant or None.
        """
        model = self.registry.reranker(model_name)
        model.validate(query, documents, top_n, options)
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        prepared = await loop.run_in_executor(
            self.tokenize_pool, model.encode, query, documents, options
        )
        tokenize_s = time.perf_counter() - t0
        result = await asyncio.wrap_future(model.submit(prepared, deadline))
        response = model.finish(documents, result, top_n, options, tokenize_s)
        self.metrics.add_tokens("rerank", response.model, response.tokens)
        if response.cache_hits:
            self.metrics.cache_hits.inc(response.cache_hits)
        return response

    async def _rerank(
        self, request: pb.RerankRequest, context: grpc.aio.ServicerContext
    ) -> pb.RerankResponse:
        options = options_from_proto(request.options)
        documents = [Document(d.id, d.text) for d in request.documents]
        response = await self.rerank(
            request.model, request.query, documents, request.top_n, options, _deadline(context)
        )
        return response_to_proto(response)

    async def embed(
        self,
        texts: list[str],
        *,
        dense: bool,
        sparse: bool,
        dense_model: str = "",
        sparse_model: str = "",
        normalize: bool = True,
        input_type: str = "query",
    ) -> EmbedResult:
        """Check limits, then encode on the embed thread: the path every transport uses."""
        if not texts:
            raise InvalidInputError("texts is empty; send at least one text to embed")
        if len(texts) > self.max_texts:
            raise InvalidInputError(
                f"{len(texts)} texts; the limit is {self.max_texts} per request: split it"
            )
        for i, t in enumerate(texts):
            check_unicode(t, f"texts[{i}]")
            if len(t) > self.max_text_chars:
                raise InvalidInputError(
                    f"texts[{i}] has {len(t)} characters; the limit is {self.max_text_chars}"
                )
        dense_enc = self.registry.encoder("dense", dense_model) if dense else None
        sparse_enc = self.registry.encoder("sparse", sparse_model) if sparse else None
        loop = asyncio.get_running_loop()

        def work() -> tuple[np.ndarray | None, list | None, int]:
            d, s, tokens = None, None, 0
            if dense_enc:
                d, n = dense_enc.encode_with_usage(
                    texts, input_type=input_type, normalize=normalize
                )
                self.metrics.add_tokens("embed", dense_enc.info.name, n)
                tokens += n
            if sparse_enc:
                s, n = sparse_enc.encode_with_usage(texts, input_type=input_type)
                self.metrics.add_tokens("embed", sparse_enc.info.name, n)
                tokens += n
            return d, s, tokens

        d_vecs, s_vecs, tokens = await loop.run_in_executor(self.embed_pool, work)
        return EmbedResult(
            d_vecs,
            s_vecs,
            dense_enc.info.name if dense_enc else "",
            sparse_enc.info.name if sparse_enc else "",
            tokens,
        )

    async def _embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        result = await self.embed(
            list(request.texts),
            dense=request.dense or not request.sparse,
            sparse=request.sparse,
            dense_model=request.dense_model,
            sparse_model=request.sparse_model,
            normalize=request.normalize if request.HasField("normalize") else True,
            input_type="document" if request.input_type == pb.INPUT_TYPE_DOCUMENT else "query",
        )
        d_vecs, s_vecs = result.dense, result.sparse
        out = pb.EmbedResponse(
            dense_model=result.dense_model,
            sparse_model=result.sparse_model,
            usage=pb.Usage(tokens=result.tokens),
        )
        for i in range(len(request.texts)):
            emb = out.embeddings.add()
            if d_vecs is not None:
                emb.dense.values.extend(d_vecs[i].tolist())
            if s_vecs is not None:
                emb.sparse.indices.extend(s_vecs[i].indices)
                emb.sparse.values.extend(s_vecs[i].values)
        return out

    async def _list_models(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        reg = self.registry
        models = [
            reranker_info(m, name == reg.default_reranker) for name, m in reg.rerankers.items()
        ]
        for kind, table in (("dense", reg.dense), ("sparse", reg.sparse)):
            for j, enc in enumerate(table.values()):
                i = enc.info
                models.append(
                    pb.ModelInfo(
                        name=i.name,
                        kind=_KIND[kind],
                        source=i.source,
                        architecture="bert",
                        num_layers=i.num_layers,
                        hidden_size=i.hidden_size,
                        num_heads=i.num_heads,
                        max_length=i.max_length,
                        default_max_length=i.max_length,
                        backend="torch",
                        precision="fp32",
                        device="cpu",
                        is_default=j == 0,
                        dimension=i.dimension,
                    )
                )
        return pb.ListModelsResponse(models=models)

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(fn: Callable, req: Any, resp: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                fn,
                request_deserializer=guarded(req.FromString),
                response_serializer=resp.SerializeToString,
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Rerank": unary(self.Rerank, pb.RerankRequest, pb.RerankResponse),
                "Embed": unary(self.Embed, pb.EmbedRequest, pb.EmbedResponse),
                "ListModels": unary(self.ListModels, pb.ListModelsRequest, pb.ListModelsResponse),
            },
        )

    def close(self) -> None:
        self.tokenize_pool.shutdown(wait=True)
        self.embed_pool.shutdown(wait=True)


__all__ = ["SERVICE", "RerankerService", "UnavailableError"]

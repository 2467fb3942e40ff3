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
from typing import Any

import grpc
import numpy as np

from rerankd.engine.reranker import Reranker
from rerankd.errors import InvalidInputError, UnavailableError
from rerankd.server.registry import Registry
from rerankd.server.status import code_for
from rerankd.types import Document, Normalization, RerankOptions, RerankResponse
from rerankd.v1 import reranker_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = "rerankd.v1.Reranker"
_NORMALIZATION = {
    pb.NORMALIZATION_UNSPECIFIED: Normalization.RAW,
    pb.NORMALIZATION_RAW: Normalization.RAW,
    pb.NORMALIZATION_SIGMOID: Normalization.SIGMOID,
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
    return RerankOptions(
        max_length=opts.max_length,
        normalization=_NORMALIZATION[opts.normalization],
        return_documents=opts.return_documents,
    )


def response_to_proto(resp: RerankResponse) -> pb.RerankResponse:
    return pb.RerankResponse(
        results=[
            pb.RerankResult(index=r.index, id=r.id, score=r.score, text=r.text or "")
            for r in resp.results
        ],
        model=resp.model,
        usage=pb.Usage(tokens=resp.tokens),
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
    )


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class RerankerService:
    """Implements the three RPCs over a `Registry`; `ready` gates them during start-up."""

    def __init__(
        self, registry: Registry, max_texts: int = 1000, max_text_chars: int = 100_000
    ) -> None:
        self.registry = registry
        self.ready = False
        self.max_texts = max_texts
        self.max_text_chars = max_text_chars
        self.tokenize_pool = ThreadPoolExecutor(2, thread_name_prefix="rerankd-tokenize")
        # One thread: encoders are torch modules called one batch at a time.
        self.embed_pool = ThreadPoolExecutor(1, thread_name_prefix="rerankd-embed")

    async def _call(
        self,
        request: Any,
        context: grpc.aio.ServicerContext,
        body: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
    ) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request could not be decoded ({request.error}); "
                "check that every string field is valid UTF-8",
            )
        if not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "models are still loading; retry")
        try:
            return await body(request, context)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code = code_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("internal error")
            await context.abort(code, str(exc))

    async def Rerank(
        self, request: pb.RerankRequest, context: grpc.aio.ServicerContext
    ) -> pb.RerankResponse:
        return await self._call(request, context, self._rerank)

    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        return await self._call(request, context, self._embed)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return await self._call(request, context, self._list_models)

    async def _rerank(
        self, request: pb.RerankRequest, context: grpc.aio.ServicerContext
    ) -> pb.RerankResponse:
        model = self.registry.reranker(request.model)
        options = options_from_proto(request.options)
        documents = [Document(d.id, d.text) for d in request.documents]
        model.validate(request.query, documents, request.top_n, options)
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        pairs = await loop.run_in_executor(
            self.tokenize_pool, model.encode, request.query, documents, options
        )
        tokenize_s = time.perf_counter() - t0
        result = await asyncio.wrap_future(model.submit(pairs, _deadline(context)))
        return response_to_proto(
            model.finish(documents, result, request.top_n, options, tokenize_s)
        )

    async def _embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        texts = list(request.texts)
        if not texts:
            raise InvalidInputError("texts is empty; send at least one text to embed")
        if len(texts) > self.max_texts:
            raise InvalidInputError(
                f"{len(texts)} texts; the limit is {self.max_texts} per request: split it"
            )
        for i, t in enumerate(texts):
            if len(t) > self.max_text_chars:
                raise InvalidInputError(
                    f"texts[{i}] has {len(t)} characters; the limit is {self.max_text_chars}"
                )
        want_dense = request.dense or not request.sparse
        dense = self.registry.encoder("dense", request.dense_model) if want_dense else None
        sparse = self.registry.encoder("sparse", request.sparse_model) if request.sparse else None
        normalize = request.normalize if request.HasField("normalize") else True
        input_type = "document" if request.input_type == pb.INPUT_TYPE_DOCUMENT else "query"
        loop = asyncio.get_running_loop()

        def work() -> tuple[np.ndarray | None, list | None, int]:
            d, s, tokens = None, None, 0
            if dense:
                d, n = dense.encode_with_usage(texts, input_type=input_type, normalize=normalize)
                tokens += n
            if sparse:
                s, n = sparse.encode_with_usage(texts, input_type=input_type)
                tokens += n
            return d, s, tokens

        d_vecs, s_vecs, tokens = await loop.run_in_executor(self.embed_pool, work)
        out = pb.EmbedResponse(
            dense_model=dense.info.name if dense else "",
            sparse_model=sparse.info.name if sparse else "",
            usage=pb.Usage(tokens=tokens),
        )
        for i in range(len(texts)):
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

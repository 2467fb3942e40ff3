"""The HTTP/JSON API beside gRPC: Cohere/Jina-style rerank, OpenAI-style embeddings, probes.

Users coming from TEI, infinity or a hosted rerank API can point their existing client or
`curl` at the sidecar. The handlers only translate JSON <-> engine types and call the
same `RerankerService.rerank` / `.embed` paths the gRPC methods call, so both transports
return the same ranking and the same errors (see `status.py` for the shared table).

Routes:
- `POST /v1/rerank` (aliases `/rerank`, and `/v2/rerank` for Cohere's v2 clients):
  `{query, documents: [str | {text, id?}], model?, top_n?, return_documents?, max_length?,
  max_tokens_per_doc?, normalize?: "raw" | "sigmoid"}` -> `{id, model, results: [{index,
  relevance_score, id?, document?: {text}}], usage, meta}`, results best first.
  `normalize` defaults to "raw", the same scores gRPC returns. `max_tokens_per_doc` is
  Cohere v2's name for rerankd's `max_doc_tokens` (tokens read per document).
- `POST /v1/embeddings` (alias `/embeddings`): OpenAI's `{input, model?, encoding_format?:
  "float" | "base64", dimensions?}` -> `{object: "list", data: [{object: "embedding",
  index, embedding}], model, usage}`. rerankd extensions: `"sparse": true` adds
  `sparse_embedding: {indices, values}` per item (and, unless `"dense": true` too, leaves
  out the dense `embedding`, as gRPC Embed does); `input_type`, `normalize`,
  `sparse_model`.
- `GET /v1/models`: loaded models, OpenAI list shape plus `kind`.
- `GET /health`: liveness, 200 while the process runs. `GET /ready`: readiness, 503 until
  the models are loaded and warmed, 200 after, 503 again once shutdown begins.
- `GET /metrics`: Prometheus text (see `metrics.py`).

Errors are `{"error": {"message", "type", "param"?}}`: 400 for bad values and invalid
JSON, 422 when the body does not match the schema (wrong types, missing fields), 404 for
an unknown model or path, 413 for a body over `--max-message-bytes`, 429 when the queue
is full, 503 while not ready, 504 past a deadline, 500 otherwise.

Every POST body is read as JSON whatever its Content-Type: `curl -d` sends
`application/x-www-form-urlencoded` unless told otherwise, and this API speaks only JSON.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, Literal

import numpy as np
import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rerankd.errors import InvalidInputError, RerankdError, UnavailableError
from rerankd.server.auth import TlsFiles, token_matches
from rerankd.server.grpc_service import EmbedResult, RerankerService
from rerankd.server.metrics import Metrics
from rerankd.server.status import http_status_for
from rerankd.types import Document, Fusion, LongDocs, Normalization, RerankOptions, RerankResponse

log = logging.getLogger(__name__)

# Paths whose calls are counted in `rerankd_requests_total`, by the method name gRPC uses.
# Probes and /metrics are left out: scrapes and kubelet checks would drown the signal.
METHODS = {
    "/v1/rerank": "rerank",
    "/rerank": "rerank",
    "/v2/rerank": "rerank",
    "/v1/embeddings": "embed",
    "/embeddings": "embed",
    "/v1/models": "list_models",
}
RETRY_AFTER_S = "1"


# --------------------------------------------------------------------------- schemas


class RerankDocument(BaseModel):
    """A document: a bare string, or `{text, id?}` (other keys are ignored)."""

    model_config = ConfigDict(strict=True)

    text: str
    id: str | None = Field(None, description="echoed back in results (rerankd extension)")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"text": value}
        if not isinstance(value, dict):
            raise ValueError('must be a string or an object like {"text": "...", "id": "..."}')
        return value


class RerankBody(BaseModel):
    """`POST /v1/rerank`, Cohere/Jina shape. Types are strict: `"5"` is not a number."""

    model_config = ConfigDict(strict=True)

    query: str
    documents: list[RerankDocument]
    model: str | None = Field(None, description="a loaded reranker; omitted = the default")
    top_n: int | None = Field(None, description="keep the best n; omitted or 0 = all")
    return_documents: bool = False
    max_length: int | None = Field(None, description="tokens per pair; omitted = default")
    normalize: Literal["raw", "sigmoid"] = Field(
        "raw", description="raw logits (as gRPC returns) or sigmoid scores in [0, 1]"
    )
    depth: int = Field(0, description="encoder layers to run (1..num_layers); 0 = all")
    long_docs: Literal["max", "truncate"] | None = Field(
        None,
        description="windows scored by their best, or the first window only; "
        "omitted = the model's default",
    )
    window_overlap: int = Field(0, description="tokens windows share; 0 = default")
    max_doc_tokens: int = Field(0, description="tokens read per document; 0 = default")
    max_tokens_per_doc: int | None = Field(None, description="Cohere v2's max_doc_tokens")
    keep_schedule: list[float] = Field(
        default_factory=list, description="token share entering each layer; [] = no pruning"
    )
    keep_ratio: float = Field(0.0, description="or one keep ratio from keep_from_layer on")
    keep_from_layer: int = Field(0, description="1-based layer the keep_ratio starts at")
    fusion: Literal["off", "auto"] = Field(
        "off", description="auto: documents are in first-stage order; fuse with it"
    )


class EmbeddingsBody(BaseModel):
    """`POST /v1/embeddings`, OpenAI shape plus rerankd's sparse extension."""

    model_config = ConfigDict(strict=True)

    input: list[str] = Field(description="a string or a list of strings")
    model: str | None = Field(None, description="encoder name; omitted = the default")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="must equal the model's dimension")
    sparse: bool = Field(False, description="add SPLADE `sparse_embedding`s (rerankd)")
    dense: bool | None = Field(None, description="dense `embedding`s; default: not sparse")
    sparse_model: str | None = None
    input_type: Literal["query", "document"] = "query"
    normalize: bool = True

    @field_validator("input", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list):
            raise ValueError("must be a string or a list of strings (token ids are not accepted)")
        return value


# --------------------------------------------------------------------------- responses


def error_body(message: str, type_: str, param: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"message": message, "type": type_}
    if param:
        error["param"] = param
    return {"error": error}


def rerank_payload(resp: RerankResponse, body: RerankBody, request_id: str) -> dict[str, Any]:
    """The JSON answer: Cohere/Jina `results` plus `usage` (Jina/infinity) and `meta`."""
    results = []
    for r in resp.results:
        doc = body.documents[r.index]
        item: dict[str, Any] = {"index": r.index, "relevance_score": r.score}
        if doc.id is not None:
            item["id"] = doc.id
        if body.return_documents:
            item["document"] = {"text": doc.text}
        if resp.fusion_weight:
            item["model_score"] = r.model_score
        results.append(item)
    return {
        "id": request_id,
        "model": resp.model,
        "results": results,
        "usage": {"prompt_tokens": resp.tokens, "total_tokens": resp.tokens},
        "meta": {
            "tokens": {"input_tokens": resp.tokens},
            "timings": asdict(resp.timings),
            "depth": resp.depth,
            "keep_schedule": list(resp.keep_schedule),
            "cache_hits": resp.cache_hits,
            "fusion_weight": resp.fusion_weight,
        },
    }


def _vector(values: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # what the official OpenAI SDK asks for by default
        return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")
    return values.tolist()


def embeddings_payload(result: EmbedResult, body: EmbeddingsBody) -> dict[str, Any]:
    data = []
    for i in range(len(body.input)):
        item: dict[str, Any] = {"object": "embedding", "index": i}
        if result.dense is not None:
            item["embedding"] = _vector(result.dense[i], body.encoding_format)
        if result.sparse is not None:
            vec = result.sparse[i]
            item["sparse_embedding"] = {"indices": vec.indices, "values": vec.values}
        data.append(item)
    return {
        "object": "list",
        "data": data,
        "model": result.dense_model or result.sparse_model,
        "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens},
    }


def rerank_inputs(body: RerankBody) -> tuple[list[Document], int, RerankOptions]:
    """Engine arguments for a parsed body; the engine's `validate` checks the values."""
    documents = [Document(d.id or "", d.text) for d in body.documents]
    max_doc_tokens = body.max_doc_tokens
    if body.max_tokens_per_doc is not None:
        if body.max_tokens_per_doc < 1:
            raise InvalidInputError(
                f"max_tokens_per_doc must be >= 1, got {body.max_tokens_per_doc}; "
                "omit it for the server default"
            )
        if max_doc_tokens and max_doc_tokens != body.max_tokens_per_doc:
            raise InvalidInputError(
                f"max_tokens_per_doc={body.max_tokens_per_doc} and max_doc_tokens="
                f"{max_doc_tokens} disagree; they are the same setting, send one"
            )
        max_doc_tokens = body.max_tokens_per_doc
    options = RerankOptions(
        max_length=body.max_length or 0,
        normalization=Normalization(body.normalize),
        return_documents=body.return_documents,
        depth=body.depth,
        long_docs=LongDocs(body.long_docs) if body.long_docs else None,
        window_overlap=body.window_overlap,
        max_doc_tokens=max_doc_tokens,
        keep_schedule=tuple(body.keep_schedule),
        keep_ratio=body.keep_ratio,
        keep_from_layer=body.keep_from_layer,
        fusion=Fusion(body.fusion),
    )
    return documents, body.top_n or 0, options


def _field(loc: tuple[Any, ...]) -> str:
    """("body", "documents", 2, "text") -> "documents[2].text"."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_error(errors: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """(status, body) for a body FastAPI could not parse or validate: name the field."""
    for e in errors:
        if e.get("type") == "json_invalid":
            detail = (e.get("ctx") or {}).get("error", "malformed")
            pos = e["loc"][1] if len(e.get("loc", ())) > 1 else "?"
            return 400, error_body(
                f"request body is not valid JSON ({detail} at character {pos})", "invalid_json"
            )
    parts = []
    for e in errors[:5]:
        name = _field(tuple(e.get("loc", ())))
        if not name and e.get("type") == "missing":
            parts.append("request body is missing; send a JSON object")
        elif not name:
            parts.append(f"request body: {e.get('msg')}; send a JSON object")
        else:
            parts.append(f"{name}: {e.get('msg')}")
    if len(errors) > 5:
        parts.append(f"and {len(errors) - 5} more")
    first = _field(tuple(errors[0].get("loc", ()))) if errors else ""
    return 422, error_body("; ".join(parts), "invalid_request", first or None)


def _error_response(status: int, body: dict[str, Any]) -> JSONResponse:
    headers = {"retry-after": RETRY_AFTER_S} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


# --------------------------------------------------------------------------- application


def create_app(
    service: RerankerService,
    metrics: Metrics,
    max_body_bytes: int,
    tokens: tuple[bytes, ...] = (),
) -> ASGIApp:
    """The ASGI app over a service; `Sidecar` serves it with uvicorn on its event loop."""
    app = FastAPI(
        title="rerankd",
        summary="Cross-encoder reranking and embeddings; the same engine as the gRPC API.",
        version="1",
        redirect_slashes=False,  # /v1/rerank/ is a 404 with a JSON error, not a redirect
    )
    # `rerankd_ready` mirrors the same flag that gates both transports, read at scrape time.
    metrics.ready.set_function(lambda: float(service.ready))

    def require_ready() -> None:
        if not service.ready:
            state = "shutting down" if service.registry.rerankers else "still loading models"
            raise UnavailableError(f"the server is {state}; retry shortly")

    @app.exception_handler(RerankdError)
    async def _rerankd_error(request: Request, exc: RerankdError) -> JSONResponse:
        status, type_ = http_status_for(exc)
        if status == 500:
            log.error("internal error: %s", exc)
        return _error_response(status, error_body(str(exc), type_))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, body = validation_error(list(exc.errors()))
        return _error_response(status, body)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"{exc.detail}: {request.method} {request.url.path}"
        if exc.status_code == 404:
            message += (
                "; routes: POST /v1/rerank (or /v2/rerank), POST /v1/embeddings, GET /v1/models"
            )
        return JSONResponse(error_body(message, type_), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(500, error_body(f"internal error: {exc}", "internal_error"))

    async def rerank(body: RerankBody) -> JSONResponse:
        require_ready()
        documents, top_n, options = rerank_inputs(body)
        resp = await service.rerank(body.model or "", body.query, documents, top_n, options, None)
        return JSONResponse(rerank_payload(resp, body, f"rerank-{uuid.uuid4().hex}"))

    async def embeddings(body: EmbeddingsBody) -> JSONResponse:
        require_ready()
        want_dense = body.dense if body.dense is not None else not body.sparse
        if not want_dense and not body.sparse:
            raise InvalidInputError('nothing to compute: set "dense" or "sparse" to true')
        dense_model = (body.model or "") if want_dense else ""
        sparse_model = body.sparse_model or ("" if want_dense else body.model or "")
        if body.dimensions is not None and want_dense:
            dim = service.registry.encoder("dense", dense_model).info.dimension
            if body.dimensions != dim:
                raise InvalidInputError(
                    f"dimensions={body.dimensions}, but this encoder produces {dim}-dimensional "
                    "vectors; omit dimensions or send that value"
                )
        result = await service.embed(
            body.input,
            dense=want_dense,
            sparse=body.sparse,
            dense_model=dense_model,
            sparse_model=sparse_model,
            normalize=body.normalize,
            input_type=body.input_type,
        )
        return JSONResponse(embeddings_payload(result, body))

    async def models() -> JSONResponse:
        require_ready()
        reg = service.registry
        data = [
            {
                "id": name,
                "object": "model",
                "owned_by": "rerankd",
                "kind": "reranker",
                "is_default": name == reg.default_reranker,
            }
            for name in reg.rerankers
        ]
        for kind, table in (("dense_encoder", reg.dense), ("sparse_encoder", reg.sparse)):
            for j, name in enumerate(table):
                data.append(
                    {
                        "id": name,
                        "object": "model",
                        "owned_by": "rerankd",
                        "kind": kind,
                        "is_default": j == 0,
                    }
                )
        return JSONResponse({"object": "list", "data": data})

    # The unversioned aliases are what infinity clients call, /v2/rerank what Cohere's
    # ClientV2 calls (a subset of this body); documented once, under /v1.
    app.add_api_route("/v1/rerank", rerank, methods=["POST"])
    app.add_api_route("/rerank", rerank, methods=["POST"], include_in_schema=False)
    app.add_api_route("/v2/rerank", rerank, methods=["POST"], include_in_schema=False)
    app.add_api_route("/v1/embeddings", embeddings, methods=["POST"])
    app.add_api_route("/embeddings", embeddings, methods=["POST"], include_in_schema=False)
    app.add_api_route("/v1/models", models, methods=["GET"])

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if service.ready:
            return JSONResponse({"status": "ready", "models": sorted(service.registry.rerankers)})
        state = "stopping" if service.registry.rerankers else "loading"
        return _error_response(503, {"status": state})

    @app.get("/metrics")
    async def prometheus() -> Response:
        data, content_type = metrics.render()
        return Response(data, headers={"content-type": content_type})

    return Edge(app, metrics, max_body_bytes, tokens)


# Liveness and readiness stay open, like gRPC health: orchestrator probes carry no token.
OPEN_PATHS = frozenset({"/health", "/ready"})


class Edge:
    """Outermost ASGI layer: body cap, JSON content type, request metrics, last-resort 500.

    It runs before any framework code, so a body over the cap is refused without being
    held in memory, and every outcome (422s raised before a handler runs included) is
    counted with the status the client actually received.
    """

    def __init__(
        self, app: ASGIApp, metrics: Metrics, max_body_bytes: int, tokens: tuple[bytes, ...] = ()
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = METHODS.get(scope["path"])
        status = 0
        recorded = False
        start = time.perf_counter()

        def record(code: str) -> None:
            nonlocal recorded
            if method and not recorded:
                recorded = True
                self.metrics.inflight.labels("http").dec()
                self.metrics.observe_request("http", method, code, time.perf_counter() - start)

        async def send_tracked(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                # Counted before the last byte leaves, so a client that reads /metrics
                # right after a response always sees that response counted.
                record(str(status))
            await send(message)

        if method:
            self.metrics.inflight.labels("http").inc()
        try:
            if self.tokens and scope["path"] not in OPEN_PATHS:
                headers = dict(scope["headers"])
                auth = headers.get(b"authorization", b"").decode("latin-1") or None
                if not token_matches(auth, self.tokens):
                    payload = error_body(
                        "missing or invalid bearer token: send 'Authorization: Bearer <token>'",
                        "unauthorized",
                    )
                    response = _error_response(401, payload)
                    response.headers["www-authenticate"] = "Bearer"
                    await response(scope, receive, send_tracked)
                    return
            body = await self._read_body(scope, receive)
            if body is None:
                return  # the client went away
            if isinstance(body, JSONResponse):
                await body(scope, receive, send_tracked)
                return
            if scope["method"] == "POST":
                scope = _as_json(scope)
            await self.app(scope, _replay(body, receive), send_tracked)
        except Exception as exc:
            # Starlette answers unexpected errors itself (our JSON 500) and then re-raises.
            log.exception("error serving %s %s", scope["method"], scope["path"])
            if not status:
                payload = error_body(f"internal error: {exc}", "internal_error")
                await _error_response(500, payload)(scope, receive, send_tracked)
        finally:
            record(str(status) if status else "499")  # 499: the client closed the request

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | JSONResponse | None:
        """The whole body, a 413 response if it is over the cap, or None on disconnect."""
        limit = self.max_body_bytes
        too_big = _error_response(
            413,
            error_body(
                f"request body is over the server's limit of {limit} bytes "
                "(--max-message-bytes); send fewer or shorter documents per request",
                "payload_too_large",
            ),
        )
        too_big.headers["connection"] = "close"
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return too_big
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _as_json(scope: Scope) -> Scope:
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the buffered body over once, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# --------------------------------------------------------------------------- server


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The sidecar owns SIGTERM/SIGINT and drains both transports in order; uvicorn
        # must not install its own handlers over the event loop's.
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so a busy port fails start-up and port 0 is known."""
    host = host.strip("[]")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OSError(f"could not bind HTTP {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):  # dual-stack where the OS allows it, like gRPC
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(f"could not bind HTTP {host}:{port}: {exc}") from exc
    return sock


class HttpServer:
    """uvicorn serving one ASGI app on the caller's running event loop (beside grpc.aio)."""

    def __init__(self, app: ASGIApp, grace: float, tls: TlsFiles | None = None) -> None:
        config = uvicorn.Config(
            app,
            **(tls.uvicorn_options() if tls else {}),
            lifespan="off",
            log_config=None,  # keep the logging `rerankd serve` configured
            access_log=False,
            ws="none",
            timeout_graceful_shutdown=max(1, round(grace)),
        )
        self.grace = grace
        self.server = _Server(config)
        self.task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Bind, start serving, and return the bound port."""
        sock = bind(host, port)
        self.port = sock.getsockname()[1]
        self.task = asyncio.create_task(self.server.serve(sockets=[sock]), name="rerankd-http")
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises what stopped it
                raise OSError(f"HTTP server on {host}:{self.port} stopped during start-up")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to `grace`), close."""
        if self.task is None:
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), self.grace + 5)
        except asyncio.TimeoutError:
            self.server.force_exit = True
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

"""Start, run and stop the sidecar: models, gRPC and HTTP servers, health, reflection, signals.

Order matters for orchestrators: the ports open first with health NOT_SERVING (and HTTP
/ready 503), models load and warm up, and only then does health say SERVING. On
SIGTERM/SIGINT health turns NOT_SERVING, new calls are refused and in-flight calls on
both transports drain for up to `grace` seconds. Both servers share one event loop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rerankd.engine.cache import CacheConfig
from rerankd.engine.factory import load_reranker
from rerankd.engine.limits import Limits
from rerankd.engine.scheduler import SchedulerConfig
from rerankd.server.auth import TOKENS_ENV, BearerAuthInterceptor, TlsFiles, load_tokens
from rerankd.server.config import ServeConfig, model_specs
from rerankd.server.grpc_service import SERVICE, RerankerService
from rerankd.server.http_app import HttpServer, create_app
from rerankd.server.metrics import Metrics
from rerankd.server.registry import Registry
from rerankd.v1 import reranker_pb2

log = logging.getLogger("rerankd.server")


def load_registry(cfg: ServeConfig) -> Registry:
    """Load the reranker and the encoders the config names (blocking, seconds)."""
    registry = Registry()
    for name, source in model_specs(cfg):
        model = load_reranker(
            source,
            name,
            backend=cfg.backend,
            precision=cfg.precision,
            device=cfg.device,
            threads=cfg.threads,
            workers=cfg.workers,
            scheduler=SchedulerConfig(
                cfg.max_batch_tokens, cfg.max_batch_size, cfg.max_queued_pairs
            ),
            limits=Limits(cfg.max_documents, cfg.max_query_chars, cfg.max_document_chars),
            default_max_length=cfg.max_length,
            cache=CacheConfig(cfg.cache_entries, cfg.cache_bytes),
        )
        model.warmup()
        registry.add_reranker(model)
    if cfg.dense_encoder or cfg.sparse_encoder:
        from rerankd.engine import encoders

        if cfg.dense_encoder:
            enc = encoders.load_dense_encoder(cfg.dense_encoder)
            registry.dense[enc.info.name] = enc
        if cfg.sparse_encoder:
            enc = encoders.load_sparse_encoder(cfg.sparse_encoder)
            registry.sparse[enc.info.name] = enc
    return registry


class Sidecar:
    """A running server; `start()` binds and loads, `stop()` drains. Usable in-process."""

    def __init__(
        self, cfg: ServeConfig, loader: Callable[[ServeConfig], Registry] = load_registry
    ) -> None:
        self.cfg = cfg
        self.loader = loader
        self.registry: Registry | None = None
        self.service: RerankerService | None = None
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics = Metrics()  # per sidecar, so several in one process do not collide
        self.http: HttpServer | None = None
        self.http_port: int | None = None  # None: HTTP disabled (--http-port -1)

    async def start(self) -> None:
        cfg = self.cfg
        limit = cfg.max_message_bytes
        tokens = load_tokens(cfg.auth_token_file, TOKENS_ENV)
        tls = TlsFiles(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
        self.server = grpc.aio.server(
            interceptors=[BearerAuthInterceptor(tokens)] if tokens else [],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # Recycle connections every 5 min so dns:/// round_robin clients re-resolve
                # and spread onto replicas an autoscaler added (grpc/grpc#12295).
                ("grpc.max_connection_age_ms", 300_000),
                ("grpc.max_connection_age_grace_ms", 30_000),
                ("grpc.so_reuseport", 0),
            ],
        )
        placeholder = Registry()
        self.service = RerankerService(
            placeholder, cfg.max_documents, cfg.max_document_chars, self.metrics
        )
        self.server.add_generic_rpc_handlers((self.service.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (
            reranker_pb2.DESCRIPTOR.services_by_name["Reranker"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, self.server)
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{cfg.host}:{cfg.port}"
        if tls.enabled:
            self.port = self.server.add_secure_port(address, tls.server_credentials())
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {cfg.host}:{cfg.port}")
        await self.server.start()
        if cfg.http_port >= 0:
            self.http = HttpServer(
                create_app(self.service, self.metrics, cfg.max_message_bytes, tokens),
                cfg.grace,
                tls,
            )
            self.http_port = await self.http.start(cfg.host, cfg.http_port)
        log.info("listening on %s:%d, http %s; loading models", cfg.host, self.port, self.http_port)
        self.registry = await asyncio.get_running_loop().run_in_executor(None, self.loader, cfg)
        self.metrics.watch(self.registry.rerankers)
        self.service.registry = self.registry
        self.service.ready = True
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("SERVING %s on %s:%d", sorted(self.registry.rerankers), cfg.host, self.port)

    async def stop(self) -> None:
        if self.service is not None:
            self.service.ready = False
            self.service.stopping = True
        await self.health.enter_graceful_shutdown()
        draining = [self.http.stop()] if self.http is not None else []
        if self.server is not None:
            draining.append(self.server.stop(self.cfg.grace))
        await asyncio.gather(*draining)
        if self.registry is not None:
            self.registry.close()
        if self.service is not None:
            self.service.close()
        log.info("stopped")


async def serve(cfg: ServeConfig, ready: Callable[[int], None] | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain and return."""
    sidecar = Sidecar(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await sidecar.start()
    except BaseException:
        await sidecar.stop()
        raise
    http = f" http {cfg.host}:{sidecar.http_port}" if sidecar.http_port is not None else ""
    print(f"rerankd serving on {cfg.host}:{sidecar.port}{http}", flush=True)
    if ready:
        ready(sidecar.port)
    await stop.wait()
    log.info("signal received, draining for up to %.1fs", cfg.grace)
    await sidecar.stop()

"""Bearer-token authentication and TLS settings, for gRPC (and HTTP through `check`).

Tokens come from a file (one per line) or an environment variable, never from a flag
value (flags show up in `ps`), and are never logged. Comparison is constant-time over
every configured token, so timing reveals neither which token nor how much of it matched.
Health checks stay open: Kubernetes' gRPC probes cannot send credentials.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from rerankd.errors import RerankdError

TOKENS_ENV = "RERANKD_AUTH_TOKENS"  # comma-separated tokens, read from the environment only
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
BEARER = "bearer "


class AuthConfigError(RerankdError):
    """Auth or TLS settings are unusable (missing file, empty token list)."""


def load_tokens(token_file: str = "", token_env: str = "") -> tuple[bytes, ...]:
    """Tokens from a file (one per line, # comments) and/or a named environment variable."""
    tokens: list[str] = []
    if token_file:
        try:
            lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise AuthConfigError(f"cannot read token file {token_file}: {exc.strerror}") from exc
        tokens += [t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")]
    env_set = bool(token_env) and token_env in os.environ
    if env_set:
        tokens += [t.strip() for t in os.environ[token_env].split(",") if t.strip()]
    if (token_file or env_set) and not tokens:
        raise AuthConfigError("auth is configured but no token was found; refusing to start open")
    return tuple(t.encode() for t in tokens)


def token_matches(presented: str | None, tokens: tuple[bytes, ...]) -> bool:
    """Constant-time check of an `Authorization` value against every token."""
    if presented is None or not presented.lower().startswith(BEARER):
        return False
    given = presented[len(BEARER) :].strip().encode()
    ok = False
    for t in tokens:
        ok |= hmac.compare_digest(given, t)
    return ok


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a valid `authorization: Bearer <token>` with UNAUTHENTICATED."""

    def __init__(self, tokens: tuple[bytes, ...]) -> None:
        self.tokens = tokens

        async def deny(request: object, context: grpc.aio.ServicerContext) -> None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'",
            )

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method in OPEN_METHODS:
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        if token_matches(metadata.get("authorization"), self.tokens):
            return await continuation(details)
        return self._deny


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the server's certificate and key, and a CA to require client certs (mTLS)."""

    cert: str = ""
    key: str = ""
    client_ca: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key)

    def uvicorn_options(self) -> dict[str, object]:
        """The same files for the HTTP server (uvicorn's ssl_* settings)."""
        if not self.enabled:
            return {}
        import ssl

        self.server_credentials()  # same checks and messages as gRPC
        opts: dict[str, object] = {"ssl_certfile": self.cert, "ssl_keyfile": self.key}
        if self.client_ca:
            opts.update(ssl_ca_certs=self.client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        return opts

    def server_credentials(self) -> grpc.ServerCredentials:
        if not (self.cert and self.key):
            raise AuthConfigError("TLS needs both --tls-cert and --tls-key")
        try:
            cert = Path(self.cert).read_bytes()
            key = Path(self.key).read_bytes()
            ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        except OSError as exc:
            raise AuthConfigError(f"cannot read TLS file: {exc}") from exc
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )

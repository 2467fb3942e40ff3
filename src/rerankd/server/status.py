"""rerankd exceptions -> gRPC status codes and HTTP statuses: one table for every method.

Both transports read the same rows, so an error means the same thing whichever way a
caller came in. Rows are checked in order, so subclasses come before their bases.

HTTP choices, and why:
- An unknown model is 404 `model_not_found` (what OpenAI-style clients expect), while on
  gRPC it stays INVALID_ARGUMENT. gRPC errors carry the type in trailing metadata
  (`ERROR_TYPE_KEY`), from which the Python client maps it back to UnknownModelError.
- Any other bad input is 400 `invalid_request`; a request body that does not match the
  schema at all (wrong JSON types, missing fields) is 422, decided in `http_app.py`.
- A full queue is 429 so HTTP clients and proxies apply their usual retry-with-backoff.
- Not ready (loading or draining) is 503, like a failing readiness probe.
"""

from __future__ import annotations

from typing import NamedTuple

import grpc

from rerankd.errors import (
    MODEL_NOT_FOUND,
    DeadlineExceededError,
    InvalidInputError,
    OverloadedError,
    RerankdError,
    UnavailableError,
    UnknownModelError,
)


class Status(NamedTuple):
    """How one kind of failure is reported on each transport."""

    grpc: grpc.StatusCode
    http: int
    type: str  # the `error.type` of HTTP JSON error bodies


INTERNAL = Status(grpc.StatusCode.INTERNAL, 500, "internal_error")

_TABLE: tuple[tuple[type[BaseException], Status], ...] = (
    (UnknownModelError, Status(grpc.StatusCode.INVALID_ARGUMENT, 404, MODEL_NOT_FOUND)),
    (InvalidInputError, Status(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request")),
    (OverloadedError, Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "overloaded")),
    (DeadlineExceededError, Status(grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout")),
    (UnavailableError, Status(grpc.StatusCode.UNAVAILABLE, 503, "unavailable")),
    (RerankdError, INTERNAL),
)


def status_for(exc: BaseException) -> Status:
    for kind, status in _TABLE:
        if isinstance(exc, kind):
            return status
    return INTERNAL


def code_for(exc: BaseException) -> grpc.StatusCode:
    return status_for(exc).grpc


def http_status_for(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, error type) for an exception raised while serving a request."""
    status = status_for(exc)
    return status.http, status.type

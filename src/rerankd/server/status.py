"""rerankd exceptions -> gRPC status codes: one table for every method."""

from __future__ import annotations

import grpc

from rerankd.errors import (
    DeadlineExceededError,
    InvalidInputError,
    OverloadedError,
    RerankdError,
    UnavailableError,
)

_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (RerankdError, grpc.StatusCode.INTERNAL),
)


def code_for(exc: BaseException) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL

"""Exceptions with messages meant for the caller: each says what to fix.

The server maps them onto gRPC status codes (see `server/status.py`); the client maps
status codes back onto them, so Python callers see the same exception either side.
"""

from __future__ import annotations

#: Trailing-metadata key of a failed gRPC call: the error's type, the same string the HTTP
#: API puts in `error.type`. It tells apart what one status code covers (an unknown model
#: and other bad input are both INVALID_ARGUMENT).
ERROR_TYPE_KEY = "rerankd-error-type"
MODEL_NOT_FOUND = "model_not_found"


class RerankdError(Exception):
    """Base of rerankd's own errors."""


class InvalidInputError(RerankdError, ValueError):
    """The request is malformed; the message says what to fix (INVALID_ARGUMENT)."""


class UnknownModelError(InvalidInputError):
    """The request names a model the server has not loaded (INVALID_ARGUMENT)."""


class OverloadedError(RerankdError):
    """The server's queue is full; retry later or elsewhere (RESOURCE_EXHAUSTED)."""


class DeadlineExceededError(RerankdError, TimeoutError):
    """The request's deadline passed before it was computed (DEADLINE_EXCEEDED)."""


class UnavailableError(RerankdError, ConnectionError):
    """No sidecar could be reached (UNAVAILABLE)."""


class ModelLoadError(RerankdError):
    """A model could not be loaded: missing files, no safetensors, unsupported architecture."""


class AuthenticationError(RerankdError, PermissionError):
    """The sidecar refused the call's credentials (UNAUTHENTICATED)."""

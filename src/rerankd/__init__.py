"""rerankd: a reranking sidecar for vector databases.

`RerankClient` / `AsyncRerankClient` call a running sidecar (`rerankd serve`) over gRPC.
"""

from rerankd.client import AsyncRerankClient, Embeddings, ModelInfo, RerankClient
from rerankd.errors import (
    DeadlineExceededError,
    InvalidInputError,
    OverloadedError,
    RerankdError,
    UnavailableError,
    UnknownModelError,
)
from rerankd.search import ahybrid_search, hybrid_search
from rerankd.types import (
    Candidate,
    Document,
    Hit,
    Normalization,
    RerankOptions,
    RerankResponse,
    SearchResult,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncRerankClient",
    "Candidate",
    "DeadlineExceededError",
    "Document",
    "Embeddings",
    "Hit",
    "InvalidInputError",
    "ModelInfo",
    "Normalization",
    "OverloadedError",
    "RerankClient",
    "RerankOptions",
    "RerankResponse",
    "RerankdError",
    "SearchResult",
    "UnavailableError",
    "UnknownModelError",
    "ahybrid_search",
    "hybrid_search",
]

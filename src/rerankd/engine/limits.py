"""Input limits and request validation, shared by every transport.

Validation lives in the engine, not in the server, so Python callers of the engine and
remote callers of gRPC/HTTP get the same checks and the same messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rerankd.errors import InvalidInputError
from rerankd.types import Document, LongDocs, Normalization, RerankOptions


@dataclass(frozen=True)
class Limits:
    """Caps an operator sets; each message names the flag that raises it."""

    max_documents: int = 1000
    max_query_chars: int = 8192
    max_document_chars: int = 100_000
    # Tokens read per document when long documents are windowed (bounds cost per document).
    max_doc_tokens: int = 4096


def validate_rerank(
    query: str,
    documents: list[Document],
    top_n: int,
    options: RerankOptions,
    limits: Limits,
    model_max_length: int,
    num_layers: int,
) -> None:
    """Raise InvalidInputError saying what to fix; return None when the request is sound."""
    if not query or not query.strip():
        raise InvalidInputError("query is empty; send the text to rank documents against")
    if len(query) > limits.max_query_chars:
        raise InvalidInputError(
            f"query has {len(query)} characters; the limit is {limits.max_query_chars} "
            "(--max-query-chars)"
        )
    if not documents:
        raise InvalidInputError("no documents; send at least one document to rerank")
    if len(documents) > limits.max_documents:
        raise InvalidInputError(
            f"{len(documents)} documents; the limit is {limits.max_documents} per request "
            "(--max-documents): split the request"
        )
    for i, doc in enumerate(documents):
        if len(doc.text) > limits.max_document_chars:
            raise InvalidInputError(
                f"documents[{i}] has {len(doc.text)} characters; the limit is "
                f"{limits.max_document_chars} (--max-document-chars)"
            )
    if top_n < 0:
        raise InvalidInputError(f"top_n must be >= 0 (0 = all), got {top_n}")
    ml = options.max_length
    if isinstance(ml, float) and math.isnan(ml):
        raise InvalidInputError("max_length is NaN; send a whole number of tokens")
    if ml < 0:
        raise InvalidInputError(f"max_length must be >= 0 (0 = model default), got {ml}")
    if ml and ml < 8:
        raise InvalidInputError(f"max_length {ml} is too small; use at least 8 tokens")
    if ml > model_max_length:
        raise InvalidInputError(
            f"max_length {ml} exceeds the model's limit of {model_max_length} tokens"
        )
    if not isinstance(options.normalization, Normalization):
        raise InvalidInputError(f"normalization must be one of {[n.value for n in Normalization]}")
    if not isinstance(options.long_docs, LongDocs):
        raise InvalidInputError(f"long_docs must be one of {[v.value for v in LongDocs]}")
    if options.depth < 0 or options.depth > num_layers:
        raise InvalidInputError(
            f"depth {options.depth} is outside 1..{num_layers} for this model (0 = all layers)"
        )
    if options.window_overlap < 0:
        raise InvalidInputError(f"window_overlap must be >= 0 tokens, got {options.window_overlap}")
    if options.max_doc_tokens < 0:
        raise InvalidInputError(
            f"max_doc_tokens must be >= 0 (0 = the server default), got {options.max_doc_tokens}"
        )

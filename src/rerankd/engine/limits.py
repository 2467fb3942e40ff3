"""Input limits and request validation, shared by every transport.

Validation lives in the engine, not in the server, so Python callers of the engine and
remote callers of gRPC/HTTP get the same checks and the same messages.
"""

from __future__ import annotations

import itertools
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


def check_unicode(text: str, what: str) -> None:
    """Refuse text that cannot be encoded as UTF-8 (lone surrogates, e.g. JSON "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{what} is not valid Unicode: a lone surrogate (U+{ord(text[exc.start]):04X}) at "
            f"character {exc.start}; send well-formed UTF-8 text"
        ) from None


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
    check_unicode(query, "query")
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
        check_unicode(doc.text, f"documents[{i}]")
        check_unicode(doc.id, f"documents[{i}].id")
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
    if options.long_docs is not None and not isinstance(options.long_docs, LongDocs):
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


def resolve_keep_schedule(options: RerankOptions, layers: int) -> tuple[float, ...]:
    """The per-layer keep schedule a request asks for (empty: no pruning), validated.

    `layers` is the number of layers the request runs (its depth, or the model's).
    """
    sched = tuple(float(r) for r in options.keep_schedule)
    ratio, start = options.keep_ratio, options.keep_from_layer
    if sched and (ratio or start):
        raise InvalidInputError("give either keep_schedule or keep_ratio/keep_from_layer")
    if ratio or start:
        if not 0.0 < ratio <= 1.0 or math.isnan(ratio):
            raise InvalidInputError(f"keep_ratio must be in (0, 1], got {ratio}")
        start = start or 2
        if not 2 <= start <= layers:
            raise InvalidInputError(
                f"keep_from_layer must be in 2..{layers} (layer 1 reads every token)"
            )
        sched = tuple(1.0 if i + 1 < start else ratio for i in range(layers))
    if not sched:
        return ()
    if len(sched) != layers:
        raise InvalidInputError(
            f"keep_schedule has {len(sched)} ratios; give one per layer run ({layers})"
        )
    if any(math.isnan(r) or not 0.0 < r <= 1.0 for r in sched):
        raise InvalidInputError(f"keep_schedule ratios must be in (0, 1], got {list(sched)}")
    if sched[0] != 1.0:
        raise InvalidInputError("keep_schedule[0] must be 1.0: layer 1 reads every token")
    if any(b > a for a, b in itertools.pairwise(sched)):
        raise InvalidInputError("keep_schedule must not increase: pruned tokens do not return")
    return () if all(r == 1.0 for r in sched) else sched

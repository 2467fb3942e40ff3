"""Index documents into a vector DB through a connector, embedding them with the sidecar.

Documents are embedded in batches (dense and, where the connector wants them, SPLADE
vectors) through the sidecar's `Embed` with `input_type=document`, then upserted; upserts
are idempotent by id, so re-running an index job replaces rather than duplicates.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from rerankd.client import RerankClient
from rerankd.connectors.base import Connector, IndexRecord


@dataclass(frozen=True)
class SourceDocument:
    """A document to index: id, text and any payload fields (filterable in the DB)."""

    id: str
    text: str
    payload: dict[str, Any] = field(default_factory=dict)


def _batches(items: Sequence[SourceDocument], size: int) -> Iterable[Sequence[SourceDocument]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def index_documents(
    connector: Connector,
    collection: str,
    documents: Sequence[SourceDocument],
    *,
    client: RerankClient,
    batch_size: int = 64,
    create: bool = True,
    recreate: bool = False,
    progress: bool = True,
    timeout: float = 120.0,
) -> int:
    """Embed and upsert `documents`; create the collection first when `create`. Returns count."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if create:
        dim = _dense_dimension(client) if connector.needs_dense else 0
        connector.create_collection(collection, dense_dim=dim, recreate=recreate)
    bar = tqdm(
        total=len(documents), desc=f"indexing {collection}", unit="doc", disable=not progress
    )
    try:
        for batch in _batches(documents, batch_size):
            texts = [d.text for d in batch]
            emb = None
            if connector.needs_dense or connector.needs_sparse:
                emb = client.embed(
                    texts,
                    dense=connector.needs_dense,
                    sparse=connector.needs_sparse,
                    input_type="document",
                    timeout=timeout,
                )
            records = [
                IndexRecord(
                    id=d.id,
                    text=d.text,
                    dense=emb.dense[i].tolist()
                    if emb is not None and emb.dense is not None
                    else None,
                    sparse=emb.sparse[i] if emb is not None and emb.sparse is not None else None,
                    payload=d.payload,
                )
                for i, d in enumerate(batch)
            ]
            connector.upsert(collection, records)
            bar.update(len(batch))
    finally:
        bar.close()
    return len(documents)


def _dense_dimension(client: RerankClient) -> int:
    for m in client.list_models():
        if m.kind == "dense" and m.is_default:
            return m.dimension
    raise RuntimeError("the sidecar serves no dense encoder; start it with --dense-encoder")

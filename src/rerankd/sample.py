"""The sample corpus that ships with rerankd (48 short CC0 documents, 4 topics)."""

from __future__ import annotations

import json
from importlib import resources

from rerankd.indexing import SourceDocument


def sample_documents() -> list[SourceDocument]:
    text = resources.files("rerankd").joinpath("data/sample_corpus.jsonl").read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [SourceDocument(r["_id"], r["text"], {"topic": r["topic"]}) for r in rows]


def sample_queries() -> list[str]:
    return json.loads(
        resources.files("rerankd").joinpath("data/sample_queries.json").read_text("utf-8")
    )

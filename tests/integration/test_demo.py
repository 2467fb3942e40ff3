"""`make demo`, the README's first quick-start command, run as a user runs it.

`rerankd demo` in its own process: a real sidecar, an embedded vector DB on disk, the shipped
default reranker, hybrid_search over the bundled sample corpus. Checked: it exits 0, serves
the shipped model, and prints first-stage and reranked hits for every sample query.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rerankd.engine.shipped import DEFAULT_RERANKER
from rerankd.sample import sample_queries

TOP_K = 2


@pytest.mark.parametrize("db", ["qdrant", "milvus"])
def test_demo_prints_reranked_hits_for_every_sample_query(db: str, tmp_path) -> None:
    if db == "milvus":
        pytest.importorskip("milvus_lite")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "rerankd.cli", "demo", "--db", db, "--top-k", str(TOP_K)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "SERVING" in out
    assert f"reranker {DEFAULT_RERANKER}:" in out
    blocks = out.split("query: ")[1:]
    queries = sample_queries()
    assert [b.splitlines()[0] for b in blocks] == list(queries)
    for block in blocks:
        assert "reranked=True" in block
        reranked = block.split("  reranked:\n", 1)[1].splitlines()[:TOP_K]
        assert len(reranked) == TOP_K
        assert all("(was #" in line for line in reranked), block

"""The proto is the one contract: committed stubs must match it."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO


def test_committed_stubs_match_proto() -> None:
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr


def test_service_methods() -> None:
    from rerankd.v1 import reranker_pb2

    svc = reranker_pb2.DESCRIPTOR.services_by_name["Reranker"]
    assert {m.name for m in svc.methods} == {"Rerank", "Embed", "ListModels"}

"""A jina-reranker-v1-tiny-shaped checkpoint serves through gRPC, natively, and reads a
6,000-token document whole (no remote code; random weights with Jina's names and shapes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from rerankd import RerankClient
from rerankd.engine.bundled import backbone_dir
from rerankd.server.process import spawn_sidecar
from tests.unit.test_jina import jina_config, write_jina_checkpoint


@pytest.fixture(scope="module")
def jina_tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("jina-reranker-v1-tiny-shaped")
    # jina-reranker-v1-tiny-en: 4 layers x 384; the vocabulary matches the tokenizer used
    raw = jina_config(layers=4, hidden=384, heads=12, intermediate=1536)
    raw["vocab_size"] = 30522
    write_jina_checkpoint(folder, raw)
    shutil.copyfile(backbone_dir("all-minilm-l6-v2") / "tokenizer.json", folder / "tokenizer.json")
    assert "auto_map" in json.loads((folder / "config.json").read_text())  # remote code named
    return folder


def test_jina_tiny_serves_and_scores_a_6000_token_document(jina_tiny: Path) -> None:
    proc = spawn_sidecar(
        [
            "--model",
            f"jina-tiny={jina_tiny}",
            "--backend",
            "torch",
            "--max-length",
            "8192",
            "--dense-encoder",
            "",
            "--sparse-encoder",
            "",
            "--max-batch-tokens",
            "8192",
            "--log-level",
            "WARNING",
        ]
    )
    try:
        with RerankClient(proc.address, timeout=300) as client:
            (info,) = client.list_models()
            assert (info.name, info.num_layers, info.hidden_size, info.max_length) == (
                "jina-tiny",
                4,
                384,
                8192,
            )
            assert not info.supports_token_pruning  # ALiBi distances: pruning refused
            words = "alpha beta gamma delta " * 1500  # 6,000 single-token words
            short = "alpha beta"
            capped = client.rerank("alpha", [words, short])
            assert capped.tokens < 4200  # the default per-document cap (4,096 tokens) holds
            whole = client.rerank("alpha", [words, short], max_doc_tokens=8000)
            assert whole.tokens > 6000
            assert all(np.isfinite(r.score) for r in whole.results)
            # read whole, not windowed: truncation changes nothing at this max_length
            same = client.rerank("alpha", [words, short], long_docs="truncate", max_doc_tokens=8000)
            assert same.tokens == whole.tokens
            assert {r.index: r.score for r in same.results} == pytest.approx(
                {r.index: r.score for r in whole.results}, abs=1e-5
            )
    finally:
        proc.stop()

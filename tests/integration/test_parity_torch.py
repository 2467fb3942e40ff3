"""Torch backend on real weights ranks exactly like sentence-transformers' CrossEncoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from rerankd.engine.bundled import resolve_source
from rerankd.engine.factory import load_reranker
from rerankd.types import Document

BACKBONES = ["all-minilm-l6-v2", "splade-tiny"]


@pytest.mark.parametrize("name", BACKBONES)
def test_torch_fp32_matches_sentence_transformers(name: str, dl19) -> None:
    from sentence_transformers import CrossEncoder

    query, cands = dl19[0]
    folder = resolve_source(f"bundled:{name}")
    st = CrossEncoder(str(folder), max_length=256, activation_fn=torch.nn.Identity())
    ref = st.predict([(query, text) for _, text in cands], batch_size=32)
    r = load_reranker(f"bundled:{name}", backend="torch", precision="fp32", default_max_length=256)
    try:
        resp = r.rerank(query, [Document(i, t) for i, t in cands])
    finally:
        r.close()
    ours = np.empty(len(cands), dtype=np.float32)
    for res in resp.results:
        ours[res.index] = res.score
    assert spearmanr(ours, ref).statistic >= 0.999
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_bf16_on_cpu_keeps_the_ranking(dl19) -> None:
    query, cands = dl19[1]
    docs = [Document(i, t) for i, t in cands]
    scores = {}
    for precision in ("fp32", "bf16"):
        r = load_reranker(
            "bundled:all-minilm-l6-v2", backend="torch", precision=precision, default_max_length=256
        )
        try:
            res = r.rerank(query, docs).results
        finally:
            r.close()
        scores[precision] = np.array([s.score for s in sorted(res, key=lambda x: x.index)])
    assert spearmanr(scores["fp32"], scores["bf16"]).statistic >= 0.95


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_matches_fp32(dl19) -> None:
    query, cands = dl19[0]
    docs = [Document(i, t) for i, t in cands]
    out = {}
    for precision, device in (("fp32", "cpu"), ("fp16", "cuda")):
        r = load_reranker(
            "bundled:all-minilm-l6-v2",
            backend="torch",
            precision=precision,
            device=device,
            default_max_length=256,
        )
        try:
            res = r.rerank(query, docs).results
        finally:
            r.close()
        out[precision] = np.array([s.score for s in sorted(res, key=lambda x: x.index)])
    assert spearmanr(out["fp32"], out["fp16"]).statistic >= 0.999

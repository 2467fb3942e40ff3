"""ONNX Runtime backend on real weights ranks like sentence-transformers' CrossEncoder.

100 real TREC-DL-19 pairs (5 queries x BM25 top 20) through both bundled backbones, fp32
and int8, against sentence-transformers on the very same checkpoint folder. The export
cache lives in a temporary folder, so nothing here depends on ~/.cache.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from rerankd.engine.backends import onnx_backend
from rerankd.engine.backends.base import BackendInfo
from rerankd.engine.backends.onnx_backend import MODEL_FILE, OnnxBackend
from rerankd.engine.bundled import resolve_source
from rerankd.engine.loading import load_config
from rerankd.engine.tokenize import EncodedPair, PairEncoder, collate, load_tokenizer

BACKBONES = ["all-minilm-l6-v2", "splade-tiny"]
MIN_SPEARMAN = {"fp32": 0.999, "int8": 0.99}
MAX_LENGTH = 256
DOCS_PER_QUERY = 20
BATCH = 16
# int8 activations are quantized per tensor over the whole batch, so a neighbour changes a
# pair's scale a little: measured up to 6.3e-3 on MiniLM (its logits' spread is 0.018).
# fp32 is exact up to float reassociation.
PADDING_ATOL = {"fp32": 1e-5, "int8": 1e-2}

Pairs = list[tuple[str, str]]


@pytest.fixture(scope="module")
def pairs(dl19: list[tuple[str, list[tuple[str, str]]]]) -> Pairs:
    return [(q, text) for q, cands in dl19 for _, text in cands[:DOCS_PER_QUERY]]


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export cache for the module: the int8 graphs reuse the fp32 exports."""
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def st_scores(pairs: Pairs) -> Callable[[str], np.ndarray]:
    """sentence-transformers' raw logits per backbone, computed once each."""
    done: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        if name not in done:
            from sentence_transformers import CrossEncoder

            folder = resolve_source(f"bundled:{name}")
            st = CrossEncoder(str(folder), max_length=MAX_LENGTH, activation_fn=torch.nn.Identity())
            done[name] = np.asarray(st.predict(pairs, batch_size=32), dtype=np.float32)
        return done[name]

    return get


def encode(folder: Path, pairs: Pairs) -> list[EncodedPair]:
    """Pairs as the server encodes them (query once per request, document side truncated)."""
    cfg = load_config(folder)
    encoder = PairEncoder(load_tokenizer(folder), cfg.max_length, cfg.type_vocab_size == 1)
    out: list[EncodedPair] = []
    start = 0
    while start < len(pairs):
        query = pairs[start][0]
        end = start
        while end < len(pairs) and pairs[end][0] == query:
            end += 1
        out.extend(encoder.encode(query, [d for _, d in pairs[start:end]], MAX_LENGTH).pairs)
        start = end
    assert len(out) == len(pairs)
    return out


def score_all(backend: OnnxBackend, encoded: list[EncodedPair], pad_id: int) -> np.ndarray:
    """Length-sorted batches, as the scheduler packs them; scores back in input order."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = np.full(len(encoded), np.nan, dtype=np.float32)
    for i in range(0, len(order), BATCH):
        idx = order[i : i + BATCH]
        logits = backend.score(collate([encoded[j] for j in idx], pad_id))
        assert logits.dtype == np.float32 and logits.shape == (len(idx),)
        out[idx] = logits
    return out


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("name", BACKBONES)
def test_onnx_ranks_like_sentence_transformers(
    name: str,
    precision: str,
    pairs: Pairs,
    onnx_cache: Path,
    st_scores: Callable[[str], np.ndarray],
) -> None:
    folder = resolve_source(f"bundled:{name}")
    backend = OnnxBackend(folder, precision=precision, threads=2, cache_dir=onnx_cache)
    assert backend.info == BackendInfo("onnx", precision, "cpu")
    try:
        ours = score_all(backend, encode(folder, pairs), load_config(folder).pad_token_id)
    finally:
        backend.close()
    ref = st_scores(name)
    assert np.isfinite(ours).all()
    rho = spearmanr(ours, ref).statistic
    assert rho >= MIN_SPEARMAN[precision], f"{name} {precision}: Spearman {rho:.5f}"
    if precision == "fp32":
        np.testing.assert_allclose(ours, ref, atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_padding_next_to_a_long_pair_keeps_the_score(
    precision: str, pairs: Pairs, onnx_cache: Path
) -> None:
    folder = resolve_source("bundled:all-minilm-l6-v2")
    pad = load_config(folder).pad_token_id
    encoded = encode(folder, pairs)
    by_length = sorted(encoded, key=len)
    longest = by_length[-1]
    backend = OnnxBackend(folder, precision=precision, cache_dir=onnx_cache)
    try:
        for short in by_length[:5]:
            assert len(longest) > 3 * len(short)  # mostly padding in the short row
            alone = backend.score(collate([short], pad))
            padded = backend.score(collate([short, longest], pad))
            assert np.isfinite(padded).all()
            np.testing.assert_allclose(padded[0], alone[0], atol=PADDING_ATOL[precision])
    finally:
        backend.close()


def test_second_construction_reuses_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = resolve_source("bundled:splade-tiny")
    calls = {"export": 0, "quantize": 0}
    real_export, real_quantize = onnx_backend._export, onnx_backend._quantize

    def counting_export(*args: Any) -> None:
        calls["export"] += 1
        real_export(*args)

    def counting_quantize(*args: Any) -> None:
        calls["quantize"] += 1
        real_quantize(*args)

    monkeypatch.setattr(onnx_backend, "_export", counting_export)
    monkeypatch.setattr(onnx_backend, "_quantize", counting_quantize)
    # The default cache location follows RERANKD_CACHE.
    monkeypatch.setenv("RERANKD_CACHE", str(tmp_path))

    first = OnnxBackend(folder, precision="int8")
    assert first.model_path.is_relative_to(tmp_path / "onnx")
    assert calls == {"export": 1, "quantize": 1}
    mtime = first.model_path.stat().st_mtime_ns
    batch = collate(encode(folder, [("what is an axon", "Axons carry signals away.")]), 0)

    second = OnnxBackend(folder, precision="int8")
    assert calls == {"export": 1, "quantize": 1}
    assert second.model_path == first.model_path
    assert second.model_path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(second.score(batch), first.score(batch))

    # The fp32 graph was exported on the way to int8, so fp32 is a cache hit as well.
    fp32 = OnnxBackend(folder, precision="fp32")
    assert calls == {"export": 1, "quantize": 1}
    assert fp32.model_path != first.model_path
    # Nothing half-written is left beside the entries.
    leftovers = [p.name for p in (tmp_path / "onnx").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    for entry in (first.model_path.parent, fp32.model_path.parent):  # no scratch files either
        assert sorted(p.name for p in entry.iterdir()) == sorted(
            [MODEL_FILE, onnx_backend.META_FILE]
        )
    for b in (first, second, fp32):
        b.close()


def test_factory_serves_int8_on_the_onnx_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dl19: list
) -> None:
    from rerankd.engine.factory import load_reranker
    from rerankd.types import Document

    monkeypatch.setenv("RERANKD_CACHE", str(tmp_path))
    query, cands = dl19[0]
    docs = [Document(i, t) for i, t in cands[:10]]
    r = load_reranker("bundled:splade-tiny", backend="onnx", precision="int8", threads=2)
    try:
        assert r.backend.info == BackendInfo("onnx", "int8", "cpu")
        results = r.rerank(query, docs).results
    finally:
        r.close()
    assert sorted(res.index for res in results) == list(range(len(docs)))
    assert all(np.isfinite(res.score) for res in results)
    assert any((tmp_path / "onnx").glob(f"*/{MODEL_FILE}"))


def test_parallel_workers_score_like_one_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dl19: list
) -> None:
    """Two single-threaded workers sharing one session give the same fp32 scores as one
    two-threaded worker (fp32 scores do not depend on how pairs are batched)."""
    from rerankd.engine.factory import load_reranker
    from rerankd.engine.scheduler import SchedulerConfig
    from rerankd.types import Document

    monkeypatch.setenv("RERANKD_CACHE", str(tmp_path))
    query, cands = dl19[0]
    docs = [Document(i, t) for i, t in cands[:40]]
    small = SchedulerConfig(max_batch_tokens=512)
    got = {}
    for workers, threads in ((1, 2), (2, 1)):
        r = load_reranker(
            "bundled:splade-tiny",
            backend="onnx",
            precision="fp32",
            threads=threads,
            workers=workers,
            scheduler=small,
        )
        try:
            assert r.scheduler.workers == workers
            res = r.rerank(query, docs, top_n=0)
            got[workers] = {x.index: x.score for x in res.results}
            assert r.scheduler.batches_run >= 2
        finally:
            r.close()
    np.testing.assert_allclose(
        [got[2][i] for i in range(len(docs))], [got[1][i] for i in range(len(docs))], atol=1e-5
    )


def test_worker_plan() -> None:
    from rerankd.engine.factory import cpu_cores, plan_workers
    from rerankd.errors import ModelLoadError

    cores = cpu_cores()
    assert plan_workers("onnx", 0, 0) == (cores, 1)
    assert plan_workers("onnx", 4, 0) == (4, 1)  # the budget, one thread per worker
    assert plan_workers("onnx", 4, 2) == (2, 2)
    assert plan_workers("onnx", 0, 2) == (2, max(1, cores // 2))
    assert plan_workers("onnx", 2, 1) == (1, 2)  # one worker with the whole budget
    assert plan_workers("torch", 3, 0) == (1, 3)
    with pytest.raises(ModelLoadError, match="onnx backend only"):
        plan_workers("torch", 0, 2)
    with pytest.raises(ModelLoadError, match=">= 0"):
        plan_workers("onnx", -1, 0)

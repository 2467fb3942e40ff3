"""The engine on tiny random checkpoints: validation, ordering, options, padding invariance."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rerankd.engine.factory import load_reranker, plan
from rerankd.engine.limits import Limits
from rerankd.engine.loading import load_cross_encoder
from rerankd.errors import InvalidInputError, ModelLoadError
from rerankd.types import Document, LongDocs, Normalization, RerankOptions
from tests.helpers import write_tiny_checkpoint

DOCS = [
    Document(str(i), t)
    for i, t in enumerate(
        ["a short one", "a much longer document " * 20, "medium length text about cats", "x"]
    )
]


@pytest.fixture(scope="module")
def reranker(tiny_checkpoint: Path):
    r = load_reranker(str(tiny_checkpoint), "tiny", backend="torch", limits=Limits(max_documents=5))
    yield r
    r.close()


def test_results_sorted_best_first_with_ids_and_top_n(reranker) -> None:
    resp = reranker.rerank("cats", DOCS, top_n=3, options=RerankOptions(return_documents=True))
    scores = [r.score for r in resp.results]
    assert len(resp.results) == 3
    assert scores == sorted(scores, reverse=True)
    for r in resp.results:
        assert DOCS[r.index].id == r.id and DOCS[r.index].text == r.text
    full = reranker.rerank("cats", DOCS)
    assert [r.index for r in full.results][:3] == [r.index for r in resp.results]
    assert full.tokens > 0 and full.timings.inference_us > 0


def test_scores_do_not_depend_on_batch_company(reranker) -> None:
    alone = {d.id: reranker.rerank("cats", [d]).results[0].score for d in DOCS}
    together = {r.id: r.score for r in reranker.rerank("cats", DOCS).results}
    for k in alone:
        assert math.isclose(alone[k], together[k], rel_tol=1e-4, abs_tol=1e-5)


def test_sigmoid_normalisation(reranker) -> None:
    raw = reranker.rerank("cats", DOCS).results
    sig = reranker.rerank(
        "cats", DOCS, options=RerankOptions(normalization=Normalization.SIGMOID)
    ).results
    assert [r.index for r in raw] == [r.index for r in sig]
    for a, b in zip(raw, sig, strict=True):
        assert math.isclose(b.score, 1 / (1 + math.exp(-a.score)), rel_tol=1e-5)
        assert 0 < b.score < 1


@pytest.mark.parametrize(
    ("query", "docs", "top_n", "opts", "message"),
    [
        ("", DOCS, 0, RerankOptions(), "query is empty"),
        ("   ", DOCS, 0, RerankOptions(), "query is empty"),
        ("q", [], 0, RerankOptions(), "no documents"),
        ("q", DOCS * 2, 0, RerankOptions(), "limit is 5"),
        ("q", DOCS, -1, RerankOptions(), "top_n"),
        ("q", DOCS, 0, RerankOptions(max_length=-3), "max_length must be >= 0"),
        ("q", DOCS, 0, RerankOptions(max_length=4), "too small"),
        ("q", DOCS, 0, RerankOptions(max_length=100_000), "exceeds the model's limit"),
    ],
)
def test_bad_input_says_what_to_fix(reranker, query, docs, top_n, opts, message) -> None:
    with pytest.raises(InvalidInputError, match=message):
        reranker.rerank(query, docs, top_n=top_n, options=opts)


def test_default_max_length_is_the_models_training_length(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """rerankd.json's `max_length` (what the trainer saw) is the default; a server flag or a
    request overrides it, and the position table caps it."""
    import json
    import shutil

    folder = tmp_path / "trained"
    shutil.copytree(tiny_checkpoint, folder)
    plain = load_reranker(str(folder), backend="torch")
    cap = plain.config.max_length
    assert plain.info.default_max_length == min(512, cap)
    plain.close()
    (folder / "rerankd.json").write_text(json.dumps({"max_length": 24}))
    trained = load_reranker(str(folder), backend="torch")
    assert trained.info.default_max_length == 24
    long_doc = [Document("0", "word " * 200)]
    cut = RerankOptions(long_docs=LongDocs.TRUNCATE)
    assert trained.rerank("q", long_doc, options=cut).tokens == 24
    wider = RerankOptions(long_docs=LongDocs.TRUNCATE, max_length=40)
    assert trained.rerank("q", long_doc, options=wider).tokens == 40
    trained.close()
    flagged = load_reranker(str(folder), backend="torch", default_max_length=32)
    assert flagged.info.default_max_length == 32
    flagged.close()


def test_default_long_docs_is_the_models(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """rerankd.json's `long_docs` (how the model was trained to read documents) is what a
    request that does not say gets; a request's own value wins; a bad value fails the load."""
    import json
    import shutil

    folder = tmp_path / "trained"
    shutil.copytree(tiny_checkpoint, folder)
    long_doc = [Document("0", "word " * 200)]
    first, best = RerankOptions(long_docs=LongDocs.TRUNCATE), RerankOptions(long_docs=LongDocs.MAX)
    plain = load_reranker(str(folder), backend="torch", default_max_length=24)
    assert plain.info.default_long_docs == LongDocs.MAX
    assert plain.rerank("q", long_doc).tokens == plain.rerank("q", long_doc, options=best).tokens
    plain.close()
    (folder / "rerankd.json").write_text(json.dumps({"long_docs": "truncate"}))
    trained = load_reranker(str(folder), backend="torch", default_max_length=24)
    try:
        assert trained.info.default_long_docs == LongDocs.TRUNCATE
        default = trained.rerank("q", long_doc)
        assert default.tokens == 24  # one window
        assert (
            default.results[0].score
            == trained.rerank("q", long_doc, options=first).results[0].score
        )
        assert trained.rerank("q", long_doc, options=best).tokens > 24  # every window
    finally:
        trained.close()
    (folder / "rerankd.json").write_text(json.dumps({"long_docs": "middle"}))
    with pytest.raises(ModelLoadError, match="long_docs must be one of"):
        load_reranker(str(folder), backend="torch")


def test_depth_truncation_runs_first_k_layers(tiny_checkpoint: Path) -> None:
    model = load_cross_encoder(tiny_checkpoint)
    ids = torch.tensor([[101, 2000, 102, 3000, 102]])
    mask = torch.ones_like(ids)
    types = torch.tensor([[0, 0, 0, 1, 1]])
    full = model(ids, mask, types)
    assert not torch.allclose(full, model(ids, mask, types, depth=1))
    assert torch.allclose(full, model(ids, mask, types, depth=2))


def test_roberta_family_loads_and_ignores_padding(tmp_path: Path) -> None:
    folder = write_tiny_checkpoint(tmp_path / "xlmr", model_type="xlm-roberta")
    model = load_cross_encoder(folder)
    ids = torch.tensor([[0, 2000, 2, 2, 3000, 2, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    padded = model(ids, mask, torch.zeros_like(ids))
    trimmed = model(ids[:, :6], mask[:, :6], torch.zeros_like(ids[:, :6]))
    assert torch.allclose(padded, trimmed, atol=1e-5)


def test_missing_or_pickled_weights_are_refused(tmp_path: Path, tiny_checkpoint: Path) -> None:
    (tmp_path / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        load_cross_encoder(tmp_path)


def test_bare_encoder_is_refused_with_a_hint() -> None:
    from rerankd.engine.bundled import backbone_dir

    with pytest.raises(ModelLoadError, match="convert-backbone"):
        load_cross_encoder(backbone_dir("all-minilm-l6-v2"))


def test_backend_plan() -> None:
    assert plan("auto", "auto", "cpu") == ("onnx", "int8", "cpu")
    assert plan("torch", "auto", "cpu") == ("torch", "fp32", "cpu")
    assert plan("auto", "auto", "cuda") == ("torch", "fp16", "cuda")
    with pytest.raises(ModelLoadError):
        plan("onnx", "bf16", "cpu")
    with pytest.raises(ModelLoadError):
        plan("tensorrt", "auto", "cpu")


def test_unknown_source_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match="no model folder"):
        load_reranker("./does/not/exist")


def _scores(resp) -> dict[str, float]:
    return {r.id: r.score for r in resp.results}


def test_long_document_scores_the_max_of_its_windows(tiny_checkpoint: Path) -> None:
    from rerankd.types import LongDocs

    r = load_reranker(str(tiny_checkpoint), backend="torch", default_max_length=32)
    try:
        words = ["alpha", "beta", "gamma", "delta", "cat", "dog"]
        doc = " ".join(words[(i * 7) % 6] for i in range(120))  # single-token words
        opts = RerankOptions(window_overlap=4)
        encoded = r.encode("cats", [Document("d", doc)], opts).encoded
        assert len(encoded.pairs) > 2
        tok = r.encoder.tokenizer
        windows = [tok.decode(p.input_ids[3:-1].tolist()) for p in encoded.pairs]
        as_docs = [Document(str(i), w) for i, w in enumerate(windows)]
        separately = _scores(r.rerank("cats", as_docs, options=opts))
        whole = r.rerank("cats", [Document("d", doc)], options=opts)
        assert math.isclose(whole.results[0].score, max(separately.values()), abs_tol=1e-5)
        assert whole.tokens == sum(len(p) for p in encoded.pairs)  # usage counts all windows
        first = r.rerank(
            "cats", [Document("d", doc)], options=RerankOptions(long_docs=LongDocs.TRUNCATE)
        )
        assert math.isclose(first.results[0].score, separately["0"], abs_tol=1e-5)
    finally:
        r.close()


def test_depth_option_equals_truncated_forward(tiny_checkpoint: Path) -> None:
    r = load_reranker(str(tiny_checkpoint), backend="torch")
    model = load_cross_encoder(tiny_checkpoint)
    try:
        doc = Document("d", "a medium length text about cats")
        shallow = r.rerank("cats", [doc], options=RerankOptions(depth=1)).results[0].score
        full = r.rerank("cats", [doc]).results[0].score
        (pair,) = r.encode("cats", [doc], RerankOptions()).encoded.pairs
        ids = torch.from_numpy(pair.input_ids)[None]
        types = torch.from_numpy(pair.token_type_ids)[None]
        with torch.inference_mode():
            ref = model(ids, torch.ones_like(ids), types, depth=1).item()
        assert math.isclose(shallow, ref, abs_tol=1e-5)
        assert not math.isclose(shallow, full, abs_tol=1e-4)
        for bad in (-1, 3):
            with pytest.raises(InvalidInputError, match="depth"):
                r.rerank("cats", [doc], options=RerankOptions(depth=bad))
    finally:
        r.close()


def test_score_cache_is_exact_and_reports_hits(tiny_checkpoint: Path) -> None:
    from rerankd.engine.cache import CacheConfig

    plain = load_reranker(str(tiny_checkpoint), backend="torch")
    cached = load_reranker(str(tiny_checkpoint), backend="torch", cache=CacheConfig(max_entries=3))
    try:
        ref = _scores(plain.rerank("cats", DOCS))
        first = cached.rerank("cats", DOCS)
        assert first.cache_hits == 0 and _scores(first) == pytest.approx(ref, abs=1e-6)
        assert len(cached.cache) == 3  # bounded: the oldest entry was evicted
        again = cached.rerank("cats", DOCS)
        assert again.cache_hits == 3
        assert again.tokens < first.tokens  # only the evicted document was recomputed
        assert _scores(again) == pytest.approx(ref, abs=1e-6)
        other = cached.rerank("cats", DOCS, options=RerankOptions(depth=1))
        assert other.cache_hits == 0  # options that change scores are part of the key
    finally:
        plain.close()
        cached.close()


def _reference_pruned(model, pair, keep: tuple[float, ...]) -> float:
    """Straightforward one-pair token pruning, independent of `forward_pruned`."""
    bb = model.backbone
    ids = torch.from_numpy(pair.input_ids)[None]
    types = torch.from_numpy(pair.token_type_ids)[None]
    x = bb.embeddings(ids, torch.ones_like(ids), types)
    kept = list(range(ids.shape[1]))  # original positions still present
    n = len(kept)
    protected = set(np.flatnonzero(pair.protected).tolist())
    cls_att = None
    for i, ratio in enumerate(keep):
        if ratio < 1.0 and cls_att is not None:
            target = max(math.ceil(n * ratio), len(protected))
            ranked = sorted(
                range(len(kept)),
                key=lambda j: (kept[j] != 0, kept[j] not in protected, -cls_att[j]),
            )
            chosen = sorted(ranked[:target])
            x = x[:, chosen]
            kept = [kept[j] for j in chosen]
        layer = bb.encoder.layer[i]
        att = layer.attention.self
        b, s, _ = x.shape
        q = att.query(x).view(b, s, att.num_heads, att.head_dim).transpose(1, 2)
        k = att.key(x).view(b, s, att.num_heads, att.head_dim).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(att.head_dim), dim=-1)
        cls_att = probs[0, :, 0, :].mean(0).tolist()
        x = layer(x, torch.zeros(1, 1, 1, s))
    return model.head(x).item()


def test_keep_schedule_equals_a_reference_that_prunes_the_same_tokens(
    tiny_checkpoint: Path,
) -> None:
    r = load_reranker(str(tiny_checkpoint), backend="torch")
    model = load_cross_encoder(tiny_checkpoint)
    try:
        docs = [
            Document("a", "cats are small furry animals that like to sleep in the sun"),
            Document("b", "x"),
        ]
        opts = RerankOptions(keep_schedule=(1.0, 0.5))
        resp = r.rerank("cats", docs, options=opts)
        assert resp.keep_schedule == (1.0, 0.5)
        got = {x.id: x.score for x in resp.results}
        pairs = r.encode("cats", docs, opts).encoded.pairs
        with torch.inference_mode():
            for doc, pair in zip(docs, pairs, strict=True):
                assert math.isclose(
                    got[doc.id], _reference_pruned(model, pair, (1.0, 0.5)), abs_tol=1e-5
                )
        full = _scores(r.rerank("cats", docs))
        assert not math.isclose(got["a"], full["a"], abs_tol=1e-4)
        # keep_ratio/keep_from_layer is the same schedule; all-ones means no pruning
        same = r.rerank("cats", docs, options=RerankOptions(keep_ratio=0.5, keep_from_layer=2))
        assert _scores(same) == pytest.approx(got, abs=1e-6)
        ones = r.rerank("cats", docs, options=RerankOptions(keep_schedule=(1.0, 1.0)))
        assert _scores(ones) == pytest.approx(full, abs=1e-6) and ones.keep_schedule == ()
    finally:
        r.close()


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (RerankOptions(keep_schedule=(0.5, 0.5)), "must be 1.0"),
        (RerankOptions(keep_schedule=(1.0,)), "one per layer"),
        (RerankOptions(keep_schedule=(1.0, 1.5)), r"in \(0, 1\]"),
        (RerankOptions(keep_schedule=(1.0, 0.0)), r"in \(0, 1\]"),
        (RerankOptions(keep_schedule=(1.0, float("nan"))), r"in \(0, 1\]"),
        (RerankOptions(keep_ratio=-0.5), "keep_ratio"),
        (RerankOptions(keep_ratio=0.5, keep_from_layer=1), "keep_from_layer"),
        (RerankOptions(keep_ratio=0.5, keep_schedule=(1.0, 0.5)), "either"),
    ],
)
def test_bad_keep_schedules_say_what_to_fix(reranker, opts, message) -> None:
    with pytest.raises(InvalidInputError, match=message):
        reranker.rerank("cats", DOCS, options=opts)

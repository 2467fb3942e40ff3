"""Dense and sparse encoders on a tiny random BERT written to tmp_path: fast, no real weights.

What is checked here is the plumbing the parity tests cannot isolate: padding never leaks
into pooled or max-pooled outputs, results come back in input order whatever the batching,
and the loaders read (or refuse) checkpoint layouts as documented.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rerankd.engine import encoders as enc_mod
from rerankd.engine.checkpoint import read_weights
from rerankd.engine.encoders import DenseEncoder, SparseEncoder
from rerankd.engine.models import mlm as mlm_mod
from rerankd.engine.models.bert import BertBackbone
from rerankd.engine.models.config import ModelConfig
from rerankd.engine.models.mlm import MaskedLM, load_masked_lm
from rerankd.errors import InvalidInputError, ModelLoadError

WORDS = [
    *("the", "a", "of", "and", "to", "in", "is", "was", "for", "on", "with", "as", "by"),
    *("at", "from", "it", "that", "this", "be", "are", "capital", "france", "paris", "city"),
    *("river", "bank", "money", "cat", "dog", "runs", "fast", "slow", "red", "blue", "green"),
    *("house", "car", "tree", "water", "fire", "earth", "wind", "search", "engine", "query"),
    *("document", "vector"),
]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", "##ing", "##ed"]
RAW_CONFIG = {
    "model_type": "bert",
    "vocab_size": len(VOCAB),
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "hidden_act": "gelu",
}
SHORT = "the cat runs"
LONG = " ".join(WORDS * 2)  # longer than max_position_embeddings: exercises truncation


def _write_common(folder: Path, raw: dict | None = None) -> ModelConfig:
    folder.mkdir(parents=True, exist_ok=True)
    raw = raw or RAW_CONFIG
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return ModelConfig.from_dict(raw)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere (LayerNorms included) so bugs cannot hide in zeros/ones."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


@pytest.fixture
def dense_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "dense"
    cfg = _write_common(folder)
    model = BertBackbone(cfg, with_pooler=True)
    _randomize(model, seed=1)
    # Bare BertModel layout (no `bert.` prefix, pooler included), as all-MiniLM-L6-v2 ships.
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors"
    )
    return folder


@pytest.fixture
def sparse_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "sparse"
    cfg = _write_common(folder)
    model = MaskedLM(cfg)
    _randomize(model, seed=2)
    state = model.state_dict()
    # Tied decoder is not stored (as in BERT checkpoints); LayerNorms use legacy names.
    state.pop("cls.predictions.decoder.weight")
    legacy = {}
    for k, v in state.items():
        if "LayerNorm" in k:
            k = k.replace(".weight", ".gamma").replace(".bias", ".beta")
        legacy[k] = v.contiguous()
    legacy["cls.seq_relationship.weight"] = torch.zeros(2, cfg.hidden_size)
    save_file(legacy, folder / "model.safetensors")
    return folder


def test_mean_pooling_ignores_padding(dense_dir: Path) -> None:
    enc = DenseEncoder(dense_dir)
    for normalize in (True, False):
        alone = enc.encode([SHORT], normalize=normalize)
        padded = enc.encode([LONG, SHORT], normalize=normalize)
        np.testing.assert_allclose(padded[1], alone[0], rtol=1e-5, atol=1e-6)


def test_results_in_input_order_whatever_the_batching(dense_dir: Path) -> None:
    enc = DenseEncoder(dense_dir)
    texts = [SHORT, LONG, "paris", "the capital of france is paris", "", "dog"]
    whole = enc.encode(texts, batch_size=64)
    one_by_one = enc.encode(texts, batch_size=1)
    pairs = enc.encode(texts, batch_size=2)
    np.testing.assert_allclose(one_by_one, whole, atol=1e-6)
    np.testing.assert_allclose(pairs, whole, atol=1e-6)
    for i, t in enumerate(texts):
        np.testing.assert_allclose(enc.encode([t])[0], whole[i], atol=1e-6)


def test_dense_shape_dtype_and_normalisation(dense_dir: Path) -> None:
    enc = DenseEncoder(dense_dir)
    out = enc.encode([SHORT, LONG])
    assert out.shape == (2, enc.dimension) == (2, 16)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    raw = enc.encode([SHORT, LONG], normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), out, atol=1e-6)


def test_mean_pooling_matches_manual_computation(dense_dir: Path) -> None:
    enc = DenseEncoder(dense_dir)
    ids = enc.tokenizer.encode(SHORT).ids
    with torch.inference_mode():
        t = torch.tensor([ids])
        hidden = enc.model(t, torch.ones_like(t), torch.zeros_like(t))
    expected = hidden[0].mean(dim=0).numpy()
    np.testing.assert_allclose(enc.encode([SHORT], normalize=False)[0], expected, atol=1e-6)


def test_empty_input_gives_empty_output(dense_dir: Path, sparse_dir: Path) -> None:
    dense = DenseEncoder(dense_dir)
    out = dense.encode([])
    assert out.shape == (0, 16) and out.dtype == np.float32
    assert dense.encode_with_usage([])[1] == 0
    assert SparseEncoder(sparse_dir).encode([]) == []


def test_truncation_and_usage(dense_dir: Path) -> None:
    enc = DenseEncoder(dense_dir)
    assert enc.max_length == RAW_CONFIG["max_position_embeddings"]
    _, tokens = enc.encode_with_usage([LONG, SHORT])
    # [CLS] the cat runs [SEP] = 5 tokens; the long text is cut to max_length.
    assert tokens == enc.max_length + 5


def test_sentence_bert_config_sets_max_length(dense_dir: Path) -> None:
    (dense_dir / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8}))
    enc = DenseEncoder(dense_dir)
    assert enc.max_length == 8
    assert enc.encode_with_usage([LONG])[1] == 8


def test_cls_pooling_read_from_pooling_config(dense_dir: Path) -> None:
    pooling = dense_dir / "1_Pooling"
    pooling.mkdir()
    pooling.joinpath("config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    enc = DenseEncoder(dense_dir)
    assert enc.pooling == "cls"
    ids = enc.tokenizer.encode(SHORT).ids
    with torch.inference_mode():
        t = torch.tensor([ids])
        hidden = enc.model(t, torch.ones_like(t), torch.zeros_like(t))
    np.testing.assert_allclose(
        enc.encode([SHORT], normalize=False)[0], hidden[0, 0].numpy(), atol=1e-6
    )


def test_unimplemented_sentence_transformers_modules_are_refused(dense_dir: Path) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]
    (dense_dir / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match="Dense"):
        DenseEncoder(dense_dir)


def test_weighted_mean_pooling_is_refused(dense_dir: Path) -> None:
    pooling = dense_dir / "1_Pooling"
    pooling.mkdir()
    pooling.joinpath("config.json").write_text(
        json.dumps({"pooling_mode_weightedmean_tokens": True})
    )
    with pytest.raises(ModelLoadError, match="pooling"):
        DenseEncoder(dense_dir)


def test_prefixes_follow_input_type(dense_dir: Path) -> None:
    plain = DenseEncoder(dense_dir)
    np.testing.assert_array_equal(
        plain.encode([SHORT], input_type="query"), plain.encode([SHORT], input_type="document")
    )
    e5 = DenseEncoder(dense_dir, query_prefix="query ", document_prefix="document ")
    q = e5.encode([SHORT], input_type="query")
    d = e5.encode([SHORT], input_type="document")
    assert not np.allclose(q, d)
    np.testing.assert_allclose(q, plain.encode(["query " + SHORT]), atol=1e-6)
    with pytest.raises(InvalidInputError):
        e5.encode([SHORT], input_type="passage")  # type: ignore[arg-type]


def test_a_string_is_not_a_list_of_texts(dense_dir: Path) -> None:
    with pytest.raises(InvalidInputError):
        DenseEncoder(dense_dir).encode("the cat")  # type: ignore[arg-type]


def test_sparse_vectors_are_sorted_unique_and_positive(sparse_dir: Path) -> None:
    enc = SparseEncoder(sparse_dir)
    assert enc.vocab_size == enc.dimension == len(VOCAB)
    vectors = enc.encode([SHORT, LONG, "", "paris"])
    assert len(vectors) == 4
    for v in vectors:
        assert len(v.indices) == len(v.values) > 0
        assert v.indices == sorted(set(v.indices))
        assert all(0 <= i < len(VOCAB) for i in v.indices)
        assert all(x > 0 for x in v.values)
        assert all(np.float32(x) == x for x in v.values)  # float32 values, not rounded doubles


def test_sparse_padding_and_batching_do_not_change_vectors(sparse_dir: Path) -> None:
    enc = SparseEncoder(sparse_dir)
    alone = enc.encode([SHORT])[0]
    batched = enc.encode([LONG, SHORT, "dog"], batch_size=2)[1]
    assert alone.indices == batched.indices
    np.testing.assert_allclose(alone.values, batched.values, rtol=1e-5, atol=1e-6)


def test_splade_matches_naive_formula_across_logit_slabs(
    sparse_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_masked_lm(sparse_dir)
    ids = torch.tensor([[2, 5, 6, 7, 8, 3, 0, 0], [2, 9, 10, 11, 12, 13, 14, 3]])
    mask = (ids != 0).long()
    types = torch.zeros_like(ids)
    with torch.inference_mode():
        logits = model(ids, mask, types)
        naive = (torch.log1p(torch.relu(logits)) * mask[..., None]).amax(dim=1)
        # One token per slab: the running max must equal the all-at-once formula.
        monkeypatch.setattr(mlm_mod, "_LOGIT_SLAB_ELEMENTS", 1)
        slabbed = model.splade(ids, mask, types)
    torch.testing.assert_close(slabbed, naive, rtol=0, atol=1e-6)


def test_top_k_keeps_the_largest_weights(sparse_dir: Path) -> None:
    full = SparseEncoder(sparse_dir).encode([LONG])[0]
    top = SparseEncoder(sparse_dir, top_k=3).encode([LONG])[0]
    assert len(top.indices) == 3 and top.indices == sorted(top.indices)
    expected = sorted(sorted(zip(full.values, full.indices, strict=True), reverse=True)[:3])
    assert sorted(zip(top.values, top.indices, strict=True)) == expected


def test_mlm_head_loading_ties_and_legacy_names(sparse_dir: Path) -> None:
    assert not any(k.startswith("cls.") for k in read_weights(sparse_dir))
    kept = read_weights(sparse_dir, keep_mlm_head=True)
    assert "cls.predictions.transform.LayerNorm.weight" in kept
    assert "cls.predictions.bias" in kept
    assert not any(k.startswith("cls.seq_relationship") for k in kept)
    model = load_masked_lm(sparse_dir)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_untied_decoder_is_loaded_when_config_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "untied"
    cfg = _write_common(folder, {**RAW_CONFIG, "tie_word_embeddings": False})
    model = MaskedLM(cfg, tie_word_embeddings=False)
    _randomize(model, seed=3)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors"
    )
    loaded = load_masked_lm(folder)
    decoder = loaded.cls.predictions.decoder.weight
    assert decoder is not loaded.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(decoder, model.cls.predictions.decoder.weight)


def test_sparse_refuses_checkpoint_without_mlm_head(dense_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="masked-LM head"):
        SparseEncoder(dense_dir)


def test_pickled_only_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    _write_common(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="safetensors"):
        DenseEncoder(folder)


def test_encoder_info(dense_dir: Path, sparse_dir: Path) -> None:
    dense = enc_mod.load_dense_encoder(str(dense_dir), name="tiny-dense")
    info = dense.info
    assert (info.name, info.kind, info.source) == ("tiny-dense", "dense", str(dense_dir))
    assert (info.num_layers, info.hidden_size, info.num_heads) == (2, 16, 2)
    assert (info.max_length, info.dimension) == (64, 16)
    sparse = enc_mod.load_sparse_encoder(str(sparse_dir))
    assert sparse.info.name == "sparse" and sparse.info.kind == "sparse"
    assert sparse.info.dimension == len(VOCAB)

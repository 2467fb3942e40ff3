"""Parity of rerankd's own encoders with the reference libraries, on the bundled real weights.

Dense: all-MiniLM-L6-v2 through our BERT vs sentence-transformers itself.
Sparse: SPLADE-tiny through our BERT + MLM head vs transformers' BertForMaskedLM with the
SPLADE formula applied by hand. Both references read the very same folders, offline.
"""

from __future__ import annotations

import os
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from rerankd.engine.bundled import backbone_dir
from rerankd.engine.encoders import (
    DenseEncoder,
    SparseEncoder,
    load_dense_encoder,
    load_sparse_encoder,
    resolve_encoder_source,
)
from rerankd.errors import ModelLoadError

pytestmark = pytest.mark.slow

TEXTS = [
    "what is the capital of france",
    "Paris is the capital and most populous city of France.",
    "how do vaccines train the immune system",
    "Vaccines expose the body to a harmless piece of a pathogen so it can learn to fight it.",
    "best way to learn python programming",
    "Python is a high-level, general-purpose programming language.",
    "symptoms of vitamin d deficiency",
    "The mitochondria is the powerhouse of the cell.",
    "who wrote pride and prejudice",
    "Pride and Prejudice is an 1813 novel of manners written by Jane Austen.",
    "how tall is mount everest",
    "Mount Everest is Earth's highest mountain above sea level, at 8,849 metres.",
    "tips for reducing cloud computing costs",
    "Turn off idle virtual machines and buy reserved instances for steady workloads.",
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Two men pushed carts through the woods.",
    "The quick brown fox jumps over the lazy dog.",
    "Rust's borrow checker prevents data races at compile time.",
    "Qdrant, Milvus and Weaviate are vector databases.",
    "Cross-encoders score a query and a document together; bi-encoders embed them apart.",
    "How many legs does a spider have?",
    "Spiders are arachnids with eight legs and two body segments.",
    "The stock market fell sharply after the interest rate announcement.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "is coffee bad for your heart",
    "Moderate coffee consumption is not associated with a higher risk of heart disease.",
    "The Great Wall of China is visible from low Earth orbit only under ideal conditions.",
    "what time zone is tokyo in",
    "Tokyo observes Japan Standard Time, nine hours ahead of UTC.",
    "Die Hauptstadt von Deutschland ist Berlin.",
    "La tour Eiffel se trouve à Paris, sur le Champ-de-Mars.",
    "El rápido zorro marrón salta sobre el perro perezoso.",
    "東京は日本の首都です。",
    "naïve café résumé — façade, coöperate, jalapeño",
    "e = mc^2 relates mass and energy; 299,792,458 m/s is the speed of light.",
    "Error: connection refused (ECONNREFUSED) on 127.0.0.1:50051",
    "SELECT id, title FROM documents WHERE score > 0.5 ORDER BY score DESC LIMIT 10;",
    "def rerank(query: str, docs: list[str]) -> list[float]: ...",
    "I love this product!!! 10/10 would buy again :)",
    "The patient presented with acute dyspnea and bilateral crackles on auscultation.",
    "Under the agreement, the licensee shall indemnify the licensor against all claims.",
    "climate change effects on coral reefs",
    "Rising sea temperatures cause coral bleaching and reef die-off.",
    "a",
    "",
    "   ",
    # 266 tokens, over MiniLM's 256-token limit: both sides must truncate the same way.
    " ".join(["Retrieval-augmented generation combines a search index with a language model"] * 22),
    "Short.",
]


@pytest.fixture(scope="module")
def dense() -> DenseEncoder:
    return load_dense_encoder("bundled:all-minilm-l6-v2", batch_size=16)


@pytest.fixture(scope="module")
def sparse() -> SparseEncoder:
    return load_sparse_encoder("bundled:splade-tiny", batch_size=16)


def test_dense_parity_with_sentence_transformers(dense: DenseEncoder) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(backbone_dir("all-minilm-l6-v2")), device="cpu")
    assert reference.max_seq_length == dense.max_length == 256
    expected = reference.encode(TEXTS, batch_size=16, convert_to_numpy=True)
    ours = dense.encode(TEXTS)
    assert ours.shape == expected.shape == (len(TEXTS), 384)
    assert ours.dtype == np.float32
    cosine = (ours * expected).sum(axis=1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(expected, axis=1)
    )
    print(
        f"dense parity: min cosine {cosine.min():.8f}, "
        f"max abs diff {np.abs(ours - expected).max():.2e}"
    )
    assert cosine.min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_dense_sanity_ranking(dense: DenseEncoder) -> None:
    q = dense.encode(["what is the capital of france"], input_type="query")[0]
    docs = dense.encode(
        [
            "Paris is the capital and most populous city of France.",
            "A monkey is playing drums.",
            "Spiders are arachnids with eight legs.",
        ],
        input_type="document",
    )
    scores = docs @ q
    assert scores.argmax() == 0 and scores[0] > 0.5 > scores[1:].max()


def _reference_splade(texts: list[str]) -> np.ndarray:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    folder = backbone_dir("splade-tiny")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    rows = []
    with torch.inference_mode():
        # Small batches: transformers materialises (batch, seq, 30522) logits.
        for start in range(0, len(texts), 8):
            batch = tokenizer(
                texts[start : start + 8],
                padding=True,
                truncation=True,
                max_length=512,
                return_tensors="pt",
            )
            logits = model(**batch).logits
            weights = torch.log1p(torch.relu(logits)) * batch["attention_mask"].unsqueeze(-1)
            rows.append(weights.amax(dim=1).numpy())
    return np.concatenate(rows)


def test_sparse_parity_with_transformers(sparse: SparseEncoder) -> None:
    expected = _reference_splade(TEXTS)
    ours = sparse.encode(TEXTS)
    assert len(ours) == len(TEXTS)
    worst = 0.0
    for vec, ref in zip(ours, expected, strict=True):
        ref_indices = np.flatnonzero(ref > 0)
        assert vec.indices == ref_indices.tolist()
        dense_ours = np.zeros(sparse.vocab_size, dtype=np.float32)
        dense_ours[vec.indices] = vec.values
        worst = max(worst, float(np.abs(dense_ours - ref).max()))
    print(f"sparse parity: max abs diff {worst:.2e}")
    assert worst < 1e-4


def test_sparse_sanity_top_terms(sparse: SparseEncoder) -> None:
    vec = sparse.encode(["what is the capital of france"], input_type="query")[0]
    order = np.argsort(vec.values)[::-1][:10]
    top = [sparse.tokenizer.id_to_token(vec.indices[i]) for i in order]
    assert "capital" in top and "france" in top, top
    # Stop words of the query must not outrank its content words.
    weight = dict(zip(vec.indices, vec.values, strict=True))
    vocab = sparse.tokenizer.token_to_id
    assert weight[vocab("capital")] > weight.get(vocab("the"), 0.0)
    assert weight[vocab("france")] > weight.get(vocab("is"), 0.0)


def test_sparse_top_k(sparse: SparseEncoder) -> None:
    pruned = load_sparse_encoder("bundled:splade-tiny", top_k=5).encode(TEXTS[:4])
    full = sparse.encode(TEXTS[:4])
    for p, f in zip(pruned, full, strict=True):
        assert len(p.indices) == 5 and p.indices == sorted(p.indices)
        assert sorted(p.values, reverse=True) == pytest.approx(
            sorted(f.values, reverse=True)[:5], abs=1e-6
        )


def test_encoders_are_safe_to_call_from_threads(dense: DenseEncoder, sparse: SparseEncoder) -> None:
    texts = TEXTS[:8]
    dense_ref = dense.encode(texts)
    sparse_ref = sparse.encode(texts)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            chunk = texts[k:] + texts[:k]  # different batches in each thread
            got = dense.encode(chunk, batch_size=3)
            np.testing.assert_allclose(got, np.roll(dense_ref, -k, axis=0), atol=1e-5)
            got_sparse = sparse.encode(chunk, batch_size=5)
            for g, r in zip(got_sparse, sparse_ref[k:] + sparse_ref[:k], strict=True):
                assert g.indices == r.indices
                np.testing.assert_allclose(g.values, r.values, atol=1e-5)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_registry_info_and_sources(dense: DenseEncoder, sparse: SparseEncoder) -> None:
    d, s = dense.info, sparse.info
    assert (d.name, d.kind, d.source) == ("all-minilm-l6-v2", "dense", "bundled:all-minilm-l6-v2")
    assert (d.num_layers, d.hidden_size, d.num_heads, d.max_length, d.dimension) == (
        6,
        384,
        12,
        256,
        384,
    )
    assert (s.name, s.kind, s.source) == ("splade-tiny", "sparse", "bundled:splade-tiny")
    assert (s.num_layers, s.hidden_size, s.num_heads, s.max_length, s.dimension) == (
        2,
        128,
        2,
        512,
        30522,
    )
    # A local folder works as a source too, and names default to the folder.
    folder = str(resolve_encoder_source("bundled:splade-tiny"))
    assert load_sparse_encoder(folder).info.name == "model"
    with pytest.raises(ModelLoadError):
        resolve_encoder_source("bundled:no-such-model")

"""JinaBERT (symmetric ALiBi) cross-encoder against an independent reference, on tiny checkpoints.

No real jina weights are reachable offline, so the checks here are (1) the checkpoint
layout: tensors named and shaped as `JinaBertForSequenceClassification` saves them load
with nothing missing or unexpected, and (2) the math: a straightforward per-example,
per-head re-implementation written from the reference description (Jina AI's
`modeling_bert.py` in `jinaai/jina-bert-implementation`), run in float64 on the
unpadded sequence, must agree with the module. It shares no code with
`rerankd.engine.models.jina`: slopes, biases, GELU and LayerNorm are all recomputed.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rerankd.engine.loading import load_cross_encoder
from rerankd.engine.models.config import ModelConfig
from rerankd.engine.models.jina import JinaCrossEncoder, alibi_slopes
from rerankd.errors import ModelLoadError

VOCAB = 97


def jina_config(
    *, layers: int = 3, hidden: int = 24, heads: int = 6, intermediate: int = 40
) -> dict:
    """A config.json with the keys JinaBertConfig writes for the reranker checkpoints, small."""
    return {
        "_name_or_path": "jinaai/jina-bert-implementation",
        "architectures": ["JinaBertForSequenceClassification"],
        "auto_map": {
            "AutoConfig": "jinaai/jina-bert-implementation--configuration_bert.JinaBertConfig",
            "AutoModelForSequenceClassification": (
                "jinaai/jina-bert-implementation--modeling_bert.JinaBertForSequenceClassification"
            ),
        },
        "attention_probs_dropout_prob": 0.0,
        "classifier_dropout": None,
        "emb_pooler": None,
        "feed_forward_type": "geglu",
        "gradient_checkpointing": False,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": hidden,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 8192,
        "model_type": "bert",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "pad_token_id": 0,
        "position_embedding_type": "alibi",
        "torch_dtype": "float32",
        "type_vocab_size": 2,
        "use_cache": True,
        "vocab_size": VOCAB,
    }


def jina_state_dict(raw: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of a JinaBertForSequenceClassification checkpoint, by its saved name."""
    g = torch.Generator().manual_seed(seed)
    h, i, n = raw["hidden_size"], raw["intermediate_size"], raw["num_hidden_layers"]

    def rnd(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + rnd(h, scale=0.1), f"{prefix}.bias": rnd(h, scale=0.1)}

    sd = {
        "bert.embeddings.word_embeddings.weight": rnd(raw["vocab_size"], h),
        "bert.embeddings.token_type_embeddings.weight": rnd(raw["type_vocab_size"], h),
        **norm("bert.embeddings.LayerNorm"),
    }
    for layer in range(n):
        p = f"bert.encoder.layer.{layer}"
        for name in ("query", "key", "value"):
            sd[f"{p}.attention.self.{name}.weight"] = rnd(h, h)
            sd[f"{p}.attention.self.{name}.bias"] = rnd(h, scale=0.1)
        sd[f"{p}.attention.output.dense.weight"] = rnd(h, h)
        sd[f"{p}.attention.output.dense.bias"] = rnd(h, scale=0.1)
        sd.update(norm(f"{p}.attention.output.LayerNorm"))
        sd[f"{p}.mlp.gated_layers.weight"] = rnd(2 * i, h)  # no bias in the reference
        sd[f"{p}.mlp.wo.weight"] = rnd(h, i)
        sd[f"{p}.mlp.wo.bias"] = rnd(h, scale=0.1)
        sd.update(norm(f"{p}.mlp.layernorm"))
    sd["bert.pooler.dense.weight"] = rnd(h, h)
    sd["bert.pooler.dense.bias"] = rnd(h, scale=0.1)
    sd["classifier.weight"] = rnd(1, h)
    sd["classifier.bias"] = rnd(1, scale=0.1)
    return sd


def write_jina_checkpoint(folder: Path, raw: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    sd = jina_state_dict(raw, seed)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(raw))
    return sd


# ---------------------------------------------------------------- independent reference


def ref_slopes(n: int) -> list[float]:
    """Closed form of Press et al.'s slopes, written independently of the module.

    m = largest power of two <= n; heads 0..m-1 get 2^(-8(k+1)/m); the remaining
    n-m heads get 2^(-4(2j+1)/m), i.e. the odd-numbered slopes of the 2m sequence.
    """
    m = 1
    while m * 2 <= n:
        m *= 2
    return [2.0 ** (-8.0 * (k + 1) / m) for k in range(m)] + [
        2.0 ** (-4.0 * (2 * j + 1) / m) for j in range(n - m)
    ]


def ref_layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def ref_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def ref_score(
    sd: dict[str, torch.Tensor],
    raw: dict,
    ids: list[int],
    types: list[int],
    depth: int | None = None,
) -> float:
    """One pair's logit, float64, on the UNPADDED sequence, with explicit loops over heads."""
    w = {k: v.double() for k, v in sd.items()}
    eps, heads = raw["layer_norm_eps"], raw["num_attention_heads"]
    hid, inter = raw["hidden_size"], raw["intermediate_size"]
    d = hid // heads
    n = len(ids)
    x = w["bert.embeddings.word_embeddings.weight"][torch.tensor(ids)]
    x = x + w["bert.embeddings.token_type_embeddings.weight"][torch.tensor(types)]
    x = ref_layer_norm(
        x, w["bert.embeddings.LayerNorm.weight"], w["bert.embeddings.LayerNorm.bias"], eps
    )
    slopes = ref_slopes(heads)
    dist = torch.tensor([[abs(i - j) for j in range(n)] for i in range(n)], dtype=torch.float64)
    layers = raw["num_hidden_layers"] if depth is None else depth
    for layer in range(layers):
        p = f"bert.encoder.layer.{layer}"

        def lin(t: torch.Tensor, name: str, p: str = p) -> torch.Tensor:
            out = torch.einsum("sh,oh->so", t, w[f"{p}.{name}.weight"])
            bias = w.get(f"{p}.{name}.bias")
            return out if bias is None else out + bias

        q = lin(x, "attention.self.query")
        k = lin(x, "attention.self.key")
        v = lin(x, "attention.self.value")
        ctx = torch.zeros(n, hid, dtype=torch.float64)
        for hd in range(heads):
            cols = slice(hd * d, (hd + 1) * d)
            logits = torch.einsum("id,jd->ij", q[:, cols], k[:, cols]) / math.sqrt(d)
            logits = logits - slopes[hd] * dist
            ctx[:, cols] = torch.softmax(logits, dim=-1) @ v[:, cols]
        x = ref_layer_norm(
            lin(ctx, "attention.output.dense") + x,
            w[f"{p}.attention.output.LayerNorm.weight"],
            w[f"{p}.attention.output.LayerNorm.bias"],
            eps,
        )
        up = lin(x, "mlp.gated_layers")
        gated, non_gated = up[:, :inter], up[:, inter:]
        x = ref_layer_norm(
            lin(ref_gelu(gated) * non_gated, "mlp.wo") + x,
            w[f"{p}.mlp.layernorm.weight"],
            w[f"{p}.mlp.layernorm.bias"],
            eps,
        )
    pooled = torch.tanh(w["bert.pooler.dense.weight"] @ x[0] + w["bert.pooler.dense.bias"])
    return float(w["classifier.weight"][0] @ pooled + w["classifier.bias"][0])


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """3 layers, 6 heads (not a power of two), written like a real checkpoint."""
    raw = jina_config()
    folder = tmp_path_factory.mktemp("jina-ce")
    sd = write_jina_checkpoint(folder, raw)
    return folder, raw, sd


@pytest.fixture(scope="module")
def model(ckpt: tuple[Path, dict, dict]) -> JinaCrossEncoder:
    loaded = load_cross_encoder(ckpt[0])
    assert isinstance(loaded, JinaCrossEncoder)
    return loaded


def random_pairs(lengths: list[int], seed: int) -> list[tuple[list[int], list[int]]]:
    """Pairs shaped like [CLS] query [SEP] doc [SEP]: type 0 for the query part, 1 after."""
    rng = np.random.default_rng(seed)
    pairs = []
    for n in lengths:
        ids = [1, *rng.integers(3, VOCAB, n - 2).tolist(), 2]
        split = max(2, n // 3)
        pairs.append((ids, [0] * split + [1] * (n - split)))
    return pairs


def right_padded(
    pairs: list[tuple[list[int], list[int]]], width: int | None = None
) -> dict[str, torch.Tensor]:
    width = width or max(len(ids) for ids, _ in pairs)
    out = {
        k: torch.zeros(len(pairs), width, dtype=torch.long)
        for k in ("input_ids", "attention_mask", "token_type_ids")
    }
    for row, (ids, types) in enumerate(pairs):
        out["input_ids"][row, : len(ids)] = torch.tensor(ids)
        out["attention_mask"][row, : len(ids)] = 1
        out["token_type_ids"][row, : len(ids)] = torch.tensor(types)
    return out


def scores(model: torch.nn.Module, batch: dict[str, torch.Tensor], **kw: object) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch, **kw)


# ---------------------------------------------------------------- config and loading


def test_config_maps_jina_reranker_to_jina_family() -> None:
    cfg = ModelConfig.from_dict(jina_config())
    assert (cfg.family, cfg.head) == ("jina", "pooler")
    assert cfg.position_embedding_type == "alibi" and cfg.feed_forward_type == "geglu"
    assert cfg.max_length == 8192
    plain = ModelConfig.from_dict({**jina_config(), "position_embedding_type": "absolute"})
    assert plain.family == "bert"
    with pytest.raises(ModelLoadError, match="feed_forward_type"):
        ModelConfig.from_dict({**jina_config(), "feed_forward_type": "original"})


def test_loads_real_names_with_nothing_missing_or_unexpected(
    ckpt: tuple[Path, dict, dict], model: JinaCrossEncoder
) -> None:
    _, _, sd = ckpt
    ours = model.state_dict()
    assert set(ours) == set(sd)
    for name, tensor in sd.items():
        assert ours[name].shape == tensor.shape, name
        assert torch.equal(ours[name], tensor), name
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_refuses_checkpoint_with_unknown_tensors(tmp_path: Path) -> None:
    """E.g. the qk-post-norm variant (jina-embeddings-v2-base-code) is a different model."""
    raw = jina_config(layers=1)
    sd = jina_state_dict(raw)
    sd["bert.encoder.layer.0.attention.self.layer_norm_q.weight"] = torch.ones(24)
    tmp_path.mkdir(exist_ok=True)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="layer_norm_q"):
        load_cross_encoder(tmp_path)


# ---------------------------------------------------------------- ALiBi


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 5, 6, 8, 12, 16, 20, 24])
def test_slopes_match_independent_closed_form(heads: int) -> None:
    assert alibi_slopes(heads) == pytest.approx(ref_slopes(heads), rel=1e-12)


def test_slopes_for_twelve_heads_literal() -> None:
    """12 heads (jina-bert base): 2^-1..2^-8, then the odd half-steps of the 16 sequence."""
    exponents = [1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5]
    assert alibi_slopes(12) == pytest.approx([2.0**-e for e in exponents], rel=1e-12)


def test_bias_is_symmetric_and_follows_per_head_slopes(model: JinaCrossEncoder) -> None:
    n, heads = 11, model.config.num_heads
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, 7:] = 0
    bias = model.bert.attention_bias(mask, torch.float32)
    assert bias.shape == (2, heads, n, n)
    slopes = ref_slopes(heads)
    for h in range(heads):
        for i in range(n):
            for j in range(n):
                want = -slopes[h] * abs(i - j)
                assert bias[0, h, i, j].item() == pytest.approx(want, rel=1e-6, abs=1e-6)
                if j < 7:
                    assert bias[1, h, i, j].item() == pytest.approx(want, rel=1e-6, abs=1e-6)
                else:  # padding keys: pushed far below anything softmax can keep
                    assert bias[1, h, i, j].item() < -1e30
    assert torch.equal(bias[0], bias[0].transpose(-1, -2))
    assert torch.all(torch.diagonal(bias[0], dim1=-2, dim2=-1) == 0)


# ---------------------------------------------------------------- forward math


def test_scores_match_independent_reference(
    ckpt: tuple[Path, dict, dict], model: JinaCrossEncoder
) -> None:
    _, raw, sd = ckpt
    pairs = random_pairs([5, 12, 9, 16], seed=1)
    got = scores(model, right_padded(pairs))
    want = [ref_score(sd, raw, ids, types) for ids, types in pairs]
    assert got.shape == (4,)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-4)
    assert len({round(s, 3) for s in want}) == 4  # the pairs really score differently


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_depth_equals_reference_truncated_at_that_layer(
    ckpt: tuple[Path, dict, dict], model: JinaCrossEncoder, depth: int
) -> None:
    _, raw, sd = ckpt
    pairs = random_pairs([7, 13], seed=2)
    got = scores(model, right_padded(pairs), depth=depth)
    want = [ref_score(sd, raw, ids, types, depth=depth) for ids, types in pairs]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-4)
    full = [ref_score(sd, raw, ids, types) for ids, types in pairs]
    if depth < raw["num_hidden_layers"]:
        assert not np.allclose(want, full, atol=1e-3)


def test_scores_invariant_to_right_padding_and_batch_composition(
    model: JinaCrossEncoder,
) -> None:
    pairs = random_pairs([6, 15, 10, 4, 12], seed=3)
    alone = torch.stack([scores(model, right_padded([p]))[0] for p in pairs])
    together = scores(model, right_padded(pairs))
    wide = scores(model, right_padded(pairs, width=40))
    order = [3, 0, 4, 2, 1]
    shuffled = scores(model, right_padded([pairs[i] for i in order]))
    split = torch.cat(
        [scores(model, right_padded(pairs[:2])), scores(model, right_padded(pairs[2:]))]
    )
    for other in (together, wide, split):
        torch.testing.assert_close(other, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(shuffled, alone[order], rtol=0, atol=1e-5)


def test_bf16_runs_with_the_bias_in_the_activation_dtype(model: JinaCrossEncoder) -> None:
    """The torch backend's CPU bf16 path: SDPA needs the bias in the activations' dtype."""
    half = JinaCrossEncoder(model.config)
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16).eval()
    batch = right_padded(random_pairs([9, 14, 5], seed=7))
    assert half.bert.attention_bias(batch["attention_mask"], torch.bfloat16).dtype == (
        torch.bfloat16
    )
    got = scores(half, batch).float()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, scores(model, batch), rtol=0.05, atol=0.1)


def test_six_thousand_tokens_run_and_are_finite(tmp_path: Path) -> None:
    raw = jina_config(layers=2, hidden=16, heads=2, intermediate=24)
    write_jina_checkpoint(tmp_path, raw, seed=4)
    tiny = load_cross_encoder(tmp_path)
    (pair,) = random_pairs([6000], seed=5)
    start = time.perf_counter()
    out = scores(tiny, right_padded([pair]))
    elapsed = time.perf_counter() - start
    assert out.shape == (1,) and torch.isfinite(out).all()
    assert elapsed < 30, f"6,000 tokens took {elapsed:.1f}s"


# ---------------------------------------------------------------- ONNX


def test_onnx_export_matches_torch(model: JinaCrossEncoder, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "jina.onnx"
    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = right_padded(random_pairs([8, 5], seed=6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about constants and shapes
        torch.onnx.export(
            model,
            tuple(example[k] for k in names),
            str(path),
            input_names=names,
            output_names=["logits"],
            dynamic_axes={
                **{k: {0: "batch", 1: "sequence"} for k in names},
                "logits": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # Other shapes than the traced one: the ALiBi table must follow the sequence axis.
    for lengths in ([8, 5], [3, 21, 14], [30]):
        batch = right_padded(random_pairs(lengths, seed=sum(lengths)))
        (onnx_out,) = session.run(None, {k: batch[k].numpy() for k in names})
        torch_out = scores(model, batch).numpy()
        assert onnx_out.shape == torch_out.shape
        assert np.abs(onnx_out - torch_out).max() < 1e-4

"""JinaBERT cross-encoders (jina-reranker-v1-tiny-en / -turbo-en), implemented here.

JinaBERT is BERT with three changes, and this module implements exactly those on top
of the same post-LayerNorm block layout as our `bert.CrossEncoder`:

* no position embeddings: word + token-type embeddings, then LayerNorm;
* symmetric ALiBi: every head adds ``-slope_h * |i - j|`` to its attention logits, with
  the per-head slopes of Press et al. (the geometric sequence ``2**(-8 k / n)`` and the
  closest-power-of-two interleave when the head count is not a power of two);
* a gated-GELU feed-forward (``mlp``): one bias-free ``gated_layers`` projection to
  ``2 * intermediate_size``; GELU (exact, erf form) on the FIRST half multiplies the
  second half; then ``wo``, the residual, and a post-LayerNorm named ``layernorm``.

The classification head is BERT's: ``bert.pooler.dense`` + tanh on the first token,
then the ``classifier`` linear layer.

Reference read (not copied): Jina AI's ``modeling_bert.py`` of the Hugging Face repo
``jinaai/jina-bert-implementation`` (the remote code the reranker checkpoints name in
their ``auto_map``), as mirrored on GitHub in ``veya2ztn/sci-bert-finetune`` at
``models/jinabert/modeling_bert.py`` (classes ``JinaBertEmbeddings``,
``JinaBertSelfAttention``, ``JinaBertGLUMLP``, ``JinaBertEncoder.rebuild_alibi_tensor``,
``JinaBertPooler``, ``JinaBertForSequenceClassification``). The same facts were
cross-checked against independent ports: ``huggingface/candle``
(``candle-transformers/src/models/jina_bert.rs``) and ``huggingface/text-embeddings-
inference`` (``backends/candle/src/models/jina.rs``).

Why our own module: no remote code is ever run (rerankd loads safetensors only), the
reference builds an ``n_heads x 8192 x 8192`` ALiBi buffer at construction (3 GB for
12 heads), and we need `depth=` and a clean ONNX export. Parameter names are the
checkpoint's, so weights load one-to-one with no missing or unexpected tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rerankd.engine.models.bert import Pooler, SelfOutput
from rerankd.engine.models.config import ModelConfig

# feed_forward_type -> activation of the gated half. The reference uses `nn.GELU()`
# (exact erf GELU) for "geglu" regardless of `hidden_act`, and `nn.ReLU()` for "reglu".
GLU_TYPES = ("geglu", "reglu")


def alibi_slopes(num_heads: int) -> list[float]:
    """Per-head ALiBi slopes (positive numbers), head 0 first.

    For ``n`` a power of two the slopes are ``2**(-8 k / n)`` for ``k = 1..n``. Otherwise
    the first ``m = 2**floor(log2 n)`` heads take the slopes for ``m`` heads and the rest
    take every other slope of the ``2 m`` sequence (``2**(-8 (2j+1) / (2 m))``), which is
    what the reference's recursive `_get_alibi_head_slopes` produces.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be positive, got {num_heads}")

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]

    closest = 2 ** math.floor(math.log2(num_heads))
    if closest == num_heads:
        return geometric(num_heads)
    return geometric(closest) + geometric(2 * closest)[0::2][: num_heads - closest]


class JinaEmbeddings(nn.Module):
    """Word + token-type embeddings and LayerNorm; ALiBi replaces position embeddings."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class JinaSelfAttention(nn.Module):
    """Multi-head attention whose additive bias carries both ALiBi and the padding mask."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """Attention output; with `cls_only`, [CLS]'s alone (its row of `bias`)."""
        b, _, h = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        queries = x[:, :1] if cls_only else x
        if cls_only:
            bias = bias[:, :, :1]
        q, k, v = split(self.query(queries)), split(self.key(x)), split(self.value(x))
        # softmax(q k^T / sqrt(d) + bias) v, as the reference. SDPA rather than explicit
        # matmuls: on CPU its fused kernel never holds the (batch, heads, seq, seq) scores
        # and probabilities, which at 4,096 tokens was 10x faster and ~800 MB smaller.
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return ctx.transpose(1, 2).reshape(b, queries.shape[1], h)


class JinaAttention(nn.Module):
    """`attention.self` + `attention.output` (post-LN residual), as in BERT."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self = JinaSelfAttention(cfg)
        self.output = SelfOutput(cfg)  # the same post-LN residual as BERT's

    def forward(self, x: torch.Tensor, bias: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        residual = x[:, :1] if cls_only else x
        return self.output(self.self(x, bias, cls_only), residual)


class JinaGLUMLP(nn.Module):
    """Gated feed-forward with its own residual and post-LayerNorm (the layer's `mlp`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.relu = cfg.feed_forward_type == "reglu"
        self.gated_layers = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.wo = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gated_layers(x)
        gated, non_gated = h[..., : self.intermediate_size], h[..., self.intermediate_size :]
        act = F.relu(gated) if self.relu else F.gelu(gated)
        return self.layernorm(self.wo(act * non_gated) + x)


class JinaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention = JinaAttention(cfg)
        self.mlp = JinaGLUMLP(cfg)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """The layer's output; with `cls_only`, for [CLS] alone ([batch, 1, hidden])."""
        return self.mlp(self.attention(x, bias, cls_only))


class JinaEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(JinaLayer(cfg) for _ in range(cfg.num_layers))


class JinaBertBackbone(nn.Module):
    """Embeddings + encoder + pooler: the part named `bert.` in the checkpoints."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embeddings = JinaEmbeddings(cfg)
        self.encoder = JinaEncoder(cfg)
        self.pooler = Pooler(cfg)  # BERT's: dense + tanh on [CLS]
        # A plain tuple, not a buffer: nothing extra in the state dict, and casting the
        # module to fp16 does not round the slopes (the bias is built in fp32).
        self.slopes = tuple(alibi_slopes(cfg.num_heads))

    def attention_bias(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Symmetric ALiBi plus the padding mask, (batch, heads, seq, seq), for all layers.

        ``bias[b, h, i, j] = -slope_h * |i - j|``, plus a large negative number where key
        ``j`` is padding. Built once per forward for the batch's own length (never for
        max_position_embeddings) and shared by every layer; the sequence length comes from
        the input's shape, so an exported ONNX graph builds it per input too. Computed in
        fp32 then cast, as the reference casts its fp32 table to the activations' dtype.
        The padding term is half the dtype's minimum so that adding ALiBi cannot overflow
        to -inf in fp16; softmax turns it into exactly zero either way.
        """
        device = attention_mask.device
        slopes = torch.tensor(self.slopes, dtype=torch.float32, device=device)
        pos = torch.arange(attention_mask.shape[1], device=device, dtype=torch.float32)
        distance = (pos[None, :] - pos[:, None]).abs()
        pad = (1.0 - attention_mask[:, None, None, :].float()) * (torch.finfo(dtype).min / 2)
        # One kernel writes the whole table: no per-head (heads, seq, seq) temporary.
        bias = torch.addcmul(pad, -slopes[None, :, None, None], distance[None, None])
        return bias.to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        depth: int | None = None,
        cls_only: bool = False,
    ) -> torch.Tensor:
        """Hidden states after `depth` layers; with `cls_only` the last layer computes
        [CLS] alone (see `bert.CrossEncoder.forward`) and the result is [batch, 1, hidden]."""
        x = self.embeddings(input_ids, token_type_ids)
        bias = self.attention_bias(attention_mask, x.dtype)
        layers = self.encoder.layer[: depth or len(self.encoder.layer)]
        for i, layer in enumerate(layers):
            x = layer(x, bias, cls_only and i == len(layers) - 1)
        return x


class JinaCrossEncoder(nn.Module):
    """A JinaBERT sequence-classification cross-encoder; `forward` returns one logit per pair.

    Same call signature and output as `bert.CrossEncoder`, so backends and the scheduler
    use it unchanged; `depth=k` runs the first k layers then the pooler and classifier.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.feed_forward_type not in GLU_TYPES:
            raise ValueError(f"JinaBERT feed_forward_type must be one of {GLU_TYPES}")
        self.config = cfg
        self.bert = JinaBertBackbone(cfg)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)

    @property
    def backbone(self) -> JinaBertBackbone:
        return self.bert

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        depth: int | None = None,
    ) -> torch.Tensor:
        """One logit per pair; the head reads [CLS] alone, so the last layer runs it alone."""
        hidden = self.bert(input_ids, attention_mask, token_type_ids, depth, cls_only=True)
        return self.classifier(self.bert.pooler(hidden))[:, 0]

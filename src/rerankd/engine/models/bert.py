"""BERT-family cross-encoders (BERT, MiniLM, TinyBERT, XLM-RoBERTa), implemented here.

Our own module rather than `transformers`' so that the serving path has no dependency on
it, exports cleanly to ONNX, and can later run at a chosen depth. Parameter names follow
the Hugging Face checkpoints (`bert.encoder.layer.N...`) so weights load one-to-one.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from rerankd.engine.models.config import ModelConfig


def _activation(name: str):
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    return F.relu


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.roberta_positions = cfg.family == "roberta"
        self.pad_token_id = cfg.pad_token_id

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        if self.roberta_positions:
            # RoBERTa numbers real tokens from pad_token_id + 1; padding keeps pad_token_id.
            mask = attention_mask.to(torch.long)
            positions = torch.cumsum(mask, dim=1) * mask + self.pad_token_id
        else:
            seq = input_ids.shape[1]
            positions = torch.arange(seq, device=input_ids.device).unsqueeze(0)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.attend(x, bias)[0]

    def attend(
        self, x: torch.Tensor, bias: torch.Tensor, want_cls: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention output and, with `want_cls`, the attention [CLS] pays to each token
        (mean over heads): the importance token pruning ranks by."""
        b, s, h = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + bias
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, h)
        return out, (probs[:, :, 0, :].mean(dim=1) if want_cls else None)


class SelfOutput(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = SelfOutput(cfg)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, bias), x)

    def attend(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, cls = self.self.attend(x, bias, want_cls=True)
        assert cls is not None
        return self.output(out, x), cls


class Intermediate(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class Output(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = Output(cfg)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        a = self.attention(x, bias)
        return self.output(self.intermediate(a), a)

    def forward_with_cls(
        self, x: torch.Tensor, bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a, cls = self.attention.attend(x, bias)
        return self.output(self.intermediate(a), a), cls


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))


class Pooler(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class BertBackbone(nn.Module):
    """Embeddings + encoder (+ pooler for BERT heads): the part named `bert.` or `roberta.`."""

    def __init__(self, cfg: ModelConfig, with_pooler: bool) -> None:
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.pooler = Pooler(cfg) if with_pooler else None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        depth: int | None = None,
    ) -> torch.Tensor:
        x = self.embeddings(input_ids, attention_mask, token_type_ids)
        bias = _mask_bias(attention_mask, x.dtype)
        for layer in self.encoder.layer[: depth or len(self.encoder.layer)]:
            x = layer(x, bias)
        return x

    def forward_pruned(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        keep: tuple[float, ...],
        protected: torch.Tensor,
    ) -> torch.Tensor:
        """Run `len(keep)` layers; layer i sees only the `keep[i]` share of each pair's
        tokens, chosen by the attention [CLS] paid to them in layer i-1.

        `protected` (bool, batch x seq) marks tokens never pruned: [CLS], [SEP] and the
        query. `keep[0]` must be 1.0: before layer 1 there is no attention to rank by.
        Returns the hidden states of the kept tokens ([CLS] stays at position 0).
        """
        x = self.embeddings(input_ids, attention_mask, token_type_ids)
        mask = attention_mask.bool()
        valid = mask.sum(dim=1)
        cls: torch.Tensor | None = None
        for i, ratio in enumerate(keep):
            if ratio < 1.0 and cls is not None:
                x, mask, protected = _prune(x, mask, protected, cls, valid, ratio)
            x, cls = self.encoder.layer[i].forward_with_cls(x, _mask_bias(mask, x.dtype))
        return x


def _mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask, broadcast over heads and query positions: 0 keep, -large drop."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _prune(
    x: torch.Tensor,
    mask: torch.Tensor,
    protected: torch.Tensor,
    importance: torch.Tensor,
    valid: torch.Tensor,
    ratio: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep, per row, ceil(ratio x its original token count) tokens (never fewer than its
    protected ones): protected first ([CLS] at 0), then by importance; order is restored."""
    keep_n = torch.maximum(torch.ceil(valid.float() * ratio).long(), protected.sum(dim=1))
    keep_n = torch.minimum(keep_n, mask.sum(dim=1))
    score = importance.float().masked_fill(~mask, float("-inf"))
    score = torch.where(protected & mask, torch.full_like(score, 1e9), score)
    score[:, 0] = 2e9  # [CLS] first, so the head reads it at position 0
    width = int(keep_n.max())
    order = score.topk(width, dim=1).indices
    kept = torch.arange(width, device=x.device)[None, :] < keep_n[:, None]
    # restore the original token order among the kept (padding sorts last)
    positions = torch.where(kept, order, torch.full_like(order, x.shape[1]))
    positions, _ = positions.sort(dim=1)
    new_mask = positions < x.shape[1]
    index = positions.clamp(max=x.shape[1] - 1)
    x = x.gather(1, index[:, :, None].expand(-1, -1, x.shape[2]))
    return x, new_mask, protected.gather(1, index) & new_mask


class RobertaHead(nn.Module):
    """RoBERTa's classification head: dense + tanh on the first token, then out_proj."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(hidden[:, 0])))


DEPTH_HEAD_NAME = re.compile(r"^classifier_depth(\d+)\.(weight|bias)$")


class CrossEncoder(nn.Module):
    """A sequence-classification cross-encoder; `forward` returns one logit per pair.

    For multi-label heads the first label is the relevance score, as in the
    sentence-transformers convention for rerankers with num_labels == 1.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        if cfg.head == "pooler":
            self.bert = BertBackbone(cfg, with_pooler=True)
            self.classifier: nn.Module = nn.Linear(cfg.hidden_size, cfg.num_labels)
        else:
            self.roberta = BertBackbone(cfg, with_pooler=False)
            self.classifier = RobertaHead(cfg)

    def add_depth_heads(self, depths: list[int]) -> None:
        """Per-depth heads (Matryoshka checkpoints): `classifier_depth{k}` scores the pooled
        [CLS] of layer k, for k below the full depth (which keeps `classifier`)."""
        if self.config.head != "pooler":
            raise ValueError("per-depth heads are defined for BERT (pooler) heads only")
        for k in depths:
            if not 0 < k < self.config.num_layers:
                raise ValueError(
                    f"per-depth head for depth {k} outside 1..{self.config.num_layers - 1}"
                )
            self.add_module(
                f"classifier_depth{k}", nn.Linear(self.config.hidden_size, self.config.num_labels)
            )
        self.head_depths = tuple(sorted(depths))

    head_depths: tuple[int, ...] = ()

    @property
    def backbone(self) -> BertBackbone:
        return self.bert if self.config.head == "pooler" else self.roberta

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        depth: int | None = None,
    ) -> torch.Tensor:
        hidden = self.backbone(input_ids, attention_mask, token_type_ids, depth)
        return self.head(hidden, depth)

    def forward_pruned(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        keep: tuple[float, ...],
        protected: torch.Tensor,
    ) -> torch.Tensor:
        """Logits with per-layer token pruning (see `BertBackbone.forward_pruned`)."""
        hidden = self.backbone.forward_pruned(
            input_ids, attention_mask, token_type_ids, keep, protected
        )
        return self.head(hidden, len(keep))

    def head(self, hidden: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """The classification head on the first ([CLS]) token of the last layer run: the
        checkpoint's head for that depth where it has one, else the model's own."""
        if self.config.head == "pooler":
            classifier = self.classifier
            if depth in self.head_depths:
                classifier = getattr(self, f"classifier_depth{depth}")
            logits = classifier(self.backbone.pooler(hidden))
        else:
            logits = self.classifier(hidden)
        return logits[:, 0]

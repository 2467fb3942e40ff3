"""BERT-family cross-encoders (BERT, MiniLM, TinyBERT, XLM-RoBERTa), implemented here.

Our own module rather than `transformers`' so that the serving path has no dependency on
it, exports cleanly to ONNX, and can later run at a chosen depth. Parameter names follow
the Hugging Face checkpoints (`bert.encoder.layer.N...`) so weights load one-to-one.

LoRA compensation (Matryoshka checkpoints)
------------------------------------------
A model run at depth k < L, or with tokens pruned, is a sub-network the full model's weights
were not trained for. A Matryoshka checkpoint may carry low-rank updates that compensate
(the Matryoshka Re-Ranker's "vertical" and "horizontal" LoRA), stored beside the base
weights in the same safetensors under rerankd names:

    lora_depth{k}.layer{i}.{T}.A   [r, in_features]    vertical: depth k (1 <= k < L), i < k
    lora_depth{k}.layer{i}.{T}.B   [out_features, r]
    lora_keep.layer{i}.{T}.A       [r, in_features]    horizontal: token pruning, i < L
    lora_keep.layer{i}.{T}.B       [out_features, r]

`T` is the path of a linear inside encoder layer i (one of `LORA_TARGETS`, e.g.
`attention.self.query`, `intermediate.dense`). The linear then computes
`x (W + (alpha / r) B A)^T + b`; `r` and `alpha` are in `rerankd.json` under
`matryoshka.lora` (see `rerankd.train.modeling`), one scale alpha / r for every update; an
adapter may have a rank of its own (`matryoshka.lora.ranks`, e.g. `{"depth2": 64}`), its A
and B then that many rows and columns. Which updates a forward applies:

- `forward(depth=k)`, k < L: the depth-k vertical updates, if the checkpoint has them.
  The full depth never uses any LoRA, so a compensated checkpoint scores exactly as its
  base model at full depth.
- `forward_pruned(keep)` with some ratio < 1: the horizontal updates, plus the vertical
  updates of depth `len(keep)` when that depth is below L and compensated: the two are
  summed, as the paper combines them for configurations compressed both ways. (The trainer
  trains horizontal LoRA at full depth only; the sum at a shallower depth is untrained.)

The updates are applied unmerged (`linear(x) + scale * (x A^T) B^T`) so one set of base
weights serves every depth; `CrossEncoder.merged` folds one depth's updates into a copy
for export, where each graph has its depth fixed.

Per-depth deltas
----------------
LoRA reaches only the linears' weights. A depth may also carry full deltas to any other
tensor of its encoder (biases, LayerNorms, position and token-type embeddings, a linear
LoRA does not target), added to that tensor at that depth alone:

    delta_depth{k}.{name}          shape of {name}                  1 <= k < L

where `{name}` is a backbone tensor of the sub-network depth k runs: `bert.embeddings.*`
or `bert.encoder.layer.{i}.*` with i < k (not the pooler, which the heads share). Why: a
depth grafted from a separately trained student (`rerankd graft-depth`) moved those
tensors too, and LoRA alone left a fifth of the student's dev gain behind (session 18).
They are folded with the depth's LoRA (`fold_compensation`); unmerged (training), the
depth's forward runs the backbone with them added (`torch.func.functional_call`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

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


#: Pooling of a head that reads the mean of the token states: `rerankd.json`'s
#: `matryoshka.pooling` for the per-depth heads, `head_pooling` for the model's own head.
#: Why: in the first layers of MiniLM-L6 the [CLS] state barely depends on the document
#: (three unrelated documents gave depth-2 logits within 0.001 of each other), so a depth
#: head on the pooled [CLS] cannot learn; a linear probe on frozen depth-2 states ranked
#: SciFact train positives among 7 BM25 negatives at MRR 0.51 from the token mean and 0.34
#: (random) from [CLS].
MEAN_POOLING = "mean"
#: A token-mean head over the query segment alone ([CLS] query [SEP], token type 0): its
#: last layer computes those positions only (keys and values still come from every
#: token), about a quarter of a layer's work at TREC DL lengths instead of a whole one.
#: Why: a 2-layer model's last layer is half its encoder work, and the query's states,
#: which attend over the whole document in that layer, carry the match: swapped in
#: untrained on `rerankd-tiny-l2` when its head read every token, the trainer's dev
#: NDCG@10 went from 0.717 to 0.711 (a [CLS] head trained for two epochs reached 0.561).
QUERY_POOLING = "query"
#: How a head may read its last layer: the pooled [CLS] (HF's default), or a token mean.
POOLINGS = ("cls", MEAN_POOLING, QUERY_POOLING)
#: How many leading positions the last layer computes (None: every position). An int, or
#: a 0-d tensor where it depends on the batch (the longest query segment), so that an
#: exported graph keeps it dynamic.
Rows = int | torch.Tensor | None

#: Linears inside an encoder layer that LoRA may target: their module paths in `Layer`,
#: which are also the `{T}` of the tensor names (see the module docstring).
LORA_TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
#: What `rerankd distill --matryoshka --lora-rank R` compensates unless told otherwise:
#: the query and value projections (as the LoRA paper), the attention output and the FFN,
#: where a truncated or pruned stack's activations drift most from the full model's.
DEFAULT_LORA_TARGETS = (
    "attention.self.query",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
#: `lora_{kind}.layer{i}.{T}.{A|B}` with kind `depth{k}` (vertical) or `keep` (horizontal).
LORA_NAME = re.compile(r"^lora_(depth\d+|keep)\.layer(\d+)\.(.+)\.(A|B)$")
#: `delta_depth{k}.{name}`: depth k's delta to backbone tensor `name` (module docstring).
DELTA_NAME = re.compile(r"^delta_depth(\d+)\.(.+)$")
#: how rerankd.json's `matryoshka.deltas` describes the delta tensors to a reader
DELTA_FORMAT = "delta_depth{k}.{name} [shape of {name}]: added to {name} at depth k alone"
#: The horizontal adapter's kind; vertical ones are `depth{k}`.
KEEP = "keep"
_DEPTH_KIND = re.compile(r"^depth(\d+)$")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """A model's LoRA compensation as `rerankd.json` describes it (`matryoshka.lora`).

    Every update has the one scale alpha / rank; an adapter may have a rank of its own
    (`ranks`, by kind: `rerankd graft-depth` writes a depth at a higher rank than the
    model was trained at without padding the other adapters with zeros).
    """

    rank: int
    alpha: float
    targets: tuple[str, ...] = ()
    vertical: tuple[int, ...] = ()
    horizontal: bool = False
    ranks: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def rank_of(self, kind: str) -> int:
        """The rank of adapter `kind` (`depth{k}` or `keep`)."""
        return self.ranks.get(kind, self.rank)

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {
            "rank": self.rank,
            "alpha": self.alpha,
            "targets": list(self.targets),
            "vertical": list(self.vertical),
            "horizontal": self.horizontal,
        }
        if self.ranks:
            out["ranks"] = dict(sorted(self.ranks.items(), key=lambda kv: _kind_order(kv[0])))
        return out


class LoraPair(nn.Module):
    """The low-rank update of one linear: adds `scale * x A^T B^T` to its output."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.zeros(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B) * self.scale


class LayerLora(nn.Module):
    """One encoder layer's LoRA pairs, by target path.

    Each pair is registered under its linear's own path (`attention.self.query` becomes
    modules `attention` > `self` > `query`), so state-dict names read
    `lora_{kind}.layer{i}.attention.self.query.A` as the checkpoint format says.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pairs: dict[str, LoraPair] = {}

    def add(self, path: str, pair: LoraPair) -> None:
        parent, leaf = _parent_at(self, path)
        parent.add_module(leaf, pair)
        self.pairs[path] = pair


def _parent_at(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module that holds dotted `path` under `root` (plain modules made where missing),
    and the path's last name: so a state-dict name under `root` reads as `path`."""
    parent = root
    *dirs, leaf = path.split(".")
    for name in dirs:
        if name not in parent._modules:
            parent.add_module(name, nn.Module())
        parent = parent._modules[name]  # type: ignore[assignment]
    return parent, leaf


def runs_at_depth(name: str, prefix: str, depth: int) -> bool:
    """Whether depth `depth` runs backbone tensor `name` (`{prefix}.embeddings.*`, or
    `{prefix}.encoder.layer.{i}.*` with i < depth): what a depth's deltas may cover."""
    m = re.match(rf"^{prefix}\.encoder\.layer\.(\d+)\.", name)
    return name.startswith(f"{prefix}.embeddings.") or (m is not None and int(m.group(1)) < depth)


Loras = Sequence[LayerLora]


class LoraAdapter(nn.Module):
    """One configuration's compensation (a depth, or token pruning): `layer{i}` children."""

    def __init__(self) -> None:
        super().__init__()
        self.layers: dict[int, LayerLora] = {}

    def layer(self, i: int) -> LayerLora:
        if i not in self.layers:
            self.layers[i] = LayerLora()
            self.add_module(f"layer{i}", self.layers[i])
        return self.layers[i]


def _linear(linear: nn.Linear, x: torch.Tensor, lora: Loras, path: str) -> torch.Tensor:
    """`linear(x)` plus every LoRA update `lora` holds for the linear at `path`."""
    out = linear(x)
    for layer_lora in lora:
        pair = layer_lora.pairs.get(path)
        if pair is not None:
            out = out + pair(x)
    return out


def _layer_loras(adapters: Sequence[LoraAdapter], i: int) -> tuple[LayerLora, ...]:
    return tuple(a.layers[i] for a in adapters if i in a.layers)


def lora_layout(names: Iterable[str]) -> dict[str, dict[int, list[str]]]:
    """`{kind: {layer: [targets]}}` of the LoRA tensor names among `names` (others are
    ignored); ValueError for a `lora_` name that is not in the format.

    In canonical order (depths ascending, then `keep`; layers ascending; targets as in
    `LORA_TARGETS`), the order `CrossEncoder.add_lora` registers parameters in, so a
    model loaded from a checkpoint lists its parameters as the model that was saved.
    """
    found: dict[str, dict[int, set[str]]] = {}
    for name in names:
        if not name.startswith("lora_"):
            continue
        m = LORA_NAME.match(name)
        if m is None:
            raise ValueError(
                f"LoRA tensor {name!r} is not lora_depth{{k}}|lora_keep.layer{{i}}.{{target}}.A|B"
            )
        found.setdefault(m.group(1), {}).setdefault(int(m.group(2)), set()).add(m.group(3))
    rank = {t: n for n, t in enumerate(LORA_TARGETS)}
    return {
        kind: {
            i: sorted(found[kind][i], key=lambda t: (rank.get(t, len(rank)), t))
            for i in sorted(found[kind])
        }
        for kind in sorted(found, key=_kind_order)
    }


def _kind_order(kind: str) -> tuple[bool, int, str]:
    m = _DEPTH_KIND.match(kind)
    return (m is None, int(m.group(1)) if m else 0, kind)


def fold_compensation(
    weights: Mapping[str, torch.Tensor],
    kind: str | Sequence[str] | None,
    scale: float,
    prefix: str,
) -> dict[str, torch.Tensor]:
    """`weights` without LoRA or delta tensors, the compensation of adapter `kind` (or of
    each of several kinds) folded in: its LoRA updates into the linears (W + scale B A)
    and, for a depth, its deltas into their tensors; summed in fp32 and cast back to the
    base tensor's dtype. `prefix` is the backbone's (`bert` or `roberta`); kind None drops
    all."""
    out = {k: v for k, v in weights.items() if not k.startswith(("lora_", "delta_"))}
    kinds = [kind] if isinstance(kind, str) else list(kind or ())
    layout = lora_layout(weights) if kinds else {}

    def add(name: str, update: torch.Tensor) -> None:
        w = out[name]
        out[name] = (w.float() + update).to(w.dtype).contiguous()

    for k in kinds:
        for i, targets in layout.get(k, {}).items():
            for t in targets:
                a, b = (weights[f"lora_{k}.layer{i}.{t}.{x}"].float() for x in "AB")
                add(f"{prefix}.encoder.layer.{i}.{t}.weight", (b @ a) * scale)
        for name, delta in weights.items():
            if name.startswith(f"delta_{k}."):
                add(name.removeprefix(f"delta_{k}."), delta.float())
    return out


class DepthDelta(nn.Module):
    """One depth's deltas (module docstring), each registered under its tensor's own path,
    so state-dict names read `delta_depth{k}.bert.encoder.layer.0.output.LayerNorm.bias`."""

    def add(self, name: str, like: torch.Tensor) -> None:
        parent, leaf = _parent_at(self, name)
        parent.register_parameter(leaf, nn.Parameter(torch.zeros_like(like)))


_M = TypeVar("_M", bound=nn.Module)


class _BackboneMethod(nn.Module):
    """`backbone.{method}` as a module's forward, for `torch.func.functional_call`, which
    calls forward alone."""

    def __init__(self, backbone: nn.Module, method: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.method = method

    def forward(self, *args: object) -> object:
        return getattr(self.backbone, self.method)(*args)


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

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor, lora: Loras = (), rows: Rows = None
    ) -> torch.Tensor:
        return self.attend(x, bias, lora=lora, rows=rows)[0]

    def attend(
        self,
        x: torch.Tensor,
        bias: torch.Tensor,
        want_cls: bool = False,
        lora: Loras = (),
        rows: Rows = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention output and, with `want_cls`, the attention [CLS] pays to each token
        (mean over heads): the importance token pruning ranks by.

        With `rows` only the first `rows` positions query ([CLS] alone for 1): the output
        is [batch, rows, hidden], keys and values still come from every token.
        """
        b, _, h = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        queries = x if rows is None else x[:, :rows]
        q = split(_linear(self.query, queries, lora, "attention.self.query"))
        k = split(_linear(self.key, x, lora, "attention.self.key"))
        v = split(_linear(self.value, x, lora, "attention.self.value"))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + bias
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, queries.shape[1], h)
        return out, (probs[:, :, 0, :].mean(dim=1) if want_cls else None)


class SelfOutput(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, lora: Loras = ()) -> torch.Tensor:
        return self.LayerNorm(_linear(self.dense, x, lora, "attention.output.dense") + residual)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = SelfOutput(cfg)

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor, lora: Loras = (), rows: Rows = None
    ) -> torch.Tensor:
        residual = x if rows is None else x[:, :rows]
        return self.output(self.self(x, bias, lora, rows), residual, lora)

    def attend(
        self, x: torch.Tensor, bias: torch.Tensor, lora: Loras = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, cls = self.self.attend(x, bias, want_cls=True, lora=lora)
        assert cls is not None
        return self.output(out, x, lora), cls


class Intermediate(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor, lora: Loras = ()) -> torch.Tensor:
        return self.act(_linear(self.dense, x, lora, "intermediate.dense"))


class Output(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, lora: Loras = ()) -> torch.Tensor:
        return self.LayerNorm(_linear(self.dense, x, lora, "output.dense") + residual)


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = Output(cfg)

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor, lora: Loras = (), rows: Rows = None
    ) -> torch.Tensor:
        """The layer's output; with `rows`, for the first `rows` positions alone
        ([batch, rows, hidden])."""
        a = self.attention(x, bias, lora, rows)
        return self.output(self.intermediate(a, lora), a, lora)

    def forward_with_cls(
        self, x: torch.Tensor, bias: torch.Tensor, lora: Loras = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a, cls = self.attention.attend(x, bias, lora)
        return self.output(self.intermediate(a, lora), a, lora), cls


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
        adapters: Sequence[LoraAdapter] = (),
        rows: Rows = None,
    ) -> torch.Tensor:
        """Hidden states after the first `depth` layers, with `adapters`' LoRA updates.

        With `rows` the last layer computes the first `rows` positions alone (see
        `CrossEncoder.forward`): the result is [batch, rows, hidden].
        """
        x = self.embeddings(input_ids, attention_mask, token_type_ids)
        bias = mask_bias(attention_mask, x.dtype)
        layers = self.encoder.layer[: depth or len(self.encoder.layer)]
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1
            x = layer(x, bias, _layer_loras(adapters, i), rows if last else None)
        return x

    def forward_pruned(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        keep: tuple[float, ...],
        protected: torch.Tensor,
        adapters: Sequence[LoraAdapter] = (),
        rows: Rows = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run `len(keep)` layers; layer i sees only the `keep[i]` share of each pair's
        tokens, chosen by the attention [CLS] paid to them in layer i-1.

        `protected` (bool, batch x seq) marks tokens never pruned: [CLS], [SEP] and the
        query. `keep[0]` must be 1.0: before layer 1 there is no attention to rank by.
        Returns the hidden states of the kept tokens ([CLS] stays at position 0) and their
        mask. `adapters`' LoRA updates apply to every layer they cover. With `rows` the last
        layer computes the first `rows` positions alone (see `CrossEncoder.forward`; the
        protected [CLS] and query stay first): the states returned are [batch, rows,
        hidden], the mask still the kept tokens'.
        """
        x = self.embeddings(input_ids, attention_mask, token_type_ids)
        mask = attention_mask.bool()
        valid = mask.sum(dim=1)
        cls: torch.Tensor | None = None
        for i, ratio in enumerate(keep):
            if ratio < 1.0 and cls is not None:
                x, mask, protected = _prune(x, mask, protected, cls, valid, ratio)
            layer = self.encoder.layer[i]
            bias, lora = mask_bias(mask, x.dtype), _layer_loras(adapters, i)
            if rows is not None and i == len(keep) - 1:
                return layer(x, bias, lora, rows=rows), mask  # nothing left to prune
            x, cls = layer.forward_with_cls(x, bias, lora)
        return x, mask


def mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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


def backbone_prefix(cfg: ModelConfig) -> str:
    """The backbone's name in checkpoints: `bert` (pooler heads) or `roberta`."""
    return "bert" if cfg.head == "pooler" else "roberta"


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
        #: the installed LoRA compensation (None: none), kept in step by `add_lora`
        self.lora_spec: LoraSpec | None = None
        #: depth -> how its head reads the last layer, for the heads that read a token mean
        #: (`MEAN_POOLING`, `QUERY_POOLING`) instead of the pooled [CLS]; the full depth L is
        #: among them for an extracted sub-model or a student
        self.poolings: dict[int, str] = {}

    def pooling(self, depth: int | None) -> str:
        """How the head of `depth` (None: the full depth) reads its last layer: `POOLINGS`."""
        return self.poolings.get(depth or self.config.num_layers, "cls")

    def set_pooling(self, depths: Iterable[int], pooling: str) -> None:
        """Make the heads of `depths` read their last layer as `pooling` (`POOLINGS`)."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if pooling != "cls" and self.config.head != "pooler":
            raise ValueError("token-mean heads need a BERT (pooler) model")
        for k in depths:
            if pooling == "cls":
                self.poolings.pop(k, None)
            else:
                self.poolings[k] = pooling

    def _readout(
        self, depth: int, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> tuple[Rows, torch.Tensor]:
        """(how many leading positions depth's last layer computes, the mask its head
        averages over those positions). [CLS]: 1. Token mean: all, the attention mask. Query
        segment: up to the batch's longest, each row's own. The query segment comes first
        and token pruning protects it, so it stays a prefix of every row."""
        pooling = self.pooling(depth)
        if pooling == QUERY_POOLING:
            segment = attention_mask.bool() & (token_type_ids == 0)
            rows = segment.sum(dim=1).max()
            return rows, segment[:, :rows]
        return (None if pooling == MEAN_POOLING else 1), attention_mask

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

    def add_lora(
        self, kind: str, layers: Iterable[int], targets: Sequence[str], rank: int, alpha: float
    ) -> LoraAdapter:
        """Install LoRA pairs of adapter `kind` (`depth{k}` or `keep`) on `layers` x
        `targets`, all zeros: B = 0 changes no score until trained or loaded.

        ValueError for anything outside the format (see the module docstring): a depth
        outside 1..L-1, a layer the configuration does not run, an unknown target, an
        alpha / rank other than the model's (one scale for every update), or a rank other
        than the one `kind` already has. A rank other than the model's is recorded as the
        adapter's own (`LoraSpec.ranks`).
        """
        num_layers = self.config.num_layers
        m = _DEPTH_KIND.match(kind)
        if m is not None:
            limit = int(m.group(1))
            if not 0 < limit < num_layers:
                raise ValueError(
                    f"LoRA for depth {limit} outside 1..{num_layers - 1} "
                    "(the full depth takes no compensation)"
                )
        elif kind == KEEP:
            limit = num_layers
        else:
            raise ValueError(f"LoRA adapter {kind!r} is neither depth{{k}} nor {KEEP!r}")
        if rank < 1 or not alpha > 0:
            raise ValueError(f"LoRA needs rank >= 1 and alpha > 0, got {rank} and {alpha}")
        spec = self.lora_spec or LoraSpec(rank, float(alpha))
        if not math.isclose(alpha / rank, spec.scale, rel_tol=1e-9):
            raise ValueError(
                f"LoRA rank/alpha {rank}/{alpha} scale updates by {alpha / rank:g}, the model's "
                f"{spec.rank}/{spec.alpha} by {spec.scale:g}: one scale for every update"
            )
        if f"lora_{kind}" in self._modules and spec.rank_of(kind) != rank:
            raise ValueError(f"lora_{kind} has rank {spec.rank_of(kind)}, got {rank}")
        ranks = {k: r for k, r in spec.ranks.items() if k != kind}
        ranks |= {kind: rank} if rank != spec.rank else {}
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"unknown LoRA targets {unknown}; choose from {list(LORA_TARGETS)}")
        adapter = self._child(f"lora_{kind}", LoraAdapter)
        for i in layers:
            if not 0 <= i < limit:
                raise ValueError(f"lora_{kind} covers layers 0..{limit - 1}, got layer {i}")
            for t in (t for t in LORA_TARGETS if t in targets):  # canonical order
                linear = self.backbone.encoder.layer[i].get_submodule(t)
                assert isinstance(linear, nn.Linear)
                pair = LoraPair(linear.in_features, linear.out_features, rank, spec.scale)
                adapter.layer(i).add(t, pair.to(linear.weight))
        used = set(spec.targets) | set(targets)
        self.lora_spec = dataclasses.replace(
            spec,
            targets=tuple(t for t in LORA_TARGETS if t in used),
            vertical=tuple(sorted(set(spec.vertical) | ({limit} if m else set()))),
            horizontal=spec.horizontal or kind == KEEP,
            ranks=ranks,
        )
        return adapter

    def _child(self, name: str, kind: type[_M]) -> _M:
        """The child module `name`, a new `kind()` on first use."""
        if name not in self._modules:
            self.add_module(name, kind())
        child = self._modules[name]
        assert isinstance(child, kind)
        return child

    def add_depth_delta(self, depth: int, names: Iterable[str]) -> DepthDelta:
        """Install (zeroed) deltas of depth `depth` to the backbone tensors `names` (see the
        module docstring). ValueError for a depth outside 1..L-1 or a tensor that depth
        does not run."""
        num_layers = self.config.num_layers
        if not 0 < depth < num_layers:
            raise ValueError(
                f"deltas for depth {depth} outside 1..{num_layers - 1} "
                "(the full depth takes no compensation)"
            )
        prefix = backbone_prefix(self.config)
        params = dict(self.backbone.named_parameters())
        names = list(names)
        for name in names:
            inner = name.removeprefix(f"{prefix}.")
            if inner not in params or not runs_at_depth(name, prefix, depth):
                raise ValueError(
                    f"delta_depth{depth}.{name}: depth {depth} runs no such tensor (deltas "
                    f"cover {prefix}.embeddings.* and {prefix}.encoder.layer.{{i}}.* with "
                    f"i < {depth})"
                )
        module = self._child(f"delta_depth{depth}", DepthDelta)
        for name in names:
            module.add(name, params[name.removeprefix(f"{prefix}.")])
        return module

    def lora_adapters(
        self, depth: int | None = None, pruned: bool = False
    ) -> tuple[LoraAdapter, ...]:
        """The LoRA a configuration runs with: depth k's vertical adapter (k < L), and the
        horizontal one if tokens are pruned (see the module docstring)."""
        names = [f"lora_{k}" for k in self.compensation(depth, pruned)]
        return tuple(self._modules[n] for n in names if n in self._modules)  # type: ignore[misc]

    @property
    def delta_depths(self) -> tuple[int, ...]:
        """The depths that have per-depth deltas."""
        found = (re.fullmatch(r"delta_depth(\d+)", n) for n in self._modules)
        return tuple(sorted(int(m.group(1)) for m in found if m))

    def depth_delta(self, depth: int | None) -> DepthDelta | None:
        """Depth `depth`'s deltas, if the checkpoint has them (never the full depth's)."""
        if not depth or depth >= self.config.num_layers:
            return None
        return self._modules.get(f"delta_depth{depth}")  # type: ignore[return-value]

    def compensation(self, depth: int | None, pruned: bool = False) -> list[str]:
        """The kinds (`depth{k}`, `keep`) of the LoRA or deltas a configuration runs with;
        empty where it runs on the base weights alone."""
        kinds = [f"depth{depth}"] if depth and depth < self.config.num_layers else []
        if pruned:
            kinds.append(KEEP)
        return [k for k in kinds if f"lora_{k}" in self._modules or f"delta_{k}" in self._modules]

    def merged(self, depth: int | None, pruned: bool = False) -> CrossEncoder:
        """A copy without LoRA or delta modules, the compensation of the configuration
        (`depth`, and token pruning if `pruned`) folded into its weights.

        It scores that configuration exactly as this model does (up to rounding), with one
        matmul per linear and no LoRA parameters: what the ONNX export traces, since a graph
        has its depth fixed anyway, and what the torch backend serves a compensated
        configuration with (rank-16 updates run unmerged cost more than they save).

        The copy shares every tensor the fold leaves as it was (the embeddings, the layers
        and linears no update touches) with this model, so it costs only what it changes:
        for rerankd-minilm-l6 in fp32, 15 MB of tensors of its own for depth 2 and 39 MB for
        the pruned full depth, where every copy held 91 MB before (session 19). Neither
        model's weights may be changed in place afterwards; nothing in rerankd does.
        """
        kinds = self.compensation(depth, pruned)
        scale = self.lora_spec.scale if self.lora_spec else 1.0
        current = self.state_dict(keep_vars=True)
        state = fold_compensation(current, kinds, scale, backbone_prefix(self.config))
        # deepcopy takes a tensor's entry in its memo as that tensor's copy: the folded ones
        # replace their originals, the rest are the originals themselves
        memo: dict[int, object] = {id(t): t for t in current.values()}
        for name, value in state.items():
            if value is not current[name]:  # folded (only parameters are)
                memo[id(current[name])] = nn.Parameter(value, current[name].requires_grad)
        out = copy.deepcopy(self, memo)
        for name in [n for n in out._modules if n.startswith(("lora_", "delta_"))]:
            del out._modules[name]
        out.lora_spec = None
        return out

    def _run_backbone(self, depth: int | None, method: str, *args: object) -> object:
        """`backbone.{method}(*args)`, with depth `depth`'s deltas added to its tensors."""
        delta = self.depth_delta(depth)
        if delta is None:
            return getattr(self.backbone, method)(*args)
        base = dict(self.backbone.named_parameters())
        prefix = backbone_prefix(self.config) + "."
        params = {
            f"backbone.{n.removeprefix(prefix)}": base[n.removeprefix(prefix)] + d
            for n, d in delta.named_parameters()
        }
        return torch.func.functional_call(_BackboneMethod(self.backbone, method), params, args)

    @property
    def backbone(self) -> BertBackbone:
        return self.bert if self.config.head == "pooler" else self.roberta

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        depth: int | None = None,
        rows: Rows = None,
    ) -> torch.Tensor:
        """Hidden states after `depth` layers, with that depth's compensation; with `rows`
        the last layer's for the first `rows` positions alone (see `forward`)."""
        adapters = self.lora_adapters(depth)
        return self._run_backbone(  # type: ignore[return-value]
            depth, "forward", input_ids, attention_mask, token_type_ids, depth, adapters, rows
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        depth: int | None = None,
    ) -> torch.Tensor:
        """One logit per pair at `depth` (None: all layers).

        A head that reads [CLS] alone lets the last layer skip every other token's query,
        attention output and feed-forward: only the keys and values of the other tokens
        matter there. Same logits (up to float rounding); about a sixth of the last layer's
        matmul work remains (the key and value projections), so a 2-layer model does ~40%
        less encoder matmul work, a 6-layer one ~14%. A head on the query segment's mean
        (`QUERY_POOLING`) runs the last layer for the batch's longest query segment; one on
        every token's mean (`MEAN_POOLING`) runs them all.
        """
        rows, mask = self._readout(depth or self.config.num_layers, attention_mask, token_type_ids)
        hidden = self.encode(input_ids, attention_mask, token_type_ids, depth, rows)
        return self.head(hidden, depth, mask)

    def forward_pruned(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        keep: tuple[float, ...],
        protected: torch.Tensor,
    ) -> torch.Tensor:
        """Logits with per-layer token pruning (see `BertBackbone.forward_pruned`); the
        horizontal LoRA applies when some ratio is below 1."""
        adapters = self.lora_adapters(len(keep), pruned=any(r < 1.0 for r in keep))
        rows, segment = self._readout(len(keep), attention_mask, token_type_ids)
        hidden, mask = self._run_backbone(  # type: ignore[misc]
            len(keep), "forward_pruned",
            input_ids, attention_mask, token_type_ids, keep, protected, adapters, rows,
        )  # fmt: skip
        query = self.pooling(len(keep)) == QUERY_POOLING
        return self.head(hidden, len(keep), segment if query else mask)

    def pooled(
        self, hidden: torch.Tensor, depth: int | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """What the head of `depth` reads: the pooler on [CLS], or for depths in
        `poolings` the mean of the token states `mask` keeps (see `MEAN_POOLING`,
        `QUERY_POOLING`)."""
        if self.pooling(depth) == "cls":
            return self.backbone.pooler(hidden)
        if mask is None:
            raise ValueError("a mean-pooled head needs the attention mask")
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)

    def head(
        self, hidden: torch.Tensor, depth: int | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The classification head on the last layer run: the checkpoint's head for that
        depth where it has one, else the model's own, on `pooled`."""
        if self.config.head == "pooler":
            classifier = self.classifier
            if depth in self.head_depths:
                classifier = getattr(self, f"classifier_depth{depth}")
            logits = classifier(self.pooled(hidden, depth, mask))
        else:
            logits = self.classifier(hidden)
        return logits[:, 0]

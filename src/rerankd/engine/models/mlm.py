"""BERT with its masked-LM head, implemented here: the body of SPLADE sparse encoders.

SPLADE reads a vocabulary-sized vector straight off the MLM logits, so the head is the
one BERT was pretrained with (`cls.predictions.*`): dense + activation + LayerNorm, then a
decoder that is usually the word-embedding matrix itself (tied) plus a per-token bias.
Parameter names follow `BertForMaskedLM` so checkpoints load one-to-one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from rerankd.engine.checkpoint import read_weights
from rerankd.engine.models.bert import BertBackbone, _activation
from rerankd.engine.models.config import ModelConfig
from rerankd.errors import ModelLoadError

# Elements of one (batch, tokens, vocab) logits slab computed at a time: SPLADE only needs
# the max over tokens, so long batches are reduced slab by slab instead of materialising
# batch x seq x 30k floats (2 GB for 32 x 512 tokens).
_LOGIT_SLAB_ELEMENTS = 1 << 25


class PredictionTransform(nn.Module):
    """`cls.predictions.transform`: dense + activation + LayerNorm before the decoder."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = _activation(cfg.hidden_act)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class PredictionHead(nn.Module):
    """`cls.predictions`: transform, then vocabulary logits (decoder weight + `bias`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.transform = PredictionTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden)) + self.bias


class OnlyMLMHead(nn.Module):
    """The `cls.` container, kept so parameter names match `BertForMaskedLM`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.predictions = PredictionHead(cfg)


class MaskedLM(nn.Module):
    """BERT backbone + MLM head; `forward` gives (batch, seq, vocab) logits."""

    def __init__(self, cfg: ModelConfig, tie_word_embeddings: bool = True) -> None:
        super().__init__()
        if cfg.family != "bert":
            raise ModelLoadError(
                f"masked-LM head implemented for BERT only, not {cfg.model_type!r} "
                "(RoBERTa-style `lm_head.*` checkpoints are not supported)"
            )
        self.config = cfg
        self.bert = BertBackbone(cfg, with_pooler=False)
        self.cls = OnlyMLMHead(cfg)
        if tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        """Share the decoder matrix with the word embeddings, as BERT was pretrained."""
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> torch.Tensor:
        hidden = self.bert(input_ids, attention_mask, token_type_ids)
        return self.cls.predictions(hidden)

    def splade(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> torch.Tensor:
        """SPLADE weights, (batch, vocab): max over real tokens of log(1 + ReLU(logits)).

        log1p∘ReLU is monotonic, so it is applied once to the masked max of the logits
        rather than to every token's logits; the result is the same formula, computed
        over token slabs so memory stays bounded for long inputs.
        """
        hidden = self.bert(input_ids, attention_mask, token_type_ids)
        batch, seq, _ = hidden.shape
        step = max(1, _LOGIT_SLAB_ELEMENTS // max(1, batch * self.vocab_size))
        keep = attention_mask.to(torch.bool)
        best = torch.full(
            (batch, self.vocab_size), float("-inf"), dtype=hidden.dtype, device=hidden.device
        )
        for start in range(0, seq, step):
            logits = self.cls.predictions(hidden[:, start : start + step])
            logits = logits.masked_fill(~keep[:, start : start + step, None], float("-inf"))
            best = torch.maximum(best, logits.amax(dim=1))
        # Rows without any real token stay -inf; ReLU maps them (and negatives) to 0.
        return torch.log1p(torch.relu(best))


def load_masked_lm(folder: Path) -> MaskedLM:
    """Load a `BertForMaskedLM`-style checkpoint (safetensors) into our MaskedLM, eval mode.

    The decoder follows `tie_word_embeddings` (default true, as in transformers), and is
    tied regardless when the checkpoint stores no decoder matrix: BERT pretrains with the
    two shared, so the embeddings are the only decoder such a checkpoint can mean.
    """
    config_path = folder / "config.json"
    cfg = ModelConfig.from_file(config_path)
    raw = json.loads(config_path.read_text())
    weights = read_weights(folder, keep_mlm_head=True)
    if not any(k.startswith("cls.predictions.") for k in weights):
        raise ModelLoadError(
            f"{folder} has no masked-LM head (cls.predictions.*); a sparse (SPLADE) encoder "
            "needs a BertForMaskedLM checkpoint"
        )
    if not any(k.startswith("bert.") for k in weights):
        # Some exports drop the `bert.` prefix of the backbone.
        weights = {k if k.startswith("cls.") else f"bert.{k}": t for k, t in weights.items()}
    weights = {k: t for k, t in weights.items() if not k.startswith("bert.pooler.")}
    decoder_bias = weights.pop("cls.predictions.decoder.bias", None)
    if "cls.predictions.bias" not in weights and decoder_bias is not None:
        weights["cls.predictions.bias"] = decoder_bias
    has_decoder = "cls.predictions.decoder.weight" in weights
    tie = bool(raw.get("tie_word_embeddings", True)) or not has_decoder
    if tie:
        # transformers ties whenever the config says so, whatever the file holds.
        weights.pop("cls.predictions.decoder.weight", None)
    model = MaskedLM(cfg, tie_word_embeddings=tie)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if tie:
        missing = [m for m in missing if m != "cls.predictions.decoder.weight"]
    if missing or unexpected:
        raise ModelLoadError(
            f"{folder} does not match a BERT masked-LM: "
            f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
    if tie:
        model.tie_weights()  # load_state_dict copies in place, but make the sharing explicit
    return model.eval().requires_grad_(False)

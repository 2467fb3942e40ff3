"""Architecture settings read from a checkpoint's `config.json`.

Only what rerankd's own implementations need is kept; anything we do not implement
is refused with a clear `ModelLoadError` rather than silently mis-run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rerankd.errors import ModelLoadError

# model_type -> (our family, head kind). "pooler": BERT's pooler + linear classifier;
# "roberta": RoBERTa's dense+tanh+out_proj head on the first token.
_FAMILIES: dict[str, tuple[str, str]] = {
    "bert": ("bert", "pooler"),
    "xlm-roberta": ("roberta", "roberta"),
    "roberta": ("roberta", "roberta"),
}
_ACTIVATIONS = {"gelu", "gelu_new", "gelu_pytorch_tanh", "relu"}
# JinaBERT (jina-reranker-v1-*) declares model_type "bert" (JinaBertConfig.model_type);
# what marks it is ALiBi in place of position embeddings and a gated feed-forward.
_JINA_MODEL_TYPES = {"bert"}
_JINA_FEED_FORWARD = {"geglu", "reglu"}


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a BERT-family encoder with a sequence-classification head."""

    model_type: str
    family: str
    head: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int
    hidden_act: str
    num_labels: int
    position_embedding_type: str = "absolute"
    feed_forward_type: str = "original"

    @property
    def max_length(self) -> int:
        """Longest input the position table allows (RoBERTa reserves pad+1 slots)."""
        if self.family == "roberta":
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type", "bert")
        position_embedding_type = raw.get("position_embedding_type") or "absolute"
        feed_forward_type = raw.get("feed_forward_type") or "original"
        if position_embedding_type == "alibi" and model_type in _JINA_MODEL_TYPES:
            if feed_forward_type not in _JINA_FEED_FORWARD:
                raise ModelLoadError(
                    f"unsupported JinaBERT feed_forward_type {feed_forward_type!r}; "
                    f"rerankd implements {sorted(_JINA_FEED_FORWARD)}"
                )
            family, head = "jina", "pooler"
        elif model_type not in _FAMILIES:
            raise ModelLoadError(
                f"unsupported model_type {model_type!r}; rerankd implements {sorted(_FAMILIES)}"
            )
        else:
            family, head = _FAMILIES[model_type]
        act = raw.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ModelLoadError(f"unsupported hidden_act {act!r}; expected one of {_ACTIVATIONS}")
        num_labels = int(raw.get("num_labels", len(raw.get("id2label", {})) or 1))
        return cls(
            model_type=model_type,
            family=family,
            head=head,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=int(raw["num_attention_heads"]),
            intermediate_size=int(raw["intermediate_size"]),
            max_position_embeddings=int(raw.get("max_position_embeddings", 512)),
            type_vocab_size=int(raw.get("type_vocab_size", 2)),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(raw.get("pad_token_id") or 0),
            hidden_act=act,
            num_labels=num_labels,
            position_embedding_type=position_embedding_type,
            feed_forward_type=feed_forward_type,
        )

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"cannot read model config {path}: {exc}") from exc
        return cls.from_dict(raw)

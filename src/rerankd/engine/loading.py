"""Build a cross-encoder module from a checkpoint folder, refusing any mismatch.

Weights are matched by name against our own architecture; a missing or unexpected
tensor is an error that names it, so a wrong checkpoint never serves random scores.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rerankd.engine.checkpoint import read_weights
from rerankd.engine.models.bert import DEPTH_HEAD_NAME, CrossEncoder
from rerankd.engine.models.config import ModelConfig
from rerankd.engine.models.jina import JinaCrossEncoder
from rerankd.errors import ModelLoadError


def load_cross_encoder(folder: Path) -> CrossEncoder | JinaCrossEncoder:
    """Load a sequence-classification checkpoint (HF names) into our CrossEncoder, eval mode."""
    cfg = ModelConfig.from_file(folder / "config.json")
    model = JinaCrossEncoder(cfg) if cfg.family == "jina" else CrossEncoder(cfg)
    weights = read_weights(folder)
    prefix = "bert." if cfg.head == "pooler" else "roberta."
    if not any(k.startswith(prefix) for k in weights):
        raise ModelLoadError(
            f"{folder} holds a bare encoder (no {prefix!r} tensors and no classifier); "
            "make a cross-encoder from it with `rerankd convert-backbone`"
        )
    depths = sorted({int(m.group(1)) for k in weights if (m := DEPTH_HEAD_NAME.match(k))})
    if depths:  # a Matryoshka checkpoint: per-depth heads beside the model's own
        if not isinstance(model, CrossEncoder) or cfg.head != "pooler":
            raise ModelLoadError(f"{folder}: per-depth heads need a BERT (pooler) model")
        try:
            model.add_depth_heads(depths)
        except ValueError as exc:
            raise ModelLoadError(f"{folder}: {exc}") from exc
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"{folder} does not match a {cfg.model_type} cross-encoder: "
            f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
    return model.eval().requires_grad_(False)


def load_config(folder: Path) -> ModelConfig:
    return ModelConfig.from_file(folder / "config.json")


def set_torch_threads(n: int) -> None:
    """Intra-op threads for torch; 0 leaves torch's default (one per core)."""
    if n > 0:
        torch.set_num_threads(n)

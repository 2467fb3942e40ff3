"""Build a cross-encoder module from a checkpoint folder, refusing any mismatch.

Weights are matched by name against our own architecture; a missing or unexpected
tensor is an error that names it, so a wrong checkpoint never serves random scores.
Matryoshka extras are recognised by name too: per-depth heads (`classifier_depth{k}.*`)
LoRA compensation (`lora_depth{k}.*`, `lora_keep.*`) and per-depth deltas
(`delta_depth{k}.*`), see `models.bert`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rerankd.engine.checkpoint import read_weights
from rerankd.engine.model_meta import read_meta
from rerankd.engine.models.bert import (
    DELTA_NAME,
    DEPTH_HEAD_NAME,
    POOLINGS,
    CrossEncoder,
    LoraSpec,
    backbone_prefix,
    lora_layout,
)
from rerankd.engine.models.config import ModelConfig
from rerankd.engine.models.jina import JinaCrossEncoder
from rerankd.errors import ModelLoadError


def load_cross_encoder(folder: Path) -> CrossEncoder | JinaCrossEncoder:
    """Load a sequence-classification checkpoint (HF names) into our CrossEncoder, eval mode."""
    cfg = ModelConfig.from_file(folder / "config.json")
    model = JinaCrossEncoder(cfg) if cfg.family == "jina" else CrossEncoder(cfg)
    weights = read_weights(folder)
    prefix = backbone_prefix(cfg) + "."
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
    install_lora(model, weights, folder)
    install_deltas(model, weights, folder)
    if isinstance(model, CrossEncoder):
        model.poolings = head_poolings(folder, cfg, depths)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape; torch's message names it
        raise ModelLoadError(
            f"{folder} does not match a {cfg.model_type} cross-encoder: {exc}"
        ) from exc
    if missing or unexpected:
        raise ModelLoadError(
            f"{folder} does not match a {cfg.model_type} cross-encoder: "
            f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
    return model.eval().requires_grad_(False)


def head_poolings(folder: Path, cfg: ModelConfig, depths: list[int]) -> dict[int, str]:
    """How each head reads its last layer (`models.bert.POOLINGS`), for the heads that do
    not read the pooled [CLS] (`CrossEncoder.poolings`): rerankd.json's
    `matryoshka.pooling` covers the per-depth heads, `head_pooling` the model's own head
    (an extracted sub-model or a student). Absent: the pooled [CLS], as in HF."""
    meta = read_meta(folder)
    out: dict[int, str] = {}
    pooling = (meta.get("matryoshka") or {}).get("pooling", "cls")
    for key, value, covers in (
        ("matryoshka.pooling", pooling, depths),
        ("head_pooling", meta.get("head_pooling", "cls"), [cfg.num_layers]),
    ):
        if value not in POOLINGS:
            raise ModelLoadError(
                f"{folder}/rerankd.json: {key} must be one of {', '.join(POOLINGS)}, got {value!r}"
            )
        if value != "cls":
            if cfg.head != "pooler":
                raise ModelLoadError(f"{folder}: token-mean heads need a BERT (pooler) model")
            out.update(dict.fromkeys(covers, value))
    return out


def lora_meta(folder: Path) -> dict[str, Any] | None:
    """`matryoshka.lora` of the folder's rerankd.json: rank, alpha, targets, vertical,
    horizontal (None where the folder describes no LoRA)."""
    lora = (read_meta(folder).get("matryoshka") or {}).get("lora")
    return lora if isinstance(lora, dict) else None


def install_lora(
    model: CrossEncoder | JinaCrossEncoder, weights: Mapping[str, torch.Tensor], folder: Path
) -> None:
    """Install (zeroed) the LoRA modules that the `lora_*` tensors of `weights` name, so that
    `load_state_dict` fills them; rank and alpha come from rerankd.json.

    ModelLoadError for a malformed name, a depth or layer out of range, an unknown target,
    a non-BERT-family model, or a rerankd.json that disagrees with the tensors.
    """
    try:
        layout = lora_layout(weights)
    except ValueError as exc:
        raise ModelLoadError(f"{folder}: {exc}") from exc
    meta = lora_meta(folder)
    if not layout:
        if meta:
            raise ModelLoadError(
                f"{folder}: rerankd.json describes LoRA compensation but the weights hold no "
                "lora_* tensors"
            )
        return
    if not isinstance(model, CrossEncoder):
        raise ModelLoadError(
            f"{folder}: LoRA compensation is implemented for BERT-family models, not "
            f"{model.config.family}"
        )
    if meta is None:
        raise ModelLoadError(
            f"{folder}: lora_* tensors need rerankd.json's matryoshka.lora (rank, alpha)"
        )
    try:
        rank, alpha = int(meta["rank"]), float(meta["alpha"])
        ranks = {str(k): int(r) for k, r in (meta.get("ranks") or {}).items()}
        strays = sorted(set(ranks) - set(layout))
        if strays:
            raise ValueError(f"ranks given for {strays}, which the weights hold no LoRA for")
        model.lora_spec = LoraSpec(rank, alpha)  # the model's rank and scale, whatever comes first
        for kind, layers in layout.items():
            r = ranks.get(kind, rank)
            for i, targets in layers.items():
                model.add_lora(kind, [i], targets, r, alpha * r / rank)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise ModelLoadError(f"{folder}: malformed LoRA compensation: {exc}") from exc
    spec = model.lora_spec
    assert spec is not None
    described = (
        sorted(meta.get("vertical", spec.vertical)),
        bool(meta.get("horizontal", spec.horizontal)),
    )
    if described != (list(spec.vertical), spec.horizontal):
        raise ModelLoadError(
            f"{folder}: rerankd.json describes LoRA for depths {described[0]} (horizontal: "
            f"{described[1]}) but the tensors are for depths {list(spec.vertical)} "
            f"(horizontal: {spec.horizontal})"
        )


def install_deltas(
    model: CrossEncoder | JinaCrossEncoder, weights: Mapping[str, torch.Tensor], folder: Path
) -> None:
    """Install (zeroed) the per-depth deltas that the `delta_*` tensors of `weights` name,
    so that `load_state_dict` fills them. ModelLoadError for a malformed name, a depth out
    of range, a tensor that depth does not run, or a non-BERT-family model."""
    found: dict[int, list[str]] = {}
    for name in weights:
        if name.startswith("delta_"):
            m = DELTA_NAME.match(name)
            if m is None:
                raise ModelLoadError(f"{folder}: tensor {name!r} is not delta_depth{{k}}.{{name}}")
            found.setdefault(int(m.group(1)), []).append(m.group(2))
    if not found:
        return
    if not isinstance(model, CrossEncoder):
        raise ModelLoadError(
            f"{folder}: per-depth deltas are implemented for BERT-family models, not "
            f"{model.config.family}"
        )
    try:
        for depth in sorted(found):
            model.add_depth_delta(depth, sorted(found[depth]))
    except ValueError as exc:
        raise ModelLoadError(f"{folder}: {exc}") from exc


def load_config(folder: Path) -> ModelConfig:
    return ModelConfig.from_file(folder / "config.json")


def set_torch_threads(n: int) -> None:
    """Intra-op threads for torch; 0 leaves torch's default (one per core)."""
    if n > 0:
        torch.set_num_threads(n)

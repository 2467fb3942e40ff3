"""A free k-layer model grafted back into a Matryoshka checkpoint as its depth k.

Depth k of a Matryoshka checkpoint shares its first k layers with the full depth, so all it
may change of them is its vertical LoRA (`lora_depth{k}.*`) and its own head. A student
that starts from that cut (`rerankd extract-depth`) and is then distilled with every
weight free (`rerankd distill --student-init`) ranks better than the cut it came from;
the difference between its matrices and the checkpoint's is close to low rank (for
`rerankd-tiny-l2` against `rerankd-minilm-l6`, rank 16 keeps 91-100% of each matrix's
squared norm). So its truncated SVD *is* a vertical LoRA update in the checkpoint's own
format, and with the student's head as depth k's head the checkpoint at depth k scores
nearly as the student does, while its full depth, which uses no LoRA, is untouched.

What LoRA does not reach, the student's biases, LayerNorms, position and token-type
embeddings and any linear outside the checkpoint's LoRA targets, goes in whole as depth
k's deltas (`delta_depth{k}.*`, see `rerankd.engine.models.bert`): under 1 MB for a
384-wide depth 2. With LoRA alone the shipped depth 2 scored 0.623 dev NDCG@10 against
the student's 0.663; with the deltas too, 0.669 (session 19). Only the word-embedding
table is left out (a delta would be as large as the table): `graft_depth` reports how far
it moved, and the served scores are the check.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rerankd.engine.checkpoint import read_weights
from rerankd.engine.loading import lora_meta
from rerankd.engine.model_meta import read_meta
from rerankd.engine.models.bert import (
    DEFAULT_LORA_TARGETS,
    DELTA_FORMAT,
    DEPTH_HEAD_NAME,
    LoraSpec,
    backbone_prefix,
    runs_at_depth,
)
from rerankd.engine.models.config import ModelConfig
from rerankd.train.modeling import (
    DEPTH_HEAD,
    POOLED_SCORE,
    TOKENIZER_FILES,
    same_tokenization,
    save_safetensors,
    write_json,
)

#: the architecture fields a graft needs equal in both models (all but the depth)
_SHAPE = ("family", "hidden_size", "intermediate_size", "num_heads", "vocab_size")


@dataclass(frozen=True)
class GraftReport:
    """What a graft kept and left out, per tensor name."""

    depth: int
    rank: int
    #: share of each carried update's squared Frobenius norm the rank keeps
    energy: dict[str, float]
    #: |student - checkpoint| / |checkpoint| of the tensors carried whole as deltas
    deltas: dict[str, float]
    #: the same for what depth k shares with the full depth and the graft left out
    left_out: dict[str, float]

    def describe(self) -> dict[str, Any]:
        kept = list(self.energy.values())

        def largest(moves: dict[str, float]) -> dict[str, float]:
            # a key bias adds the same q.b to every logit of a query row: softmax ignores it
            drift = {k: v for k, v in moves.items() if v > 0 and not k.endswith("key.bias")}
            worst = max(drift, key=drift.__getitem__) if drift else None
            return {worst: round(drift[worst], 4)} if worst else {}

        return {
            "depth": self.depth,
            "rank": self.rank,
            "energy_min": round(min(kept), 4) if kept else None,
            "energy_mean": round(sum(kept) / len(kept), 4) if kept else None,
            "deltas": len(self.deltas),
            "deltas_max": largest(self.deltas),
            "left_out_max": largest(self.left_out),
        }


def _check(
    model: Path,
    student: Path,
    tcfg: ModelConfig,
    scfg: ModelConfig,
    meta: dict[str, Any],
    heads_at: set[int],
    own: str,
) -> int:
    """The depth the graft replaces (the student's layer count), or ValueError saying what
    does not fit. `meta` is the model's rerankd.json, `heads_at` its depth heads' depths,
    `own` the student's head pooling."""
    for field in _SHAPE:
        a, b = getattr(tcfg, field), getattr(scfg, field)
        if a != b:
            raise ValueError(f"{student} has {field} {b}, {model} has {a}: they must match")
    depth = scfg.num_layers
    if not 1 <= depth < tcfg.num_layers:
        raise ValueError(
            f"{student} has {depth} layers; a graft replaces a depth below {model}'s "
            f"{tcfg.num_layers} (1..{tcfg.num_layers - 1})"
        )
    if "matryoshka" not in meta:
        raise ValueError(
            f"{model} is not a Matryoshka checkpoint (no matryoshka in rerankd.json): train "
            "one with `rerankd distill --matryoshka`"
        )
    heads = str(meta["matryoshka"].get("pooling", "cls"))
    others = sorted(heads_at - {depth})
    if heads != own and others:
        raise ValueError(
            f"{model}'s depth heads read the {heads} pooling, {student}'s head reads {own}: "
            f"the depth heads share one pooling, and {model} keeps heads for depths {others}"
        )
    if not same_tokenization(model, student):
        raise ValueError(f"{student} and {model} tokenize differently")
    return depth


def _kinds(depth: int) -> tuple[str, ...]:
    """Name prefixes of depth `depth`'s compensation, which a graft replaces."""
    return (f"lora_depth{depth}.", f"delta_depth{depth}.")


def graft_depth(
    model: Path, student: Path, dst: Path, rank: int | None = None, deltas: bool = True
) -> tuple[Path, GraftReport]:
    """Write `model` with depth k (k = the student's layer count) replaced by `student`:
    vertical LoRA for depth k = the rank-r SVD of (student - model) on the LoRA targets of
    layers 0..k-1, depth k's deltas = (student - model) on every other tensor of the first
    k layers and the embeddings but the word embeddings (none with `deltas` False), depth
    k's head = the student's head. Targets are the checkpoint's
    (`matryoshka.lora`; the default ones for a checkpoint without LoRA). The rank is depth
    k's current one (its own, else the checkpoint's) unless `rank` is given; one other than
    the checkpoint's is depth k's own (`matryoshka.lora.ranks`), at the checkpoint's scale,
    and no other adapter changes."""
    tcfg = ModelConfig.from_file(model / "config.json")
    scfg = ModelConfig.from_file(student / "config.json")
    meta = read_meta(model)
    tw, sw = read_weights(model), read_weights(student)
    heads_at = {int(m.group(1)) for k in tw if (m := DEPTH_HEAD_NAME.match(k))}
    own = str(read_meta(student).get("head_pooling", "cls"))
    depth = _check(model, student, tcfg, scfg, meta, heads_at, own)
    spec = lora_meta(model)
    out = {k: v for k, v in tw.items() if not k.startswith(_kinds(depth))}
    if spec is not None:
        targets = list(spec["targets"])
        scale = float(spec["alpha"]) / int(spec["rank"])
        rank = rank or int((spec.get("ranks") or {}).get(f"depth{depth}", spec["rank"]))
    else:
        rank = rank or 16
        scale, targets = 1.0, list(DEFAULT_LORA_TARGETS)
    if not 1 <= rank <= tcfg.hidden_size:
        raise ValueError(f"rank must be in 1..{tcfg.hidden_size}, got {rank}")
    prefix = backbone_prefix(tcfg)
    energy: dict[str, float] = {}
    for i in range(depth):
        for t in targets:
            name = f"{prefix}.encoder.layer.{i}.{t}.weight"
            delta = sw[name].float() - tw[name].float()
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            total = float((s**2).sum())
            energy[name] = float((s[:rank] ** 2).sum()) / total if total > 0 else 1.0
            root = (s[:rank] / scale).sqrt()
            out[f"lora_depth{depth}.layer{i}.{t}.B"] = (u[:, :rank] * root).contiguous()
            out[f"lora_depth{depth}.layer{i}.{t}.A"] = (root[:, None] * vh[:rank]).contiguous()
    head = DEPTH_HEAD.format(k=depth)
    for x in ("weight", "bias"):
        out[f"{head}.{x}"] = sw[f"classifier.{x}"].to(tw["classifier.weight"].dtype)
    carried = {f"{prefix}.encoder.layer.{i}.{t}.weight" for i in range(depth) for t in targets}
    moved: dict[str, float] = {}
    left_out: dict[str, float] = {}
    for name, s_t in sw.items():
        if not runs_at_depth(name, prefix, depth) or name in carried or name not in tw:
            continue
        ref = tw[name].float()
        delta = s_t.float() - ref
        move = float(delta.norm() / ref.norm().clamp_min(1e-12))
        if deltas and not name.endswith("word_embeddings.weight"):
            if move > 0:
                out[f"delta_depth{depth}.{name}"] = delta.contiguous()
                moved[name] = move
        else:
            left_out[name] = move
    report = GraftReport(depth, rank, energy, moved, left_out)

    dst.mkdir(parents=True, exist_ok=True)
    save_safetensors(dst / "model.safetensors", out, {})
    for name in ("config.json", "fusion.json", *TOKENIZER_FILES):
        if (model / name).exists():
            shutil.copyfile(model / name, dst / name)
    mat = dict(meta["matryoshka"])
    # the depth heads share one pooling; _check allows another only where depth k's head
    # is the model's only one, so the student's becomes theirs
    heads = mat.get("pooling", "cls")
    if own != heads:
        mat["pooling"] = own
        mat["score"] = str(mat.get("score", "")).replace(POOLED_SCORE[heads], POOLED_SCORE[own])
    lora = dict(mat.get("lora") or LoraSpec(rank, scale * rank, tuple(targets)).describe())
    lora["vertical"] = sorted({*lora.get("vertical", []), depth})
    ranks = {k: r for k, r in (lora.pop("ranks", None) or {}).items() if k != f"depth{depth}"}
    ranks |= {f"depth{depth}": rank} if rank != lora["rank"] else {}
    mat["lora"] = lora | ({"ranks": ranks} if ranks else {})
    mat["depths"] = sorted({*mat.get("depths", []), depth})
    mat["heads"] = {**mat.get("heads", {}), str(depth): head}
    delta_depths = set((mat.get("deltas") or {}).get("depths", [])) - {depth}
    delta_depths |= {depth} if moved else set()
    if delta_depths:
        mat["deltas"] = {"depths": sorted(delta_depths), "tensors": DELTA_FORMAT}
    else:
        mat.pop("deltas", None)
    # the word-embedding table is stored here (read_weights restored it), not referenced
    new = {k: v for k, v in meta.items() if k != "external_tensors"}
    new |= {"matryoshka": mat, "grafted": report.describe() | {"from": str(student)}}
    write_json(dst / "rerankd.json", new)
    return dst, report

"""Models for training: cross-encoders from backbones, students from teachers, per-depth heads.

Training runs on the engine's own `CrossEncoder` (no `transformers`), so what is trained is
exactly what is served, and the checkpoint folder is a standard Hugging Face
sequence-classification folder that `rerankd serve --model DIR` (and sentence-transformers)
load unchanged.

Matryoshka per-depth heads
--------------------------
`rerankd distill --matryoshka` adds, for every depth k = 1 .. L-1 (k = the number of encoder
layers run, as in the engine's `depth` option), a linear head stored in the *same*
`model.safetensors` under rerankd names:

    classifier_depth{k}.weight   float32 [num_labels, hidden_size]
    classifier_depth{k}.bias     float32 [num_labels]

The score at depth k is `classifier_depth{k}(tanh(bert.pooler.dense(h_k[:, 0])))[:, 0]`,
where `h_k` is the hidden state after encoder layer k (the output of
`BertBackbone(..., depth=k)`): the shared BERT pooler on the [CLS] token, then the depth's
own head. Depth L keeps the Hugging Face head `classifier.*`. `rerankd.json` in the folder
describes this under `"matryoshka"`. The heads are separate because layer k's [CLS] is not
in the space the full-depth head was trained on; the pooler is shared because it is a
hidden-to-hidden map that every depth's head can adapt to, and one head per depth is then
H + 1 parameters.

Matryoshka LoRA compensation
----------------------------
With `--lora-rank R`, the same file also holds low-rank updates of the encoder's linears
(the Matryoshka Re-Ranker's vertical and horizontal compensation; the engine's
`models.bert` docstring defines how they are applied):

    lora_depth{k}.layer{i}.{T}.A   float32 [R, in_features]    k = 1 .. L-1, i < k
    lora_depth{k}.layer{i}.{T}.B   float32 [out_features, R]
    lora_keep.layer{i}.{T}.A       float32 [R, in_features]    i < L (with --lora-horizontal)
    lora_keep.layer{i}.{T}.B       float32 [out_features, R]

`T` is a linear's path inside an encoder layer (`attention.self.query`, ...,
`output.dense`). Serving at depth k computes each targeted linear of layers i < k with
`W + (alpha / R) B A`; pruning tokens adds the `lora_keep` updates. `rerankd.json`
says `"matryoshka": {"lora": {"rank": R, "alpha": alpha, "targets": [T, ...],
"vertical": [k, ...], "horizontal": true|false}}` (alpha is read from there only). The
full depth never uses LoRA: with `--lora-freeze-base` the full-depth model is exactly the
one trained from, and each depth pays for its own compensation only when it is served.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rerankd.engine.bundled import PREFIX as BUNDLED_PREFIX
from rerankd.engine.bundled import backbone_dir
from rerankd.engine.checkpoint import read_weights, write_safetensors
from rerankd.engine.convert import backbone_to_cross_encoder
from rerankd.engine.loading import (
    head_poolings,
    install_deltas,
    install_lora,
    lora_meta,
)
from rerankd.engine.model_meta import read_meta
from rerankd.engine.models.bert import (
    DELTA_FORMAT,
    DELTA_NAME,
    DEPTH_HEAD_NAME,
    KEEP,
    MEAN_POOLING,
    QUERY_POOLING,
    CrossEncoder,
    backbone_prefix,
    fold_compensation,
    lora_layout,
    mask_bias,
)
from rerankd.engine.models.config import ModelConfig
from rerankd.engine.shipped import SHIPPED, shipped_source
from rerankd.engine.tokenize import PairEncoder, collate, load_tokenizer
from rerankd.errors import ModelLoadError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
DEPTH_HEAD = "classifier_depth{k}"
#: `rerankd.json`'s formula for a per-depth head's score, by its pooling
POOLED_SCORE = {
    "cls": "classifier_depth{k}(tanh(bert.pooler.dense(h_k[:, 0])))[:, 0]",
    MEAN_POOLING: "classifier_depth{k}(mean over unmasked tokens of h_k)[:, 0]",
    QUERY_POOLING: "classifier_depth{k}(mean over the query segment's tokens of h_k "
    "([CLS] query [SEP], token type 0))[:, 0]",
}
_DEPTH_HEAD_NAME = DEPTH_HEAD_NAME  # the engine's: one name for trainer and server
_LAYER_NAME = re.compile(r"^(bert|roberta)\.encoder\.layer\.(\d+)\.(.+)$")


def resolve_backbone(spec: str) -> Path:
    """`bundled:NAME` -> the bundled *bare* backbone folder; a shipped model's name
    (`rerankd-minilm-l6`) -> its folder; else a local folder.

    Unlike serving's `bundled:NAME` (a cross-encoder with a seed-0 head), training wants the
    backbone itself, so the head is drawn from the run's own seed. A shipped model is a
    trained cross-encoder, so fine-tuning it on a user's qrels, distilling from it or cutting
    it (`extract-depth`) starts from its weights; `read_weights` restores the word-embedding
    table it shares with its base, and every checkpoint written from it stores that table.
    As for serving, a folder of the same name in the working directory wins.
    """
    if spec.startswith(BUNDLED_PREFIX):
        return backbone_dir(spec[len(BUNDLED_PREFIX) :])
    if (shipped := shipped_source(spec)) is not None:
        return shipped
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{spec!r} is neither bundled:NAME, a shipped model ({', '.join(SHIPPED)}) nor a "
            "folder with config.json"
        )
    return path


def is_cross_encoder(folder: Path) -> bool:
    """Whether a checkpoint already has a classification head (else it is a bare encoder)."""
    return any(k.startswith("classifier.") for k in read_weights(folder))


def prepare_init(spec: str, workdir: Path, seed: int) -> tuple[Path, dict[str, Any]]:
    """A cross-encoder folder to start from, and how it was made (for the run log).

    A bare encoder is converted with a head drawn from `seed` into `workdir`; a
    cross-encoder folder is used as it is.
    """
    src = resolve_backbone(spec)
    if is_cross_encoder(src):
        return src, {"init": str(src), "head": "from checkpoint"}
    dst = backbone_to_cross_encoder(src, workdir / "init", seed=seed)
    return dst, {"init": str(src), "head": f"untrained, seed {seed}"}


def same_tokenization(a: Path, b: Path) -> bool:
    """Whether two checkpoints turn text into the same token ids.

    Compares the tokenizers as the engine loads them (`load_tokenizer`: truncation and
    padding off), so two copies of one vocabulary saved with different padding settings
    (all-MiniLM-L6-v2 and SPLADE-tiny) agree, and any other difference does not.
    """
    try:
        specs = [json.loads(load_tokenizer(f).to_str()) for f in (a, b)]
    except Exception:  # a folder without a readable tokenizer: nothing to compare
        return False
    return specs[0] == specs[1]


def split_depth_heads(
    weights: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(every other tensor, LoRA included; the rerankd per-depth head tensors)."""
    base = {k: v for k, v in weights.items() if not _DEPTH_HEAD_NAME.match(k)}
    heads = {k: v for k, v in weights.items() if _DEPTH_HEAD_NAME.match(k)}
    return base, heads


def head_depths(weights: Mapping[str, torch.Tensor]) -> list[int]:
    """The depths that have a per-depth head in `weights`, ascending."""
    return sorted({int(m.group(1)) for k in weights if (m := _DEPTH_HEAD_NAME.match(k))})


class TrainableReranker(nn.Module):
    """The engine's `CrossEncoder`, plus optional per-depth heads (Matryoshka).

    Its state dict is `model.<HF name>`, `model.lora_*` (LoRA compensation, installed on
    the engine's module so training runs the very forward that serves) and
    `classifier_depth{k}.*`; `export_state` gives the checkpoint names (unprefixed).
    """

    def __init__(self, model: CrossEncoder, depths: Sequence[int] = ()) -> None:
        super().__init__()
        self.model = model
        cfg = model.config
        bad = [k for k in depths if not 1 <= k < cfg.num_layers]
        if bad:
            raise ValueError(f"per-depth heads need 1 <= k < {cfg.num_layers}, got {bad}")
        if depths and cfg.head != "pooler":
            raise ModelLoadError(
                f"per-depth heads are implemented for BERT-family (pooler) heads, not {cfg.family}"
            )
        self.depths = sorted(set(depths))
        for k in self.depths:
            self.add_module(DEPTH_HEAD.format(k=k), nn.Linear(cfg.hidden_size, cfg.num_labels))

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def head(self, k: int) -> nn.Linear:
        return getattr(self, DEPTH_HEAD.format(k=k))

    @property
    def pooling(self) -> str:
        """How the per-depth heads read layer k (`POOLINGS`; they share one)."""
        return self.model.pooling(self.depths[0]) if self.depths else "cls"

    def set_pooling(self, pooling: str) -> None:
        """Make every per-depth head read its layer as `pooling` (`POOLINGS`)."""
        self.model.set_pooling(self.depths, pooling)

    def set_head_pooling(self, pooling: str) -> None:
        """Make the model's own head read its last layer as `pooling` (`POOLINGS`)."""
        self.model.set_pooling([self.config.num_layers], pooling)

    def init_heads_from_classifier(self) -> None:
        """Start every depth head as a copy of the full-depth head: a trained model's head
        is a better start than noise, since all depths share the pooler."""
        for k in self.depths:
            self.head(k).load_state_dict(self.model.classifier.state_dict())

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        """Full-depth scores, one per pair (exactly the engine's forward)."""
        return self.model(input_ids, attention_mask, token_type_ids)

    def forward_depths(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        """Scores at every head depth and at full depth: shape (len(depths) + 1, pairs).

        Row i is depth `self.depths[i]`, the last row depth L. Depths without compensation
        share one pass through the encoder; a depth with vertical LoRA or deltas runs a pass
        of its own (its layers compute with its updates, as the engine serves it), so a fully
        compensated model costs L(L+1)/2 layer passes instead of L.
        """
        model = self.model
        bb = model.backbone
        x = bb.embeddings(input_ids, attention_mask, token_type_ids)
        bias = mask_bias(attention_mask, x.dtype)
        rows: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(bb.encoder.layer, start=1):
            x = layer(x, bias)
            if i in self.depths and not model.compensation(i):
                rows[i] = self.head(i)(model.pooled(x, i, attention_mask))[:, 0]
        for k in self.depths:
            if k not in rows:
                hidden = model.encode(input_ids, attention_mask, token_type_ids, k)
                rows[k] = self.head(k)(model.pooled(hidden, k, attention_mask))[:, 0]
        full = model.classifier(model.pooled(x, None, attention_mask))[:, 0]
        return torch.stack([rows[k] for k in self.depths] + [full])

    def add_lora(
        self,
        rank: int,
        alpha: float,
        targets: Sequence[str],
        horizontal: bool,
        seed: int,
        vertical: bool = True,
    ) -> None:
        """Vertical LoRA for every head depth (unless `vertical` is False), and horizontal
        LoRA on every layer.

        A is drawn from `seed`, uniform in +-1/sqrt(in_features) (PEFT's default), and B is
        zero: a fresh update changes no score, and B has a gradient from the first step.
        Only the adapters added here are drawn: LoRA the model already holds is kept.
        """
        kinds = [f"depth{k}" for k in self.depths] if vertical else []
        kinds += [KEEP] if horizontal else []
        for kind in kinds:
            layers = range(self.config.num_layers if kind == KEEP else int(kind[len("depth") :]))
            self.model.add_lora(kind, layers, targets, rank, alpha)
        new = tuple(f"lora_{kind}." for kind in kinds)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(self.model.named_parameters()):
                if name.startswith(new) and name.endswith(".A"):
                    bound = 1.0 / math.sqrt(p.shape[1])
                    p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)

    def train_only(self, prefix: str) -> None:
        """Train only the parameters whose name starts with `prefix` (e.g. `lora_keep.`):
        every configuration that does not use them stays bit-identical."""
        self.requires_grad_(False)
        for name, p in self.model.named_parameters():
            if name.startswith(prefix):
                p.requires_grad_(True)

    def freeze_base(self) -> None:
        """Train only the LoRA updates, the per-depth deltas and heads: the full-depth model
        (which uses none of them) stays bit-identical."""
        self.model.requires_grad_(False)
        for name, p in self.model.named_parameters():
            if name.startswith(("lora_", "delta_")):
                p.requires_grad_(True)

    def export_state(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensors: HF names for the cross-encoder, rerankd names for the heads."""
        out: dict[str, torch.Tensor] = {}
        for name, t in self.state_dict().items():
            key = name.removeprefix("model.")
            out[key] = t.detach().to(torch.float32).contiguous().clone()
        return out

    def load_export(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Load `export_state`-named tensors, refusing any mismatch by name."""
        renamed = {
            (k if _DEPTH_HEAD_NAME.match(k) else f"model.{k}"): v for k, v in weights.items()
        }
        missing, unexpected = self.load_state_dict(renamed, strict=False)
        if missing or unexpected:
            raise ModelLoadError(
                f"checkpoint does not match the model: missing {sorted(missing)[:8]}, "
                f"unexpected {sorted(unexpected)[:8]}"
            )


def load_trainable(folder: Path, depths: Sequence[int] | None = None) -> TrainableReranker:
    """A checkpoint folder -> a TrainableReranker in train mode with gradients on.

    `depths=None` keeps whatever per-depth heads the folder has; a list asks for those
    heads (missing ones start as copies of the full-depth head).
    """
    cfg = ModelConfig.from_file(folder / "config.json")
    if cfg.family not in ("bert", "roberta"):
        raise ModelLoadError(f"training supports BERT and RoBERTa families, not {cfg.family}")
    weights = read_weights(folder)
    base, heads = split_depth_heads(weights)
    have = head_depths(heads)
    wanted = have if depths is None else list(depths)
    model = CrossEncoder(cfg)
    install_lora(model, weights, folder)  # the folder's LoRA, if any, is kept and trained
    install_deltas(model, weights, folder)  # its per-depth deltas too
    model.poolings = head_poolings(folder, cfg, wanted)
    module = TrainableReranker(model, wanted)
    module.init_heads_from_classifier()  # overwritten below for the heads the folder has
    keep = {k: v for k, v in heads.items() if int(_DEPTH_HEAD_NAME.match(k).group(1)) in wanted}
    state = {f"model.{k}": v for k, v in base.items()} | keep
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [m for m in missing if not _DEPTH_HEAD_NAME.match(m)]
    if missing or unexpected:
        raise ModelLoadError(
            f"{folder} does not match a {cfg.model_type} cross-encoder: "
            f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
    return module.float().train().requires_grad_(True)


def pair_encoder(folder: Path, cfg: ModelConfig) -> PairEncoder:
    """The engine's pair encoder for a checkpoint: training tokenizes exactly as serving."""
    return PairEncoder(load_tokenizer(folder), cfg.max_length, cfg.type_vocab_size == 1)


def encode_batch(
    encoder: PairEncoder,
    pad_id: int,
    query_docs: Sequence[tuple[str, Sequence[str]]],
    max_length: int,
    with_protected: bool = False,
) -> dict[str, torch.Tensor]:
    """Model inputs for (query, documents) lists, one pair per document, in order
    (`protected` too, for token pruning, with `with_protected`)."""
    pairs = []
    for query, docs in query_docs:
        pairs.extend(encoder.encode(query, list(docs), max_length).pairs)
    batch = collate(pairs, pad_id, with_protected)
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def _atomic_write_bytes(path: Path, writer: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    writer(tmp)
    os.replace(tmp, path)


def save_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write a safetensors file atomically (a crash mid-save leaves the old file)."""
    _atomic_write_bytes(path, lambda tmp: write_safetensors(tmp, tensors, meta))


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically."""
    _atomic_write_bytes(
        path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    )


def save_model_folder(
    out: Path,
    module: TrainableReranker,
    template: Path,
    info: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a servable checkpoint folder: config.json, model.safetensors, tokenizer, rerankd.json.

    `template` supplies config.json and the tokenizer (the init folder); the config's layer
    count is set from the module (a student may be shallower than its template).
    """
    out.mkdir(parents=True, exist_ok=True)
    raw = json.loads((template / "config.json").read_text())
    raw["num_hidden_layers"] = module.config.num_layers
    raw.pop("_name_or_path", None)
    if out.resolve() != template.resolve():
        for name in TOKENIZER_FILES:
            if (template / name).exists():
                shutil.copyfile(template / name, out / name)
    write_json(out / "config.json", raw)
    meta_st = {"format": "pt", **(metadata or {})}
    save_safetensors(out / "model.safetensors", module.export_state(), meta_st)
    meta = dict(info)
    # how the model's own head pools is part of its architecture: an extracted depth trained
    # further (`--student-init`) keeps its token-mean head unless told otherwise
    if (own := module.model.pooling(None)) != "cls":
        meta["head_pooling"] = own
    if module.depths or module.model.lora_spec is not None:
        meta["matryoshka"] = matryoshka_description(module)
    write_json(out / "rerankd.json", meta)
    return out


def matryoshka_description(module: TrainableReranker) -> dict[str, Any]:
    """What `rerankd.json` says about the per-depth heads (see the module docstring)."""
    cfg = module.config
    return {
        "format": 1,
        "num_layers": cfg.num_layers,
        "depths": module.depths,
        "heads": {str(k): DEPTH_HEAD.format(k=k) for k in module.depths},
        "tensors": {
            "weight": f"{DEPTH_HEAD}.weight [{cfg.num_labels}, {cfg.hidden_size}]",
            "bias": f"{DEPTH_HEAD}.bias [{cfg.num_labels}]",
        },
        "pooling": module.pooling,
        "score": POOLED_SCORE[module.pooling]
        + ", h_k = hidden state after the first k encoder layers (with depth k's LoRA and "
        "deltas, if any); depth num_layers uses classifier.* on the pooled [CLS]",
        "lora": lora_description(module.model),
        "deltas": deltas_description(module.model),
    }


def deltas_description(model: CrossEncoder) -> dict[str, Any] | None:
    """`matryoshka.deltas` of rerankd.json, for a reader: the depths that have per-depth
    deltas and what the tensors mean (the engine goes by the tensor names)."""
    depths = model.delta_depths
    return {"depths": list(depths), "tensors": DELTA_FORMAT} if depths else None


def lora_description(model: CrossEncoder) -> dict[str, Any] | None:
    """`matryoshka.lora` of rerankd.json: the spec the engine reads (rank, alpha, targets,
    vertical, horizontal) and, for a reader, the tensor names and the effective weight."""
    spec = model.lora_spec
    if spec is None:
        return None
    return spec.describe() | {
        "tensors": {
            "vertical": "lora_depth{k}.layer{i}.{target}.A [rank, in], .B [out, rank], i < k",
            "horizontal": "lora_keep.layer{i}.{target}.A [rank, in], .B [out, rank]",
        },
        "weight": "W + (alpha / rank) * B @ A; depth k < num_layers uses lora_depth{k}, "
        "token pruning adds lora_keep; the full depth uses none",
    }


def default_student_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers including the first and the last (6 -> 2: [0, 5]; a
    one-layer student keeps the last).

    The first layer is the one trained on the embeddings' output and the last the one whose
    output the pooler and classifier were trained on, so keeping both keeps both interfaces
    of the stack; the layers between are subsampled evenly (as DistilBERT and TinyBERT's
    uniform mapping do).
    """
    if not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"student layers must be in 1..{teacher_layers}, got {student_layers}")
    if student_layers == 1:
        return [teacher_layers - 1]
    step = (teacher_layers - 1) / (student_layers - 1)
    return [round(i * step) for i in range(student_layers)]


def student_from_teacher(teacher: Path, layers: Sequence[int], dst: Path) -> Path:
    """A student checkpoint: the teacher's embeddings, pooler and head, and `layers` of its
    encoder renumbered 0..n-1. Written as a normal cross-encoder folder."""
    cfg = ModelConfig.from_file(teacher / "config.json")
    if sorted(set(layers)) != list(layers) or not layers:
        raise ValueError(f"student layers must be increasing and distinct, got {list(layers)}")
    if layers[-1] >= cfg.num_layers or layers[0] < 0:
        raise ValueError(f"teacher has layers 0..{cfg.num_layers - 1}, got {list(layers)}")
    base, _ = split_depth_heads(read_weights(teacher))
    base = fold_compensation(base, None, 1.0, "")  # drops the teacher's LoRA and deltas
    new_index = {old: new for new, old in enumerate(layers)}
    out: dict[str, torch.Tensor] = {}
    for name, t in base.items():
        m = _LAYER_NAME.match(name)
        if m is None:
            out[name] = t
        elif int(m.group(2)) in new_index:
            out[f"{m.group(1)}.encoder.layer.{new_index[int(m.group(2))]}.{m.group(3)}"] = t
    dst.mkdir(parents=True, exist_ok=True)
    save_safetensors(dst / "model.safetensors", {k: v.contiguous() for k, v in out.items()}, {})
    raw = json.loads((teacher / "config.json").read_text())
    raw["num_hidden_layers"] = len(layers)
    write_json(dst / "config.json", raw)
    for name in TOKENIZER_FILES:
        if (teacher / name).exists():
            shutil.copyfile(teacher / name, dst / name)
    write_json(dst / "rerankd.json", {"student_of": str(teacher), "teacher_layers": list(layers)})
    return dst


def extract_depth(model: Path, depth: int, dst: Path) -> Path:
    """The first `depth` layers of a Matryoshka checkpoint as a model of its own.

    Its head is the checkpoint's head for that depth (`classifier_depth{depth}`), and the
    depth's LoRA compensation is folded into its weights, so the extracted model scores
    exactly as the full checkpoint does at `depth`. The per-depth heads below it are kept
    where they still score as in the checkpoint: not when LoRA changed their layers (no
    LoRA is kept: each update was trained for a configuration of the source). After
    cascaded self-distillation this *is* a student distilled from the full model, at no
    extra training cost.
    """
    cfg = ModelConfig.from_file(model / "config.json")
    base, heads = split_depth_heads(read_weights(model))
    head = f"classifier_depth{depth}"
    if depth == cfg.num_layers or f"{head}.weight" not in heads:
        raise ValueError(
            f"{model} has no head for depth {depth} (per-depth heads: {head_depths(heads)})"
        )
    # LoRA and deltas: this depth's are folded into the weights and every other dropped;
    # so a lower head stays only if neither its depth nor this one was compensated.
    layout = lora_layout(base)
    compensated = {int(kind[len("depth") :]) for kind in layout if kind != KEEP}
    compensated |= {int(m.group(1)) for k in base if (m := DELTA_NAME.match(k))}
    if layout or compensated:
        meta = lora_meta(model)
        if layout and meta is None:
            raise ModelLoadError(f"{model}: lora_* tensors need rerankd.json's matryoshka.lora")
        kind = f"depth{depth}" if depth in compensated else None
        scale = float(meta["alpha"]) / int(meta["rank"]) if meta else 1.0
        base = fold_compensation(base, kind, scale, backbone_prefix(cfg))
    out: dict[str, torch.Tensor] = {}
    for name, t in base.items():
        m = _LAYER_NAME.match(name)
        if m is None or int(m.group(2)) < depth:
            out[name] = t
    out["classifier.weight"] = heads[f"{head}.weight"]
    out["classifier.bias"] = heads[f"{head}.bias"]
    for k in head_depths(heads):
        if k < depth and not compensated & {k, depth}:
            out[f"classifier_depth{k}.weight"] = heads[f"classifier_depth{k}.weight"]
            out[f"classifier_depth{k}.bias"] = heads[f"classifier_depth{k}.bias"]
    dst.mkdir(parents=True, exist_ok=True)
    save_safetensors(dst / "model.safetensors", {k: v.contiguous() for k, v in out.items()}, {})
    raw = json.loads((model / "config.json").read_text())
    raw["num_hidden_layers"] = depth
    write_json(dst / "config.json", raw)
    for name in TOKENIZER_FILES:
        if (model / name).exists():
            shutil.copyfile(model / name, dst / name)
    meta = read_meta(model)
    pooling = (meta.get("matryoshka") or {}).get("pooling", "cls")
    extracted: dict[str, Any] = {"extracted_from": str(model), "depth": depth}
    if pooling != "cls":  # its own head and any kept lower heads read the same token mean
        extracted |= {"head_pooling": pooling, "matryoshka": {"pooling": pooling}}
    extracted |= {k: meta[k] for k in ("max_length", "long_docs") if k in meta}
    write_json(dst / "rerankd.json", extracted | {"source_meta": meta})
    return dst

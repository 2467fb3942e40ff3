"""Turn a bare encoder (e.g. all-MiniLM-L6-v2, SPLADE-tiny) into a cross-encoder checkpoint.

No trained cross-encoder can be had offline here, so tests, benchmarks and training start
from real trained backbones with a classification head drawn from a fixed seed. The output
is a standard Hugging Face `BertForSequenceClassification` folder, so sentence-transformers'
`CrossEncoder` and rerankd load the very same weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from rerankd.engine.checkpoint import read_weights, write_safetensors
from rerankd.engine.models.config import ModelConfig
from rerankd.errors import ModelLoadError

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def _init_linear(out_f: int, in_f: int, gen: torch.Generator, std: float) -> tuple:
    weight = torch.randn(out_f, in_f, generator=gen) * std
    return weight, torch.zeros(out_f)


def backbone_to_cross_encoder(src: Path, dst: Path, seed: int = 0) -> Path:
    """Write `dst` = src's encoder + (src's pooler or a seeded one) + a seeded 1-logit head."""
    raw = json.loads((src / "config.json").read_text())
    cfg = ModelConfig.from_dict(raw)
    if cfg.family != "bert":
        raise ModelLoadError(
            f"convert-backbone supports BERT-family encoders, not {cfg.model_type}"
        )
    weights = read_weights(src)
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        key = name if name.startswith("bert.") else f"bert.{name}"
        if key.startswith("bert.classifier") or name.startswith("classifier."):
            continue
        out[key] = t.contiguous().to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    std = float(raw.get("initializer_range", 0.02))
    h = cfg.hidden_size
    if "bert.pooler.dense.weight" not in out:
        out["bert.pooler.dense.weight"], out["bert.pooler.dense.bias"] = _init_linear(
            h, h, gen, std
        )
    out["classifier.weight"], out["classifier.bias"] = _init_linear(1, h, gen, std)

    dst.mkdir(parents=True, exist_ok=True)
    write_safetensors(dst / "model.safetensors", out, {"format": "pt"})
    raw.update(
        architectures=["BertForSequenceClassification"],
        num_labels=1,
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
        tie_word_embeddings=False,
    )
    raw.pop("_name_or_path", None)
    (dst / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
    for name in _TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
    (dst / "rerankd.json").write_text(
        json.dumps({"converted_from": str(src), "head_seed": seed, "head": "untrained"}, indent=2)
    )
    return dst

"""Helpers for tests: the shared data sets and tiny random checkpoints."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def dataset_dir(name: str) -> Path:
    """A BEIR-layout data set under ../shared/data, or skip the test where it is absent."""
    path = DATA / name
    if not (path / "corpus.jsonl").exists():
        pytest.skip(f"shared data set {name!r} not found at {path}")
    return path


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def dl19_candidates(
    n_queries: int = 5, depth: int = 100
) -> list[tuple[str, list[tuple[str, str]]]]:
    """(query text, [(doc id, text)] in BM25 order) for the first DL19 queries of the run."""
    root = dataset_dir("trec-dl-2019")
    queries = {q["_id"]: q["text"] for q in read_jsonl(root / "queries.jsonl")}
    corpus = {d["_id"]: d["text"] for d in read_jsonl(root / "corpus.jsonl")}
    runs: dict[str, list[str]] = {}
    for line in (root / "runs" / "bm25.top100.trec").read_text().splitlines():
        qid, _, did, *_ = line.split()
        runs.setdefault(qid, []).append(did)
    out = []
    for qid in sorted(runs, key=int)[:n_queries]:
        out.append((queries[qid], [(d, corpus[d]) for d in runs[qid][:depth]]))
    return out


def write_tiny_checkpoint(
    folder: Path,
    *,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 2,
    model_type: str = "bert",
) -> Path:
    """A tiny random BERT cross-encoder with the real MiniLM tokenizer: fast unit tests."""
    import torch
    from safetensors.torch import save_file

    from rerankd.engine.bundled import backbone_dir
    from rerankd.engine.models.bert import CrossEncoder
    from rerankd.engine.models.config import ModelConfig

    raw = {
        "model_type": model_type,
        "vocab_size": 30522,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": hidden * 4,
        "max_position_embeddings": 512,
        "type_vocab_size": 2 if model_type == "bert" else 1,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0 if model_type == "bert" else 1,
        "hidden_act": "gelu",
        "num_labels": 1,
        "architectures": ["BertForSequenceClassification"],
    }
    torch.manual_seed(seed)
    model = CrossEncoder(ModelConfig.from_dict(raw))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    (folder / "config.json").write_text(json.dumps(raw))
    shutil.copyfile(backbone_dir("all-minilm-l6-v2") / "tokenizer.json", folder / "tokenizer.json")
    return folder


def write_lora_checkpoint(
    folder: Path,
    *,
    layers: int = 4,
    vertical: tuple[int, ...] = (1, 3),
    horizontal: bool = True,
    rank: int = 2,
    alpha: float = 3.0,
    targets: tuple[str, ...] | None = None,
    seed: int = 0,
) -> Path:
    """A tiny Matryoshka checkpoint: per-depth heads and random (B != 0) LoRA updates,
    vertical for `vertical` and horizontal on every layer, described in rerankd.json."""
    import torch
    from safetensors.torch import load_file, save_file

    from rerankd.engine.models.bert import LORA_TARGETS, CrossEncoder
    from rerankd.engine.models.config import ModelConfig

    write_tiny_checkpoint(folder, seed=seed, layers=layers)
    weights = load_file(str(folder / "model.safetensors"))
    cfg = ModelConfig.from_file(folder / "config.json")
    layer = CrossEncoder(cfg).bert.encoder.layer[0]
    targets = LORA_TARGETS if targets is None else targets
    gen = torch.Generator().manual_seed(seed + 1)
    for k in range(1, layers):
        weights[f"classifier_depth{k}.weight"] = torch.randn(1, cfg.hidden_size, generator=gen)
        weights[f"classifier_depth{k}.bias"] = torch.randn(1, generator=gen)
    kinds = [(f"depth{k}", k) for k in vertical] + ([("keep", layers)] if horizontal else [])
    for kind, n in kinds:
        for i in range(n):
            for t in targets:
                linear = layer.get_submodule(t)
                a = torch.randn(rank, linear.in_features, generator=gen) * 0.2
                b = torch.randn(linear.out_features, rank, generator=gen) * 0.2
                weights[f"lora_{kind}.layer{i}.{t}.A"] = a
                weights[f"lora_{kind}.layer{i}.{t}.B"] = b
    save_file(weights, str(folder / "model.safetensors"))
    lora = {
        "rank": rank,
        "alpha": alpha,
        "targets": list(targets),
        "vertical": sorted(vertical),
        "horizontal": horizontal,
    }
    (folder / "rerankd.json").write_text(json.dumps({"matryoshka": {"lora": lora}}))
    return folder


ANIMALS = [
    "cat", "dog", "horse", "goat", "sheep", "camel", "otter", "badger",
    "falcon", "heron", "lizard", "salmon", "beetle", "rabbit", "ferret", "donkey",
]  # fmt: skip
FOODS = ["grass", "fish", "seeds", "insects", "berries", "roots", "worms", "leaves"]


ADJECTIVES = ["young", "old", "wild", "tame", "small"]


def toy_names(n: int) -> list[str]:
    """`n` distinct animals: the plain ones first, then adjective + animal."""
    names = ANIMALS + [f"{a} {b}" for a in ADJECTIVES for b in ANIMALS]
    if n > len(names):
        raise ValueError(f"at most {len(names)} toy queries")
    return names[:n]


def write_toy_beir(root: Path, n: int = 16, grade: int = 1) -> Path:
    """`n` queries ("what does the X eat"), each with one relevant document among 2n, in
    BEIR layout; `grade` is the relevance it is judged with (TREC DL counts >= 2)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    docs, queries, qrels = [], [], ["query-id\tcorpus-id\tscore"]
    for i, animal in enumerate(toy_names(n)):
        food = FOODS[i % len(FOODS)]
        docs.append(
            {"_id": f"d{i}", "title": f"The {animal}", "text": f"The {animal} eats {food}."}
        )
        # A distractor that shares the food but not the animal: a hard negative for BM25.
        other = FOODS[(i + 3) % len(FOODS)]
        docs.append({"_id": f"x{i}", "title": "", "text": f"Many animals eat {other} and {food}."})
        queries.append({"_id": f"q{i}", "text": f"what does the {animal} eat"})
        qrels.append(f"q{i}\td{i}\t{grade}")
    (root / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (root / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries) + "\n")
    (root / "qrels" / "train.tsv").write_text("\n".join(qrels) + "\n")
    (root / "qrels" / "test.tsv").write_text("\n".join(qrels[:3]) + "\n")
    return root


def edit_weights(src: Path, dst: Path, change: Callable[[dict], None]) -> Path:
    """A copy of checkpoint folder `src` at `dst` whose weights `change` edited in place."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    change(weights)
    save_file(weights, str(dst / "model.safetensors"))
    return dst

"""`rerankd train` and `rerankd distill`: flags -> `TrainConfig` -> `train()`.

Both print a one-line JSON summary at the end (the per-epoch detail is in the output
folder's `train_log.jsonl`) and exit 2 with a message on a refused setup (evaluation data,
a mismatched resume, nonsense flags).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from rerankd.engine.models.bert import DEFAULT_LORA_TARGETS, LORA_TARGETS, POOLINGS
from rerankd.train.losses import DISTILL_LOSSES


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer indices: {text!r}"
        ) from None


def _targets(text: str) -> tuple[str, ...]:
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(LORA_TARGETS)}, got {text!r}")
    return targets


def _common(p: argparse.ArgumentParser, *, lr: float, ce_weight: float) -> None:
    """Flags every run shares: data, optimisation, budget, reproducibility."""
    d = p.add_argument_group("data")
    d.add_argument("--dataset", type=Path, required=True, help="a BEIR-layout folder")
    d.add_argument("--split", default="train", help="qrels split to train on (test is refused)")
    d.add_argument(
        "--miner",
        default="bm25",
        help="first stage for hard negatives: bm25, dense[:SRC], sparse[:SRC], run:PATH",
    )
    d.add_argument("--negatives", type=_positive_int, default=7, help="hard negatives per group")
    d.add_argument("--depth", type=_positive_int, default=30, help="negatives come from top N")
    d.add_argument("--skip-top", type=int, default=0, help="skip the first N candidates")
    d.add_argument("--max-queries", type=_positive_int, help="first N judged queries only")
    d.add_argument("--max-docs", type=_positive_int, help="cap the corpus (judged docs kept)")
    d.add_argument("--dev-queries", type=int, default=50, help="train queries held apart for dev")
    d.add_argument("--dev-candidates", type=_positive_int, default=30, help="dev rerank depth")
    d.add_argument(
        "--dev-seed",
        type=int,
        help="seed that picks the dev queries (default: --seed); keep it fixed across runs "
        "compared on dev or fused on it (rerankd eval --dev-seed)",
    )
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=_positive_int, default=1)
    o.add_argument("--lr", type=float, default=lr)
    o.add_argument("--batch-groups", type=_positive_int, default=8, help="groups per step")
    o.add_argument("--max-length", type=_positive_int, default=256, help="tokens per pair")
    o.add_argument("--warmup", type=float, default=0.1, help="share of steps warming up")
    o.add_argument("--weight-decay", type=float, default=0.01)
    o.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm (0 = off)")
    o.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU")
    o.add_argument(
        "--freeze-embeddings", action="store_true", help="keep the word embeddings fixed"
    )
    o.add_argument("--ce-weight", type=float, default=ce_weight, help="listwise CE on labels")
    o.add_argument(
        "--distill-loss",
        choices=DISTILL_LOSSES,
        default="kl",
        help="kl: softmax over each group; margin-mse: positive-vs-negative margins; mse: raw "
        "scores; ranknet: every pair's order (weighs close calls below the top as much as "
        "the top)",
    )
    o.add_argument("--distill-weight", type=float, default=1.0)
    o.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="kl: softmax temperature; ranknet: teacher margins are divided by it (< 1 sharpens)",
    )
    r = p.add_argument_group("run")
    r.add_argument("--out", type=Path, required=True, help="output (and checkpoint) folder")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--max-minutes", type=float, help="stop after the step crossing this, and save")
    r.add_argument("--max-steps", type=_positive_int, help="stop after this many steps, and save")
    r.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps")
    r.add_argument("--dev-every", type=int, default=0, help="also log dev every N steps")
    r.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    r.add_argument("--threads", type=int, default=0, help="torch threads (0 = one per core)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")


def _config_kwargs(ns: argparse.Namespace) -> dict:
    return {
        "dataset": ns.dataset,
        "out": ns.out,
        "split": ns.split,
        "miner": ns.miner,
        "negatives": ns.negatives,
        "depth": ns.depth,
        "skip_top": ns.skip_top,
        "max_queries": ns.max_queries,
        "max_docs": ns.max_docs,
        "dev_queries": ns.dev_queries,
        "dev_candidates": ns.dev_candidates,
        "dev_seed": ns.dev_seed,
        "epochs": ns.epochs,
        "lr": ns.lr,
        "batch_groups": ns.batch_groups,
        "max_length": ns.max_length,
        "warmup": ns.warmup,
        "weight_decay": ns.weight_decay,
        "grad_clip": ns.grad_clip,
        "bf16": ns.bf16,
        "freeze_embeddings": ns.freeze_embeddings,
        "ce_weight": ns.ce_weight,
        "distill_loss": ns.distill_loss,
        "distill_weight": ns.distill_weight,
        "temperature": ns.temperature,
        "seed": ns.seed,
        "max_minutes": ns.max_minutes,
        "max_steps": ns.max_steps,
        "save_every": ns.save_every,
        "dev_every": ns.dev_every,
        "resume": ns.resume,
        "threads": ns.threads,
        "progress": not ns.no_progress,
    }


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rerankd train",
        description="Fine-tune a cross-encoder on (query, positive, hard negatives) groups "
        "from a BEIR train split; the output folder is servable with `rerankd serve --model`.",
    )
    p.add_argument(
        "--backbone",
        default="bundled:all-minilm-l6-v2",
        help="bundled:all-minilm-l6-v2, bundled:splade-tiny, a shipped reranker "
        "(rerankd-minilm-l6: fine-tune the default on your qrels), or a BERT-family folder "
        "(a bare encoder gets a head drawn from --seed)",
    )
    p.add_argument("--teacher-scores", type=Path, help="teacher scores (qid did score) to distil")
    _common(p, lr=5e-5, ce_weight=1.0)
    return p


def distill_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rerankd distill",
        description="(a) teacher -> student: a shallower student initialised from the "
        "teacher's layers learns the teacher's scores; (b) --matryoshka: every depth k learns "
        "from depth k+1 (per-depth heads in the checkpoint) while the full depth learns labels.",
    )
    p.add_argument(
        "--teacher",
        help="teacher cross-encoder folder or shipped name, e.g. rerankd-minilm-l6 (student "
        "distillation)",
    )
    p.add_argument(
        "--student-layers", type=_positive_int, default=2, help="layers the student keeps"
    )
    p.add_argument(
        "--layer-map",
        type=_layers,
        help="teacher layers the student starts from, e.g. 0,5 (default: evenly spaced "
        "including the first and last)",
    )
    p.add_argument(
        "--student-init",
        help="start the student from this cross-encoder folder instead of teacher layers "
        "(e.g. the teacher's depth cut as a model of its own, to train it further), or from "
        "a bare encoder with the teacher's tokenizer (its head drawn from --seed)",
    )
    p.add_argument(
        "--student-pooling",
        choices=POOLINGS,
        help="what the student's head reads (default: as its --student-init's head does); "
        "cls lets the last layer run for [CLS] alone, query for the query segment "
        "([CLS] query [SEP]) alone and averages it, mean averages every token of it",
    )
    p.add_argument(
        "--queries",
        choices=("train", "pseudo", "both"),
        default="train",
        help="train queries, pseudo queries from document titles/leading sentences, or both",
    )
    p.add_argument("--pseudo-queries", type=int, default=500, help="how many pseudo queries")
    p.add_argument(
        "--long-pseudo-queries",
        type=int,
        default=0,
        help="how many long pseudo queries besides (30 to 120 words of a document's closing "
        "sentences), so a head reading the query segment sees long questions",
    )
    p.add_argument("--matryoshka", action="store_true", help="cascaded self-distillation")
    p.add_argument(
        "--model",
        help="cross-encoder (folder or shipped name) or backbone to train with --matryoshka",
    )
    p.add_argument("--cascade-loss", choices=DISTILL_LOSSES, default="kl")
    p.add_argument("--cascade-weight", type=float, default=1.0)
    p.add_argument(
        "--depth-ce-weight",
        type=float,
        default=0.0,
        help="also listwise CE on the labels at every sub-depth (0 = pure cascade)",
    )
    p.add_argument(
        "--depths",
        type=_layers,
        default=[],
        help="sub-depths to train, e.g. 2 or 2,4 (default: every depth below the full one); "
        "the cascade runs over these and the full depth, other depth heads are dropped",
    )
    p.add_argument(
        "--depth-pooling",
        choices=POOLINGS,
        default="mean",
        help="what the per-depth heads read: the token mean (default; at shallow depths [CLS] "
        "barely sees the document), the query segment's token mean, or the pooled [CLS]",
    )
    lora = p.add_argument_group("LoRA compensation (--matryoshka)")
    lora.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="rank of each depth's own LoRA updates (vertical compensation; 0 = none)",
    )
    lora.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 2 x rank)")
    lora.add_argument(
        "--lora-targets",
        type=_targets,
        default=DEFAULT_LORA_TARGETS,
        help=f"linears of each layer to adapt (default {','.join(DEFAULT_LORA_TARGETS)})",
    )
    lora.add_argument(
        "--lora-horizontal",
        type=float,
        default=0.0,
        metavar="KEEP_RATIO",
        help="also train the full depth pruned to this share of tokens from layer 2 on, "
        "with horizontal LoRA, against the unpruned scores (0 = off); on a --model that has "
        "vertical LoRA already (with --lora-freeze-base), only the new horizontal adapters "
        "train and every unpruned score stays as it was",
    )
    lora.add_argument(
        "--lora-freeze-base",
        action="store_true",
        help="train only the LoRA updates and per-depth heads (the full depth is unchanged)",
    )
    _common(p, lr=1e-4, ce_weight=0.0)
    return p


def _run(cfg: object) -> int:
    from rerankd.errors import RerankdError
    from rerankd.train.data import EvaluationDataError
    from rerankd.train.trainer import TrainingError, train

    logging.basicConfig(level="WARNING")
    try:
        result = train(cfg)  # type: ignore[arg-type]
    except (EvaluationDataError, TrainingError, RerankdError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    last = result.history[-1] if result.history else {}
    summary = {
        "out": str(result.out),
        "step": result.step,
        "epochs_done": result.epochs_done,
        "stopped": result.stopped,
        "initial_dev": result.initial_dev,
        "last_dev": result.last_dev,
        "last_epoch": {k: v for k, v in last.items() if k != "dev"},
    }
    print(json.dumps(summary))
    return 0


def main_train(argv: Sequence[str]) -> int:
    from rerankd.train.trainer import TrainConfig

    ns = train_parser().parse_args(argv)
    cfg = TrainConfig(
        backbone=ns.backbone,
        mode="train",
        teacher_scores=ns.teacher_scores,
        **_config_kwargs(ns),
    )
    return _run(cfg)


def _query_kwargs(p: argparse.ArgumentParser, ns: argparse.Namespace) -> dict:
    """`distill`'s query source, for both modes; pseudo counts only where they are used."""
    pseudo = ns.queries != "train"
    if ns.long_pseudo_queries and not pseudo:
        p.error("--long-pseudo-queries needs --queries pseudo or both")
    return {
        "query_source": ns.queries,
        "pseudo_queries": ns.pseudo_queries if pseudo else 0,
        "long_pseudo_queries": ns.long_pseudo_queries if pseudo else 0,
    }


def main_distill(argv: Sequence[str]) -> int:
    from rerankd.train.trainer import TrainConfig

    p = distill_parser()
    ns = p.parse_args(argv)
    if ns.matryoshka:
        if not ns.model:
            p.error("--matryoshka needs --model (the cross-encoder to make depth-elastic)")
        if ns.teacher:
            p.error("--matryoshka distils a model into itself; it takes no --teacher")
        kwargs = _config_kwargs(ns)
        if "--ce-weight" not in argv:
            kwargs["ce_weight"] = 1.0  # the full depth learns from labels
        cfg = TrainConfig(
            backbone=ns.model,
            mode="matryoshka",
            cascade_loss=ns.cascade_loss,
            cascade_weight=ns.cascade_weight,
            depth_ce_weight=ns.depth_ce_weight,
            matryoshka_depths=tuple(ns.depths),
            depth_pooling=ns.depth_pooling,
            lora_rank=ns.lora_rank,
            lora_alpha=ns.lora_alpha,
            lora_targets=ns.lora_targets,
            lora_horizontal=ns.lora_horizontal,
            lora_freeze_base=ns.lora_freeze_base,
            **kwargs,
            **_query_kwargs(p, ns),
        )
    else:
        if not ns.teacher:
            p.error("student distillation needs --teacher (or pass --matryoshka --model)")
        if any(a.startswith(("--lora-", "--depths", "--depth-pooling")) for a in argv):
            p.error("the --lora-*, --depths and --depth-pooling options are for --matryoshka")
        explicit = "--student-layers" in argv
        if ns.student_init and (explicit or ns.layer_map):
            p.error("--student-init gives the student's layers: drop --student-layers/--layer-map")
        if ns.layer_map and explicit and len(ns.layer_map) != ns.student_layers:
            p.error(
                f"--layer-map names {len(ns.layer_map)} layers, --student-layers says "
                f"{ns.student_layers}"
            )
        cfg = TrainConfig(
            backbone=ns.teacher,
            mode="student",
            teacher=ns.teacher,
            student_num_layers=len(ns.layer_map) if ns.layer_map else ns.student_layers,
            student_layers=ns.layer_map,
            student_init=ns.student_init,
            student_pooling=ns.student_pooling,
            **_config_kwargs(ns),
            **_query_kwargs(p, ns),
        )
    return _run(cfg)


def main_extract_depth(argv: Sequence[str]) -> int:
    """`rerankd extract-depth`: a Matryoshka model's depth cut as a servable model of its own
    (the starting point of `distill --student-init`, or a small model to ship)."""
    from rerankd.errors import RerankdError
    from rerankd.train.modeling import extract_depth, resolve_backbone

    p = argparse.ArgumentParser(
        prog="rerankd extract-depth",
        description="Write the first DEPTH layers of a Matryoshka cross-encoder, with that "
        "depth's head and LoRA folded in, as a model that scores as the source at DEPTH.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="Matryoshka cross-encoder: a folder or a shipped model's name (rerankd-minilm-l6)",
    )
    p.add_argument("--depth", type=_positive_int, required=True, help="layers to keep")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    ns = p.parse_args(argv)
    try:
        out = extract_depth(resolve_backbone(ns.model), ns.depth, ns.out)
    except (RerankdError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


def main_graft_depth(argv: Sequence[str]) -> int:
    """`rerankd graft-depth`: the inverse of `extract-depth`. A k-layer model (typically
    that cut, distilled further with every weight free) becomes the Matryoshka model's
    depth k: its difference from the first k layers as that depth's LoRA (truncated SVD)
    and deltas, its head as that depth's head; the full depth is unchanged (see
    `rerankd.train.graft`)."""
    from rerankd.errors import RerankdError
    from rerankd.train.graft import graft_depth
    from rerankd.train.modeling import resolve_backbone

    p = argparse.ArgumentParser(
        prog="rerankd graft-depth",
        description="Write the Matryoshka cross-encoder MODEL with depth k (k = the "
        "STUDENT's layer count) replaced by STUDENT: depth k's LoRA becomes the rank-R SVD "
        "of the STUDENT's matrices minus MODEL's, its deltas the STUDENT's other tensors "
        "minus MODEL's (biases, LayerNorms, embeddings but the word embeddings), depth k's "
        "head the STUDENT's head. The full depth scores as before. Prints what the rank "
        "kept, what the deltas carry and what was left out.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="Matryoshka cross-encoder: a folder or a shipped model's name (rerankd-minilm-l6)",
    )
    p.add_argument(
        "--student",
        required=True,
        help="the k-layer cross-encoder to graft (a folder or a shipped name: rerankd-tiny-l2)",
    )
    p.add_argument(
        "--rank",
        type=_positive_int,
        help="depth k's LoRA rank (default: the rank depth k has in MODEL, else MODEL's; 16 "
        "for a MODEL without LoRA); MODEL's other adapters keep theirs",
    )
    p.add_argument(
        "--no-deltas",
        action="store_true",
        help="carry the matrices' LoRA alone, no per-depth deltas (before session 19)",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    ns = p.parse_args(argv)
    try:
        out, report = graft_depth(
            resolve_backbone(ns.model),
            resolve_backbone(ns.student),
            ns.out,
            ns.rank,
            deltas=not ns.no_deltas,
        )
    except (RerankdError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.describe()))
    print(out)
    return 0

"""The training loop behind `rerankd train` and `rerankd distill`.

One loop serves three objectives (`TrainConfig.mode`):

- `train`: listwise softmax CE on (query, positive, hard negatives) groups, plus optional
  distillation from a teacher-score file (KL, margin-MSE or MSE).
- `student`: a shallower student (initialised from the teacher's layers) learns the scores a
  teacher cross-encoder computes on the same groups, online.
- `matryoshka`: cascaded self-distillation: the full depth learns from labels, every depth k
  (its own head, see `modeling`) learns depth k+1's scores, detached. With `lora_rank`,
  every depth k also gets its own LoRA compensation (its scores then come from a pass of
  k layers with that LoRA, as served); with `lora_horizontal` s, the full depth pruned to
  the share s of tokens from layer 2 on (with the horizontal LoRA) learns the unpruned
  full depth's scores too. Given a finished model with vertical LoRA, `lora_horizontal`
  adds the horizontal adapters and trains them alone (`Trainer._extend_lora`).

What every run guarantees, and why:

- *Seeded and reproducible.* Groups, negatives and their order are pure functions of
  (seed, epoch); the model has no dropout; so two runs with one config compute the same
  steps on the same machine.
- *Resumable exactly.* A checkpoint is the servable model folder plus `trainer_state.json`
  / `trainer_state.safetensors` (optimizer moments, step, position in the epoch, RNG
  states, the epoch's running loss). `--resume` rebuilds the epoch's groups and skips the
  batches already done, so an interrupted run ends where an uninterrupted one would
  (bitwise on the same machine and thread count). A resume with a config that would change
  the trajectory is refused, naming the fields.
- *Bounded.* `--max-minutes` stops after the step that crosses the budget and saves;
  `--max-queries` / `--max-docs` bound the data.
- *Logged.* `train_log.jsonl` in the output folder: config, data statistics (with the qrels
  checksum), the dev metric of the untrained model, then per epoch the mean loss and the dev
  NDCG@10 / MRR@10 on held-apart *train* queries (never on test), and why the run stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from rerankd.engine.checkpoint import read_weights
from rerankd.engine.limits import resolve_keep_schedule
from rerankd.engine.loading import head_poolings
from rerankd.engine.models.bert import DEFAULT_LORA_TARGETS, KEEP, LORA_TARGETS, POOLINGS
from rerankd.eval.metrics import evaluate, spearman
from rerankd.train.data import (
    Group,
    TrainingData,
    check_trainable,
    dump_json,
    load_training_data,
    qrels_text,
)
from rerankd.train.losses import DISTILL_LOSSES, distill, listwise_ce
from rerankd.train.modeling import (
    TrainableReranker,
    default_student_layers,
    encode_batch,
    head_depths,
    load_trainable,
    pair_encoder,
    prepare_init,
    same_tokenization,
    save_model_folder,
    save_safetensors,
    split_depth_heads,
    student_from_teacher,
    write_json,
)
from rerankd.types import LongDocs, RerankOptions

MODES = ("train", "student", "matryoshka")
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LOG_FILE = "train_log.jsonl"
DEV_METRICS = ("ndcg@10", "mrr@10")
STATE_VERSION = 1


class TrainingError(RuntimeError):
    """A run that cannot start or resume as asked (the message says what to change)."""


@dataclass
class TrainConfig:
    """Everything a run depends on. Fields in `RUN_CONTROL` steer *this invocation* only
    (budget, resume, threads, progress); all others define the trajectory and must match
    on `--resume`."""

    dataset: Path
    out: Path
    backbone: str = "bundled:all-minilm-l6-v2"
    mode: str = "train"
    split: str = "train"
    epochs: int = 1
    lr: float = 5e-5
    batch_groups: int = 8
    negatives: int = 7
    #: negatives are drawn from the first stage's top `depth` (minus the positives)
    depth: int = 30
    skip_top: int = 0
    max_length: int = 256
    seed: int = 0
    warmup: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    bf16: bool = False
    #: keep the word-embedding table fixed: on a small train set it is most of the parameters
    #: (3.9 M of SPLADE-tiny's 4.4 M) and the first to overfit, and on 2 cores its dense
    #: gradient and AdamW update are a large share of a step
    freeze_embeddings: bool = False
    miner: str = "bm25"
    dev_queries: int = 50
    dev_candidates: int = 30
    #: the seed that picks the held-apart dev queries (None: `seed`). Runs compared on dev,
    #: and the fusion fitted on their dev queries (`rerankd eval --dev-seed`), must share it:
    #: a run with another `seed` would otherwise train on the queries the others hold apart
    dev_seed: int | None = None
    max_queries: int | None = None
    max_docs: int | None = None
    teacher_scores: Path | None = None
    ce_weight: float = 1.0
    distill_loss: str = "kl"
    distill_weight: float = 1.0
    temperature: float = 1.0
    # student distillation
    teacher: str | None = None
    #: how many layers the student keeps, and optionally which (teacher layer indices)
    student_num_layers: int = 2
    student_layers: list[int] | None = None
    #: a cross-encoder folder to start the student from instead of teacher layers
    student_init: str | None = None
    #: what the student's head reads: "cls", "mean" or "query" (`bert.POOLINGS`; None: as
    #: its init's head does)
    student_pooling: str | None = None
    query_source: str = "train"
    pseudo_queries: int = 0
    #: long pseudo queries (a document's closing sentences, 30 to 120 words) on top of
    #: the title ones: a head that reads the query segment learns long questions from them
    long_pseudo_queries: int = 0
    # matryoshka
    cascade_loss: str = "kl"
    cascade_weight: float = 1.0
    #: also listwise CE on the labels at every sub-depth (0 = the sub-depths learn only
    #: from the next larger depth, the pure cascade; the chain then reaches the shallow
    #: heads slowly: after one SciFact epoch depth 2 was still below its untrained head)
    depth_ce_weight: float = 0.0
    #: the sub-depths trained, each with its own head (and LoRA, if any); () = every depth
    #: 1..L-1. The cascade runs over these and the full depth, so `(2,)` makes depth 2 learn
    #: from the full model directly; fewer depths also cost less (with vertical LoRA each
    #: trained depth k is a k-layer pass of its own). Heads of other depths are dropped.
    matryoshka_depths: tuple[int, ...] = ()
    #: what the per-depth heads read: "mean" (token mean), "query" (the query segment's
    #: token mean) or "cls" (pooled [CLS], as the full depth). Mean by default: at shallow
    #: depths [CLS] barely sees the document (`rerankd.engine.models.bert.MEAN_POOLING`)
    depth_pooling: str = "mean"
    #: LoRA compensation (matryoshka): rank (0 = none), alpha (None = 2 x rank), targets
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    #: keep ratio of the pruned configuration trained with horizontal LoRA (0 = none)
    lora_horizontal: float = 0.0
    #: train only the LoRA updates and per-depth heads; the full-depth model stays as is
    lora_freeze_base: bool = False
    # run control
    max_minutes: float | None = None
    max_steps: int | None = None
    save_every: int = 0
    #: also log the dev metric every N steps (0 = at epoch ends only)
    dev_every: int = 0
    resume: bool = False
    threads: int = 0
    progress: bool = True

    RUN_CONTROL = frozenset(
        {
            "out",
            "max_minutes",
            "max_steps",
            "save_every",
            "dev_every",
            "resume",
            "threads",
            "progress",
        }
    )

    def trajectory(self) -> dict[str, Any]:
        """The fields that decide what is computed, JSON-ready (compared on `--resume`)."""
        return json.loads(
            dump_json(
                {
                    f.name: getattr(self, f.name)
                    for f in dataclasses.fields(self)
                    if f.name not in self.RUN_CONTROL
                }
            )
        )

    @classmethod
    def default_trajectory(cls) -> dict[str, Any]:
        """The trajectory fields' defaults, JSON-ready: a run saved before a field existed
        ran with its default, so `--resume` compares a missing field against that."""
        return json.loads(
            dump_json(
                {
                    f.name: f.default
                    for f in dataclasses.fields(cls)
                    if f.name not in cls.RUN_CONTROL and f.default is not dataclasses.MISSING
                }
            )
        )

    @property
    def lora_alpha_value(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank

    def validate(self) -> None:
        """Refuse nonsense before minutes of data loading."""
        if self.mode not in MODES:
            raise TrainingError(f"mode must be one of {MODES}, got {self.mode!r}")
        self._validate_lora()
        self._validate_depths()
        positive = {
            "epochs": self.epochs,
            "batch_groups": self.batch_groups,
            "negatives": self.negatives,
            "max_length": self.max_length,
            "dev_candidates": self.dev_candidates,
        }
        for name, value in positive.items():
            if value < 1:
                raise TrainingError(f"{name} must be >= 1, got {value}")
        if self.lr <= 0:
            raise TrainingError(f"lr must be > 0, got {self.lr}")
        if min(self.pseudo_queries, self.long_pseudo_queries) < 0:
            raise TrainingError("pseudo_queries and long_pseudo_queries must be >= 0")
        if self.depth < self.negatives + self.skip_top:
            raise TrainingError(
                f"depth {self.depth} leaves fewer than {self.negatives} candidates after "
                f"skip_top {self.skip_top}; raise --depth"
            )
        for name in ("distill_loss", "cascade_loss"):
            if getattr(self, name) not in DISTILL_LOSSES:
                raise TrainingError(f"{name} must be one of {DISTILL_LOSSES}")
        if self.mode == "student" and not self.teacher:
            raise TrainingError("student distillation needs a teacher cross-encoder folder")
        if self.student_init and self.mode != "student":
            raise TrainingError("student_init is for student distillation")
        if self.student_pooling is not None:
            if self.mode != "student":
                raise TrainingError("student_pooling is for student distillation")
            if self.student_pooling not in POOLINGS:
                raise TrainingError(
                    f"student_pooling must be one of {POOLINGS}, got {self.student_pooling!r}"
                )
        uses_labels = self.ce_weight > 0
        uses_teacher = (self.teacher_scores is not None or self.mode == "student") and (
            self.distill_weight > 0
        )
        if not (uses_labels or uses_teacher):
            raise TrainingError("every loss term is off: set --ce-weight or a teacher")
        label_free = self.mode == "student" or (
            self.mode == "matryoshka" and self.lora_freeze_base and self.depth_ce_weight == 0
        )
        if self.query_source != "train" and not label_free:
            raise TrainingError(
                "pseudo queries have no labels: they are for student distillation, or for "
                "--matryoshka with --lora-freeze-base and --depth-ce-weight 0 (the sub-depths "
                "then learn only the full depth's scores)"
            )
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise TrainingError("max_minutes must be > 0")

    def _validate_depths(self) -> None:
        if self.depth_pooling not in POOLINGS:
            raise TrainingError(
                f"depth_pooling must be one of {POOLINGS}, got {self.depth_pooling!r}"
            )
        if self.matryoshka_depths and self.mode != "matryoshka":
            raise TrainingError("matryoshka depths are for Matryoshka distillation")
        if len(set(self.matryoshka_depths)) != len(self.matryoshka_depths):
            raise TrainingError(f"repeated matryoshka depth in {list(self.matryoshka_depths)}")

    def _validate_lora(self) -> None:
        if self.lora_rank < 0:
            raise TrainingError(f"lora_rank must be >= 0 (0 = no LoRA), got {self.lora_rank}")
        if not self.lora_rank and not self.lora_horizontal and not self.lora_freeze_base:
            return
        if self.mode != "matryoshka":
            raise TrainingError("the --lora-* options are for Matryoshka distillation")
        if not 0.0 <= self.lora_horizontal < 1.0:
            raise TrainingError(f"lora_horizontal must be in [0, 1), got {self.lora_horizontal}")
        if self.lora_horizontal and not self.lora_rank:
            raise TrainingError("--lora-horizontal needs --lora-rank")
        if self.lora_rank and not self.lora_alpha_value > 0:
            raise TrainingError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown or not self.lora_targets:
            raise TrainingError(
                f"lora_targets must be some of {list(LORA_TARGETS)}, got {list(self.lora_targets)}"
            )


#: `model_info["trains"]` of a run that adds horizontal LoRA to a finished model
HORIZONTAL_ONLY = "horizontal LoRA only"


@dataclass
class _State:
    """Where a run is: saved with every checkpoint, restored by `--resume`."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    epoch_loss_sum: float = 0.0
    epoch_part_sums: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    initial_dev: dict[str, Any] | None = None
    #: dev figures of the model as last saved (set at epoch ends and at a mid-epoch stop)
    last_dev: dict[str, Any] | None = None
    finished: bool = False


@dataclass
class TrainResult:
    """What a run did: the folder, where it stopped and the per-epoch figures."""

    out: Path
    step: int
    epochs_done: int
    stopped: str
    initial_dev: dict[str, Any] | None
    history: list[dict[str, Any]]
    last_dev: dict[str, Any] | None = None


# -- helpers -------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed every global generator (our own draws use local seeded ones anyway)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_at(step: int, total: int, base: float, warmup: float) -> float:
    """Linear warmup over `warmup` of the steps, then linear decay to 0 at `total`.

    A pure function of the step so a resumed run needs no scheduler state.
    """
    warm = max(1, round(total * warmup)) if warmup > 0 else 0
    if step < warm:
        return base * (step + 1) / warm
    return base * max(0.0, (total - step) / max(1, total - warm))


def _param_groups(module: TrainableReranker, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases and LayerNorm weights (the usual BERT recipe)."""
    decay, plain = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (plain if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]


class RunLog:
    """Append-only JSONL log: one event per line, flushed at once (a killed run keeps it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, event: str, **fields: Any) -> None:
        record = {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(dump_json(record) + "\n")


def read_log(out: Path) -> list[dict[str, Any]]:
    """The events of a run's log, in order."""
    path = Path(out) / LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- the trainer ---------------------------------------------------------------------------------


class Trainer:
    """One run. `run()` trains (or resumes) and returns a `TrainResult`."""

    def __init__(self, cfg: TrainConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.started = time.monotonic()
        self.log = RunLog(self.out / LOG_FILE)
        self.teacher: TrainableReranker | None = None
        #: the frozen teacher's scores of each dev query's candidates (`_dev`)
        self._teacher_dev: dict[str, np.ndarray] = {}

    # -- setup ---------------------------------------------------------------------------------

    def _check_resume(self) -> dict[str, Any] | None:
        state_path = self.out / STATE_JSON
        if not self.cfg.resume:
            if state_path.exists():
                raise TrainingError(
                    f"{self.out} holds a training run already; pass --resume to continue it "
                    "or choose another --out"
                )
            return None
        if not state_path.exists():
            raise TrainingError(f"--resume: no {STATE_JSON} in {self.out}")
        saved = json.loads(state_path.read_text())
        if saved.get("version") != STATE_VERSION:
            raise TrainingError(f"{state_path} has state version {saved.get('version')}")
        now = self.cfg.trajectory()
        before = self.cfg.default_trajectory() | saved["config"]
        diff = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
        if diff:
            detail = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in diff)
            raise TrainingError(
                "--resume with a different configuration would not continue the same run "
                f"({detail})"
            )
        return saved

    def _build_model(self, saved: dict[str, Any] | None, workdir: Path) -> dict[str, Any]:
        """The trainable module (and teacher); returns how the model was made, for the log."""
        cfg = self.cfg
        from rerankd.engine.models.config import ModelConfig

        teacher_dir: Path | None = None
        if cfg.mode == "student":
            teacher_dir, how = prepare_init(cfg.teacher or "", workdir / "teacher", cfg.seed)
            if how["head"] != "from checkpoint":
                raise TrainingError(
                    f"teacher {cfg.teacher!r} is a bare encoder: its scores would be noise; "
                    "pass a trained cross-encoder folder"
                )
            self.teacher = load_trainable(teacher_dir, depths=[]).eval().requires_grad_(False)
        if saved is not None:
            self.module = load_trainable(self.out)
            self.template = self.out
            info = saved["model_info"]
        elif teacher_dir is not None and cfg.student_init:
            # a bare encoder (e.g. a TinyBERT-shaped backbone) gets a seeded head: the
            # teacher's scores are what it learns, so no head has to be trained first
            init, info = prepare_init(cfg.student_init, workdir / "student", cfg.seed)
            # one tokenisation feeds teacher and student: their token ids must agree
            if not same_tokenization(init, teacher_dir):
                raise TrainingError(
                    f"--student-init {cfg.student_init!r} does not share the teacher's "
                    "tokenizer: start from a model with the teacher's vocabulary"
                )
            self.module = load_trainable(init, depths=[])
            self.template = init
            info = {**info, "init": str(cfg.student_init)}
            if cfg.student_pooling is not None:
                # a [CLS] head lets the last layer run for [CLS] alone (the speed of a
                # 2-layer student: `CrossEncoder.forward`); the init's head weights carry over
                self.module.set_head_pooling(cfg.student_pooling)
            # set here or inherited from the init: the log says what the head reads
            info["head_pooling"] = self.module.model.pooling(None)
        elif teacher_dir is not None:
            tcfg = ModelConfig.from_file(teacher_dir / "config.json")
            layers = cfg.student_layers or default_student_layers(
                tcfg.num_layers, cfg.student_num_layers
            )
            init = student_from_teacher(teacher_dir, layers, workdir / "student")
            self.module = load_trainable(init, depths=[])
            self.template = init
            info = {"init": str(teacher_dir), "teacher_layers": layers, "head": "teacher's"}
        else:
            init, info = prepare_init(cfg.backbone, workdir, cfg.seed)
            depths: list[int] | None = None
            if cfg.mode == "matryoshka":
                layers = ModelConfig.from_file(init / "config.json").num_layers
                depths = sorted(cfg.matryoshka_depths) or list(range(1, layers))
                if not depths:
                    raise TrainingError("a one-layer model has no sub-depths to distil into")
                if not all(0 < k < layers for k in depths):
                    raise TrainingError(
                        f"matryoshka depths must be in 1..{layers - 1} for a {layers}-layer "
                        f"model, got {list(cfg.matryoshka_depths)}"
                    )
            self.module = load_trainable(init, depths=depths)
            self.template = init
            if cfg.mode == "matryoshka":
                self.module.set_pooling(cfg.depth_pooling)
            if cfg.lora_rank and self.module.model.lora_spec is not None:
                info |= self._extend_lora(init)
            elif cfg.lora_rank:
                self.module.add_lora(
                    cfg.lora_rank,
                    cfg.lora_alpha_value,
                    cfg.lora_targets,
                    horizontal=cfg.lora_horizontal > 0,
                    seed=cfg.seed,
                )
        if cfg.freeze_embeddings:
            self.module.model.backbone.embeddings.word_embeddings.requires_grad_(False)
        if info.get("trains") == HORIZONTAL_ONLY:
            self.module.train_only(f"lora_{KEEP}.")
        elif cfg.lora_freeze_base:
            self.module.freeze_base()
        mcfg = self.module.config
        #: the pruned configuration trained with horizontal LoRA (empty: none)
        self.keep = (
            resolve_keep_schedule(RerankOptions(keep_ratio=cfg.lora_horizontal), mcfg.num_layers)
            if cfg.lora_horizontal
            else ()
        )
        self.encoder = pair_encoder(self.template, mcfg)
        self.pad_id = mcfg.pad_token_id
        spec = self.module.model.lora_spec
        return info | {
            "layers": mcfg.num_layers,
            "hidden": mcfg.hidden_size,
            "parameters": sum(p.numel() for p in self.module.parameters()),
            "trainable_parameters": sum(
                p.numel() for p in self.module.parameters() if p.requires_grad
            ),
            "depth_heads": self.module.depths,
            "lora": spec.describe() if spec is not None else None,
        }

    def _extend_lora(self, init: Path) -> dict[str, Any]:
        """Horizontal LoRA onto a finished Matryoshka model with vertical LoRA only: the
        new `lora_keep` adapters are all that trains. The base, the heads and the vertical
        updates stay bit-identical, so every unpruned configuration scores as before and
        its figures (and a student cut from it) stay valid."""
        cfg, model = self.cfg, self.module.model
        spec = model.lora_spec
        assert spec is not None
        if spec.horizontal or not cfg.lora_horizontal:
            raise TrainingError(
                f"{init} has LoRA compensation already; train from its base model (or "
                "continue that run with --resume). Only horizontal LoRA (--lora-horizontal) "
                "can be added to a model whose LoRA is vertical only"
            )
        if not cfg.lora_freeze_base:
            raise TrainingError(
                "adding horizontal LoRA to a model with LoRA trains the new adapters alone: "
                "pass --lora-freeze-base"
            )
        if (spec.rank, spec.alpha) != (cfg.lora_rank, cfg.lora_alpha_value):
            raise TrainingError(
                f"--lora-rank/--lora-alpha {cfg.lora_rank}/{cfg.lora_alpha_value} differ from "
                f"{init}'s {spec.rank}/{spec.alpha}: one model has one LoRA scale"
            )
        held = self.module.depths
        folder_heads = head_depths(split_depth_heads(read_weights(init))[1])
        if held != folder_heads:
            raise TrainingError(
                f"{init} has heads for depths {folder_heads}: pass --depths "
                f"{','.join(map(str, folder_heads))} (adding horizontal LoRA changes no head)"
            )
        folder_pooling = head_poolings(init, self.module.config, held)
        if held and (want := folder_pooling.get(held[0], "cls")) != cfg.depth_pooling:
            raise TrainingError(
                f"{init}'s depth heads are {want}-pooled: pass --depth-pooling {want} "
                "(adding horizontal LoRA changes no head)"
            )
        self.module.add_lora(
            spec.rank,
            spec.alpha,
            cfg.lora_targets,
            horizontal=True,
            seed=cfg.seed,
            vertical=False,
        )
        return {"trains": HORIZONTAL_ONLY}

    # -- batches and losses --------------------------------------------------------------------

    def _inputs(
        self, query_docs: Sequence[tuple[str, Sequence[str]]], protected: bool = False
    ) -> dict[str, torch.Tensor]:
        return encode_batch(
            self.encoder, self.pad_id, query_docs, self.cfg.max_length, with_protected=protected
        )

    def _pruned(
        self, module: TrainableReranker, inputs: dict[str, torch.Tensor], protected: torch.Tensor
    ) -> torch.Tensor:
        """Full-depth scores with `self.keep`'s token pruning (and so the horizontal LoRA):
        exactly what the engine computes for a request with that keep ratio."""
        return module.model.forward_pruned(**inputs, keep=self.keep, protected=protected)

    def _autocast(self) -> Any:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def _loss(self, groups: list[Group]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, data = self.cfg, self.data
        b, g = len(groups), 1 + cfg.negatives
        inputs = self._inputs(
            [(gr.query, [data.corpus[d] for d in gr.doc_ids]) for gr in groups],
            protected=bool(self.keep),
        )
        protected = inputs.pop("protected", None)
        pruned: torch.Tensor | None = None
        with self._autocast():
            if protected is not None:
                pruned = self._pruned(self.module, inputs, protected).float().view(b, g)
            if cfg.mode == "matryoshka":
                all_depths = self.module.forward_depths(**inputs).float().view(-1, b, g)
                scores = all_depths[-1]
            else:
                scores = self.module(**inputs).float().view(b, g)
        parts: dict[str, torch.Tensor] = {}
        # a frozen full depth learns nothing from the labels (and pseudo queries have none)
        if cfg.ce_weight > 0 and not cfg.lora_freeze_base:
            parts["ce"] = cfg.ce_weight * listwise_ce(scores)
        if data.teacher is not None and cfg.distill_weight > 0:
            t = torch.tensor(
                [
                    [data.teacher.get(gr.qid, {}).get(d, math.nan) for d in gr.doc_ids]
                    for gr in groups
                ]
            )
            ok = torch.isfinite(t).all(dim=1)
            if ok.any():
                parts["distill"] = cfg.distill_weight * distill(
                    cfg.distill_loss, scores[ok], t[ok], cfg.temperature
                )
        if self.teacher is not None and cfg.distill_weight > 0:
            with torch.no_grad(), self._autocast():
                t = self.teacher(**inputs).float().view(b, g)
            parts["distill"] = cfg.distill_weight * distill(
                cfg.distill_loss, scores, t, cfg.temperature
            )
        if cfg.mode == "matryoshka":
            cascade = sum(
                distill(
                    cfg.cascade_loss, all_depths[i], all_depths[i + 1].detach(), cfg.temperature
                )
                for i in range(all_depths.shape[0] - 1)
            )
            parts["cascade"] = cfg.cascade_weight * cascade
            if pruned is not None:  # pruning learns from the unpruned full depth
                parts["horizontal"] = cfg.cascade_weight * distill(
                    cfg.cascade_loss, pruned, scores.detach(), cfg.temperature
                )
            if cfg.depth_ce_weight > 0:
                subs = [listwise_ce(all_depths[i]) for i in range(all_depths.shape[0] - 1)]
                parts["depth_ce"] = cfg.depth_ce_weight * sum(subs) / len(subs)
        loss = sum(parts.values(), torch.zeros(()))
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    # -- dev metric ----------------------------------------------------------------------------

    @torch.no_grad()
    def _dev(self, module: TrainableReranker, with_depths: bool = True) -> dict[str, Any]:
        """NDCG@10 / MRR@10 of reranking the first stage's top `dev_candidates` for the dev
        slice of train queries; per depth (and pruned) for Matryoshka models, each with its
        mean per-query Spearman against the full depth's scores (and a student's against its
        teacher's): the Matryoshka and student targets are about tracking the larger model's
        order, which NDCG@10 alone does not show."""
        data = self.data
        if not data.dev_qids:
            return {}
        module.eval()
        depths = module.depths if with_depths else []
        pruned = bool(self.keep) and module is self.module
        runs: dict[str, dict[str, list[str]]] = {}
        rhos: dict[str, list[float]] = {}
        labels = [f"depth{k}" for k in depths] + ["full"] + (["pruned"] if pruned else [])
        full = len(depths)
        # a student's order against its teacher's, on the same candidates
        teacher = self.teacher if module is not self.teacher else None
        to_teacher: list[float] = []
        for qid in data.dev_qids:
            docs = data.candidates.get(qid, [])[: self.cfg.dev_candidates]
            if not docs:
                for name in labels:
                    runs.setdefault(name, {})[qid] = []
                continue
            inputs = self._inputs(
                [(data.queries[qid], [data.corpus[d] for d in docs])], protected=pruned
            )
            protected = inputs.pop("protected", None)
            with self._autocast():
                if depths:
                    rows = module.forward_depths(**inputs).float()
                else:
                    rows = module(**inputs).float()[None]
                if protected is not None:
                    keep = self._pruned(module, inputs, protected).float()
                    rows = torch.cat([rows, keep[None]])
                t = None
                if teacher is not None:  # frozen: scored once per dev query, then reused
                    if qid not in self._teacher_dev:
                        self._teacher_dev[qid] = teacher(**inputs).float().numpy()
                    t = self._teacher_dev[qid]
            rows_np = rows.numpy()
            if t is not None and (rho := spearman(rows_np[full].tolist(), t.tolist())) is not None:
                to_teacher.append(rho)
            for k, (name, row) in enumerate(zip(labels, rows_np, strict=True)):
                order = np.argsort(-row, kind="stable")
                runs.setdefault(name, {})[qid] = [docs[i] for i in order]
                rho = spearman(row.tolist(), rows_np[full].tolist()) if k != full else None
                if rho is not None:
                    rhos.setdefault(name, []).append(rho)
        module.train()
        out = {name: evaluate(run, data.qrels, DEV_METRICS).means for name, run in runs.items()}
        for name, values in rhos.items():  # how closely a cut tracks the full model's order
            out[name]["spearman_vs_full"] = float(np.mean(values))
        result: dict[str, Any] = out.pop("full")
        if to_teacher:
            result["spearman_vs_teacher"] = float(np.mean(to_teacher))
        if pruned:  # the full depth at keep ratio `lora_horizontal`
            result["pruned"] = out.pop("pruned")
        if out:
            result["depths"] = out
        return result

    def _first_stage_dev(self) -> dict[str, float]:
        data = self.data
        run = {q: data.candidates.get(q, [])[: self.cfg.dev_candidates] for q in data.dev_qids}
        return evaluate(run, data.qrels, DEV_METRICS).means if run else {}

    # -- checkpoints ---------------------------------------------------------------------------

    def _save(self, state: _State, reason: str) -> None:
        """Model folder first, then optimizer/RNG tensors, then the JSON that names the step:
        each file carries the step, so a save torn by a crash is detected on resume."""
        step = str(state.step)
        info = {
            "trained_by": f"rerankd {self.cfg.mode}",
            "step": state.step,
            "epochs_done": state.epoch,
            "model": self.model_info,
            "last_dev": state.last_dev,
            "seed": self.cfg.seed,
            "data": self.data.stats(),
            # tokens per pair it learned on: the serving default (`Reranker`, max_length 0)
            "max_length": self.cfg.max_length,
            # it learned on each document's first window: the serving default too
            "long_docs": LongDocs.TRUNCATE.value,
        }
        save_model_folder(self.out, self.module, self.template, info, {"rerankd_step": step})
        self.template = self.out
        opt = self.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        for idx, st in opt["state"].items():
            for key, value in st.items():
                tensors[f"optimizer.{idx}.{key}"] = torch.as_tensor(value).clone().contiguous()
        tensors["rng.torch"] = torch.get_rng_state().clone()
        np_state = np.random.get_state()
        tensors["rng.numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
        save_safetensors(self.out / STATE_TENSORS, tensors, {"rerankd_step": step})
        payload = {
            "version": STATE_VERSION,
            "config": self.cfg.trajectory(),
            "model_info": self.model_info,
            "param_names": [n for n, _ in self.module.named_parameters()],
            "optimizer_param_groups": [
                {k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
                for g in opt["param_groups"]
            ],
            "rng_python": random.getstate(),
            "rng_numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "state": dataclasses.asdict(state),
            "reason": reason,
        }
        write_json(self.out / STATE_JSON, payload)
        self.log.write("checkpoint", step=state.step, epoch=state.epoch, reason=reason)

    def _restore(self, saved: dict[str, Any]) -> _State:
        step = str(saved["state"]["step"])
        tensors = load_file(str(self.out / STATE_TENSORS))
        from safetensors import safe_open

        for path in (self.out / STATE_TENSORS, self.out / "model.safetensors"):
            with safe_open(str(path), "pt") as fh:
                got = (fh.metadata() or {}).get("rerankd_step")
            if got != step:
                raise TrainingError(
                    f"{path.name} holds step {got} but {STATE_JSON} step {step}: the last save "
                    "was interrupted; the run cannot resume exactly"
                )
        names = [n for n, _ in self.module.named_parameters()]
        if names != saved["param_names"]:
            raise TrainingError("the checkpoint's parameters do not match the model")
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, idx, name = key.split(".", 2)
                opt_state.setdefault(int(idx), {})[name] = value
        self.optimizer.load_state_dict(
            {"state": opt_state, "param_groups": saved["optimizer_param_groups"]}
        )
        torch.set_rng_state(tensors["rng.torch"])
        kind, pos, has_gauss, cached = saved["rng_numpy"]
        np.random.set_state(
            (kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached)
        )
        py = saved["rng_python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        return _State(**saved["state"])

    # -- the loop ------------------------------------------------------------------------------

    def _stop_reason(self, state: _State) -> str | None:
        cfg = self.cfg
        if cfg.max_steps is not None and state.step >= cfg.max_steps:
            return f"max steps ({cfg.max_steps})"
        if cfg.max_minutes is not None and time.monotonic() - self.started >= cfg.max_minutes * 60:
            return f"time budget ({cfg.max_minutes} min)"
        return None

    def run(self) -> TrainResult:
        cfg = self.cfg
        check_trainable(cfg.dataset, cfg.split)
        for extra in (cfg.teacher_scores,):
            if extra is not None:
                check_trainable(extra)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.out.mkdir(parents=True, exist_ok=True)
        saved = self._check_resume()
        seed_everything(cfg.seed)
        self.data: TrainingData = load_training_data(
            cfg.dataset,
            split=cfg.split,
            miner=cfg.miner,
            depth=cfg.depth,
            dev_queries=cfg.dev_queries,
            dev_candidates=cfg.dev_candidates,
            seed=cfg.seed,
            dev_seed=cfg.dev_seed,
            max_queries=cfg.max_queries,
            max_docs=cfg.max_docs,
            teacher_scores=cfg.teacher_scores,
            query_source=cfg.query_source,
            pseudo_queries=cfg.pseudo_queries,
            long_pseudo_queries=cfg.long_pseudo_queries,
        )
        with tempfile.TemporaryDirectory(prefix="rerankd-train-") as tmp:
            self.model_info = self._build_model(saved, Path(tmp))
            # Write the starting folder now, so the temporary template can go.
            if saved is None:
                save_model_folder(self.out, self.module, self.template, {"step": 0})
                self.template = self.out
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.module, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8
        )
        groups_per_epoch = len(self.data.groups_for_epoch(0, cfg.seed, cfg.negatives, cfg.depth))
        if groups_per_epoch == 0:
            raise TrainingError("no training groups: no train query has a positive in the corpus")
        steps_per_epoch = math.ceil(groups_per_epoch / cfg.batch_groups)
        total = steps_per_epoch * cfg.epochs
        self.log.write(
            "start" if saved is None else "resume",
            config=cfg.trajectory(),
            run_control={k: getattr(cfg, k) for k in sorted(cfg.RUN_CONTROL)},
            data=self.data.stats(),
            qrels_sha256=hashlib.sha256(qrels_text(cfg.dataset, cfg.split).encode()).hexdigest(),
            model=self.model_info,
            steps_per_epoch=steps_per_epoch,
            total_steps=total,
            versions={"python": sys.version.split()[0], "torch": torch.__version__},
            machine={"platform": platform.platform(), "threads": torch.get_num_threads()},
        )
        if saved is not None:
            state = self._restore(saved)
        else:
            state = _State()
            state.initial_dev = {
                "model": self._dev(self.module),
                "first_stage": self._first_stage_dev(),
            }
            if self.teacher is not None:
                state.initial_dev["teacher"] = self._dev(self.teacher)
            state.last_dev = state.initial_dev["model"]
            self.log.write("dev", epoch=0, step=0, dev=state.initial_dev)
            self._save(state, "start")
        if state.finished or state.epoch >= cfg.epochs:
            self.log.write("stop", reason="already finished", step=state.step)
            return self._result(state, "already finished")

        stopped: str | None = None
        if cfg.max_steps is not None and state.step >= cfg.max_steps:
            self.log.write("stop", reason=f"max steps ({cfg.max_steps})", step=state.step)
            return self._result(state, f"max steps ({cfg.max_steps})")
        for epoch in range(state.epoch, cfg.epochs):
            groups = self.data.groups_for_epoch(
                epoch, cfg.seed, cfg.negatives, cfg.depth, cfg.skip_top
            )
            batches = [
                groups[i : i + cfg.batch_groups] for i in range(0, len(groups), cfg.batch_groups)
            ]
            bar = tqdm(
                total=len(batches),
                initial=state.batch_in_epoch,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                unit="step",
                disable=not cfg.progress,
                file=sys.stderr,
            )
            for bi in range(state.batch_in_epoch, len(batches)):
                lr = lr_at(state.step, total, cfg.lr, cfg.warmup)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                loss, parts = self._loss(batches[bi])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.grad_clip)
                self.optimizer.step()
                state.step += 1
                state.batch_in_epoch = bi + 1
                state.epoch_loss_sum += float(loss.detach())
                for k, v in parts.items():
                    state.epoch_part_sums[k] = state.epoch_part_sums.get(k, 0.0) + v
                bar.update(1)
                bar.set_postfix(loss=f"{state.epoch_loss_sum / state.batch_in_epoch:.4f}")
                stopped = self._stop_reason(state)
                if stopped and bi + 1 < len(batches):
                    break
                if cfg.dev_every and state.step % cfg.dev_every == 0 and bi + 1 < len(batches):
                    self.log.write(
                        "dev",
                        epoch=epoch + state.batch_in_epoch / len(batches),
                        step=state.step,
                        loss=state.epoch_loss_sum / state.batch_in_epoch,
                        dev=self._dev(self.module),
                    )
                if cfg.save_every and state.step % cfg.save_every == 0 and bi + 1 < len(batches):
                    self._save(state, f"every {cfg.save_every} steps")
            bar.close()
            if state.batch_in_epoch < len(batches):  # stopped inside the epoch
                state.last_dev = self._dev(self.module)
                self.log.write(
                    "dev",
                    epoch=epoch + state.batch_in_epoch / len(batches),
                    step=state.step,
                    dev=state.last_dev,
                )
                self._save(state, stopped or "stopped")
                break
            n = state.batch_in_epoch
            record = {
                "epoch": epoch + 1,
                "step": state.step,
                "loss": state.epoch_loss_sum / n,
                "loss_parts": {k: v / n for k, v in state.epoch_part_sums.items()},
                "lr": self.optimizer.param_groups[0]["lr"],
                "dev": self._dev(self.module),
                "elapsed_s": round(time.monotonic() - self.started, 1),
            }
            state.history.append(record)
            state.last_dev = record["dev"]
            self.log.write("epoch", **record)
            state.epoch, state.batch_in_epoch = epoch + 1, 0
            state.epoch_loss_sum, state.epoch_part_sums = 0.0, {}
            state.finished = state.epoch >= cfg.epochs
            self._save(state, "epoch end")
            if stopped:
                break
        reason = "done" if state.finished else (stopped or "stopped")
        self.log.write("stop", reason=reason, step=state.step, epochs_done=state.epoch)
        return self._result(state, reason)

    def _result(self, state: _State, reason: str) -> TrainResult:
        return TrainResult(
            self.out,
            state.step,
            state.epoch,
            reason,
            state.initial_dev,
            list(state.history),
            state.last_dev,
        )


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) one training run; see `TrainConfig` and the module docstring.

    `threads` applies to this run only: torch's thread count is process-wide, so it is put
    back afterwards (a caller such as a test session keeps its own setting).
    """
    threads = torch.get_num_threads()
    try:
        return Trainer(cfg).run()
    finally:
        torch.set_num_threads(threads)

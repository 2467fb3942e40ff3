"""Learned fusion of a cross-encoder's scores with the first stage's order.

Why: a small cross-encoder trained on one domain can rank *worse* than a good hybrid first
stage elsewhere (see the model cards). Fusing the two keeps what each does well, and a gate
falls back to the first-stage order on queries where the model disagrees with it too much
to be trusted.

The rule, per request (documents arrive in first-stage order, best first):

- first-stage feature of the document at rank r (0-based): -log(1 + r), z-scored over the
  request's documents. Ranks, not scores: every DB's fusion scores live on another scale,
  and a rank is what every first stage gives;
- model feature: the raw logit, z-scored over the request's documents;
- agreement: Spearman correlation of the logits with the first-stage order;
- fused = (1 - w) * first_stage + w * model when agreement >= tau, else the first-stage
  feature alone (w = 0: the first-stage order comes back unchanged).

`w` and `tau` are fitted per model on held-apart dev queries (`rerankd.train.fusion_fit`),
never on test queries, and stored beside the weights as `fusion.json`. They are fitted on
the full model's scores (every layer, no pruning): a request for another depth or a pruned
configuration gets `UNFITTED` (the first-stage order), because a weaker configuration under
the full model's weight can rank below the first stage (rerankd-minilm-l6 at depth 2 with
its full-depth fusion: 0.025 NDCG@10 below the first stage on TREC DL 2019).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FUSION_FILE = "fusion.json"
#: tau = -1 means "never gate": a Spearman correlation is never below -1.
NEVER_GATE = -1.0


@dataclass(frozen=True)
class FusionParams:
    """Fitted fusion: `weight` on the model (0..1) and the agreement gate `gate`."""

    weight: float
    gate: float = NEVER_GATE
    method: str = "zscore-linear/log-rank/spearman-gate"
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"fusion weight must be in [0, 1], got {self.weight}")
        if not -1.0 <= self.gate <= 1.0:
            raise ValueError(f"fusion gate must be in [-1, 1], got {self.gate}")

    def save(self, folder: Path) -> Path:
        path = folder / FUSION_FILE
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path) -> FusionParams | None:
        """The folder's fitted fusion, or None when the model ships none."""
        path = folder / FUSION_FILE
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        return cls(
            weight=float(raw["weight"]),
            gate=float(raw.get("gate", NEVER_GATE)),
            method=str(raw.get("method", cls.method)),
            fitted_on=dict(raw.get("fitted_on", {})),
        )


#: The fusion of a configuration no fit was made for: weight 0 keeps the first-stage order.
UNFITTED = FusionParams(0.0, fitted_on={"note": "no fusion fitted for this configuration"})


def _z(x: np.ndarray) -> np.ndarray:
    std = float(x.std())
    return (x - x.mean()) / std if std > 1e-9 else np.zeros_like(x)


def rank_feature(n: int) -> np.ndarray:
    """The first-stage feature of ranks 0..n-1, z-scored."""
    return _z(-np.log1p(np.arange(n, dtype=np.float64)))


def agreement(model_scores: np.ndarray) -> float:
    """Spearman correlation of scores (documents in first-stage order) with that order."""
    n = len(model_scores)
    if n < 3:
        return 1.0
    ranks = np.empty(n, dtype=np.float64)
    ranks[np.argsort(-model_scores, kind="stable")] = np.arange(n)
    d = ranks - np.arange(n)
    return float(1.0 - 6.0 * float((d * d).sum()) / (n * (n * n - 1)))


def fuse(
    model_scores: Sequence[float] | np.ndarray, params: FusionParams
) -> tuple[np.ndarray, float]:
    """Fused scores for documents given in first-stage order, and the weight actually used."""
    s = np.asarray(model_scores, dtype=np.float64)
    first = rank_feature(len(s))
    if len(s) < 2:
        return first, 0.0
    w = params.weight if agreement(s) >= params.gate else 0.0
    if w == 0.0:
        return first, 0.0
    return (1.0 - w) * first + w * _z(s), w

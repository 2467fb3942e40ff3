"""Losses over groups of scores: rows are groups, column 0 is the positive.

- `listwise_ce`: softmax cross-entropy of the positive against its group's negatives (the
  InfoNCE / "localized contrastive" loss of cross-encoder training). Listwise rather than
  pointwise BCE because a reranker is only ever asked to *order* a query's candidates: the
  loss should depend on score differences within a group, not on their absolute level.
- `margin_mse`: Hofstätter et al. (2020): match the teacher's margins s(pos) - s(neg_i).
  Invariant to a per-group shift of either model's scores, so teacher and student need not
  share a scale.
- `kl_distill`: KL(teacher softmax || student softmax) over each group at temperature T,
  times T² (Hinton et al.) so gradients keep their size as T changes.
- `mse_distill`: plain regression on the teacher's raw scores: the student reproduces the
  teacher's *scale* too (what a drop-in replacement for a thresholded score needs).
- `ranknet_distill`: RankNet over every ordered pair of a group, the target probability
  sigmoid((t_i - t_j) / T) from the teacher. Every pair counts the same, and a pair far
  apart saturates, so the order of documents the teacher scores close together (most of
  a candidate list below its top: on SciFact dev lists the teacher's scores past rank 10
  spread 0.19 against 4.8 from the best to the median) weighs as much as the top; the
  margin losses spend nearly all their effort on the large gaps. T < 1 sharpens targets.

All take float tensors shaped (groups, group size) and return a scalar mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DISTILL_LOSSES = ("kl", "margin-mse", "mse", "ranknet")


def _check(scores: torch.Tensor, name: str = "scores") -> None:
    if scores.dim() != 2 or scores.shape[1] < 1:
        raise ValueError(f"{name} must be (groups, group size), got {tuple(scores.shape)}")


def _check_pair(student: torch.Tensor, teacher: torch.Tensor) -> None:
    _check(student, "student")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher {tuple(teacher.shape)} != student {tuple(student.shape)}")


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def listwise_ce(scores: torch.Tensor, positive: int = 0) -> torch.Tensor:
    """Mean over groups of -log softmax(scores)[positive]."""
    _check(scores)
    target = torch.full((scores.shape[0],), positive, dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores.float(), target)


def margin_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over groups and negatives of ((s_pos - s_neg) - (t_pos - t_neg))²."""
    _check_pair(student, teacher)
    if student.shape[1] < 2:
        raise ValueError("margin-MSE needs at least one negative per group")
    s = student.float()
    t = teacher.float()
    return F.mse_loss(s[:, :1] - s[:, 1:], t[:, :1] - t[:, 1:])


def kl_distill(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """T² · mean over groups of KL(softmax(t/T) || softmax(s/T))."""
    _check_pair(student, teacher)
    _check_temperature(temperature)
    log_s = F.log_softmax(student.float() / temperature, dim=1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=1)
    kl = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


def mse_distill(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of raw scores."""
    _check_pair(student, teacher)
    return F.mse_loss(student.float(), teacher.float())


def ranknet_distill(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over groups and ordered pairs i != j of the binary cross-entropy between
    sigmoid(s_i - s_j) and sigmoid((t_i - t_j) / T); least where s_i - s_j = (t_i - t_j) / T."""
    _check_pair(student, teacher)
    if student.shape[1] < 2:
        raise ValueError("ranknet needs at least two documents per group")
    _check_temperature(temperature)
    s = student.float()
    t = teacher.float()
    pairs = ~torch.eye(s.shape[1], dtype=torch.bool, device=s.device)
    ds = (s[:, :, None] - s[:, None, :])[:, pairs]
    dt = (t[:, :, None] - t[:, None, :])[:, pairs] / temperature
    return F.binary_cross_entropy_with_logits(ds, torch.sigmoid(dt))


def distill(
    kind: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """The named distillation loss; the teacher is treated as a constant (detached)."""
    teacher = teacher.detach()
    if kind == "kl":
        return kl_distill(student, teacher, temperature)
    if kind == "margin-mse":
        return margin_mse(student, teacher)
    if kind == "mse":
        return mse_distill(student, teacher)
    if kind == "ranknet":
        return ranknet_distill(student, teacher, temperature)
    raise ValueError(f"unknown distillation loss {kind!r}; use one of {DISTILL_LOSSES}")

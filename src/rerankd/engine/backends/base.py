"""One interface for every backend: a padded token batch in, one logit per pair out.

Backends know nothing of queries, documents or requests; the scheduler hands them
batches that `tokenize.collate` built, and they return float32 logits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BackendInfo:
    """What ListModels reports about how a model runs."""

    name: str  # "torch" or "onnx"
    precision: str  # "fp32", "bf16", "fp16", "int8"
    device: str  # "cpu", "cuda:0"


class Backend(ABC):
    """Scores batches for one loaded cross-encoder."""

    info: BackendInfo
    #: Whether `score_pruned` is implemented (per-layer token pruning).
    supports_pruning: bool = False
    #: How many batches the scheduler may score at once, from as many threads. 1 = one at
    #: a time (the backend parallelises inside each batch).
    parallel_batches: int = 1

    @abstractmethod
    def score(self, batch: dict[str, np.ndarray], depth: int | None = None) -> np.ndarray:
        """Logits, shape (batch,), float32, for `input_ids`/`attention_mask`/`token_type_ids`.

        `depth` runs only the first k encoder layers (None = all of them).
        """

    def score_pruned(self, batch: dict[str, np.ndarray], keep: tuple[float, ...]) -> np.ndarray:
        """Logits with per-layer token pruning: `len(keep)` layers, layer i keeping the
        `keep[i]` share of tokens; `batch["protected"]` marks tokens never pruned."""
        raise NotImplementedError(f"{self.info.name} backend does not prune tokens")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sessions or device memory."""

"""PyTorch backend: fp32 or bf16 on CPU, fp16 or bf16 on CUDA."""

from __future__ import annotations

import numpy as np
import torch

from rerankd.engine.backends.base import Backend, BackendInfo
from rerankd.engine.models.bert import CrossEncoder
from rerankd.errors import ModelLoadError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TorchBackend(Backend):
    supports_pruning = True

    def __init__(self, model: CrossEncoder, precision: str = "fp32", device: str = "cpu") -> None:
        if precision not in _DTYPES:
            raise ModelLoadError(f"torch backend precision must be one of {sorted(_DTYPES)}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
        if precision == "fp16" and not device.startswith("cuda"):
            raise ModelLoadError("fp16 needs a CUDA device; use fp32 or bf16 on CPU")
        self.device = torch.device(device)
        self.dtype = _DTYPES[precision]
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.info = BackendInfo("torch", precision, str(self.device))

    def score(self, batch: dict[str, np.ndarray], depth: int | None = None) -> np.ndarray:
        inputs = {k: torch.from_numpy(v).to(self.device) for k, v in batch.items()}
        with torch.inference_mode():
            logits = self.model(**inputs, depth=depth)
        return logits.float().cpu().numpy()

    def score_pruned(self, batch: dict[str, np.ndarray], keep: tuple[float, ...]) -> np.ndarray:
        inputs = {k: torch.from_numpy(v).to(self.device) for k, v in batch.items()}
        protected = inputs.pop("protected")
        with torch.inference_mode():
            logits = self.model.forward_pruned(**inputs, keep=keep, protected=protected)
        return logits.float().cpu().numpy()

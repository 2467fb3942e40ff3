"""Choose a backend for the device and build a ready `Reranker` from a model source.

`backend="auto"` picks torch fp16 on CUDA and ONNX Runtime int8 on CPU (the fastest
measured path on 2 cores, see bench/); every choice can be overridden. On ONNX Runtime the
cores are spent as parallel single-threaded batch workers (see `scheduler`); torch keeps
one worker and parallelises inside each batch.
"""

from __future__ import annotations

import logging
import os

from rerankd.engine.backends.base import Backend
from rerankd.engine.bundled import resolve_source
from rerankd.engine.cache import CacheConfig
from rerankd.engine.checkpoint import fingerprint
from rerankd.engine.limits import Limits
from rerankd.engine.loading import load_config, load_cross_encoder
from rerankd.engine.reranker import Reranker
from rerankd.engine.scheduler import SchedulerConfig
from rerankd.engine.tokenize import PairEncoder, load_tokenizer
from rerankd.errors import ModelLoadError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def plan(backend: str, precision: str, device: str) -> tuple[str, str, str]:
    """Resolve "auto" choices into a concrete (backend, precision, device)."""
    if backend not in BACKENDS:
        raise ModelLoadError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ModelLoadError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    on_gpu = device.startswith("cuda")
    if backend == "auto":
        backend = "torch" if on_gpu else "onnx"
    if backend == "onnx" and on_gpu:
        raise ModelLoadError("the onnx backend runs on CPU here; use --backend torch on CUDA")
    if precision == "auto":
        precision = {"torch": "fp16" if on_gpu else "fp32", "onnx": "int8"}[backend]
    if backend == "onnx" and precision not in ("fp32", "int8"):
        raise ModelLoadError(f"onnx backend precision must be fp32 or int8, got {precision}")
    if backend == "torch" and precision == "int8":
        raise ModelLoadError("int8 runs on the onnx backend; use --backend onnx")
    return backend, precision, device


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def plan_workers(backend: str, threads: int, workers: int) -> tuple[int, int]:
    """(batch workers, intra-op threads per worker) from `threads` and `workers` (0 = auto).

    `threads` is the CPU budget for inference in total (0 = every core this process may
    use; set it to a container's CPU limit, which the affinity mask does not show).
    ONNX Runtime: one single-threaded worker per thread of that budget by default, or
    `workers` workers sharing it. Torch: one worker with the whole budget (its thread pool
    is process-wide, so parallel calls would only oversubscribe the cores).
    """
    if threads < 0 or workers < 0:
        raise ModelLoadError(f"threads and workers must be >= 0, got {threads} and {workers}")
    if backend != "onnx":
        if workers > 1:
            raise ModelLoadError("parallel batch workers run on the onnx backend only")
        return 1, threads
    budget = threads or cpu_cores()
    workers = workers or budget
    return workers, max(1, budget // workers)


def load_reranker(
    source: str,
    name: str | None = None,
    *,
    backend: str = "auto",
    precision: str = "auto",
    device: str = "auto",
    threads: int = 0,
    workers: int = 0,
    scheduler: SchedulerConfig | None = None,
    limits: Limits | None = None,
    default_max_length: int = 0,
    cache: CacheConfig | None = None,
) -> Reranker:
    """Load `source` (`bundled:NAME`, a folder or a hub id) behind the chosen backend."""
    folder = resolve_source(source)
    cfg = load_config(folder)
    backend, precision, device = plan(backend, precision, device)
    workers, threads = plan_workers(backend, threads, workers)
    model = load_cross_encoder(folder)
    impl: Backend
    if backend == "torch":
        from rerankd.engine.backends.torch_backend import TorchBackend
        from rerankd.engine.loading import set_torch_threads

        set_torch_threads(threads)
        impl = TorchBackend(model, precision=precision, device=device)
    else:
        from rerankd.engine.backends.onnx_backend import OnnxBackend

        impl = OnnxBackend(folder, model, precision=precision, threads=threads, workers=workers)
    encoder = PairEncoder(load_tokenizer(folder), cfg.max_length, cfg.type_vocab_size == 1)
    log.info("loaded %s from %s on %s/%s/%s", name or source, folder, backend, precision, device)
    return Reranker(
        name or default_name(source),
        source,
        folder,
        cfg,
        encoder,
        impl,
        scheduler=scheduler,
        limits=limits,
        default_max_length=default_max_length,
        cache=cache,
        fingerprint=fingerprint(folder) if cache and cache.max_entries else "",
    )


def default_name(source: str) -> str:
    """A model's serving name when none is given: the last path or hub-id component."""
    return source.removeprefix("bundled:").rstrip("/").split("/")[-1]

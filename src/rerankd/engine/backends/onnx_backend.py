"""ONNX Runtime backend: our CrossEncoder exported once, fp32 or dynamically quantized int8, on CPU.

Why a second backend: for a MiniLM-L6 cross-encoder on two cores, ONNX Runtime int8 scores
~2.8x as many pairs/s as torch fp32 and ~1.4x torch bf16, and its fp32 graph ~1.25x torch
fp32 while matching it to ~1e-7. On the 2-layer, 128-wide TinyBERT-L2 shape int8 is ~1.8x
ORT fp32 (one thread, DL19 batches: 60 vs 112 ms per 100 pairs) and torch bf16 0.4-0.5x of
int8 (bench/README.md).

The export is derived data, so it lives in a cache keyed by the checkpoint's content and
every setting that changes the graph (`checkpoint.fingerprint`): a second start, or a second
process, reuses it. Each graph is built in a private temporary folder next to the cache
entry and published with one `os.rename`, so a reader sees either no entry or a complete
one, and two processes exporting at once cannot interleave their writes (the loser
discards its identical copy). A folder rather than a single file is renamed because a model
over 2 GB is saved as a graph plus external-data files, which must move together.

Graph choices, measured on 100 TREC-DL-19 pairs (2 cores, AVX-512 VNNI):

- Exporter: the TorchScript exporter (`dynamo=False`). It needs no extra package (the
  dynamo exporter needs `onnxscript`), takes dynamic batch/sequence axes directly, and its
  graph is quantized by `quantize_dynamic` as is; the dynamo graph carries shape
  annotations on which the quantizer's shape inference fails, and it was not faster.
  The TorchScript exporter is deprecated upstream; the export probe below catches a
  future torch whose exporter misbehaves, at load time.
- Fusion: ONNX Runtime's own session optimizer (ORT_ENABLE_ALL) only, minus
  `SkipLayerNormFusion` (`DISABLED_OPTIMIZERS`: slow in the int8 graph). The offline BERT fuser
  (`onnxruntime.transformers`: fused Attention, EmbedLayerNorm, SkipLayerNorm) was no
  faster for fp32, slower for int8, and its default 1-D mask index assumes right padding.
- int8: `quantize_dynamic` with QInt8 weights, per-channel, on MatMul only. MatMul covers
  every encoder projection; the pooler and classifier are Gemm and stay fp32. Per-tensor
  weights lost too much (Spearman vs fp32 0.971 on MiniLM, 0.992 per-channel);
  quantizing the fused Attention as well gave no speed and lower parity. `reduce_range`
  (7-bit weights) only guards against u8*s8 saturation on x86 CPUs without VNNI and costs
  accuracy elsewhere, so it is chosen per CPU and is part of the cache key.

Activations are quantized per tensor at run time, so an int8 score depends slightly on the
other pairs in its batch (a few 1e-3 in logit); fp32 scores do not depend on batching.

Batch size: smaller batches are faster per pair on CPU (the activations stay in cache); on
MiniLM-L6, ~1,000 padded tokens per batch scored ~30% more pairs/s than 4,096.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from rerankd.engine.backends.base import Backend, BackendInfo
from rerankd.engine.checkpoint import fingerprint
from rerankd.errors import InvalidInputError, ModelLoadError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8")
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "logits"
#: 17 is the first opset with LayerNormalization as one op; ORT >= 1.14 runs it.
OPSET = 17
#: Bump when the cache layout or the export recipe changes, to orphan old entries.
#: 2: the last layer computes [CLS] alone for [CLS]-reading heads (`CrossEncoder.forward`).
LAYOUT_VERSION = 2
MODEL_FILE = "model.onnx"
META_FILE = "rerankd-onnx.json"
#: The int8 recipe (see the module docstring for why these values).
QUANT_OP_TYPES = ("MatMul",)
QUANT_PER_CHANNEL = True
#: ORT session rewrites left out. SkipLayerNormFusion: in the int8 graphs ORT 1.32 fuses
#: some residual Add + LayerNorm pairs into SkipLayerNormalization, whose kernel
#: took ~8x the time per element of a plain LayerNormalization (ORT profile, one thread,
#: DL19 batches). Without it the whole int8 graph ran 1.20x faster on TinyBERT-L2 and 1.12x
#: on MiniLM-L6 (interleaved in one process, 5 rounds), scores within 0.009 of the fused
#: graph's. The fp32 graphs never get that fusion (their bias Adds stay apart), so they are
#: unchanged. A session setting, not part of the graph: the export cache is unaffected.
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
# fp32 graph vs torch on the export probe: a wrong graph is refused, not served.
_PROBE_RTOL = 1e-3
_PROBE_ATOL = 1e-4
_BYTES_2GB = 2**31 - 1


def default_cache_dir() -> Path:
    """Where exports live unless told otherwise: `$RERANKD_CACHE/onnx` (read at call time)."""
    from rerankd.engine.bundled import cache_dir

    return cache_dir() / "onnx"


def cpu_has_vnni() -> bool | None:
    """True/False where the CPU's int8 dot-product support is known; None where it is not.

    Only x86 matters: without VNNI, ORT's u8*s8 kernels (vpmaddubsw) can saturate and
    7-bit weights (`reduce_range`) avoid it. ARM kernels do not saturate.
    """
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64") or machine.startswith("arm"):
        return True
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return None


def default_reduce_range() -> bool:
    """7-bit int8 weights unless the CPU is known to accumulate 8-bit products safely."""
    return cpu_has_vnni() is not True


def export_settings(
    precision: str, depth: int | None = None, reduce_range: bool | None = None
) -> dict[str, Any]:
    """Everything that changes the exported graph: the cache key's `extra`."""
    settings: dict[str, Any] = {
        "layout": LAYOUT_VERSION,
        "exporter": "torchscript",
        "opset": OPSET,
        "torch": torch.__version__,
        "depth": depth,
        "precision": precision,
    }
    if precision == "int8":
        settings["onnxruntime"] = ort.__version__
        settings["quantization"] = {
            "method": "dynamic",
            "weight_type": "QInt8",
            "per_channel": QUANT_PER_CHANNEL,
            "reduce_range": default_reduce_range() if reduce_range is None else reduce_range,
            "op_types": list(QUANT_OP_TYPES),
        }
    return settings


class OnnxBackend(Backend):
    """Scores batches with ONNX Runtime on CPU, from a cached export of the checkpoint.

    `model` is the already-loaded fp32 torch module (`bert.CrossEncoder`, or any module with
    its `forward(input_ids, attention_mask, token_type_ids, depth)`), used only when a graph
    must be exported (a cache miss); without it, or if it was cast to another dtype or
    device, the checkpoint is read from `folder` instead. No torch module is kept once the
    session exists, so serving holds one copy of the weights.

    `depth` (early exit) is served from one more cached graph per depth, exported on first
    use: expect a one-off delay of a few seconds the first time a new depth is requested.
    A Matryoshka checkpoint's LoRA compensation for that depth is folded into the graph's
    weights (`CrossEncoder.merged`); token pruning (and so horizontal LoRA) is torch-only.
    """

    def __init__(
        self,
        folder: Path | str,
        model: nn.Module | None = None,
        *,
        precision: str = "fp32",
        threads: int = 0,
        workers: int = 1,
        cache_dir: Path | str | None = None,
        reduce_range: bool | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ModelLoadError(f"onnx backend precision must be one of {PRECISIONS}")
        if threads < 0:
            raise ModelLoadError(
                f"threads must be >= 0 (0 = ONNX Runtime's default), got {threads}"
            )
        if workers < 1:
            raise ModelLoadError(f"workers must be >= 1, got {workers}")
        self.folder = Path(folder)
        self.precision = precision
        self.threads = threads
        # One session serves every worker: ORT sessions take concurrent `run` calls, and
        # with one intra-op thread each call runs on its caller's thread.
        self.parallel_batches = workers
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.reduce_range = default_reduce_range() if reduce_range is None else reduce_range
        self.info = BackendInfo("onnx", precision, "cpu")
        self._lock = threading.Lock()
        self._sessions: dict[int | None, Any] = {}
        self.num_layers = _num_layers(self.folder)
        path = ensure_onnx(
            self.folder, precision, self.cache_dir, model=model, reduce_range=self.reduce_range
        )
        self.model_path = path
        self._sessions[None] = make_session(path, threads)

    def score(self, batch: dict[str, np.ndarray], depth: int | None = None) -> np.ndarray:
        session = self._session(depth)
        feeds = {name: np.ascontiguousarray(batch[name], dtype=np.int64) for name in INPUT_NAMES}
        (logits,) = session.run([OUTPUT_NAME], feeds)
        return np.asarray(logits, dtype=np.float32).reshape(-1)

    def _session(self, depth: int | None) -> Any:
        """The session for `depth` layers; partial depths are exported on first use.

        A graph has its depth baked in (the layer loop is unrolled at export), so each
        early-exit depth is its own cached graph and session, built when first asked for.
        """
        if depth is not None and not 0 < depth <= self.num_layers:
            raise InvalidInputError(f"depth {depth} is outside 1..{self.num_layers}")
        key = None if depth in (None, self.num_layers) else depth
        session = self._sessions.get(key)
        if session is not None:
            return session
        with self._lock:
            if key not in self._sessions:
                if not self._sessions:
                    raise ModelLoadError("the onnx backend is closed")
                path = ensure_onnx(
                    self.folder,
                    self.precision,
                    self.cache_dir,
                    depth=key,
                    reduce_range=self.reduce_range,
                )
                self._sessions[key] = make_session(path, self.threads)
            return self._sessions[key]

    def close(self) -> None:
        with self._lock:
            self._sessions.clear()


def make_session(path: Path, threads: int = 0, optimized_path: Path | None = None) -> Any:
    """An ORT CPU session: all graph optimisations but `DISABLED_OPTIMIZERS`, sequential,
    `threads` intra-op threads; `optimized_path` saves the optimised graph (to inspect it).

    Sequential execution because a BERT graph is a chain: parallel node execution only adds
    scheduling overhead; the parallelism is inside each MatMul (intra-op threads).
    """
    so = ort.SessionOptions()
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(
            str(path),
            so,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=list(DISABLED_OPTIMIZERS),
        )
    except Exception as exc:  # ORT raises its own exception types
        raise ModelLoadError(f"ONNX Runtime cannot load {path}: {exc}") from exc


def cache_entry(
    folder: Path,
    precision: str,
    cache_dir: Path,
    depth: int | None = None,
    reduce_range: bool | None = None,
) -> tuple[Path, dict[str, Any]]:
    """The cache folder for this checkpoint and these settings, and the settings."""
    settings = export_settings(precision, depth, reduce_range)
    from rerankd.engine.loading import lora_meta

    lora = lora_meta(folder)
    if lora is not None:
        # LoRA's alpha lives in rerankd.json, which the fingerprint (weights and config)
        # does not read; the tensors themselves are in the hashed safetensors.
        settings["lora"] = lora
    key = fingerprint(folder, extra=json.dumps(settings, sort_keys=True))
    return cache_dir / key, settings


def ensure_onnx(
    folder: Path,
    precision: str,
    cache_dir: Path,
    *,
    model: nn.Module | None = None,
    depth: int | None = None,
    reduce_range: bool | None = None,
) -> Path:
    """The cached graph's path, exporting (and for int8 quantizing) it on a miss.

    int8 is quantized from the fp32 entry, which is exported first if missing, so an fp32
    backend started later reuses it.
    """
    entry, settings = cache_entry(folder, precision, cache_dir, depth, reduce_range)
    target = entry / MODEL_FILE
    if target.is_file():
        return target
    build: Callable[[Path], None]
    if precision == "fp32":
        build = functools.partial(_export, folder, model, depth)
    else:
        source = ensure_onnx(folder, "fp32", cache_dir, model=model, depth=depth)
        build = functools.partial(_quantize, source, settings["quantization"]["reduce_range"])
    started = time.perf_counter()
    _build_entry(entry, build, {**settings, "source": str(folder)})
    log.info(
        "onnx %s graph for %s ready in %.1fs at %s",
        precision,
        folder,
        time.perf_counter() - started,
        entry,
    )
    return target


def _build_entry(entry: Path, build: Callable[[Path], None], meta: dict[str, Any]) -> None:
    """Run `build(tmp_folder)` in a private folder beside `entry`, then publish it whole."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published entry is an ordinary folder
    try:
        build(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        publish(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, entry: Path) -> bool:
    """Atomically move the finished folder `tmp` to `entry`; False if another process won.

    `rename` of a folder onto an existing non-empty folder fails, and an entry only ever
    appears complete, so a failure with a complete entry in place means a concurrent
    export of the same content finished first: its copy is used and ours dropped.
    """
    try:
        os.rename(tmp, entry)
        return True
    except OSError:
        if (entry / MODEL_FILE).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise


def _export(folder: Path, model: nn.Module | None, depth: int | None, tmp: Path) -> None:
    """Export the fp32 graph with dynamic batch and sequence axes, then check it runs right.

    The TorchScript exporter (`dynamo=False`): see the module docstring for why.
    """
    out = tmp / MODEL_FILE
    if model is None or any(
        p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()
    ):
        # Re-read rather than upcast: a module already cast to bf16/fp16 for torch serving
        # has lost the checkpoint's fp32 precision, and it stays untouched for its owner.
        from rerankd.engine.loading import load_cross_encoder

        model = load_cross_encoder(folder)
    compensation = getattr(model, "compensation", None)  # JinaBERT has none
    if compensation is not None and compensation(depth):
        # The depth's LoRA and deltas folded into the weights: a graph has its depth fixed,
        # so the compensation costs nothing at run time (traced unmerged it adds two MatMuls
        # per adapted linear) and int8 quantizes the merged MatMuls. The full depth uses none.
        model = model.merged(depth)  # type: ignore[operator]
    module = _Graph(model, depth)
    probe = _probe_inputs(model.config.vocab_size, model.config.type_vocab_size)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    dynamic[OUTPUT_NAME] = {0: "batch"}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                module,
                tuple(torch.from_numpy(probe[n]) for n in INPUT_NAMES),
                str(out),
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:  # exporter failures come in many types
        raise ModelLoadError(f"could not export {folder} to ONNX: {exc}") from exc
    _check_export(module, out)


class _Graph(nn.Module):
    """The module traced: our cross-encoder at a fixed depth, three tensors in, logits out."""

    def __init__(self, model: nn.Module, depth: int | None) -> None:
        super().__init__()
        self.model = model.eval()
        self.depth = depth

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.model(input_ids, attention_mask, token_type_ids, depth=self.depth)


def _probe_inputs(vocab_size: int, type_vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A small right-padded batch; one row mostly padding, so the mask path is traced."""
    rng = np.random.default_rng(seed)
    batch, seq = 3, 23
    ids = rng.integers(5, max(6, min(vocab_size, 30000)), size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[1, 5:] = 0
    mask[2, 17:] = 0
    types = np.zeros((batch, seq), dtype=np.int64)
    if type_vocab_size > 1:
        types[:, seq // 2 :] = 1
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": types * mask}


def _check_export(module: Any, path: Path) -> None:
    """Refuse a graph whose logits differ from torch's on a probe of another shape.

    The probe has a different batch and length than the trace input, so a dynamic axis
    frozen by mistake fails here, at export, and not on the first request.
    """
    cfg = module.model.config
    probe = _probe_inputs(cfg.vocab_size, cfg.type_vocab_size, seed=1)
    probe = {k: np.ascontiguousarray(np.repeat(v, 2, axis=0)[:5, :19]) for k, v in probe.items()}
    with torch.no_grad():
        want = module(*(torch.from_numpy(probe[n]) for n in INPUT_NAMES)).numpy()
    session = make_session(path, threads=1)
    (got,) = session.run([OUTPUT_NAME], probe)
    if got.shape != want.shape or not np.allclose(got, want, rtol=_PROBE_RTOL, atol=_PROBE_ATOL):
        diff = np.abs(got.reshape(want.shape) - want).max() if got.size == want.size else "n/a"
        raise ModelLoadError(
            f"the ONNX export of {cfg.model_type} disagrees with torch (max |diff| {diff}); "
            "use --backend torch for this model"
        )


def _quantize(source: Path, reduce_range: bool, tmp: Path) -> None:
    """Dynamic int8: QInt8 per-channel weights on MatMul, activations quantized per batch."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = tmp / MODEL_FILE
    # The quantizer writes scratch files beside its input; a private view of the source
    # keeps two processes quantizing the same fp32 entry from deleting each other's.
    private = _link_folder(source.parent, tmp / "fp32")
    size = sum(f.stat().st_size for f in private.iterdir())
    quiet = _QuantizerChatter()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        quantize_dynamic(
            private / source.name,
            out,
            op_types_to_quantize=list(QUANT_OP_TYPES),
            per_channel=QUANT_PER_CHANNEL,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            use_external_data_format=size > _BYTES_2GB,
        )
    except Exception as exc:  # the quantizer raises many types
        raise ModelLoadError(f"could not quantize {source} to int8: {exc}") from exc
    finally:
        root.removeFilter(quiet)
        shutil.rmtree(private, ignore_errors=True)


def _link_folder(src: Path, dst: Path) -> Path:
    """Hard links to the files of `src` in a new folder `dst` (copies where links fail)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name != META_FILE:
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)
    return dst


class _QuantizerChatter(logging.Filter):
    """Drops the quantizer's per-tensor notes, which it logs on the root logger.

    A filter on the root logger sees only records logged on the root logger itself, so
    nothing of rerankd's or the application's own logging is touched, and errors pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        ours = f"onnxruntime{os.sep}quantization" in record.pathname
        return not ours or record.levelno >= logging.ERROR


def _num_layers(folder: Path) -> int:
    from rerankd.engine.loading import load_config

    return load_config(folder).num_layers

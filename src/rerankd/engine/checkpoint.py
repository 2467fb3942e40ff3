"""Find a checkpoint (local path or hub id) and read its weights: safetensors only.

A hub id is fetched with `huggingface_hub` where the machine reaches the hub; only
config, tokenizer and `*.safetensors` files are requested, never pickled weights, and
no remote code is ever run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rerankd.errors import ModelLoadError

_HUB_PATTERNS = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "*.safetensors",
    "model.safetensors.index.json",
    "rerankd.json",
    # sentence-transformers layout: pooling mode and max length of dense encoders
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
]
# Parts of a pretraining checkpoint that a cross-encoder does not use.
_DROP_PREFIXES = ("cls.", "lm_head.", "pooler.predictions")
_DROP_SUFFIXES = ("position_ids",)
# The masked-LM head inside the `cls.` prefix, kept on request (SPLADE needs it).
_MLM_HEAD_PREFIX = "cls.predictions."


def write_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """`safetensors.torch.save_file`, then the file made readable as the umask allows.

    Why: safetensors creates its file with mode 0600, so a model trained or published by one
    user (a training job, `make models`) could not be read by a sidecar running as another
    (a container's service user), though every other file in the folder could."""
    save_file(dict(tensors), str(path), metadata=metadata)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def resolve(source: str) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (safetensors only) or refused."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"{source} is a file; pass the folder that holds config.json")
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise ModelLoadError(f"no model folder at {source!r} and it is not a hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=source, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # the hub client raises many types; all mean "not here"
        raise ModelLoadError(
            f"could not fetch {source!r} from the model hub ({type(exc).__name__}: {exc}); "
            "on an offline machine pass a local folder instead"
        ) from exc


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint; refuses folders that only have pickles."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ModelLoadError(
            f"{folder} has only pickled weights (.bin/.pt); rerankd loads safetensors only — "
            "convert them with safetensors' `save_file` first"
        )
    raise ModelLoadError(f"no *.safetensors weights in {folder}")


def read_weights(folder: Path, *, keep_mlm_head: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint with legacy names normalised and pretraining heads dropped.

    Tensors a shipped model references instead of storing (`rerankd.json`'s
    `external_tensors`, see `rerankd.engine.shipped`) are read and hash-checked here.

    `keep_mlm_head=True` keeps BERT's masked-LM head (`cls.predictions.*`), which SPLADE
    sparse encoders are made of; the next-sentence head is dropped either way.
    """
    tensors: dict[str, torch.Tensor] = {}
    for f in safetensors_files(folder):
        tensors.update(load_file(str(f)))
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        kept_head = keep_mlm_head and name.startswith(_MLM_HEAD_PREFIX)
        if (name.startswith(_DROP_PREFIXES) and not kept_head) or name.endswith(_DROP_SUFFIXES):
            continue
        if name.endswith(".gamma"):
            name = name[: -len(".gamma")] + ".weight"
        elif name.endswith(".beta"):
            name = name[: -len(".beta")] + ".bias"
        out[name] = t
    from rerankd.engine.shipped import external_tensors  # late: shipped imports bundled

    for name, t in external_tensors(folder).items():
        if name in out:
            raise ModelLoadError(f"{folder}: tensor {name!r} is both stored and referenced")
        out[name] = t
    return out


def fingerprint(folder: Path, extra: str = "") -> str:
    """A content hash of the weights and config: the key of derived caches (ONNX graphs)."""
    h = hashlib.sha256(extra.encode())
    for f in [folder / "config.json", *safetensors_files(folder)]:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]

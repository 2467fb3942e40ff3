"""A Matryoshka checkpoint's first k layers, extracted, score as the checkpoint at depth k."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rerankd.engine.loading import load_cross_encoder
from rerankd.train.modeling import extract_depth
from tests.helpers import write_tiny_checkpoint


def _matryoshka(folder: Path, pooling: str = "cls") -> Path:
    write_tiny_checkpoint(folder, layers=3, hidden=32, heads=2)
    meta = {"max_length": 48, "long_docs": "truncate"}  # how it trained: the cut serves so
    if pooling != "cls":
        meta["matryoshka"] = {"pooling": pooling}
    (folder / "rerankd.json").write_text(json.dumps(meta))
    weights = load_file(str(folder / "model.safetensors"))
    gen = torch.Generator().manual_seed(1)
    for k in (1, 2):
        weights[f"classifier_depth{k}.weight"] = torch.randn(1, 32, generator=gen)
        weights[f"classifier_depth{k}.bias"] = torch.randn(1, generator=gen)
    save_file(weights, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("pooling", ["cls", "mean", "query"])
def test_extracted_depth_scores_like_the_checkpoint_at_that_depth(
    tmp_path: Path, pooling: str
) -> None:
    src = _matryoshka(tmp_path / "m", pooling)
    dst = extract_depth(src, 2, tmp_path / "d2")
    full, small = load_cross_encoder(src), load_cross_encoder(dst)
    assert small.config.num_layers == 2
    ids = torch.randint(1000, 3000, (4, 17))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = mask[:, 6:]  # a query segment of 6 tokens
    with torch.no_grad():
        want = full(ids, mask, types, depth=2)
        got = small(ids, mask, types)
        want1 = full(ids, mask, types, depth=1)
        got1 = small(ids, mask, types, depth=1)
    assert torch.allclose(want, got, atol=1e-6)
    assert torch.allclose(want1, got1, atol=1e-6)  # the lower depth head is kept
    assert small.pooling(1) == small.pooling(2) == pooling
    meta = json.loads((dst / "rerankd.json").read_text())
    assert (meta["max_length"], meta["long_docs"]) == (48, "truncate")
    if pooling == "mean":  # padding is not averaged in: a padded row scores as its unpadded self
        with torch.no_grad():
            alone = small(ids[1:2, :9], mask[1:2, :9], types[1:2, :9])
        assert torch.allclose(alone, got[1:2], atol=1e-5)


def test_extract_needs_a_head_for_that_depth(tmp_path: Path) -> None:
    src = _matryoshka(tmp_path / "m")
    with pytest.raises(ValueError, match="no head for depth 3"):
        extract_depth(src, 3, tmp_path / "d3")

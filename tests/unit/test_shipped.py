"""Shipped models: fp16 weights without the frozen word-embedding table, read back from the
backbone package with its hash checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rerankd.engine.bundled import resolve_source
from rerankd.engine.loading import load_cross_encoder
from rerankd.engine.shipped import publish, shipped_dir
from rerankd.errors import ModelLoadError

WORDS = "bert.embeddings.word_embeddings.weight"


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    trained = resolve_source("bundled:splade-tiny")  # its table is splade-tiny's own
    root = tmp_path_factory.mktemp("shipped")
    dst = publish(
        trained,
        "any-name",
        external={WORDS: ("bundled:splade-tiny", WORDS)},
        meta={"recipe": "test"},
        card="# test card\n",
        dst_root=root,
    )
    return trained, dst


def test_published_folder_is_fp16_without_the_table(published) -> None:
    trained, dst = published
    stored = load_file(str(dst / "model.safetensors"))
    assert WORDS not in stored
    assert {t.dtype for t in stored.values()} == {torch.float16}
    meta = json.loads((dst / "rerankd.json").read_text())
    assert meta["external_tensors"][WORDS]["source"] == "bundled:splade-tiny"
    assert (dst / "README.md").read_text() == "# test card\n"
    assert (dst / "tokenizer.json").is_file()
    size = (dst / "model.safetensors").stat().st_size
    assert size < (trained / "model.safetensors").stat().st_size / 4


def test_published_model_scores_like_the_original(published) -> None:
    trained, dst = published
    a, b = load_cross_encoder(trained), load_cross_encoder(dst)
    ids = torch.randint(1000, 5000, (3, 24))
    mask = torch.ones_like(ids)
    types = torch.zeros_like(ids)
    with torch.no_grad():
        want, got = a(ids, mask, types), b(ids, mask, types)
    assert torch.allclose(want, got, atol=2e-2), (want, got)


def test_a_different_table_is_refused(published, tmp_path: Path) -> None:
    _, dst = published
    bad = tmp_path / "bad"
    shutil.copytree(dst, bad)
    meta = json.loads((bad / "rerankd.json").read_text())
    meta["external_tensors"][WORDS]["sha256"] = "0" * 64
    (bad / "rerankd.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="SHA-256 differs"):
        load_cross_encoder(bad)


def test_publish_refuses_a_table_that_was_trained(tmp_path: Path) -> None:
    trained = tmp_path / "trained"
    shutil.copytree(resolve_source("bundled:splade-tiny"), trained)
    weights = load_file(str(trained / "model.safetensors"))
    weights[WORDS] = weights[WORDS] + 1e-3
    from safetensors.torch import save_file

    save_file(weights, str(trained / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="SHA-256 differs"):
        publish(
            trained,
            "any-name",
            external={WORDS: ("bundled:splade-tiny", WORDS)},
            meta={},
            card="",
            dst_root=tmp_path / "out",
        )


def test_unknown_shipped_name_is_refused() -> None:
    with pytest.raises(ModelLoadError, match="unknown shipped model"):
        shipped_dir("rerankd-huge")

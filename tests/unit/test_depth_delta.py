"""Per-depth deltas (`delta_depth{k}.{name}`) of Matryoshka checkpoints on tiny random
models: they change their depth alone, fold exactly wherever LoRA folds (merged copies,
ONNX graphs, extracted depths), train, and malformed ones are refused by name."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rerankd.engine.backends.onnx_backend import OnnxBackend
from rerankd.engine.backends.torch_backend import TorchBackend
from rerankd.engine.loading import load_cross_encoder
from rerankd.engine.models.bert import CrossEncoder
from rerankd.engine.models.config import ModelConfig
from rerankd.errors import ModelLoadError
from rerankd.train.modeling import deltas_description, extract_depth, load_trainable
from tests.helpers import edit_weights, write_lora_checkpoint

RANK, ALPHA, LAYERS = 2, 3.0, 4
KEEP = (1.0, 0.6, 0.6)
#: depth 3 has LoRA and deltas, depth 2 deltas alone, depth 1 LoRA alone
DELTAS = {
    3: (
        "bert.embeddings.token_type_embeddings.weight",
        "bert.encoder.layer.0.output.LayerNorm.bias",
        "bert.encoder.layer.1.attention.self.key.weight",  # a linear LoRA does not target
        "bert.encoder.layer.2.intermediate.dense.bias",
    ),
    2: ("bert.embeddings.position_embeddings.weight", "bert.encoder.layer.1.output.dense.bias"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the checkpoint with deltas, the same checkpoint without them)."""
    root = tmp_path_factory.mktemp("delta")
    plain = write_lora_checkpoint(root / "plain", layers=LAYERS, rank=RANK, alpha=ALPHA)
    folder = root / "delta"
    shutil.copytree(plain, folder)
    weights = load_file(str(folder / "model.safetensors"))
    gen = torch.Generator().manual_seed(5)
    for depth, names in DELTAS.items():
        for name in names:
            weights[f"delta_depth{depth}.{name}"] = 0.3 * torch.randn(
                weights[name].shape, generator=gen
            )
    save_file(weights, str(folder / "model.safetensors"))
    return folder, plain


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 29000, (4, 17), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 11:] = 0
    types = torch.zeros_like(ids)
    types[:, 8:] = 1
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": types * mask}


def _protected(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["attention_mask"].bool() & (batch["token_type_ids"] == 0)


def _with_deltas_added(plain: Path, folder: Path, depth: int) -> CrossEncoder:
    """The plain checkpoint with depth `depth`'s deltas added to its tensors by hand."""
    model = load_cross_encoder(plain)
    weights = load_file(str(folder / "model.safetensors"))
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name in DELTAS[depth]:
            params[name] += weights[f"delta_depth{depth}.{name}"]
    return model


def test_deltas_change_their_depth_alone(folders: tuple[Path, Path]) -> None:
    folder, plain = folders
    model, before = load_cross_encoder(folder), load_cross_encoder(plain)
    batch = _batch()
    with torch.no_grad():
        for depth in (2, 3):  # deltas alone (2), deltas with LoRA (3): as added by hand
            want = _with_deltas_added(plain, folder, depth)(**batch, depth=depth)
            torch.testing.assert_close(model(**batch, depth=depth), want, rtol=0, atol=1e-5)
            assert not torch.allclose(want, before(**batch, depth=depth), atol=1e-3)
        for depth in (1, None):  # no deltas there: bit for bit as without
            assert torch.equal(model(**batch, depth=depth), before(**batch, depth=depth))
        pruned = model.forward_pruned(**batch, keep=KEEP, protected=_protected(batch))
        want = _with_deltas_added(plain, folder, 3).forward_pruned(
            **batch, keep=KEEP, protected=_protected(batch)
        )
        torch.testing.assert_close(pruned, want, rtol=0, atol=1e-5)


def test_merged_copies_and_onnx_graphs_fold_the_deltas(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, _ = folders
    model = load_cross_encoder(folder)
    torch_backend = TorchBackend(load_cross_encoder(folder))
    onnx_backend = OnnxBackend(folder, precision="fp32", cache_dir=tmp_path)
    batch = _batch(1)
    arrays = {k: v.numpy() for k, v in batch.items()}
    with torch.no_grad():
        for depth in (1, 2, 3, None):
            want = model(**batch, depth=depth).numpy()
            np.testing.assert_allclose(torch_backend.score(arrays, depth=depth), want, atol=1e-5)
            np.testing.assert_allclose(onnx_backend.score(arrays, depth=depth), want, atol=1e-5)
        protected = {"protected": _protected(batch).numpy()}
        want = model.forward_pruned(**batch, keep=KEEP, protected=_protected(batch)).numpy()
        np.testing.assert_allclose(
            torch_backend.score_pruned(arrays | protected, KEEP), want, atol=1e-5
        )
    served = torch_backend.serving_model(2, pruned=False)  # deltas alone: merged too
    assert served is not torch_backend.model
    assert not any(n.startswith(("lora_", "delta_")) for n, _ in served.named_parameters())


def test_an_extracted_depth_folds_its_deltas_and_drops_the_others(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, _ = folders
    model = load_cross_encoder(folder)
    batch = _batch(2)
    for depth in (2, 3):
        small = load_cross_encoder(extract_depth(folder, depth, tmp_path / f"d{depth}"))
        assert not any(n.startswith("delta_") for n, _ in small.named_parameters())
        assert small.head_depths == ()  # depth 1 has LoRA, 2 and 3 deltas: none stays exact
        with torch.no_grad():
            torch.testing.assert_close(
                small(**batch), model(**batch, depth=depth), atol=1e-5, rtol=0
            )


def test_deltas_train_and_survive_export(folders: tuple[Path, Path]) -> None:
    """Unmerged, gradients reach a depth's deltas through its forward and no other; the
    trainer exports them under their checkpoint names."""
    folder, _ = folders
    module = load_trainable(folder)
    module.freeze_base()
    batch = _batch(3)
    module.model(**batch, depth=3).sum().backward()
    grads = {n: p.grad for n, p in module.model.named_parameters() if n.startswith("delta_")}
    assert all(grads[f"delta_depth3.{n}"] is not None for n in DELTAS[3])
    assert all(grads[f"delta_depth2.{n}"] is None for n in DELTAS[2])
    assert all(
        not p.requires_grad
        for n, p in module.model.named_parameters()
        if not n.startswith(("lora_", "delta_"))
    )
    assert deltas_description(module.model)["depths"] == [2, 3]  # type: ignore[index]
    saved = load_file(str(folder / "model.safetensors"))
    exported = module.export_state()
    for depth, names in DELTAS.items():
        for name in names:
            key = f"delta_depth{depth}.{name}"
            torch.testing.assert_close(exported[key], saved[key])


def _layer_below(w: dict) -> None:
    w["delta_depth2.bert.encoder.layer.2.output.dense.bias"] = torch.zeros(32)


def _full_depth(w: dict) -> None:
    w["delta_depth4.bert.encoder.layer.0.output.dense.bias"] = torch.zeros(32)


def _pooler(w: dict) -> None:
    w["delta_depth2.bert.pooler.dense.bias"] = torch.zeros(32)


def _head(w: dict) -> None:
    w["delta_depth2.classifier.bias"] = torch.zeros(1)


def _bad_name(w: dict) -> None:
    w["delta_2.bert.encoder.layer.0.output.dense.bias"] = torch.zeros(32)


def _wrong_shape(w: dict) -> None:
    w["delta_depth2.bert.encoder.layer.0.output.dense.bias"] = torch.zeros(33)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_layer_below, r"delta_depth2\.bert\.encoder\.layer\.2\.output\.dense\.bias: depth 2 runs"),
        (_full_depth, r"deltas for depth 4 outside 1\.\.3"),
        (_pooler, r"delta_depth2\.bert\.pooler\.dense\.bias: depth 2 runs no such tensor"),
        (_head, r"delta_depth2\.classifier\.bias: depth 2 runs no such tensor"),
        (_bad_name, r"is not delta_depth\{k\}\.\{name\}"),
        (_wrong_shape, r"size mismatch for delta_depth2\.bert\.encoder\.layer\.0"),
    ],
)
def test_malformed_deltas_are_refused(
    folders: tuple[Path, Path], tmp_path: Path, change: Callable[[dict], None], message: str
) -> None:
    folder = edit_weights(folders[1], tmp_path / "bad", change)
    with pytest.raises(ModelLoadError, match=message):
        load_cross_encoder(folder)


def test_deltas_are_for_bert_family_only(tmp_path: Path) -> None:
    from tests.unit.test_jina import jina_config, write_jina_checkpoint

    folder = tmp_path / "jina"
    write_jina_checkpoint(folder, jina_config())
    weights = load_file(str(folder / "model.safetensors"))
    weights["delta_depth1.encoder.layer.0.output.dense.bias"] = torch.zeros(8)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="BERT-family models, not jina"):
        load_cross_encoder(folder)


def test_deltas_alone_make_a_depth_compensated(tmp_path: Path) -> None:
    model = CrossEncoder(
        ModelConfig.from_file(write_lora_checkpoint(tmp_path / "m") / "config.json")
    )
    assert model.compensation(2) == [] and model.depth_delta(2) is None
    model.add_depth_delta(2, ["bert.embeddings.LayerNorm.weight"])
    assert model.compensation(2) == ["depth2"] and model.compensation(None) == []

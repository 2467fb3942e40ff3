"""LoRA compensation of Matryoshka checkpoints on tiny random models: which configuration
uses which update, parity with hand-merged weights, ONNX, and refusing malformed files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rerankd.engine.backends.onnx_backend import OnnxBackend, cache_entry
from rerankd.engine.backends.torch_backend import TorchBackend
from rerankd.engine.loading import load_cross_encoder
from rerankd.engine.models.bert import LORA_TARGETS, CrossEncoder
from rerankd.engine.models.config import ModelConfig
from rerankd.errors import ModelLoadError
from rerankd.train.modeling import extract_depth
from tests.helpers import edit_weights, write_lora_checkpoint

RANK, ALPHA, LAYERS = 2, 3.0, 4
KEEP = (1.0, 0.6, 0.6, 0.6)


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Vertical LoRA at depths 1 and 3 (not 2), horizontal LoRA, every target."""
    return write_lora_checkpoint(
        tmp_path_factory.mktemp("lora") / "m", layers=LAYERS, rank=RANK, alpha=ALPHA
    )


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 29000, (4, 19), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    mask[3, 6:] = 0
    types = torch.zeros_like(ids)
    types[:, 9:] = 1
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": types * mask}


def _protected(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[CLS] and the first-segment tokens (the query) are never pruned."""
    mask = batch["attention_mask"].bool()
    return mask & (batch["token_type_ids"] == 0)


def _reference(folder: Path, kinds: tuple[str, ...]) -> CrossEncoder:
    """A plain model (no LoRA modules) whose weights were merged by hand:
    W + alpha / r * B @ A for every update of the adapters `kinds`."""
    weights = load_file(str(folder / "model.safetensors"))
    merged = {k: v.clone() for k, v in weights.items() if not k.startswith("lora_")}
    for kind in kinds:
        for name in weights:
            if name.startswith(f"lora_{kind}.") and name.endswith(".A"):
                layer, target = name[len(f"lora_{kind}.layer") : -2].split(".", 1)
                a, b = weights[name], weights[name[:-2] + ".B"]
                merged[f"bert.encoder.layer.{layer}.{target}.weight"] += ALPHA / RANK * b @ a
    model = CrossEncoder(ModelConfig.from_file(folder / "config.json"))
    model.add_depth_heads(list(range(1, LAYERS)))
    model.load_state_dict(merged)
    return model.eval()


def test_zero_b_changes_no_score(tiny_checkpoint: Path) -> None:
    base = load_cross_encoder(tiny_checkpoint)
    lora = load_cross_encoder(tiny_checkpoint)
    lora.add_lora("depth1", [0], LORA_TARGETS, RANK, ALPHA)
    lora.add_lora("keep", [0, 1], LORA_TARGETS, RANK, ALPHA)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith(".A"):
                p.normal_()  # B stays zero
    batch = _batch()
    keep = (1.0, 0.5)
    with torch.no_grad():
        for depth in (1, 2, None):
            torch.testing.assert_close(lora(**batch, depth=depth), base(**batch, depth=depth))
        torch.testing.assert_close(
            lora.forward_pruned(**batch, keep=keep, protected=_protected(batch)),
            base.forward_pruned(**batch, keep=keep, protected=_protected(batch)),
        )


def test_vertical_lora_equals_hand_merged_weights_at_its_depth_only(lora_folder: Path) -> None:
    model = load_cross_encoder(lora_folder)
    assert model.lora_spec is not None and model.lora_spec.vertical == (1, 3)
    plain = _reference(lora_folder, ())
    batch = _batch()
    with torch.no_grad():
        for k in (1, 3):  # compensated: exactly the merged weights at depth k
            want = _reference(lora_folder, (f"depth{k}",))(**batch, depth=k)
            torch.testing.assert_close(model(**batch, depth=k), want, rtol=0, atol=1e-5)
            assert not torch.allclose(want, plain(**batch, depth=k), atol=1e-3)
        # depth 2 has no LoRA, and the full depth never uses any
        for k in (2, LAYERS, None):
            torch.testing.assert_close(
                model(**batch, depth=k), plain(**batch, depth=k), rtol=0, atol=1e-6
            )


def test_horizontal_lora_applies_only_when_pruning(lora_folder: Path) -> None:
    model = load_cross_encoder(lora_folder)
    plain = _reference(lora_folder, ())
    keep_merged = _reference(lora_folder, ("keep",))
    batch = _batch(1)
    protected = _protected(batch)
    ones = (1.0,) * LAYERS
    with torch.no_grad():
        got = model.forward_pruned(**batch, keep=KEEP, protected=protected)
        want = keep_merged.forward_pruned(**batch, keep=KEEP, protected=protected)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        unpruned = plain.forward_pruned(**batch, keep=KEEP, protected=protected)
        assert not torch.allclose(got, unpruned, atol=1e-3)
        # a schedule that prunes nothing is the plain full depth
        torch.testing.assert_close(
            model.forward_pruned(**batch, keep=ones, protected=protected),
            plain(**batch),
            rtol=0,
            atol=1e-5,
        )
        # pruning at a compensated depth sums both updates (see models.bert)
        both = _reference(lora_folder, ("depth3", "keep"))
        torch.testing.assert_close(
            model.forward_pruned(**batch, keep=KEEP[:3], protected=protected),
            both.forward_pruned(**batch, keep=KEEP[:3], protected=protected),
            rtol=0,
            atol=1e-5,
        )


def test_torch_backend_serves_the_compensation_merged(lora_folder: Path) -> None:
    """Each compensated configuration runs on a copy with its updates folded in (made once,
    no LoRA modules left); it scores as the unmerged model does. Uncompensated
    configurations run on the model itself."""
    backend = TorchBackend(load_cross_encoder(lora_folder))
    model = load_cross_encoder(lora_folder)
    batch = _batch(2)
    arrays = {k: v.numpy() for k, v in batch.items()}
    protected = {"protected": _protected(batch).numpy()}
    with torch.no_grad():
        for depth in (1, 2, 3, None):
            want = model(**batch, depth=depth).numpy()
            np.testing.assert_allclose(backend.score(arrays, depth=depth), want, atol=1e-5)
        for keep in (KEEP, KEEP[:3], KEEP[:2]):  # full depth; depth 3 (both updates); depth 2
            want = model.forward_pruned(**batch, keep=keep, protected=_protected(batch))
            got = backend.score_pruned(arrays | protected, keep)
            np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    assert backend.serving_model(2, pruned=False) is backend.model  # no LoRA at depth 2
    assert backend.serving_model(None, pruned=False) is backend.model
    for config in ((1, False), (3, False), (3, True), (LAYERS, True), (2, True)):
        served = backend.serving_model(*config)
        assert served is not backend.model and served is backend.serving_model(*config)
        assert not any(n.startswith("lora_") for n, _ in served.named_parameters()), config
    assert sorted(backend._merged, key=str) == sorted(
        [(1, False), (3, False), (3, True), (LAYERS, True), (2, True)], key=str
    )


def test_onnx_graph_at_depth_k_includes_its_compensation(lora_folder: Path, tmp_path: Path) -> None:
    backend = OnnxBackend(lora_folder, precision="fp32", cache_dir=tmp_path)
    model = load_cross_encoder(lora_folder)
    batch = _batch(3)
    arrays = {k: v.numpy() for k, v in batch.items()}
    with torch.no_grad():
        for depth in (1, 3, None):
            want = model(**batch, depth=depth).numpy()
            np.testing.assert_allclose(backend.score(arrays, depth=depth), want, atol=1e-5)


def test_onnx_cache_key_follows_the_lora(lora_folder: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(lora_folder, copy)

    def key(folder: Path) -> Path:
        return cache_entry(folder, "fp32", tmp_path / "cache", depth=1)[0]

    keys = [key(copy)]
    meta = json.loads((copy / "rerankd.json").read_text())
    meta["matryoshka"]["lora"]["alpha"] = 5.0
    (copy / "rerankd.json").write_text(json.dumps(meta))
    keys.append(key(copy))  # alpha lives in rerankd.json, outside the weights' hash
    weights = load_file(str(copy / "model.safetensors"))
    weights["lora_depth1.layer0.output.dense.B"] += 1.0
    save_file(weights, str(copy / "model.safetensors"))
    keys.append(key(copy))
    assert len(set(keys)) == 3


def test_extracted_depth_folds_its_compensation(lora_folder: Path, tmp_path: Path) -> None:
    full = load_cross_encoder(lora_folder)
    batch = _batch(4)
    small = load_cross_encoder(extract_depth(lora_folder, 3, tmp_path / "d3"))
    assert small.lora_spec is None and small.head_depths == ()  # lower heads lost exactness
    plain_two = load_cross_encoder(extract_depth(lora_folder, 2, tmp_path / "d2"))
    with torch.no_grad():
        torch.testing.assert_close(small(**batch), full(**batch, depth=3), rtol=0, atol=1e-5)
        # depth 2 was not compensated: kept as is, and its uncompensated lower heads stay
        torch.testing.assert_close(plain_two(**batch), full(**batch, depth=2), rtol=0, atol=1e-6)
        assert plain_two.head_depths == ()  # depth 1 had LoRA: its head is dropped


def _rank3(w: dict) -> None:
    w["lora_depth1.layer0.attention.self.query.A"] = torch.zeros(3, 32)


def _depth4(w: dict) -> None:
    w["lora_depth4.layer0.output.dense.A"] = torch.zeros(RANK, 128)
    w["lora_depth4.layer0.output.dense.B"] = torch.zeros(32, RANK)


def _layer1_of_depth1(w: dict) -> None:
    w["lora_depth1.layer1.output.dense.A"] = torch.zeros(RANK, 128)
    w["lora_depth1.layer1.output.dense.B"] = torch.zeros(32, RANK)


def _unknown_target(w: dict) -> None:
    w["lora_depth1.layer0.attention.self.gate.A"] = torch.zeros(RANK, 32)
    w["lora_depth1.layer0.attention.self.gate.B"] = torch.zeros(32, RANK)


def _bad_name(w: dict) -> None:
    w["lora_depth1.layer0.output.dense.C"] = torch.zeros(RANK, 128)


def _missing_b(w: dict) -> None:
    del w["lora_depth3.layer2.intermediate.dense.B"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_rank3, r"size mismatch for lora_depth1\.layer0\.attention\.self\.query\.A"),
        (_depth4, r"depth 4 outside 1\.\.3"),
        (_layer1_of_depth1, r"lora_depth1 covers layers 0\.\.0, got layer 1"),
        (_unknown_target, "unknown LoRA targets"),
        (_bad_name, "is not lora_depth"),
        (_missing_b, r"missing \['lora_depth3\.layer2\.intermediate\.dense\.B'\]"),
    ],
)
def test_malformed_lora_is_refused(
    lora_folder: Path, tmp_path: Path, change: Callable[[dict], None], message: str
) -> None:
    folder = edit_weights(lora_folder, tmp_path / "bad", change)
    with pytest.raises(ModelLoadError, match=message):
        load_cross_encoder(folder)


def test_lora_needs_its_description(lora_folder: Path, tmp_path: Path) -> None:
    folder = edit_weights(lora_folder, tmp_path / "nometa", lambda w: None)
    (folder / "rerankd.json").unlink()
    with pytest.raises(ModelLoadError, match=r"need rerankd\.json's matryoshka\.lora"):
        load_cross_encoder(folder)
    lora = {"rank": RANK, "alpha": ALPHA, "vertical": [1], "horizontal": True}
    (folder / "rerankd.json").write_text(json.dumps({"matryoshka": {"lora": lora}}))
    with pytest.raises(ModelLoadError, match=r"depths \[1\].*tensors are for depths \[1, 3\]"):
        load_cross_encoder(folder)


def test_lora_is_for_bert_family_only(tmp_path: Path) -> None:
    from tests.unit.test_jina import jina_config, write_jina_checkpoint

    folder = tmp_path / "jina"
    write_jina_checkpoint(folder, jina_config())
    weights = load_file(str(folder / "model.safetensors"))
    weights["lora_depth1.layer0.output.dense.A"] = torch.zeros(RANK, 8)
    save_file(weights, str(folder / "model.safetensors"))
    lora = {"rank": RANK, "alpha": ALPHA}
    (folder / "rerankd.json").write_text(json.dumps({"matryoshka": {"lora": lora}}))
    with pytest.raises(ModelLoadError, match="BERT-family models, not jina"):
        load_cross_encoder(folder)


def test_an_adapter_may_have_a_rank_of_its_own_at_the_models_scale(
    lora_folder: Path, tmp_path: Path
) -> None:
    """`matryoshka.lora.ranks` gives depth 3 rank 4 beside the model's 2: its tensors load
    at that rank and its updates use the one scale, alpha / rank; a rank for an adapter the
    weights lack, or an adapter of another scale, is refused."""

    def rank4(w: dict) -> None:
        for name in [n for n in w if n.startswith("lora_depth3.")]:
            t = w[name]
            w[name] = torch.cat([t, torch.ones_like(t)], 0 if name.endswith(".A") else 1)

    folder = edit_weights(lora_folder, tmp_path / "r4", rank4)
    meta = json.loads((folder / "rerankd.json").read_text())
    with pytest.raises(ModelLoadError, match=r"size mismatch for lora_depth3"):
        load_cross_encoder(folder)  # no rank given for it: the model's
    meta["matryoshka"]["lora"]["ranks"] = {"depth3": 4}
    (folder / "rerankd.json").write_text(json.dumps(meta))
    model = load_cross_encoder(folder)
    assert model.lora_spec is not None and model.lora_spec.rank_of("depth3") == 4
    assert model.lora_spec.describe()["ranks"] == {"depth3": 4}
    weights = load_file(str(folder / "model.safetensors"))
    batch = _batch(5)
    by_hand = _reference(lora_folder, ())
    with torch.no_grad():
        for name in [n for n in weights if n.startswith("lora_depth3.") and n.endswith(".A")]:
            layer, target = name[len("lora_depth3.layer") : -2].split(".", 1)
            a, b = weights[name], weights[name[:-2] + ".B"]
            by_hand.get_parameter(f"bert.encoder.layer.{layer}.{target}.weight").add_(
                ALPHA / RANK * b @ a
            )
        got, want = model(**batch, depth=3), by_hand(**batch, depth=3)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    meta["matryoshka"]["lora"]["ranks"] = {"depth3": 4, "depth2": 8}
    (folder / "rerankd.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=r"ranks given for \['depth2'\]"):
        load_cross_encoder(folder)
    with pytest.raises(ValueError, match="one scale for every update"):
        model.add_lora("depth2", [0], ["output.dense"], 4, ALPHA)


def test_a_merged_copy_shares_every_tensor_it_does_not_change(lora_folder: Path) -> None:
    """Depth 1's copy owns only layer 0's folded linears; the embeddings, the other layers
    and the heads are the model's own tensors. The model still scores as before."""
    model = load_cross_encoder(lora_folder)
    batch = _batch(6)
    with torch.no_grad():
        before = model(**batch, depth=1)
        copy = model.merged(1)
        assert torch.equal(model(**batch, depth=1), before)
    mine = dict(model.named_parameters())
    own = sorted(n for n, p in copy.named_parameters() if p.data_ptr() != mine[n].data_ptr())
    assert own == sorted(f"bert.encoder.layer.0.{t}.weight" for t in LORA_TARGETS)
    pruned = model.merged(None, pruned=True)  # horizontal LoRA: every layer's linears
    own = {n for n, p in pruned.named_parameters() if p.data_ptr() != mine[n].data_ptr()}
    assert len(own) == LAYERS * len(LORA_TARGETS)
    assert "bert.embeddings.word_embeddings.weight" not in own

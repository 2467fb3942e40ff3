"""`rerankd graft-depth`: a k-layer model grafted into a Matryoshka checkpoint scores as
that model at depth k, and the checkpoint's other depths do not move."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rerankd.cli import main
from rerankd.engine.loading import load_cross_encoder
from rerankd.engine.models.bert import LORA_TARGETS
from rerankd.train.graft import graft_depth
from rerankd.train.modeling import extract_depth
from tests.helpers import write_lora_checkpoint, write_tiny_checkpoint

RANK = 2


@pytest.fixture
def teacher(tmp_path: Path) -> Path:
    """4 layers, per-depth heads, vertical LoRA at depths 1 and 3, horizontal LoRA."""
    return write_lora_checkpoint(tmp_path / "teacher", layers=4, rank=RANK, alpha=3.0)


def _student(teacher: Path, dst: Path, *, delta_rank: int = RANK, bias: float = 0.0) -> Path:
    """The teacher's depth-3 cut, then each LoRA-targeted matrix set to the teacher's plus a
    random rank-`delta_rank` update and the head redrawn: what free distillation changes."""
    extract_depth(teacher, 3, dst)
    base = load_file(str(teacher / "model.safetensors"))
    weights = load_file(str(dst / "model.safetensors"))
    gen = torch.Generator().manual_seed(7)
    for i in range(3):
        for t in LORA_TARGETS:
            name = f"bert.encoder.layer.{i}.{t}.weight"
            out, inp = base[name].shape
            b, a = (
                torch.randn(out, delta_rank, generator=gen),
                torch.randn(delta_rank, inp, generator=gen),
            )
            weights[name] = base[name] + 0.05 * b @ a
    weights["classifier.weight"] = torch.randn_like(weights["classifier.weight"], generator=gen)
    weights["bert.encoder.layer.0.output.LayerNorm.bias"] += bias
    save_file(weights, str(dst / "model.safetensors"))
    return dst


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, 3000, (3, 15), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def test_the_grafted_depth_scores_as_the_student_and_nothing_else_moves(
    teacher: Path, tmp_path: Path
) -> None:
    student = _student(teacher, tmp_path / "student")
    out, report = graft_depth(teacher, student, tmp_path / "grafted")
    before, after, alone = (load_cross_encoder(p) for p in (teacher, out, student))
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(after(**batch, depth=3), alone(**batch), atol=1e-4, rtol=0)
        assert not torch.allclose(before(**batch, depth=3), alone(**batch), atol=1e-2)
        for depth in (1, 4):  # another depth's LoRA and the full depth: untouched
            torch.testing.assert_close(after(**batch, depth=depth), before(**batch, depth=depth))
    assert report.depth == 3 and report.rank == RANK
    assert min(report.energy.values()) == pytest.approx(1.0, abs=1e-5)  # rank-2 deltas
    meta = json.loads((out / "rerankd.json").read_text())
    assert meta["matryoshka"]["lora"]["vertical"] == [1, 3]
    assert meta["matryoshka"]["heads"]["3"] == "classifier_depth3"
    assert meta["grafted"]["depth"] == 3 and meta["grafted"]["from"] == str(student)


def test_a_graft_says_what_its_rank_could_not_carry(teacher: Path, tmp_path: Path) -> None:
    student = _student(teacher, tmp_path / "student", delta_rank=8)
    _, report = graft_depth(teacher, student, tmp_path / "grafted")
    assert max(report.energy.values()) < 0.99  # rank 8 changes do not fit rank 2


def test_what_lora_cannot_reach_goes_in_as_deltas(teacher: Path, tmp_path: Path) -> None:
    """A moved LayerNorm bias: carried as a depth-3 delta the grafted depth scores as the
    student; without deltas (`--no-deltas`) it does not, and the report names it."""
    student = _student(teacher, tmp_path / "student", bias=0.5)
    out, report = graft_depth(teacher, student, tmp_path / "grafted")
    lora_only, without = graft_depth(teacher, student, tmp_path / "lora-only", deltas=False)
    name = "bert.encoder.layer.0.output.LayerNorm.bias"
    assert report.describe()["deltas_max"] == {name: pytest.approx(report.deltas[name], abs=1e-4)}
    assert report.describe()["left_out_max"] == {}  # the word embeddings did not move
    assert list(without.describe()["left_out_max"]) == [name] and without.deltas == {}
    assert f"delta_depth3.{name}" in load_file(str(out / "model.safetensors"))
    meta = json.loads((out / "rerankd.json").read_text())["matryoshka"]
    assert meta["deltas"]["depths"] == [3]
    assert "deltas" not in json.loads((lora_only / "rerankd.json").read_text())["matryoshka"]
    before, after, alone = (load_cross_encoder(p) for p in (teacher, out, student))
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(after(**batch, depth=3), alone(**batch), atol=1e-4, rtol=0)
        assert not torch.allclose(load_cross_encoder(lora_only)(**batch, depth=3), alone(**batch))
        for depth in (1, 2, 4):
            torch.testing.assert_close(after(**batch, depth=depth), before(**batch, depth=depth))
    regrafted, _ = graft_depth(out, _student(teacher, tmp_path / "s2"), tmp_path / "again")
    assert "deltas" not in json.loads((regrafted / "rerankd.json").read_text())["matryoshka"]
    assert not any(k.startswith("delta_") for k in load_file(str(regrafted / "model.safetensors")))


def test_a_depth_grafted_at_a_rank_of_its_own_leaves_the_other_adapters_as_they_were(
    teacher: Path, tmp_path: Path
) -> None:
    """Rank 4 carries a rank-4 change exactly, as depth 3's own rank: every other adapter
    keeps its tensors bit for bit, the checkpoint its rank and scale. A lower rank works
    the same way (it just carries less)."""
    student = _student(teacher, tmp_path / "student", delta_rank=4)
    low, _ = graft_depth(teacher, student, tmp_path / "r2")
    out, report = graft_depth(teacher, student, tmp_path / "r4", rank=4)
    assert report.rank == 4 and min(report.energy.values()) == pytest.approx(1.0, abs=1e-5)
    lora = json.loads((out / "rerankd.json").read_text())["matryoshka"]["lora"]
    assert (lora["rank"], lora["alpha"], lora["ranks"]) == (RANK, 3.0, {"depth3": 4})
    before_w, after_w = (load_file(str(p / "model.safetensors")) for p in (teacher, out))
    for name, t in before_w.items():
        if name.startswith(("lora_depth1.", "lora_keep.")):
            assert torch.equal(after_w[name], t), name
    assert after_w["lora_depth3.layer0.output.dense.A"].shape[0] == 4
    before, after, alone = (load_cross_encoder(p) for p in (teacher, out, student))
    assert after.lora_spec is not None and after.lora_spec.rank_of("depth3") == 4
    batch = _batch()
    protected = batch["attention_mask"].bool() & (batch["token_type_ids"] == 0)
    protected[:, 4:] = False  # [CLS] and a 3-token query
    with torch.no_grad():
        torch.testing.assert_close(after(**batch, depth=3), alone(**batch), atol=1e-4, rtol=0)
        assert not torch.allclose(load_cross_encoder(low)(**batch, depth=3), alone(**batch))
        for depth in (1, 4):
            torch.testing.assert_close(after(**batch, depth=depth), before(**batch, depth=depth))
        torch.testing.assert_close(  # the horizontal adapters prune as before
            after.forward_pruned(**batch, keep=(1.0, 0.5, 0.5, 0.5), protected=protected),
            before.forward_pruned(**batch, keep=(1.0, 0.5, 0.5, 0.5), protected=protected),
        )
    again, _ = graft_depth(out, student, tmp_path / "again")  # depth 3 keeps its rank
    assert json.loads((again / "rerankd.json").read_text())["matryoshka"]["lora"]["ranks"] == {
        "depth3": 4
    }
    back, _ = graft_depth(out, student, tmp_path / "back", rank=RANK)  # the model's rank again
    assert "ranks" not in json.loads((back / "rerankd.json").read_text())["matryoshka"]["lora"]
    one, _ = graft_depth(teacher, student, tmp_path / "r1", rank=1)
    assert json.loads((one / "rerankd.json").read_text())["matryoshka"]["lora"]["ranks"] == {
        "depth3": 1
    }
    load_cross_encoder(one)


def _with_a_depth_2_head(folder: Path, layers: int, pooling: str) -> Path:
    """A model without LoRA whose only depth head is depth 2's, reading `pooling`."""
    teacher = write_tiny_checkpoint(folder, layers=layers)
    weights = load_file(str(teacher / "model.safetensors"))
    weights["classifier_depth2.weight"] = torch.randn(1, 32)
    weights["classifier_depth2.bias"] = torch.randn(1)
    save_file(weights, str(teacher / "model.safetensors"))
    (teacher / "rerankd.json").write_text(json.dumps({"matryoshka": {"pooling": pooling}}))
    return teacher


def test_a_checkpoint_without_lora_gets_the_asked_rank(tmp_path: Path) -> None:
    teacher = _with_a_depth_2_head(tmp_path / "t", layers=3, pooling="cls")
    student = extract_depth(teacher, 2, tmp_path / "s")
    out, report = graft_depth(teacher, student, tmp_path / "g", rank=4)
    assert report.rank == 4 and min(report.energy.values()) == 1.0  # nothing to carry
    lora = json.loads((out / "rerankd.json").read_text())["matryoshka"]["lora"]
    assert (lora["rank"], lora["vertical"], lora["horizontal"]) == (4, [2], False)
    model = load_cross_encoder(out)
    batch = _batch()
    with torch.no_grad():  # the cut unchanged: a zero update, the same head
        torch.testing.assert_close(
            model(**batch, depth=2), load_cross_encoder(teacher)(**batch, depth=2)
        )


def test_a_student_on_another_pooling_brings_it_where_its_head_is_the_only_one(
    tmp_path: Path,
) -> None:
    """The depth heads share one pooling: a query-pooled student grafted into a model whose
    only depth head is the one it replaces makes that pooling the model's."""
    teacher = _with_a_depth_2_head(tmp_path / "t", layers=4, pooling="mean")
    student = extract_depth(teacher, 2, tmp_path / "s")
    meta = json.loads((student / "rerankd.json").read_text())
    (student / "rerankd.json").write_text(json.dumps(meta | {"head_pooling": "query"}))
    out, _ = graft_depth(teacher, student, tmp_path / "g", rank=4)
    assert json.loads((out / "rerankd.json").read_text())["matryoshka"]["pooling"] == "query"
    batch = _batch()
    batch["token_type_ids"][:, 6:] = batch["attention_mask"][:, 6:]
    grafted, alone, before = (load_cross_encoder(p) for p in (out, student, teacher))
    assert grafted.pooling(2) == "query" and grafted.pooling(None) == "cls"
    with torch.no_grad():
        torch.testing.assert_close(grafted(**batch, depth=2), alone(**batch), atol=1e-4, rtol=0)
        assert not torch.allclose(grafted(**batch, depth=2), before(**batch, depth=2), atol=1e-3)
        torch.testing.assert_close(grafted(**batch), before(**batch))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        ("full", "a graft replaces a depth below"),
        ("wide", "hidden_size 64"),
        ("pooling", r"the depth heads share one pooling, and .* keeps heads for depths \[1, 2\]"),
        ("rank", r"rank must be in 1\.\.32, got 33"),
    ],
)
def test_what_cannot_be_grafted_is_refused_with_the_reason(
    teacher: Path, tmp_path: Path, make: str, message: str
) -> None:
    rank = None
    if make == "full":
        student = write_tiny_checkpoint(tmp_path / "s", layers=4)
    elif make == "wide":
        student = write_tiny_checkpoint(tmp_path / "s", layers=2, hidden=64)
    else:
        student = extract_depth(teacher, 3, tmp_path / "s")
        if make == "pooling":
            (student / "rerankd.json").write_text(json.dumps({"head_pooling": "mean"}))
        rank = 33 if make == "rank" else None
    with pytest.raises(ValueError, match=message):
        graft_depth(teacher, student, tmp_path / "g", rank=rank)
    assert not (tmp_path / "g").exists()


def test_the_cli_prints_the_report_and_refuses_bad_input(
    teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    student = _student(teacher, tmp_path / "s")
    argv = ["graft-depth", "--model", str(teacher), "--student", str(student)]
    assert main([*argv, "--out", str(tmp_path / "g")]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[0])
    assert report["depth"] == 3 and report["energy_min"] == pytest.approx(1.0, abs=1e-4)
    assert main([*argv, "--rank", "33", "--out", str(tmp_path / "g2")]) == 2
    assert "rank must be in 1..32" in capsys.readouterr().err

"""The `card` stage of `scripts/build_models.py` re-renders a shipped model's card on a
machine without the build logs of its training runs, or the eval JSONs of its `ablation`
and `pruning` stages: those lines are carried over from the card's earlier render, word
for word, and the card says which were carried."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from rerankd.engine.shipped import SHIPPED, shipped_dir
from tests.helpers import REPO

_spec = importlib.util.spec_from_file_location("build_models", REPO / "scripts" / "build_models.py")
assert _spec and _spec.loader
build_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_models)


def _shipped_copy(tmp_path: Path, name: str) -> Path:
    """A models dir holding what the `card` stage reads of the shipped `name`."""
    models = tmp_path / "models"
    (models / name).mkdir(parents=True)
    for f in ("README.md", "fusion.json", "rerankd.json"):
        shutil.copy2(shipped_dir(name) / f, models / name / f)
    return models


def _config(name: str, per: dict[str, float], rho: float | None = None) -> dict:
    """An eval JSON configuration with per-query NDCG@10 `per` (and its mean)."""
    return {
        "name": name,
        "metrics": {"ndcg@10": sum(per.values()) / len(per)},
        "latency_ms": {"p50": 1.0},
        "spearman_vs_full": rho,
        "per_query": {q: {"ndcg@10": v} for q, v in per.items()},
    }


def _write_eval(build: Path, tag: str, first: dict[str, float], configs: list[dict]) -> None:
    """`build/eval/TAG.json` as `rerankd eval` writes it: one mode, its first stage, configs."""
    report = {
        "modes": {
            "run": {
                "queries": len(first),
                "first_stage_metrics": {"ndcg@10": sum(first.values()) / len(first)},
                "per_query": {"first_stage": {q: {"ndcg@10": v} for q, v in first.items()}},
                "configs": configs,
            }
        }
    }
    (build / "eval").mkdir(parents=True, exist_ok=True)
    (build / "eval" / f"{tag}.json").write_text(json.dumps(report))


def _training(card: str) -> list[str]:
    lines = card.split("## Training\n", 1)[1].split("\n## ", 1)[0].splitlines()
    return [x for x in lines if x and not x.startswith("- (the lines of")]


@pytest.mark.parametrize("name", SHIPPED)
def test_a_card_rerendered_without_build_logs_keeps_its_training_lines(
    tmp_path: Path, name: str
) -> None:
    models = _shipped_copy(tmp_path, name)
    before = (models / name / "README.md").read_text()
    after = build_models.card(tmp_path / "empty-build", name, models)
    assert _training(after) == _training(before)
    assert '"phase 4 (horizontal compensation, all else frozen)"' in after  # marked carried
    assert "| scifact | not measured |" in after  # no eval JSON here: said, not invented


def test_ablation_and_pruning_figures_are_carried_and_marked() -> None:
    """The teacher's card as shipped: its ablation fragments and pruning table survive a
    render without their eval JSONs (where a fresh eval JSON exists for the set, the row
    itself is re-rendered around the carried fragment)."""
    before = (shipped_dir("rerankd-minilm-l6") / "README.md").read_text()
    carried: list[str] = []
    ablated = build_models._ablation_figures(Path("/nonexistent"), before, carried)
    for ds in build_models.EVAL_SETS:
        row = next(x for x in before.splitlines() if x.startswith(f"| {ds} "))
        assert ablated[ds]["d2"] in row
        assert ablated[ds]["d2"].startswith("; without self-distillation ")
    assert carried == list(build_models.EVAL_SETS)
    pruning = build_models._carried_pruning(before)
    assert pruning[1] == build_models.PRUNING_HEADING
    table = [x for x in pruning if x.startswith("| ")]
    assert table and all(x in before for x in table)
    assert "earlier render of the `pruning` stage" in pruning[-1]
    # carried twice gives the same section, not a growing one
    again = build_models._carried_pruning("\n".join(pruning) + "\n\nLicence: x\n")
    assert again == pruning
    assert build_models._carried_pruning("# card without pruning\n") == []


def test_a_fresh_eval_row_keeps_the_carried_ablation_fragment(tmp_path: Path) -> None:
    name = "rerankd-minilm-l6"
    models = _shipped_copy(tmp_path, name)
    per = {"a": 0.5, "b": 0.2}
    configs = [_config("full", per), _config("full+fusion", per), _config("d2", per, 0.5)]
    _write_eval(tmp_path / "build", f"{name}.cisi", per, [*configs, _config("d2+fusion", per)])
    card = build_models.card(tmp_path / "build", name, models)
    row = next(x for x in card.splitlines() if x.startswith("| cisi "))
    old = next(
        x for x in (models / name / "README.md").read_text().splitlines() if x.startswith("| cisi ")
    )
    fragment = build_models._ABLATION_FRAGMENT.search(old).group(2)
    assert "d2: 0.350 (rho 0.50; fused 0.350" + fragment + ")" in row
    assert '"without self-distillation" figures on trec-dl-2019, cisi' in card
    assert build_models.PRUNING_HEADING in card


def test_a_run_with_neither_log_nor_earlier_line_is_an_error() -> None:
    with pytest.raises(FileNotFoundError, match="phase 9"):
        build_models._carried_lines("# card\n\n## Training\n- phase 1: x\n", "phase 9")


def test_the_fused_column_gives_the_paired_gap_and_its_error(tmp_path: Path) -> None:
    """A fused figure 0.004 above the first stage on three queries reads '+0.004, se ...'."""
    name = "rerankd-tiny-l2"
    models = _shipped_copy(tmp_path, name)
    first = {"a": 0.5, "b": 0.2, "c": 0.8}
    fused = {"a": 0.51, "b": 0.2, "c": 0.802}  # differences 0.01, 0, 0.002
    diffs = [0.01, 0.0, 0.002]
    mean = sum(diffs) / 3
    se = (sum((x - mean) ** 2 for x in diffs) / 2) ** 0.5 / 3**0.5
    configs = [_config("full", first), _config("full+fusion", fused)]
    _write_eval(tmp_path / "build", f"{name}.trec-dl-2019", first, configs)
    card = build_models.card(tmp_path / "build", name, models)
    line = next(x for x in card.splitlines() if x.startswith("| trec-dl-2019"))
    assert f"({mean:+.3f}, se {se:.3f})" in line
    assert "paired standard error" in card


def test_the_graft_lines_say_what_the_deltas_carried_and_what_was_left_out(
    tmp_path: Path,
) -> None:
    teacher = tmp_path / "minilm-l6"
    teacher.mkdir()
    grafted = {"rank": 64, "energy_min": 0.96, "energy_mean": 0.99, "deltas": 26}
    moves = {
        "deltas_max": {"bert.embeddings.token_type_embeddings.weight": 0.092},
        "left_out_max": {},
    }
    (teacher / "rerankd.json").write_text(json.dumps({"grafted": grafted | moves}))
    lines = build_models._graft_lines(teacher, "", [])
    assert "truncated SVD at rank 64" in lines[0] and "pooling" not in lines[0]
    assert lines[1:] == [
        "  - carried whole as 26 depth-2 deltas: the student's biases, LayerNorms, position "
        "and token-type embeddings and key projections (largest move: "
        "`bert.embeddings.token_type_embeddings.weight`, 9% of its norm)"
    ]
    old = {"deltas_max": {}, "left_out_max": {"bert.encoder.layer.1.output.LayerNorm.bias": 0.05}}
    (teacher / "rerankd.json").write_text(json.dumps({"grafted": grafted | old}))
    assert build_models._graft_lines(teacher, "", [])[1].startswith(
        "  - left out: what depth 2 shares with the full depth and the graft did not carry"
    )
    # the head says what it reads where the model says it
    meta = {"grafted": grafted | moves, "matryoshka": {"pooling": "query"}}
    (teacher / "rerankd.json").write_text(json.dumps(meta))
    assert (
        "head the depth-2 head (pooling: the mean of the query segment's states"
        in (build_models._graft_lines(teacher, "", [])[0])
    )

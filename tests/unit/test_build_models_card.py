"""The `card` stage of `scripts/build_models.py` re-renders a shipped model's card on a
machine without the build logs of its training runs: each run's lines are carried over
from the card's earlier render, word for word, and the card says which were carried."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from rerankd.engine.shipped import SHIPPED, shipped_dir
from tests.helpers import REPO

_spec = importlib.util.spec_from_file_location("build_models", REPO / "scripts" / "build_models.py")
assert _spec and _spec.loader
build_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_models)


def _training(card: str) -> list[str]:
    lines = card.split("## Training\n", 1)[1].split("\n## ", 1)[0].splitlines()
    return [x for x in lines if x and not x.startswith("- (the lines of")]


@pytest.mark.parametrize("name", SHIPPED)
def test_a_card_rerendered_without_build_logs_keeps_its_training_lines(
    tmp_path: Path, name: str
) -> None:
    models = tmp_path / "models"
    (models / name).mkdir(parents=True)
    for f in ("README.md", "fusion.json", "rerankd.json"):
        shutil.copy2(shipped_dir(name) / f, models / name / f)
    before = (models / name / "README.md").read_text()
    after = build_models.card(tmp_path / "empty-build", name, models)
    assert _training(after) == _training(before)
    assert '"phase 4 (horizontal compensation, all else frozen)"' in after  # marked carried
    assert "| scifact | not measured |" in after  # no eval JSON here: said, not invented


def test_a_run_with_neither_log_nor_earlier_line_is_an_error() -> None:
    with pytest.raises(FileNotFoundError, match="phase 9"):
        build_models._carried_lines("# card\n\n## Training\n- phase 1: x\n", "phase 9")

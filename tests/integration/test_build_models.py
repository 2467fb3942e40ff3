"""`make models` end to end, on a generated toy data root: every stage of
`scripts/build_models.py` (the teacher's four phases, the student, fusion, publish, eval,
ablation, pruning, card) runs as one command, with each training capped at one step and the
models published outside the package. The real recipe takes hours on 2 cores; this checks
that its one command is wired whole, not what it trains."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from rerankd.engine.factory import load_reranker
from rerankd.engine.shipped import SHIPPED, shipped_dir
from rerankd.types import Document
from tests.helpers import REPO, write_toy_beir

SETS = ("scifact", "trec-dl-2019", "cisi", "cranfield")


def toy_data_root(root: Path) -> Path:
    """The four sets the recipe reads, in their layout: SciFact with train queries beyond
    the 8 held apart, TREC DL 2019 with graded qrels and a first-stage run."""
    write_toy_beir(root / "scifact", n=24)
    write_toy_beir(root / "cisi")
    write_toy_beir(root / "cranfield")
    dl = write_toy_beir(root / "trec-dl-2019", grade=3)
    (dl / "runs").mkdir()
    docs = [f"{p}{i}" for i in range(16) for p in ("x", "d")]  # the relevant one second
    (dl / "runs" / "bm25.top100.trec").write_text(
        "".join(
            f"q{q} Q0 {d} {r + 1} {100 - r} bm25\n" for q in range(3) for r, d in enumerate(docs)
        )
    )
    return root


def _digest(folder: Path) -> str:
    return hashlib.sha256(
        b"".join(f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file())
    ).hexdigest()


def test_the_recipe_runs_end_to_end_as_one_command(tmp_path: Path) -> None:
    data = toy_data_root(tmp_path / "data")
    build, models = tmp_path / "build", tmp_path / "models"
    shipped = {name: _digest(shipped_dir(name)) for name in SHIPPED}
    cmd = [
        sys.executable, str(REPO / "scripts" / "build_models.py"), "--data", str(data),
        "--build", str(build), "--models-dir", str(models), "--max-steps", "1",
        "--dev-queries", "8",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    for stage in (
        "teacher",
        "student",
        "graft",
        "fusion",
        "publish",
        "eval",
        "ablation",
        "pruning",
    ):
        assert f"== {stage}: rerankd-minilm-l6" in proc.stdout
    for name in SHIPPED:
        card = (models / name / "README.md").read_text()
        assert "not measured" not in card
        assert all(f"| {ds} (" in card for ds in SETS), card
        assert "phase 4 (horizontal compensation" in card
        assert (models / name / "fusion.json").is_file()
        model = load_reranker(str(models / name), backend="torch")
        try:
            docs = [Document("a", "The cat eats grass."), Document("b", "The sky is blue.")]
            resp = model.rerank("what does the cat eat", docs)
            assert len(resp.results) == 2
        finally:
            model.close()
    teacher_card = (models / "rerankd-minilm-l6" / "README.md").read_text()
    assert "without self-distillation" in teacher_card  # the ablation stage's figures
    assert "- then depth 2 grafted from rerankd-tiny-l2: " in teacher_card  # the graft stage
    assert "## Token pruning (horizontal LoRA" in teacher_card  # the pruning stage's table
    assert "rho with rerankd-minilm-l6" in (models / "rerankd-tiny-l2" / "README.md").read_text()
    # the package's own models are untouched by a run published elsewhere
    assert shipped == {name: _digest(shipped_dir(name)) for name in SHIPPED}

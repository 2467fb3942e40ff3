"""bench/shipped_speed.py: what it measures, and its refusal of a malformed --model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from rerankd.engine.shipped import SHIPPED
from tests.helpers import REPO

sys.path.insert(0, str(REPO / "bench"))  # the bench imports its sibling rerank_throughput
_spec = importlib.util.spec_from_file_location("shipped_speed", REPO / "bench" / "shipped_speed.py")
assert _spec and _spec.loader
ss = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ss)


def test_the_rows_are_the_issue_targets_against_the_full_teacher() -> None:
    _label, model, depth, target = ss.SHIPPED[0]
    assert (model, depth, target) == (ss.TEACHER, 0, None)  # the baseline comes first
    assert {(m, d, t) for _, m, d, t in ss.SHIPPED[1:]} == {
        (ss.TEACHER, 2, 2.5),
        ("rerankd-tiny-l2", 0, 3.0),
    }
    assert {m for _, m, _, _ in ss.SHIPPED} == set(SHIPPED)


def test_an_extra_model_is_name_equals_folder(tmp_path: Path) -> None:
    assert ss.parse_extra([f"trial={tmp_path}"]) == [("trial", str(tmp_path), 0, 3.0)]
    for bad in ("trial", f"={tmp_path}", "trial=", f"trial={tmp_path / 'missing'}"):
        with pytest.raises(SystemExit, match="--model"):
            ss.parse_extra([bad])

"""bench/matryoshka_curve.py: the configuration grid, the monotonic check and the plot,
on made-up numbers (the bench itself needs DL19 and minutes of CPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.helpers import REPO

_spec = importlib.util.spec_from_file_location(
    "matryoshka_curve", REPO / "bench" / "matryoshka_curve.py"
)
assert _spec and _spec.loader
mc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mc)


def rows(speed: dict[tuple[int, float], float], model: str = "m") -> list[dict]:
    return [{"model": model, "depth": d, "keep": k, "pairs_s": s} for (d, k), s in speed.items()]


def ideal(layers: int, pruning: bool = True) -> dict[tuple[int, float], float]:
    """Cost = layer 1 in full + later layers at the keep ratio: strictly monotonic."""
    return {
        (d, k): 1000 / (1 + (d - 1) * k)
        for d, k in mc.configurations(layers, depth_ok=True, pruning_ok=pruning)
    }


def test_configurations_full_model_first_and_no_pruning_at_depth_1() -> None:
    grid = mc.configurations(6, depth_ok=True, pruning_ok=True)
    assert grid[0] == (6, 1.0)
    assert len(grid) == 5 * 4 + 1
    assert [c for c in grid if c[0] == 1] == [(1, 1.0)]
    assert mc.configurations(4, depth_ok=True, pruning_ok=False) == [(d, 1.0) for d in (4, 3, 2, 1)]
    assert mc.configurations(2, depth_ok=False, pruning_ok=True) == [(2, r) for r in mc.RATIOS]


def test_request_options() -> None:
    assert mc.request_options((6, 1.0), 6) == {}
    assert mc.request_options((3, 1.0), 6) == {"depth": 3}
    assert mc.request_options((6, 0.5), 6) == {"keep_ratio": 0.5, "keep_from_layer": 2}


def test_monotonic_curves_pass() -> None:
    for layers, pruning in ((6, True), (2, True), (4, False)):
        assert mc.monotonic_violations(rows(ideal(layers, pruning))) == []
    line = mc.monotonic_line("MiniLM-L6", rows(ideal(6)))
    assert line.startswith("MiniLM-L6: monotonic: yes")


def test_violations_in_depth_and_keep_are_named() -> None:
    speed = ideal(6)
    speed[3, 0.5] = speed[4, 0.5] * 0.9  # depth fell, speed fell
    bad = mc.monotonic_violations(rows(speed))
    assert any(v.startswith("depth 4->3 at keep 0.50") for v in bad)
    assert any(v.startswith("keep 0.75->0.50 at depth 3") for v in bad)
    assert "monotonic: no" in mc.monotonic_line("MiniLM-L6", rows(speed))


def test_depth_1_ends_every_keep_curve() -> None:
    speed = ideal(2)
    assert [d for d, _ in mc.curve(rows(speed), 0.25)] == [1, 2]
    speed[1, 1.0] = speed[2, 0.25] * 0.99  # depth 1 slower than depth 2 pruned to 25%
    assert mc.monotonic_violations(rows(speed)) == [
        f"depth 2->1 at keep 0.25: {speed[2, 0.25]:.0f} -> {speed[1, 1.0]:.0f} pairs/s"
    ]


def test_plot_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    data = rows(ideal(6), "MiniLM-L6") + rows(ideal(4, pruning=False), mc.JINA)
    out = tmp_path / "curve.png"
    mc.write_plot(out, data, ["MiniLM-L6", mc.JINA], "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

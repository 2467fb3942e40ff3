"""Fusion over the wire: a model folder with fusion.json, served, asked with fusion=auto."""

from __future__ import annotations

import shutil

import httpx
import numpy as np
import pytest

from rerankd import RerankClient
from rerankd.engine.bundled import resolve_source
from rerankd.engine.fusion import FusionParams, fuse
from rerankd.server.process import spawn_sidecar

QUERY = "how do cats sleep"
DOCS = [
    "the stock market fell sharply today",
    "cats sleep for most of the day, curled up somewhere warm",
    "a recipe for bread with three ingredients",
    "dogs bark at night when they hear noises",
    "kittens and cats nap in the sun",
    "interest rates were raised again",
]


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("fused") / "model"
    shutil.copytree(resolve_source("bundled:splade-tiny"), folder)
    FusionParams(0.6, gate=-1.0, fitted_on={"queries": 0, "note": "test"}).save(folder)
    proc = spawn_sidecar(
        [
            "--model",
            f"fused={folder}",
            "--backend",
            "torch",
            "--dense-encoder",
            "",
            "--sparse-encoder",
            "",
            "--cache-entries",
            "0",
            "--log-level",
            "WARNING",
        ]
    )
    yield proc
    proc.stop()


def test_fusion_auto_fuses_with_the_request_order(sidecar) -> None:
    with RerankClient(sidecar.address) as client:
        (info,) = client.list_models()
        assert info.supports_fusion
        plain = client.rerank(QUERY, DOCS)
        fused = client.rerank(QUERY, DOCS, fusion="auto")
    assert plain.fusion_weight == 0.0
    assert fused.fusion_weight == pytest.approx(0.6)
    raw = np.empty(len(DOCS))
    for r in plain.results:
        raw[r.index] = r.score
        assert r.model_score == pytest.approx(r.score)
    want, _ = fuse(raw, FusionParams(0.6))
    assert [r.index for r in fused.results] == list(np.argsort(-want, kind="stable"))
    for r in fused.results:
        assert r.score == pytest.approx(want[r.index], abs=1e-5)
        assert r.model_score == pytest.approx(raw[r.index], abs=1e-5)


def test_fusion_keeps_the_first_stage_order_for_a_configuration_it_was_not_fitted_for(
    sidecar,
) -> None:
    """The fitted weight belongs to the full model: a shallower or pruned request under
    fusion=auto keeps the documents' (first-stage) order, and says so with weight 0."""
    with RerankClient(sidecar.address) as client:
        shallow = client.rerank(QUERY, DOCS, fusion="auto", depth=1)
        pruned = client.rerank(QUERY, DOCS, fusion="auto", keep_ratio=0.5)
        full = client.rerank(QUERY, DOCS, fusion="auto", depth=2)  # every layer: fitted
        model_only = client.rerank(QUERY, DOCS, depth=1)
    for resp in (shallow, pruned):
        assert resp.fusion_weight == 0.0
        assert [r.index for r in resp.results] == list(range(len(DOCS)))
    # the model's own depth-1 scores still come back, and would have reordered the list
    assert [r.model_score for r in sorted(shallow.results, key=lambda r: r.index)] == (
        pytest.approx([r.score for r in sorted(model_only.results, key=lambda r: r.index)])
    )
    assert [r.index for r in model_only.results] != list(range(len(DOCS)))
    assert full.fusion_weight == pytest.approx(0.6)


def test_fusion_over_http_reports_the_weight(sidecar) -> None:
    body = {"query": QUERY, "documents": DOCS, "fusion": "auto"}
    resp = httpx.post(f"{sidecar.http_url}/v1/rerank", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["meta"]["fusion_weight"] == pytest.approx(0.6)
    assert all("model_score" in r for r in out["results"])
    bad = httpx.post(f"{sidecar.http_url}/v1/rerank", json={**body, "fusion": "always"})
    assert bad.status_code == 422 and "fusion" in bad.text

"""Several models in one sidecar, chosen per request; the score cache over the wire."""

from __future__ import annotations

import httpx
import pytest

from rerankd import RerankClient, UnknownModelError
from rerankd.server.process import spawn_sidecar

DOCS = ["a cat sat on the mat", "dogs bark at night", "the stock market fell"]


@pytest.fixture(scope="module")
def sidecar():
    proc = spawn_sidecar(
        [
            "--model",
            "tiny=bundled:splade-tiny",
            "--model",
            "minilm=bundled:all-minilm-l6-v2",
            "--backend",
            "torch",
            "--max-length",
            "64",
            "--cache-entries",
            "1000",
            "--dense-encoder",
            "",
            "--sparse-encoder",
            "",
            "--log-level",
            "WARNING",
        ]
    )
    yield proc
    proc.stop()


def test_models_are_listed_and_chosen_per_request(sidecar) -> None:
    with RerankClient(sidecar.address) as client:
        models = client.list_models()
        assert [(m.name, m.num_layers, m.is_default) for m in models] == [
            ("tiny", 2, True),
            ("minilm", 6, False),
        ]
        default = client.rerank("cats", DOCS)
        tiny = client.rerank("cats", DOCS, model="tiny")
        minilm = client.rerank("cats", DOCS, model="minilm")
        assert (default.model, tiny.model, minilm.model) == ("tiny", "tiny", "minilm")
        assert [r.score for r in default.results] == [r.score for r in tiny.results]
        assert [r.score for r in minilm.results] != [r.score for r in tiny.results]
        with pytest.raises(UnknownModelError, match=r"loaded models: \['minilm', 'tiny'\]"):
            client.rerank("cats", DOCS, model="large")


def test_cache_hits_are_reported_in_usage_and_metrics(sidecar) -> None:
    def hits_metric() -> float:
        text = httpx.get(f"{sidecar.http_url}/metrics").text
        lines = [ln for ln in text.splitlines() if ln.startswith("rerankd_cache_hits_total")]
        return float(lines[0].split()[-1])

    with RerankClient(sidecar.address) as client:
        query = "a query only this test sends"
        first = client.rerank(query, DOCS, model="minilm")
        before = hits_metric()
        second = client.rerank(query, DOCS, model="minilm")
        assert (first.cache_hits, second.cache_hits) == (0, 3)
        assert [r.score for r in second.results] == [r.score for r in first.results]
        assert second.tokens == 0
        assert hits_metric() == before + 3
        # another model never reads minilm's cached scores
        assert client.rerank(query, DOCS, model="tiny").cache_hits == 0

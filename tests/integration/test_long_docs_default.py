"""A model's own `long_docs` default over the wire: a request that leaves it unset gets what
the model's rerankd.json says (rerankd-trained models: the first window, as they trained),
ListModels reports it, a request's own value wins, and the score cache keeps them apart."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from rerankd import RerankClient
from rerankd.engine.bundled import resolve_source
from rerankd.server.process import spawn_sidecar
from tests.integration.sidecars import NO_ENCODERS

QUERY = "how do cats sleep"
LONG = "cats sleep curled up somewhere warm. " * 40  # several 32-token windows
DOCS = ["kittens nap in the sun", LONG]


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("long-docs")
    plain, trained = root / "plain", root / "trained"
    for folder in (plain, trained):
        shutil.copytree(resolve_source("bundled:splade-tiny"), folder)
    (trained / "rerankd.json").write_text(json.dumps({"long_docs": "truncate"}))
    args = ["--model", f"trained={trained}", "--model", f"plain={plain}", "--backend", "torch"]
    args += ["--max-length", "32", "--cache-entries", "1000", "--log-level", "WARNING"]
    proc = spawn_sidecar([*args, *NO_ENCODERS])
    yield proc
    proc.stop()


def _long_score(resp) -> float:
    return next(r.score for r in resp.results if r.index == 1)


def test_an_unset_long_docs_is_the_models_default_over_grpc(sidecar) -> None:
    with RerankClient(sidecar.address) as client:
        infos = {m.name: m.default_long_docs for m in client.list_models()}
        assert infos == {"trained": "truncate", "plain": "max"}
        best = client.rerank(QUERY, DOCS, model="trained", long_docs="max")
        unset = client.rerank(QUERY, DOCS, model="trained")
        first = client.rerank(QUERY, DOCS, model="trained", long_docs="truncate")
        # unset reads one window (not a cache hit of the max call: another cache entry)
        assert unset.cache_hits == 0 and 0 < unset.tokens < best.tokens
        # and is the very entry an explicit truncate asks for
        assert first.cache_hits == 2 and _long_score(first) == _long_score(unset)
        other = client.rerank(QUERY, DOCS, model="plain")
        assert other.tokens == best.tokens  # a model that does not say reads every window


def test_an_omitted_long_docs_is_the_models_default_over_http(sidecar) -> None:
    calls = iter(range(100))

    def tokens(**body) -> int:
        """Tokens computed for a fresh query of the same length (no cache hit)."""
        query = f"{QUERY} {next(calls)}"
        r = httpx.post(
            f"{sidecar.http_url}/v1/rerank",
            json={"query": query, "documents": DOCS, **body},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        return r.json()["usage"]["total_tokens"]

    assert tokens(model="trained") == tokens(model="trained", long_docs="truncate")
    assert tokens(model="trained") < tokens(model="trained", long_docs="max")
    assert tokens(model="plain") == tokens(model="plain", long_docs="max")

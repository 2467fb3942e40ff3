"""hybrid_search's own rules, with test doubles for the DB and the sidecar (the real
ones are in tests/integration/test_hybrid_search.py): what the sidecar's timeout covers,
which sidecar errors may fail open, and what a stored document may hold."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from rerankd.client import Embeddings
from rerankd.connectors.base import Connector, FirstStageQuery, IndexRecord
from rerankd.errors import (
    AuthenticationError,
    InvalidInputError,
    OverloadedError,
    RerankdError,
    UnavailableError,
    UnknownModelError,
)
from rerankd.search import MAX_DOCUMENT_CHARS, hybrid_search
from rerankd.types import Candidate, RerankResponse, RerankResult


class SlowDbDouble(Connector):
    """Stands for a DB whose search takes `seconds` and holds `texts`."""

    db = "double"

    def __init__(self, texts: Sequence[str], seconds: float = 0.0) -> None:
        self.texts, self.seconds = list(texts), seconds

    def first_stage(
        self, collection: str, query: FirstStageQuery, *, limit: int, filter: Any = None
    ) -> list[Candidate]:
        time.sleep(self.seconds)  # the simulated search itself, not a synchronisation
        return [Candidate(f"d{i}", t, 1.0 / (i + 1), i + 1) for i, t in enumerate(self.texts)]

    def create_collection(self, collection: str, *, dense_dim: int, recreate: bool = False):
        raise NotImplementedError

    def upsert(self, collection: str, records: Sequence[IndexRecord]) -> None:
        raise NotImplementedError


class SidecarDouble:
    """Records what hybrid_search sends; answers in order, or raises `error`."""

    def __init__(self, error: RerankdError | None = None) -> None:
        self.error = error
        self.calls: list[tuple[str, Any, float | None]] = []

    def embed(self, texts: list[str], **kw: Any) -> Embeddings:
        self.calls.append(("embed", texts, kw["timeout"]))
        return Embeddings(np.ones((1, 4), np.float32), None, "dense", "")

    def rerank(self, query: str, docs: list[tuple[str, str]], **kw: Any) -> RerankResponse:
        self.calls.append(("rerank", docs, kw["timeout"]))
        if self.error is not None:
            raise self.error
        return RerankResponse([RerankResult(i, d, 1.0 - i) for i, (d, _) in enumerate(docs)], "m")


def _search(db: Connector, sidecar: SidecarDouble, **kw: Any):
    return hybrid_search(
        "c",
        "q",
        connector=db,
        client=sidecar,
        mode="dense",
        **kw,  # type: ignore[arg-type]
    )


def test_the_db_search_is_not_charged_to_the_sidecars_timeout() -> None:
    sidecar = SidecarDouble()
    res = _search(SlowDbDouble(["a", "b"], seconds=0.4), sidecar, timeout=0.3)
    assert res.reranked, res.reason
    (_, _, embed_timeout), (_, _, rerank_timeout) = sidecar.calls
    assert embed_timeout == pytest.approx(0.3, abs=0.01)
    # what embedding left of the 0.3 s, not 0.3 - 0.4 s of DB time
    assert 0.25 < rerank_timeout <= embed_timeout


@pytest.mark.parametrize(
    ("error", "fails_open"),
    [
        (UnavailableError("down"), True),
        (OverloadedError("queue full"), True),
        (RerankdError("INTERNAL: a server bug"), True),
        (InvalidInputError("bad"), False),
        (UnknownModelError("unknown model 'x'"), False),
        (AuthenticationError("wrong token"), False),
    ],
)
def test_outages_fail_open_and_setup_mistakes_raise(error: RerankdError, fails_open: bool) -> None:
    db = SlowDbDouble(["a", "b"])
    if fails_open:
        res = _search(db, SidecarDouble(error))
        assert not res.reranked and type(error).__name__ in res.reason
        assert [h.id for h in res.hits] == ["d0", "d1"]
    else:
        with pytest.raises(type(error)):
            _search(db, SidecarDouble(error))


def test_a_stored_document_is_sent_cut_and_well_formed_but_returned_whole() -> None:
    long_text = "x" * (MAX_DOCUMENT_CHARS + 5000)
    broken = "half a pair \ud800 here"
    sidecar = SidecarDouble()
    res = _search(SlowDbDouble([long_text, broken, "plain"]), sidecar)
    (_, _, _), (_, sent, _) = sidecar.calls
    assert [len(t) for _, t in sent] == [MAX_DOCUMENT_CHARS, len(broken), 5]
    assert sent[1][1] == "half a pair \ufffd here"
    assert [h.text for h in res.hits] == [long_text, broken, "plain"]  # the DB's own text


def test_bad_arguments_are_refused_before_any_call() -> None:
    sidecar = SidecarDouble()
    db = SlowDbDouble(["a"])
    with pytest.raises(InvalidInputError, match="query_text is empty"):
        hybrid_search("c", [0.1, 0.2], query_text="  ", connector=db, client=sidecar)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="timeout must be > 0 seconds or None"):
        _search(db, sidecar, timeout=0)
    assert sidecar.calls == []

"""The client without a server: its retry schedule (fail over to an untried replica at
once, back off only after every address failed in the round), its deadlines, and requests
refused with InvalidInputError before they are sent."""

from __future__ import annotations

import socket

import pytest

from rerankd.client import (
    RerankClient,
    _Policy,
    build_embed_request,
    build_rerank_request,
    make_options,
)
from rerankd.errors import InvalidInputError, UnavailableError
from rerankd.types import Document


def _policy(n: int) -> _Policy:
    return _Policy(n, timeout=10.0, retries=8, backoff=0.1, max_backoff=0.5)


def test_a_single_address_backs_off_exponentially_with_jitter_up_to_the_cap() -> None:
    policy = _policy(1)
    for attempt, base in enumerate([0.1, 0.2, 0.4, 0.5, 0.5]):
        pauses = [policy.pause(attempt) for _ in range(200)]
        assert all(base / 2 <= p <= base for p in pauses), (attempt, min(pauses), max(pauses))
        assert max(pauses) - min(pauses) > base / 10  # jittered, not in step


def test_two_replicas_fail_over_at_once_and_back_off_per_round() -> None:
    policy = _policy(2)
    assert [policy.pause(a) for a in (0, 2, 4)] == [0.0, 0.0, 0.0]  # the other one is untried
    assert 0.05 <= policy.pause(1) <= 0.1  # both failed once: the first round's backoff
    assert 0.1 <= policy.pause(3) <= 0.2  # both failed twice


def test_retries_walk_every_address_from_the_pick() -> None:
    policy = _policy(3)
    k = policy.pick()
    seen = [k]
    for _ in range(5):
        k = policy.after(k)
        seen.append(k)
    assert seen == [0, 1, 2, 0, 1, 2]


def test_a_call_without_a_deadline_is_refused() -> None:
    with pytest.raises(ValueError, match="timeout must be > 0"):
        _Policy(1, timeout=0, retries=1, backoff=0.1, max_backoff=1)


def test_a_call_timeout_of_zero_is_refused_not_taken_as_the_default() -> None:
    policy = _policy(1)
    assert policy.budget(None) == 10.0 and policy.budget(0.5) == 0.5
    with pytest.raises(InvalidInputError, match="timeout must be > 0 seconds, got 0"):
        policy.budget(0)


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed


def test_a_sidecar_that_stays_down_is_unavailable_not_a_timeout() -> None:
    """Real gRPC on loopback: every attempt is refused until the deadline passes inside a
    backoff; the error says the sidecar is down, not that it was slow."""
    with RerankClient(_dead_address(), timeout=0.3, retries=50, backoff=0.05) as client:
        with pytest.raises(UnavailableError, match=r"still unavailable when the 0\.300 s"):
            client.rerank("q", ["a"])
        with pytest.raises(InvalidInputError, match="timeout must be > 0"):
            client.rerank("q", ["a"], timeout=0)


@pytest.mark.parametrize(
    ("documents", "message"),
    [
        ([{"id": "x"}], r"documents\[0\] must be a str, a Document, an \(id, text\) pair"),
        ([("only-id",)], r"documents\[0\] must be a str"),
        ([("a", "fine"), 5], r"documents\[1\] must be a str"),
        ([("a", 5)], r"documents\[0\]\.text must be a string, got int"),
        ([Document("a", "ok \ud800")], r"documents\[0\]\.text is not valid Unicode.*U\+D800"),
        ([{"id": "\udfff", "text": "t"}], r"documents\[0\]\.id is not valid Unicode"),
    ],
)
def test_malformed_documents_are_refused_naming_the_document(documents: list, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        build_rerank_request("q", documents, 0, "", make_options())


def test_malformed_queries_and_texts_are_refused_naming_the_field() -> None:
    with pytest.raises(InvalidInputError, match=r"query is not valid Unicode.*character 2"):
        build_rerank_request("q \ud800", ["a"], 0, "", make_options())
    with pytest.raises(InvalidInputError, match=r"texts\[1\] is not valid Unicode"):
        build_embed_request(["ok", "bad \ud800"], True, False, "query", "", "", True)
    with pytest.raises(InvalidInputError, match="not one string"):
        build_embed_request("one", True, False, "query", "", "", True)  # type: ignore[arg-type]
    req = build_rerank_request("q", ["a", ("i", "b"), {"text": "c"}], 0, "", make_options())
    assert [(d.id, d.text) for d in req.documents] == [("0", "a"), ("i", "b"), ("2", "c")]

"""The client's retry schedule: fail over to an untried replica at once, back off only
after every address has failed in the current round."""

from __future__ import annotations

import pytest

from rerankd.client import _Policy


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

"""Credit assignment: each policy on a three-turn session, per-turn feedback winning, the latest row counting."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from store.credit import Rating, Turn, assign, assign_all, session_shares

# Given out of order on purpose: turns are credited in turn_index order.
TURNS = [Turn("c", 2), Turn("a", 0), Turn("b", 1)]
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def rating(value: float, span_id: str | None = None, *, name: str = "reward", minute: int = 0) -> Rating:
    return Rating(span_id, name, value, T0 + timedelta(minutes=minute))


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("last", {"a": None, "b": None, "c": 2.0}),
        ("broadcast", {"a": 2.0, "b": 2.0, "c": 2.0}),
        ("discounted", {"a": pytest.approx(2.0 * 0.5**2), "b": 1.0, "c": 2.0}),
    ],
)
def test_each_policy_spreads_a_session_reward(policy: str, expected: dict) -> None:
    assert assign(TURNS, [rating(2.0)], policy=policy, discount=0.5) == expected


@pytest.mark.parametrize("policy", ["last", "broadcast", "discounted"])
def test_feedback_on_a_turn_wins_over_the_policy(policy: str) -> None:
    got = assign(TURNS, [rating(0.1, "a"), rating(2.0), rating(-1.0, "c")], policy=policy, discount=0.5)
    assert got["a"] == 0.1 and got["c"] == -1.0
    assert got["b"] == {"last": None, "broadcast": 2.0, "discounted": 1.0}[policy]


def test_without_a_session_reward_only_rated_turns_have_one() -> None:
    assert assign(TURNS, [rating(0.7, "b")], policy="broadcast", discount=0.9) == {"a": None, "b": 0.7, "c": None}
    assert assign(TURNS, [], policy="discounted", discount=0.9) == {"a": None, "b": None, "c": None}


def test_the_latest_row_of_a_name_counts_whatever_the_input_order() -> None:
    ratings = [rating(5.0, minute=3), rating(1.0, minute=1), rating(0.0, "a", minute=9), rating(1.0, "a", minute=2)]
    assert assign(TURNS, ratings, policy="broadcast", discount=0.9) == {"a": 0.0, "b": 5.0, "c": 5.0}


def test_names_are_credited_separately() -> None:
    ratings = [rating(1.0), rating(1.0, "a", name="thumbs"), rating(-3.0, name="cost")]
    assert assign(TURNS, ratings, policy="last", discount=0.9, name="thumbs") == {"a": 1.0, "b": None, "c": None}
    assert assign_all(TURNS, ratings, policy="last", discount=0.9) == {
        "a": {"thumbs": 1.0},
        "b": {},
        "c": {"cost": -3.0, "reward": 1.0},
    }


def test_feedback_for_a_call_outside_the_turns_is_ignored() -> None:
    got = assign(TURNS, [rating(9.0, "failed-call"), rating(1.0)], policy="last", discount=0.9)
    assert got == {"a": None, "b": None, "c": 1.0}


def test_shares_and_an_unknown_policy() -> None:
    assert session_shares("discounted", 3, 0.9) == [pytest.approx(0.81), 0.9, 1.0]
    assert session_shares("last", 0, 0.9) == [] and session_shares("last", 1, 0.9) == [1.0]
    with pytest.raises(ValueError, match="credit policy must be one of last, broadcast, discounted"):
        session_shares("first", 3, 0.9)

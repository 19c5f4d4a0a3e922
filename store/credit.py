"""Credit assignment: from the rewards a session received to one reward per turn.

Feedback arrives for a whole session (``span_id`` null) or for one call (a turn). A policy decides what a
session reward means for each of the session's ``T`` turns, ``t = 0 .. T-1`` in turn order:

* ``last``: the last turn gets the session reward; the others get none (they are unrewarded, not zero).
* ``broadcast``: every turn gets the session reward.
* ``discounted``: turn ``t`` gets ``reward * discount ** (T - 1 - t)``: the last turn the whole reward, earlier
  turns less and less.

Feedback on a turn itself always wins over what the policy derives for that turn. Rewards are named (several
per target; the default name is ``"reward"``); each name is credited on its own, and when one target has several
rows of a name the latest (by ``created_at``, then by input order) counts. The turns are those passed in, e.g. a
session's successful calls: ``T`` counts them, whatever their ``turn_index`` values.

Everything here is a pure function of its arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import NamedTuple

POLICIES = ("last", "broadcast", "discounted")
DEFAULT_NAME = "reward"


class Turn(NamedTuple):
    """One call of a session."""

    span_id: str
    turn_index: int


class Rating(NamedTuple):
    """One feedback row: for the turn ``span_id``, or for the whole session when ``span_id`` is None."""

    span_id: str | None
    name: str
    value: float
    created_at: datetime


def session_shares(policy: str, turns: int, discount: float) -> list[float | None]:
    """The factor of the session reward each of ``turns`` turns gets under ``policy`` (None: no reward)."""
    if policy == "last":
        return [None] * (turns - 1) + [1.0] if turns else []
    if policy == "broadcast":
        return [1.0] * turns
    if policy == "discounted":
        return [discount ** (turns - 1 - t) for t in range(turns)]
    raise ValueError(f"credit policy must be one of {', '.join(POLICIES)}, not {policy!r}")


def assign(
    turns: Sequence[Turn],
    ratings: Iterable[Rating],
    *,
    policy: str,
    discount: float,
    name: str = DEFAULT_NAME,
) -> dict[str, float | None]:
    """The reward of each turn (by span id) for the rewards called ``name``; None where there is none."""
    session, per_turn = _latest(ratings, name)
    ordered = sorted(turns, key=lambda turn: turn.turn_index)
    shares = session_shares(policy, len(ordered), discount)
    out: dict[str, float | None] = {}
    for turn, share in zip(ordered, shares, strict=True):
        derived = session * share if session is not None and share is not None else None
        out[turn.span_id] = per_turn.get(turn.span_id, derived)
    return out


def assign_all(
    turns: Sequence[Turn], ratings: Iterable[Rating], *, policy: str, discount: float
) -> dict[str, dict[str, float]]:
    """Every named reward of each turn (by span id), each name credited by :func:`assign`; unrewarded names left out."""
    ratings = list(ratings)
    out: dict[str, dict[str, float]] = {turn.span_id: {} for turn in turns}
    for name in sorted({rating.name for rating in ratings}):
        for span_id, value in assign(turns, ratings, policy=policy, discount=discount, name=name).items():
            if value is not None:
                out[span_id][name] = value
    return out


def _latest(ratings: Iterable[Rating], name: str) -> tuple[float | None, dict[str, float]]:
    """The latest session-wide value of ``name`` and the latest value of ``name`` per turn."""
    session: Rating | None = None
    per_turn: dict[str, Rating] = {}
    for rating in ratings:
        if rating.name != name:
            continue
        if rating.span_id is None:
            if session is None or rating.created_at >= session.created_at:
                session = rating
        else:
            earlier = per_turn.get(rating.span_id)
            if earlier is None or rating.created_at >= earlier.created_at:
                per_turn[rating.span_id] = rating
    return (session.value if session else None), {span_id: r.value for span_id, r in per_turn.items()}

"""The online evaluation's rule (``optimizers.canary.decide``) on given evidence; the end-to-end canary, with real
sessions through the proxy and a real vLLM, is in ``tests/test_optimizer_loop.py``."""

from __future__ import annotations

import statistics

import pytest

from optimizers.canary import EARLY_STOP_SESSIONS, Arm, decide


def arm(*rewards: float) -> Arm:
    return Arm(len(rewards), statistics.fmean(rewards), statistics.variance(rewards) if len(rewards) > 1 else 0.0)


def test_it_waits_until_each_arm_has_enough_rewarded_sessions() -> None:
    assert decide({"active": arm(1, 0, 1), "candidate": arm(1, 1)}, 3) is None
    assert decide({"candidate": arm(1, 1, 1)}, 3) is None


@pytest.mark.parametrize(
    ("candidate", "promote"),
    [((1, 0, 1), True), ((0.5, 0.5, 2 / 3), True), ((0, 1, 0.5), False)],
    ids=["better", "as good", "a little worse"],
)
def test_with_enough_sessions_the_candidate_is_promoted_iff_its_mean_is_at_least_the_active_one(
    candidate: tuple[float, ...], promote: bool
) -> None:
    decision = decide({"active": arm(1, 0, 2 / 3), "candidate": arm(*candidate)}, 3)
    assert decision is not None and decision[0] is promote


def test_a_clearly_worse_candidate_is_retired_before_the_minimum() -> None:
    active, worse = arm(*[1.0] * EARLY_STOP_SESSIONS), arm(*[0.0] * EARLY_STOP_SESSIONS)
    assert decide({"active": active, "candidate": worse}, 100) == (
        False,
        "clearly worse, stopped early: canary mean reward 0.000 vs active 1.000 over 5 (candidate) and 5 (active) "
        "rewarded sessions (z = inf > 2.33)",
    )
    # With fewer sessions, or with rewards too noisy to tell, it waits.
    assert decide({"active": arm(1, 1, 1, 1), "candidate": arm(0, 0, 0, 0)}, 100) is None
    assert decide({"active": arm(1, 0, 1, 1, 0), "candidate": arm(0, 1, 0, 1, 0)}, 100) is None

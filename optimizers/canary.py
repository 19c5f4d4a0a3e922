"""The online evaluation's evidence and rule: which arm of a canary does better, and when that is known.

A canary routes a fraction of *new* sessions to the candidate, chosen by a hash of the session id; a session
keeps the version it started with. The evidence, per arm: the sessions that began after the canary started,
served by the candidate (any of their calls) or not, that have at least one ``reward``; a session's reward is
the mean of its rewards. Sessions that began earlier are left out: all of them were on the active version, and
their rewards may predate the canary, so they would not compare like with like.

The rule, checked every few seconds until ``eval_timeout``:

* **retire early** when, with at least ``EARLY_STOP_SESSIONS`` rewarded sessions in each arm, the candidate is
  clearly worse: the one-sided statistic z = (mean_active - mean_candidate) / sqrt(var_active / n_active +
  var_candidate / n_candidate) (Welch's, sample variances) is above ``EARLY_STOP_Z``. 2.33 is a one-sided p of
  0.01 under a normal approximation; with few sessions per arm (t with ~8 degrees of freedom) it is nearer
  0.025, and looking again at every poll raises it further. Those errors retire a candidate that was not
  clearly better, the safe side; the gain is that a bad candidate stops serving users as soon as it shows.
* otherwise, once each arm has ``eval_min_sessions`` rewarded sessions: **promote iff the candidate's mean reward
  is at least the active version's**, else retire. This compares point estimates: with noisy rewards and few
  sessions a slightly worse candidate can pass; raise ``eval_min_sessions`` for a firmer answer.
* at ``eval_timeout`` without that evidence: retire (no evidence, no promotion).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import duckdb

EARLY_STOP_SESSIONS = 5  # rewarded sessions each arm needs before a candidate may be retired early
EARLY_STOP_Z = 2.33  # how clearly worse (one-sided z) a candidate must be to be retired early
ARMS = ("active", "candidate")
VERSION_COLUMNS = ("adapter_version", "memory_version")


@dataclass(frozen=True, slots=True)
class Arm:
    """One arm's rewarded sessions: how many, their mean reward and its sample variance (0 for one session)."""

    sessions: int = 0
    mean: float = 0.0
    variance: float = 0.0

    def public(self) -> dict[str, Any]:
        return {"sessions": self.sessions, "mean": self.mean if self.sessions else None}


def arm_rewards(
    con: duckdb.DuckDBPyConnection, since: datetime, version: str, *, column: str = "adapter_version"
) -> dict[str, Arm]:
    """Each arm's evidence: the rewarded sessions that began at or after ``since``, by whether ``version``
    served any of their calls (``column``: ``adapter_version``, or ``memory_version`` for a memory bank)."""
    assert column in VERSION_COLUMNS, column
    rows = con.execute(
        f"""
        WITH recent AS (
            SELECT DISTINCT session_id FROM spans WHERE start_time >= $since AND session_id IS NOT NULL
        ), served AS (
            SELECT session_id, bool_or({column} IS NOT DISTINCT FROM $version) AS canary
            FROM spans JOIN recent USING (session_id)
            GROUP BY session_id HAVING min(start_time) >= $since
        ), rewarded AS (
            SELECT s.session_id, s.canary, avg(f.value) AS reward
            FROM served s JOIN feedback f ON f.session_id = s.session_id AND f.name = 'reward'
            GROUP BY s.session_id, s.canary
        )
        SELECT CASE WHEN canary THEN 'candidate' ELSE 'active' END, count(*), avg(reward),
               coalesce(var_samp(reward), 0)
        FROM rewarded GROUP BY 1
        """,
        {"since": since, "version": version},
    ).fetchall()
    return {arm: Arm(int(n), float(mean), float(variance)) for arm, n, mean, variance in rows}


def worse_z(active: Arm, candidate: Arm) -> float:
    """How clearly the candidate's mean is below the active one's, in standard errors (inf: no spread at all)."""
    gap = active.mean - candidate.mean
    spread = math.sqrt(active.variance / active.sessions + candidate.variance / candidate.sessions)
    if spread > 0:
        return gap / spread
    return math.copysign(math.inf, gap) if gap else 0.0


def decide(arms: dict[str, Arm], min_sessions: int) -> tuple[bool, str] | None:
    """``(promote, why)`` once the evidence decides, else None: wait for more sessions."""
    active, candidate = arms.get("active", Arm()), arms.get("candidate", Arm())
    counts = f"{candidate.sessions} (candidate) and {active.sessions} (active) rewarded sessions"
    means = f"canary mean reward {candidate.mean:.3f} vs active {active.mean:.3f}"
    fewest = min(active.sessions, candidate.sessions)
    if fewest >= EARLY_STOP_SESSIONS:
        z = worse_z(active, candidate)
        if z > EARLY_STOP_Z:
            return False, f"clearly worse, stopped early: {means} over {counts} (z = {z:.2f} > {EARLY_STOP_Z})"
    if fewest >= min_sessions:
        return candidate.mean >= active.mean, f"{means} over {counts}"
    return None


async def watch(
    arms_since: Callable[[datetime], Awaitable[dict[str, Arm]]], *, min_sessions: int, timeout: float, poll: float
) -> dict[str, Any]:
    """Read the running canary's evidence (``arms_since(start)``) every ``poll`` seconds until :func:`decide`
    decides or ``timeout`` passes; returns the evaluation record: method, arms, promote, why."""
    started = datetime.now(UTC)
    deadline = time.monotonic() + timeout
    arms: dict[str, Arm] = {}
    decision = None
    while decision is None and time.monotonic() < deadline:
        await asyncio.sleep(poll)
        arms = await arms_since(started)
        decision = decide(arms, min_sessions)
    counts = {arm: arms.get(arm, Arm()).public() for arm in ARMS}
    if decision is None:
        sessions = {arm: count["sessions"] for arm, count in counts.items()}
        why = f"not enough rewarded sessions in {timeout:g} s: {sessions}"
        return {"method": "online", "arms": counts, "promote": False, "why": why}
    promote, why = decision
    return {"method": "online", "arms": counts, "promote": promote, "why": why}

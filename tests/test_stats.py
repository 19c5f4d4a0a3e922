"""``lightwire stats``'s numbers, overall, per adapter version and per day, and how they are shown."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from store import stats
from store.spans import SAMPLE_SOURCE
from tests.conftest import Proxy
from tests.test_export import record_sessions


@pytest.fixture
async def db(vllm_proxy: Proxy) -> Path:
    """The calls of :func:`record_sessions`, with session s2 served by adapter v1 on the day before."""
    await record_sessions(vllm_proxy.url)
    await vllm_proxy.stop()
    with duckdb.connect(str(vllm_proxy.config.db)) as con:
        con.execute(
            "UPDATE spans SET adapter_version = 'v1', start_time = TIMESTAMPTZ '2025-03-01 12:00:00+00'"
            " WHERE session_id = 's2'"
        )
        con.execute("UPDATE spans SET start_time = TIMESTAMPTZ '2025-03-02 08:00:00+00' WHERE session_id = 's1'")
        # Two answers the sidecar sampled for a group, one scored high: they are no agent's calls.
        con.execute(
            f"INSERT INTO spans SELECT * REPLACE (span_id || '-sample' AS span_id, NULL AS session_id,"
            f" '{SAMPLE_SOURCE}' AS session_source) FROM spans WHERE session_id = 's1' ORDER BY turn_index LIMIT 2"
        )
        con.execute(
            "INSERT INTO feedback SELECT * REPLACE (feedback_id || '-sample' AS feedback_id, span_id || '-sample'"
            " AS span_id, NULL AS session_id, 100.0 AS value) FROM feedback WHERE span_id IS NOT NULL LIMIT 1"
        )
    return vllm_proxy.config.db


def collect(db: Path, policy: str = "discounted", reward_name: str = "reward") -> stats.Stats:
    with duckdb.connect(str(db), read_only=True) as con:
        return stats.collect(con, policy=policy, discount=0.9, reward_name=reward_name)


async def test_counts_fractions_and_mean_reward(db: Path) -> None:
    got = collect(db)
    assert (got.spans, got.failed_spans, got.samples, got.sessions, got.feedback) == (5, 1, 2, 2, 5)
    assert (got.rewarded_sessions, got.rewarded_session_fraction) == (1, 0.5)
    assert (got.spans_with_feedback, got.feedback_span_fraction) == (1, 0.2)
    assert got.rewarded == 3 and got.mean_reward == pytest.approx((0.81 + 0.2 + 1.0) / 3)
    thumbs = collect(db, policy="broadcast", reward_name="thumbs")
    assert (thumbs.rewarded, thumbs.mean_reward) == (3, 3.0)


async def test_groups_by_adapter_version_and_day(db: Path) -> None:
    got = collect(db, policy="last")
    mean = pytest.approx((0.2 + 1.0) / 2)
    assert got.by_adapter == [
        stats.Group("v1", spans=1, sessions=1, rewarded=0, mean_reward=None),
        stats.Group("base", spans=4, sessions=1, rewarded=2, mean_reward=mean),
    ]
    assert got.by_day == [
        stats.Group("2025-03-01", spans=1, sessions=1, rewarded=0, mean_reward=None),
        stats.Group("2025-03-02", spans=4, sessions=1, rewarded=2, mean_reward=mean),
    ]


async def test_the_text_and_json_forms(db: Path) -> None:
    got = collect(db)
    assert stats.Stats.from_dict(got.to_dict()) == got
    assert got.to_dict()["rewarded_session_fraction"] == 0.5
    lines = stats.format_text(got).splitlines()
    assert lines[:3] == [
        "spans: 5 (1 failed) (and 2 group samples) in 2 sessions; 5 feedback rows",
        "rewarded sessions: 1 of 2 (50.0%); spans with feedback: 1 of 5 (20.0%)",
        "mean reward: 0.670 over 3 rewarded spans (credit: discounted 0.9)",
    ]
    assert lines[4:7] == [
        "adapter  spans  sessions  rewarded  mean reward",
        "v1           1         1         0            -",
        "base         4         1         3        0.670",
    ]
    assert lines[8] == "day         spans  sessions  rewarded  mean reward"


async def test_an_empty_store(tmp_path: Path, start_proxy, fake) -> None:
    proxy = await start_proxy(fake.url)
    await proxy.stop()
    got = collect(proxy.config.db)
    assert (got.spans, got.sessions, got.mean_reward, got.by_adapter, got.by_day) == (0, 0, None, [], [])
    assert "rewarded sessions: 0 of 0 (0.0%)" in stats.format_text(got)

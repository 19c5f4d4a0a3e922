"""Reads for the dashboard (``proxy/ui.py``): sessions with filters, one session's turns and rewards, and the
mean reward of each adapter version over time, and the time Lightwire added to the last hour's calls.

A session is what :mod:`store.stats` counts as one: the calls sharing a ``session_id``, or a lone call without one
(keyed by its span id). The sidecar's own group samples are left out, as there. A session's ``reward`` here is the
mean value of the feedback named ``reward`` that names it or one of its calls; the chart's rewards are the credited
ones of :func:`store.export.turn_rewards`, the values an exported dataset carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import orjson

from store import credit
from store.export import OK, snapshot, turn_rewards
from store.stats import BASE, CALLS

MAX_SESSIONS = 500
# Bucket widths for the reward chart, in seconds: the smallest that keeps it under ``points`` buckets is used.
BUCKETS_S = (1, 10, 60, 600, 3600, 6 * 3600, 86400, 7 * 86400)
STATUSES = ("ok", "failed")
# The calls whose added latency the overview shows: those that started within this window.
LATENCY_WINDOW = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class SessionFilter:
    since: datetime | None = None
    until: datetime | None = None
    version: str | None = None  # "base" for the base model
    model: str | None = None  # the model the agent asked for
    status: str | None = None  # ok: every call succeeded; failed: at least one did not
    min_reward: float | None = None
    max_reward: float | None = None
    limit: int = 100


def sessions(con: duckdb.DuckDBPyConnection, where: SessionFilter) -> list[dict[str, Any]]:
    """The sessions that match, the latest first."""
    conditions: list[str] = []
    params: dict[str, object] = {"limit": min(where.limit, MAX_SESSIONS)}
    for sql, key, value in (
        ("started >= $since", "since", where.since),
        ("started <= $until", "until", where.until),
        ("list_contains(versions, $version)", "version", where.version),
        ("list_contains(models, $model)", "model", where.model),
        ("reward >= $min_reward", "min_reward", where.min_reward),
        ("reward <= $max_reward", "max_reward", where.max_reward),
    ):
        if value is not None:
            conditions.append(sql)
            params[key] = value
    if where.status is not None:
        conditions.append("failed > 0" if where.status == "failed" else "failed = 0")
    rows = con.execute(
        f"""
        WITH calls AS (SELECT *, coalesce(session_id, span_id) AS session FROM {CALLS}),
        rewards AS (
            SELECT coalesce(f.session_id, s.session_id, f.span_id) AS session, avg(f.value) AS reward,
                   count(*) AS feedback
            FROM feedback f LEFT JOIN spans s USING (span_id)
            WHERE f.name = '{credit.DEFAULT_NAME}' GROUP BY 1
        ),
        summary AS (
            SELECT session, min(start_time) AS started, max(start_time) AS last, count(*) AS turns,
                   count(*) FILTER (WHERE NOT ({OK})) AS failed,
                   list_sort(list(DISTINCT coalesce(adapter_version, '{BASE}'))) AS versions,
                   list_sort(list(DISTINCT request_model) FILTER (WHERE request_model IS NOT NULL)) AS models,
                   sum(coalesce(usage_input_tokens, 0) + coalesce(usage_output_tokens, 0)) AS tokens
            FROM calls GROUP BY session
        )
        SELECT s.session, s.started, s.last, s.turns, s.failed, s.versions, coalesce(s.models, []), s.tokens,
               r.reward, coalesce(r.feedback, 0), e.end_reason
        FROM summary s LEFT JOIN rewards r USING (session) LEFT JOIN sessions e ON e.session_id = s.session
        {"WHERE " + " AND ".join(conditions) if conditions else ""}
        ORDER BY s.started DESC LIMIT $limit
        """,
        params,
    ).fetchall()
    keys = ("id", "started", "last", "turns", "failed", "versions", "models", "tokens", "reward", "feedback", "ended")
    out = [dict(zip(keys, row, strict=True)) for row in rows]
    for session in out:
        session["started"], session["last"] = session["started"].isoformat(), session["last"].isoformat()
        session["status"] = "failed" if session["failed"] else "ok"
    return out


def session(con: duckdb.DuckDBPyConnection, session_id: str) -> dict[str, Any] | None:
    """One session's calls, in order, and every feedback row that names it or one of its calls."""
    with snapshot(con):
        cursor = con.execute(
            f"""
            SELECT span_id, turn_index, start_time, duration_ms, time_to_first_chunk_ms, operation_name,
                   request_model, response_model, coalesce(adapter_version, '{BASE}') AS version, request_stream,
                   usage_input_tokens, usage_output_tokens, http_status, error_type, error_message, request, response
            FROM {CALLS} WHERE coalesce(session_id, span_id) = $id ORDER BY start_time, turn_index
            """,
            {"id": session_id},
        )
        names = [d[0] for d in cursor.description]
        turns = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        if not turns:
            return None
        cursor = con.execute(
            """
            SELECT feedback_id AS id, span_id, name, value, comment, source, created_at FROM feedback
            WHERE session_id = $id OR span_id IN (SELECT span_id FROM spans WHERE coalesce(session_id, span_id) = $id)
            ORDER BY created_at
            """,
            {"id": session_id},
        )
        names = [d[0] for d in cursor.description]
        feedback = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        end = con.execute("SELECT ended_at, end_reason FROM sessions WHERE session_id = ?", [session_id]).fetchone()
    for turn in turns:
        turn["start_time"] = turn["start_time"].isoformat()
        for key in ("request", "response"):
            turn[key] = orjson.loads(turn[key]) if turn[key] else None
    for row in feedback:
        row["created_at"] = row["created_at"].isoformat()
    ended = {"ended_at": end[0].isoformat(), "reason": end[1]} if end else None
    return {"id": session_id, "turns": turns, "feedback": feedback, "ended": ended}


def reward_series(
    con: duckdb.DuckDBPyConnection,
    *,
    policy: str,
    discount: float,
    reward_name: str = credit.DEFAULT_NAME,
    points: int = 40,
) -> dict[str, Any]:
    """The mean credited reward of each adapter version per time bucket: one series per version that has any."""
    with snapshot(con):
        rewards = turn_rewards(con, policy=policy, discount=discount)
        rows = con.execute(
            f"SELECT span_id, coalesce(adapter_version, '{BASE}'), epoch(start_time) FROM {CALLS} ORDER BY start_time"
        ).fetchall()
    rewarded = [
        (version, at, rewards[span][reward_name]) for span, version, at in rows if reward_name in rewards.get(span, {})
    ]
    if not rewarded:
        return {"bucket_seconds": None, "series": []}
    start, end = rewarded[0][1], rewarded[-1][1]
    width = next((w for w in BUCKETS_S if (end - start) / w < points), BUCKETS_S[-1])
    sums: dict[str, dict[int, list[float]]] = {}
    for version, at, value in rewarded:
        bucket = sums.setdefault(version, {}).setdefault(int(at // width), [0.0, 0.0])
        bucket[0] += value
        bucket[1] += 1
    series = [
        {
            "version": version,
            "points": [
                {"t": datetime.fromtimestamp(b * width, UTC).isoformat(), "mean": s / n, "n": int(n)}
                for b, (s, n) in sorted(buckets.items())
            ],
        }
        for version, buckets in sums.items()
    ]
    return {"bucket_seconds": width, "series": series}


def added_latency(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """The time Lightwire added to the model calls of the last hour (duration minus the backend's), in ms."""
    row = con.execute(
        f"""
        SELECT count(*), quantile_cont(added, 0.5), quantile_cont(added, 0.99)
        FROM (SELECT duration_ms - upstream_duration_ms AS added FROM {CALLS}
              WHERE upstream_duration_ms IS NOT NULL AND start_time >= $since)
        """,
        {"since": datetime.now(UTC) - LATENCY_WINDOW},
    ).fetchone()
    assert row is not None
    return {"calls": row[0], "p50_ms": row[1], "p99_ms": row[2], "window_s": LATENCY_WINDOW.total_seconds()}

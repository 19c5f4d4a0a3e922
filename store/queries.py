"""Reads the proxy makes of its own store (through a cursor of the writer's connection, in a worker thread)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import duckdb

from store import idkeys


def find_call(
    con: duckdb.DuckDBPyConnection, *, span_id: str | None = None, response_id: str | None = None
) -> tuple[str, str | None] | None:
    """``(span_id, session_id)`` of the call with this span id or response id, or None."""
    if span_id is not None:
        row = con.execute(
            f"SELECT span_id, session_id FROM spans WHERE {idkeys.match('span_id')}", idkeys.args(span_id)
        ).fetchone()
    elif response_id is not None:
        newest = f"WHERE {idkeys.match('response_id')} ORDER BY start_time DESC LIMIT 1"
        row = con.execute(f"SELECT span_id, session_id FROM spans {newest}", idkeys.args(response_id)).fetchone()
    else:
        raise TypeError("find_call needs a span_id or a response_id")
    return (row[0], row[1]) if row else None


def session_record(con: duckdb.DuckDBPyConnection, session_id: str) -> tuple[int, datetime | None] | None:
    """``(turns, started_at)`` of a session that has ended at least once, from its row; None for one the store
    has not seen end. Every session leaves the proxy's memory by ending, so this is the count to go on from."""
    row = con.execute("SELECT turns, started_at FROM sessions WHERE session_id = ?", [session_id]).fetchone()
    return (int(row[0] or 0), row[1]) if row else None


def session_window(
    con: duckdb.DuckDBPyConnection, session_id: str, *, until: datetime | None = None
) -> tuple[str, list[Any]]:
    """SQL (``AND ...``) and its arguments that bound a session's spans in time: from its first call, as its row
    says, to ``until`` (by default its row's end). No index is kept on the spans' session ids, and spans arrive in
    time order, so start_time's zone maps skip the rest. A session with no row (still open) is its newest spans."""
    row = con.execute("SELECT started_at, ended_at FROM sessions WHERE session_id = ?", [session_id]).fetchone()
    since, end = row if row and row[0] else (None, None)
    bounds = [(sql, value) for sql, value in (("start_time >= ?", since), ("start_time <= ?", until or end)) if value]
    return "".join(f" AND {sql}" for sql, _ in bounds), [value for _, value in bounds]


def session_spans(
    con: duckdb.DuckDBPyConnection, session_id: str, columns: str, *, limit: int | None = None
) -> list[Any]:
    """The session's spans (these columns), in turn order."""
    within, args = session_window(con, session_id)
    order = "ORDER BY turn_index NULLS LAST, start_time" + (f" LIMIT {int(limit)}" if limit else "")
    query = f"SELECT {columns} FROM spans WHERE session_id = ? {within} {order}"
    return con.execute(query, [session_id, *args]).fetchall()


def interrupted_sessions(con: duckdb.DuckDBPyConnection) -> list[tuple[str, int, datetime, datetime]]:
    """Sessions with more calls than their row says, or with no row: those a proxy held when it stopped without
    ending them (SIGKILL, a crash). ``(session_id, turns, first call, last call)``, from a scan of every span
    (~0.1-0.2 s at 1M), made once at start."""
    return con.execute(
        """SELECT s.session_id, count(s.turn_index), min(s.start_time), max(s.start_time)
           FROM spans s LEFT JOIN sessions e ON e.session_id = s.session_id
           WHERE s.session_id IS NOT NULL
           GROUP BY s.session_id, e.turns
           HAVING count(s.turn_index) > coalesce(e.turns, 0)"""
    ).fetchall()


def feedback_answer(con: duckdb.DuckDBPyConnection, feedback_id: str) -> dict[str, object] | None:
    row = con.execute(
        "SELECT feedback_id, span_id, session_id, name, value, comment, created_at FROM feedback WHERE feedback_id = ?",
        [feedback_id],
    ).fetchone()
    if row is None:
        return None
    keys = ("id", "span_id", "session_id", "name", "value", "comment", "created_at")
    return {"object": "feedback", **dict(zip(keys, row, strict=True)), "created_at": row[6].isoformat()}

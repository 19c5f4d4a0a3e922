"""Reads the proxy makes of its own store (through a cursor of the writer's connection, in a worker thread)."""

from __future__ import annotations

import duckdb

from store import idkeys


def find_call(
    con: duckdb.DuckDBPyConnection, *, span_id: str | None = None, response_id: str | None = None
) -> tuple[str, str | None] | None:
    """``(span_id, session_id)`` of the call with this span id or response id, or None."""
    if span_id is not None:
        row = con.execute("SELECT span_id, session_id FROM spans WHERE span_id = ?", [span_id]).fetchone()
    elif response_id is not None:
        newest = f"WHERE {idkeys.match('response_id')} ORDER BY start_time DESC LIMIT 1"
        row = con.execute(f"SELECT span_id, session_id FROM spans {newest}", idkeys.args(response_id)).fetchone()
    else:
        raise TypeError("find_call needs a span_id or a response_id")
    return (row[0], row[1]) if row else None


def session_turns(con: duckdb.DuckDBPyConnection, session_id: str) -> int:
    """How many calls the session has had (0 for a session the store has never seen)."""
    row = con.execute("SELECT count(*) FROM spans WHERE session_id = ?", [session_id]).fetchone()
    return int(row[0]) if row else 0


def feedback_answer(con: duckdb.DuckDBPyConnection, feedback_id: str) -> dict[str, object] | None:
    row = con.execute(
        "SELECT feedback_id, span_id, session_id, name, value, comment, created_at FROM feedback WHERE feedback_id = ?",
        [feedback_id],
    ).fetchone()
    if row is None:
        return None
    keys = ("id", "span_id", "session_id", "name", "value", "comment", "created_at")
    return {"object": "feedback", **dict(zip(keys, row, strict=True)), "created_at": row[6].isoformat()}

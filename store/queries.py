"""Reads the proxy makes of its own store (through a cursor of the writer's connection, in a worker thread)."""

from __future__ import annotations

import duckdb

from store.retention import ARCHIVE, HOT


def find_call(
    con: duckdb.DuckDBPyConnection, *, span_id: str | None = None, response_id: str | None = None
) -> tuple[str, str | None] | None:
    """``(span_id, session_id)`` of the call with this span id or response id, or None: the indexed recent calls
    first, then the archive (a scan, for late feedback on an old call)."""
    key, value = ("span_id", span_id) if span_id is not None else ("response_id", response_id)
    for table in (HOT, ARCHIVE):
        row = con.execute(
            f"SELECT span_id, session_id FROM {table} WHERE {key} = ? ORDER BY start_time DESC LIMIT 1", [value]
        ).fetchone()
        if row is not None:
            return row[0], row[1]
    return None


def session_turns(con: duckdb.DuckDBPyConnection, session_id: str) -> int:
    """How many calls the session has had (0 for a session the store has never seen). Its recent calls carry
    their turn index, so the archive is scanned only for a session with none left among them."""
    (turns,) = con.execute(f"SELECT max(turn_index) + 1 FROM {HOT} WHERE session_id = ?", [session_id]).fetchone() or (
        None,
    )
    if turns is None:
        (turns,) = con.execute(f"SELECT count(*) FROM {ARCHIVE} WHERE session_id = ?", [session_id]).fetchone() or (0,)
    return int(turns)


def feedback_answer(con: duckdb.DuckDBPyConnection, feedback_id: str) -> dict[str, object] | None:
    row = con.execute(
        "SELECT feedback_id, span_id, session_id, name, value, comment, created_at FROM feedback WHERE feedback_id = ?",
        [feedback_id],
    ).fetchone()
    if row is None:
        return None
    keys = ("id", "span_id", "session_id", "name", "value", "comment", "created_at")
    return {"object": "feedback", **dict(zip(keys, row, strict=True)), "created_at": row[6].isoformat()}

"""Segments: a sidecar's recorded rows shipped to the share as immutable Parquet files, and read back by the learner.

**Shipping** (a sidecar, :class:`Shipper`). Every row of ``spans``, ``feedback`` and ``sessions`` gets the next
value of the store's ``share_seq`` when it is committed; one writer thread commits, so every row up to any value
of it is committed. A shipment writes, per kind, the rows after the ``shipped`` high-water mark (at most
``MAX_SEGMENT_ROWS`` a segment) with DuckDB's Parquet writer, puts the file into the share (whole, durably:
:meth:`store.share.Share.put`) as ``<kind>/<sidecar id>-<last seq>.parquet``, and only then moves the mark. The
local DuckDB file is the buffer: a share that is down, full or slow delays shipping and loses nothing; a crash
between the put and the mark ships the same rows again in a later segment, which the learner ignores by key.
The sidecar id is made once per store, so segments from many sidecars never collide.

**Importing** (the learner, :class:`Importer`). New segments are inserted into the learner's own store by key
(span ids, feedback ids; a session's latest end wins), each segment once (the ``imported`` table). Feedback
that named a call another sidecar recorded (by response id or span id) is then joined to that call's span and
session wherever it was recorded, as soon as both have arrived.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from store import idkeys
from store.rows import SHARE_SEQ as SEQ
from store.share import Share

log = logging.getLogger(__name__)

# Kind -> how the learner inserts it: spans and feedback are never rewritten, a session may end again.
KINDS: dict[str, str] = {"spans": "INSERT OR IGNORE", "feedback": "INSERT OR IGNORE", "sessions": "INSERT OR REPLACE"}
MAX_SEGMENT_ROWS = 50_000

# A cursor to use in a ``with`` block: the sidecar's Writer.cursor, or a DuckDB connection's own cursor
Connect = Callable[[], contextlib.AbstractContextManager[duckdb.DuckDBPyConnection]]


def sidecar_id(con: duckdb.DuckDBPyConnection) -> str:
    """This store's name in the share, made on first use and kept in the store."""
    row = con.execute("SELECT sidecar_id FROM share_identity").fetchone()
    if row is not None:
        return str(row[0])
    made = f"{os.uname().nodename[:24]}-{os.urandom(4).hex()}".replace("/", "-")
    con.execute("INSERT INTO share_identity VALUES (?)", [made])
    return made


class Shipper:
    """Ships one store's new rows to the share; :meth:`ship` is blocking (run it in a worker thread)."""

    def __init__(self, share: Share, connect: Connect) -> None:
        self.share = share
        self.connect = connect
        with connect() as con:
            self.sidecar_id = sidecar_id(con)
        self.shipped_rows = 0
        self.segments = 0
        self.problem: str | None = None  # why the last shipment failed; None once one succeeds
        # One shipment at a time: cancelling a periodic shipment's task does not stop its thread, and a final
        # shipment beside it wrote the same staged segment (FileNotFoundError, or a hang inside DuckDB).
        self._shipping = threading.Lock()

    def stats(self) -> dict[str, object]:
        return {
            "location": self.share.location,
            "sidecar_id": self.sidecar_id,
            "rows_shipped": self.shipped_rows,
            "segments": self.segments,
            "problem": self.problem,
        }

    def ship(self) -> int:
        """Ship every row committed so far; returns how many. Raises when the share cannot take a segment (the
        rows stay in the store, and the next shipment tries again)."""
        shipped = 0
        try:
            with self._shipping, self.connect() as con:
                for kind in KINDS:
                    while n := self._ship_one(con, kind):
                        shipped += n
        except Exception as exc:
            self.problem = f"{type(exc).__name__}: {exc}"
            raise
        self.problem = None
        return shipped

    def _ship_one(self, con: duckdb.DuckDBPyConnection, kind: str) -> int:
        row = con.execute("SELECT seq FROM shipped WHERE kind = ?", [kind]).fetchone()
        mark = int(row[0]) if row else 0
        top, n = con.execute(
            f"SELECT max({SEQ}), count(*) FROM (SELECT {SEQ} FROM {kind} WHERE {SEQ} > ? ORDER BY {SEQ} LIMIT ?)",
            [mark, MAX_SEGMENT_ROWS],
        ).fetchone() or (None, 0)
        if not n:
            return 0
        name = f"{kind}/{self.sidecar_id}-{top:015d}.parquet"
        staged = self.share.staging(name)
        try:
            con.execute(
                f"COPY (SELECT {idkeys.stored(kind)} FROM {kind} WHERE {SEQ} > ? AND {SEQ} <= ? ORDER BY {SEQ}) "
                f"TO '{_sql_path(staged)}' (FORMAT parquet)",
                [mark, top],
            )
            self.share.put(staged, name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
        con.execute("INSERT OR REPLACE INTO shipped VALUES (?, ?, ?, ?)", [kind, top, name, datetime.now(UTC)])
        self.shipped_rows += n
        self.segments += 1
        return int(n)


class Importer:
    """Reads the share's new segments into the learner's store; :meth:`run` is blocking."""

    def __init__(self, share: Share, connect: Connect) -> None:
        self.share = share
        self.connect = connect

    def run(self) -> int:
        """Import every segment not imported yet; returns the rows read."""
        total = 0
        with self.connect() as con:
            done = {name for (name,) in con.execute("SELECT segment FROM imported").fetchall()}
            for kind, verb in KINDS.items():  # spans first: feedback is then joined to them
                new = [name for name in self.share.segments(kind) if name not in done]
                if new:
                    total += self._import(con, kind, verb, new)
            if total:
                _attach_feedback(con)
        return total

    def _import(self, con: duckdb.DuckDBPyConnection, kind: str, verb: str, names: list[str]) -> int:
        paths = [str(self.share.local_path(name)) for name in names]
        now = datetime.now(UTC)
        con.execute("BEGIN TRANSACTION")
        try:
            rows = 0
            for name, path in zip(names, paths, strict=True):
                (count,) = con.execute(f"SELECT count(*) FROM read_parquet('{_sql_path(Path(path))}')").fetchone() or (
                    0,
                )
                rows += int(count)
                con.execute("INSERT INTO imported VALUES (?, ?, ?)", [name, count, now])
            con.execute(
                f"{verb} INTO {kind} BY NAME SELECT * EXCLUDE ({SEQ}){idkeys.derived(kind)} "
                "FROM read_parquet($paths, union_by_name = true)",
                {"paths": paths},
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        log.info("imported %d %s rows from %d segments", rows, kind, len(names))
        return rows


def _attach_feedback(con: duckdb.DuckDBPyConnection) -> None:
    """Join feedback sent to another sidecar than the one that served the call to that call's span and session."""
    con.execute(
        """
        UPDATE feedback SET span_id = s.span_id, session_id = coalesce(feedback.session_id, s.session_id)
        FROM spans s WHERE feedback.span_id IS NULL AND feedback.response_id = s.response_id
        """
    )
    con.execute(
        """
        UPDATE feedback SET session_id = s.session_id
        FROM spans s WHERE feedback.session_id IS NULL AND feedback.span_id = s.span_id AND s.session_id IS NOT NULL
        """
    )


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")

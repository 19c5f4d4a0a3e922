"""Retention: ``spans`` keeps the newest calls, indexed; older ones move to ``spans_archive``, kept whole.

Why: DuckDB holds a table's ART indexes in memory whole, for the life of the process (~50-75 bytes a call for
each of the three on ``spans``), and every checkpoint writes them again. Left to grow with every call, they were
the sidecar's growth past its first minute (18 -> 155 MB over 1.5M calls, ``bench/soak.py``) and what made its
checkpoints, so its p99, slower with time. An unindexed table costs only its blocks, which DuckDB's cache may
evict (``store.writer``'s trim).

* **Moved, never dropped.** The writer thread moves the oldest calls beyond ``keep`` (by ``share_seq``, the
  order they were committed in) in one transaction each: a call is in ``spans`` or in ``spans_archive``, never
  in both or neither. ``CHUNK`` calls a transaction at most, so that the writer's batches are not held up long:
  DuckDB removes a deleted row from each index at commit, ~15 us an index.
* **Readers.** What wants every call (exports, training data, statistics, the page, hooks, shipping to a share)
  reads the view ``spans_all``. Point lookups (:mod:`store.queries`) read ``spans`` first, by its indexes, and
  scan ``spans_archive`` only for what is not there: late feedback on an old call, a named session back after
  a long pause (~10-25 ms a million archived calls).
"""

from __future__ import annotations

import contextlib
import logging

import duckdb

from store.rows import SHARE_SEQ as SEQ

log = logging.getLogger(__name__)

HOT = "spans"
ARCHIVE = "spans_archive"
ALL = "spans_all"
# Calls moved in one transaction at most (~250 ms of the writer thread with the three indexes).
CHUNK = 5_000


class Retention:
    """Keeps ``spans`` within ``keep`` + ``chunk`` calls: the writer thread counts what it writes, counts the
    table at each trim, and calls :meth:`step` between two batches once ``chunk`` calls are beyond ``keep``."""

    def __init__(self, keep: int, chunk: int = CHUNK) -> None:
        self.keep = keep
        self.chunk = chunk
        self.rows = 0  # calls in spans: as last counted, plus those written and less those moved since
        self.moved = 0  # since the writer opened

    def count(self, con: duckdb.DuckDBPyConnection) -> None:
        (rows,) = con.execute(f"SELECT count(*) FROM {HOT}").fetchone() or (0,)
        self.rows = rows

    def added(self, rows: int) -> None:
        self.rows += rows

    def due(self) -> bool:
        return self.rows - self.keep >= self.chunk

    def step(self, con: duckdb.DuckDBPyConnection) -> int:
        """Move up to ``chunk`` of the oldest calls beyond ``keep`` to the archive; return how many moved."""
        take = min(self.rows - self.keep, self.chunk)
        if take <= 0:
            return 0
        row = con.execute(f"SELECT {SEQ} FROM {HOT} ORDER BY {SEQ} NULLS FIRST LIMIT 1 OFFSET ?", [take - 1]).fetchone()
        if row is None:  # fewer rows than counted (the count is an estimate between two counts)
            self.count(con)
            return 0
        where = f"{SEQ} IS NULL OR {SEQ} <= ?"
        try:
            con.execute("BEGIN TRANSACTION")
            inserted = con.execute(f"INSERT INTO {ARCHIVE} BY NAME SELECT * FROM {HOT} WHERE {where}", [row[0]])
            (moved,) = inserted.fetchone() or (0,)
            con.execute(f"DELETE FROM {HOT} WHERE {where}", [row[0]])
            con.execute("COMMIT")
        except duckdb.Error as exc:  # the store's trouble (disk full): calls stay where they were; try at next count
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            log.warning("moving old spans to %s failed: %s", ARCHIVE, exc)
            self.rows = self.keep
            return 0
        self.rows -= moved
        self.moved += moved
        return int(moved)

"""Retention: ``spans`` keeps the newest calls, indexed; older ones move to ``spans_archive``, kept whole.

Why: DuckDB holds a table's ART indexes in memory whole, for the life of the process (~50-75 bytes a call for
each of the three on ``spans``), and every checkpoint writes them again. Left to grow with every call, they were
the sidecar's growth past its first minute (18 -> 155 MB over 1.5M calls, ``bench/soak.py``) and what made its
checkpoints dearer with time. An unindexed table costs only its blocks, which DuckDB's cache may evict
(``store.writer``'s trim).

* **Rotation, not deletion.** Once ``spans`` holds ``2 * keep`` calls, the writer thread, in one transaction,
  copies all but the newest ``keep`` (by ``share_seq``, the order they were committed in) to the archive, copies
  the newest ``keep`` to a fresh table, drops the old one with its indexes and builds them again on the fresh one.
  Deleting the old calls instead cost DuckDB ~15 us a row for each index at commit, and slowed every checkpoint
  after it: ~8 us a call this way against ~50. A call is in ``spans`` or in ``spans_archive``, never in both or
  neither; a rotation that fails leaves everything where it was.
* **Readers.** What wants every call (exports, training data, statistics, the page, hooks, shipping to a share)
  reads the view ``spans_all``. Point lookups (:mod:`store.queries`) read ``spans`` first, by its indexes, and
  scan ``spans_archive`` only for what is not there: late feedback on an old call, a named session back after
  a long pause (~10-25 ms a million archived calls).
"""

from __future__ import annotations

import contextlib
import logging
import re

import duckdb

from store.rows import SHARE_SEQ as SEQ

log = logging.getLogger(__name__)

HOT = "spans"
ARCHIVE = "spans_archive"
ALL = "spans_all"
_NEXT = "spans_next"


class Retention:
    """Keeps ``spans`` between ``keep`` and ``2 * keep`` calls: the writer thread counts what it writes, counts
    the table at each trim, and calls :meth:`rotate` between two batches once it holds ``2 * keep``."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.rows = 0  # calls in spans: as last counted, plus those written since
        self.moved = 0  # since the writer opened

    def count(self, con: duckdb.DuckDBPyConnection) -> None:
        (rows,) = con.execute(f"SELECT count(*) FROM {HOT}").fetchone() or (0,)
        self.rows = rows

    def added(self, rows: int) -> None:
        self.rows += rows

    def due(self) -> bool:
        return self.rows >= 2 * self.keep

    def rotate(self, con: duckdb.DuckDBPyConnection) -> int:
        """Move all but the newest ``keep`` calls to the archive; return how many moved."""
        newest = con.execute(f"SELECT {SEQ} FROM {HOT} ORDER BY {SEQ} DESC NULLS LAST LIMIT 1 OFFSET ?", [self.keep])
        row = newest.fetchone()
        if row is None:  # fewer calls than counted (a count is exact only at a trim)
            self.count(con)
            return 0
        older = f"{SEQ} IS NULL OR {SEQ} <= ?"
        try:
            con.execute("BEGIN TRANSACTION")
            (table,) = con.execute("SELECT sql FROM duckdb_tables() WHERE table_name = ?", [HOT]).fetchone() or ("",)
            indexes = con.execute("SELECT sql FROM duckdb_indexes() WHERE table_name = ?", [HOT]).fetchall()
            fresh, renamed = re.subn(rf"^CREATE TABLE {HOT}\b", f"CREATE TABLE {_NEXT}", table)
            if not renamed:
                raise duckdb.CatalogException(f"cannot read how {HOT} is made: {table!r}")
            (moved,) = con.execute(
                f"INSERT INTO {ARCHIVE} BY NAME SELECT * FROM {HOT} WHERE {older}", [row[0]]
            ).fetchone() or (0,)
            con.execute(fresh)
            con.execute(f"INSERT INTO {_NEXT} BY NAME SELECT * FROM {HOT} WHERE NOT ({older})", [row[0]])
            con.execute(f"DROP TABLE {HOT}")
            con.execute(f"ALTER TABLE {_NEXT} RENAME TO {HOT}")
            for (sql,) in indexes:
                con.execute(sql)
            con.execute("COMMIT")
        except BaseException as exc:  # every call stays where it was, and the writer's connection usable
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            if not isinstance(exc, duckdb.Error):
                raise
            log.warning("moving old spans to %s failed (tried again after the next trim): %s", ARCHIVE, exc)
            self.rows = 0  # the next trim counts them again
            return 0
        self.rows -= moved
        self.moved += moved
        log.info("moved %d calls to %s; %d stay in %s", moved, ARCHIVE, self.rows, HOT)
        return int(moved)

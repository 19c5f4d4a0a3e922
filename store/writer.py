"""The store's single writer: one thread owns the DuckDB file; everything else hands it rows through a queue.

Durability policy, in full:

* **Admission, not dropping.** Every call the proxy accepts first reserves a place in the write queue
  (:meth:`Writer.reserve`). The queue holds at most ``max_pending`` rows; when the store falls behind, new calls
  wait for a place (backpressure on the agents) instead of any accepted row being dropped. A reserved place is
  always available to :meth:`Writer.submit`, which never blocks, so a span can be recorded from a ``finally``
  block of a cancelled request.
* **Batches, committed within the flush interval.** From a row's arrival the thread gathers what else comes for
  at most ``flush_interval`` (50 ms by default), inserts it all as Arrow tables in one transaction (about 10x
  faster than row-by-row parameters) and commits. A busy proxy writes a few large batches instead of many small
  ones, and SIGKILL loses only rows that arrived in the last flush interval (plus one write).
* **Shutdown.** :meth:`Writer.close` enqueues a sentinel; the thread commits what precedes it and closes the file.

Reads from the same process use :meth:`Writer.cursor` (DuckDB cursors are safe per thread). Other processes read
through the sidecar's HTTP API or exported files: DuckDB allows one process per database file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar, Protocol

import duckdb
import pyarrow as pa

from store.migrations import migrate

log = logging.getLogger(__name__)

_STOP = object()
_BATCH = "lightwire_batch"  # the name an Arrow batch has in the insert statement
# Rows per transaction at most; larger backlogs are written as several batches.
MAX_BATCH = 2_000
# How much nicer the writer thread is than the process. Where it shares a core with the event loop, the kernel
# then runs the request path first while DuckDB inserts and commits without the GIL (~3 ms of CPU a batch, however
# small), leaving this thread ~10% of a busy core; the queue's backpressure stops it from falling behind for good.
# Added p99 at concurrency 1 in bench/proxy_overhead.py: 2.7 ms at 0, 1.9 ms at 10.
WRITER_NICENESS = 10


class Record(Protocol):
    """Something the writer can insert: a table name and a row in the order of its kind's dataclass fields."""

    table: ClassVar[str]

    def to_row(self) -> tuple[object, ...]: ...


class Row:
    """Base of the store's record dataclasses: the row is the dataclass's fields, in order."""

    __slots__ = ()
    table: ClassVar[str]

    def to_row(self) -> tuple[object, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class _Table:
    """How a batch of one record kind is inserted: as an Arrow table, in one statement."""

    columns: tuple[str, ...]
    sql: str

    @classmethod
    def of(cls, kind: type[Record]) -> _Table:
        columns = tuple(f.name for f in dataclasses.fields(kind))  # type: ignore[arg-type]
        verb = "INSERT OR REPLACE" if getattr(kind, "replace", False) else "INSERT"
        names = ", ".join(columns)
        return cls(columns, f"{verb} INTO {kind.table} ({names}) SELECT {names} FROM {_BATCH}")


class Writer:
    def __init__(
        self,
        path: Path | str,
        *,
        kinds: Sequence[type[Record]],
        max_pending: int = 10_000,
        flush_interval: float = 0.05,
        on_commit: Callable[[list[Record]], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.max_pending = max_pending
        self.flush_interval = flush_interval
        self.on_commit = on_commit
        self.written = 0
        self.rejected = 0
        self._tables = {kind.table: _Table.of(kind) for kind in kinds}
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._con: duckdb.DuckDBPyConnection | None = None

    # -- life cycle -------------------------------------------------------------------------------------------

    def open(self) -> None:
        """Open (creating if needed) and migrate the database, then start the writer thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._con = duckdb.connect(str(self.path))
        applied = migrate(self._con)
        if applied:
            log.info("store %s: applied migrations %s", self.path, ", ".join(applied))
        self._insert(self._con, {table: [] for table in self._tables})  # DuckDB's first Arrow scan costs ~0.3 s
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.max_pending)
        self._thread = threading.Thread(target=self._run, name="lightwire-store-writer", daemon=True)
        self._thread.start()

    async def close(self, timeout: float = 30.0) -> None:
        """Write everything submitted so far, then close the file."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            log.error("store writer did not finish within %.0f s; rows still queued: %d", timeout, self._queue.qsize())
        elif self._con is not None:
            self._con.close()
        self._thread = None

    # -- writing ----------------------------------------------------------------------------------------------

    async def reserve(self) -> None:
        """Wait for a place in the queue; each reservation entitles one :meth:`submit`."""
        assert self._slots is not None, "writer not open"
        await self._slots.acquire()

    async def flush(self) -> None:
        """Wait until every row submitted so far is committed."""
        assert self._loop is not None, "writer not open"
        done = self._loop.create_future()
        self._queue.put(done)
        await done

    def unreserve(self) -> None:
        """Give back a reservation that will not be used."""
        assert self._slots is not None
        self._slots.release()

    def submit(self, record: Record) -> None:
        """Queue a row whose place was reserved; never blocks."""
        if record.table not in self._tables:
            raise ValueError(f"this writer does not write {record.table!r} rows")
        self._queue.put(record)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor for reads (or writes that need an answer) from another thread of this process."""
        assert self._con is not None, "writer not open"
        return self._con.cursor()

    # -- the thread -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        assert self._con is not None
        if sys.platform == "linux":  # there, a thread's id names it to setpriority
            me = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + WRITER_NICENESS))
        con = self._con.cursor()
        stopping = False
        while not stopping:
            batch: list[Record] = []
            flushes: list[asyncio.Future[None]] = []
            item = self._queue.get()
            # Sleep rather than wait on the queue: a waiting thread would be woken (and take the GIL from the
            # request path) by every row put in the meantime. A flush request is answered without the wait.
            if not isinstance(item, asyncio.Future):
                time.sleep(self.flush_interval)
            while True:
                if item is _STOP:
                    stopping = True
                    break
                if isinstance(item, asyncio.Future):
                    flushes.append(item)
                else:
                    batch.append(item)  # type: ignore[arg-type]
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write(con, batch)
            for done in flushes:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(_resolve, done)
        con.close()

    def _write(self, con: duckdb.DuckDBPyConnection, batch: list[Record]) -> None:
        rows: dict[str, list[tuple[object, ...]]] = {}
        for record in batch:
            try:
                rows.setdefault(record.table, []).append(record.to_row())
            except Exception:
                log.exception("could not build a %s row", record.table)
                self._reject(record)
        delay = 0.05
        while True:
            try:
                self._insert(con, rows)
                break
            except (duckdb.IOException, duckdb.OutOfMemoryException) as exc:
                # Disk full, a locked file, an I/O error: keep the rows and try again rather than lose them.
                log.error("store write of %d rows failed (%s); retrying in %.2f s", len(batch), exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
            except Exception:
                # A row the schema refuses (a bug): write the others one by one, set the bad ones aside.
                for table, table_rows in rows.items():
                    for row in table_rows:
                        try:
                            self._insert(con, {table: [row]})
                        except Exception:
                            log.exception("%s row refused by the store", table)
                            self._reject(row)
                break
        self.written += len(batch)
        assert self._loop is not None and self._slots is not None
        self._loop.call_soon_threadsafe(_release, self._slots, len(batch))
        if self.on_commit is not None:
            try:
                self.on_commit(batch)
            except Exception:
                log.exception("on_commit hook failed")

    def _insert(self, con: duckdb.DuckDBPyConnection, rows: dict[str, list[tuple[object, ...]]]) -> None:
        con.execute("BEGIN TRANSACTION")
        try:
            for table, table_rows in rows.items():
                table_info = self._tables[table]
                columns = {name: [row[i] for row in table_rows] for i, name in enumerate(table_info.columns)}
                con.register(_BATCH, pa.table(columns))
                try:
                    con.execute(table_info.sql)
                finally:
                    con.unregister(_BATCH)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def _reject(self, row: object) -> None:
        """Keep what the store refused next to the database, so that nothing accepted is lost silently."""
        self.rejected += 1
        with open(self.path.with_suffix(".rejected.jsonl"), "a") as fh:
            fh.write(json.dumps(row, default=repr) + "\n")


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _release(slots: asyncio.Semaphore, n: int) -> None:
    for _ in range(n):
        slots.release()

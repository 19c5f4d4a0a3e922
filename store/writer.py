"""The store's single writer: one thread at a time writes the DuckDB file; everything else hands it rows through a
queue. That thread is nicer than the event loop, so that on a shared core requests run first; when it falls behind
for good (:data:`CATCH_UP_FROM` rows queued: a saturated core leaves it too little), a second thread at the loop's
own priority takes the turn until the backlog is down to a quarter of that.

Durability policy, in full:

* **Admission, not dropping.** Every call the proxy accepts first reserves a place in the write queue
  (:meth:`Writer.reserve`). The queue holds at most ``max_pending`` rows; when the store falls behind, new calls
  wait for a place (backpressure on the agents) instead of any accepted row being dropped, but for at most
  ``wait_timeout`` seconds: then :class:`StoreUnavailable` (the proxy answers 503). A reserved place is always
  available to :meth:`Writer.submit`, which never blocks, so a span can be recorded from a ``finally`` block of
  a cancelled request.
* **Batches, committed within the flush interval.** A row is committed within ``flush_interval`` (200 ms by
  default) of reaching the thread: from the oldest row in hand, the thread gathers what else comes until that
  row's deadline less the time the last write took, inserts it all as Arrow tables in one transaction (about
  10x faster than row-by-row parameters) and commits. Rows that arrived during a write are written at once if
  their deadline is that close. A busy proxy writes a few large batches instead of many small ones, and SIGKILL
  loses only rows that arrived in the last flush interval, as long as the thread gets the CPU it needs. How rows
  are typed, and what becomes of a row DuckDB refuses, is :mod:`store.rows`.
* **A failing store keeps its rows.** When a write fails for a reason that is the store's (disk full, I/O
  error), the thread keeps the batch, tries again with a growing delay (up to ``RETRY_MAX`` seconds) and goes on
  by itself once the store works again; meanwhile :attr:`Writer.problem` says why (``/healthz`` and ``/readyz``
  answer 503 with it), accepted rows wait in memory, and new calls wait for a place, then get 503.
* **Supervised.** An exception that escapes the thread's loop is logged, shown in :attr:`Writer.problem`, and
  the loop starts again (:attr:`Writer.restarts` counts it) with the rows it held, after ``RESTART_DELAY``;
  failing again before a step is done (a file that cannot be attached) doubles the wait, up to ``RESTART_MAX``.
* **Shutdown.** :meth:`Writer.close` enqueues a sentinel; the thread commits what precedes it and closes the
  file. A store still failing when the close times out (a disk still full) loses the rows it holds; the log
  says how many.

Reads from the same process use :meth:`Writer.cursor` (DuckDB cursors are safe per thread). Other processes read
through the sidecar's HTTP API or exported files: DuckDB allows one process per database file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import operator
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import duckdb

from store import database
from store import rows as store_rows
from store.migrations import migrate

log = logging.getLogger(__name__)
T = TypeVar("T")

_STOP = object()
# Seconds from a row reaching the thread to its commit, by default. A batch costs DuckDB ~9 ms of CPU however
# few its rows (this 2-core AVX2 machine: 10 rows or 100), so at 50 ms a sidecar serving 50 calls a second spent
# ~3 ms of CPU a call writing them (15 % of a core), at 200 ms ~0.9 ms; at 700 calls a second 0.5 and 0.14 ms.
FLUSH_INTERVAL = 0.2
# Rows per transaction at most; larger backlogs are written as several batches.
MAX_BATCH = 2_000
# How much nicer the writer thread is than the process. Where it shares a core with the event loop, the kernel
# then runs the request path first while DuckDB inserts and commits without the GIL (~3 ms of CPU a batch, however
# small), leaving this thread ~10% of a busy core; when that is too little for good, CATCH_UP_FROM below.
# Added p99 at concurrency 1 in bench/proxy_overhead.py: 2.7 ms at 0, 1.9 ms at 10.
WRITER_NICENESS = 10
# Rows queued past which the nice thread has fallen behind for good. Under sustained load on a saturated core it gets
# ~10 % of the core, less than the rows need: the queue filled to ``max_pending`` and the sidecar went stop-and-go,
# every call waiting for a 2,000-row batch, with 10,000 parsed calls for the cycle collector to walk. So from this
# many a second thread, at the loop's own priority, writes until a quarter are left. 4-minute soaks, one after the
# other: added p99 first -> last minute 23.8 -> 44.4 ms without it, 14.5 -> 21.1 ms with it; the collector's time
# 13.9 -> 8.6 s; the same calls/s. At 2,000 rows it also took the turn in the pinned bench's 5-second bursts (c=1
# p50 +0.08 ms); at nice 0 throughout, c=1's p99 rose 1.1 ms. See the README's "Footprint".
CATCH_UP_FROM = 5_000
# Seconds before trying a failed write again, doubled after each failure up to RETRY_MAX.
RETRY_FIRST = 0.05
RETRY_MAX = 2.0
# Seconds before the thread's loop starts again after an exception escaped it, doubled for each failure that
# follows the last with no step done in between (a file that cannot be attached), up to RESTART_MAX.
RESTART_DELAY = 0.5
RESTART_MAX = 30.0
# Seconds between two trims of DuckDB's cache (:meth:`Writer._trim`).
TRIM_INTERVAL = 10.0
# Rows written between two re-attachments of the file (:meth:`Writer._trim`), which free what DuckDB loaded of it:
# every row group's metadata stays in memory while the file is attached, ~40 bytes a span at 2,048-row groups
# (store.database), so a sidecar grew ~6 MB a minute at 1,000 calls a second. At this count it holds at most
# ~10 MB of it; a re-attachment takes a checkpoint and ~55 ms (600k spans), once every few minutes under load.
REATTACH_ROWS = 250_000


class StoreUnavailable(Exception):
    """The store took no row within the wait: it is failing (the message says why) or far behind."""


class Record(Protocol):
    """Something the writer can insert: a table name and a row in the order of its kind's dataclass fields."""

    table: ClassVar[str]

    def to_row(self) -> tuple[object, ...]: ...


class Row:
    """Base of the store's record dataclasses: the row is the dataclass's fields, in order."""

    __slots__ = ()
    table: ClassVar[str]

    def to_row(self) -> tuple[object, ...]:
        return _values_of(type(self))(self)  # type: ignore[arg-type]  # mypy: a class is not Hashable


def columns_of(kind: type[Record]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(kind))  # type: ignore[arg-type]


@functools.cache
def _values_of(kind: type[Row]) -> Callable[[Row], tuple[object, ...]]:
    """A kind's fields read in one C call: the writer thread builds every row holding the GIL, and reading them
    through ``dataclasses.fields`` took 11.7 us a span (23 ms of a 2,000-row batch), against 2.5."""
    names = columns_of(kind)
    get = operator.attrgetter(*names)
    return get if len(names) > 1 else lambda row: (get(row),)


class Writer:
    def __init__(
        self,
        path: Path | str,
        *,
        kinds: Sequence[type[Record]],
        max_pending: int = 10_000,
        flush_interval: float = FLUSH_INTERVAL,
        wait_timeout: float = 10.0,
        on_commit: Callable[[list[Record]], None] | None = None,
        memory_limit_mb: int = 2048,
        cache_mb: int = 32,
        threads: int = 1,
    ) -> None:
        self.path = Path(path)
        self.max_pending = max_pending
        self.flush_interval = flush_interval
        self.wait_timeout = wait_timeout
        self.on_commit = on_commit
        # DuckDB's own defaults size it for a database server: 80% of the machine's RAM and a thread per core,
        # threads that then compete with the event loop at its priority. See the README's "Footprint" section.
        self.duckdb_config: dict[str, database.Setting] = {
            "memory_limit": f"{memory_limit_mb}MiB",
            "threads": threads,
        }
        self.cache_mb = cache_mb  # what DuckDB may keep beyond its indexes between two trims
        self._readers = 0  # cursors in use (a trim waits for none)
        self._readers_lock = threading.Lock()
        self._trimmed = time.monotonic()
        self._attached_at = 0  # self.written when the file was last attached
        self._attached = True  # False after a re-attachment failed half-way: the thread's next step attaches it
        self.reattached = 0  # re-attachments of the file (Prometheus counter in proxy.metrics)
        self.memory: dict[str, int] = {}  # bytes DuckDB holds by tag (duckdb_memory()), as of the last trim
        # Counts since the writer opened (Prometheus counters in proxy.metrics).
        self.written = 0
        self.rejected = 0  # rows the store refused
        self.failures = 0  # attempts to write a batch that failed (it is tried again)
        self.restarts = 0  # of the thread's loop, after an exception escaped it
        self._steps = 0  # steps the threads completed: a restart with none since the last waits longer
        self.unavailable = 0  # waits for a place, or for a flush, that timed out: StoreUnavailable (503)
        self.problem: str | None = None  # why the store cannot write now; None while it works
        self._kinds = {kind.table: kind for kind in kinds}
        self._tables: dict[str, store_rows.Table] = {}
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        # The two writer threads take turns: the nice one while it keeps up, the other one while it catches up.
        self._turn = threading.Lock()  # held by the thread writing
        self._state = threading.Condition()  # guards the two flags below, and wakes the thread whose turn it is
        self._catching_up = False
        self._closing = False
        self._catch_up_from = max(1, min(CATCH_UP_FROM, max_pending // 2))
        self.catch_ups = 0  # times the second thread took over (Prometheus counter in proxy.metrics)
        self._con: duckdb.DuckDBPyConnection | None = None
        # The thread's work in hand, kept across a restart of its loop: rows not yet written, flushes to answer.
        self._batch: list[Record] = []
        self._flushes: list[asyncio.Future[None]] = []
        self._stopping = False
        self._deadline: float | None = None  # set by close(): when to give up on a failing store
        self._gathered = 0.0  # when the last gather took what was queued: rows queued since came after it
        self._write_s = 0.0  # what the last write took (with on_commit): a batch's deadline leaves room for it
        self._wake = threading.Event()  # cuts a retry's wait short at close

    @property
    def rejected_path(self) -> Path:
        return self.path.with_suffix(store_rows.REJECTED_SUFFIX)

    # -- life cycle -------------------------------------------------------------------------------------------

    def open(self) -> None:
        """Open (creating if needed) and migrate the database, then start the writer thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._con = database.connect(self.path, self.duckdb_config)
        applied = migrate(self._con)
        if applied:
            log.info("store %s: applied migrations %s", self.path, ", ".join(applied))
        self._tables = {
            table: store_rows.Table.read(self._con, table, columns_of(kind), replace=getattr(kind, "replace", False))
            for table, kind in self._kinds.items()
        }
        # DuckDB's first Arrow scan costs ~0.3 s: pay it now, not on the first call
        store_rows.write(self._con, self._tables, {table: [] for table in self._tables})
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.max_pending)
        self._threads = [
            threading.Thread(target=self._main, args=(False,), name="lightwire-store-writer", daemon=True),
            threading.Thread(target=self._main, args=(True,), name="lightwire-store-catch-up", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    async def close(self, timeout: float = 30.0) -> None:
        """Write everything submitted so far, then close the file; a store still failing after ``timeout`` seconds
        loses what it holds (logged with the count)."""
        if not self._threads:
            return
        self._deadline = time.monotonic() + timeout
        self._queue.put(_STOP)
        with self._state:
            self._closing = True
            self._state.notify_all()
        self._wake.set()
        ends = time.monotonic() + timeout + RETRY_MAX + 5
        for thread in self._threads:
            await asyncio.to_thread(thread.join, max(0.0, ends - time.monotonic()))
        if any(thread.is_alive() for thread in self._threads):
            log.error("store writer did not finish; rows still queued: %d", self._queue.qsize() + len(self._batch))
        elif self._con is not None:
            try:
                self._con.close()
            except duckdb.Error as exc:  # its last checkpoint failed; the WAL holds what was committed
                log.error("store %s: closing failed (%s)", self.path, exc)
        self._threads = []

    # -- writing ----------------------------------------------------------------------------------------------

    async def reserve(self, *, forever: bool = False) -> None:
        """Wait for a place in the queue; each reservation entitles one :meth:`submit`.

        Waits at most ``wait_timeout`` seconds, then raises :class:`StoreUnavailable`; with ``forever`` (rows the
        sidecar makes in the background), as long as it takes.
        """
        assert self._slots is not None, "writer not open"
        if forever or not self._slots.locked():
            await self._slots.acquire()
            return
        try:
            async with asyncio.timeout(self.wait_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise self._unavailable() from None

    async def flush(self) -> None:
        """Wait until every row submitted so far is committed, at most ``wait_timeout`` seconds (then
        :class:`StoreUnavailable`)."""
        assert self._loop is not None, "writer not open"
        done = self._loop.create_future()
        self._queue.put(done)
        try:
            async with asyncio.timeout(self.wait_timeout):
                await done
        except TimeoutError:
            raise self._unavailable() from None

    def unreserve(self) -> None:
        """Give back a reservation that will not be used."""
        assert self._slots is not None
        self._slots.release()

    def submit(self, record: Record) -> None:
        """Queue a row whose place was reserved; never blocks."""
        if record.table not in self._kinds:
            raise ValueError(f"this writer does not write {record.table!r} rows")
        self._queue.put(record)
        if self._queue.qsize() >= self._catch_up_from and not self._catching_up:
            with self._state:
                self._catching_up = True
                self.catch_ups += 1
                self._state.notify_all()

    @property
    def pending(self) -> int:
        return self._queue.qsize() + len(self._batch)

    @contextlib.contextmanager
    def cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor for reads (or writes that need an answer) from another thread of this process, closed on
        leaving the block. Taking one waits while a trim holds DuckDB's limit low (tens of ms, every 10 s)."""
        assert self._con is not None, "writer not open"
        with self._readers_lock:
            self._readers += 1
        try:
            with database.cursor(self._con) as con:
                yield con
        finally:
            with self._readers_lock:
                self._readers -= 1

    async def read(self, query: Callable[..., T], *args: Any, lean: bool = False) -> T:
        """``query(cursor, *args)`` in a worker thread, off the event loop.

        ``lean`` is for a scan of much of the store (the sessions a crash left open, read at start): it runs
        under the trim's limit (:meth:`_lowered`), so that DuckDB evicts the blocks it reads as it goes instead
        of caching them up to ``memory_limit``; other reads and trims wait meanwhile, and writes that find the
        limit too low are retried. A query that does not fit under it runs again at the full limit. A sidecar
        starting on 1M spans went from 168 to 377 MB RSS with the scan; lean, 208 at its peak and 172 after, in
        the same ~0.35 s (``bench.store_growth``)."""

        def run() -> T:
            with self.cursor() as con:
                if lean:
                    with self._readers_lock, self._lowered(con):
                        try:
                            return query(con, *args)
                        except duckdb.OutOfMemoryException as exc:  # e.g. an aggregate that cannot spill enough
                            log.warning("a lean read needs more than the trimmed limit (%s); read at the full one", exc)
                return query(con, *args)

        return await asyncio.to_thread(run)

    def _unavailable(self) -> StoreUnavailable:
        """A wait that timed out: count it, and say why."""
        self.unavailable += 1
        if self.problem is not None:
            return StoreUnavailable(
                f"The store cannot write ({self.problem}); it keeps the calls it accepted and retries."
            )
        return StoreUnavailable(f"The store is behind: {self.pending} rows wait to be written; try again shortly.")

    # -- the thread -------------------------------------------------------------------------------------------

    def _main(self, catch_up: bool) -> None:
        if sys.platform == "linux" and not catch_up:  # there, a thread's id names it to setpriority
            me = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + WRITER_NICENESS))
        assert self._con is not None
        con = database.cursor(self._con)
        in_a_row = 0
        while True:
            steps = self._steps
            try:
                self._serve(con, catch_up)
                break
            except BaseException as exc:  # nothing may end the thread that every accepted call waits on
                self.restarts += 1
                self.problem = f"the writer thread failed ({exc!r}) and was restarted"
                in_a_row = in_a_row + 1 if self._steps == steps else 1
                delay = min(RESTART_DELAY * 2 ** (in_a_row - 1), RESTART_MAX)
                if in_a_row == 1:
                    log.exception("store writer thread failed; restarting it with %d rows in hand", len(self._batch))
                else:
                    log.error(
                        "store writer thread failed again (%r), %d times in a row; next try in %.1f s",
                        exc,
                        in_a_row,
                        delay,
                    )
                time.sleep(delay)
        con.close()

    def _serve(self, con: duckdb.DuckDBPyConnection, catch_up: bool) -> None:
        """Take turns: the nice thread writes unless the other is catching up; that one writes from
        ``CATCH_UP_FROM`` queued rows until they are down to a quarter of it (or, closing, until the end)."""
        while True:
            with self._state:
                self._state.wait_for(lambda: self._closing or self._catching_up == catch_up)
            with self._turn:
                while True:
                    if not self._step(con):
                        return
                    if not catch_up and self._catching_up:
                        break  # the turn goes to the other thread
                    if catch_up and not self._closing and self.pending <= self._catch_up_from // 4:
                        with self._state:
                            self._catching_up = False
                            self._state.notify_all()
                        break

    def _step(self, con: duckdb.DuckDBPyConnection) -> bool:
        """Gather, write, answer flushes, trim; False once the writer has stopped."""
        if not self._attached:  # a re-attachment failed half-way; failing again, the thread's restart retries it
            database.attach(con, self.path)
            self._attached = True
        if not self._batch and not self._flushes and not self._stopping:
            self._gather()
        if self._batch:
            began = time.monotonic()
            self._write(con)
            self._write_s = time.monotonic() - began
        while self._flushes:
            self._answer(self._flushes.pop())
        if time.monotonic() - self._trimmed >= TRIM_INTERVAL:
            self._trim(con)
        self._steps += 1
        return not (self._stopping and not self._batch)

    def _gather(self) -> None:
        """Wait for rows, then take what else comes until the oldest must be written to be committed within the
        flush interval (at most MAX_BATCH)."""
        self.problem = None  # nothing in hand: a write failing was retried until it worked; a restart is over
        queued = not self._queue.empty()
        try:
            item = self._queue.get(timeout=max(0.0, self._trimmed + TRIM_INTERVAL - time.monotonic()))
        except queue.Empty:
            return  # idle: the step trims DuckDB's cache all the same (what a scan loaded is given back)
        # A row found queued came while the last batch was being written: at most since the last gather.
        oldest = self._gathered if queued else time.monotonic()
        # Sleep rather than wait on the queue: a waiting thread would be woken (and take the GIL from the
        # request path) by every row put in the meantime. A flush request is answered without the wait, and so
        # is a full queue: no other row can come until these are written.
        if not isinstance(item, asyncio.Future) and self._queue.qsize() + 1 < self._catch_up_from:
            time.sleep(max(0.0, oldest + self.flush_interval - self._write_s - time.monotonic()))
        self._gathered = time.monotonic()
        while True:
            if item is _STOP:
                self._stopping = True
                return
            if isinstance(item, asyncio.Future):
                self._flushes.append(item)
            else:
                self._batch.append(item)  # type: ignore[arg-type]
            if len(self._batch) >= MAX_BATCH:
                self._gathered = 0.0  # a backlog is left queued: write it without waiting
                return
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return

    def _write(self, con: duckdb.DuckDBPyConnection) -> None:
        """Write the batch in hand; while the store fails, keep it and try again (or, closing, set it aside)."""
        batch = self._batch
        delay = RETRY_FIRST
        while True:
            try:
                self._write_once(con, batch)
                break
            except Exception as exc:
                self.failures += 1
                self.problem = str(exc).splitlines()[0] if str(exc) else repr(exc)
                log.error("store write of %d rows failed (%s); retrying in %.2f s", len(batch), exc, delay)
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    self._give_up(batch)
                    return
                self._wake.wait(delay)
                delay = min(delay * 2, RETRY_MAX)
        self.problem = None
        self.written += len(batch)
        assert self._loop is not None and self._slots is not None
        self._loop.call_soon_threadsafe(_release, self._slots, len(batch))
        self._batch = []
        if self.on_commit is not None:
            try:
                self.on_commit(batch)
            except Exception:
                log.exception("on_commit hook failed")

    def _write_once(self, con: duckdb.DuckDBPyConnection, batch: list[Record]) -> None:
        by_table: dict[str, list[tuple[object, ...]]] = {}
        refused: list[store_rows.Refusal] = []
        for record in batch:
            try:
                by_table.setdefault(record.table, []).append(record.to_row())
            except BaseException as exc:  # were it to escape, the same record would fail again after a restart
                log.exception("could not build a %s row", record.table)
                refused.append(store_rows.Refusal(record.table, f"could not build the row: {exc!r}", None))
        refused += store_rows.write(con, self._tables, by_table)
        if refused:
            for refusal in refused:
                log.error("%s row refused by the store: %s", refusal.table, refusal.reason)
            store_rows.append(self.rejected_path, map(store_rows.refusal_line, refused))
            self.rejected += len(refused)

    def _trim(self, con: duckdb.DuckDBPyConnection) -> None:
        """Give DuckDB's cache back, down to ``cache_mb`` beyond its indexes; after ``REATTACH_ROWS`` rows, all
        that it loaded of the file, by attaching it again.

        Under its memory limit DuckDB keeps every table block it wrote or read, and its allocator keeps what it
        freed: with a 2 GiB limit a sidecar grew by ~300 bytes a call (980 MB after 1.8M calls, ``bench/soak.py``).
        The limit cannot simply be low: a table's indexes (ART, ~100 bytes a call) must fit under it whole, or a
        checkpoint fails fatally. So the limit stays the ceiling, and every ``TRIM_INTERVAL`` seconds it is
        lowered to the indexes plus ``cache_mb`` (DuckDB evicts down to it and hands the memory back) and raised
        again. No cursor is in use meanwhile: a query would find its memory limit low, or the file detached."""
        self._trimmed = time.monotonic()
        if not self._attached:  # the thread's next step attaches it
            return
        with self._readers_lock:
            if not self._readers and self.written - self._attached_at >= REATTACH_ROWS:
                self._reattach(con)
            elif not self._readers:
                self._evict(con)
        self.memory = _memory(con)

    def _evict(self, con: duckdb.DuckDBPyConnection) -> None:
        """Lower DuckDB's limit to its indexes plus ``cache_mb`` (it evicts down to it), then raise it again."""
        with self._lowered(con):
            pass

    @contextlib.contextmanager
    def _lowered(self, con: duckdb.DuckDBPyConnection) -> Iterator[None]:
        """DuckDB's limit lowered to its indexes plus ``cache_mb``, and no checkpoint meanwhile: a write in the
        while (from the writer thread during a lean read) would make it under that limit. The write itself, if it
        fails for memory, is retried."""
        [(wal,)] = con.execute("SELECT current_setting('wal_autocheckpoint')").fetchall()
        indexes = _memory(con).get("art_index", 0)
        try:
            con.execute("SET wal_autocheckpoint = '1TB'")
            con.execute(f"SET memory_limit = '{(indexes >> 20) + self.cache_mb}MiB'")
        except duckdb.Error as exc:  # it could not evict that far now (blocks in use): the next trim will
            log.debug("store cache trim: %s", exc)
        try:
            yield
        finally:
            con.execute(f"SET memory_limit = '{self.duckdb_config['memory_limit']}'")
            con.execute(f"SET wal_autocheckpoint = '{wal}'")

    def _reattach(self, con: duckdb.DuckDBPyConnection) -> None:
        """Detach the file and attach it again (``store.database``). Failing to detach leaves it attached;
        failing to attach leaves it to the thread's next step, retried as the thread restarts (``/healthz`` says
        why meanwhile)."""
        self._attached_at = self.written
        try:
            database.detach(con)
        except duckdb.Error as exc:
            log.warning("store re-attachment: the file stays attached (%s)", exc)
            con.execute(f"USE {database.CATALOG}")
            return
        self._attached = False
        try:
            database.attach(con, self.path)
        except duckdb.Error as exc:
            self.problem = f"the store's file could not be attached again ({exc})"  # /healthz: 503 until it is
            log.error("store re-attachment failed (%s); trying again", exc)
            return
        self._attached = True
        self.reattached += 1

    def _give_up(self, batch: list[Record]) -> None:
        """Closing, and the store still fails after the close's timeout: say what is lost."""
        lost = len(batch)
        with contextlib.suppress(queue.Empty):
            while True:
                item = self._queue.get_nowait()
                if isinstance(item, asyncio.Future):
                    self._flushes.append(item)
                elif item is not _STOP:
                    lost += 1
        log.error("store %s: still failing at shutdown (%s); %d accepted rows are lost", self.path, self.problem, lost)
        self._stopping = True
        self._batch = []

    def _answer(self, done: asyncio.Future[None]) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop has closed
            self._loop.call_soon_threadsafe(_resolve, done)


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _release(slots: asyncio.Semaphore, n: int) -> None:
    for _ in range(n):
        slots.release()


def _memory(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Bytes DuckDB holds, by tag (``art_index``, ``base_table``, ...)."""
    return dict(
        con.execute(
            "SELECT lower(tag), memory_usage_bytes FROM duckdb_memory() WHERE memory_usage_bytes > 0"
        ).fetchall()
    )

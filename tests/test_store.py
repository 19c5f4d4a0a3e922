"""The store's own faults: values no column holds, rows DuckDB refuses (and their re-import), a writer thread
that an exception escapes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import duckdb
import pytest
from aiohttp import web

from store import database, idkeys, migrations, queries
from store import writer as writer_module
from store.feedback import Feedback, SessionEnd
from store.spans import Span
from store.writer import CATCH_UP_FROM, Writer
from tests.conftest import read_rows

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
# What a backend may send: fields of the wrong type, counts no integer column holds.
ODD_RESPONSE = {
    "id": 7,
    "object": "chat.completion",
    "model": ["not", "a", "name"],
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": 5}],
    "usage": {"prompt_tokens": 1e300, "completion_tokens": "many"},
}


def feedback(n: int, value: Any = 1.0) -> Feedback:
    return Feedback(f"fb-{n}", None, "s1", "reward", value, None, "api", datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC))


async def lightwire(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def test_values_no_column_holds_are_kept_in_the_json_and_the_span_is_written(start_proxy) -> None:
    async def odd(request: web.Request) -> web.Response:
        return web.json_response(ODD_RESPONSE)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", odd)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    proxy = await start_proxy(f"http://127.0.0.1:{port}/v1")
    try:
        async with aiohttp.ClientSession() as http:
            for max_tokens in (3_000_000_000, 2**64 - 1, 5):  # JSON integers; the second one fits no BIGINT
                body = {**CHAT, "max_tokens": max_tokens, "temperature": 10**30}
                async with http.post(proxy.url + "/chat/completions", json=body) as resp:
                    assert resp.status == 200, await resp.text()
        spans = await proxy.spans()
    finally:
        await runner.cleanup()
    assert [s["request_max_tokens"] for s in spans] == [3_000_000_000, None, 5]
    assert spans[1]["request"]["max_tokens"] == 2**64 - 1  # the raw value, in the request JSON
    assert all(s["request_temperature"] == 1e30 for s in spans)
    for span in spans:  # the backend's odd fields: NULL where typed, the span written
        assert (span["response_id"], span["response_model"], span["response_finish_reasons"]) == (None, None, None)
        assert (span["usage_input_tokens"], span["usage_output_tokens"]) == (None, None)
    assert not proxy.config.db.with_suffix(".rejected.jsonl").exists()


async def test_a_refused_row_leaves_its_batch_written_and_reimport_brings_it_back(tmp_path: Path) -> None:
    db = tmp_path / "store.duckdb"
    writer = Writer(db, kinds=[Feedback])
    writer.open()
    for record in (feedback(1), feedback(2, "not a number"), feedback(3)):  # one batch: one flush interval
        await writer.reserve()
        writer.submit(record)
    await writer.flush()
    await writer.close()
    assert [r["feedback_id"] for r in read_rows(db, "SELECT feedback_id FROM feedback ORDER BY 1")] == ["fb-1", "fb-3"]
    rejected = db.with_suffix(".rejected.jsonl")
    [line] = [json.loads(text) for text in rejected.read_text().splitlines()]
    assert line["table"] == "feedback" and "feedback.value" in line["reason"] and "not a number" in line["reason"]
    assert line["row"]["feedback_id"] == "fb-2" and line["row"]["created_at"] == "2025-01-02T03:04:05+00:00"

    code, out = await lightwire("store", "reimport", "--db", str(db))  # still refused: kept, exit 1
    assert code == 1 and "1 refused again" in out, out
    line["row"]["value"] = 0.5  # fixed by hand
    rejected.write_text(json.dumps(line) + "\n")
    code, out = await lightwire("store", "reimport", "--db", str(db))
    assert code == 0 and "imported 1 feedback" in out, out
    rows = read_rows(db, "SELECT feedback_id, value, created_at FROM feedback ORDER BY 1")
    assert [(r["feedback_id"], r["value"]) for r in rows] == [("fb-1", 1.0), ("fb-2", 0.5), ("fb-3", 1.0)]
    assert rows[1]["created_at"] == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert not rejected.exists()


async def test_every_writer_of_the_file_keeps_its_row_groups_small(tmp_path: Path) -> None:
    """A checkpoint rewrites the last, partly filled row group whole: at DuckDB's default (122,880 rows) the
    sidecar's checkpoints grew to seconds and hundreds of MB. DuckDB keeps no row group size in the file, so the
    writer and ``store reimport`` each set it, and neither merges the other's groups back into big ones."""
    db = tmp_path / "store.duckdb"
    for first in (0, 3000):  # two runs of the sidecar, a checkpoint at each close
        writer = Writer(db, kinds=[Feedback])
        writer.open()
        for n in range(first, first + 3000):
            await writer.reserve()
            writer.submit(feedback(n))
        await writer.flush()
        await writer.close()
    db.with_suffix(".rejected.jsonl").write_text(
        json.dumps({"table": "feedback", "reason": "r", "row": dataclasses.asdict(feedback(6000))}, default=str) + "\n"
    )
    code, out = await lightwire("store", "reimport", "--db", str(db))
    assert code == 0 and "imported 1 feedback" in out, out
    groups = read_rows(
        db,
        "SELECT row_group_id, sum(count) AS n FROM pragma_storage_info('feedback') WHERE column_path = '[0]' "
        "GROUP BY ALL ORDER BY 1",
    )
    assert sum(g["n"] for g in groups) == 6001
    assert max(g["n"] for g in groups) <= database.ROW_GROUP_SIZE and len(groups) >= 3, groups


async def test_reimport_reads_the_spans_earlier_versions_refused(tmp_path: Path) -> None:
    """Before wide counts, a span with "max_tokens": 3000000000 was refused and written as a positional list."""
    db = tmp_path / "store.duckdb"
    start = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    span = Span(
        *("0123456789abcdef", "0" * 32, None, "s1", "chat", "openai", "m", "m", "c1", False, 3_000_000_000),
        *(None, None, ["stop"], 3, 4, json.dumps({**CHAT, "max_tokens": 3_000_000_000}), None, None, None, None),
        *(start, 12.5, None, 200, None, None, 0, "header"),
    )
    old_line = json.dumps(span.to_row(), default=repr)  # what the old writer's _reject wrote
    db.with_suffix(".rejected.jsonl").write_text(old_line + "\n")
    code, out = await lightwire("store", "reimport", "--db", str(db))
    assert code == 0 and "imported 1 spans" in out, out
    [row] = read_rows(db, "SELECT span_id, request_max_tokens, start_time, response_finish_reasons FROM spans")
    assert row == {
        "span_id": "0123456789abcdef",
        "request_max_tokens": 3_000_000_000,
        "start_time": start,
        "response_finish_reasons": ["stop"],
    }


class WriterKilled(BaseException):
    """Not an Exception: what ends a thread whose loop catches only those."""


async def test_an_exception_escaping_the_writer_thread_restarts_it_and_loses_nothing(tmp_path: Path) -> None:
    seen: list[int] = []

    def on_commit(records: list[Any]) -> None:
        seen.append(len(records))
        if len(seen) == 1:
            raise WriterKilled("on_commit ended the writer thread")

    writer = Writer(tmp_path / "store.duckdb", kinds=[Feedback], on_commit=on_commit, wait_timeout=30)
    writer.open()
    for n in range(4):
        await writer.reserve()
        writer.submit(feedback(n))
        await writer.flush()  # before the restart: a flush that would never be answered
    await writer.close()
    assert writer.restarts == 1 and seen == [1, 1, 1, 1]
    [row] = read_rows(tmp_path / "store.duckdb", "SELECT count(*) AS n FROM feedback")
    assert row["n"] == 4


def failing_attach(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """Make ``database.attach`` raise each exception put in the returned list, once, before it attaches."""
    attach, failures = database.attach, []

    def attach_or_fail(con: duckdb.DuckDBPyConnection, path: Path, **kwargs: Any) -> None:
        if failures:
            raise failures.pop()
        attach(con, path, **kwargs)

    monkeypatch.setattr(database, "attach", attach_or_fail)
    return failures


async def test_the_writer_attaches_the_file_again_every_so_many_rows_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DuckDB frees what it loaded of a file (row group metadata, index pages) only when it is detached: every
    REATTACH_ROWS rows the writer attaches it again, while rows keep coming and readers keep reading. An attach
    that fails is tried again before the writer's next step."""
    monkeypatch.setattr(writer_module, "TRIM_INTERVAL", 0.01)
    monkeypatch.setattr(writer_module, "REATTACH_ROWS", 1_000)
    failures = failing_attach(monkeypatch)
    writer = Writer(tmp_path / "store.duckdb", kinds=[Feedback], wait_timeout=30)
    writer.open()

    async def write(first: int, rows: int, *, read: bool) -> list[Any]:
        counts = []
        for n in range(first, first + rows):
            await writer.reserve()
            writer.submit(feedback(n))
            if n % 500 == 499:
                await writer.flush()
                if read:
                    counts.append(
                        await writer.read(lambda con: con.execute("SELECT count(*) FROM feedback").fetchone())
                    )
        return counts

    try:
        assert await write(0, 3_000, read=True) == [(n,) for n in range(500, 3_001, 500)]
        reattached = writer.reattached
        failures.append(duckdb.IOException("the disk went away"))  # the next attach: half-way through a re-attach
        await write(3_000, 3_000, read=False)
    finally:
        await writer.close()
    assert reattached >= 2 and not failures and writer.reattached > reattached and writer.failures == 0
    assert writer.restarts == 0  # the attach failed in the re-attachment, and the next step's attach worked
    [row] = read_rows(tmp_path / "store.duckdb", "SELECT count(DISTINCT feedback_id) AS n FROM feedback")
    assert row["n"] == 6_000


async def test_a_writer_that_fails_again_and_again_waits_longer_before_each_restart_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A file that cannot be attached again makes every restart fail at once: each waits twice as long as the
    last (not a restart and a logged traceback every RESTART_DELAY), and once the file attaches nothing is lost."""
    monkeypatch.setattr(writer_module, "TRIM_INTERVAL", 0.01)
    monkeypatch.setattr(writer_module, "REATTACH_ROWS", 100)
    monkeypatch.setattr(writer_module, "RESTART_DELAY", 0.05)
    failures = failing_attach(monkeypatch)
    writer = Writer(tmp_path / "store.duckdb", kinds=[Feedback], wait_timeout=30)
    writer.open()
    failures += [duckdb.IOException("the disk went away")] * 4  # the re-attachment's attach, then three restarts
    try:
        with caplog.at_level(logging.ERROR, logger="store.writer"):
            for n in range(300):
                await writer.reserve()
                writer.submit(feedback(n))
                if n % 100 == 99:
                    await writer.flush()
    finally:
        await writer.close()
    assert not failures and writer.restarts == 3
    waits = [record.args[-1] for record in caplog.records if "times in a row" in record.getMessage()]
    assert waits == [0.1, 0.2]  # the first restart waited RESTART_DELAY, with the traceback logged once
    [row] = read_rows(tmp_path / "store.duckdb", "SELECT count(DISTINCT feedback_id) AS n FROM feedback")
    assert row["n"] == 300


async def test_a_row_is_committed_within_the_flush_interval_even_when_writes_are_slow(tmp_path: Path) -> None:
    """A row that arrives while a batch is being written is not made to wait a whole flush interval after it:
    its deadline counts from its arrival. With writes of ~0.1 s, waiting the interval after one took ~0.4 s."""
    submitted: dict[str, float] = {}
    lags: list[float] = []

    def on_commit(records: list[Any]) -> None:
        now = time.monotonic()
        lags.extend(now - submitted[r.feedback_id] for r in records)
        time.sleep(0.1)  # a slow write, as on a busy disk

    writer = Writer(tmp_path / "store.duckdb", kinds=[Feedback], on_commit=on_commit, flush_interval=0.3)
    writer.open()
    for n in range(500):  # a row every ~2.5 ms for over a second
        await writer.reserve()
        submitted[f"fb-{n}"] = time.monotonic()
        writer.submit(feedback(n))
        await asyncio.sleep(0.0025)
    await writer.close()
    assert len(lags) == 500
    assert max(lags) <= 0.3 + 0.06, sorted(lags)[-5:]  # the margin: scheduling on a busy machine


async def test_a_writer_that_falls_behind_hands_its_turn_to_one_at_full_priority(tmp_path: Path) -> None:
    """The nice writer thread, starved (here: slow after each commit), lets more than a batch of rows queue up:
    the catch-up thread takes the turn, writes the backlog, and hands the turn back once it is down to a quarter
    of that; nothing is lost or written twice, and closing ends both threads."""
    committed: list[tuple[str, int]] = []

    def on_commit(records: list[Any]) -> None:
        committed.append((threading.current_thread().name, len(records)))
        if threading.current_thread().name == "lightwire-store-writer":
            time.sleep(0.2)  # a starved thread, as on a saturated core

    writer = Writer(
        tmp_path / "store.duckdb", kinds=[Feedback], on_commit=on_commit, max_pending=20_000, flush_interval=0.05
    )
    writer.open()
    await writer.reserve()
    writer.submit(feedback(-1))
    await writer.flush()  # nothing behind: the nice thread's turn (on a busy machine a burst could pass it first)
    rows = 3 * CATCH_UP_FROM
    for n in range(rows):  # faster than any writer: the queue grows past CATCH_UP_FROM at once
        await writer.reserve()
        writer.submit(feedback(n))
    await writer.flush()
    assert writer.catch_ups == 1 and writer.pending == 0
    threads = [name for name, _ in committed]
    assert threads[0] == "lightwire-store-writer" and "lightwire-store-catch-up" in threads
    await writer.reserve()
    writer.submit(feedback(rows))
    await writer.flush()
    assert committed[-1] == ("lightwire-store-writer", 1)  # the turn was handed back
    await writer.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("lightwire-store-")]
    [row] = read_rows(
        tmp_path / "store.duckdb", "SELECT count(*) AS n, count(DISTINCT feedback_id) AS ids FROM feedback"
    )
    assert row == {"n": rows + 2, "ids": rows + 2} and writer.rejected == 0


def span(n: int, session_id: str | None, response_id: str | None) -> Span:
    start = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    return Span(
        *(f"{n:016x}", "0" * 32, None, session_id, "chat", "openai", "m", "m", response_id, False, None),
        *(None, None, ["stop"], 3, 4, json.dumps(CHAT), None, None, None, None),
        *(start, 12.5, None, 200, None, None, 0, "header"),
    )


async def test_a_call_is_found_by_the_key_of_its_response_id_and_spans_keep_no_index(tmp_path: Path) -> None:
    """Each ART index on ``spans`` stays in memory, ~50 bytes a span: a response id is found by a scan of its
    64-bit key instead, made by the same function in SQL and in Python."""
    db = tmp_path / "store.duckdb"
    writer = Writer(db, kinds=[Span])
    writer.open()
    ids = ["resp-1", "chatcmpl-é✓", "", "x" * 300]
    for n, response_id in enumerate([*ids, None]):
        await writer.reserve()
        writer.submit(span(n, f"s{n % 2}" if response_id is not None else None, response_id))
    await writer.flush()
    with writer.cursor() as con:
        assert queries.find_call(con, response_id="chatcmpl-é✓") == (f"{1:016x}", "s1")
        assert queries.find_call(con, response_id="resp-2") is None
        keys = con.execute("SELECT response_id, response_key FROM spans WHERE response_id IS NOT NULL").fetchall()
        assert {value: idkeys.key(value) for value in ids} == dict(keys)
        assert con.execute("SELECT count(*) FROM spans WHERE response_key IS NULL").fetchone() == (1,)
    await writer.close()
    assert spans_indexes(db) == {}


def test_the_response_key_migration_drops_the_index_and_fills_the_keys_of_existing_spans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "store.duckdb"
    with store_before(db, "011_response_key", monkeypatch) as con:
        for n, response_id in ((1, "r1"), (2, None)):
            insert_span(con, n, session_id="s1", response_id=response_id)
        assert migrations.migrate(con) == applied_from("011_response_key")
        assert queries.find_call(con, response_id="r1") == (f"{1:016x}", "s1")
    assert spans_indexes(db) == {}


async def test_a_session_s_row_keeps_its_turns_and_bounds_the_read_of_its_spans(tmp_path: Path) -> None:
    """What the index on the spans' session ids was for: a named session's count, and a hook's read of it."""
    writer = Writer(tmp_path / "store.duckdb", kinds=[Span, SessionEnd])
    writer.open()
    first = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    # an earlier call of the same id, long before; three calls; a fourth after the session's end (it came back)
    for n, (seconds, turn) in enumerate([(-3600, None), (0, 0), (1, 1), (2, 2), (10, 3)]):
        call = span(n, "s1", None)
        call.start_time, call.turn_index = first + timedelta(seconds=seconds), turn
        await writer.reserve()
        writer.submit(call)
    await writer.reserve()
    writer.submit(SessionEnd("s1", first + timedelta(seconds=2), "idle", 3, first))
    await writer.flush()
    with writer.cursor() as con:
        assert queries.session_record(con, "s1") == (3, first) and queries.session_record(con, "s2") is None
        # as a hook reads it at that end: from its first call on, in turn order, up to the end
        assert queries.session_spans(con, "s1", "turn_index") == [(0,), (1,), (2,)]
        assert queries.session_spans(con, "s1", "turn_index", limit=1) == [(0,)]
        # as the export reads the turns before a later call of it
        within, bounds = queries.session_window(con, "s1", until=first + timedelta(seconds=10))
        turns = con.execute(f"SELECT turn_index FROM spans WHERE session_id = 's1' {within} ORDER BY 1", bounds)
        assert turns.fetchall() == [(0,), (1,), (2,), (3,)]
        assert queries.interrupted_sessions(con) == [
            ("s1", 4, first - timedelta(hours=1), first + timedelta(seconds=10))
        ]
    await writer.close()


def test_the_session_turns_migration_counts_each_ended_session_and_drops_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "store.duckdb"
    with store_before(db, "012_session_turns", monkeypatch) as con:
        start = datetime(2025, 1, 2, tzinfo=UTC)
        for n, (session_id, turn) in enumerate([("ended", 0), ("ended", 1), ("ended", None), ("open", 0)]):
            insert_span(con, n, session_id=session_id, turn_index=turn, start_time=start + timedelta(seconds=n))
        con.execute("INSERT INTO sessions (session_id, ended_at, end_reason) VALUES ('ended', now(), 'idle')")
        assert migrations.migrate(con) == applied_from("012_session_turns")
        assert queries.session_record(con, "ended") == (2, start)  # model calls only
        # the session a process held when it stopped unended: found at the next start
        [(session_id, turns, first, last)] = queries.interrupted_sessions(con)
        assert (session_id, turns, last - first) == ("open", 1, timedelta(0))
    assert spans_indexes(db) == {}


def test_the_spans_by_time_migration_keys_the_spans_by_start_time_and_keeps_every_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "store.duckdb"
    with store_before(db, "013_spans_by_time", monkeypatch) as con:
        start = datetime(2025, 1, 2, tzinfo=UTC)
        for n in range(3):
            insert_span(con, n, session_id=f"s{n}", start_time=start + timedelta(seconds=n))
        before = con.execute("SELECT * FROM spans ORDER BY span_id").fetchall()
        assert migrations.migrate(con) == applied_from("013_spans_by_time")
        assert con.execute("SELECT * EXCLUDE (span_key) FROM spans ORDER BY span_id").fetchall() == before
        assert queries.find_call(con, span_id=f"{1:016x}") == (f"{1:016x}", "s1")
        # a row already written is refused again; the same span id at another time is another row
        with pytest.raises(duckdb.ConstraintException, match="Duplicate key"):
            insert_span(con, 1, start_time=start + timedelta(seconds=1))
        insert_span(con, 1, start_time=start + timedelta(seconds=9))
        newest = con.execute("SELECT max(share_seq) FROM spans").fetchone()
        assert newest == (con.execute("SELECT currval('share_seq')").fetchone()[0],)
    assert read_rows(
        db,
        "SELECT constraint_column_names AS key FROM duckdb_constraints() "
        "WHERE table_name = 'spans' AND constraint_type = 'PRIMARY KEY'",
    ) == [{"key": ["start_time", "span_id"]}]
    assert spans_indexes(db) == {}


def test_no_table_keeps_an_index_beyond_its_primary_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DuckDB holds an index on random keys whole, for the life of the process: only what a lookup uses stays."""
    with store_before(tmp_path / "store.duckdb", "014_feedback_unindexed", monkeypatch) as con:
        con.execute(
            "INSERT INTO feedback (feedback_id, span_id, session_id, name, value, source, created_at) "
            "VALUES ('f1', 's1', 'session', 'reward', 1, 'api', now())"
        )
        assert migrations.migrate(con) == ["014_feedback_unindexed"]
        assert con.execute("SELECT table_name, index_name FROM duckdb_indexes()").fetchall() == []
        assert con.execute("SELECT feedback_id, span_id, session_id FROM feedback").fetchall() == [
            ("f1", "s1", "session")
        ]


def insert_span(con: duckdb.DuckDBPyConnection, n: int, **columns: Any) -> None:
    """A span as an older version wrote it, in SQL (its code may take other columns than today's)."""
    row = {"span_id": f"{n:016x}", "trace_id": "0", "operation_name": "chat", "provider_name": "openai"}
    row |= {"request_stream": False, "request": "{}", "start_time": datetime.now(UTC), "duration_ms": 1.0, **columns}
    con.execute(f"INSERT INTO spans ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))


@contextlib.contextmanager
def store_before(db: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[duckdb.DuckDBPyConnection]:
    """A store made before the migration ``name`` shipped."""
    with duckdb.connect(str(db)) as con:
        with monkeypatch.context() as patch:
            patch.setattr(migrations, "MIGRATIONS", [m for m in migrations.MIGRATIONS if m[0] < name])
            migrations.migrate(con)
        yield con


def applied_from(name: str) -> list[str]:
    return [m for m, _ in migrations.MIGRATIONS if m >= name]


def spans_indexes(db: Path) -> dict[str, str]:
    rows = read_rows(db, "SELECT index_name, expressions FROM duckdb_indexes() WHERE table_name = 'spans'")
    return {r["index_name"]: r["expressions"] for r in rows}

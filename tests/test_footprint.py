"""A sidecar's footprint: memory bounded by settings, and the event loop's stalls visible on /healthz."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import duckdb
import openai
import pytest

from proxy import loopwatch
from proxy.app import ENDS_PER_TURN, WRITER, end_sessions
from proxy.relay import Call
from proxy.sessions import Sessions
from proxy.telemetry import random_hex, time_ordered_hex
from store import writer as writer_module
from store.feedback import Feedback, SessionEnd
from store.spans import Span
from store.writer import Writer
from tests.conftest import Proxy, read_rows
from tests.fake_upstream import FakeUpstream
from tests.test_admin import wait_for_store
from tests.test_metrics import labels, scrape
from tests.test_ui import root


async def healthz(proxy: Proxy) -> dict:
    async with aiohttp.ClientSession() as http, http.get(proxy.url.removesuffix("/v1") + "/healthz") as resp:
        return await resp.json()


async def test_the_store_opens_duckdb_within_its_memory_limit_and_threads(tmp_path: Path) -> None:
    """DuckDB's defaults (80% of the machine's RAM, a thread per core) are not a sidecar's."""
    writer = Writer(tmp_path / "db.duckdb", kinds=[Span, Feedback, SessionEnd], memory_limit_mb=100, threads=1)
    writer.open()
    try:
        with writer.cursor() as con:
            row = con.execute("SELECT current_setting('memory_limit'), current_setting('threads')").fetchone()
    finally:
        await writer.close()
    assert row is not None
    assert row[0] == "100.0 MiB" and int(row[1]) == 1


def cached_mb(writer: Writer) -> float:
    """DuckDB's cached table blocks, MB."""
    with writer.cursor() as con:
        query = "SELECT coalesce(sum(memory_usage_bytes), 0) / 2**20 FROM duckdb_memory() WHERE tag = 'BASE_TABLE'"
        return float(con.execute(query).fetchone()[0])  # type: ignore[index]


def scan_a_filler_table(con: duckdb.DuckDBPyConnection) -> int:
    """Read every block of a 2M-row table of strings (~70 MB); DuckDB caches what it read, up to its limit."""
    con.execute("CREATE TABLE IF NOT EXISTS filler AS SELECT md5(i::VARCHAR) AS x FROM range(2000000) t(i)")
    con.execute("CHECKPOINT")
    return int(con.execute("SELECT count(*) FROM filler WHERE x LIKE '%ab%'").fetchone()[0])  # type: ignore[index]


async def test_the_writer_gives_duckdb_s_cache_back_down_to_its_budget_under_a_high_limit_even_when_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under its memory limit DuckDB keeps every block it read or wrote (a sidecar grew to ~1 GB in ten minutes
    of load); the writer's trim evicts down to the indexes plus ``cache_mb`` and leaves the limit a ceiling. It
    trims when idle too: one that only trimmed after a write kept what a read cached until the next call came
    (after the start-up scan of 1M spans: RSS 167 -> 376 MB, for good on a sidecar with no traffic)."""
    monkeypatch.setattr(writer_module, "TRIM_INTERVAL", 0.2)
    writer = Writer(tmp_path / "db.duckdb", kinds=[Feedback], memory_limit_mb=1024, cache_mb=8, threads=1)
    writer.open()
    try:
        await writer.reserve()
        writer.submit(Feedback("fb-1", None, "s1", "reward", 1.0, None, "api", datetime.now(UTC)))
        await writer.flush()
        await writer.read(scan_a_filler_table)
        before = cached_mb(writer)
        await asyncio.sleep(1.0)  # no row comes
        after = cached_mb(writer)
        limit = await writer.read(lambda con: con.execute("SELECT current_setting('memory_limit')").fetchone())
    finally:
        await writer.close()
    assert before > 30 and after <= 8, (before, after)
    assert limit == ("1.0 GiB",)
    assert 0 < writer.memory["base_table"] <= 8 * 2**20  # what the trim left, as /healthz shows it


async def test_a_lean_read_leaves_no_more_cached_than_a_trim_and_the_settings_as_they_were(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A read of much of the store made lean (the start-up scan for sessions a crash left open) runs under the
    trim's limit: DuckDB evicts as it reads, so nothing piles up for the next trim to give back. A query that
    cannot run under that limit (an aggregate of 2M distinct strings in 8 MB) runs again at the full one."""
    writer = Writer(tmp_path / "db.duckdb", kinds=[Feedback], memory_limit_mb=1024, cache_mb=8, threads=1)
    writer.open()

    def settings(con: duckdb.DuckDBPyConnection) -> tuple[str, str]:
        row = con.execute("SELECT current_setting('memory_limit'), current_setting('wal_autocheckpoint')").fetchone()
        return row  # type: ignore[return-value]

    try:
        before = await writer.read(settings)
        await writer.read(scan_a_filler_table, lean=True)
        lean = cached_mb(writer)
        after = await writer.read(settings)
        await writer.read(scan_a_filler_table)
        cached = cached_mb(writer)
        with caplog.at_level(logging.WARNING, logger="store.writer"):
            distinct = await writer.read(
                lambda con: con.execute("SELECT count(DISTINCT x) FROM filler").fetchone(), lean=True
            )
    finally:
        await writer.close()
    assert lean <= 8 < 30 < cached, (lean, cached)
    assert before == after == ("1.0 GiB", "16.0 MiB")
    assert distinct == (2_000_000,) and "needs more than the trimmed limit" in caplog.text


async def test_ids_made_in_time_order_keep_duckdb_s_index_memory_from_growing_with_the_store(tmp_path: Path) -> None:
    """DuckDB unloads a primary key's ART tree at a checkpoint and loads back the parts that writes touch. The
    session and reward ids the proxy makes sort by time, so a batch touches the tree's newest edge whatever the
    store holds; random ids touch all of it, so DuckDB held the whole tree (~72 bytes a row, growing with the
    store). Here: 200,000 sessions and rewards of each kind of id, a checkpoint, and one batch through the writer."""

    async def index_mb(make_id: Callable[[int], str]) -> float:
        writer = Writer(tmp_path / f"{make_id.__name__}.duckdb", kinds=[SessionEnd, Feedback])
        writer.open()
        now = datetime.now(UTC)
        try:
            with writer.cursor() as con:
                history = [[make_id(12) for _ in range(200_000)] for _table in range(2)]
                sessions = "(session_id, ended_at, end_reason) SELECT 'lw-' || unnest(?), now(), 'idle'"
                con.execute(f"INSERT INTO sessions {sessions}", [history[0]])
                rewards = (
                    "(feedback_id, name, value, source, created_at) SELECT 'fb-' || unnest(?), 'r', 1, 'api', now()"
                )
                con.execute(f"INSERT INTO feedback {rewards}", [history[1]])
                con.execute("CHECKPOINT")
            for _ in range(2_000):
                session_id = "lw-" + make_id(12)
                await writer.reserve()
                writer.submit(SessionEnd(session_id, now, "idle", turns=4, started_at=now))
                await writer.reserve()
                writer.submit(Feedback("fb-" + make_id(12), None, session_id, "reward", 1.0, None, "api", now))
            await writer.flush()
            with writer.cursor() as con:
                query = "SELECT memory_usage_bytes FROM duckdb_memory() WHERE tag = 'ART_INDEX'"
                return int(con.execute(query).fetchone()[0]) / 2**20  # type: ignore[index]
        finally:
            await writer.close()

    ordered, scattered = await index_mb(time_ordered_hex), await index_mb(random_hex)
    assert scattered > 20 and ordered < scattered / 3, (ordered, scattered)  # measured: ~4.5 and 28 MB


async def test_healthz_and_metrics_say_what_duckdb_holds(
    proxy: Proxy, fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sidecar's memory is mostly DuckDB's: its share by tag is on ``/healthz`` and ``/metrics``."""
    monkeypatch.setattr(writer_module, "TRIM_INTERVAL", 0.01)
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
    for i in range(3):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"q{i}"}])
    await wait_for_store(root(proxy), spans=3, feedback=0)
    for _ in range(100):  # the trim after the write that committed them
        store_memory = (await healthz(proxy))["store_memory_mb"]
        if "art_index" in store_memory:
            break
        await asyncio.sleep(0.02)
    assert store_memory["art_index"] > 0 and store_memory.get("base_table", 0) <= 32  # the spans' indexes; the cache
    scraped = await scrape(proxy)
    assert scraped["lightwire_store_memory_bytes"][labels(tag="art_index")] > 0


async def test_healthz_shows_a_stall_of_the_event_loop_the_collection_inside_it_and_its_stack(proxy: Proxy) -> None:
    """The proxy runs in this test's event loop: blocking it here is a stall every call in flight would wait out."""
    before = await healthz(proxy)
    collections = before["loop"]["gc"]["collections"][2]
    time.sleep(0.06)
    gc.collect()
    after = (await healthz(proxy))["loop"]
    assert any(stall["ms"] >= 50 and stall["gc_ms"] > 0 for stall in after["longest"])
    assert after["stalls"][">=50ms"] + after["stalls"][">=100ms"] >= 1
    assert after["gc"]["collections"][2] == collections + 1
    # what the loop was doing: this test's sleep, ~60 ms of it sampled every 10 ms once 20 ms late
    here = [s for s in after["stacks"] if any("test_healthz_shows_a_stall" in frame for frame in s["frames"])]
    assert here and here[0]["frames"][0].startswith("test_footprint.py:") and 2 <= here[0]["samples"] <= 5, after
    # and what the other threads were at meanwhile: the store's writer waiting for rows, not the sampler itself
    threads = {b["thread"] for b in after["beside"]}
    assert "lightwire-store-writer" in threads and "lightwire-loop-sampler" not in threads, after["beside"]


async def test_healthz_tells_a_stall_spent_off_the_cpu_from_one_spent_on_it(proxy: Proxy) -> None:
    """The loop thread blocked (asleep here, as when it waits for the GIL) is off the CPU; busy, on it."""

    async def spent() -> dict[str, int]:
        return dict((await healthz(proxy))["loop"]["stalled_time_ms"])

    before = await spent()
    time.sleep(0.25)
    slept = await spent()
    end = time.perf_counter() + 0.25
    while time.perf_counter() < end:
        pass
    busy = await spent()
    asleep = {k: slept[k] - before[k] for k in before}
    working = {k: busy[k] - slept[k] for k in before}
    # up to ~220 ms of each is sampled: the looks from 20 ms into the stall, every 10 ms. While the loop thread
    # spins it holds the GIL, so the sampler gets it back only at each switch interval and on a busy machine
    # later (a CI run sampled 36 ms of a 100 ms spin); and each look then takes the GIL from the spinning thread
    # for a moment, off the CPU (15 ms of 234 on a busy machine). So the bounds are shares of what was sampled.
    on = {
        name: spent["on_cpu"] + spent["waiting_for_cpu"] for name, spent in (("asleep", asleep), ("working", working))
    }
    assert asleep["off_cpu"] >= 100 and on["asleep"] < asleep["off_cpu"] / 4, asleep
    assert on["working"] >= 100 and working["off_cpu"] < on["working"] / 4, working


async def test_an_idle_watch_ticks_seldom_and_a_request_makes_it_tick_often_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Waking every 5 ms costs an idle sidecar CPU for nothing: with no request for IDLE_AFTER it ticks every
    IDLE_TICK; a request wakes it at once, and a stall while it is in flight is measured as finely as before."""
    monkeypatch.setattr(loopwatch, "IDLE_AFTER", 0.05)
    watch = loopwatch.LoopWatch()
    task = asyncio.create_task(watch.run())
    try:
        await asyncio.sleep(0.2)
        assert watch.tick == loopwatch.IDLE_TICK
        wakeups = watch.wakeups
        await asyncio.sleep(0.5)
        assert watch.wakeups - wakeups <= 7  # ~5; every 5 ms would be ~100
        watch.request_began()
        await asyncio.sleep(0)  # the idle wait ends now, not up to IDLE_TICK later
        assert watch.tick == loopwatch.TICK
        await asyncio.sleep(0.01)
        time.sleep(0.03)  # a stall a request in flight waits out
        await asyncio.sleep(0.01)
        assert any(ms >= 25 for ms, _, _ in watch.longest), watch.longest
        watch.request_ended()
        await asyncio.sleep(0.2)
        assert watch.tick == loopwatch.IDLE_TICK
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_every_request_is_in_flight_for_the_watch_until_it_ends(proxy: Proxy, fake: FakeUpstream) -> None:
    assert proxy.runner is not None
    watch = proxy.runner.app[loopwatch.LOOP_WATCH]
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
    stream = await client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"x-fake-chunks": "5", "x-fake-chunk-delay": "0.05"},
    )
    seen = [watch.in_flight async for _ in stream]
    assert seen[:5] == [1] * 5, seen  # the last chunk may come after the handler has ended
    await asyncio.sleep(0.05)
    assert watch.in_flight == 0


async def test_a_conversation_older_than_the_session_index_starts_a_new_session(
    fake: FakeUpstream, start_proxy
) -> None:
    """``session_index_size`` bounds what linking remembers: the most recent conversations link, older ones not."""
    proxy = await start_proxy(fake.url, session_index_size=3)
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
    openings = [[{"role": "user", "content": f"question {i}"}] for i in range(5)]
    replies = [(await client.chat.completions.create(model="m", messages=m)).choices[0].message for m in openings]
    for i in (0, 4):
        follow = [*openings[i], replies[i].model_dump(exclude_none=True), {"role": "user", "content": "and?"}]
        await client.chat.completions.create(model="m", messages=follow)
    rows = await proxy.spans()
    assert [r["session_source"] for r in rows[5:]] == ["new", "linked"]
    assert rows[6]["session_id"] == rows[4]["session_id"]


def test_the_index_finds_as_many_recent_calls_by_response_id_as_by_span_id() -> None:
    """A call is remembered under two keys; the bound counts calls, so that feedback by either id finds them."""
    sessions = Sessions(capacity=10)
    for i in range(25):
        sessions.remember_call(f"span{i}", None, f"s{i}")
        sessions.remember_call(f"span{i}", f"chatcmpl-{i}", f"s{i}")
    assert all(sessions.find_call(f"chatcmpl-{i}") == (f"span{i}", f"s{i}") for i in range(15, 25))
    assert all(sessions.find_call(f"span{i}") == (f"span{i}", f"s{i}") for i in range(15, 25))
    assert sessions.find_call("span14") is None and sessions.find_call("chatcmpl-0") is None


async def test_ending_thousands_of_sessions_lets_calls_run_in_between(tmp_path: Path) -> None:
    """A full index pushes out hundreds of sessions a second; the sweep that ends them must not hold the loop."""
    writer = Writer(tmp_path / "db.duckdb", kinds=[SessionEnd])
    writer.open()
    turns = 0

    async def a_call() -> None:  # stands for the calls the loop serves meanwhile
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(a_call())
    await asyncio.sleep(0)
    before = turns
    await end_sessions(writer, [(f"s{i}", 1, datetime.now(UTC)) for i in range(3_500)], "idle", forever=True)
    between = turns - before
    other.cancel()
    await writer.close()
    assert between >= 3_500 // ENDS_PER_TURN
    [row] = read_rows(tmp_path / "db.duckdb", "SELECT count(*) AS n, min(end_reason) AS why FROM sessions")
    assert row == {"n": 3_500, "why": "idle"}


FIRST = datetime(2026, 1, 2, tzinfo=UTC)  # a session's first call


def test_a_session_the_index_has_no_room_for_is_still_ended_once_and_counts_on_until_its_end_is_written() -> None:
    """The sweeper ends what ``idle`` returns: a session pushed out of a full index must be among them, with its
    turns; until that end is committed, a call of it counts on from memory (the store does not have it yet)."""
    sessions = Sessions(capacity=2)
    for name in ("a", "b", "c"):
        sessions.begin(name, now=FIRST)
        sessions.finish(name, None, [])
    assert sessions.idle(timeout=3600) == [("a", 1, FIRST)]
    assert sessions.idle(timeout=3600) == [] and sessions.is_known("a") and sessions.is_known("c")
    sessions.settled([("a", 1)])
    assert not sessions.is_known("a")
    assert sessions.begin("a", (1, FIRST)) == 1  # from its row
    sessions.finish("a", None, [])
    assert sessions.end("a") == ("a", 2, FIRST)
    sessions.settled([("a", 1)])  # an earlier end, committed late: the later one is still on its way
    assert sessions.is_known("a") and sessions.begin("a") == 2


async def test_a_call_waiting_for_the_store_is_its_span_alone(
    proxy: Proxy, fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What waits for the writer is walked at every collection: a span, not the call with its parsed bodies."""
    assert proxy.runner is not None
    writer, go = proxy.runner.app[WRITER], threading.Event()
    write_once = Writer._write_once
    monkeypatch.setattr(Writer, "_write_once", lambda self, con, batch: go.wait(10) and write_once(self, con, batch))
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True, extra_headers={"x-fake-chunks": "20"}
    )
    assert [chunk async for chunk in stream]
    await asyncio.sleep(0.05)  # the handler's bookkeeping after the last chunk
    gc.collect()
    assert [o for o in gc.get_objects() if isinstance(o, Call)] == [] and writer.written == 0
    go.set()
    rows = await proxy.spans()
    assert [(r["request_stream"], r["http_status"]) for r in rows] == [(False, 200), (True, 200)]


async def test_a_call_whose_span_cannot_be_built_is_answered_and_its_row_refused_saying_why(
    proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(call: Call) -> Span:
        raise RuntimeError("no span today")

    monkeypatch.setattr(Call, "to_span", broken)
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
    answer = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content
    assert await proxy.spans() == []
    [line] = proxy.config.db.with_suffix(".rejected.jsonl").read_text().splitlines()
    assert json.loads(line)["reason"] == "could not build the row: RuntimeError('no span today')"

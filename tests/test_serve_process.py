"""``lightwire serve`` as a real process: signals, durability of the record, and backpressure."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.relay import SPAN_HEADER
from store.writer import FLUSH_INTERVAL, WRITER_NICENESS
from tests.conftest import Proxy, read_rows
from tests.fake_upstream import FakeUpstream

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free now: each socket stays bound until all are, or the kernel may hand one out twice
    (two sidecars of one test once got the same port)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


class ServeProcess:
    def __init__(self, upstream: str, db: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.args = ["-m", "proxy", "serve", "--port", str(self.port), "--db", str(db), "--upstream", upstream, *extra]
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> ServeProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *self.args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    async with http.get(self.url.removesuffix("/v1") + "/healthz") as resp:
                        if resp.status == 200:
                            return self
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
        raise RuntimeError("lightwire serve did not start")

    async def wait(self) -> tuple[int, str]:
        assert self.proc is not None and self.proc.stdout is not None
        output = await asyncio.wait_for(self.proc.stdout.read(), 30)
        return await self.proc.wait(), output.decode()


@pytest.fixture
async def serve(fake: FakeUpstream, tmp_path: Path) -> AsyncIterator[ServeProcess]:
    server = await ServeProcess(fake.url, tmp_path / "spans.duckdb").start()
    yield server
    if server.proc is not None and server.proc.returncode is None:
        server.proc.kill()
        await server.proc.wait()


async def stream_to_end(http: aiohttp.ClientSession, url: str) -> bytes:
    headers = {"x-fake-chunks": "20", "x-fake-chunk-delay": "0.05"}
    async with http.post(url + "/chat/completions", json={**CHAT, "stream": True}, headers=headers) as resp:
        return await resp.read()


async def test_sigterm_lets_streams_in_flight_finish_then_flushes(serve: ServeProcess, tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as http:
        streams = [asyncio.create_task(stream_to_end(http, serve.url)) for _ in range(4)]
        await asyncio.sleep(0.3)  # the streams have started and run for ~1 s more
        assert serve.proc is not None
        serve.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        with pytest.raises(aiohttp.ClientConnectionError):  # no new calls accepted while draining
            await http.post(serve.url + "/chat/completions", json=CHAT)
        bodies = await asyncio.gather(*streams)
    assert all(body.endswith(b"data: [DONE]\n\n") for body in bodies)
    code, output = await serve.wait()
    assert code == 0, output
    rows = read_rows(tmp_path / "spans.duckdb", "SELECT http_status, error_type FROM spans")
    assert rows == [{"http_status": 200, "error_type": None}] * 4


async def test_sigkill_loses_no_call_that_ended_before_the_last_flush(serve: ServeProcess, tmp_path: Path) -> None:
    """Spans are committed within the flush interval (50 ms) plus one write; wait a few of those, then kill."""
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            await asyncio.gather(*(http.post(serve.url + "/chat/completions", json=CHAT) for _ in range(20)))
    await asyncio.sleep(0.25)
    assert serve.proc is not None
    serve.proc.kill()
    await serve.proc.wait()
    [row] = read_rows(tmp_path / "spans.duckdb", "SELECT count(*) AS n FROM spans")
    assert row["n"] == 60


async def test_a_full_write_queue_applies_backpressure_and_loses_nothing(fake: FakeUpstream, start_proxy) -> None:
    proxy: Proxy = await start_proxy(fake.url, max_pending_spans=1)
    async with aiohttp.ClientSession() as http:

        async def call(i: int) -> int:
            body = {**CHAT, "stream": i % 2 == 0}
            async with http.post(proxy.url + "/chat/completions", json=body) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(call(i) for i in range(60)))
    assert statuses == [200] * 60
    assert len(await proxy.spans()) == 60


async def test_the_store_writer_runs_below_the_request_path_and_catches_up_beside_it(proxy: Proxy) -> None:
    [writer] = [t for t in threading.enumerate() if t.name == "lightwire-store-writer"]
    [catch_up] = [t for t in threading.enumerate() if t.name == "lightwire-store-catch-up"]
    assert writer.native_id is not None and catch_up.native_id is not None
    loop = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert os.getpriority(os.PRIO_PROCESS, writer.native_id) == min(19, loop + WRITER_NICENESS)
    assert os.getpriority(os.PRIO_PROCESS, catch_up.native_id) == loop


async def test_serve_refuses_bad_settings_with_a_clear_message(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--upstream",
        "ftp://nope",
        "--db",
        str(tmp_path / "x.duckdb"),
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2 and b"upstream must be an http(s) URL" in err


class Load:
    """Calls from ``workers`` clients at once, plain and streamed, until told to stop or the proxy goes away;
    each answered call noted with when it ended and its span id."""

    def __init__(self, url: str, workers: int = 16) -> None:
        self.url = url
        self.answered: list[tuple[float, str]] = []
        self.failed = 0
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(workers)]

    async def _worker(self, i: int) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            n = 0
            while not self._stop.is_set():
                n += 1
                body = {**CHAT, "stream": (i + n) % 2 == 0}
                try:
                    async with http.post(self.url + "/chat/completions", json=body) as resp:
                        content = await resp.read()
                        if resp.status == 200 and (not body["stream"] or content.endswith(b"data: [DONE]\n\n")):
                            self.answered.append((time.monotonic(), resp.headers[SPAN_HEADER]))
                        else:
                            self.failed += 1
                except aiohttp.ClientError:
                    return  # the proxy stopped accepting or went away

    async def finish(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def test_sigterm_under_load_loses_no_answered_call(serve: ServeProcess, tmp_path: Path) -> None:
    load = Load(serve.url)
    await asyncio.sleep(1.5)
    assert serve.proc is not None
    serve.proc.send_signal(signal.SIGTERM)
    code, output = await serve.wait()
    await load.finish()
    assert code == 0, output
    written = {r["span_id"] for r in read_rows(tmp_path / "spans.duckdb", "SELECT span_id FROM spans")}
    answered = {span_id for _, span_id in load.answered}
    assert len(answered) > 50 and load.failed == 0
    assert answered <= written  # 0 lost; calls cut off by the shutdown may have a span too (status 499)


async def test_sigkill_under_load_loses_only_the_calls_the_writer_had_not_reached(
    serve: ServeProcess, tmp_path: Path
) -> None:
    """Committed spans survive SIGKILL; the lost ones are the newest (in the writer's queue or batch). How many
    depends on how far the writer is behind: about one flush interval when it has CPU to spare (it runs at a
    lower priority, so on a saturated machine it falls further behind). The count is printed."""
    workers = 16
    load = Load(serve.url, workers)
    await asyncio.sleep(1.5)
    assert serve.proc is not None
    killed = time.monotonic()
    serve.proc.kill()
    await serve.proc.wait()
    await load.finish()
    written = {r["span_id"] for r in read_rows(tmp_path / "spans.duckdb", "SELECT span_id FROM spans")}
    lost = [ended for ended, span_id in load.answered if span_id not in written]
    last_interval = sum(1 for ended, _ in load.answered if ended > killed - FLUSH_INTERVAL)
    print(
        f"SIGKILL under load: {len(load.answered)} answered, {len(lost)} lost, {last_interval} ended in the last "
        f"flush interval; the oldest lost ended {(killed - min(lost, default=killed)) * 1000:.0f} ms before the kill"
    )
    assert len(load.answered) > 50 and len(written) > 0
    # A suffix: calls that ended after the oldest lost one and were kept are at most those running alongside it.
    kept_after = sum(1 for ended, span_id in load.answered if span_id in written and ended > min(lost, default=killed))
    assert kept_after <= workers


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB filesystem of its own (tmpfs; mounting needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for size in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * size)
    return filler


async def chat(http: aiohttp.ClientSession, url: str) -> tuple[int, str | None, dict[str, object]]:
    async with http.post(url + "/chat/completions", json=CHAT) as resp:
        return resp.status, resp.headers.get(SPAN_HEADER), await resp.json()


async def test_a_full_disk_answers_503_then_recovers_keeping_every_accepted_call(
    fake: FakeUpstream, small_disk: Path
) -> None:
    db = small_disk / "spans.duckdb"
    serve = await ServeProcess(fake.url, db, "--max-pending-spans", "8", "--store-wait-timeout", "1").start()
    health = serve.url.removesuffix("/v1") + "/healthz"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            before = [await chat(http, serve.url) for _ in range(3)]
            filler = fill(small_disk)
            during = await asyncio.gather(*(chat(http, serve.url) for _ in range(24)))
            async with http.get(health) as resp:
                assert resp.status == 503
                assert "No space left on device" in (await resp.json())["error"]["message"]
            filler.unlink()
            for _ in range(300):  # the writer retries by itself
                async with http.get(health) as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.1)
            after = await chat(http, serve.url)
            async with http.get(serve.url.removesuffix("/v1") + "/metrics") as resp:
                metrics = await resp.text()
        assert serve.proc is not None
        serve.proc.send_signal(signal.SIGTERM)
        code, output = await serve.wait()
        assert code == 0, output
    finally:
        if serve.proc is not None and serve.proc.returncode is None:
            serve.proc.kill()
            await serve.proc.wait()
    statuses = [status for status, _, _ in during]
    assert set(statuses) == {200, 503}, statuses  # the places left were taken; then calls waited 1 s each
    refused = [body for status, _, body in during if status == 503]
    assert all(b["error"]["code"] == "store_unavailable" and "No space" in b["error"]["message"] for b in refused)  # type: ignore[index]
    scraped = {s.name: s.value for family in text_string_to_metric_families(metrics) for s in family.samples}
    assert scraped["lightwire_store_unavailable_total"] == len(refused)
    assert scraped["lightwire_store_write_failures_total"] >= 1 and scraped["lightwire_store_rejected_rows_total"] == 0
    accepted = {span_id for status, span_id, _ in [*before, *during, after] if status == 200}
    assert after[0] == 200 and {r["span_id"] for r in read_rows(db, "SELECT span_id FROM spans")} == accepted


async def test_sessions_open_at_sigterm_are_ended_and_scored(fake: FakeUpstream, tmp_path: Path) -> None:
    db = tmp_path / "spans.duckdb"
    serve = await ServeProcess(fake.url, db, "--session-hook", "tests.reward_hooks:turns").start()
    async with aiohttp.ClientSession() as http:
        for session, calls in (("s-two", 2), ("s-one", 1)):
            for _ in range(calls):
                headers = {"x-lightwire-session": session}
                async with http.post(serve.url + "/chat/completions", json=CHAT, headers=headers) as resp:
                    assert resp.status == 200
    assert serve.proc is not None
    serve.proc.send_signal(signal.SIGTERM)
    code, output = await serve.wait()
    assert code == 0, output
    ended = read_rows(db, "SELECT session_id, end_reason FROM sessions ORDER BY 1")
    assert ended == [
        {"session_id": "s-one", "end_reason": "shutdown"},
        {"session_id": "s-two", "end_reason": "shutdown"},
    ]
    scores = read_rows(db, "SELECT session_id, value, source FROM feedback ORDER BY 1")
    assert scores == [
        {"session_id": "s-one", "value": 1.0, "source": "hook:tests.reward_hooks:turns"},
        {"session_id": "s-two", "value": 2.0, "source": "hook:tests.reward_hooks:turns"},
    ]


async def test_sessions_a_sigkill_left_open_are_ended_at_the_next_start_and_count_on(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """A session's row keeps its turn count (no index over the spans' session ids): sessions the killed process
    held, one never ended and one continued after its end, are ended at the next start, scored, and a later call
    of one counts on from its spans."""
    db = tmp_path / "spans.duckdb"
    hook = ("--session-hook", "tests.reward_hooks:turns")
    first = await ServeProcess(fake.url, db, *hook).start()
    async with aiohttp.ClientSession() as http:

        async def call(server: ServeProcess, session: str) -> None:
            headers = {"x-lightwire-session": session}
            async with http.post(server.url + "/chat/completions", json=CHAT, headers=headers) as resp:
                assert resp.status == 200

        for session in ("s-open", "s-open", "s-back"):
            await call(first, session)
        async with http.post(first.url.removesuffix("/v1") + "/sessions/s-back/end") as resp:
            assert resp.status == 200, await resp.text()
        await asyncio.sleep(1.0)  # the end and its hook's score are committed
        await call(first, "s-back")
        await asyncio.sleep(1.0)
        assert first.proc is not None
        first.proc.kill()
        await first.proc.wait()
        assert read_rows(db, "SELECT session_id, end_reason, turns FROM sessions") == [
            {"session_id": "s-back", "end_reason": "ended", "turns": 1}
        ]

        second = await ServeProcess(fake.url, db, *hook).start()
        await call(second, "s-open")
        assert second.proc is not None
        second.proc.send_signal(signal.SIGTERM)
        code, output = await second.wait()
    assert code == 0, output
    assert "2 sessions left open by an earlier stop" in output
    turns = read_rows(db, "SELECT session_id, list(turn_index ORDER BY start_time) AS t FROM spans GROUP BY ALL")
    assert sorted(turns, key=str) == [{"session_id": "s-back", "t": [0, 1]}, {"session_id": "s-open", "t": [0, 1, 2]}]
    assert read_rows(db, "SELECT session_id, end_reason, turns FROM sessions ORDER BY 1") == [
        {"session_id": "s-back", "end_reason": "interrupted", "turns": 2},
        {"session_id": "s-open", "end_reason": "shutdown", "turns": 3},
    ]
    scores = read_rows(db, "SELECT session_id, value FROM feedback ORDER BY 1, 2")
    assert scores == [
        {"session_id": "s-back", "value": 1.0},  # at its end
        {"session_id": "s-back", "value": 2.0},  # interrupted: both calls
        {"session_id": "s-open", "value": 2.0},  # interrupted
        {"session_id": "s-open", "value": 3.0},  # at shutdown
    ]

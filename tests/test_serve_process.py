"""``lightwire serve`` as a real process: signals, durability of the record, and backpressure."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from store.writer import WRITER_NICENESS
from tests.conftest import Proxy, read_rows
from tests.fake_upstream import FakeUpstream

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


async def test_the_store_writer_runs_below_the_request_path(proxy: Proxy) -> None:
    [writer] = [t for t in threading.enumerate() if t.name == "lightwire-store-writer"]
    assert writer.native_id is not None
    nice = os.getpriority(os.PRIO_PROCESS, writer.native_id)
    assert nice == min(19, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + WRITER_NICENESS)


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

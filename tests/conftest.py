"""Shared fixtures: a fake OpenAI upstream and a real Lightwire proxy, both on loopback port 0."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import duckdb
import pytest
from aiohttp import web

from proxy import config as settings
from proxy.app import create_app
from tests.fake_upstream import FakeUpstream

# Fixtures shared by the real-component tiers, registered once so that session-scoped ones (one vLLM server for
# the whole run) are made once, not once per module that uses them.
pytest_plugins = ["tests.vllm_fixtures", "tests.training_fixtures"]

READY_TIMEOUT_S = 30.0


class Proxy:
    """A Lightwire app served on a loopback port, in the test's event loop."""

    def __init__(self, config: settings.Config) -> None:
        self.config = config
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, *, wait_ready: bool = True) -> Proxy:
        """Serve the app; with ``wait_ready``, return once ``/readyz`` says calls can be served (a ``--vllm``
        policy attaches in the background, within milliseconds when its server answers)."""
        self.runner = web.AppRunner(
            create_app(self.config),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=self.config.shutdown_timeout,
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1"
        if wait_ready:
            await self.wait_ready()
        return self

    async def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        last = "no answer yet"  # what a timeout reports: the stage the policy was stuck in
        try:
            async with aiohttp.ClientSession() as http, asyncio.timeout(timeout):
                while True:
                    async with http.get(self.url.removesuffix("/v1") + "/readyz") as resp:
                        if resp.status == 200:
                            return
                        last = f"{resp.status} {await resp.text()}"
                    await asyncio.sleep(0.01)
        except TimeoutError:
            raise AssertionError(f"not ready after {timeout:.0f} s; /readyz said {last}") from None

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def spans(self) -> list[dict[str, Any]]:
        """Stop the proxy (the store flushes and lets go of the file) and read every span back."""
        await self.stop()
        return read_rows(self.config.db, "SELECT * FROM spans ORDER BY start_time")


def read_rows(db: Path, sql: str) -> list[dict[str, Any]]:
    with duckdb.connect(str(db), read_only=True) as con:
        cursor = con.execute(sql)
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    for row in rows:
        for key in ("request", "response"):
            if isinstance(row.get(key), str):
                row[key] = json.loads(row[key])
    return rows


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    upstream = await FakeUpstream().start()
    yield upstream
    await upstream.stop()


@pytest.fixture
async def vllm_fake() -> AsyncIterator[FakeUpstream]:
    upstream = await FakeUpstream(vllm=True).start()
    yield upstream
    await upstream.stop()


@pytest.fixture
async def start_proxy(tmp_path: Path):
    """Start proxies with any settings; each is stopped at the end of the test."""
    started: list[Proxy] = []

    async def start(upstream: str, *, wait_ready: bool = True, **overrides: Any) -> Proxy:
        overrides.setdefault("db", tmp_path / f"spans{len(started)}.duckdb")
        overrides.setdefault("adapters_dir", tmp_path / "adapters")  # not the working directory: memory banks go here
        overrides.setdefault("runs_dir", tmp_path / "runs")
        config = settings.load(environ={}, upstream=upstream, **overrides)
        proxy = Proxy(config)
        started.append(proxy)
        return await proxy.start(wait_ready=wait_ready)

    yield start
    for proxy in started:
        await proxy.stop()


@pytest.fixture
async def proxy(fake: FakeUpstream, start_proxy) -> Proxy:
    return await start_proxy(fake.url)


@pytest.fixture
async def vllm_proxy(vllm_fake: FakeUpstream, start_proxy) -> Proxy:
    return await start_proxy(vllm_fake.url)


@pytest.fixture
def agent_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a new agent process starts with. The openai-agents SDK keeps one HTTP client per process, whose pooled
    connections belong to the event loop of the test that made them: each test gets its own, as a process would."""
    from agents.models import openai_provider

    monkeypatch.setattr(openai_provider, "_http_client", None)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-agent")
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")

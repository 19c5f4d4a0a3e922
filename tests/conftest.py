"""Shared fixtures: a fake OpenAI upstream and a real Lightwire proxy, both on loopback port 0."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
from aiohttp import web

from proxy import config as settings
from proxy.app import create_app
from tests.fake_upstream import FakeUpstream

# Fixtures shared by the real-component tiers, registered once so that session-scoped ones (one vLLM server for
# the whole run) are made once, not once per module that uses them.
pytest_plugins = ["tests.vllm_fixtures", "tests.training_fixtures"]


class Proxy:
    """A Lightwire app served on a loopback port, in the test's event loop."""

    def __init__(self, config: settings.Config) -> None:
        self.config = config
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> Proxy:
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
        return self

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

    async def start(upstream: str, **overrides: Any) -> Proxy:
        overrides.setdefault("db", tmp_path / f"spans{len(started)}.duckdb")
        config = settings.load(environ={}, upstream=upstream, **overrides)
        proxy = await Proxy(config).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await proxy.stop()


@pytest.fixture
async def proxy(fake: FakeUpstream, start_proxy) -> Proxy:
    return await start_proxy(fake.url)


@pytest.fixture
async def vllm_proxy(vllm_fake: FakeUpstream, start_proxy) -> Proxy:
    return await start_proxy(vllm_fake.url)

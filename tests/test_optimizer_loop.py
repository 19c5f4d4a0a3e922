"""The optimizer end to end on the real model and a real vLLM: export, train in a child process, evaluate
offline with reward hooks, then publish or reject, and record the run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from proxy import config as settings
from proxy.vllm_server import VllmServer
from tests.conftest import Proxy, read_rows
from tests.vllm_fixtures import VLLM_SETUP_TIMEOUT_S

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.training,
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.timeout(VLLM_SETUP_TIMEOUT_S + 600),
]

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?", "Say hello politely."]


@asynccontextmanager
async def sidecar(server: VllmServer, model_dir: Path, tmp_path: Path, hook: str | None) -> AsyncIterator[Proxy]:
    """A sidecar on the shared vLLM whose span hook (which also scores every call) judges candidates."""
    config = settings.load(
        environ={},
        vllm=(server.base_url + "/v1",),
        model_dir=model_dir,
        swap_mode="merged",
        optimize=False,
        span_hooks=(f"tests.reward_hooks:{hook}",) if hook else (),
        eval_split=0.35,
        eval_max_prompts=4,
        adapters_dir=tmp_path / "adapters",
        runs_dir=tmp_path / "runs",
        db=tmp_path / "lw.duckdb",
        train_learning_rate=1e-3,
    )
    proxy = await Proxy(config).start()
    try:
        yield proxy
    finally:
        await proxy.stop()


async def admin(proxy: Proxy, method: str, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, proxy.url.removesuffix("/v1") + path, json={}) as resp,
    ):
        return resp.status, await resp.json()


async def traffic(proxy: Proxy, *, reward: float | None) -> None:
    """Twelve one-turn sessions, answered by the served model, each rewarded."""
    root = proxy.url.removesuffix("/v1")
    async with aiohttp.ClientSession() as http:
        for i in range(12):
            client = openai.AsyncOpenAI(
                base_url=proxy.url, api_key="k", max_retries=0, default_headers={"x-lightwire-session": f"task-{i}"}
            )
            await client.chat.completions.create(
                model="agent",
                messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                temperature=1.0,
                max_tokens=24,
            )
            if reward is not None:
                async with http.post(root + "/feedback", json={"session_id": f"task-{i}", "reward": reward}) as r:
                    assert r.status == 200


async def test_a_run_trains_on_rewarded_turns_and_publishes_a_candidate_as_good_as_the_active(
    vllm_server: VllmServer, embedded_model_dir: Path, tmp_path: Path
) -> None:
    async with sidecar(vllm_server, embedded_model_dir, tmp_path, "always_one") as proxy:
        await traffic(proxy, reward=1.0)
        status, run = await admin(proxy, "POST", "/admin/train")
        assert status == 200, run
        assert run["status"] == "published" and run["candidate"] == "v1" and run["parent"] is None
        assert run["data"]["records"] == 12 and run["data"]["splits"]["heldout"] >= 1
        assert run["training"]["losses"] and all(loss > 0 for loss in run["training"]["losses"])
        assert run["evaluation"]["method"] == "offline" and run["evaluation"]["means"]["candidate"] == 1.0
        assert (await admin(proxy, "GET", "/admin/adapters"))[1]["active"] == "v1"
        # The next calls are served by the published version (merged into the served weights).
        await traffic(proxy, reward=None)
        status, rolled = await admin(proxy, "POST", "/admin/rollback")  # leave vLLM with the base weights
        assert rolled == {"rolled_back": "v1", "active": "base"}
    served = read_rows(tmp_path / "lw.duckdb", "SELECT adapter_version FROM spans ORDER BY start_time")
    assert [r["adapter_version"] for r in served] == [None] * 12 + ["v1"] * 12
    [recorded] = read_rows(tmp_path / "lw.duckdb", "SELECT status, candidate, data, training FROM runs")
    assert recorded["status"] == "published" and recorded["candidate"] == "v1"


async def test_a_worse_candidate_is_never_promoted(
    vllm_server: VllmServer, embedded_model_dir: Path, tmp_path: Path
) -> None:
    async with sidecar(vllm_server, embedded_model_dir, tmp_path, "prefers_base") as proxy:
        await traffic(proxy, reward=1.0)
        status, run = await admin(proxy, "POST", "/admin/train")
        assert status == 200 and run["status"] == "rejected", run
        means = run["evaluation"]["means"]
        assert means == {"active": 1.0, "candidate": 0.0}
        listing = (await admin(proxy, "GET", "/admin/adapters"))[1]
        assert listing["active"] == "base" and listing["data"][0]["status"] == "retired"


async def test_a_run_with_nothing_rewarded_ends_without_an_adapter(
    vllm_server: VllmServer, embedded_model_dir: Path, tmp_path: Path
) -> None:
    async with sidecar(vllm_server, embedded_model_dir, tmp_path, None) as proxy:
        await traffic(proxy, reward=None)
        status, run = await admin(proxy, "POST", "/admin/train")
        assert status == 200 and run["status"] == "no_data" and run["candidate"] is None
        assert "no usable data" in run["reason"]
        assert (await admin(proxy, "GET", "/admin/adapters"))[1]["data"] == []
        assert [r["status"] for r in (await admin(proxy, "GET", "/admin/runs"))[1]["data"]] == ["no_data"]

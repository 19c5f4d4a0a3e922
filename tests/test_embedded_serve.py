"""The README's main command as a newcomer runs it: ``lightwire serve`` with no backend given and an empty model
cache converts the embedded model, runs it on its own vLLM, answers 503 (with the stage it is in) until a call can
be served, serves, takes adapters through ``lightwire adapters``, and stops everything on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import openai
import pytest

from optimizers.embedded import DEFAULT_MODEL_NAME
from tests.conftest import read_rows
from tests.test_serve_process import free_port
from tests.vllm_fixtures import VLLM_SETUP_TIMEOUT_S

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(VLLM_SETUP_TIMEOUT_S + 300)]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def lightwire(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-m", "proxy", *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


async def watch_start_up(http: aiohttp.ClientSession, root: str) -> list[str]:
    """Poll ``/readyz`` and ``/healthz`` (no key) until ready; return the stages seen, in order. Every answer
    before that must be a 503 with ``Retry-After`` that names the stage."""
    stages: list[str] = []
    async with asyncio.timeout(VLLM_SETUP_TIMEOUT_S):
        while True:
            async with http.get(root + "/healthz") as resp:
                assert resp.status == 200
                stage = (await resp.json())["policy"]["state"]
            async with http.get(root + "/readyz") as resp:
                if resp.status == 200:
                    return stages
                assert resp.status == 503 and resp.headers["Retry-After"]
                message = (await resp.json())["error"]["message"]
            if not stages or stages[-1] != stage:
                stages.append(stage)
            assert stage in message or stage == "ready"  # "ready" only in the instant vLLM became ready
            await asyncio.sleep(0.2)


async def test_serve_from_an_empty_model_cache_runs_the_embedded_model(
    tmp_path: Path, embedded_model_dir: Path, random_adapter: Path
) -> None:
    port = free_port()
    empty_cache = tmp_path / "cache"
    env = {
        **os.environ,
        "LIGHTWIRE_PORT": str(port),
        "LIGHTWIRE_DB": str(tmp_path / "lw.duckdb"),
        "LIGHTWIRE_CACHE_DIR": str(empty_cache),  # the first-run path: the model is converted in this test
        "LIGHTWIRE_ADAPTERS_DIR": str(tmp_path / "adapters"),
        "LIGHTWIRE_API_KEYS": "k",
        "LIGHTWIRE_ADMIN_KEY": "k",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    root = f"http://127.0.0.1:{port}"
    client = openai.AsyncOpenAI(base_url=root + "/v1", api_key="k", max_retries=0)
    try:
        async with aiohttp.ClientSession() as http:
            while True:  # the proxy listens at once; the model takes a while
                try:
                    async with http.get(root + "/readyz") as resp:
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.2)
            assert resp.status == 503 and resp.headers["Retry-After"]
            with pytest.raises(openai.APIStatusError) as early:
                await client.chat.completions.create(model="any-name", messages=QUESTION)
            assert early.value.status_code == 503 and early.value.response.headers["Retry-After"]
            assert "preparing the model" in early.value.message  # never a 404 about routing
            stages = await watch_start_up(http, root)
        assert stages[0] == "preparing the model" and "starting vLLM" in stages
        assert "ready" not in stages[:-1]
        assert (empty_cache / "models" / DEFAULT_MODEL_NAME / "config.json").is_file()

        async def ask() -> str:
            done = await client.chat.completions.create(
                model="any-name", messages=QUESTION, temperature=0, max_tokens=12
            )
            return done.choices[0].message.content or ""

        base = await ask()  # the first call after /readyz said 200: it must be answered
        assert "Paris" in base
        registered = await asyncio.to_thread(lightwire, "adapters", "register", str(random_adapter), env=env)
        assert '"version": "v1"' in registered
        await asyncio.to_thread(lightwire, "adapters", "activate", "v1", env=env)
        assert await ask() != base
        listing = await asyncio.to_thread(lightwire, "adapters", "list", env=env)
        assert "mode merged, active v1" in listing  # CPU: the version is merged into the served weights
        await asyncio.to_thread(lightwire, "adapters", "rollback", env=env)
        assert await ask() == base
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 60)
    assert code == 0
    with pytest.raises(ProcessLookupError):  # vLLM and its workers went with it
        os.killpg(proc.pid, 0)
    rows = read_rows(tmp_path / "lw.duckdb", "SELECT http_status, adapter_version FROM spans ORDER BY start_time")
    assert [r["http_status"] for r in rows] == [503, 200, 200, 200]
    assert [r["adapter_version"] for r in rows] == [None, None, "v1", None]

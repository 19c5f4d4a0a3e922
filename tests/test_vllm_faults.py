"""The fault matrix's vLLM rows, on a real vLLM-CPU server: the managed vLLM child killed (restarted with the
active version) and then Lightwire itself killed (vLLM goes with it); a sidecar restarted while vLLM still holds
its adapter; a ``--vllm`` replica restarted under a running sidecar; a swap failing at each of its steps.

Each asserts what the client sees, what the registry and spans keep, and that the next call is served."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from optimizers.embedded import DEFAULT_MODEL_NAME
from proxy.vllm_server import VllmServer
from tests.conftest import read_rows
from tests.fake_upstream import FakeUpstream
from tests.test_child_guard import wait_until_gone
from tests.test_serve_process import free_port
from tests.test_vllm_backend import QUESTION, admin, ask, policy_proxy
from tests.vllm_fixtures import VLLM_SETUP_TIMEOUT_S, overflowing_adapter

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.timeout(VLLM_SETUP_TIMEOUT_S + 600),
]

#: vLLM restarts in 40-90 s on two cores; the sidecar then restores the active version.
RESTART_TIMEOUT_S = 300
#: A killed Lightwire's guard ends vLLM's group as soon as its interpreter is up.
GUARD_TIMEOUT_S = 30


async def attempt(url: str) -> tuple[int, str]:
    """One greedy call of the question; its status and answer (or error message)."""
    body = {"model": "agent-model", "messages": QUESTION, "temperature": 0, "max_tokens": 16}
    async with aiohttp.ClientSession() as http, http.post(url + "/chat/completions", json=body) as resp:
        answer = await resp.json()
    if resp.status != 200:
        return resp.status, answer["error"]["message"]
    return 200, answer["choices"][0]["message"]["content"]


async def first_answer_after_a_restart(url: str) -> tuple[str, list[int]]:
    """Ask until a call is served; every call before must be a 502 (the replica died under it) or a 503 (not ready:
    restarting, or being restored), never an answer from weights other than the served ones or a 404."""
    statuses = []
    async with asyncio.timeout(RESTART_TIMEOUT_S):
        while True:
            status, answer = await attempt(url)
            statuses.append(status)
            if status == 200:
                return answer, statuses
            assert status in (502, 503), (status, answer)
            await asyncio.sleep(1)


async def direct_answer(server: VllmServer) -> str:
    """What the vLLM server itself answers under the base model's name (its loaded weights), bypassing Lightwire."""
    body = {"model": DEFAULT_MODEL_NAME, "messages": QUESTION, "temperature": 0, "max_tokens": 16}
    async with aiohttp.ClientSession() as http, http.post(server.base_url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return str((await resp.json())["choices"][0]["message"]["content"])


async def unload_adapters(server: VllmServer) -> None:
    """Leave the session's server as it was found: no runtime adapters."""
    async with aiohttp.ClientSession() as http:
        async with http.get(server.base_url + "/v1/models") as resp:
            adapters = [m["id"] for m in (await resp.json())["data"] if m.get("parent")]
        for name in adapters:
            async with http.post(server.base_url + "/v1/unload_lora_adapter", json={"lora_name": name}) as resp:
                assert resp.status == 200, await resp.text()


def vllm_child(pid: int) -> int:
    """The vLLM API server that the process ``pid`` runs (its child), which leads vLLM's process group."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"vllm.entrypoints" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    raise AssertionError(f"process {pid} runs no vLLM")


async def test_a_killed_vllm_child_comes_back_with_the_active_version_and_dies_with_a_killed_lightwire(
    tmp_path: Path, embedded_model_dir: Path, random_adapter: Path
) -> None:
    port = free_port()
    root = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "LIGHTWIRE_PORT": str(port),
        "LIGHTWIRE_DB": str(tmp_path / "lw.duckdb"),
        "LIGHTWIRE_MODEL_DIR": str(embedded_model_dir),
        "LIGHTWIRE_CACHE_DIR": str(tmp_path / "cache"),
        "LIGHTWIRE_ADAPTERS_DIR": str(tmp_path / "adapters"),
    }
    with (tmp_path / "serve.log").open("wb") as log:
        serve = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", env=env, stdout=log, stderr=log, start_new_session=True
        )
    vllm_pid = None
    try:
        async with asyncio.timeout(VLLM_SETUP_TIMEOUT_S):  # it listens at once, and answers 503 until vLLM is up
            while True:
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    if (await attempt(root + "/v1"))[0] == 200:
                        break
                await asyncio.sleep(1)
        base = (await attempt(root + "/v1"))[1]
        async with aiohttp.ClientSession() as http:
            for path, body in (("/admin/adapters", {"path": str(random_adapter)}), ("/admin/adapters/v1/activate", {})):
                async with http.post(root + path, json=body) as resp:
                    assert resp.status == 200, await resp.text()
        status, adapted = await attempt(root + "/v1")
        assert status == 200 and adapted != base

        killed = vllm_child(serve.pid)
        os.kill(killed, signal.SIGKILL)
        answer, statuses = await first_answer_after_a_restart(root + "/v1")
        assert answer == adapted  # the restarted vLLM got v1's merged weights back before its first call
        vllm_pid = vllm_child(serve.pid)
        assert vllm_pid != killed
        await asyncio.sleep(0.5)  # the last span is committed (flush interval 50 ms)
    finally:
        serve.kill()
        await serve.wait()
    assert vllm_pid is not None
    assert await wait_until_gone(vllm_pid, GUARD_TIMEOUT_S) == []  # the API server, its engine and workers
    rows = read_rows(tmp_path / "lw.duckdb", "SELECT http_status, adapter_version FROM spans ORDER BY start_time")
    served = [(r["http_status"], r["adapter_version"]) for r in rows if r["http_status"] == 200]
    assert served[-3:] == [(200, None), (200, "v1"), (200, "v1")]
    assert [r["http_status"] for r in rows[-len(statuses) :]] == statuses  # every failed call has its span


async def test_a_restarted_sidecar_serves_the_active_lora_that_vllm_still_holds(
    vllm_server: VllmServer, embedded_model_dir: Path, random_adapter: Path, tmp_path: Path
) -> None:
    try:
        async with policy_proxy(vllm_server, embedded_model_dir, tmp_path, "lora") as proxy:
            assert (await admin(proxy, "/admin/adapters", {"path": str(random_adapter)}))[0] == 200
            assert (await admin(proxy, "/admin/adapters/v1/activate", {}))[0] == 200
            adapted = await ask(proxy)
        # vLLM still holds lw-v1-<hash>: the new sidecar's restore finds it loaded, which is what it wants.
        async with policy_proxy(vllm_server, embedded_model_dir, tmp_path, "lora") as proxy:
            assert await ask(proxy) == adapted
            rows = await proxy.spans()
    finally:
        await unload_adapters(vllm_server)
    assert [(r["http_status"], r["adapter_version"]) for r in rows] == [(200, "v1")] * 2  # one per sidecar


@pytest.mark.parametrize("mode", ["lora", "merged"])
async def test_a_restarted_replica_gets_the_active_version_back_before_it_takes_calls(
    vllm_server: VllmServer, embedded_model_dir: Path, random_adapter: Path, tmp_path: Path, mode: str
) -> None:
    async with policy_proxy(vllm_server, embedded_model_dir, tmp_path, mode) as proxy:
        try:
            base = await ask(proxy)
            assert (await admin(proxy, "/admin/adapters", {"path": str(random_adapter)}))[0] == 200
            assert (await admin(proxy, "/admin/adapters/v1/activate", {}))[0] == 200
            adapted = await ask(proxy)
            assert adapted != base

            killed = vllm_server.pid
            assert killed is not None
            os.killpg(killed, signal.SIGKILL)  # the fixture's supervisor restarts it on the same port
            answer, statuses = await first_answer_after_a_restart(proxy.url)
            assert vllm_server.pid != killed
            assert answer == adapted  # LoRA: not a 404; merged: not the base weights under v1's label
        finally:
            await vllm_server.wait_ready(RESTART_TIMEOUT_S)
            assert (await admin(proxy, "/admin/rollback", {}))[0] == 200  # the base model again, for later tests
        rows = await proxy.spans()
    await unload_adapters(vllm_server)
    assert [(r["http_status"], r["adapter_version"]) for r in rows if r["http_status"] == 200] == [
        (200, None),
        (200, "v1"),
        (200, "v1"),
    ]
    assert [r["http_status"] for r in rows[2:]] == statuses


@pytest.mark.parametrize(
    ("step", "reason"),
    [
        ("merge: a corrupt weights file", "merging v1 failed"),
        ("merge: the weights overflow bf16", "not finite in torch.bfloat16"),
        ("reload: a replica refuses it", "/collective_rpc with 404"),
        ("probe: a reloaded replica fails it", "/v1/completions with 500"),
    ],
)
async def test_a_swap_failing_at_each_step_keeps_the_active_version_serving(
    vllm_server: VllmServer, embedded_model_dir: Path, random_adapter: Path, tmp_path: Path, step: str, reason: str
) -> None:
    """Merged mode (the CPU default). The failing replica of the last two is a second, fake vLLM after the real
    one: the real one has already taken v1's weights when the other fails, and must be given the base back."""
    base = await direct_answer(vllm_server)
    adapter = overflowing_adapter(random_adapter, tmp_path / "huge") if "overflow" in step else random_adapter
    other = await FakeUpstream(
        vllm=True,
        dev_mode=step.startswith("probe"),
        failures={DEFAULT_MODEL_NAME: 500} if step.startswith("probe") else {},
    ).start()
    replicas = [vllm_server.base_url + "/v1", *([other.url] if step.startswith(("reload", "probe")) else [])]
    try:
        async with policy_proxy(vllm_server, embedded_model_dir, tmp_path, "merged", vllm=tuple(replicas)) as proxy:
            assert (await admin(proxy, "/admin/adapters", {"path": str(adapter)}))[0] == 200
            if "corrupt" in step:
                weights = tmp_path / "adapters" / "v1" / "adapter" / "adapter_model.safetensors"
                weights.write_bytes(weights.read_bytes()[:4096])
            status, error = await admin(proxy, "/admin/adapters/v1/activate", {})
            assert status == 502 and "v1 was not published" in error["error"]["message"]
            assert reason in error["error"]["message"]
            listing = (await admin(proxy, "/admin/adapters"))[1]
            assert listing["active"] == "base"
            assert [(a["version"], a["status"]) for a in listing["data"]] == [("v1", "failed")]
            assert await direct_answer(vllm_server) == base  # the real replica serves the base weights again
            assert (await attempt(proxy.url))[0] == 200
            rows = await proxy.spans()
    finally:
        await other.stop()
    assert [(r["http_status"], r["adapter_version"]) for r in rows] == [(200, None)]
    [failed] = read_rows(tmp_path / "spans.duckdb", "SELECT status, message FROM adapters")
    assert failed["status"] == "failed" and reason in failed["message"]

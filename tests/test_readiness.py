"""Readiness while the policy starts: ``--vllm`` servers that do not answer yet. ``/readyz`` and every call to the
policy answer 503 with ``Retry-After`` and the reason, ``/healthz`` says what is going on, neither probe needs a
key, and once the server answers the sidecar attaches to it by itself; sidecars that share a server load their
own adapters into it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.conftest import Proxy, read_rows
from tests.fake_upstream import FakeUpstream
from tests.test_serve_process import free_port
from tests.test_ui import tiny_adapter

KEY = "client-key"
QUESTION = [{"role": "user", "content": "Hi"}]


async def get(proxy: Proxy, path: str) -> tuple[int, dict[str, str], dict]:
    async with aiohttp.ClientSession() as http, http.get(proxy.url.removesuffix("/v1") + path) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def activate_an_adapter(proxy: Proxy, folder: Path) -> str:
    """Register a tiny adapter as v1 and activate it; return the name it is served under."""
    async with aiohttp.ClientSession() as http:
        root = proxy.url.removesuffix("/v1")
        async with http.post(root + "/admin/adapters", json={"path": str(tiny_adapter(folder))}) as resp:
            served_name: str = (await resp.json())["served_name"]
        async with http.post(root + "/admin/adapters/v1/activate", json={}) as resp:
            assert resp.status == 200
    return served_name


async def test_a_vllm_server_that_does_not_answer_yet_gives_503_until_it_does(start_proxy, tmp_path: Path) -> None:
    port = free_port()
    vllm_url = f"http://127.0.0.1:{port}/v1"
    proxy: Proxy = await start_proxy("", vllm=(vllm_url,), optimize=False, api_keys=(KEY,), wait_ready=False)
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key=KEY, max_retries=0)

    status, headers, body = await get(proxy, "/readyz")  # no key: orchestrators probe without one
    assert status == 503 and headers["Retry-After"]
    assert f"waiting for the vLLM server at {vllm_url}" in body["error"]["message"]
    status, _, health = await get(proxy, "/healthz")
    assert status == 200 and health["policy"]["ready"] is False
    assert health["policy"]["state"] == f"waiting for the vLLM server at {vllm_url}"
    with pytest.raises(openai.APIStatusError) as early:
        await client.chat.completions.create(model="any-model", messages=QUESTION)
    assert early.value.status_code == 503, "never a 404 about routing while the policy starts"
    assert early.value.response.headers["Retry-After"]
    assert "waiting for the vLLM server" in early.value.message

    fake = await FakeUpstream(vllm=True).start(port)
    try:
        await proxy.wait_ready(timeout=20)
        assert (await get(proxy, "/healthz"))[2]["policy"]["state"] == "ready"
        done = await client.chat.completions.create(model="any-model", messages=QUESTION)
        assert done.choices[0].message.content
    finally:
        await proxy.stop()
        await fake.stop()
    rows = read_rows(proxy.config.db, "SELECT http_status FROM spans ORDER BY start_time")
    assert [r["http_status"] for r in rows] == [503, 200]


async def test_a_vllm_server_that_serves_no_model_is_a_problem_the_probes_name(start_proxy) -> None:
    fake = await FakeUpstream(vllm=True, model_ids=[]).start()
    try:
        proxy: Proxy = await start_proxy("", vllm=(fake.url,), optimize=False, wait_ready=False)
        async with asyncio.timeout(10):
            while (await get(proxy, "/healthz"))[2]["policy"]["problem"] is None:
                await asyncio.sleep(0.05)
        status, _, body = await get(proxy, "/readyz")
        assert status == 503 and "serves no base model" in body["error"]["message"]
    finally:
        await fake.stop()


async def test_a_restarted_sidecar_is_ready_only_once_the_active_version_is_loaded(
    start_proxy, vllm_fake: FakeUpstream, tmp_path: Path
) -> None:
    settings = {"vllm": (vllm_fake.url,), "optimize": False, "adapters_dir": tmp_path / "adapters"}
    first: Proxy = await start_proxy("", db=tmp_path / "lw.duckdb", **settings)
    served_name = await activate_an_adapter(first, tmp_path / "a1")
    await first.stop()
    registry = read_rows(tmp_path / "lw.duckdb", "SELECT version, status FROM adapters")
    assert registry == [{"version": "v1", "status": "active"}]  # activated within a flush interval of its registration

    restarted = await FakeUpstream(vllm=True, load_seconds=1.0).start()  # a vLLM that came back empty
    try:
        second: Proxy = await start_proxy(
            "", db=tmp_path / "lw.duckdb", wait_ready=False, **settings | {"vllm": (restarted.url,)}
        )
        async with asyncio.timeout(20):
            while (await get(second, "/readyz"))[0] != 200:
                await asyncio.sleep(0.02)
        assert served_name in restarted.loras, "ready before the active version was loaded"
        client = openai.AsyncOpenAI(base_url=second.url, api_key="k", max_retries=0)
        await client.chat.completions.create(model="any-model", messages=QUESTION)
        assert restarted.requests[-1].body["model"] == served_name  # the first call is served by v1
    finally:
        await restarted.stop()


async def test_sidecars_sharing_a_vllm_server_never_serve_each_other_s_adapter_folder(
    start_proxy, vllm_fake: FakeUpstream, tmp_path: Path
) -> None:
    """The same weights registered as v1 by two sidecars with their own adapters folders: vLLM holds a LoRA by
    name, so each must load its own copy, which it alone may delete (a shared name would answer "already
    loaded" and serve the first sidecar's folder)."""
    names = []
    for sidecar in ("a", "b"):
        proxy: Proxy = await start_proxy(
            "", vllm=(vllm_fake.url,), optimize=False, adapters_dir=tmp_path / sidecar, db=tmp_path / f"{sidecar}.db"
        )
        names.append(await activate_an_adapter(proxy, tmp_path / f"weights-{sidecar}"))
        await proxy.stop()
    weights = [(tmp_path / f"weights-{s}" / "adapter_model.safetensors").read_bytes() for s in ("a", "b")]
    assert weights[0] == weights[1] and names[0] != names[1]
    assert [vllm_fake.loras[name] for name in names] == [str(tmp_path / s / "v1" / "adapter") for s in ("a", "b")]


async def test_a_replica_that_restarts_under_the_sidecar_gets_the_active_version_back(
    start_proxy, tmp_path: Path
) -> None:
    """Restarted faster than a health check (so /health never failed): its empty model list gives it away."""
    port = free_port()
    replica = await FakeUpstream(vllm=True).start(port)
    proxy: Proxy = await start_proxy(
        "", vllm=(replica.url,), optimize=False, adapters_dir=tmp_path / "adapters", db=tmp_path / "lw.duckdb"
    )
    served_name = await activate_an_adapter(proxy, tmp_path / "a1")
    await replica.stop()
    restarted = await FakeUpstream(vllm=True).start(port)  # the same address, nothing loaded
    try:
        async with asyncio.timeout(20):  # checked every 5 s
            while served_name not in restarted.loras:
                await asyncio.sleep(0.05)
        client = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
        await client.chat.completions.create(model="any-model", messages=QUESTION)
        assert restarted.requests[-1].body["model"] == served_name
    finally:
        await proxy.stop()
        await restarted.stop()


def test_the_demo_stops_with_one_line_when_the_model_cannot_be_served(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("")  # the model cannot be prepared here
    command = [sys.executable, "-m", "proxy", "demo", "--dir", str(tmp_path / "demo"), "--cache-dir", str(not_a_folder)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("lightwire demo: the sidecar cannot serve the model: ")
    assert str(tmp_path / "demo" / "lightwire.log") in line

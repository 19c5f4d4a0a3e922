"""Lightwire's own keys (client ``api_keys``, ``admin_key``) never leave the process: a backend gets
``upstream_api_key`` or, for a plain upstream only, the agent's own key; and the admin API is off on a network
address without an admin key."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest
from safetensors.numpy import save_file

from tests.conftest import Proxy
from tests.fake_upstream import FakeUpstream

MESSAGES = [{"role": "user", "content": "hi"}]
LIGHTWIRE_KEYS = ("Bearer lw-client", "Bearer lw-admin")


async def request(
    proxy: Proxy, method: str, path: str, key: str | None = None, body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, proxy.url.removesuffix("/v1") + path, json=body or {}, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


def sent(fake: FakeUpstream) -> set[str | None]:
    """The Authorization headers of the requests to /v1 (vLLM's /health needs none)."""
    return {given for path, given in fake.authorizations if path.startswith("/v1")}


async def test_a_plain_upstream_gets_the_agents_own_key_but_never_lightwires(
    fake: FakeUpstream, start_proxy: Any
) -> None:
    proxy = await start_proxy(fake.url, admin_key="lw-admin")  # no client keys: /v1 is open
    for key in ("sk-agent", "lw-admin"):
        await openai.AsyncOpenAI(base_url=proxy.url, api_key=key, max_retries=0).chat.completions.create(
            model="m", messages=MESSAGES
        )
    assert [seen.headers.get("Authorization") for seen in fake.requests] == ["Bearer sk-agent", None]


def tiny_adapter(folder: Path) -> Path:
    """A peft LoRA folder that passes the sidecar's checks (no base model folder to check its modules against)."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}')
    weights = {"q.lora_A.weight": np.ones((2, 4), np.float32), "q.lora_B.weight": np.zeros((4, 2), np.float32)}
    save_file(weights, str(folder / "adapter_model.safetensors"))
    return folder


async def test_vllm_replicas_get_upstream_api_key_for_every_request_and_never_a_lightwire_key(
    start_proxy: Any, tmp_path: Path
) -> None:
    vllm = await FakeUpstream(vllm=True, api_key="sk-vllm").start()  # 401 on /v1 without its key, as vLLM
    try:
        proxy = await start_proxy(
            "",
            vllm=(vllm.url,),
            upstream_api_key="sk-vllm",
            api_keys=("lw-client",),
            admin_key="lw-admin",
            group_samples=3,
            swap_mode="lora",
            optimize=False,
            adapters_dir=tmp_path / "adapters",
        )
        agent = openai.AsyncOpenAI(base_url=proxy.url, api_key="lw-client", max_retries=0)
        answer = await agent.chat.completions.create(model="agent", messages=MESSAGES, temperature=1.0)
        assert answer.choices[0].message.content
        assert [m.id for m in (await agent.models.list()).data] == ["fake-model"]
        status, adapter = await request(
            proxy, "POST", "/admin/adapters", "lw-admin", {"path": str(tiny_adapter(tmp_path / "a"))}
        )
        assert status == 200, adapter
        status, activated = await request(proxy, "POST", f"/admin/adapters/{adapter['version']}/activate", "lw-admin")
        assert status == 200 and activated["status"] == "active", activated
        greedy = await agent.chat.completions.create(model="agent", messages=MESSAGES, temperature=0)  # no samples
        assert greedy.model.startswith("lw-v1-")
        for _ in range(100):  # the group's two samples run in the background
            if sum(path == "/v1/chat/completions" for path, _ in vllm.authorizations) == 4:
                break
            await asyncio.sleep(0.05)
        paths = {path for path, _ in vllm.authorizations}
        assert {"/v1/models", "/v1/chat/completions", "/v1/load_lora_adapter", "/v1/completions"} <= paths
        assert sent(vllm) == {"Bearer sk-vllm"}
    finally:
        await vllm.stop()


async def test_vllm_replicas_get_no_key_without_upstream_api_key(vllm_fake: FakeUpstream, start_proxy: Any) -> None:
    proxy = await start_proxy("", vllm=(vllm_fake.url,), api_keys=("lw-client",), group_samples=2, optimize=False)
    agent = openai.AsyncOpenAI(base_url=proxy.url, api_key="lw-client", max_retries=0)
    await agent.chat.completions.create(model="agent", messages=MESSAGES, temperature=1.0)
    for _ in range(100):
        if len(vllm_fake.requests) == 2:
            break
        await asyncio.sleep(0.05)
    assert len(vllm_fake.requests) == 2 and sent(vllm_fake) == {None}


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "lightwire.example"])
async def test_on_a_network_address_without_an_admin_key_the_admin_api_is_off(
    fake: FakeUpstream, start_proxy: Any, host: str
) -> None:
    proxy = await start_proxy(fake.url, host=host, api_keys=("lw-client",))  # the test still binds loopback
    for method, path in (("GET", "/admin/stats"), ("GET", "/admin/export"), ("POST", "/admin/train")):
        status, body = await request(proxy, method, path, "lw-client")
        assert status == 403 and body["error"]["code"] == "forbidden", body
        assert "admin_key" in body["error"]["message"] and "LIGHTWIRE_ADMIN_KEY" in body["error"]["message"]
    agent = openai.AsyncOpenAI(base_url=proxy.url, api_key="lw-client", max_retries=0)  # /v1 as documented
    answer = await agent.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
    span_id = answer.headers["x-lightwire-span-id"]
    assert (await request(proxy, "POST", "/feedback", "lw-client", {"span_id": span_id, "reward": 1}))[0] == 200
    assert (await request(proxy, "POST", "/feedback", None, {"span_id": span_id, "reward": 1}))[0] == 401


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
async def test_on_loopback_the_admin_api_works_without_an_admin_key(
    fake: FakeUpstream, start_proxy: Any, host: str
) -> None:
    proxy = await start_proxy(fake.url, host=host)
    assert (await request(proxy, "GET", "/admin/stats"))[0] == 200


async def test_with_an_admin_key_the_admin_api_works_on_any_address(fake: FakeUpstream, start_proxy: Any) -> None:
    proxy = await start_proxy(fake.url, host="0.0.0.0", admin_key="lw-admin")
    assert (await request(proxy, "GET", "/admin/stats", "lw-admin"))[0] == 200
    assert (await request(proxy, "GET", "/admin/stats"))[0] == 401

"""The policy on a real vLLM-CPU server with the real model: answers, recorded tokens, and hot-swaps in both
modes, under load, with rollback; bad adapters never reach vLLM."""

from __future__ import annotations

import asyncio
import json
import shutil
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
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.timeout(VLLM_SETUP_TIMEOUT_S + 300),
]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@asynccontextmanager
async def policy_proxy(
    server: VllmServer, model_dir: Path, tmp_path: Path, mode: str, **overrides: Any
) -> AsyncIterator[Proxy]:
    overrides.setdefault("vllm", (server.base_url + "/v1",))
    config = settings.load(
        environ={},
        model_dir=model_dir,
        swap_mode=mode,
        adapters_dir=tmp_path / "adapters",
        db=tmp_path / "spans.duckdb",
        **overrides,
    )
    proxy = await Proxy(config).start()
    try:
        yield proxy
    finally:
        await proxy.stop()


async def ask(proxy: Proxy, **extra: Any) -> str:
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
    done = await client.chat.completions.create(
        model="agent-model", messages=QUESTION, temperature=0, max_tokens=16, **extra
    )
    return done.choices[0].message.content or ""


async def admin(proxy: Proxy, path: str, body: dict | None = None) -> tuple[int, dict]:
    root = proxy.url.removesuffix("/v1")
    async with aiohttp.ClientSession() as http:
        request = http.post(root + path, json=body or {}) if body is not None else http.get(root + path)
        async with request as resp:
            return resp.status, await resp.json()


async def stream_text(proxy: Proxy, session: str) -> tuple[str, bool]:
    client = openai.AsyncOpenAI(
        base_url=proxy.url, api_key="k", max_retries=0, default_headers={"x-lightwire-session": session}
    )
    text, finished = "", False
    async for chunk in await client.chat.completions.create(
        model="agent-model",
        messages=[{"role": "user", "content": "Count from one to forty in words."}],
        temperature=0,
        max_tokens=48,
        stream=True,
    ):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finished = finished or chunk.choices[0].finish_reason is not None
    return text, finished


async def test_base_answer_with_tokens_and_logprobs_recorded(
    vllm_server: VllmServer, embedded_model_dir: Path, tmp_path: Path
) -> None:
    async with policy_proxy(vllm_server, embedded_model_dir, tmp_path, "lora") as proxy:
        assert "Paris" in await ask(proxy)
        client = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
        streamed = [
            c
            async for c in await client.chat.completions.create(
                model="agent-model", messages=QUESTION, temperature=0, max_tokens=16, stream=True
            )
        ]
        assert all("token_ids" not in json.dumps(c.model_dump()) for c in streamed)
        rows = await proxy.spans()
    for row in rows:
        assert row["provider_name"] == "vllm" and row["adapter_version"] is None
        assert row["request_model"] == "agent-model" and row["response_model"] == "SmolLM2-135M-Instruct"
        assert len(row["prompt_token_ids"]) == row["usage_input_tokens"] > 5
        [ids] = row["completion_token_ids"]
        [logprobs] = row["completion_logprobs"]
        assert len(ids) == len(logprobs) == row["usage_output_tokens"] > 0
        assert all(lp <= 0 for lp in logprobs)
    assert rows[0]["completion_token_ids"] == rows[1]["completion_token_ids"]  # greedy: stream == non-stream


async def test_group_samples_from_vllm_share_the_prompt_tokens_and_carry_their_own(
    vllm_server: VllmServer, embedded_model_dir: Path, tmp_path: Path
) -> None:
    async with policy_proxy(
        vllm_server, embedded_model_dir, tmp_path, "lora", group_samples=4, span_hooks=("tests.reward_hooks:is_sample",)
    ) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
        done = await client.chat.completions.create(
            model="agent-model", messages=QUESTION, temperature=1.0, max_tokens=24, seed=3
        )
        assert len(done.choices) == 1
        for _ in range(300):  # the samples, then their rewards, come in the background
            if (await admin(proxy, "/healthz"))[1]["hooks"]["done"] == 4:
                break
            await asyncio.sleep(0.1)
        rows = await proxy.spans()
    [call] = [r for r in rows if r["session_source"] != "sample"]
    samples = [r for r in rows if r["session_source"] == "sample"]
    assert len(samples) == 3
    answers = {tuple(r["completion_token_ids"][0]) for r in rows}
    assert len(answers) > 1  # sampled at temperature 1: a group whose answers differ
    for sample in samples:
        assert sample["parent_span_id"] == call["span_id"] and sample["session_id"] is None
        assert sample["prompt_token_ids"] == call["prompt_token_ids"]
        assert sample["request_temperature"] == 1.0 and sample["provider_name"] == "vllm"
        [ids], [logprobs] = sample["completion_token_ids"], sample["completion_logprobs"]
        assert len(ids) == len(logprobs) == sample["usage_output_tokens"] > 0
    rewards = read_rows(proxy.config.db, "SELECT value FROM feedback")
    assert sorted(r["value"] for r in rewards) == [0.0, 1.0, 1.0, 1.0]  # every answer scored by the span hook


@pytest.mark.parametrize("mode", ["lora", "merged"])
async def test_adapter_changes_answers_swaps_under_load_and_rolls_back(
    vllm_server: VllmServer, embedded_model_dir: Path, random_adapter: Path, tmp_path: Path, mode: str
) -> None:
    async with policy_proxy(vllm_server, embedded_model_dir, tmp_path, mode) as proxy:
        base_answer = await ask(proxy)
        status, adapter = await admin(proxy, "/admin/adapters", {"path": str(random_adapter)})
        assert status == 200 and adapter["version"] == "v1" and adapter["status"] == "candidate"

        streams = [asyncio.create_task(stream_text(proxy, f"load-{i}")) for i in range(8)]
        await asyncio.sleep(0.5)  # the streams are running
        status, active = await admin(proxy, "/admin/adapters/v1/activate", {})
        assert status == 200, active
        assert active["status"] == "active"
        results = await asyncio.gather(*streams)
        assert all(finished and text for text, finished in results)  # none dropped or cut

        adapted = await ask(proxy)
        assert adapted != base_answer
        status, rolled = await admin(proxy, "/admin/rollback", {})
        assert status == 200 and rolled == {"rolled_back": "v1", "active": "base"}
        assert await ask(proxy) == base_answer
        rows = await proxy.spans()
    assert [r["http_status"] for r in rows] == [200] * len(rows)
    served = [r["adapter_version"] for r in rows if r["request"]["messages"] == QUESTION]
    assert served == [None, "v1", None]
    adapter_call = next(r for r in rows if r["adapter_version"] == "v1")
    assert adapter_call["completion_token_ids"] and adapter_call["completion_logprobs"]
    registry = read_rows(tmp_path / "spans.duckdb", "SELECT version, status FROM adapters")
    assert registry == [{"version": "v1", "status": "retired"}]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("rank", "outside 1..16"),
        ("nan", "non-finite"),
        ("config", "no adapter_config.json"),
        ("modules", "not linear layers"),
    ],
)
async def test_malformed_adapters_are_refused_before_vllm(
    vllm_server: VllmServer,
    embedded_model_dir: Path,
    random_adapter: Path,
    tmp_path: Path,
    damage: str,
    message: str,
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(random_adapter, bad)
    config_path = bad / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if damage == "rank":
        config["r"] = 64
    elif damage == "modules":
        config["target_modules"] = ["q_proj", "attention_dense"]
    config_path.write_text(json.dumps(config))
    if damage == "config":
        config_path.unlink()
    if damage == "nan":
        _poison(bad / "adapter_model.safetensors")
    before = await served_models(vllm_server)
    async with policy_proxy(vllm_server, embedded_model_dir, tmp_path, "lora") as proxy:
        status, answer = await admin(proxy, "/admin/adapters", {"path": str(bad)})
        assert status == 400 and message in answer["error"]["message"]
        assert (await admin(proxy, "/admin/adapters"))[1]["data"] == []
    assert await served_models(vllm_server) == before  # vLLM never saw it


async def served_models(server: VllmServer) -> list[str]:
    async with aiohttp.ClientSession() as http, http.get(server.base_url + "/v1/models") as resp:
        return sorted(m["id"] for m in (await resp.json())["data"])


def _poison(path: Path) -> None:
    """Turn the first weight of a safetensors file into NaN."""
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    name = next(k for k in header if k != "__metadata__")
    start = 8 + header_len + header[name]["data_offsets"][0]
    raw[start : start + 4] = b"\xff\xff\xff\xff"  # NaN in bf16 (and in f32)
    path.write_bytes(bytes(raw))


async def test_a_canary_takes_whole_sessions_and_a_failed_publish_keeps_the_active_version(
    vllm_server: VllmServer, embedded_model_dir: Path, random_adapter: Path, tmp_path: Path
) -> None:
    async with policy_proxy(vllm_server, embedded_model_dir, tmp_path, "lora") as proxy:
        assert (await admin(proxy, "/admin/adapters", {"path": str(random_adapter)}))[0] == 200
        status, canary = await admin(proxy, "/admin/adapters/v1/canary", {"fraction": 0.5})
        assert status == 200 and canary["status"] == "canary"
        for session in range(12):
            client = openai.AsyncOpenAI(
                base_url=proxy.url,
                api_key="k",
                max_retries=0,
                default_headers={"x-lightwire-session": f"user-{session}"},
            )
            for _ in range(2):
                await client.chat.completions.create(model="m", messages=QUESTION, max_tokens=2)
        assert (await admin(proxy, "/admin/rollback", {}))[1] == {"rolled_back": "v1", "active": "base"}

        # A version whose files vanished before activation is refused before vLLM is asked to load it, and the
        # base keeps serving.
        assert (await admin(proxy, "/admin/adapters", {"path": str(random_adapter)}))[1]["version"] == "v2"
        shutil.rmtree(tmp_path / "adapters" / "v2")
        status, error = await admin(proxy, "/admin/adapters/v2/activate", {})
        assert status == 502 and "v2 was not published" in error["error"]["message"]
        assert "has lost adapter_config.json and adapter_model.safetensors" in error["error"]["message"]
        assert "Paris" in await ask(proxy)
        listing = (await admin(proxy, "/admin/adapters"))[1]
        assert listing["active"] == "base"
        assert [(a["version"], a["status"]) for a in listing["data"]] == [("v1", "retired"), ("v2", "failed")]
        rows = await proxy.spans()
    arms: dict[str, set] = {}
    for row in rows[:24]:
        arms.setdefault(row["session_id"], set()).add(row["adapter_version"])
    assert all(len(versions) == 1 for versions in arms.values())  # never split
    assert {v for versions in arms.values() for v in versions} == {None, "v1"}  # both arms served
    assert rows[-1]["adapter_version"] is None


async def test_rolling_back_twice_reloads_a_version_that_was_unloaded(
    vllm_server: VllmServer, embedded_model_dir: Path, random_adapter: Path, tmp_path: Path
) -> None:
    async with policy_proxy(vllm_server, embedded_model_dir, tmp_path, "lora") as proxy:
        for version in ("v1", "v2", "v3"):
            assert (await admin(proxy, "/admin/adapters", {"path": str(random_adapter)}))[1]["version"] == version
            assert (await admin(proxy, f"/admin/adapters/{version}/activate", {}))[0] == 200
            await ask(proxy)  # v1 is unloaded once v3 is active (only the previous one is kept)
        for expected in ("v2", "v1", "base"):
            status, rolled = await admin(proxy, "/admin/rollback", {})
            assert status == 200 and rolled["active"] == expected
            await ask(proxy)
        rows = await proxy.spans()
    assert [r["http_status"] for r in rows] == [200] * 6
    assert [r["adapter_version"] for r in rows] == ["v1", "v2", "v3", "v2", "v1", None]

"""The Responses API on a real vLLM-CPU server with the real model: answers relayed (streams as typed events),
exact token ids and logprobs recorded and hidden from the client, an unmodified Agents SDK agent served, and an
optimizer run that learns from Responses spans."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import openai
import pytest
from agents import Agent, Runner

from proxy.vllm_server import VllmServer
from tests.test_optimizer_loop import QUESTIONS, admin, sidecar
from tests.test_vllm_backend import policy_proxy
from tests.vllm_fixtures import VLLM_SETUP_TIMEOUT_S

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.timeout(VLLM_SETUP_TIMEOUT_S + 600),
]

QUESTION = "What is the capital of France?"


async def test_responses_on_vllm_record_exact_tokens_and_hide_them(
    vllm_server: VllmServer, embedded_model_dir: Path, tmp_path: Path
) -> None:
    async with policy_proxy(vllm_server, embedded_model_dir, tmp_path, "lora") as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
        whole = await client.responses.create(model="agent-model", input=QUESTION, temperature=0, max_output_tokens=16)
        assert "Paris" in whole.output_text
        events = [
            e
            async for e in await client.responses.create(
                model="agent-model", input=QUESTION, temperature=0, max_output_tokens=16, stream=True
            )
        ]
        assert events[0].type == "response.created" and events[-1].type == "response.completed"
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
        seen = json.dumps([whole.model_dump(), *(e.model_dump() for e in events)])
        assert '"tokens"' not in seen and '"logprob"' not in seen  # asked of vLLM, not shown to the client
        rows = await proxy.spans()
    for row in rows:
        assert row["operation_name"] == "responses" and row["provider_name"] == "vllm"
        assert row["response_model"] == "SmolLM2-135M-Instruct" and row["adapter_version"] is None
        assert len(row["prompt_token_ids"]) == row["usage_input_tokens"] > 5
        [ids] = row["completion_token_ids"]
        assert len(ids) == row["usage_output_tokens"] > 0
        assert all(lp <= 0 for lp in row["completion_logprobs"][0])
        assert "output_messages" not in row["response"]
    assert rows[0]["completion_token_ids"] == rows[1]["completion_token_ids"]  # greedy: stream == non-stream
    [whole_logprobs], [streamed_logprobs] = rows[0]["completion_logprobs"], rows[1]["completion_logprobs"]
    assert len(whole_logprobs) == len(rows[0]["completion_token_ids"][0])
    # vLLM 0.32 streams no logprob for a token that adds no text (the end-of-turn token): the stream's are the rest
    assert len(streamed_logprobs) == len(whole_logprobs) - 1
    assert streamed_logprobs == pytest.approx(whole_logprobs[:-1], abs=1e-3)


async def test_an_agents_sdk_agent_with_its_defaults_is_served_by_the_policy(
    vllm_server: VllmServer,
    embedded_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    agent_process: None,
) -> None:
    async with policy_proxy(vllm_server, embedded_model_dir, tmp_path, "lora") as proxy:
        monkeypatch.setenv("OPENAI_BASE_URL", proxy.url)
        agent = Agent(name="geographer", instructions="Answer in one short sentence.")
        result = await Runner.run(agent, QUESTION)
        assert "Paris" in result.final_output
        follow = await Runner.run(agent, [*result.to_input_list(), {"role": "user", "content": "And of Italy?"}])
        assert follow.final_output
        rows = await proxy.spans()
    assert [r["operation_name"] for r in rows] == ["responses", "responses"]
    assert rows[0]["session_id"] == rows[1]["session_id"] and [r["turn_index"] for r in rows] == [0, 1]
    assert all(r["prompt_token_ids"] and r["completion_token_ids"] for r in rows)
    assert len(rows[1]["prompt_token_ids"]) > len(rows[0]["prompt_token_ids"])  # the whole conversation


@pytest.mark.training
async def test_an_optimizer_run_learns_from_responses_spans(
    vllm_server: VllmServer, embedded_model_dir: Path, tmp_path: Path
) -> None:
    async with sidecar(vllm_server, embedded_model_dir, tmp_path, "always_one") as proxy:
        root = proxy.url.removesuffix("/v1")
        async with aiohttp.ClientSession() as http:
            for i in range(12):
                client = openai.AsyncOpenAI(
                    base_url=proxy.url,
                    api_key="k",
                    max_retries=0,
                    default_headers={"x-lightwire-session": f"task-{i}"},  # the same held-out split as chat's test
                )
                answer = await client.responses.create(
                    model="agent",
                    input=QUESTIONS[i % len(QUESTIONS)],
                    temperature=1.0,
                    max_output_tokens=24,
                    stream=i % 2 == 1,
                )
                if i % 2:
                    answer = [e async for e in answer][-1].response  # type: ignore[union-attr]
                body = {"response_id": answer.id, "reward": 1.0}  # type: ignore[union-attr]
                async with http.post(root + "/feedback", json=body) as resp:
                    assert resp.status == 200
        status, run = await admin(proxy, "POST", "/admin/train")
        assert status == 200, run
        assert run["data"]["records"] == 12 and run["training"]["losses"], run
        assert all(loss > 0 for loss in run["training"]["losses"])
        assert run["data"]["splits"]["heldout"] >= 1 and run["evaluation"]["method"] == "offline", run
        assert run["status"] == "published" and run["candidate"] == "v1", run
        status, rolled = await admin(proxy, "POST", "/admin/rollback")  # leave vLLM with the base weights
        assert status == 200 and rolled["active"] == "base"

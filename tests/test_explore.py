"""Exploration (``explore_samples``), with the fake upstream as the policy's vLLM replica: a task that failed in
every recent attempt gets hotter background samples within a budget, others get none; a sample that a span hook
rewards becomes a worked example for the next call of that task once memory keeps it."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai

from tests.conftest import Proxy
from tests.fake_upstream import FakeUpstream

HARD = "Which customers ordered every product?"
EASY = "How many customers are there?"


async def api(proxy: Proxy, method: str, path: str, body: Any = None) -> Any:
    url = proxy.url.removesuffix("/v1") + path
    async with aiohttp.ClientSession() as http, http.request(method, url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def ask(proxy: Proxy, session: str, question: str) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
    messages = [{"role": "system", "content": "You write SQL."}, {"role": "user", "content": question}]
    await client.chat.completions.create(
        model="agent", messages=messages, temperature=0, extra_headers={"x-lightwire-session": session}
    )


async def until(check: Any) -> Any:
    for _ in range(400):
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError("gave up waiting")


async def test_only_a_task_that_keeps_failing_is_explored_within_the_budget_and_memory_keeps_its_success(
    vllm_fake: FakeUpstream, start_proxy: Any
) -> None:
    proxy = await start_proxy(
        "",
        vllm=(vllm_fake.url,),
        optimize=False,
        explore_samples=3,
        explore_attempts=2,
        explore_budget=5,
        span_hooks=("tests.reward_hooks:is_sample",),  # samples score 1, clients' own answers 0
        memory=("agent",),
        eval_split=0.0,
    )
    for i in range(2):  # two failed attempts at the hard task, one success at the easy one
        await ask(proxy, f"hard-{i}", HARD)
        await api(proxy, "POST", "/feedback", {"session_id": f"hard-{i}", "reward": 0})
    await ask(proxy, "easy-0", EASY)
    await api(proxy, "POST", "/feedback", {"session_id": "easy-0", "reward": 1})
    assert len(vllm_fake.requests) == 3  # greedy calls, no group samples: nothing else was asked

    async def failing() -> bool:
        return (await api(proxy, "GET", "/healthz"))["explore"]["failing_tasks"] == 1

    await until(failing)
    await ask(proxy, "easy-1", EASY)
    await ask(proxy, "hard-2", HARD)

    async def explored() -> list[dict[str, Any]]:
        hot = [seen.body for seen in vllm_fake.requests if seen.body.get("temperature") == 1.2]
        return hot if len(hot) == 3 else []

    hot = await until(explored)
    assert all(body["messages"][-1]["content"] == HARD for body in hot)  # the easy task got none
    await ask(proxy, "hard-3", HARD)  # the budget (5 a minute) has 2 left for it
    stats = await until(lambda: _explore_stats(proxy, sampled=5))
    assert (stats["refused"], stats["budget_per_minute"]) == (1, 5)

    async def scored() -> bool:
        return (await api(proxy, "GET", "/healthz"))["hooks"]["done"] == 6 + 5  # the clients' calls, the samples

    await until(scored)
    run = await api(proxy, "POST", "/admin/memory/build")  # no held-out prompts: the gate rejects, the bank exists
    # the hard task's first success, found by a sample (the span hook's 0 for each client's answer wins over the
    # easy session's reward: per-turn feedback does)
    assert run["data"]["trajectories"] == {"agent": 1}
    await api(proxy, "POST", f"/admin/memory/{run['candidate']}/activate")
    await ask(proxy, "hard-4", HARD)
    sent = vllm_fake.requests[-1].body["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"] and sent[1]["content"] == HARD
    rows = await proxy.spans()
    samples = [r for r in rows if r["session_source"] == "sample"]
    assert len(samples) == 5 and all(r["request"]["temperature"] == 1.2 for r in samples)


async def _explore_stats(proxy: Proxy, *, sampled: int) -> dict[str, Any] | None:
    stats = (await api(proxy, "GET", "/healthz"))["explore"]
    return stats if stats["sampled"] == sampled else None

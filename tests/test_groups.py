"""Extra samples for GRPO groups (``group_samples``), with the fake upstream as the policy's vLLM replica: the
client sees only its own answer, the samples are recorded and scored apart from it, the export keeps them with it,
and nothing waits for them."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import aiohttp
import duckdb
import openai

from store import export
from tests.conftest import Proxy, read_rows
from tests.fake_upstream import PROMPT_IDS, FakeUpstream

QUESTION = [{"role": "user", "content": "Write a haiku about rain."}]
HELDOUT = 0.01  # a session held out at this share is unlikely to be matched by chance


async def sampling_proxy(fake: FakeUpstream, start_proxy: Any, **overrides: Any) -> Proxy:
    """A proxy whose policy is served by ``fake`` (as if it were vLLM), completing groups of four answers."""
    return await start_proxy("", vllm=(fake.url,), optimize=False, group_samples=4, **overrides)


def client(proxy: Proxy, session: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=proxy.url, api_key="k", max_retries=0, default_headers={"x-lightwire-session": session}
    )


async def until(check: Callable[[], Any]) -> None:
    for _ in range(200):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("gave up waiting")


async def test_samples_complete_the_group_unseen_and_are_scored_and_exported_with_the_clients_answer(
    vllm_fake: FakeUpstream, start_proxy: Any
) -> None:
    proxy = await sampling_proxy(vllm_fake, start_proxy, span_hooks=("tests.reward_hooks:is_sample",))
    session = next(s for i in itertools.count() if export.split_of(s := f"s{i}", HELDOUT) == "heldout")
    agent = client(proxy, session)
    stream = await agent.chat.completions.create(model="agent", messages=QUESTION, temperature=1.0, seed=7, stream=True)
    chunks = [chunk async for chunk in stream]
    assert {choice.index for chunk in chunks for choice in chunk.choices} == {0}  # its own answer, nothing more
    greedy = [{"role": "user", "content": "And one about snow?"}]
    await agent.chat.completions.create(model="agent", messages=greedy, temperature=0)  # greedy: no samples

    async def all_scored() -> bool:
        async with aiohttp.ClientSession() as http, http.get(proxy.url.removesuffix("/v1") + "/healthz") as resp:
            return (await resp.json())["hooks"]["done"] == 5  # 2 client calls, 3 samples

    await until(all_scored)
    sent = [seen.body for seen in vllm_fake.requests]
    asked = [body for body in sent if body["messages"] == QUESTION]
    assert len(sent) == 5 and len(asked) == 4 and asked[0]["stream"] and asked[0]["seed"] == 7
    for body in asked[1:]:
        assert body["model"] == "fake-model" and body["temperature"] == 1.0 and body["return_token_ids"]
        assert not {"n", "stream", "seed"} & body.keys()
    rows = await proxy.spans()
    [first, second] = [r for r in rows if r["session_id"] == session]
    samples = [r for r in rows if r["session_source"] == "sample"]
    assert len(samples) == 3 and len(rows) == 5
    for sample in samples:
        assert sample["session_id"] is None and sample["turn_index"] is None
        assert (sample["trace_id"], sample["parent_span_id"]) == (first["trace_id"], first["span_id"])
        assert sample["request"]["messages"] == QUESTION and "seed" not in sample["request"]
        assert sample["prompt_token_ids"] == PROMPT_IDS and sample["completion_token_ids"]
        assert "token_ids" not in sample["response"]["choices"][0]  # stored as a client would have seen it

    rewards = read_rows(proxy.config.db, "SELECT span_id, value FROM feedback")
    assert {r["span_id"]: r["value"] for r in rewards} == {
        first["span_id"]: 0.0,
        second["span_id"]: 0.0,
        **{s["span_id"]: 1.0 for s in samples},
    }
    with duckdb.connect(str(proxy.config.db), read_only=True) as con:
        records = list(export.records(con, export.Options(session_split=HELDOUT)))
    group = [r for r in records if r["messages"] == QUESTION]
    # One group for GRPO (same prompt ids, same opening), in the client's split, with rewards that differ.
    assert sorted(r["reward"] for r in group) == [0.0, 1.0, 1.0, 1.0]
    assert {r["split"] for r in group} == {"heldout"}
    assert all(r["prompt_token_ids"] == PROMPT_IDS for r in group)


async def test_a_sample_goes_over_the_connection_its_call_left_open(vllm_fake: FakeUpstream, start_proxy: Any) -> None:
    """Samples are sent by the request path's own client: its kept-alive connections, its keys."""
    proxy = await start_proxy("", vllm=(vllm_fake.url,), optimize=False, group_samples=2)
    await client(proxy, "reused").chat.completions.create(model="agent", messages=QUESTION, temperature=1.0)
    await until(lambda: asyncio.sleep(0, len(vllm_fake.requests) == 2))
    call, sample = [port for path, port in vllm_fake.connections if path == "/v1/chat/completions"]
    assert sample == call


async def test_samples_never_hold_up_the_client_and_stop_with_the_proxy(
    vllm_fake: FakeUpstream, start_proxy: Any
) -> None:
    vllm_fake.delays = [0.0, 3600.0, 3600.0, 3600.0]  # the client's call is answered at once, its samples hang
    proxy = await sampling_proxy(vllm_fake, start_proxy)
    agent = client(proxy, "patient")
    first = await agent.chat.completions.create(model="agent", messages=QUESTION, temperature=1.0)
    await until(lambda: asyncio.sleep(0, len(vllm_fake.requests) == 4))  # the samples are on their way
    turn = [*QUESTION, {"role": "assistant", "content": first.choices[0].message.content}]
    turn.append({"role": "user", "content": "Shorter, please."})
    second = await agent.chat.completions.create(model="agent", messages=turn, temperature=0)
    assert len(first.choices) == len(second.choices) == 1
    rows = await proxy.spans()  # stopping cancels the samples still running; they are not recorded
    assert [(r["session_id"], r["turn_index"]) for r in rows] == [("patient", 0), ("patient", 1)]

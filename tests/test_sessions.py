"""Which calls belong together: every attribution method, through the openai SDK, checked turn by turn."""

from __future__ import annotations

import asyncio
import collections
import gc
import random
from typing import Any

import openai

from proxy.sessions import Sessions
from tests.conftest import Proxy
from tests.fake_upstream import FakeUpstream

SYSTEM = {"role": "system", "content": "You are a helpful agent. Use tools when useful."}
TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {}}}}]


def sdk(url: str, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=0, default_headers=headers or None)


async def test_header_path_and_traceparent_name_the_session(proxy: Proxy) -> None:
    messages = [{"role": "user", "content": "hi"}]
    by_header = sdk(proxy.url, **{"x-lightwire-session": "ticket-42"})
    by_path = sdk(proxy.url.replace("/v1", "/s/run-7/v1"))
    trace = "0af7651916cd43dd8448eb211c80319c"
    by_trace = sdk(proxy.url, traceparent=f"00-{trace}-b7ad6b7169203331-01")
    for client in (by_header, by_path, by_trace, by_header, by_path):
        await client.chat.completions.create(model="m", messages=messages)
    await by_path.completions.create(model="m", prompt="x")
    await by_path.models.list()
    rows = await proxy.spans()
    got = [(r["session_id"], r["session_source"], r["turn_index"]) for r in rows]
    assert got == [
        ("ticket-42", "header", 0),
        ("run-7", "path", 0),
        (trace, "traceparent", 0),
        ("ticket-42", "header", 1),
        ("run-7", "path", 1),
        ("run-7", "path", 2),
    ]


async def test_header_beats_path_beats_traceparent(proxy: Proxy) -> None:
    client = sdk(
        proxy.url.replace("/v1", "/s/from-path/v1"),
        **{
            "x-lightwire-session": "from-header",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        },
    )
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    [row] = await proxy.spans()
    assert (row["session_id"], row["session_source"]) == ("from-header", "header")


async def test_named_sessions_keep_counting_turns_after_a_restart(fake: FakeUpstream, start_proxy) -> None:
    first = await start_proxy(fake.url)
    client = sdk(first.url, **{"x-lightwire-session": "long-task"})
    for _ in range(2):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    await first.stop()
    second = await start_proxy(fake.url, db=first.config.db)
    await sdk(second.url, **{"x-lightwire-session": "long-task"}).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "again"}]
    )
    rows = await second.spans()
    assert [r["turn_index"] for r in rows] == [0, 1, 2]


async def run_conversation(client: openai.AsyncOpenAI, user: str, turns: int, rng: random.Random) -> None:
    """An agent loop: ask, call a tool when told to, feed the result back; one turn streams."""
    messages: list[Any] = [SYSTEM, {"role": "user", "content": user}]
    for turn in range(turns):
        await asyncio.sleep(rng.random() * 0.01)  # interleave the conversations
        if turn == 1:  # a streamed turn, rebuilt by the agent the usual way
            content = ""
            async for chunk in await client.chat.completions.create(model="m", messages=messages, stream=True):
                content += (chunk.choices[0].delta.content or "") if chunk.choices else ""
            messages += [{"role": "assistant", "content": content}, {"role": "user", "content": f"{user}: and?"}]
            continue
        tools = TOOLS if turn % 2 == 0 else openai.NOT_GIVEN
        done = await client.chat.completions.create(model="m", messages=messages, tools=tools)
        message = done.choices[0].message
        messages.append(message)  # the SDK object, re-sent as the SDK serializes it
        for call in message.tool_calls or ():
            messages.append({"role": "tool", "tool_call_id": call.id, "content": f"result for {user}"})
        if not message.tool_calls:
            messages.append({"role": "user", "content": f"{user}: thanks, continue"})


async def test_fifty_interleaved_conversations_with_tools_and_one_system_prompt_are_linked(proxy: Proxy) -> None:
    client = sdk(proxy.url)
    rng = random.Random(7)
    turns = 4
    users = [f"user {i} asks about topic {i % 7}" for i in range(50)]
    await asyncio.gather(*(run_conversation(client, u, turns, rng) for u in users))
    rows = await proxy.spans()
    assert len(rows) == 50 * turns
    by_first_user = {}
    for row in rows:
        user = row["request"]["messages"][1]["content"]
        by_first_user.setdefault(user, []).append(row)
    sessions = set()
    for user in users:
        calls = sorted(by_first_user[user], key=lambda r: len(r["request"]["messages"]))
        assert len(calls) == turns
        assert len({c["session_id"] for c in calls}) == 1, f"{user}: split across sessions"
        assert [c["turn_index"] for c in calls] == list(range(turns))
        assert [c["session_source"] for c in calls] == ["new"] + ["linked"] * (turns - 1)
        sessions.add(calls[0]["session_id"])
    assert len(sessions) == 50


async def test_identical_histories_stay_apart_and_retries_join_their_session(proxy: Proxy) -> None:
    client = sdk(proxy.url)
    opening = [SYSTEM, {"role": "user", "content": "same question"}]
    first_a = await client.chat.completions.create(model="m", messages=opening)
    first_b = await client.chat.completions.create(model="m", messages=opening)
    assert first_a.choices[0].message.content == first_b.choices[0].message.content  # identical histories

    def follow(first, text):
        return [*opening, first.choices[0].message, {"role": "user", "content": text}]

    await client.chat.completions.create(model="m", messages=follow(first_a, "follow A"))
    await client.chat.completions.create(model="m", messages=follow(first_b, "follow B"))
    await client.chat.completions.create(model="m", messages=follow(first_b, "follow B"))  # a retry
    rows = await proxy.spans()
    a, b = rows[0]["session_id"], rows[1]["session_id"]
    assert a != b
    assert [r["session_id"] for r in rows[2:]] == [a, b, b]
    assert [r["turn_index"] for r in rows] == [0, 0, 1, 1, 2]


async def test_any_choice_of_an_n_call_continues_its_session(proxy: Proxy, fake: FakeUpstream) -> None:
    client = sdk(proxy.url)
    messages: list[Any] = [{"role": "user", "content": "pick one"}]
    done = await client.chat.completions.create(model="m", messages=messages, n=3)
    await client.chat.completions.create(
        model="m", messages=[*messages, done.choices[2].message, {"role": "user", "content": "ok"}]
    )
    rows = await proxy.spans()
    assert rows[0]["session_id"] == rows[1]["session_id"] and rows[1]["session_source"] == "linked"


def test_the_index_holds_nothing_the_cycle_collector_keeps_walking() -> None:
    """A tracked object per remembered call made full collections pause the proxy for over 100 ms."""
    sessions = Sessions(capacity=1_000)
    for i in range(200):
        opening = [SYSTEM, {"role": "user", "content": f"question {i}"}]
        session_id, _, conversation = sessions.attribute(header=None, path=None, trace_id=None, messages=opening)
        sessions.begin(session_id)
        sessions.finish(session_id, conversation, [{"role": "assistant", "content": f"answer {i}"}])
        sessions.remember_call(f"span{i}", f"chatcmpl-{i}", session_id)
        follow = [*opening, {"role": "assistant", "content": f"answer {i}"}, {"role": "user", "content": "more"}]
        assert sessions.attribute(header=None, path=None, trace_id=None, messages=follow)[0] == session_id
    gc.collect()
    gc.collect()  # a tuple is untracked once its items are: a nested one at the next collection
    assert len(sessions._replies) == 200 and not [c for c in sessions._replies.values() if gc.is_tracked(c)]
    assert sessions.find_call("chatcmpl-7") == ("span7", sessions.find_call("span7")[1])  # type: ignore[index]


def test_a_call_leaves_no_new_object_for_a_young_collection_to_examine() -> None:
    """A tuple per call in a table that drops one for each it adds kept young collections rare and long: each
    examined 50,000-80,000 of them (17-50 ms). A session's state and a call's ids are strings and numbers."""
    sessions = Sessions(capacity=100)
    gc.collect()
    gc.disable()
    try:
        before = {id(o) for o in gc.get_objects(0)}
        for i in range(1_000):
            session_id = f"s{i % 50}"
            sessions.begin(session_id)
            sessions.remember_call(f"span{i}", None, session_id)
            sessions.finish(session_id, None, [])
            sessions.remember_call(f"span{i}", f"resp{i}", session_id)
        left = [type(o).__name__ for o in gc.get_objects(0) if id(o) not in before]
    finally:
        gc.enable()
    assert len(left) <= 5, collections.Counter(left)  # `before`, and a constant or two of the first call
    assert sessions.find_call("resp999") == ("span999", "s49") and sessions.find_call("resp1") is None
    assert sessions.begin("s3") == 20 and sessions.end("s3") == ("s3", 21, sessions._ending["s3"][1])

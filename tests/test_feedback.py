"""``POST /feedback`` and session ends: every target, every error case, early and late feedback."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import orjson
import pytest

from tests.conftest import Proxy, read_rows
from tests.fake_upstream import FakeUpstream

MESSAGES = [{"role": "user", "content": "hi"}]


def base(proxy: Proxy) -> str:
    return proxy.url.removesuffix("/v1")


async def post(proxy: Proxy, path: str, body: object, **headers: str) -> tuple[int, dict]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(base(proxy) + path, data=orjson.dumps(body), headers=headers) as resp,
    ):
        return resp.status, orjson.loads(await resp.read())


def feedback_rows(proxy: Proxy) -> list[dict]:
    return read_rows(proxy.config.db, "SELECT * FROM feedback ORDER BY created_at")


async def test_feedback_by_span_response_and_session(proxy: Proxy) -> None:
    client = openai.AsyncOpenAI(
        base_url=proxy.url, api_key="k", max_retries=0, default_headers={"x-lightwire-session": "s1"}
    )
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
    span_id, response_id = raw.headers["x-lightwire-span-id"], raw.parse().id

    assert (await post(proxy, "/feedback", {"span_id": span_id, "reward": 0.5}))[0] == 200
    status, answer = await post(
        proxy, "/feedback", {"response_id": response_id, "reward": True, "name": "thumbs", "comment": "good"}
    )
    assert status == 200 and answer["span_id"] == span_id and answer["session_id"] == "s1" and answer["value"] == 1
    assert (await post(proxy, "/feedback", {"session_id": "s1", "reward": -2}))[0] == 200
    await proxy.stop()
    rows = feedback_rows(proxy)
    got = [(r["span_id"], r["session_id"], r["name"], r["value"], r["comment"], r["source"]) for r in rows]
    assert got == [
        (span_id, "s1", "reward", 0.5, None, "api"),
        (span_id, "s1", "thumbs", 1.0, "good", "api"),
        (None, "s1", "reward", -2.0, None, "api"),
    ]


async def test_the_session_and_reward_ids_the_proxy_makes_sort_by_when_it_made_them(proxy: Proxy) -> None:
    """Random ids put each new row anywhere in the store's primary keys, which DuckDB then held whole in memory
    (tests/test_footprint.py): sessions the proxy starts and rewards posted with no id get ids in time order."""
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
    made = []
    for i in range(3):
        question = [{"role": "user", "content": f"question {i}"}]
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=question)
        status, answer = await post(proxy, "/feedback", {"span_id": raw.headers["x-lightwire-span-id"], "reward": 1})
        assert status == 200
        made.append((answer["session_id"], answer["id"]))
        await asyncio.sleep(0.002)  # the next millisecond
    for ids, prefix in zip(zip(*made, strict=True), ("lw-", "fb-"), strict=True):
        assert list(ids) == sorted(ids) and len(set(ids)) == 3, ids
        assert all(i.startswith(prefix) and len(i) == 27 for i in ids), ids


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"span_id": "0123456789abcdef", "reward": 1}, 404, "span_id"),
        ({"response_id": "chatcmpl-nope", "reward": 1}, 404, "response_id"),
        ({"session_id": "no-such-session", "reward": 1}, 404, None),
        ({"reward": 1}, 400, None),
        ({"span_id": "a", "session_id": "b", "reward": 1}, 400, None),
        ({"session_id": "s", "reward": "high"}, 400, "reward"),
        ({"session_id": "s", "reward": None}, 400, "reward"),
        ({"session_id": "s"}, 400, "reward"),
        ({"session_id": "s", "reward": 1, "name": 5}, 400, "name"),
    ],
)
async def test_feedback_errors(proxy: Proxy, body: dict, status: int, param: str | None) -> None:
    got, answer = await post(proxy, "/feedback", body)
    assert got == status and answer["error"]["message"]
    if param:
        assert answer["error"]["param"] == param
    await proxy.stop()
    assert feedback_rows(proxy) == []


@pytest.mark.parametrize("raw", [b"NaN", b"1e999", b"Infinity"])
async def test_non_finite_rewards_are_refused(proxy: Proxy, raw: bytes) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(base(proxy) + "/feedback", data=b'{"session_id": "s", "reward": ' + raw + b"}") as resp,
    ):
        assert resp.status == 400


async def test_a_repeated_feedback_id_gets_the_first_answer_and_writes_once(proxy: Proxy) -> None:
    await openai.AsyncOpenAI(
        base_url=proxy.url, api_key="k", default_headers={"x-lightwire-session": "s"}
    ).chat.completions.create(model="m", messages=MESSAGES)
    body = {"session_id": "s", "reward": 1, "feedback_id": "fb-once"}
    answers = await asyncio.gather(*(post(proxy, "/feedback", body) for _ in range(5)))
    assert [a[0] for a in answers] == [200] * 5
    assert all(a[1] == answers[0][1] for a in answers) and answers[0][1]["id"] == "fb-once"
    await proxy.stop()
    assert len(feedback_rows(proxy)) == 1


async def test_feedback_before_the_span_is_written_attaches(proxy: Proxy) -> None:
    """The agent has the response id from the first chunk; the call, still streaming, has no row yet."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            proxy.url + "/chat/completions",
            json={"model": "m", "messages": MESSAGES, "stream": True},
            headers={"x-fake-chunks": "20", "x-fake-chunk-delay": "0.05"},
        ) as resp,
    ):
        first = await resp.content.readuntil(b"\n\n")
        response_id = orjson.loads(first.removeprefix(b"data: "))["id"]
        span_id = resp.headers["x-lightwire-span-id"]
        status, answer = await post(proxy, "/feedback", {"span_id": span_id, "reward": 1})
        assert status == 200
        await resp.read()
    status, answer = await post(proxy, "/feedback", {"response_id": response_id, "reward": 0})
    assert status == 200 and answer["span_id"] == span_id
    await proxy.stop()
    assert [r["span_id"] for r in feedback_rows(proxy)] == [span_id, span_id]


async def test_feedback_long_after_finds_its_call_in_the_store(fake: FakeUpstream, start_proxy) -> None:
    first = await start_proxy(fake.url)
    raw = await openai.AsyncOpenAI(base_url=first.url, api_key="k").chat.completions.with_raw_response.create(
        model="m", messages=MESSAGES
    )
    await first.stop()
    second = await start_proxy(fake.url, db=first.config.db)  # a restart: nothing in memory
    status, answer = await post(second, "/feedback", {"response_id": raw.parse().id, "reward": 1})
    assert status == 200 and answer["span_id"] == raw.headers["x-lightwire-span-id"]
    status, _ = await post(second, "/feedback", {"session_id": answer["session_id"], "reward": 1})
    assert status == 200


async def test_admin_key_guards_feedback_and_sessions(fake: FakeUpstream, start_proxy) -> None:
    proxy = await start_proxy(fake.url, admin_key="admin-secret", api_keys=("client-key",))
    client = openai.AsyncOpenAI(base_url=proxy.url, api_key="client-key", default_headers={"x-lightwire-session": "s"})
    await client.chat.completions.create(model="m", messages=MESSAGES)
    body = {"session_id": "s", "reward": 1}
    assert (await post(proxy, "/feedback", body))[0] == 401
    assert (await post(proxy, "/feedback", body, Authorization="Bearer client-key"))[0] == 401
    assert (await post(proxy, "/feedback", body, Authorization="Bearer admin-secret"))[0] == 200
    assert (await post(proxy, "/sessions/s/end", {}, Authorization="Bearer client-key"))[0] == 401
    assert (await post(proxy, "/sessions/s/end", {}, Authorization="Bearer admin-secret"))[0] == 200


async def test_sessions_end_by_call_or_when_idle(fake: FakeUpstream, start_proxy) -> None:
    proxy = await start_proxy(fake.url, session_idle_timeout=0.2)
    for session in ("explicit", "quiet"):
        await openai.AsyncOpenAI(
            base_url=proxy.url, api_key="k", default_headers={"x-lightwire-session": session}
        ).chat.completions.create(model="m", messages=MESSAGES)
    status, answer = await post(proxy, "/sessions/explicit/end", {})
    assert status == 200 and answer == {"object": "session", "id": "explicit", "ended": True}
    assert (await post(proxy, "/sessions/never-seen/end", {}))[0] == 404
    await asyncio.sleep(0.5)
    await proxy.stop()
    rows = read_rows(proxy.config.db, "SELECT session_id, end_reason FROM sessions ORDER BY session_id")
    assert rows == [{"session_id": "explicit", "end_reason": "ended"}, {"session_id": "quiet", "end_reason": "idle"}]

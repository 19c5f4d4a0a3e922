"""Reward hooks: span, session and group hooks score real calls through the proxy and write feedback rows."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from optimizers.rewards import json_valid, parse_scores
from proxy import config as settings
from proxy.app import create_app
from proxy.errors import ConfigError
from proxy.feedback import FeedbackDesk
from proxy.hooks import HookRunner
from proxy.sessions import Sessions
from store.feedback import Feedback, SessionEnd
from store.spans import Span
from store.writer import Writer
from tests.conftest import Proxy, read_rows
from tests.fake_upstream import FakeUpstream

JSON_VALID = "optimizers.rewards:json_valid"
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "answer",
        "schema": {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]},
    },
}


# -- hooks these tests name in their settings -------------------------------------------------------------------

NOT_CALLABLE = 3
_flaky_seen: set[str] = set()


async def session_shape(session: dict[str, Any], *, config: settings.Config) -> dict[str, float]:
    """An async session hook taking the config: how many turns it saw, and whether they came in order."""
    turns = [span["turn_index"] for span in session["spans"]]
    return {"turns": len(turns), "in_order": turns == list(range(len(turns))), "group_size": config.group_size}


def broken(span: dict[str, Any]) -> float:
    raise RuntimeError("this hook always fails")


async def flaky(span: dict[str, Any]) -> bool:
    """Fails the first time it sees a span, succeeds the second."""
    if span["span_id"] not in _flaky_seen:
        _flaky_seen.add(span["span_id"])
        raise ConnectionError("judge unreachable, for now")
    return True


RELEASE = threading.Event()


def blocked(session: dict[str, Any]) -> None:
    RELEASE.wait(10)


def reply_length(sessions: list[dict[str, Any]]) -> list[float | None]:
    """A sync group hook: the length of each session's last reply."""
    return [len(s["spans"][-1]["response"]["choices"][0]["message"]["content"]) for s in sessions]


# -- helpers ----------------------------------------------------------------------------------------------------


def base(proxy: Proxy) -> str:
    return proxy.url.removesuffix("/v1")


async def chat(proxy: Proxy, *, session: str | None = None, ask: str = "hi", reply: str | None = None) -> str:
    """One chat call through the proxy; ``reply`` is what the fake upstream answers. Its span id."""
    headers = {"x-lightwire-session": session} if session else {}
    if reply is not None:
        headers["x-fake-content"] = reply
    body = {"model": "m", "messages": [{"role": "user", "content": ask}]}
    async with (
        aiohttp.ClientSession() as http,
        http.post(proxy.url + "/chat/completions", json=body, headers=headers) as r,
    ):
        assert r.status == 200, await r.text()
        return r.headers["x-lightwire-span-id"]


async def end(proxy: Proxy, session: str) -> None:
    async with aiohttp.ClientSession() as http, http.post(base(proxy) + f"/sessions/{session}/end") as r:
        assert r.status == 200


async def settled(proxy: Proxy, *, finished: int, timeout: float = 30.0) -> dict[str, int]:
    """Wait until ``finished`` hook jobs are done or given up and nothing is queued; the hook stats."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(base(proxy) + "/healthz") as r:
                hooks = (await r.json())["hooks"]
            if hooks["done"] + hooks["failed"] >= finished and hooks["queued"] == hooks["running"] == 0:
                return hooks
            assert loop.time() < deadline, f"hooks did not settle: {hooks}"
            await asyncio.sleep(0.05)


def feedback(proxy: Proxy) -> list[dict[str, Any]]:
    return read_rows(proxy.config.db, "SELECT * FROM feedback ORDER BY created_at")


# -- span hooks -------------------------------------------------------------------------------------------------


async def test_json_valid_scores_each_call(fake: FakeUpstream, start_proxy) -> None:
    proxy = await start_proxy(fake.url, span_hooks=(JSON_VALID,))
    expected = {
        await chat(proxy): 0.0,  # "Hello from the fake upstream."
        await chat(proxy, reply='{"answer": 42}'): 1.0,
    }
    async with aiohttp.ClientSession() as http:

        async def call(body: dict[str, Any], reply: str | None = None, **headers: str) -> str:
            if reply is not None:
                headers["x-fake-content"] = reply
            async with http.post(proxy.url + "/chat/completions", json={"model": "m", **body}, headers=headers) as r:
                await r.read()
                return r.headers["x-lightwire-span-id"]

        ask = {"messages": [{"role": "user", "content": "go"}]}
        expected[await call({**ask, "stream": True}, '{"answer": [1, 2]}')] = 1.0
        expected[await call({**ask, "stream": True}, "[1, 2")] = 0.0
        expected[await call({**ask, "response_format": SCHEMA}, '{"answer": 7}')] = 1.0
        expected[await call({**ask, "response_format": SCHEMA}, '{"answer": "seven"}')] = 0.0
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        expected[await call({**ask, "tools": tools})] = 1.0  # the fake calls f with '{"x": 1}'
        await call(ask, **{"x-fake-status": "500"})  # no response: no score, no row
    await settled(proxy, finished=len(expected) + 1)
    await proxy.stop()
    rows = feedback(proxy)
    assert {r["span_id"]: r["value"] for r in rows} == expected
    assert {(r["name"], r["source"]) for r in rows} == {("reward", "hook:" + JSON_VALID)}
    assert all(r["session_id"] for r in rows)


def _call(arguments: str) -> dict[str, Any]:
    return {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}}


@pytest.mark.parametrize(
    ("response", "request_extra", "score"),
    [
        ({"message": {"role": "assistant", "content": '{"a": 1}'}}, {}, 1.0),
        ({"message": {"role": "assistant", "content": "```json\n{}\n```"}}, {}, 0.0),
        ({"message": {"role": "assistant", "content": ""}}, {}, 0.0),
        ({"message": {"role": "assistant", "content": None}}, {}, 0.0),
        ({"message": {"role": "assistant", "content": "NaN"}}, {}, 0.0),
        ({"message": {"role": "assistant", "content": '{"answer": 3}'}}, {"response_format": SCHEMA}, 1.0),
        ({"message": {"role": "assistant", "content": '{"answer": 3.5}'}}, {"response_format": SCHEMA}, 0.0),
        ({"message": {"role": "assistant", "content": "{}"}}, {"response_format": SCHEMA}, 0.0),
        ({"message": {"role": "assistant", "content": "{}"}}, {"response_format": {"type": "json_object"}}, 1.0),
        ({"message": {"role": "assistant", "content": None, "tool_calls": [_call('{"q": "x"}')]}}, {}, 1.0),
        ({"message": {"role": "assistant", "content": None, "tool_calls": [_call('{"q": ')]}}, {}, 0.0),
        ({"message": {"role": "assistant", "content": "{}", "tool_calls": [_call("{}"), _call("oops")]}}, {}, 0.0),
        ({"message": {"role": "assistant", "content": "Let me look.", "tool_calls": [_call("{}")]}}, {}, 0.0),
        ({"text": "[1, 2, 3]"}, {}, 1.0),
    ],
)
def test_json_valid_rules(response: dict, request_extra: dict, score: float) -> None:
    span = {"request": {"model": "m", **request_extra}, "response": {"choices": [response]}}
    assert json_valid(span) == score


def test_json_valid_averages_choices_and_skips_failed_calls() -> None:
    choices = [{"message": {"content": c}} for c in ('{"a": 1}', "no", "[]", "{")]
    assert json_valid({"request": {}, "response": {"choices": choices}}) == 0.5
    assert json_valid({"request": {}, "response": None, "error_type": "upstream_error"}) is None


async def test_a_failing_hook_is_retried_and_logged_while_serving_goes_on(
    fake: FakeUpstream, start_proxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="proxy.hooks")
    hooks = (JSON_VALID, "tests.test_hooks:broken", "tests.test_hooks:flaky")
    proxy = await start_proxy(fake.url, span_hooks=hooks, hook_retries=3)
    spans = [await chat(proxy) for _ in range(3)]  # each call answers 200 while the hooks fail behind it
    stats = await settled(proxy, finished=9)
    assert (stats["done"], stats["failed"]) == (6, 3)
    await proxy.stop()
    rows = feedback(proxy)
    by_source = {(r["source"], r["span_id"]): r["value"] for r in rows}
    assert by_source == {
        **{("hook:" + JSON_VALID, s): 0.0 for s in spans},
        **{("hook:tests.test_hooks:flaky", s): 1.0 for s in spans},
    }
    assert len(rows) == 6  # one row per span even though flaky ran twice
    failures = [r for r in caplog.records if "tests.test_hooks:broken" in r.getMessage()]
    assert [r.levelname for r in failures].count("WARNING") == 3 * 2  # attempts 1 and 2 of each span
    assert [r.levelname for r in failures].count("ERROR") == 3  # given up after attempt 3
    assert all(r.exc_info and "this hook always fails" in str(r.exc_info[1]) for r in failures)


@pytest.mark.parametrize(
    ("kind", "name", "says"),
    [
        ("span_hooks", "json_valid", "module:function"),
        ("span_hooks", "no_such_module_here:score", "cannot import no_such_module_here"),
        ("session_hooks", "tests.test_hooks:missing", "has no function missing"),
        ("group_hooks", "tests.test_hooks:NOT_CALLABLE", "has no function NOT_CALLABLE"),
    ],
)
def test_a_bad_hook_name_stops_start_up(tmp_path: Path, kind: str, name: str, says: str) -> None:
    hooks: dict[str, Any] = {kind: (name,)}
    config = settings.load(environ={}, upstream="http://127.0.0.1:9/v1", db=tmp_path / "db.duckdb", **hooks)
    with pytest.raises(ConfigError, match=re.escape(says)) as caught:
        create_app(config)
    assert name in str(caught.value)


# -- session and group hooks ------------------------------------------------------------------------------------


async def test_a_session_hook_scores_ended_and_idle_sessions(fake: FakeUpstream, start_proxy) -> None:
    proxy = await start_proxy(
        fake.url, session_hooks=("tests.test_hooks:session_shape",), session_idle_timeout=0.3, group_size=5
    )
    for _ in range(3):
        await chat(proxy, session="ended")
    await chat(proxy, session="quiet")
    await end(proxy, "ended")
    await settled(proxy, finished=2)  # "quiet" ends once idle
    await proxy.stop()
    rows = feedback(proxy)
    got = {(r["session_id"], r["name"]): r["value"] for r in rows}
    assert got == {
        ("ended", "turns"): 3.0,
        ("ended", "in_order"): 1.0,
        ("ended", "group_size"): 5.0,
        ("quiet", "turns"): 1.0,
        ("quiet", "in_order"): 1.0,
        ("quiet", "group_size"): 5.0,
    }
    assert all(r["span_id"] is None and r["source"] == "hook:tests.test_hooks:session_shape" for r in rows)


async def test_ruler_judges_a_full_group_through_litellm(
    fake: FakeUpstream, start_proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three sessions of one task are shown to the judge (the fake upstream, through litellm) and scored."""
    monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
    monkeypatch.setenv("OPENAI_API_KEY", "judge-key")
    scores = {"1": 0.2, "2": 0.9, "3": 0.55}
    answer = {"scores": [{"trajectory_id": k, "explanation": "...", "score": v} for k, v in scores.items()]}
    fake.replies["judge"] = "Here are my scores.\n```json\n" + orjson.dumps(answer).decode() + "\n```"
    proxy = await start_proxy(
        fake.url, group_hooks=("optimizers.rewards:ruler",), group_size=3, judge_model="openai/judge"
    )
    replies = {"a": "2 + 2 = 4", "b": "four, I think", "c": "It is 5."}
    for session, reply in replies.items():
        await chat(proxy, session=session, ask="What is 2 + 2?", reply=reply)
    await chat(proxy, session="other", ask="The capital of France?", reply="Paris")
    for session in ("a", "b", "c", "other"):
        await end(proxy, session)
    stats = await settled(proxy, finished=1)
    assert stats["groups_filling"] == 1  # "other" waits for more sessions of its own task
    await proxy.stop()

    judged = [seen for seen in fake.requests if seen.body["model"] == "judge"]
    assert len(judged) == 1 and judged[0].headers["Authorization"] == "Bearer judge-key"
    system, user = judged[0].body["messages"]
    assert "score between 0 and 1" in system["content"] and "What is 2 + 2?" in user["content"]
    blocks = dict(re.findall(r'<trajectory id="(\d)">\n(.*?)\n</trajectory>', user["content"], re.DOTALL))
    session_of = {k: next(s for s, reply in replies.items() if reply in block) for k, block in blocks.items()}
    rows = feedback(proxy)
    assert {r["session_id"]: r["value"] for r in rows} == {session_of[k]: v for k, v in scores.items()}
    assert all(r["source"] == "hook:optimizers.rewards:ruler" and r["name"] == "reward" for r in rows)


async def test_a_partial_group_is_scored_after_the_group_timeout(fake: FakeUpstream, start_proxy) -> None:
    proxy = await start_proxy(fake.url, group_hooks=("tests.test_hooks:reply_length",), group_size=4, group_timeout=0.3)
    await chat(proxy, session="x", ask="same task", reply="abc")
    await chat(proxy, session="y", ask="same task", reply="abcdef")
    await chat(proxy, session="alone", ask="another task")
    for session in ("x", "y", "alone"):
        await end(proxy, session)
    await settled(proxy, finished=1)
    await proxy.stop()
    assert {r["session_id"]: r["value"] for r in feedback(proxy)} == {"x": 3.0, "y": 6.0}


def test_parse_scores_reads_the_shapes_judges_answer_in() -> None:
    assert parse_scores(
        '{"scores": [{"trajectory_id": "2", "score": 0.5}, {"trajectory_id": "1", "score": 2}]}', 2
    ) == [
        1.0,
        0.5,
    ]
    assert parse_scores('Sure!\n{"1": 0.25, "2": 0}\nDone.', 2) == [0.25, 0.0]
    assert parse_scores("[0.1, 0.3]", 2) == [0.1, 0.3]
    with pytest.raises(ValueError, match="no score for trajectories"):
        parse_scores('{"scores": [{"trajectory_id": "trajectory 1", "score": 0.4}]}', 2)
    with pytest.raises(ValueError, match="not JSON"):
        parse_scores("I would rather not say.", 2)


# -- the queue --------------------------------------------------------------------------------------------------


async def test_jobs_past_the_queue_bound_are_dropped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Scoring that falls behind loses scoring jobs, never serving time."""
    config = settings.load(environ={}, session_hooks=("tests.test_hooks:blocked",))
    runner = HookRunner(config, max_jobs=2)
    writer = Writer(tmp_path / "db.duckdb", kinds=[Span, Feedback, SessionEnd])
    writer.open()
    try:
        async with runner.run(writer, FeedbackDesk(writer, Sessions(capacity=1_000))):
            for i in range(10):
                runner.session_ended(f"s{i}")  # never waits
            assert runner.dropped == 8
            RELEASE.set()
    finally:
        RELEASE.set()
        await writer.close()
    assert runner.done == 2
    assert [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()] == [
        "reward hooks: queue full, scoring job for session s2 dropped (1 so far)"
    ]

"""Agents built on real client libraries, pointed at the sidecar only through ``OPENAI_BASE_URL``: the OpenAI
Agents SDK with its defaults (the Responses API) and LangChain (chat completions, and its Responses mode)."""

from __future__ import annotations

import pytest
from agents import Agent, Runner, function_tool
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from tests.conftest import Proxy
from tests.fake_upstream import WORDS, FakeUpstream

TEXT = "".join(WORDS[:5])


@pytest.fixture
def agent_env(proxy: Proxy, monkeypatch: pytest.MonkeyPatch, agent_process: None) -> Proxy:
    """The environment an agent runs in: the sidecar's URL (the key, and tracing to OpenAI's servers off: no
    network here, come with ``agent_process``)."""
    monkeypatch.setenv("OPENAI_BASE_URL", proxy.url)
    return proxy


@function_tool
def lookup(x: int) -> str:
    """Look up the value of x."""
    return f"value of {x} is 42"


async def test_an_agents_sdk_agent_with_tools_over_two_turns(agent_env: Proxy, fake: FakeUpstream) -> None:
    agent = Agent(name="helper", instructions="Be brief.", tools=[lookup])
    first = await Runner.run(agent, "What is x?")  # a tool call, the tool's output, then the answer
    assert first.final_output == TEXT
    second = Runner.run_streamed(agent, [*first.to_input_list(), {"role": "user", "content": "And again?"}])
    async for _ in second.stream_events():
        pass
    assert second.final_output == TEXT
    assert [r.path for r in fake.requests] == ["/v1/responses"] * 4
    outputs = [r.body["input"][-1] for r in fake.requests if r.body["input"][-1].get("type") == "function_call_output"]
    assert [o["output"] for o in outputs] == ["value of 1 is 42"] * 2  # the tool ran on the recorded arguments

    spans = await agent_env.spans()
    assert [s["operation_name"] for s in spans] == ["responses"] * 4
    assert [s["request_stream"] for s in spans] == [False, False, True, True]
    assert all(s["http_status"] == 200 and s["error_type"] is None for s in spans)
    assert len({s["session_id"] for s in spans}) == 1  # one conversation, found from its items alone
    assert [s["turn_index"] for s in spans] == [0, 1, 2, 3]
    calls = [item for s in spans for item in s["response"]["output"] if item["type"] == "function_call"]
    assert [(c["name"], c["arguments"]) for c in calls] == [("lookup", '{"x": 1}')] * 2
    assert all(s["response_id"].startswith("resp_") for s in spans)


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return "sunny"


async def test_langchain_invoke_stream_and_tools_on_both_apis(agent_env: Proxy, fake: FakeUpstream) -> None:
    # One test for both: langchain-openai caches its HTTP client per base URL for the process, and a client made
    # in one test's event loop cannot serve the next test's loop.
    for responses_api in (False, True):
        model = ChatOpenAI(model="gpt-agent", use_responses_api=responses_api, max_retries=0)
        assert (await model.ainvoke("Say hello.")).text == TEXT
        streamed = "".join([chunk.text async for chunk in model.astream("Say hello.")])
        assert streamed == TEXT
        called = await model.bind_tools([get_weather]).ainvoke("Weather in Paris?")
        assert called.tool_calls[0]["name"] == "get_weather"
    assert [r.path for r in fake.requests] == ["/v1/chat/completions"] * 3 + ["/v1/responses"] * 3
    spans = await agent_env.spans()
    assert [s["operation_name"] for s in spans] == ["chat"] * 3 + ["responses"] * 3
    assert [s["request_stream"] for s in spans] == [False, True, False] * 2
    assert all(s["http_status"] == 200 and s["error_type"] is None for s in spans)
    assert spans[5]["response"]["output"][0]["name"] == "get_weather"

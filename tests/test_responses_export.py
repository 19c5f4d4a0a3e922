"""Datasets from Responses calls have the shape of chat records (messages, completion, token ids, reward), with
the whole conversation rebuilt from the spans of the calls they continue."""

from __future__ import annotations

from typing import Any

import aiohttp
import duckdb
import openai

from store import export
from tests.conftest import Proxy
from tests.fake_responses import LOGPROB, PROMPT_IDS
from tests.fake_upstream import WORDS

TOOLS = [{"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}]
TEXT = "".join(WORDS[:5])


def dataset(proxy: Proxy) -> list[dict[str, Any]]:
    with duckdb.connect(str(proxy.config.db), read_only=True) as con:
        return list(export.records(con, export.Options(session_split=0.0)))


async def reward(proxy: Proxy, response_id: str, value: float) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(proxy.url.removesuffix("/v1") + "/feedback", json={"response_id": response_id, "reward": value}),
    ):
        pass


async def test_a_tool_using_turn_and_its_follow_up_become_chat_records(proxy: Proxy) -> None:
    sdk = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
    first = await sdk.responses.create(model="m", instructions="Be brief.", input="What is x?", tools=TOOLS)
    call = first.output[0]
    history: list[Any] = [{"role": "user", "content": "What is x?"}, call.model_dump()]
    history.append({"type": "function_call_output", "call_id": call.call_id, "output": "42"})  # type: ignore[union-attr]
    second = await sdk.responses.create(model="m", instructions="Be brief.", input=history, tools=TOOLS, store=False)
    await reward(proxy, second.id, 1.0)
    await proxy.stop()

    records = dataset(proxy)
    assert [r["ability"] for r in records] == ["responses", "responses"]
    system, user = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is x?"}
    tool_call = {"id": call.call_id, "type": "function", "function": {"name": "lookup", "arguments": '{"x": 1}'}}  # type: ignore[union-attr]
    assistant = {"role": "assistant", "content": None, "tool_calls": [tool_call]}
    assert records[0]["messages"] == [system, user]
    assert records[0]["completion"] == [{"role": "assistant", "content": None, "tool_calls": [tool_call]}]
    tool = {"role": "tool", "tool_call_id": call.call_id, "content": "42"}  # type: ignore[union-attr]
    assert records[1]["messages"] == [system, user, assistant, tool]
    assert records[1]["completion"] == [{"role": "assistant", "content": TEXT}]
    assert records[1]["reward"] == 1.0 and records[0]["session_id"] == records[1]["session_id"]


async def test_a_previous_response_id_chain_is_rebuilt_from_the_spans(proxy: Proxy) -> None:
    sdk = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
    one = await sdk.responses.create(model="m", input="one")
    two = await sdk.responses.create(model="m", input="two", previous_response_id=one.id)
    await sdk.responses.create(model="m", input="three", previous_response_id=two.id, instructions="Now brief.")
    await proxy.stop()
    records = dataset(proxy)
    said = {"role": "assistant", "content": TEXT}
    assert records[2]["messages"] == [
        {"role": "system", "content": "Now brief."},
        {"role": "user", "content": "one"},
        said,
        {"role": "user", "content": "two"},
        said,
        {"role": "user", "content": "three"},
    ]
    assert records[1]["messages"] == [{"role": "user", "content": "one"}, said, {"role": "user", "content": "two"}]


async def test_a_conversation_is_rebuilt_from_its_earlier_calls(proxy: Proxy) -> None:
    sdk = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
    for text in ("one", "two"):
        await sdk.responses.create(model="m", input=text, extra_body={"conversation": "conv_7"})
    await proxy.stop()
    said = {"role": "assistant", "content": TEXT}
    assert dataset(proxy)[1]["messages"] == [
        {"role": "user", "content": "one"},
        said,
        {"role": "user", "content": "two"},
    ]


async def test_vllm_token_ids_and_logprobs_reach_the_record(vllm_proxy: Proxy) -> None:
    sdk = openai.AsyncOpenAI(base_url=vllm_proxy.url, api_key="k", max_retries=0)
    await sdk.responses.create(model="m", input="hi", stream=True)
    await vllm_proxy.stop()
    [record] = dataset(vllm_proxy)
    assert record["prompt_token_ids"] == PROMPT_IDS and record["completion_token_ids"] == [100, 101, 102, 103, 104]
    assert record["completion_logprobs"] == [LOGPROB] * 5
    assert record["completion"] == [{"role": "assistant", "content": TEXT}]

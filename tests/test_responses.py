"""The Responses API through the sidecar, as the openai SDK uses it: relayed, typed event streams kept intact,
recorded as spans, token ids asked of vLLM and hidden, sessions continued by ``previous_response_id`` and
``conversation``, feedback on ``resp_`` ids, and provider models through litellm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from proxy import config as settings
from tests.conftest import Proxy, read_rows
from tests.fake_responses import LOGPROB, PROMPT_IDS
from tests.fake_upstream import WORDS, FakeUpstream

TOOLS = [{"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}]
TEXT = "".join(WORDS[:5])


def client(proxy: Proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url, api_key="sk-agent", max_retries=0)


async def raw_stream(proxy: Proxy, body: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    async with (
        aiohttp.ClientSession() as http,
        http.post(proxy.url + "/responses", json={**body, "stream": True}, headers=headers) as resp,
    ):
        assert resp.status == 200
        return await resp.read()


async def test_a_response_is_relayed_and_recorded(proxy: Proxy, fake: FakeUpstream) -> None:
    raw = await client(proxy).responses.with_raw_response.create(
        model="gpt-test", input="Say hello.", instructions="Be brief.", max_output_tokens=20, temperature=0.3
    )
    response = raw.parse()
    assert response.output_text == TEXT and response.id.startswith("resp_")
    [span] = await proxy.spans()
    assert span["span_id"] == raw.headers["x-lightwire-span-id"]
    assert (span["operation_name"], span["provider_name"], span["response_id"]) == ("responses", "openai", response.id)
    assert span["request"]["input"] == "Say hello." and span["request"]["instructions"] == "Be brief."
    assert span["response"]["output"][0]["content"][0]["text"] == TEXT
    assert (span["usage_input_tokens"], span["usage_output_tokens"]) == (4, 5)
    assert (span["request_max_tokens"], span["request_temperature"]) == (20, 0.3)
    assert span["response_finish_reasons"] == ["completed"] and span["http_status"] == 200
    assert span["prompt_token_ids"] is None  # not vLLM: nothing asked of it
    assert fake.requests[0].body == {
        "model": "gpt-test",
        "input": "Say hello.",
        "instructions": "Be brief.",
        "max_output_tokens": 20,
        "temperature": 0.3,
    }


async def test_a_typed_event_stream_reaches_the_client_byte_for_byte_and_is_reassembled(
    proxy: Proxy, fake: FakeUpstream
) -> None:
    received = await raw_stream(proxy, {"model": "m", "input": "hi"})
    assert received.count(b"event: response.output_text.delta\ndata: ") == 5  # each event keeps its type line
    kinds = [e.type async for e in await client(proxy).responses.create(model="m", input="hi", stream=True)]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 5
    spans = await proxy.spans()
    assert all(s["request_stream"] and s["http_status"] == 200 and s["error_type"] is None for s in spans)
    assert spans[0]["response"]["output"][0]["content"][0]["text"] == TEXT
    assert spans[0]["response"]["status"] == "completed" and spans[0]["usage_output_tokens"] == 5
    assert 0 < spans[0]["time_to_first_chunk_ms"] <= spans[0]["duration_ms"]


async def test_streamed_function_call_arguments_are_recorded_as_the_call(proxy: Proxy) -> None:
    stream = await client(proxy).responses.create(model="m", input="look it up", tools=TOOLS, stream=True)
    deltas = [e.delta async for e in stream if e.type == "response.function_call_arguments.delta"]
    assert "".join(deltas) == '{"x": 1}'
    [span] = await proxy.spans()
    [item] = span["response"]["output"]
    assert (item["type"], item["name"], item["arguments"]) == ("function_call", "lookup", '{"x": 1}')


async def test_a_stream_cut_short_is_recorded_with_what_arrived(proxy: Proxy) -> None:
    received = await raw_stream(proxy, {"model": "m", "input": "hi"}, {"x-fake-truncate-after": "2"})
    assert b'"code":"truncated_stream"' in received  # the client is told, in the stream
    [span] = await proxy.spans()
    assert span["error_type"] == "truncated_stream"
    assert span["response"]["output"][0]["content"][0]["text"] == "".join(WORDS[:2])


async def test_upstream_errors_keep_their_status_and_a_bad_input_is_refused(proxy: Proxy, fake: FakeUpstream) -> None:
    with pytest.raises(openai.RateLimitError):
        await client(proxy).responses.create(model="m", input="hi", extra_headers={"x-fake-status": "429"})
    with pytest.raises(openai.BadRequestError, match="input"):
        await client(proxy).responses.create(model="m", input=7)  # type: ignore[arg-type]
    assert len(fake.requests) == 1  # the bad request never left the sidecar
    [span] = await proxy.spans()
    assert (span["http_status"], span["error_type"]) == (429, "429")


@pytest.mark.parametrize("stream", [False, True])
async def test_vllm_token_ids_and_logprobs_are_recorded_and_hidden(
    vllm_proxy: Proxy, vllm_fake: FakeUpstream, stream: bool
) -> None:
    if stream:
        received = await raw_stream(vllm_proxy, {"model": "m", "input": "hi"})
        assert b"output_messages" not in received and str(LOGPROB).encode() not in received
    else:
        async with (
            aiohttp.ClientSession() as http,
            http.post(vllm_proxy.url + "/responses", json={"model": "m", "input": "hi"}) as resp,
        ):
            seen = await resp.json()
        assert "input_messages" not in seen and "output_messages" not in seen
        assert seen["output"][0]["content"][0]["logprobs"] is None
    sent = vllm_fake.requests[0].body
    assert sent["enable_response_messages"] is True and sent["include"] == ["message.output_text.logprobs"]
    [span] = await vllm_proxy.spans()
    assert span["provider_name"] == "vllm"
    assert span["prompt_token_ids"] == PROMPT_IDS and span["completion_token_ids"] == [[100, 101, 102, 103, 104]]
    assert span["completion_logprobs"] == [[LOGPROB] * 5]
    assert "output_messages" not in span["response"]  # the record holds what the client saw, ids in their columns


async def test_a_client_that_asks_for_logprobs_gets_them(vllm_proxy: Proxy) -> None:
    response = await client(vllm_proxy).responses.create(
        model="m", input="hi", include=["message.output_text.logprobs"]
    )
    assert [lp.logprob for lp in response.output[0].content[0].logprobs] == [LOGPROB] * 5  # type: ignore[union-attr]


async def test_previous_response_id_continues_the_session_even_after_a_restart(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    config = settings.load(environ={}, upstream=fake.url, db=tmp_path / "spans.duckdb")
    first = await Proxy(config).start()
    opening = await client(first).responses.create(model="m", input="hi")
    follow = await client(first).responses.create(model="m", input="more", previous_response_id=opening.id)
    await first.stop()
    again = await Proxy(config).start()  # knows nothing in memory: the store says which session it was
    last = await client(again).responses.create(model="m", input="and more", previous_response_id=follow.id)
    other = await client(again).responses.create(model="m", input="unrelated")
    spans = await again.spans()
    assert [s["response_id"] for s in spans] == [opening.id, follow.id, last.id, other.id]
    assert len({s["session_id"] for s in spans[:3]}) == 1 and spans[3]["session_id"] != spans[0]["session_id"]
    assert [s["session_source"] for s in spans] == ["new", "previous_response", "previous_response", "new"]
    assert [s["turn_index"] for s in spans] == [0, 1, 2, 0]


async def test_a_conversation_id_is_the_session_and_the_header_still_wins(proxy: Proxy) -> None:
    for _ in range(2):
        await client(proxy).responses.create(model="m", input="hi", extra_body={"conversation": "conv_42"})
    await client(proxy).responses.create(
        model="m",
        input="hi",
        extra_body={"conversation": {"id": "conv_42"}},
        extra_headers={"x-lightwire-session": "mine"},
    )
    spans = await proxy.spans()
    assert [(s["session_id"], s["session_source"], s["turn_index"]) for s in spans] == [
        ("conv_42", "conversation", 0),
        ("conv_42", "conversation", 1),
        ("mine", "header", 0),
    ]


async def test_agents_sending_the_whole_history_are_linked_into_one_session(proxy: Proxy) -> None:
    """Without previous_response_id, a call whose input continues an earlier call's input and output joins it."""
    sdk = client(proxy)
    first = await sdk.responses.create(model="m", input=[{"role": "user", "content": "q"}], tools=TOOLS)
    history = [{"role": "user", "content": "q"}, *[item.model_dump() for item in first.output]]
    call = first.output[0]
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "42"}  # type: ignore[union-attr]
    await sdk.responses.create(model="m", input=[*history, output], tools=TOOLS)
    await sdk.responses.create(model="m", input=[{"role": "user", "content": "another task"}], tools=TOOLS)
    spans = await proxy.spans()
    assert spans[0]["session_id"] == spans[1]["session_id"] != spans[2]["session_id"]
    assert [s["session_source"] for s in spans] == ["new", "linked", "new"]


async def test_feedback_takes_the_response_id_the_agent_saw(proxy: Proxy) -> None:
    response = await client(proxy).responses.create(model="m", input="hi")
    async with (
        aiohttp.ClientSession() as http,
        http.post(proxy.url[: -len("/v1")] + "/feedback", json={"response_id": response.id, "reward": 1}) as resp,
    ):
        answer = await resp.json()
    assert resp.status == 200
    [span] = await proxy.spans()
    assert answer["span_id"] == span["span_id"] and answer["session_id"] == span["session_id"]
    [feedback] = read_rows(proxy.config.db, "SELECT span_id, value FROM feedback")
    assert feedback == {"span_id": span["span_id"], "value": 1.0}


@pytest.mark.parametrize("stream", [False, True])
async def test_a_provider_model_answers_through_litellm_responses(
    fake: FakeUpstream, start_proxy, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-provider")
    fake.replies["teacher"] = "Answer from the provider."
    proxy = await start_proxy(fake.url, provider_models=("openai/teacher",), routes=("gpt-agent=openai/teacher",))
    sdk = client(proxy)
    if stream:
        events = [e async for e in await sdk.responses.create(model="gpt-agent", input="hi", stream=True)]
        assert events[-1].type == "response.completed"
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    else:
        text = (await sdk.responses.create(model="gpt-agent", input="hi")).output_text
    assert text == "Answer from the provider."
    [sent] = fake.requests
    assert sent.path == "/v1/responses" and sent.body["model"] == "teacher"
    [span] = await proxy.spans()
    assert (span["provider_name"], span["operation_name"], span["http_status"]) == ("litellm", "responses", 200)
    assert span["response"]["output"][0]["content"][0]["text"] == text and span["response_id"]

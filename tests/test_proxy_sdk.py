"""The proxy as an agent sees it: the official openai SDK, sync and async, streaming or not, with tools."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from tests.conftest import Proxy
from tests.fake_upstream import PROMPT_IDS, WORDS, FakeUpstream

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
TOOLS = [
    {
        "type": "function",
        "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}},
    }
]


def client(proxy: Proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url, api_key="sk-agent", max_retries=0)


async def test_chat_non_streaming_is_relayed_and_recorded(proxy: Proxy, fake: FakeUpstream) -> None:
    raw = await client(proxy).chat.completions.with_raw_response.create(
        model="gpt-test", messages=MESSAGES, temperature=0.3, max_tokens=20
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "".join(WORDS[:5])
    span_id = raw.headers["x-lightwire-span-id"]

    [span] = await proxy.spans()
    assert span["span_id"] == span_id
    assert span["response_id"] == completion.id
    assert span["operation_name"] == "chat" and span["provider_name"] == "openai"
    assert span["request_model"] == "gpt-test" and span["response_model"] == "gpt-test"
    assert span["request"]["messages"] == MESSAGES
    assert span["response"]["choices"][0]["message"]["content"] == completion.choices[0].message.content
    assert (span["usage_input_tokens"], span["usage_output_tokens"]) == (4, 5)
    assert span["request_temperature"] == 0.3 and span["request_max_tokens"] == 20
    assert span["http_status"] == 200 and span["error_type"] is None and span["request_stream"] is False
    assert span["response_finish_reasons"] == ["stop"]
    assert span["duration_ms"] > 0 and span["time_to_first_chunk_ms"] is None
    assert span["prompt_token_ids"] is None  # a plain OpenAI-compatible upstream: nothing asked of it
    # The agent's key reached the upstream (no client keys configured), unchanged.
    assert fake.requests[0].headers["Authorization"] == "Bearer sk-agent"


async def test_chat_stream_is_relayed_chunk_by_chunk_and_reassembled(proxy: Proxy) -> None:
    stream = await client(proxy).chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
    pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
    assert "".join(p for p in pieces if p) == "".join(WORDS[:5])

    [span] = await proxy.spans()
    assert span["request_stream"] is True and span["http_status"] == 200 and span["error_type"] is None
    assert span["response"]["object"] == "chat.completion"
    assert span["response"]["choices"][0]["message"] == {"role": "assistant", "content": "".join(WORDS[:5])}
    assert span["time_to_first_chunk_ms"] is not None
    assert 0 < span["time_to_first_chunk_ms"] <= span["duration_ms"]


async def test_sync_sdk_streaming_and_not(proxy: Proxy) -> None:
    sync = openai.OpenAI(base_url=proxy.url, api_key="k", max_retries=0)

    def calls() -> tuple[str, str]:
        whole = sync.chat.completions.create(model="m", messages=MESSAGES)
        stream = sync.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return whole.choices[0].message.content or "", text

    whole, streamed = await asyncio.to_thread(calls)
    assert whole == streamed == "".join(WORDS[:5])
    spans = await proxy.spans()
    assert [s["request_stream"] for s in spans] == [False, True]


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_calls_pass_through_and_stream_deltas_are_reassembled(proxy: Proxy, stream: bool) -> None:
    sdk = client(proxy)
    if stream:
        chunks = [
            c async for c in await sdk.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS, stream=True)
        ]
        arguments = "".join(
            tc.function.arguments or "" for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []
        )
        assert arguments == '{"x": 1}'
    else:
        done = await sdk.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
        assert done.choices[0].message.tool_calls[0].function.name == "lookup"  # type: ignore[index]
    [span] = await proxy.spans()
    assert span["request"]["tools"] == TOOLS
    [call] = span["response"]["choices"][0]["message"]["tool_calls"]
    assert call["id"] == "call_0" and call["type"] == "function"
    assert call["function"] == {"name": "lookup", "arguments": '{"x": 1}'}
    assert span["response_finish_reasons"] == ["tool_calls"]


async def test_n_choices_response_format_and_unknown_fields_reach_the_upstream_unchanged(
    proxy: Proxy, fake: FakeUpstream
) -> None:
    extra = {"response_format": {"type": "json_object"}, "seed": 7, "some_new_field": {"nested": [1, 2]}}
    done = await client(proxy).chat.completions.create(model="m", messages=MESSAGES, n=2, extra_body=extra)
    assert [c.index for c in done.choices] == [0, 1]
    sent = fake.requests[0].body
    assert {k: sent[k] for k in extra} == extra and sent["n"] == 2
    assert "return_token_ids" not in sent and "logprobs" not in sent  # nothing added for a non-vLLM upstream
    [span] = await proxy.spans()
    assert len(span["response"]["choices"]) == 2


@pytest.mark.parametrize("stream", [False, True])
async def test_completions_endpoint(proxy: Proxy, stream: bool) -> None:
    sdk = client(proxy)
    if stream:
        text = "".join(
            [
                c.choices[0].text
                async for c in await sdk.completions.create(model="m", prompt="Hi", stream=True)
                if c.choices
            ]
        )
    else:
        text = (await sdk.completions.create(model="m", prompt="Hi")).choices[0].text
    assert text == "".join(WORDS[:5])
    [span] = await proxy.spans()
    assert span["operation_name"] == "text_completion"
    assert span["response"]["choices"][0]["text"] == text


@pytest.mark.parametrize("stream", [False, True])
async def test_vllm_token_ids_are_recorded_and_hidden_from_the_client(
    vllm_proxy: Proxy, vllm_fake: FakeUpstream, stream: bool
) -> None:
    sdk = client(vllm_proxy)
    if stream:
        chunks = [c async for c in await sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True)]
        dumped = [c.model_dump() for c in chunks]
        assert all(c["choices"][0]["logprobs"] is None for c in dumped if c["choices"])
        assert all(c.get("usage") is None for c in dumped)  # the client did not ask for usage
        assert not any(c["choices"] == [] for c in dumped)  # the usage-only chunk was not sent on
    else:
        done = await sdk.chat.completions.create(model="m", messages=MESSAGES)
        dumped = [done.model_dump()]
        assert dumped[0]["choices"][0]["logprobs"] is None
    assert not any("token_ids" in str(c) for c in dumped)
    sent = vllm_fake.requests[0].body
    assert sent["return_token_ids"] is True and sent["logprobs"] is True
    [span] = await vllm_proxy.spans()
    assert span["provider_name"] == "vllm"
    assert span["prompt_token_ids"] == PROMPT_IDS
    expected_ids = [200, 201, 202, 203, 204] if stream else [100, 101, 102, 103, 104]
    assert span["completion_token_ids"] == [expected_ids]
    assert span["completion_logprobs"] == [[-0.25] * 5 if stream else [-0.5] * 5]
    assert span["usage_output_tokens"] == 5
    # What is stored as the response is what the client saw.
    assert "token_ids" not in str(span["response"]) and span["response"]["choices"][0]["logprobs"] is None


async def test_vllm_logprobs_the_client_asked_for_are_kept(vllm_proxy: Proxy) -> None:
    done = await client(vllm_proxy).chat.completions.create(model="m", messages=MESSAGES, logprobs=True)
    assert [t.logprob for t in done.choices[0].logprobs.content] == [-0.5] * 5  # type: ignore[union-attr]
    text = await client(vllm_proxy).completions.create(model="m", prompt="Hi", logprobs=1, stream=False)
    assert text.choices[0].logprobs.token_logprobs == [-0.5] * 5  # type: ignore[union-attr]
    spans = await vllm_proxy.spans()
    assert [s["completion_logprobs"] for s in spans] == [[[-0.5] * 5]] * 2


async def test_models_are_listed_from_the_upstream(proxy: Proxy) -> None:
    models = await client(proxy).models.list()
    assert [m.id for m in models.data] == ["fake-model"]


async def test_a_client_that_expects_100_continue_gets_it_from_the_proxy(proxy: Proxy, fake: FakeUpstream) -> None:
    """curl sends ``Expect: 100-continue`` with larger bodies; that is the proxy's to answer, not the backend's."""
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "x" * 4096}]}
    async with (
        aiohttp.ClientSession() as http,
        http.post(proxy.url + "/chat/completions", json=body, expect100=True) as resp,
    ):
        assert resp.status == 200 and (await resp.json())["choices"]
    assert "expect" not in {name.lower() for name in fake.requests[0].headers}

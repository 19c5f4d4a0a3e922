"""Bad input and upstream faults, over raw HTTP: what the client sees, whether the upstream was called, and that
every forwarded call leaves exactly one span."""

from __future__ import annotations

import asyncio
import logging
import socket

import aiohttp
import orjson
import pytest

from tests.conftest import Proxy
from tests.fake_upstream import FakeUpstream

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def post(proxy: Proxy, body: bytes | dict, path: str = "/chat/completions", **headers: str):
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with aiohttp.ClientSession() as http, http.post(proxy.url + path, data=data, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def error_of(body: bytes) -> dict:
    error = orjson.loads(body)["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"]
    return error


async def next_call_works(proxy: Proxy, **headers: str) -> None:
    """A normal call after a fault is answered (bounded, so that a proxy that hangs fails the test)."""
    async with asyncio.timeout(10):
        status, _, content = await post(proxy, CHAT, **headers)
    assert status == 200 and orjson.loads(content)["choices"][0]["message"]["content"] == "Hello from the fake upstream"


async def the_fault_span(proxy: Proxy) -> dict:
    """The fault's span, after checking that it and the normal call after it are the only two."""
    fault, normal = await proxy.spans()
    assert normal["http_status"] == 200 and normal["error_type"] is None
    return fault


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"", None),
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'"a string"', None),
        (orjson.dumps({"messages": CHAT["messages"]}), "model"),
        (orjson.dumps({"model": "m"}), "messages"),
        (orjson.dumps({"model": "m", "messages": []}), "messages"),
        (orjson.dumps({"model": 5, "messages": CHAT["messages"]}), "model"),
    ],
)
async def test_bad_requests_get_400_and_never_reach_the_upstream(
    proxy: Proxy, fake: FakeUpstream, body: bytes, param: str | None
) -> None:
    status, _, content = await post(proxy, body)
    assert status == 400
    error = error_of(content)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert fake.requests == []
    assert await proxy.spans() == []


USER = {"role": "user", "content": "hi"}
WRONG_SHAPES = [
    ("/chat/completions", {"stream": True, "stream_options": 5}, "stream_options"),
    ("/chat/completions", {"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ("/chat/completions", {"messages": [1]}, "messages[0]"),
    ("/chat/completions", {"messages": [{"role": 5, "content": "hi"}]}, "messages[0].role"),
    ("/chat/completions", {"messages": [{"content": "hi"}]}, "messages[0].role"),
    ("/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/chat/completions", {"messages": [{"role": "user", "content": [5]}]}, "messages[0].content[0]"),
    ("/chat/completions", {"messages": [USER, {"role": "assistant", "tool_calls": 5}]}, "messages[1].tool_calls"),
    (
        "/chat/completions",
        {"messages": [USER, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": "f"}]}]},
        "messages[1].tool_calls[0].function",
    ),
    ("/chat/completions", {"n": "x"}, "n"),
    ("/chat/completions", {"n": 0}, "n"),
    ("/chat/completions", {"tools": {}}, "tools"),
    ("/chat/completions", {"tools": [5]}, "tools[0]"),
    ("/chat/completions", {"stream": "yes"}, "stream"),
    ("/chat/completions", {"max_tokens": "10"}, "max_tokens"),
    ("/chat/completions", {"temperature": "hot"}, "temperature"),
    ("/chat/completions", {"stop": 5}, "stop"),
    ("/chat/completions", {"logprobs": 5}, "logprobs"),
    ("/completions", {"prompt": [{}]}, "prompt[0]"),
    ("/completions", {"prompt": "hi", "logprobs": "x"}, "logprobs"),
    ("/completions", {"prompt": "hi", "stream": True, "stream_options": []}, "stream_options"),
]


@pytest.mark.parametrize("capture", [False, True], ids=["openai", "vllm"])
@pytest.mark.parametrize(("path", "fields", "param"), WRONG_SHAPES, ids=[p for _, _, p in WRONG_SHAPES])
async def test_wrong_shapes_get_400_and_never_reach_the_upstream(
    start_proxy, fake: FakeUpstream, vllm_fake: FakeUpstream, path: str, fields: dict, param: str, capture: bool
) -> None:
    """Issue 12, case 10: values of the right JSON type but the wrong shape were a text/plain 500."""
    upstream = vllm_fake if capture else fake
    proxy = await start_proxy(upstream.url)
    status, headers, content = await post(proxy, {**CHAT, **fields}, path)
    assert status == 400 and headers["Content-Type"] == "application/json"
    error = error_of(content)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert upstream.requests == []
    await next_call_works(proxy)
    [span] = await proxy.spans()
    assert span["error_type"] is None


async def test_completions_need_a_prompt(proxy: Proxy, fake: FakeUpstream) -> None:
    status, _, content = await post(proxy, {"model": "m"}, "/completions")
    assert status == 400 and error_of(content)["param"] == "prompt" and fake.requests == []


async def test_oversized_body_gets_413(fake: FakeUpstream, start_proxy) -> None:
    proxy = await start_proxy(fake.url, max_body_mb=0.01)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 20_000}]}
    status, _, content = await post(proxy, big)
    assert status == 413 and error_of(content)["code"] == "request_too_large"
    assert fake.requests == []
    await next_call_works(proxy)
    [span] = await proxy.spans()  # the normal call's: a refused request leaves none
    assert span["error_type"] is None


async def test_unknown_path_and_method_answer_in_openai_shape(proxy: Proxy) -> None:
    root = proxy.url.removesuffix("/v1")
    async with aiohttp.ClientSession() as http:
        async with http.get(root + "/nothing-here") as resp:  # paths under /v1/ go to the backend (test_passthrough)
            assert resp.status == 404 and error_of(await resp.read())["code"] == "not_found"
        async with http.get(root + "/feedback") as resp:
            assert resp.status == 405 or resp.status == 400
            error_of(await resp.read())


async def test_upstream_refusing_connections_gives_502_and_a_span(start_proxy) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    proxy = await start_proxy(f"http://127.0.0.1:{port}/v1")
    status, headers, content = await post(proxy, CHAT)
    assert status == 502 and error_of(content)["type"] == "upstream_error"
    [span] = await proxy.spans()
    assert span["span_id"] == headers["x-lightwire-span-id"]
    assert span["http_status"] == 502 and span["error_type"] == "bad_gateway"


async def test_upstream_timeout_before_headers_gives_504_and_closes_the_upstream_call(
    fake: FakeUpstream, start_proxy
) -> None:
    proxy = await start_proxy(fake.url, first_byte_timeout=0.3)
    status, _, content = await post(proxy, CHAT, **{"x-fake-delay": "5"})
    assert status == 504 and error_of(content)["code"] == "upstream_timeout"
    await asyncio.sleep(0.1)
    assert fake.disconnects == 1
    await next_call_works(proxy)
    span = await the_fault_span(proxy)
    assert span["http_status"] == 504 and span["error_type"] == "upstream_timeout"


@pytest.mark.parametrize("status", [400, 429, 500, 503])
async def test_upstream_errors_pass_through_with_body_and_retry_after(proxy: Proxy, status: int) -> None:
    got, headers, content = await post(proxy, CHAT, **{"x-fake-status": str(status), "x-fake-retry-after": "7"})
    assert got == status and headers["Retry-After"] == "7"
    assert orjson.loads(content)["error"]["message"] == f"fake failure {status}"
    [span] = await proxy.spans()
    assert span["http_status"] == status and span["error_type"] == str(status)
    assert "fake failure" in span["error_message"]


async def test_client_gone_before_the_first_token_cancels_the_upstream_call(proxy: Proxy, fake: FakeUpstream) -> None:
    async with aiohttp.ClientSession() as http:
        request = http.post(
            proxy.url + "/chat/completions", json={**CHAT, "stream": True}, headers={"x-fake-delay": "10"}
        )
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await request
    for _ in range(50):
        if fake.disconnects:
            break
        await asyncio.sleep(0.02)
    assert fake.disconnects == 1  # the upstream saw its request closed at once, not after 10 s
    await next_call_works(proxy)
    span = await the_fault_span(proxy)
    assert span["http_status"] == 499 and span["error_type"] == "client_disconnected"
    assert span["duration_ms"] < 2000


async def test_client_gone_mid_stream_cancels_the_upstream_and_keeps_the_partial_answer(
    proxy: Proxy, fake: FakeUpstream
) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            proxy.url + "/chat/completions",
            json={**CHAT, "stream": True},
            headers={"x-fake-chunks": "100", "x-fake-chunk-delay": "0.05"},
        )
        received = b""
        while received.count(b"\n\n") < 3:
            received += await resp.content.readany()
        resp.close()
    for _ in range(50):
        if fake.disconnects:
            break
        await asyncio.sleep(0.02)
    assert fake.disconnects == 1
    await next_call_works(proxy)
    span = await the_fault_span(proxy)
    assert span["http_status"] == 499 and span["error_type"] == "client_disconnected"
    content = span["response"]["choices"][0]["message"]["content"]
    assert content.startswith("Hello from the") and span["response_finish_reasons"] is None


@pytest.mark.parametrize(
    ("header", "error_type"),
    [
        ("x-fake-stall-after", "timeout"),
        ("x-fake-truncate-after", "truncated_stream"),
        ("x-fake-drop-after", "truncated_stream"),
        ("x-fake-garble-after", "invalid_stream"),
    ],
)
async def test_broken_streams_end_with_an_error_event_and_are_recorded(
    fake: FakeUpstream, start_proxy, header: str, error_type: str
) -> None:
    proxy = await start_proxy(fake.url, chunk_timeout=0.5)
    status, _, content = await post(proxy, {**CHAT, "stream": True}, **{header: "2"})
    assert status == 200
    events = [e for e in content.split(b"\n\n") if e]
    assert len(events) == 3  # two good chunks, then the error
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == error_type
    assert b"data: [DONE]" not in content
    await next_call_works(proxy)
    span = await the_fault_span(proxy)
    assert span["error_type"] == error_type and span["http_status"] == 200
    assert span["response"]["choices"][0]["message"]["content"] == "Hello from"


async def test_client_api_keys(fake: FakeUpstream, start_proxy, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = await start_proxy(fake.url, api_keys=("lw-key-one", "lw-key-two"), upstream_api_key="sk-upstream-secret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "lw-key-one"}):
        status, _, content = await post(proxy, CHAT, **headers)
        assert status == 401 and error_of(content)["code"] == "invalid_api_key"
    assert fake.requests == []
    status, _, _ = await post(proxy, CHAT, Authorization="Bearer lw-key-two")
    assert status == 200
    # The client's key is Lightwire's: the upstream gets its own credentials instead.
    assert fake.requests[0].headers["Authorization"] == "Bearer sk-upstream-secret"
    async with aiohttp.ClientSession() as http, http.get(proxy.url.removesuffix("/v1") + "/healthz") as resp:
        assert resp.status == 200  # health needs no key
    await proxy.spans()
    stored = proxy.config.db.read_bytes()
    for secret in (b"lw-key-two", b"sk-upstream-secret", b"lw-key-one"):
        assert secret not in stored
        assert secret.decode() not in caplog.text

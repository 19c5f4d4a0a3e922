"""The request path's fault matrix: for each fault, what the client sees, what the store keeps (exactly one span
for a forwarded call, none for a refused request), and that the next normal call still works.

Rows already covered in ``test_proxy_faults.py`` (timeouts before headers and mid-stream, truncated and dropped
streams, client gone) are not repeated here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy import protocol
from proxy.app import errors_middleware
from tests.conftest import Proxy, read_rows
from tests.fake_upstream import FakeUpstream
from tests.test_proxy_faults import CHAT, error_of, next_call_works, post, the_fault_span

STREAM = {**CHAT, "stream": True}
WHOLE = "Hello from the fake upstream"  # the content of the fake's five-chunk stream


# -- malformed upstream answers ---------------------------------------------------------------------------

CHUNK = '{"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,%s}]}'
MALFORMED_CHUNKS = {
    "delta a string": (CHUNK % '"delta":"oops"', "choices[0].delta"),
    "choices a number": ('{"id":"c1","choices":5}', "choices"),
    "a choice a string": ('{"choices":["x"]}', "choices[0]"),
    "index a string": (CHUNK.replace('"index":0', '"index":"0"') % '"delta":{}', "choices[0].index"),
    "index negative": (CHUNK.replace('"index":0', '"index":-1') % '"delta":{}', "choices[0].index"),
    "content a number": (CHUNK % '"delta":{"content":5}', "choices[0].delta.content"),
    "content an array": (CHUNK % '"delta":{"content":["x"]}', "choices[0].delta.content"),
    "tool_calls a number": (CHUNK % '"delta":{"tool_calls":5}', "choices[0].delta.tool_calls"),
    "tool call index huge": (
        CHUNK % '"delta":{"tool_calls":[{"index":100000,"function":{"arguments":"x"}}]}',
        "choices[0].delta.tool_calls[0].index",
    ),
    "function a string": (
        CHUNK % '"delta":{"tool_calls":[{"index":0,"function":"f"}]}',
        "choices[0].delta.tool_calls[0].function",
    ),
    "arguments a number": (
        CHUNK % '"delta":{"tool_calls":[{"index":0,"function":{"arguments":5}}]}',
        "choices[0].delta.tool_calls[0].function.arguments",
    ),
    "logprobs a string": (CHUNK % '"delta":{},"logprobs":"x"', "choices[0].logprobs"),
    "logprob entry a number": (CHUNK % '"delta":{},"logprobs":{"content":[5]}', "choices[0].logprobs.content[0]"),
    "logprob missing": (
        CHUNK % '"delta":{},"logprobs":{"content":[{"token":"x"}]}',
        "choices[0].logprobs.content[0].logprob",
    ),
    "token_ids a string": (CHUNK % '"delta":{},"token_ids":"abc"', "choices[0].token_ids"),
    "finish_reason a number": (CHUNK % '"delta":{},"finish_reason":5', "choices[0].finish_reason"),
    "usage a string": ('{"id":"c1","choices":[],"usage":"x"}', "usage"),
    "usage count a string": ('{"id":"c1","choices":[],"usage":{"prompt_tokens":"4"}}', "usage.prompt_tokens"),
    "id a number": ('{"id":5,"choices":[]}', "id"),
    "prompt_token_ids an object": ('{"id":"c1","choices":[],"prompt_token_ids":{"a":1}}', "prompt_token_ids"),
}


@pytest.mark.parametrize("capture", [False, True], ids=["openai", "vllm"])
@pytest.mark.parametrize(("raw", "where"), MALFORMED_CHUNKS.values(), ids=MALFORMED_CHUNKS.keys())
async def test_malformed_chunk_is_relayed_and_recorded(
    start_proxy, fake: FakeUpstream, vllm_fake: FakeUpstream, raw: str, where: str, capture: bool
) -> None:
    proxy = await start_proxy((vllm_fake if capture else fake).url)
    status, _, content = await post(proxy, STREAM, **{"x-fake-insert": raw})
    assert status == 200
    assert b"data: " + raw.encode() + b"\n\n" in content  # the client gets what the upstream sent
    assert content.endswith(b"data: [DONE]\n\n")
    await next_call_works(proxy)
    span = await the_fault_span(proxy)
    assert span["http_status"] == 200 and span["error_type"] == "malformed_chunk"
    assert where in span["error_message"]
    # what could be read is kept: the well-formed chunks' content, in full
    assert span["response"]["choices"][0]["message"]["content"] == WHOLE
    assert span["response_finish_reasons"] == ["stop"]


async def test_malformed_completion_chunk(proxy: Proxy) -> None:
    raw = '{"id":"c1","choices":[{"index":0,"text":5}]}'
    body = {"model": "m", "prompt": "hi", "stream": True}
    status, _, content = await post(proxy, body, "/completions", **{"x-fake-insert": raw})
    assert status == 200 and raw.encode() in content
    await next_call_works(proxy)
    span = await the_fault_span(proxy)
    assert span["error_type"] == "malformed_chunk" and "choices[0].text" in span["error_message"]
    assert span["response"]["choices"][0]["text"] == WHOLE


def test_reassembly_keeps_the_last_value_of_a_field_that_changes_type() -> None:
    deltas = [{"reasoning": 5}, {"reasoning": "a"}, {"reasoning": "b"}]
    chunks = [{"id": "c1", "choices": [{"index": 0, "delta": delta}]} for delta in deltas]
    response = protocol.reassemble(protocol.CHAT, chunks)
    assert response is not None and response["choices"][0]["message"]["reasoning"] == "ab"


@pytest.mark.parametrize("raw", ["[1, 2]", "5", '"text"', "null"])
async def test_stream_event_that_is_not_an_object_ends_the_stream(proxy: Proxy, raw: str) -> None:
    status, _, content = await post(proxy, STREAM, **{"x-fake-insert": raw})
    assert status == 200
    events = [e for e in content.split(b"\n\n") if e]
    assert len(events) == 2 and orjson.loads(events[-1].removeprefix(b"data: "))["error"]["code"] == "invalid_stream"
    await next_call_works(proxy)
    span = await the_fault_span(proxy)
    assert span["error_type"] == "invalid_stream" and span["response"]["choices"][0]["message"]["content"] == "Hello"


async def test_malformed_chunks_never_use_up_the_store_queue(fake: FakeUpstream, start_proxy) -> None:
    """Issue 12, case 1: each stream with a bad chunk kept its place in the store's queue, so with
    ``max_pending_spans`` 2 the third call and every one after it waited forever."""
    proxy = await start_proxy(fake.url, max_pending_spans=2)
    oops = CHUNK % '"delta":"oops"'
    for _ in range(4):
        async with asyncio.timeout(10):
            status, _, _ = await post(proxy, STREAM, **{"x-fake-insert": oops, "x-fake-insert-after": "0"})
        assert status == 200
    await next_call_works(proxy)
    spans = await proxy.spans()
    assert [s["error_type"] for s in spans] == ["malformed_chunk"] * 4 + [None]


MALFORMED_BODIES = {
    "not JSON": ("not json", "not JSON"),
    "an array": ("[1]", "not a JSON object"),
    "no choices": ('{"id":"c1"}', "choices"),
    "choices a number": ('{"id":"c1","choices":5}', "choices"),
    "a choice a number": ('{"id":"c1","choices":[5]}', "choices[0]"),
    "message a string": ('{"id":"c1","choices":[{"index":0,"message":"x"}]}', "choices[0].message"),
    "tool_calls a number": (
        '{"id":"c1","choices":[{"index":0,"message":{"role":"assistant","tool_calls":5}}]}',
        "choices[0].message.tool_calls",
    ),
    "usage a string": ('{"id":"c1","choices":[],"usage":"x"}', "usage"),
}


@pytest.mark.parametrize("capture", [False, True], ids=["openai", "vllm"])
@pytest.mark.parametrize(("raw", "where"), MALFORMED_BODIES.values(), ids=MALFORMED_BODIES.keys())
async def test_malformed_body_is_relayed_and_recorded(
    start_proxy, fake: FakeUpstream, vllm_fake: FakeUpstream, raw: str, where: str, capture: bool
) -> None:
    proxy = await start_proxy((vllm_fake if capture else fake).url)
    status, _, content = await post(proxy, CHAT, **{"x-fake-insert": raw})
    assert status == 200 and content == raw.encode()
    await next_call_works(proxy)
    span = await the_fault_span(proxy)
    assert span["http_status"] == 200 and span["error_type"] == "invalid_response"
    assert where in span["error_message"]


# -- the upstream's connection breaks or stalls --------------------------------------------------------------


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A port that takes no connection: its listen backlog is full, so a connect waits until it times out."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        waiting = [socket.socket() for _ in range(4)]
        try:
            for s in waiting:
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect(("127.0.0.1", port))
            yield port
        finally:
            for s in waiting:
                s.close()


async def test_connect_timeout_gives_502_and_a_span(start_proxy) -> None:
    with unanswered_port() as port:
        proxy = await start_proxy(f"http://127.0.0.1:{port}/v1", connect_timeout=0.3)
        status, headers, content = await post(proxy, CHAT)
    assert status == 502 and "within 0.3 s" in error_of(content)["message"]
    [span] = await proxy.spans()
    assert span["span_id"] == headers["x-lightwire-span-id"]
    assert span["http_status"] == 502 and span["error_type"] == "bad_gateway"


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ("reset-before-headers", 502, "bad_gateway"),
        ("reset-mid-body", 502, "bad_gateway"),
        ("stall-mid-body", 504, "upstream_timeout"),
    ],
)
async def test_upstream_breaking_a_whole_body(
    fake: FakeUpstream, start_proxy, fault: str, status: int, code: str
) -> None:
    proxy = await start_proxy(fake.url, chunk_timeout=0.5)
    got, headers, content = await post(proxy, CHAT, **{"x-fake-fault": fault})
    assert got == status and error_of(content)["code"] == code
    await next_call_works(proxy)
    span = await the_fault_span(proxy)
    assert span["span_id"] == headers["x-lightwire-span-id"]
    assert span["http_status"] == status and span["error_type"] == code and span["response"] is None
    if fault == "stall-mid-body":
        assert fake.disconnects == 1  # the stalled upstream call was closed, not left open


# -- the client's request -----------------------------------------------------------------------------------


async def test_oversized_chunked_body_gets_413(fake: FakeUpstream, start_proxy) -> None:
    """Without a Content-Length the limit still holds, counted as the body arrives."""
    proxy = await start_proxy(fake.url, max_body_mb=0.01)

    async def chunks():
        yield orjson.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 20_000}]})

    async with aiohttp.ClientSession() as http, http.post(proxy.url + "/chat/completions", data=chunks()) as resp:
        assert resp.status == 413 and error_of(await resp.read())["code"] == "request_too_large"
    await next_call_works(proxy)
    [span] = await proxy.spans()
    assert span["error_type"] is None and len(fake.requests) == 1


async def test_an_unexpected_error_in_a_route_answers_in_openai_shape() -> None:
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    app = web.Application(middlewares=[errors_middleware])
    app.router.add_get("/broken", broken)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/broken") as resp:
            assert resp.status == 500 and resp.content_type == "application/json"
            error = error_of(await resp.read())
            assert error["type"] == "server_error" and "a bug" not in error["message"]
    finally:
        await runner.cleanup()


# -- keys on every route ------------------------------------------------------------------------------------

CLIENT_KEY, ADMIN_KEY = "lw-client-key", "lw-admin-key"
ROUTES = [
    ("POST", "/v1/chat/completions", CHAT, "client"),
    ("POST", "/v1/completions", {"model": "m", "prompt": "hi"}, "client"),
    ("GET", "/v1/models", None, "client"),
    ("POST", "/s/my-session/v1/chat/completions", CHAT, "client"),
    ("POST", "/feedback", {"span_id": "0" * 16, "reward": 1}, "admin"),
    ("POST", "/sessions/my-session/end", {}, "admin"),
    ("GET", "/admin/adapters", None, "admin"),
    ("POST", "/admin/adapters", {"path": "/nowhere"}, "admin"),
    ("POST", "/admin/adapters/v1/activate", {}, "admin"),
    ("POST", "/admin/adapters/v1/canary", {"fraction": 0.1}, "admin"),
    ("POST", "/admin/rollback", {}, "admin"),
    ("POST", "/admin/train", {}, "admin"),
    ("GET", "/admin/runs", None, "admin"),
    ("GET", "/admin/export", None, "admin"),
    ("GET", "/admin/stats", None, "admin"),
    ("GET", "/admin/overview", None, "admin"),
    ("GET", "/admin/sessions", None, "admin"),
    ("GET", "/admin/sessions/my-session", None, "admin"),
    ("GET", "/metrics", None, "admin"),
    ("GET", "/healthz", None, None),
    ("GET", "/readyz", None, None),
    ("GET", "/ui", None, None),  # the dashboard's files hold no data: it reads /admin/ with the key
]


async def _ask(proxy: Proxy, method: str, path: str, body: dict | None, key: str | None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    base = proxy.url.removesuffix("/v1")
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, base + path, json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.read()


@pytest.mark.parametrize(("method", "path", "body", "needs"), ROUTES, ids=[f"{m} {p}" for m, p, _, _ in ROUTES])
async def test_keys_on_every_route(
    fake: FakeUpstream, start_proxy, method: str, path: str, body: dict | None, needs: str | None
) -> None:
    proxy = await start_proxy(fake.url, api_keys=(CLIENT_KEY,), admin_key=ADMIN_KEY)
    refused = [None, "wrong-key"] + ([CLIENT_KEY] if needs == "admin" else [])
    for key in refused if needs else []:
        status, content = await _ask(proxy, method, path, body, key)
        assert status == 401 and error_of(content)["code"] == "invalid_api_key", key
    assert fake.requests == []
    right = {"client": CLIENT_KEY, "admin": ADMIN_KEY, None: None}[needs]
    status, content = await _ask(proxy, method, path, body, right)
    assert status == 200 if needs is None else status != 401
    await next_call_works(proxy, Authorization=f"Bearer {CLIENT_KEY}")
    await proxy.stop()
    spans = read_rows(proxy.config.db, "SELECT http_status FROM spans")
    forwarded = needs == "client" and method == "POST"
    assert len(spans) == forwarded + 1  # refused requests leave no span
    assert read_rows(proxy.config.db, "SELECT * FROM feedback") == []

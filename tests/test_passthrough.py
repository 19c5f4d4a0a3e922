"""Every other path under /v1/ reaches the backend untouched (any method, content type, multipart, streams) and
leaves a span; /v1/models lists what the sidecar routes."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from tests.conftest import Proxy
from tests.fake_upstream import FakeUpstream


async def test_embeddings_reach_the_upstream_and_leave_a_span(proxy: Proxy, fake: FakeUpstream) -> None:
    sdk = openai.AsyncOpenAI(base_url=proxy.url, api_key="sk-agent", max_retries=0)
    raw = await sdk.embeddings.with_raw_response.create(model="embedder", input="some text", encoding_format="float")
    assert raw.parse().data[0].embedding == [0.5, -0.25]
    [seen] = fake.requests
    assert seen.path == "/v1/embeddings" and seen.body["input"] == "some text"
    assert seen.headers["Authorization"] == "Bearer sk-agent"
    [span] = await proxy.spans()
    assert span["span_id"] == raw.headers["x-lightwire-span-id"]
    assert (span["operation_name"], span["request_model"], span["http_status"]) == ("/v1/embeddings", "embedder", 200)
    assert span["request"]["input"] == "some text" and span["response"]["data"][0]["embedding"] == [0.5, -0.25]
    assert span["usage_input_tokens"] == 3 and span["request_bytes"] > 0 and span["response_bytes"] > 0
    assert span["session_id"] is None and span["duration_ms"] > 0


async def test_a_multipart_upload_is_forwarded_as_sent_and_recorded_by_size(proxy: Proxy, fake: FakeUpstream) -> None:
    form = aiohttp.FormData()
    form.add_field("purpose", "fine-tune")
    form.add_field("file", b"\x00\x01binary" * 100, filename="data.bin", content_type="application/octet-stream")
    async with (
        aiohttp.ClientSession() as http,
        http.post(proxy.url + "/files?via=sidecar", data=form, headers={"x-lightwire-session": "s1"}) as resp,
    ):
        echo = await resp.json()
    assert resp.status == 200
    assert (echo["method"], echo["content_type"], echo["query"]) == ("POST", "multipart/form-data", {"via": "sidecar"})
    assert fake.requests[0].headers["Content-Type"].startswith("multipart/form-data; boundary=")
    [span] = await proxy.spans()
    assert span["operation_name"] == "/v1/files" and span["request_bytes"] == echo["size"]
    assert span["request"] is None  # not JSON: sizes only
    assert (span["session_id"], span["session_source"]) == ("s1", "header")


async def test_other_methods_and_backend_errors_pass_through(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.delete(proxy.url + "/files/file-1") as resp:
            assert resp.status == 200 and (await resp.json())["method"] == "DELETE"
        async with http.get(proxy.url + "/batches?status=404") as resp:
            assert resp.status == 404
    spans = await proxy.spans()
    assert [(s["operation_name"], s["http_status"]) for s in spans] == [("/v1/files/file-1", 200), ("/v1/batches", 404)]
    assert spans[1]["error_type"] == "404"


async def test_a_streamed_body_is_relayed_as_it_arrives(proxy: Proxy, fake: FakeUpstream) -> None:
    async with aiohttp.ClientSession() as http, http.get(proxy.url + "/slow-stream") as resp:
        first = await resp.content.readany()  # the upstream holds its second chunk until released
        fake.release.set()
        rest = await resp.content.read()
    assert first == b"first " and rest == b"second"
    [span] = await proxy.spans()
    assert span["response_bytes"] == len(b"first second") and span["response"] is None  # not JSON


async def test_a_provider_model_has_no_other_paths(fake: FakeUpstream, start_proxy) -> None:
    proxy = await start_proxy(fake.url, provider_models=("openai/teacher",))
    sdk = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="provider model"):
        await sdk.embeddings.create(model="openai/teacher", input="x")
    assert fake.requests == []


async def test_models_lists_the_backend_and_what_the_sidecar_routes(fake: FakeUpstream, start_proxy) -> None:
    proxy = await start_proxy(fake.url, provider_models=("openai/teacher",), routes=("gpt-agent=upstream",))
    listed = [m.id async for m in openai.AsyncOpenAI(base_url=proxy.url, api_key="k").models.list()]
    assert listed == ["fake-model", "gpt-agent", "openai/teacher"]


async def test_a_client_gone_mid_body_is_recorded(proxy: Proxy, fake: FakeUpstream) -> None:
    async with aiohttp.ClientSession() as http:
        resp = await http.get(proxy.url + "/slow-stream")
        await resp.content.readany()
        resp.close()
    fake.release.set()
    [span] = await proxy.spans()
    assert span["http_status"] == 499 and span["error_type"] == "client_disconnected"

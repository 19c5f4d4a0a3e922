"""OpenTelemetry: the client's trace is continued to the backend, and spans reach an OTLP/HTTP collector."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.fake_upstream import FakeUpstream

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Collector:
    """A real OTLP/HTTP endpoint that keeps the spans posted to it."""

    def __init__(self) -> None:
        self.spans: list = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def traces(self, request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource_spans in message.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def start(self) -> Collector:
        app = web.Application()
        app.router.add_post("/v1/traces", self.traces)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1/traces"  # type: ignore[union-attr]
        return self


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    c = await Collector().start()
    yield c
    assert c.runner is not None
    await c.runner.cleanup()


async def test_spans_are_exported_with_the_clients_trace_and_genai_attributes(
    fake: FakeUpstream, start_proxy, collector: Collector
) -> None:
    proxy = await start_proxy(fake.url, otlp_endpoint=collector.url)
    sdk = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
    raw = await sdk.chat.completions.with_raw_response.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "hi"}],
        temperature=0.5,
        extra_headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"},
    )
    span_id = raw.headers["x-lightwire-span-id"]
    [row] = await proxy.spans()  # stopping the proxy drains the exporter

    # The backend sees the same trace, with Lightwire's span as the parent.
    assert fake.requests[0].headers["traceparent"] == f"00-{TRACE_ID}-{span_id}-01"
    assert (row["trace_id"], row["parent_span_id"]) == (TRACE_ID, CLIENT_SPAN)

    [span] = collector.spans
    assert span.trace_id.hex() == TRACE_ID and span.span_id.hex() == span_id
    assert span.parent_span_id.hex() == CLIENT_SPAN
    assert span.name == "chat gpt-test"
    attributes = {a.key: a.value for a in span.attributes}
    assert attributes["gen_ai.request.model"].string_value == "gpt-test"
    assert attributes["gen_ai.operation.name"].string_value == "chat"
    assert attributes["gen_ai.response.id"].string_value == raw.parse().id
    assert attributes["gen_ai.usage.output_tokens"].int_value == 5
    assert attributes["gen_ai.request.temperature"].double_value == 0.5
    assert '"hi"' in attributes["gen_ai.input.messages"].string_value
    assert span.end_time_unix_nano - span.start_time_unix_nano == pytest.approx(row["duration_ms"] * 1e6, rel=0.01)


async def test_without_a_traceparent_each_call_starts_a_trace(fake: FakeUpstream, proxy) -> None:
    sdk = openai.AsyncOpenAI(base_url=proxy.url, api_key="k", max_retries=0)
    for _ in range(2):
        await sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    rows = await proxy.spans()
    assert len({r["trace_id"] for r in rows}) == 2 and all(r["parent_span_id"] is None for r in rows)
    sent = [seen.headers["traceparent"].split("-") for seen in fake.requests]
    assert [(p[1], p[2]) for p in sent] == [(r["trace_id"], r["span_id"]) for r in rows]

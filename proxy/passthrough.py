"""Every other path under ``/v1/`` (embeddings, moderations, files, audio, a backend's own extensions...):
forwarded untouched to the backend the call is routed to, whatever the method and content type, the answer
relayed as it arrives (streams too), and recorded as one span.

The backend is the one the body's ``model`` routes to (a JSON body naming one), else the policy when there is
one, else the upstream; for the policy the model name becomes the served version's, as for chat. Provider models
(litellm) have no generic HTTP path: such calls get 404. The span's ``operation_name`` is the path
(``/v1/embeddings``); it records status, latency, the request's and the response's sizes, and their bodies when
they are JSON within ``max_body_mb``. It has a session only when the agent names one (header, path prefix,
``traceparent``): these calls are no turns of a conversation.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from proxy.backends import BACKENDS, POLICY, UPSTREAM
from proxy.config import Config
from proxy.errors import NotFound, UpstreamError
from proxy.relay import SPAN_HEADER, failures_recorded
from proxy.sessions import SESSION_HEADER
from proxy.telemetry import TraceIds
from proxy.upstream import Upstream, response_headers
from store.spans import Span
from store.writer import Writer

JSON_TYPES = frozenset({"application/json"})


def handler(
    *, writer: web.AppKey[Writer], config: web.AppKey[Config]
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The route's handler, given the keys under which the application holds its store writer and settings."""

    async def handle(request: web.Request) -> web.StreamResponse:
        return await forward(request, request.app[writer], request.app[config])

    return handle


async def forward(request: web.Request, writer: Writer, config: Config) -> web.StreamResponse:
    """Forward the request to its backend and relay the answer; write one span whatever happens."""
    found = request.app[BACKENDS]
    raw = await request.read()
    body = _json(raw) if request.content_type in JSON_TYPES else None
    model = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else None
    target = found.target(model) if model else POLICY if found.serves_policy else UPSTREAM
    if target not in (POLICY, UPSTREAM):
        raise NotFound(f"{request.path} is not available for the provider model {model!r}.", param="model")
    if target == UPSTREAM and found.upstream is None:
        raise NotFound(f"Unknown path {request.path}: this sidecar has no backend for it.")
    span = _Passage(request, raw, body, model, TraceIds.new(request.headers.get("traceparent")))
    await writer.reserve()
    try:
        with failures_recorded(span):
            if target == UPSTREAM:
                assert found.upstream is not None
                return await _relay(request, span, found.upstream, raw, config.max_body_bytes)
            policy = found.require_policy()
            replica, version = await policy.acquire(span.session_id)
            span.adapter_version = version.version
            try:
                if isinstance(body, dict) and model:
                    raw = orjson.dumps({**body, "model": version.served_name})
                return await _relay(request, span, replica.upstream, raw, config.max_body_bytes)
            finally:
                policy.release(replica, version)
    finally:
        writer.submit(span.finish())


async def _relay(
    request: web.Request, span: _Passage, upstream: Upstream, raw: bytes, limit: int
) -> web.StreamResponse:
    span.provider = upstream.provider
    headers = upstream.headers(request.headers, traceparent=span.ids.traceparent)
    url = upstream.base_url + request.path[request.path.index("/v1/") + 3 :]
    try:
        resp = await upstream.session.request(
            request.method, url, params=request.query, data=raw or None, headers=headers, auto_decompress=False
        )
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"Could not reach the upstream: {exc}.") from None
    async with resp:
        out_headers = response_headers(resp.headers)
        if "Content-Encoding" in resp.headers:  # relayed as received: the client decodes it
            out_headers["Content-Encoding"] = resp.headers["Content-Encoding"]
        out_headers[SPAN_HEADER] = span.ids.span_id
        out = web.StreamResponse(status=resp.status, headers=out_headers)
        await out.prepare(request)
        span.status = resp.status
        keep = resp.content_type in JSON_TYPES and "Content-Encoding" not in resp.headers
        kept: list[bytes] = []
        try:
            async for data in resp.content.iter_any():
                if span.first_chunk is None:
                    span.first_chunk = time.perf_counter()
                span.response_bytes += len(data)
                if keep and span.response_bytes <= limit:
                    kept.append(data)
                await out.write(data)
        except aiohttp.ClientError as exc:
            span.fail(resp.status, "truncated_stream", f"The upstream broke off its response: {exc}.")
        if resp.status >= 400:
            span.fail(resp.status, str(resp.status), b"".join(kept)[:2000].decode("utf-8", "replace"))
        if keep and span.response_bytes <= limit:
            span.response = b"".join(kept)
        await out.write_eof()
        return out


class _Passage:
    """One forwarded call on another path, until it becomes its ``spans`` row."""

    def __init__(self, request: web.Request, raw: bytes, body: Any, model: str | None, ids: TraceIds) -> None:
        self.ids = ids
        self.kind = request.path[request.path.index("/v1/") :]
        self.request = raw.decode("utf-8", "replace") if body is not None else "null"
        self.request_bytes = len(raw)
        self.model = model
        self.stream = bool(body.get("stream")) if isinstance(body, dict) else False
        header, path = request.headers.get(SESSION_HEADER), request.match_info.get("session")
        trace = ids.trace_id if ids.parent_span_id else None
        self.session_id: str | None
        self.session_source: str | None
        self.session_id, self.session_source = next(
            (
                (value, source)
                for source, value in (("header", header), ("path", path), ("traceparent", trace))
                if value
            ),
            (None, None),
        )
        self.provider = "openai"
        self.adapter_version: str | None = None
        self.started, self.start_time = time.perf_counter(), datetime.now(UTC)
        self.first_chunk: float | None = None
        self.status: int | None = None
        self.error_type: str | None = None
        self.error_message: str | None = None
        self.response: bytes | None = None
        self.response_bytes = 0

    def fail(self, status: int | None, error_type: str, message: str) -> None:
        if self.error_type is None:
            self.status, self.error_type, self.error_message = status, error_type, message

    def finish(self) -> Span:
        ended = time.perf_counter()
        response = _json(self.response) if self.response else None
        return Span(
            span_id=self.ids.span_id,
            trace_id=self.ids.trace_id,
            parent_span_id=self.ids.parent_span_id,
            session_id=self.session_id,
            operation_name=self.kind,
            provider_name=self.provider,
            request_model=self.model,
            response_model=response.get("model") if isinstance(response, dict) else None,
            response_id=response.get("id") if isinstance(response, dict) else None,
            request_stream=self.stream,
            request_max_tokens=None,
            request_temperature=None,
            request_top_p=None,
            response_finish_reasons=None,
            usage_input_tokens=_usage(response, "prompt_tokens"),
            usage_output_tokens=None,
            request=self.request,
            response=orjson.dumps(response).decode() if response is not None else None,
            prompt_token_ids=None,
            completion_token_ids=None,
            completion_logprobs=None,
            start_time=self.start_time,
            duration_ms=(ended - self.started) * 1000,
            time_to_first_chunk_ms=(self.first_chunk - self.started) * 1000 if self.first_chunk else None,
            http_status=self.status,
            error_type=self.error_type,
            error_message=self.error_message,
            turn_index=None,
            session_source=self.session_source,
            adapter_version=self.adapter_version,
            request_bytes=self.request_bytes,
            response_bytes=self.response_bytes,
        )


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _usage(response: Any, key: str) -> int | None:
    usage = response.get("usage") if isinstance(response, dict) else None
    value = usage.get(key) if isinstance(usage, dict) else None
    return value if isinstance(value, int) else None

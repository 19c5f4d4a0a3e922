"""Forwarding one model call to its backend and recording it: the request path.

A :class:`Call` follows one request from acceptance to its last byte and becomes exactly one row of ``spans``,
whatever happens (success, upstream error, timeout, broken stream, client gone). Building that row (reading
token ids and logprobs, serializing JSON) runs in the store's writer thread, off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import orjson
from aiohttp import web

from proxy import http1, protocol, responses, shapes
from proxy.config import Config
from proxy.errors import HTTPError, InternalError, UpstreamError, UpstreamTimeout
from proxy.protocol import NOTHING, Injected
from proxy.telemetry import TraceIds
from proxy.upstream import Upstream, response_headers
from store.spans import Span

if TYPE_CHECKING:
    from proxy.memory import Injection

log = logging.getLogger(__name__)

SPAN_HEADER = "x-lightwire-span-id"
CLIENT_GONE = 499  # nginx's code for "the client closed the request"
WIRES = {**protocol.WIRES, responses.RESPONSES: responses.WIRE}


class Failing(Protocol):
    """A call on its way to becoming a span: a model call or a passed-through one."""

    ids: TraceIds
    status: int | None

    def fail(self, status: int | None, error_type: str, message: str) -> None: ...


@contextlib.contextmanager
def failures_recorded(call: Failing) -> Iterator[None]:
    """Record on ``call`` how it failed, then let the failure go on to the client (or to the errors middleware)."""
    try:
        yield
    except HTTPError as exc:
        call.fail(exc.status, exc.code or exc.type, exc.message)
        exc.headers[SPAN_HEADER] = call.ids.span_id
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        call.fail(CLIENT_GONE, "client_disconnected", "The client closed the connection.")
        raise
    except Exception as exc:  # a bug: still one span; the errors middleware answers 500
        call.fail(call.status or InternalError.status, InternalError.code, f"Lightwire failed: {exc!r}")
        raise


class StreamBroken(HTTPError):
    """The upstream's stream ended early or sent something that is not an OpenAI chunk."""

    status = 502
    type = "upstream_error"

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message, code=code)


class Call:
    """One model call in flight; once it has ended, :meth:`settled` is what the store writes of it: one ``spans``
    row (a call is a store ``Record`` too)."""

    table: ClassVar[str] = "spans"

    def __init__(
        self,
        operation: str,
        body: dict[str, Any],
        raw: bytes,
        ids: TraceIds,
        provider: str,
        *,
        started: float | None = None,
    ) -> None:
        self.operation = operation
        self.wire = WIRES[operation]
        self.body = body
        self.raw = raw
        self.ids = ids
        self.provider = provider
        self.session_id: str | None = None
        self.session_source: str | None = None
        self.turn_index: int | None = None
        self.adapter_version: str | None = None
        self.injected: Injected = NOTHING
        self.memory: Injection | None = None  # worked examples sent upstream in front of the conversation
        # Times as perf_counter() reads them; the edge starts a call when its body has arrived, before parsing it.
        self.started = time.perf_counter() if started is None else started
        self.start_time = datetime.now(UTC)
        self.first_chunk: float | None = None
        self.ended: float | None = None
        # The backend's own time: from handing it the request until its response's last byte (or the call's end,
        # when that never came). The rest of the call's time is what Lightwire adds.
        self.sent: float | None = None
        self.received: float | None = None
        self.status: int | None = None
        self.error_type: str | None = None
        self.error_message: str | None = None
        self.response_raw: bytes | None = None  # a non-streaming body, as received
        self.chunks: list[dict[str, Any]] = []  # a stream's chunks, as received
        self.response: dict[str, Any] | None = None  # the whole response, once settled

    def fail(self, status: int | None, error_type: str, message: str) -> None:
        if self.error_type is None:  # the first failure is the cause
            self.status, self.error_type, self.error_message = status, error_type, message

    def end(self) -> None:
        """The call is over: note when, and read the whole response (a stream's chunks reassembled).

        Whatever the backend sent, and even if reading it fails, the call stays one span: a backend's answer of
        the wrong shape is recorded as ``invalid_response``, a failure to read it as ``internal_error``.
        """
        self.ended = time.perf_counter()
        try:
            if self.chunks:
                # the chunks go at once: until the writer has the span, a call's objects are the cycle collector's
                # to walk at every young collection (a 50-chunk stream's ~200 of them)
                self.response, self.chunks = self.wire.reassemble(self.chunks), []
            elif self.response_raw and self.status is not None and self.status < 400:
                self.response, problem = read_body(self.response_raw, self.wire.response_shape)
                if problem is not None:
                    self.fail(self.status, "invalid_response", f"The upstream's response is malformed: {problem}.")
        except Exception as exc:  # a bug here must cost the record its response, never the record itself
            log.exception("could not read the response of span %s", self.ids.span_id)
            self.fail(self.status, InternalError.code, f"Lightwire could not read the response: {exc!r}")

    def replies(self) -> list[dict[str, Any]]:
        """The assistant messages of a chat or Responses call, one per choice."""
        return self.wire.replies(self.response) if self.response is not None else []

    def settled(self) -> Span | Call:
        """What the store is handed once the call has ended: its span, built now. Whatever waits for the writer
        is the cycle collector's to walk at each collection, and a span is ~2 objects where the call with its
        parsed request and response is dozens; the call itself goes as soon as its handler is done. If building
        the span fails, the call goes instead: the writer tries again, and refuses its row saying why."""
        try:
            return self.to_span()
        except Exception:
            log.exception("could not build the span of call %s", self.ids.span_id)
            return self

    def to_row(self) -> tuple[object, ...]:
        return self.to_span().to_row()

    def to_span(self) -> Span:
        response = self.response
        fields = self.wire.extract(response) if response else protocol.ResponseFields()
        stored = self.wire.hidden_copy(response, self.injected) if response else None
        body = self.body
        ended = self.ended if self.ended is not None else time.perf_counter()
        return Span(
            span_id=self.ids.span_id,
            trace_id=self.ids.trace_id,
            parent_span_id=self.ids.parent_span_id,
            session_id=self.session_id,
            operation_name=self.operation,
            provider_name=self.provider,
            request_model=body.get("model"),
            response_model=fields.response_model,
            response_id=fields.response_id,
            request_stream=bool(body.get("stream")),
            request_max_tokens=_number(_first(body, "max_completion_tokens", "max_tokens", "max_output_tokens"), int),
            request_temperature=_number(body.get("temperature"), float),
            request_top_p=_number(body.get("top_p"), float),
            response_finish_reasons=fields.finish_reasons,
            usage_input_tokens=fields.input_tokens,
            usage_output_tokens=fields.output_tokens,
            request=self.raw.decode("utf-8", "replace"),
            response=orjson.dumps(stored).decode() if stored is not None else None,
            prompt_token_ids=fields.prompt_token_ids,
            completion_token_ids=fields.completion_token_ids,
            completion_logprobs=fields.completion_logprobs,
            start_time=self.start_time,
            duration_ms=(ended - self.started) * 1000,
            time_to_first_chunk_ms=(self.first_chunk - self.started) * 1000 if self.first_chunk else None,
            upstream_duration_ms=((self.received or ended) - self.sent) * 1000 if self.sent is not None else None,
            http_status=self.status,
            error_type=self.error_type,
            error_message=self.error_message,
            turn_index=self.turn_index,
            session_source=self.session_source,
            adapter_version=self.adapter_version,
            memory_version=self.memory.version if self.memory is not None else None,
            memory_examples=list(self.memory.ids) if self.memory is not None else None,
        )


def _first(body: dict[str, Any], *keys: str) -> Any:
    return next((body[key] for key in keys if key in body), None)


def read_body(raw: bytes, shape: shapes.Shape) -> tuple[dict[str, Any] | None, str | None]:
    """A whole response as the span keeps it (its well-formed parts), and what is wrong with it, if anything."""
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, "it is not JSON"
    if not isinstance(parsed, dict):
        return None, "it is not a JSON object"
    response, misfit = shapes.clean(parsed, shape)
    return (None if response is shapes.MISSING else response), str(misfit) if misfit is not None else None


def _number(value: Any, kind: type) -> Any:
    return kind(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


async def forward(
    request: web.Request, call: Call, upstream: Upstream, config: Config, *, model: str | None = None
) -> web.StreamResponse:
    """Send the call upstream and relay the answer; on any outcome, ``call`` holds what happened.

    ``model`` replaces the requested model name (the policy serves versions under their own names); otherwise
    the client's body goes out byte for byte unless token capture adds to it.
    """
    payload = call.raw
    body = call.body if model is None else {**call.body, "model": model}
    if call.memory:
        body = {**body, "messages": call.memory.messages}
    if await upstream.capture_tokens():
        body, call.injected = call.wire.ask_for_tokens(body)
    if body is not call.body:
        payload = orjson.dumps(body)
    call.provider = upstream.provider
    call.sent = time.perf_counter()
    try:
        async with asyncio.timeout(config.first_byte_timeout):
            resp = await upstream.send(
                call.wire.path, payload, incoming=request.headers, traceparent=call.ids.traceparent
            )
    except TimeoutError:
        raise UpstreamTimeout(f"The upstream sent no response within {config.first_byte_timeout:g} s.") from None
    except http1.HTTPClientError as exc:
        raise UpstreamError(f"Could not reach the upstream: {exc}.") from None
    try:
        streaming = resp.status == 200 and resp.content_type == "text/event-stream"
        if streaming:
            return await _relay_stream(request, call, resp, config)
        return await _relay_body(request, call, resp, config)
    finally:
        resp.close()  # closes the connection if the body was not read to its end


async def _relay_body(request: web.Request, call: Call, resp: http1.Response, config: Config) -> web.Response:
    """Relay a whole body; it is sent before returning, so that the caller's bookkeeping does not delay it."""
    try:
        async with asyncio.timeout(config.chunk_timeout):
            content = await resp.read()
        call.received = time.perf_counter()
    except TimeoutError:
        raise UpstreamTimeout(f"The upstream stalled for {config.chunk_timeout:g} s sending its body.") from None
    except http1.HTTPClientError as exc:
        raise UpstreamError(f"The upstream broke off its response: {exc}.") from None
    call.status = resp.status
    call.response_raw = content
    if resp.status >= 400:
        call.fail(resp.status, str(resp.status), content[:2000].decode("utf-8", "replace"))
    elif call.injected:  # remove what the proxy asked for; a malformed answer goes on as it came
        response, problem = read_body(content, call.wire.response_shape)
        if response is not None and problem is None:
            content = orjson.dumps(call.wire.hide(response, call.injected))
    headers = response_headers(resp.headers)
    headers[SPAN_HEADER] = call.ids.span_id
    out = web.Response(body=content, status=resp.status, headers=headers)
    await out.prepare(request)
    await out.write_eof()
    return out


async def _relay_stream(request: web.Request, call: Call, resp: http1.Response, config: Config) -> web.StreamResponse:
    headers = response_headers(resp.headers)
    headers[SPAN_HEADER] = call.ids.span_id
    out = web.StreamResponse(status=200, headers=headers)
    await out.prepare(request)
    call.status = 200
    try:
        await _pump(call, resp, out, config)
    except ConnectionResetError:  # the client went away mid-stream: record it, nothing to answer
        call.fail(CLIENT_GONE, "client_disconnected", "The client closed the connection.")
    return out


async def _pump(call: Call, resp: http1.Response, out: web.StreamResponse, config: Config) -> None:
    """Copy the upstream's events to the client as they complete; end with an error event if the stream breaks."""
    events = SseSplitter()
    done = False
    try:
        while True:
            try:
                async with asyncio.timeout(config.chunk_timeout):
                    data = await resp.readany()
            except TimeoutError:
                raise StreamBroken(
                    f"The upstream stalled for {config.chunk_timeout:g} s mid-stream.", "timeout"
                ) from None
            except http1.HTTPClientError as exc:
                raise StreamBroken(f"The upstream broke off the stream: {exc}.", "truncated_stream") from None
            if not data:
                call.received = time.perf_counter()
                break
            outgoing, done, broken = _pass_events(call, events.feed(data))
            if outgoing:
                if call.first_chunk is None:
                    call.first_chunk = time.perf_counter()
                await out.write(outgoing)
            if broken is not None:
                raise broken
        if not done:
            raise StreamBroken("The upstream's stream ended before [DONE].", "truncated_stream")
    except StreamBroken as exc:
        call.fail(call.status, exc.code or "stream_error", exc.message)
        await out.write(exc.sse_event())
    await out.write_eof()


def _pass_events(call: Call, events: list[bytes]) -> tuple[bytes, bool, StreamBroken | None]:
    """Record each complete event; return the bytes to send on, whether ``[DONE]`` was seen, and what broke."""
    parts = []
    done = False
    for event in events:
        data = _event_data(event)
        if data is None:  # a comment or keep-alive
            parts.append(event)
            continue
        if data == b"[DONE]":
            done = True
            parts.append(event)
            continue
        try:
            chunk = orjson.loads(data)
            if not isinstance(chunk, dict):
                raise ValueError("not an object")
        except ValueError:
            broken = StreamBroken("The upstream sent a stream event that is not a JSON object.", "invalid_stream")
            return b"".join(parts), done, broken
        error = call.wire.stream_error(chunk)
        if error is not None:
            call.fail(call.status, str(error["type"]), str(error["message"]))
            if "error" in chunk:  # a chat error chunk is no part of the response
                parts.append(event)
                continue
        chunk, misfit = shapes.clean(chunk, call.wire.chunk_shape)
        call.chunks.append(chunk)
        if misfit is not None:  # relayed as it came; only its well-formed parts are recorded
            call.fail(call.status, "malformed_chunk", f"The upstream sent a malformed stream chunk: {misfit}.")
        done = done or call.wire.ends_stream(chunk)
        if not call.injected or misfit is not None:
            parts.append(event)
            continue
        visible = call.wire.hide(orjson.loads(data), call.injected)
        if visible is not None:  # keeps the event's other lines (a Responses stream names each event's type)
            parts.append(event[: event.index(b"data:")] + b"data: " + orjson.dumps(visible) + b"\n\n")
    return b"".join(parts), done, None


def _event_data(event: bytes) -> bytes | None:
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


class SseSplitter:
    """Cuts a byte stream into complete server-sent events (each returned with its blank-line terminator)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        if b"\r" in self._buffer:
            self._buffer = self._buffer.replace(b"\r\n", b"\n")
        if b"\n\n" not in self._buffer:
            return []
        *complete, self._buffer = self._buffer.split(b"\n\n")
        return [event + b"\n\n" for event in complete if event]

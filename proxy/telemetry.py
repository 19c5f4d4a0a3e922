"""Trace ids (W3C ``traceparent``) and the optional export of spans through OpenTelemetry (OTLP/HTTP).

Spans are exported after the store has committed them, with the same trace and span ids as their rows, so a
trace viewer (Jaeger, Phoenix, Langfuse) and the DuckDB file name a call alike. The SDK's batch processor drops
spans when its queue is full: the store is the record, the exporter may lag or lose, never the store.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from store.spans import OTEL_ATTRIBUTES, Span

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_SCOPE = InstrumentationScope("lightwire")


def random_hex(nbytes: int) -> str:
    """A random id, as OpenTelemetry's own id generator makes them (no system call per id)."""
    return f"{random.getrandbits(nbytes * 8):0{nbytes * 2}x}"


def time_ordered_hex(nbytes: int) -> str:
    """A random id that sorts by when it was made, as a UUIDv7 does: milliseconds since the epoch in its first 6
    bytes, random bits in the rest. The ids Lightwire makes for the store's primary keys (sessions, rewards) are
    these: DuckDB keeps the parts of a key's ART tree that writes touch, and random keys land anywhere in it, so
    it held the whole tree (~72 bytes a row, growing with the store); keys in time order touch its newest edge
    (after 200k sessions and rewards, a checkpoint and one batch: 28 MB random, 4.5 MB in time order; see
    ``tests/test_footprint.py``)."""
    return f"{time.time_ns() // 1_000_000:012x}{random_hex(nbytes - 6)}"


@dataclass(frozen=True, slots=True)
class TraceIds:
    """The ids of one call's span, continuing the client's trace when it sent a ``traceparent``."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    flags: str

    @classmethod
    def new(cls, traceparent: str | None) -> TraceIds:
        span_id = random_hex(8)
        match = _TRACEPARENT.match(traceparent.strip().lower()) if traceparent else None
        if match and match[1] != "ff" and set(match[2]) != {"0"} and set(match[3]) != {"0"}:
            return cls(trace_id=match[2], span_id=span_id, parent_span_id=match[3], flags=match[4])
        return cls(trace_id=random_hex(16), span_id=span_id, parent_span_id=None, flags="01")

    @property
    def traceparent(self) -> str:
        """The header to send to the backend: same trace, this span as the parent."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"


class Exporter:
    """Sends committed spans to an OTLP/HTTP endpoint in the background."""

    def __init__(self, endpoint: str, *, service_name: str = "lightwire") -> None:
        self._resource = Resource.create({"service.name": service_name})
        self._processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))

    def export(self, spans: list[Span]) -> None:
        for span in spans:
            self._processor.on_end(self._readable(span))

    def shutdown(self) -> None:
        self._processor.shutdown()

    def _readable(self, span: Span) -> ReadableSpan:
        start_ns = int(span.start_time.timestamp() * 1e9)
        sampled = TraceFlags(TraceFlags.SAMPLED)
        parent = None
        if span.parent_span_id:
            parent = SpanContext(int(span.trace_id, 16), int(span.parent_span_id, 16), True, sampled)
        failed = span.error_type is not None
        return ReadableSpan(
            name=f"{span.operation_name} {span.request_model}",
            context=SpanContext(int(span.trace_id, 16), int(span.span_id, 16), False, sampled),
            parent=parent,
            resource=self._resource,
            attributes=attributes(span),
            kind=SpanKind.CLIENT,
            status=Status(StatusCode.ERROR, span.error_message) if failed else Status(StatusCode.UNSET),
            start_time=start_ns,
            end_time=start_ns + int(span.duration_ms * 1e6),
            instrumentation_scope=_SCOPE,
        )


def attributes(span: Span) -> dict[str, Any]:
    """The span's OpenTelemetry attributes: GenAI semantic conventions plus OpenInference names."""
    out: dict[str, Any] = {"lightwire.span_id": span.span_id}
    for column, name in OTEL_ATTRIBUTES.items():
        value = getattr(span, column)
        if value is not None:
            out[name] = value / 1000 if column == "time_to_first_chunk_ms" else value
    out["gen_ai.input.messages"] = out["input.value"] = span.request
    if span.response is not None:
        out["gen_ai.output.messages"] = out["output.value"] = span.response
    if span.request_model:
        out["llm.model_name"] = span.response_model or span.request_model
    return out

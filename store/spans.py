"""One row of the ``spans`` table: one model call, whatever its outcome."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import ClassVar

from store.writer import Row


@dataclass(slots=True)
class Span(Row):
    table: ClassVar[str] = "spans"

    span_id: str
    trace_id: str
    parent_span_id: str | None
    session_id: str | None
    operation_name: str
    provider_name: str
    request_model: str | None
    response_model: str | None
    response_id: str | None
    request_stream: bool
    request_max_tokens: int | None
    request_temperature: float | None
    request_top_p: float | None
    response_finish_reasons: list[str] | None
    usage_input_tokens: int | None
    usage_output_tokens: int | None
    request: str
    response: str | None
    prompt_token_ids: list[int] | None
    completion_token_ids: list[list[int]] | None
    completion_logprobs: list[list[float]] | None
    start_time: datetime
    duration_ms: float
    time_to_first_chunk_ms: float | None
    http_status: int | None
    error_type: str | None
    error_message: str | None
    turn_index: int | None
    session_source: str | None
    adapter_version: str | None = None
    request_bytes: int | None = None
    response_bytes: int | None = None
    memory_version: str | None = None
    memory_examples: list[str] | None = None
    upstream_duration_ms: float | None = None


# The session_source of an extra answer the sidecar sampled for a group (proxy.groups): it has no session, and its
# parent_span_id is the client's call whose prompt it answers.
SAMPLE_SOURCE = "sample"

# The operations of model calls; a span of another /v1/ path (proxy.passthrough) is named by its path instead.
RESPONSES = "responses"  # a call of the Responses API (POST /v1/responses)
MODEL_OPERATIONS = ("chat", "text_completion", RESPONSES)
MODEL_CALL = f"operation_name IN {MODEL_OPERATIONS}"  # as SQL


def model_calls(records: Iterable[object]) -> list[Span]:
    """The spans of model calls (the client's and group samples) among rows the store was handed."""
    return [r for r in records if isinstance(r, Span) and r.operation_name in MODEL_OPERATIONS]


SPAN_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Span))

# Column -> OpenTelemetry attribute (GenAI semantic conventions, and OpenInference names Phoenix reads).
OTEL_ATTRIBUTES: dict[str, str] = {
    "session_id": "gen_ai.conversation.id",
    "operation_name": "gen_ai.operation.name",
    "provider_name": "gen_ai.provider.name",
    "request_model": "gen_ai.request.model",
    "response_model": "gen_ai.response.model",
    "response_id": "gen_ai.response.id",
    "request_stream": "gen_ai.request.stream",
    "request_max_tokens": "gen_ai.request.max_tokens",
    "request_temperature": "gen_ai.request.temperature",
    "request_top_p": "gen_ai.request.top_p",
    "response_finish_reasons": "gen_ai.response.finish_reasons",
    "usage_input_tokens": "gen_ai.usage.input_tokens",
    "usage_output_tokens": "gen_ai.usage.output_tokens",
    "time_to_first_chunk_ms": "gen_ai.response.time_to_first_chunk",
    "http_status": "http.response.status_code",
    "error_type": "error.type",
}

"""Calls to any LLM provider through litellm: the one module that imports it.

Serves agents' calls routed to a provider model (``--provider-model openai/gpt-4o-mini``) with the same
recording as any backend: the request's fields go to litellm as they are, the answer comes back in OpenAI's
shape (streams as server-sent events), and the provider's errors keep their status and message.

litellm is imported on first use, in a worker thread (the import takes seconds), and set quiet: no telemetry, no
debug banners, and the model cost map read from the package instead of fetched from GitHub at import (set
``LITELLM_LOCAL_MODEL_COST_MAP=False`` to fetch it). Keys and base URLs come from the arguments or, as litellm
reads them, from the provider's environment variables (``OPENAI_API_KEY``, ``OPENAI_BASE_URL``...).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from types import ModuleType
from typing import Any

import orjson
from aiohttp import web

from proxy import protocol
from proxy.config import Config
from proxy.errors import ProviderError, UpstreamTimeout
from proxy.relay import SPAN_HEADER, Call
from proxy.responses import RESPONSES

# The OpenAI request fields handed to litellm by name; anything else a client sends goes in the provider's body.
OPENAI_FIELDS = frozenset(
    {
        "messages",
        "prompt",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "presence_penalty",
        "response_format",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "user",
        "functions",
        "function_call",
        "reasoning_effort",
        "modalities",
        "audio",
        "prediction",
        "service_tier",
        "store",
        "web_search_options",
        "best_of",
        "echo",
        "suffix",
    }
)
# The Responses API's request fields that litellm.aresponses takes by name.
RESPONSES_FIELDS = frozenset(
    {
        "input",
        "include",
        "instructions",
        "max_output_tokens",
        "prompt",
        "metadata",
        "parallel_tool_calls",
        "previous_response_id",
        "reasoning",
        "store",
        "background",
        "stream",
        "temperature",
        "text",
        "tool_choice",
        "tools",
        "top_p",
        "truncation",
        "user",
        "service_tier",
        "safety_identifier",
    }
)
_lock = threading.Lock()
_litellm: ModuleType | None = None


async def complete(
    model: str,
    messages: list[dict[str, Any]],
    *,
    api_base: str | None = None,
    api_key: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """One chat completion from ``model`` (a litellm name, ``provider/model``), as an OpenAI-shaped dict."""
    litellm = _litellm if _litellm is not None else await asyncio.to_thread(_load)
    response = await litellm.acompletion(model=model, messages=messages, api_base=api_base, api_key=api_key, **kwargs)
    return dict(response.model_dump())


async def forward(request: web.Request, call: Call, model: str, config: Config) -> web.StreamResponse:
    """Answer ``call`` with ``model`` through litellm; like :func:`proxy.relay.forward`, ``call`` records it."""
    litellm = _litellm if _litellm is not None else await asyncio.to_thread(_load)
    call.provider = "litellm"
    named = RESPONSES_FIELDS if call.operation == RESPONSES else OPENAI_FIELDS
    params = {k: v for k, v in call.body.items() if k in named}
    if call.memory:
        params["messages"] = call.memory.messages
    extra = {k: v for k, v in call.body.items() if k not in named and k != "model"}
    if extra:  # to the provider's body as they are; never to litellm (api_base, api_key... stay the sidecar's)
        params["extra_body"] = extra
    create = {protocol.CHAT: litellm.acompletion, RESPONSES: litellm.aresponses}.get(
        call.operation, litellm.atext_completion
    )
    call.sent = time.perf_counter()
    try:
        async with asyncio.timeout(config.first_byte_timeout):
            response = await create(model=model, **params)
    except TimeoutError:
        raise UpstreamTimeout(f"{model} sent no response within {config.first_byte_timeout:g} s.") from None
    except Exception as exc:  # litellm maps every provider's failures onto its own exception types
        raise _provider_error(model, exc) from None
    headers = {SPAN_HEADER: call.ids.span_id}
    call.status = 200
    if not call.body.get("stream"):
        call.received = time.perf_counter()
        call.response_raw = orjson.dumps(response.model_dump(exclude_none=True))
        return web.Response(body=call.response_raw, headers=headers, content_type="application/json")
    out = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await out.prepare(request)
    try:
        async for chunk in response:
            data = chunk.model_dump(exclude_none=True)
            call.chunks.append(data)
            if call.first_chunk is None:
                call.first_chunk = time.perf_counter()
            event = b"event: " + str(data["type"]).encode() + b"\n" if call.operation == RESPONSES else b""
            await out.write(event + b"data: " + orjson.dumps(data) + b"\n\n")
        call.received = time.perf_counter()
        if call.operation != RESPONSES:  # a Responses stream ends with its terminal event
            await out.write(b"data: [DONE]\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as exc:  # the provider broke off mid-stream
        error = _provider_error(model, exc)
        call.fail(call.status, error.code or error.type, error.message)
        await out.write(error.sse_event())
    await out.write_eof()
    return out


def _provider_error(model: str, exc: Exception) -> ProviderError:
    status = getattr(exc, "status_code", None)
    status = status if isinstance(status, int) and 400 <= status < 600 else 502
    message = str(getattr(exc, "message", None) or exc)
    return ProviderError(f"{model}: {message}", status=status, code=type(exc).__name__)


def _load() -> ModuleType:
    global _litellm
    with _lock:
        if _litellm is None:
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            import litellm

            litellm.telemetry = False
            litellm.suppress_debug_info = True
            _litellm = litellm
        return _litellm

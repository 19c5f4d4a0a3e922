"""What the proxy knows of OpenAI's Responses API (``POST /v1/responses``): validating a request, asking vLLM for
exact tokens and hiding them again, rebuilding a response from its typed event stream, the fields a span records,
and the chat messages a call amounts to (for session linking; :mod:`store.items` turns items into messages).

A Responses call names its model, an ``input`` (a string or a list of items: messages, ``function_call``,
``function_call_output``, ``reasoning``...), optional ``instructions``, and may continue an earlier response
(``previous_response_id``) or a ``conversation``. Its answer is a ``response`` object whose ``output`` is a list of
items; a stream is a sequence of typed events (``response.created``, ``response.output_text.delta``,
``response.function_call_arguments.delta``, ``response.completed``...) whose terminal event carries the whole
response.

vLLM (0.32) serves it statelessly unless its store is switched on; asked with ``enable_response_messages`` it adds
``input_messages`` and ``output_messages`` (the prompt's and the completion's token ids), and with
``include: ["message.output_text.logprobs"]`` the sampled tokens' logprobs on each ``output_text`` part.

Everything here is a pure function of JSON-like values, safe to run in the store's writer thread.
"""

from __future__ import annotations

import copy
from typing import Any

from proxy import shapes
from proxy.protocol import Injected, ResponseFields, Wire, check_shape, parse_object
from proxy.shapes import NUMBER, Many, Obj, Whole
from store import spans
from store.items import input_items, reply, to_messages

RESPONSES = spans.RESPONSES
LOGPROBS = "message.output_text.logprobs"
# Events that end a stream: each carries the whole response.
TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})

# The shapes of what the proxy reads (see proxy.shapes: a request that does not fit is refused, a response or
# event that does not fit is relayed as it came and recorded without the parts that do not).
REQUEST = Obj(
    {
        "model": str,
        "input": (str, Many(Obj({"type": str, "role": str}))),
        "instructions": str,
        "previous_response_id": str,
        "conversation": (str, Obj({"id": str})),
        "stream": bool,
        "store": bool,
        "include": Many(str),
        "max_output_tokens": Whole(0),
        "temperature": NUMBER,
        "top_p": NUMBER,
        "tools": Many(Obj({"type": str}, required=("type",))),
    }
)
_LOGPROBS = Many(Obj({"logprob": NUMBER}, required=("logprob",)))
_PART = Obj({"type": str, "text": str, "logprobs": _LOGPROBS})
_ITEM = Obj({"type": str, "content": Many(_PART), "name": str, "call_id": str, "arguments": str})
_TOKENS = Many(Obj({"tokens": Many(Whole())}))
_RESPONSE = Obj(
    {
        "id": str,
        "object": str,
        "model": str,
        "status": str,
        "output": Many(_ITEM),
        "usage": Obj({"input_tokens": Whole(), "output_tokens": Whole()}),
        "incomplete_details": Obj({"reason": str}),
        "input_messages": _TOKENS,
        "output_messages": _TOKENS,
    },
    required=("output",),
)
_INDEX = Whole(0, shapes.MAX_INDEX)
EVENT = Obj(
    {
        "type": str,
        "response": _RESPONSE,
        "item": _ITEM,
        "part": _PART,
        "output_index": _INDEX,
        "content_index": _INDEX,
        "delta": str,
        "logprobs": _LOGPROBS,
    }
)


def parse_request(raw: bytes) -> dict[str, Any]:
    """The request body as a dict, or :class:`InvalidRequest` (``input`` may be absent when a conversation or an
    earlier response supplies it)."""
    body = parse_object(raw)
    check_shape(body, REQUEST)
    return body


# -- token capture -----------------------------------------------------------------------------------------


def ask_for_tokens(body: dict[str, Any]) -> tuple[dict[str, Any], Injected]:
    """A copy of the request that asks vLLM for the prompt's and completion's token ids and sampled logprobs."""
    body = dict(body)
    token_ids = "enable_response_messages" not in body
    if token_ids:
        body["enable_response_messages"] = True
    include = body.get("include") or []
    logprobs = isinstance(include, list) and LOGPROBS not in include
    if logprobs:
        body["include"] = [*include, LOGPROBS]
    return body, Injected(token_ids=token_ids, logprobs=logprobs)


def hide(body: dict[str, Any], injected: Injected) -> dict[str, Any]:
    """Remove, in place, what ``injected`` added from a response or a stream event."""
    nested = body.get("response")
    response: dict[str, Any] = nested if isinstance(nested, dict) else body
    if injected.token_ids:
        response.pop("input_messages", None)
        response.pop("output_messages", None)
    if injected.logprobs:
        if "logprobs" in body and body.get("type", "").startswith("response.output_text"):
            body["logprobs"] = []
        for part in _text_parts([body.get("item"), body.get("part"), *(response.get("output") or ())]):
            if "logprobs" in part:
                part["logprobs"] = [] if body is not response else None
    return body


def _text_parts(items: list[Any]) -> list[dict[str, Any]]:
    parts = []
    for item in items:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "output_text":
            parts.append(item)
        for part in item.get("content") or ():
            if isinstance(part, dict) and part.get("type") == "output_text":
                parts.append(part)
    return parts


def hidden_copy(response: dict[str, Any], injected: Injected) -> dict[str, Any]:
    """The response as the client saw it, for the record, leaving the original (with token ids) intact."""
    return hide(copy.deepcopy(response), injected) if injected else response


# -- streams -----------------------------------------------------------------------------------------------


def reassemble(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The response a non-streaming call would have returned: the terminal event's, or for a stream that broke
    off, the last response seen with the items completed or begun since."""
    response: dict[str, Any] | None = None
    items: dict[int, dict[str, Any]] = {}
    for event in events:
        kind = event.get("type", "")
        if isinstance(event.get("response"), dict):
            response = event["response"]
            if kind in TERMINAL:
                items = {}
            continue
        index = event.get("output_index")
        if not isinstance(index, int):
            continue
        if kind in ("response.output_item.added", "response.output_item.done") and isinstance(event.get("item"), dict):
            items[index] = copy.deepcopy(event["item"])
        elif kind == "response.output_text.delta" and index in items:
            parts = items[index].setdefault("content", [])
            position = event.get("content_index", 0)
            while len(parts) <= position:
                parts.append({"type": "output_text", "text": "", "annotations": []})
            parts[position]["text"] = parts[position].get("text", "") + str(event.get("delta") or "")
            if event.get("logprobs"):
                parts[position].setdefault("logprobs", []).extend(event["logprobs"])
        elif kind == "response.function_call_arguments.delta" and index in items:
            items[index]["arguments"] = items[index].get("arguments", "") + str(event.get("delta") or "")
    if response is None:
        return None
    if items:
        output = list(response.get("output") or [])
        for index in sorted(items):
            if index < len(output):
                output[index] = items[index]
            else:
                output.append(items[index])
        response = {**response, "output": output}
    return response


def ends_stream(event: dict[str, Any]) -> bool:
    return event.get("type") in TERMINAL


def stream_error(event: dict[str, Any]) -> dict[str, Any] | None:
    """The error an ``error`` or ``response.failed`` event reports, else None."""
    if event.get("type") == "error":
        return {"type": event.get("code") or "upstream_error", "message": event.get("message")}
    if event.get("type") == "response.failed":
        error = (event.get("response") or {}).get("error") or {}
        return {"type": error.get("code") or "response_failed", "message": error.get("message")}
    return None


# -- what a span records -----------------------------------------------------------------------------------


def extract(response: dict[str, Any]) -> ResponseFields:
    """The span fields of a response: usage, status, and vLLM's token ids and sampled logprobs when present."""
    usage = response.get("usage") or {}
    prompt = response.get("input_messages") or []
    completion = response.get("output_messages") or []
    prompt_ids = [t for m in prompt if isinstance(m, dict) for t in m.get("tokens") or ()]
    completion_ids = [t for m in completion if isinstance(m, dict) for t in m.get("tokens") or ()]
    logprobs = [
        entry["logprob"]
        for part in _text_parts(list(response.get("output") or ()))
        for entry in part.get("logprobs") or ()
        if isinstance(entry, dict) and "logprob" in entry
    ]
    details = response.get("incomplete_details") or {}
    status = details.get("reason") or response.get("status")
    return ResponseFields(
        response_id=response.get("id"),
        response_model=response.get("model"),
        finish_reasons=[status] if status else None,
        input_tokens=usage.get("input_tokens"),
        output_tokens=usage.get("output_tokens"),
        prompt_token_ids=prompt_ids or None,
        completion_token_ids=[completion_ids] if completion_ids else None,
        completion_logprobs=[logprobs] if logprobs else None,
    )


def conversation_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat messages a request sends: its instructions, then its input items."""
    instructions = body.get("instructions")
    return to_messages(input_items(body), instructions=instructions if isinstance(instructions, str) else None)


def replies(response: dict[str, Any]) -> list[dict[str, Any]]:
    message = reply(response)
    return [message] if message is not None else []


WIRE = Wire(
    path="/responses",
    ask_for_tokens=ask_for_tokens,
    hide=hide,
    hidden_copy=hidden_copy,
    reassemble=reassemble,
    extract=extract,
    replies=replies,
    response_shape=_RESPONSE,
    chunk_shape=EVENT,
    ends_stream=ends_stream,
    stream_error=stream_error,
)

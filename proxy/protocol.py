"""What the proxy knows of the OpenAI wire format: validating requests, asking a backend for exact tokens,
hiding what the client did not ask for, reassembling streams, and reading the fields a span records.

Everything here is a pure function of JSON-like values, so it is cheap to test; a call's span is built with
:func:`extract` when the call ends, after its response has gone to the client.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import orjson

from proxy import shapes
from proxy.errors import InvalidRequest

CHAT = "chat"
TEXT_COMPLETION = "text_completion"
# The field each operation must carry besides ``model``, and its JSON type.
REQUIRED: dict[str, tuple[str, type | tuple[type, ...]]] = {
    CHAT: ("messages", list),
    TEXT_COMPLETION: ("prompt", (str, list)),
}


def parse_request(operation: str, raw: bytes) -> dict[str, Any]:
    """The request body as a dict, or :class:`InvalidRequest` with a message an SDK user can act on."""
    body = parse_object(raw)
    name, kind = REQUIRED[operation]
    if name not in body:
        raise InvalidRequest(f"Missing required parameter: '{name}'.", param=name)
    if not isinstance(body[name], kind) or (operation == CHAT and not body[name]):
        raise InvalidRequest(f"Invalid value for '{name}'.", param=name)
    check_shape(body, shapes.CHAT_REQUEST if operation == CHAT else shapes.TEXT_REQUEST)
    return body


def check_shape(body: dict[str, Any], shape: shapes.Shape) -> None:
    """:class:`InvalidRequest` naming the first field of ``body`` that does not fit ``shape``."""
    _, misfit = shapes.clean(body, shape)
    if misfit is not None:
        raise InvalidRequest(f"Invalid request: {misfit}.", param=misfit.path)


def parse_object(raw: bytes) -> dict[str, Any]:
    """A model call's body: a JSON object naming a ``model``, or :class:`InvalidRequest`."""
    if not raw.strip():
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"The request body must be a JSON object, not {type(body).__name__}.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("you must provide a model parameter", param="model")
    return body


@dataclass(frozen=True, slots=True)
class Injected:
    """What the proxy added to a request, and so must remove from what the client receives."""

    token_ids: bool = False
    logprobs: bool = False
    usage: bool = False

    def __bool__(self) -> bool:
        return self.token_ids or self.logprobs or self.usage


NOTHING = Injected()


def ask_for_tokens(operation: str, body: dict[str, Any]) -> tuple[dict[str, Any], Injected]:
    """A copy of the request that asks a vLLM backend for token ids, sampled-token logprobs and stream usage."""
    body = dict(body)
    token_ids = "return_token_ids" not in body
    if token_ids:
        body["return_token_ids"] = True
    if operation == CHAT:
        logprobs = not body.get("logprobs")
        if logprobs:
            body["logprobs"] = True
    else:
        logprobs = body.get("logprobs") is None
        if logprobs:
            body["logprobs"] = 0
    usage = False
    if body.get("stream"):
        options = body.get("stream_options") or {}
        if not options.get("include_usage"):
            usage = True
            body["stream_options"] = {**options, "include_usage": True}
    return body, Injected(token_ids=token_ids, logprobs=logprobs, usage=usage)


def hide(body: dict[str, Any], injected: Injected) -> dict[str, Any] | None:
    """Remove, in place, what ``injected`` added from a response or stream chunk.

    Returns None for a stream chunk that carried only usage the client did not ask for (it is not sent).
    """
    if injected.token_ids:
        body.pop("prompt_token_ids", None)
    for choice in body.get("choices") or ():
        if injected.token_ids:
            choice.pop("token_ids", None)
            choice.pop("prompt_token_ids", None)
        if injected.logprobs and "logprobs" in choice:
            choice["logprobs"] = None
    if injected.usage and "usage" in body:  # only ever injected into streams
        body.pop("usage")
        if not body.get("choices"):
            return None
    return body


# -- streams -----------------------------------------------------------------------------------------------


def reassemble(operation: str, chunks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The response a non-streaming call would have returned, rebuilt from stream chunks (tool calls too)."""
    if not chunks:
        return None
    first = chunks[0]
    out: dict[str, Any] = {
        k: v for k, v in first.items() if k not in {"choices", "usage", "object", "prompt_token_ids"}
    }
    out["object"] = "chat.completion" if operation == CHAT else "text_completion"
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        if chunk.get("usage"):
            out["usage"] = chunk["usage"]
        if chunk.get("prompt_token_ids"):
            out["prompt_token_ids"] = chunk["prompt_token_ids"]
        for delta_choice in chunk.get("choices") or ():
            index = delta_choice.get("index", 0)
            choice = choices.get(index)
            if choice is None:
                choice = choices[index] = _empty_choice(operation, index)
            _merge_choice(operation, choice, delta_choice)
    out["choices"] = [choices[i] for i in sorted(choices)]
    return out


def _empty_choice(operation: str, index: int) -> dict[str, Any]:
    if operation == CHAT:
        return {
            "index": index,
            "message": {"role": "assistant", "content": None},
            "logprobs": None,
            "finish_reason": None,
        }
    return {"index": index, "text": "", "logprobs": None, "finish_reason": None}


def _merge_choice(operation: str, choice: dict[str, Any], delta_choice: dict[str, Any]) -> None:
    if operation == CHAT:
        _merge_message(choice["message"], delta_choice.get("delta") or {})
    else:
        choice["text"] += delta_choice.get("text") or ""
    logprobs = delta_choice.get("logprobs")
    if logprobs:
        if choice["logprobs"] is None:
            choice["logprobs"] = {key: [] for key in logprobs}
        for key, values in logprobs.items():
            if isinstance(values, list):
                choice["logprobs"].setdefault(key, []).extend(values)
    if delta_choice.get("token_ids"):
        choice.setdefault("token_ids", []).extend(delta_choice["token_ids"])
    if delta_choice.get("prompt_token_ids"):
        choice["prompt_token_ids"] = delta_choice["prompt_token_ids"]
    if delta_choice.get("finish_reason") is not None:
        choice["finish_reason"] = delta_choice["finish_reason"]
    for key in ("stop_reason",):
        if delta_choice.get(key) is not None:
            choice[key] = delta_choice[key]


def _merge_message(message: dict[str, Any], delta: dict[str, Any]) -> None:
    for key, value in delta.items():
        if value is None:
            continue
        if key == "tool_calls":
            calls = message.setdefault("tool_calls", [])
            for part in value:
                _merge_tool_call(calls, part)
        elif isinstance(value, str) and key != "role" and isinstance(message.get(key), str | None):
            message[key] = (message.get(key) or "") + value
        else:
            message[key] = value


def _merge_tool_call(calls: list[dict[str, Any]], part: dict[str, Any]) -> None:
    index = part.get("index", len(calls))
    while len(calls) <= index:
        calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
    call = calls[index]
    if part.get("id"):
        call["id"] = part["id"]
    if part.get("type"):
        call["type"] = part["type"]
    function = part.get("function") or {}
    if function.get("name"):
        call["function"]["name"] += function["name"]
    if function.get("arguments"):
        call["function"]["arguments"] += function["arguments"]


# -- what a span records -----------------------------------------------------------------------------------


@dataclass(slots=True)
class ResponseFields:
    response_id: str | None = None
    response_model: str | None = None
    finish_reasons: list[str] | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[list[int]] | None = None
    completion_logprobs: list[list[float]] | None = None


def extract(response: dict[str, Any]) -> ResponseFields:
    """The span fields of a (non-streaming or reassembled) response, token ids and logprobs included."""
    choices = response.get("choices") or []
    usage = response.get("usage") or {}
    prompt_ids = response.get("prompt_token_ids")
    if prompt_ids is None and choices:
        prompt_ids = choices[0].get("prompt_token_ids")
    token_ids = [c["token_ids"] for c in choices if c.get("token_ids") is not None]
    logprobs = [_sampled_logprobs(c.get("logprobs")) for c in choices]
    return ResponseFields(
        response_id=response.get("id"),
        response_model=response.get("model"),
        finish_reasons=[c["finish_reason"] for c in choices if c.get("finish_reason")] or None,
        input_tokens=usage.get("prompt_tokens"),
        output_tokens=usage.get("completion_tokens"),
        prompt_token_ids=prompt_ids,
        completion_token_ids=token_ids or None,
        completion_logprobs=logprobs if any(lp is not None for lp in logprobs) else None,  # type: ignore[arg-type]
    )


def _sampled_logprobs(logprobs: dict[str, Any] | None) -> list[float] | None:
    if not logprobs:
        return None
    if logprobs.get("content") is not None:  # chat
        return [entry["logprob"] for entry in logprobs["content"]]
    if logprobs.get("token_logprobs") is not None:  # completions
        return [lp if lp is not None else float("nan") for lp in logprobs["token_logprobs"]]
    return None


def hidden_copy(response: dict[str, Any], injected: Injected) -> dict[str, Any]:
    """The response as the client saw it, for the record (keeping stream usage), leaving the original intact."""
    if not (injected.token_ids or injected.logprobs):  # injected usage stays: the record keeps a stream's usage
        return response
    injected = replace(injected, usage=False)
    return hide(copy.deepcopy(response), injected) or response


# -- one API's wire format, as the relay uses it -----------------------------------------------------------

Body = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Wire:
    """How the relay reads one API: where it is posted, token capture, stream reassembly and span fields.
    Chat and text completions are here; the Responses API is :data:`proxy.responses.WIRE`."""

    path: str
    ask_for_tokens: Callable[[Body], tuple[Body, Injected]]
    hide: Callable[[Body, Injected], Body | None]
    hidden_copy: Callable[[Body, Injected], Body]
    reassemble: Callable[[list[Body]], Body | None]
    extract: Callable[[Body], ResponseFields]
    replies: Callable[[Body], list[Body]]
    response_shape: shapes.Shape  # of a whole response; what does not fit is not recorded
    chunk_shape: shapes.Shape  # of a stream's chunk or event
    ends_stream: Callable[[Body], bool]  # an event after which nothing more comes (chat streams end in [DONE])
    stream_error: Callable[[Body], Body | None]  # {"type", "message"} of an error reported mid-stream


def _chat_replies(response: Body) -> list[Body]:
    return [c["message"] for c in response.get("choices") or () if isinstance(c.get("message"), dict)]


def _stream_error(chunk: Body) -> Body | None:
    if "error" not in chunk:
        return None
    error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
    return {"type": error.get("type") or "upstream_error", "message": error.get("message")}


def _wire(operation: str, path: str) -> Wire:
    return Wire(
        path=path,
        ask_for_tokens=partial(ask_for_tokens, operation),
        hide=hide,
        hidden_copy=hidden_copy,
        reassemble=partial(reassemble, operation),
        extract=extract,
        replies=_chat_replies if operation == CHAT else lambda _: [],
        response_shape=shapes.RESPONSE,
        chunk_shape=shapes.CHUNK,
        ends_stream=lambda _: False,
        stream_error=_stream_error,
    )


WIRES = {CHAT: _wire(CHAT, "/chat/completions"), TEXT_COMPLETION: _wire(TEXT_COMPLETION, "/completions")}

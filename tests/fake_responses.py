"""The fake upstream's Responses API (``POST /v1/responses``): whole responses and typed event streams.

A request with function ``tools`` whose input does not end with a ``function_call_output`` is answered with a
call of the first tool (arguments ``{"x": 1}``); otherwise with a text message. Like OpenAI, the fake keeps the
responses it gave (unless ``store`` is false) so that ``previous_response_id`` may name them; in vLLM mode it keeps
none, like vLLM without its store, and answers 404 to a ``previous_response_id``. In vLLM mode it also honours
``enable_response_messages`` (the prompt's and the completion's token ids) and ``include`` of
``message.output_text.logprobs``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

PROMPT_IDS = [1, 2, 3, 4]
LOGPROB = -0.5
LOGPROBS = "message.output_text.logprobs"


def calls_tool(body: dict[str, Any]) -> str | None:
    """The name of the tool the fake calls for this request, or None when it answers with text."""
    tools = [t for t in body.get("tools") or () if t.get("type") == "function"]
    items = body.get("input") if isinstance(body.get("input"), list) else []
    if not tools or (items and items[-1].get("type") == "function_call_output"):
        return None
    return str(tools[0]["name"])


def response(body: dict[str, Any], pieces: list[str], *, vllm: bool, status: str = "completed") -> dict[str, Any]:
    """The whole response to ``body``: its text is ``pieces`` joined (one token per piece)."""
    ident = f"resp_{uuid.uuid4().hex}"  # random, as vLLM's are: how random ids index is what the soak measures
    tool = calls_tool(body)
    logprobs = vllm and LOGPROBS in (body.get("include") or ())
    if tool is not None:
        item: dict[str, Any] = {
            "type": "function_call",
            "id": f"fc_{ident}",
            "call_id": f"call_{ident}",
            "name": tool,
            "arguments": '{"x": 1}',
            "status": "completed",
        }
        pieces = ['{"x"', ": ", "1", "}"]
    else:
        part: dict[str, Any] = {"type": "output_text", "text": "".join(pieces), "annotations": []}
        part["logprobs"] = [_logprob(p) for p in pieces] if logprobs else ([] if vllm else None)
        item = {"type": "message", "id": f"msg_{ident}", "role": "assistant", "status": "completed", "content": [part]}
    out: dict[str, Any] = {
        "id": ident,
        "object": "response",
        "created_at": int(time.time()),
        "model": body["model"],
        "status": status,
        "output": [item] if status != "in_progress" else [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "previous_response_id": body.get("previous_response_id"),
        "usage": {"input_tokens": 4, "output_tokens": len(pieces), "total_tokens": 4 + len(pieces)},
    }
    if vllm:
        out["input_messages"] = out["output_messages"] = None
        if body.get("enable_response_messages"):
            tokens = [100 + i for i in range(len(pieces))]
            out["input_messages"] = [{"message": "prompt", "tokens": PROMPT_IDS, "type": "raw_message_tokens"}]
            out["output_messages"] = [{"message": "".join(pieces), "tokens": tokens, "type": "raw_message_tokens"}]
    return out


def _logprob(token: str) -> dict[str, Any]:
    return {"token": token, "logprob": LOGPROB, "bytes": list(token.encode()), "top_logprobs": []}


def events(body: dict[str, Any], pieces: list[str], *, vllm: bool) -> tuple[list[dict[str, Any]], int]:
    """The stream answering ``body``, as events; and the index of its first delta event (faults count from it)."""
    final = response(body, pieces, vllm=vllm)
    item = final["output"][0]
    started = {**final, "status": "in_progress", "output": [], "usage": None}
    start = [{"type": "response.created", "response": started}, {"type": "response.in_progress", "response": started}]
    where = {"output_index": 0, "item_id": item["id"]}
    deltas: list[dict[str, Any]] = []
    if item["type"] == "function_call":
        start.append({"type": "response.output_item.added", "output_index": 0, "item": {**item, "arguments": ""}})
        for piece in ['{"x"', ": ", "1", "}"]:
            deltas.append({"type": "response.function_call_arguments.delta", **where, "delta": piece})
        end = [{"type": "response.function_call_arguments.done", **where, "arguments": item["arguments"]}]
    else:
        part = item["content"][0]
        empty = {**part, "text": "", "logprobs": [] if vllm else None}
        start.append({"type": "response.output_item.added", "output_index": 0, "item": {**item, "content": []}})
        start.append({"type": "response.content_part.added", **where, "content_index": 0, "part": empty})
        for piece in pieces:
            logprobs = [_logprob(piece)] if part.get("logprobs") else []
            deltas.append(
                {
                    "type": "response.output_text.delta",
                    **where,
                    "content_index": 0,
                    "delta": piece,
                    "logprobs": logprobs,
                }
            )
        end = [
            {"type": "response.output_text.done", **where, "content_index": 0, "text": part["text"]},
            {"type": "response.content_part.done", **where, "content_index": 0, "part": part},
        ]
    end.append({"type": "response.output_item.done", "output_index": 0, "item": item})
    end.append({"type": "response.completed", "response": final})
    stream = start + deltas + end
    for number, event in enumerate(stream):
        event["sequence_number"] = number
    return stream, len(start)

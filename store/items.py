"""Responses API items as chat messages: how a Responses call's conversation reads to a chat template (for the
proxy's session linking and for training records); and the text of a chat message.

An assistant's output items in a row (a message, function calls) become one assistant message with
``tool_calls``; a ``function_call_output`` becomes a ``tool`` message; reasoning items are left out; the
``developer`` role is the chat ``system`` role. Pure functions of JSON-like values.
"""

from __future__ import annotations

from typing import Any

# Roles a chat template knows; the Responses API's "developer" is the system prompt of chat models.
ROLES = {"developer": "system"}
TEXT_PARTS = frozenset({"input_text", "output_text", "text", "refusal"})


def conversation_id(body: dict[str, Any]) -> str | None:
    """The ``conversation`` the call belongs to: an id, or an object with one."""
    conversation = body.get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
    return conversation if isinstance(conversation, str) and conversation else None


def input_items(body: dict[str, Any]) -> list[Any]:
    """The request's ``input`` as a list of items (a string is one user message)."""
    given = body.get("input")
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    return list(given) if isinstance(given, list) else []


def to_messages(items: list[Any], *, instructions: str | None = None) -> list[dict[str, Any]]:
    """Chat messages for a list of Responses items: an assistant's output items (message, function calls) in a
    row become one assistant message with ``tool_calls``; a ``function_call_output`` becomes a ``tool`` message;
    reasoning items are left out. ``instructions`` lead as the system message."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    for item in items:
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if kind == "message":
            role = ROLES.get(item.get("role", "user"), item.get("role", "user"))
            content = _content(item.get("content"))
            if role == "assistant":
                _assistant(messages)["content"] = content
            else:
                messages.append({"role": role, "content": content})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function"}
            call["function"] = {"name": item.get("name"), "arguments": item.get("arguments", "")}
            _assistant(messages).setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            output = item.get("output")
            content = output if isinstance(output, str) else _content(output)
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": content})
        elif kind != "reasoning":
            messages.append(item)  # an item chat has no form for (a built-in tool's call...), as it came
    return messages


def _assistant(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The assistant message that the current output items join: the last one, unless something followed it."""
    if messages and messages[-1].get("role") == "assistant" and "tool_call_id" not in messages[-1]:
        return messages[-1]
    messages.append({"role": "assistant", "content": None})
    return messages[-1]


def _content(content: Any) -> Any:
    """Text parts joined into one string, as chat templates expect; other parts kept as they are."""
    if not isinstance(content, list):
        return content
    if all(isinstance(p, dict) and p.get("type") in TEXT_PARTS for p in content):
        return "".join(str(p.get("text") or p.get("refusal") or "") for p in content)
    return content


def reply(response: dict[str, Any]) -> dict[str, Any] | None:
    """The response's output as one assistant chat message, or None when it has none."""
    messages = to_messages(list(response.get("output") or ()))
    return messages[0] if len(messages) == 1 and messages[0].get("role") == "assistant" else None


def content_text(content: Any) -> str:
    """A chat message's text, its text parts joined when it has parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""

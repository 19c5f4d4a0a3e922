"""Reward hooks that ship with Lightwire; name them in the settings as ``optimizers.rewards:<function>``.

* ``json_valid`` (span hook): 1.0 when the call's output is valid JSON, 0.0 when not. The assistant's content must
  parse (and, when the request asked for ``response_format`` ``json_schema``, validate against the schema, if
  ``jsonschema`` is installed; it comes with litellm), and so must the arguments of every tool call; a reply that
  only calls tools is judged by its arguments. With several choices, the share of valid ones. No score for a call
  without a response (an upstream failure).
* ``ruler`` (group hook): an LLM judge in the style of OpenPipe's RULER. It is shown the task and the sessions of a
  group, compactly (what they share once, then each one's own messages), and asked for a score in [0, 1] for each,
  relative to each other. The judge is the ``judge_model`` setting, any litellm model name; its key (and base URL)
  come from the provider's environment variables, e.g. ``OPENAI_API_KEY`` and ``OPENAI_BASE_URL``. The sidecar
  hands the hook its settings and the client it asks providers with (:mod:`proxy.hooks`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from optimizers.ports import Judging, ProviderCall
from store.items import content_text

log = logging.getLogger(__name__)

# -- json_valid -------------------------------------------------------------------------------------------------


def json_valid(span: Mapping[str, Any]) -> float | None:
    response = span.get("response")
    choices = response.get("choices") if isinstance(response, dict) else None
    if not choices:
        return None
    check = _schema_check(_requested_schema(span.get("request")))
    return sum(_valid_choice(c, check) for c in choices) / len(choices)


def _valid_choice(choice: Any, check: Callable[[Any], bool] | None) -> bool:
    if not isinstance(choice, dict):
        return False
    message = choice.get("message")
    if not isinstance(message, dict):  # a text completion
        return _valid_json(choice.get("text"), check)
    calls = message.get("tool_calls") or []
    content = content_text(message.get("content"))
    if (content or not calls) and not _valid_json(content, check):
        return False
    return all(_valid_json((c.get("function") or {}).get("arguments"), None) for c in calls if isinstance(c, dict))


def _valid_json(text: Any, check: Callable[[Any], bool] | None) -> bool:
    if not isinstance(text, str):
        return False
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return check is None or check(value)


def _requested_schema(request: Any) -> dict[str, Any] | None:
    response_format = request.get("response_format") if isinstance(request, dict) else None
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    schema = (response_format.get("json_schema") or {}).get("schema")
    return schema if isinstance(schema, dict) else None


def _schema_check(schema: dict[str, Any] | None) -> Callable[[Any], bool] | None:
    """``validator.is_valid`` for the schema; None (parse only) without jsonschema or with a broken schema."""
    if schema is None:
        return None
    try:
        import jsonschema
    except ImportError:
        return None
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError:
        log.debug("json_valid: the request's schema is not a valid JSON schema; parsing only")
        return None
    is_valid: Callable[[Any], bool] = cls(schema).is_valid
    return is_valid


# -- ruler ------------------------------------------------------------------------------------------------------

RUBRIC = """\
- An attempt that achieves the goal of the task must score clearly higher than one that does not.
- Of two attempts that achieve it, the one that gets there more directly (no wasted steps, no detours) scores higher.
- Make score differences match quality differences: small when two attempts are nearly as good, large when one is
  clearly better.
- Give partial credit for real progress towards the goal.
- Errors, refusals, malformed output and made-up facts count against an attempt."""

SYSTEM = """\
You grade attempts by an AI agent. Every attempt below was given the same task. Read them all, work out the \
task's goal, and give each attempt a score between 0 and 1, comparing the attempts with each other.

Grading standards:
{rubric}"""

ANSWER_FORMAT = """\
Answer with JSON only, one entry per attempt, in this shape:
{"scores": [{"trajectory_id": "1", "explanation": "<one or two sentences>", "score": <0 to 1>}, ...]}"""

MAX_MESSAGE_CHARS = 4_000  # longer message texts are cut in the middle


async def ruler(sessions: list[dict[str, Any]], *, config: Judging, complete: ProviderCall) -> list[float]:
    """Scores for a group of sessions of one task, from the ``judge_model``, asked through ``complete``."""
    return await judge(sessions, model=config.judge_model, complete=complete)


async def judge(
    sessions: Sequence[Mapping[str, Any]],
    *,
    model: str,
    complete: ProviderCall,
    rubric: str = RUBRIC,
    **provider_args: Any,
) -> list[float]:
    """Ask ``model`` (a litellm name) through ``complete`` to score the sessions relative to each other;
    ``provider_args`` go with the request."""
    response = await complete(model, judge_messages(sessions, rubric), **provider_args)
    content = response["choices"][0]["message"]["content"]
    return parse_scores(content or "", len(sessions))


def judge_messages(sessions: Sequence[Mapping[str, Any]], rubric: str = RUBRIC) -> list[dict[str, str]]:
    transcripts = [transcript(s.get("spans") or ()) for s in sessions]
    shared = _shared_prefix(transcripts)
    parts = []
    task = next((s.get("task") for s in sessions if s.get("task")), None)
    if task and not any(m.get("role") == "user" and m.get("content") == _cut(task) for m in shared):
        parts.append(f"<task>\n{_cut(task)}\n</task>")
    if shared:
        parts.append("What every attempt starts with:\n<context>\n" + _lines(shared) + "\n</context>")
    for i, messages in enumerate(transcripts, 1):
        parts.append(f'<trajectory id="{i}">\n{_lines(messages[len(shared) :])}\n</trajectory>')
    parts.append(ANSWER_FORMAT)
    return [
        {"role": "system", "content": SYSTEM.format(rubric=rubric)},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


def transcript(spans: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A session's conversation, compact: each call's new messages, then its reply."""
    out: list[dict[str, Any]] = []
    for span in spans:
        request: Mapping[str, Any] = span["request"] if isinstance(span.get("request"), dict) else {}
        messages = [compact(m) for m in request.get("messages") or () if isinstance(m, dict)]
        if not messages and isinstance(request.get("prompt"), str):
            messages = [{"role": "user", "content": _cut(request["prompt"])}]
        out.extend(messages[len(out) :] if messages[: len(out)] == out else messages)
        out.append(_reply(span))
    return out


def compact(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message with what a judge needs: role, text, tool calls (name and arguments), tool name."""
    out: dict[str, Any] = {"role": message.get("role"), "content": _cut(content_text(message.get("content")))}
    if message.get("name"):
        out["name"] = message["name"]
    calls = [c.get("function") or {} for c in message.get("tool_calls") or () if isinstance(c, dict)]
    if calls:
        out["tool_calls"] = [{"name": f.get("name"), "arguments": _cut(f.get("arguments") or "")} for f in calls]
    return out


def _reply(span: Mapping[str, Any]) -> dict[str, Any]:
    response = span.get("response")
    choices = (response.get("choices") if isinstance(response, dict) else None) or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    if isinstance(choice.get("message"), dict):
        return compact(choice["message"])
    if isinstance(choice.get("text"), str):
        return {"role": "assistant", "content": _cut(choice["text"])}
    error = span.get("error_type") or "no response"
    return {"role": "assistant", "content": f"[the call failed: {error}]"}


def parse_scores(text: str, n: int) -> list[float]:
    """The judge's scores for trajectories 1..n, clamped to [0, 1]; a ValueError when any is missing."""
    data = _json_in(text)
    entries = data.get("scores", data) if isinstance(data, dict) else data
    found: dict[int, float] = {}
    if isinstance(entries, dict):
        entries = [{"trajectory_id": k, "score": v} for k, v in entries.items()]
    if not isinstance(entries, list):
        raise ValueError(f"the judge's answer has no scores: {text[:200]!r}")
    for i, entry in enumerate(entries, 1):
        ident: Any = i
        score: Any = entry
        if isinstance(entry, dict):
            ident, score = entry.get("trajectory_id", entry.get("id", i)), entry.get("score")
        if isinstance(score, dict):
            score = score.get("score")
        digits = re.search(r"\d+", str(ident))
        if digits and isinstance(score, int | float) and not isinstance(score, bool):
            found[int(digits.group())] = min(1.0, max(0.0, float(score)))
    missing = [i for i in range(1, n + 1) if i not in found]
    if missing:
        raise ValueError(f"the judge gave no score for trajectories {missing}: {text[:200]!r}")
    return [found[i] for i in range(1, n + 1)]


def _json_in(text: str) -> Any:
    """The JSON in a model's answer: the whole text, a fenced block, or the outermost braces."""
    candidates = [text, *re.findall(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            return orjson.loads(candidate.strip())
        except orjson.JSONDecodeError:
            continue
    raise ValueError(f"the judge's answer is not JSON: {text[:200]!r}")


def _shared_prefix(transcripts: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The messages every transcript starts with, leaving each at least its last message."""
    if len(transcripts) < 2:
        return []
    limit = min(len(t) for t in transcripts) - 1
    n = 0
    while n < limit and all(t[n] == transcripts[0][n] for t in transcripts):
        n += 1
    return transcripts[0][:n]


def _lines(messages: list[dict[str, Any]]) -> str:
    return "\n".join(orjson.dumps(m).decode() for m in messages)


def _cut(text: str) -> str:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    head, tail = MAX_MESSAGE_CHARS * 3 // 4, MAX_MESSAGE_CHARS // 4
    return f"{text[:head]} [... {len(text) - head - tail} characters cut ...] {text[-tail:]}"

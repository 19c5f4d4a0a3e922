"""``POST /feedback`` and ``POST /sessions/<id>/end``: how the service around an agent says how things went.

Feedback names its target by exactly one of ``span_id``, ``response_id`` (the ``id`` the agent saw) or
``session_id``, and carries a finite ``reward`` (true/false count as 1/0), an optional ``name`` (several named
rewards per target; default ``"reward"``), ``comment`` and ``feedback_id``. A repeated ``feedback_id`` gets the
first answer again and writes nothing. Targets are found among recent calls in memory first, so feedback that
arrives before its span is written attaches all the same, then in the store, so late feedback does too.

In a fleet (``--share``), feedback whose target this sidecar has never seen is accepted all the same (202, with
``"attached": false``) and shipped: another sidecar may have served that call, and the learner joins the two.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from proxy.errors import InvalidRequest, NotFound, json_response
from proxy.sessions import Sessions
from proxy.telemetry import time_ordered_hex
from store import queries
from store.feedback import Feedback, SessionEnd
from store.writer import Writer

TARGETS = ("span_id", "response_id", "session_id")
DEFAULT_NAME = "reward"
ANSWERS_KEPT = 10_000  # answers to recent feedback kept for repeats (~1 KB each); older ones come from the store


class FeedbackDesk:
    """Takes feedback and session ends for one proxy process."""

    def __init__(self, writer: Writer, sessions: Sessions, *, accept_unknown: bool = False) -> None:
        self.writer = writer
        self.sessions = sessions
        self.accept_unknown = accept_unknown
        self._answers: OrderedDict[str, dict[str, Any]] = OrderedDict()

    async def post(self, body: dict[str, Any], *, source: str = "api") -> dict[str, Any]:
        feedback_id = _optional_str(body, "feedback_id")
        if feedback_id is not None:
            earlier = await self._earlier_answer(feedback_id)
            if earlier is not None:
                return earlier
        targets = [key for key in TARGETS if body.get(key) is not None]
        if len(targets) != 1:
            raise InvalidRequest("Name exactly one target: span_id, response_id or session_id.")
        target = _optional_str(body, targets[0]) or ""
        value = reward_value(body.get("reward"))
        name = _optional_str(body, "name") or DEFAULT_NAME
        comment = _optional_str(body, "comment")
        found = await self._resolve(targets[0], target)
        span_id, session_id = found or self._unattached(targets[0], target)
        await self.writer.reserve()
        earlier = self._answers.get(feedback_id) if feedback_id else None
        if earlier is not None:  # the same feedback_id arrived twice at once
            self.writer.unreserve()
            return earlier
        row = Feedback(
            feedback_id=feedback_id or "fb-" + time_ordered_hex(12),
            span_id=span_id,
            session_id=session_id,
            name=name,
            value=value,
            comment=comment,
            source=source,
            created_at=datetime.now(UTC),
            response_id=target if found is None and targets[0] == "response_id" else None,
        )
        self.writer.submit(row)
        answer = {
            "object": "feedback",
            "id": row.feedback_id,
            "span_id": span_id,
            "session_id": session_id,
            "name": name,
            "value": value,
            "comment": comment,
            "created_at": row.created_at.isoformat(),
            "attached": found is not None,
        }
        self._answers[row.feedback_id] = answer
        while len(self._answers) > ANSWERS_KEPT:
            self._answers.popitem(last=False)
        return answer

    async def end_session(self, session_id: str, reason: str = "ended") -> None:
        now = datetime.now(UTC)
        ended = self.sessions.end(session_id)
        turns: int | None
        started: datetime | None
        if ended is not None:
            _, turns, started = ended
        else:  # ended before (its count stays), or unknown here (in a fleet, perhaps served by another sidecar)
            recorded = await self._in_store(queries.session_record, session_id)
            if recorded is None and not self.accept_unknown:
                raise NotFound(f"No session {session_id!r}.")
            turns, started = recorded or (None, None)
        await self.writer.reserve()
        self.writer.submit(SessionEnd(session_id, now, reason, turns, started))

    def _unattached(self, kind: str, target: str) -> tuple[str | None, str | None]:
        """What a row can say about a target recorded elsewhere: its span id or session id (a response id has its
        own column)."""
        return (target if kind == "span_id" else None), (target if kind == "session_id" else None)

    async def _earlier_answer(self, feedback_id: str) -> dict[str, Any] | None:
        return self._answers.get(feedback_id) or await self._in_store(queries.feedback_answer, feedback_id)

    async def _resolve(self, kind: str, target: str) -> tuple[str | None, str | None] | None:
        """``(span_id, session_id)`` of the target; None when it is unknown here and may be elsewhere (a fleet),
        else :class:`NotFound`."""
        if kind == "session_id":
            if self.sessions.is_known(target) or await self._in_store(queries.session_record, target):
                return None, target
        else:
            found = self.sessions.find_call(target)
            if found is None:
                key = {"span_id": target} if kind == "span_id" else {"response_id": target}
                found = await self._in_store(lambda con: queries.find_call(con, **key))
            if found is not None:
                return found
        if self.accept_unknown:
            return None
        raise NotFound(f"No call or session with {kind} {target!r}.", param=kind)

    async def _in_store(self, query: Any, *args: Any) -> Any:
        """Ask the store, once what was accepted before is written (a session closed as idle a moment ago may
        have its last call still in the write queue)."""
        await self.writer.flush()
        return await self.writer.read(query, *args)


def reward_value(reward: Any) -> float:
    if isinstance(reward, bool):
        return 1.0 if reward else 0.0
    if isinstance(reward, int | float) and math.isfinite(reward):
        return float(reward)
    raise InvalidRequest("reward must be a finite number, or true/false.", param="reward")


def _optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise InvalidRequest(f"{key} must be a non-empty string.", param=key)
    return value


def json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


FEEDBACK_DESK = web.AppKey("feedback_desk", FeedbackDesk)


async def post_feedback(request: web.Request) -> web.Response:
    answer = await request.app[FEEDBACK_DESK].post(json_object(await request.read()))
    return json_response(answer, status=200 if answer.get("attached", True) else 202)


async def end_session(request: web.Request) -> web.Response:
    session_id = request.match_info["session"]
    await request.app[FEEDBACK_DESK].end_session(session_id)
    return json_response({"object": "session", "id": session_id, "ended": True})

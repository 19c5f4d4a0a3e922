"""Rows of the ``feedback`` and ``sessions`` tables."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar

from store.writer import Row


@dataclass(slots=True, frozen=True)
class Feedback(Row):
    """A named reward for one call (``span_id``) or a whole session (``span_id`` null)."""

    table: ClassVar[str] = "feedback"

    feedback_id: str
    span_id: str | None
    session_id: str | None
    name: str
    value: float
    comment: str | None
    source: str
    created_at: datetime
    response_id: str | None = None  # the target, when it names a call this store has not recorded (fleet mode)


@dataclass(slots=True, frozen=True)
class SessionEnd(Row):
    """A session closed: by ``POST /sessions/<id>/end``, after the idle timeout, pushed out of the proxy's memory,
    at shutdown, or found unended after a crash (a later call reopens it, counting on from ``turns``)."""

    table: ClassVar[str] = "sessions"
    replace: ClassVar[bool] = True

    session_id: str
    ended_at: datetime
    end_reason: str  # ended | idle | shutdown | interrupted
    turns: int | None = None  # its model calls so far
    started_at: datetime | None = None  # its first call

"""Exploration where nothing succeeds yet: more background samples, hotter, for tasks every recent attempt failed.

A model that never solves a kind of task gives an optimizer nothing to learn from, and memory nothing to keep: a
first success has to appear. With ``explore_samples = E`` (0: off), when a call served by the policy belongs to
a task whose last ``explore_attempts`` rewarded sessions all scored 0 or less, the group sampler
(:mod:`proxy.groups`) asks the same version for ``E`` more answers at ``explore_temperature``, unseen by the
client, recorded as samples and scored by the span hooks like any (only span hooks can score them). With memory on,
a sample that succeeds is a trajectory the next bank keeps, so similar calls get it as a worked example at once.

A *task* is a session's question: the content of the last message of its first call (the text-to-SQL agent's
question, a tool agent's request); later calls of the session share it. Which tasks fail is read from the store
every ``REFRESH_S`` seconds, off the request path, over the last ``WINDOW`` of sessions. The CPU the samples take
is bounded: at most ``explore_budget`` samples a minute (a sliding minute); calls past it get none, counted.
``/healthz`` reports the budget, the samples of the last minute, those refused, and the failing tasks known.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from typing import Any

import duckdb

from proxy import protocol
from proxy.relay import Call
from store.writer import Writer

log = logging.getLogger(__name__)

REFRESH_S = 5.0
WINDOW = "1 hour"  # sessions older than this do not count
SESSIONS_KEPT = 100_000  # session -> task, for later calls of a session


def task_key(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


class Explorer:
    """Knows which tasks fail, and hands out exploration samples within the budget."""

    def __init__(self, *, samples: int, temperature: float, attempts: int, budget: int) -> None:
        self.samples = samples
        self.temperature = temperature
        self.attempts = attempts
        self.budget = budget
        self.failing: frozenset[str] = frozenset()
        self.refused = 0
        self.sampled = 0
        self._recent: deque[float] = deque()  # when each sample of the last minute was handed out
        self._tasks: OrderedDict[str, str] = OrderedDict()  # session -> task

    def wanted(self, call: Call) -> int:
        """How many exploration samples ``call`` gets (0: its task is not failing, or the budget is spent)."""
        task = self._task_of(call)
        if task is None or task not in self.failing:
            return 0
        now = time.monotonic()
        while self._recent and now - self._recent[0] > 60.0:
            self._recent.popleft()
        granted = min(self.samples, self.budget - len(self._recent))
        if granted < self.samples:
            self.refused += self.samples - max(granted, 0)
        for _ in range(max(granted, 0)):
            self._recent.append(now)
        self.sampled += max(granted, 0)
        return max(granted, 0)

    def _task_of(self, call: Call) -> str | None:
        session = call.session_id
        if call.turn_index == 0 and call.operation == protocol.CHAT:
            messages = call.body.get("messages") or []
            content = messages[-1].get("content") if messages and isinstance(messages[-1], dict) else None
            if not isinstance(content, str) or session is None:
                return None
            self._tasks[session] = task_key(content)
            while len(self._tasks) > SESSIONS_KEPT:
                self._tasks.popitem(last=False)
        return self._tasks.get(session) if session is not None else None

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "samples_per_call": self.samples,
            "temperature": self.temperature,
            "budget_per_minute": self.budget,
            "sampled_last_minute": sum(1 for t in self._recent if now - t <= 60.0),
            "sampled": self.sampled,
            "refused": self.refused,
            "failing_tasks": len(self.failing),
        }


def failing_tasks(con: duckdb.DuckDBPyConnection, attempts: int) -> frozenset[str]:
    """Tasks whose last ``attempts`` rewarded sessions (within ``WINDOW``) all have a mean reward of 0 or less."""
    rows = con.execute(
        f"""
        WITH firsts AS (
            SELECT session_id, start_time, json_extract_string(request, '$.messages[#-1].content') AS question
            FROM spans WHERE turn_index = 0 AND session_id IS NOT NULL AND operation_name = 'chat'
              AND start_time > now() - INTERVAL '{WINDOW}'
        ), rewarded AS (
            SELECT f.question, f.start_time, avg(fb.value) AS reward
            FROM firsts f JOIN feedback fb ON fb.session_id = f.session_id AND fb.name = 'reward'
            WHERE f.question IS NOT NULL GROUP BY f.session_id, f.question, f.start_time
        ), ranked AS (
            SELECT question, reward, row_number() OVER (PARTITION BY question ORDER BY start_time DESC) AS n
            FROM rewarded
        )
        SELECT question FROM ranked WHERE n <= $attempts
        GROUP BY question HAVING count(*) >= $attempts AND max(reward) <= 0
        """,
        {"attempts": attempts},
    ).fetchall()
    return frozenset(task_key(question) for (question,) in rows)


@contextlib.asynccontextmanager
async def exploring(explorer: Explorer, writer: Writer) -> AsyncIterator[Explorer]:
    """Keep ``explorer.failing`` up to date from the store for an app's lifetime."""

    def read() -> frozenset[str]:
        with writer.cursor() as con:
            return failing_tasks(con, explorer.attempts)

    async def refresh() -> None:
        while True:
            try:
                explorer.failing = await asyncio.to_thread(read)
            except duckdb.Error:
                log.exception("exploration: could not read which tasks fail")
            await asyncio.sleep(REFRESH_S)

    task = asyncio.create_task(refresh())
    try:
        yield explorer
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

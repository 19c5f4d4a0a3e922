"""Reward hooks: functions named in the settings that score calls and sessions in the background.

Each hook is named ``module:function`` and is of one of three kinds:

* **span hooks** (``span_hooks``) get one committed call as a dict: the ``spans`` columns, with ``request`` and
  ``response`` parsed from JSON;
* **session hooks** (``session_hooks``) get ``{"session_id", "task", "spans": [...]}`` when a session ends
  (``POST /sessions/<id>/end`` or the idle timeout), its spans ordered by turn;
* **group hooks** (``group_hooks``) get a list of such sessions, all of the same task, once ``group_size`` of
  them have ended, or at least two of them ``group_timeout`` seconds after the first ended; they return a list
  aligned with it. The task of a session is the text of its first call's first user message (a text
  completion's prompt): sessions that open with the same question are rollouts of the same task.

A hook returns a number or bool (written as the feedback named ``"reward"``), a dict ``{name: value}`` of named
rewards, or None (no score). Rows go to ``feedback`` like any other, with ``source = "hook:module:function"``.
A hook that takes a ``config`` keyword (or ``**kwargs``) is passed the proxy's :class:`~proxy.config.Config`, and
one that takes ``complete`` the sidecar's way to ask any LLM provider, :func:`proxy.providers.complete` (what the
LLM judge that ships, ``optimizers.rewards:ruler``, asks its ``judge_model`` through).
Sync hooks run in daemon threads (a hung one never holds up shutdown), async hooks on the event loop.

*When.* The runner learns from the store writer what it has committed (:meth:`HookRunner.committed`): calls,
and session ends. The writer commits in order, so when a session's end is committed, every call of the session
that finished before the end is committed too, and the spans a session hook reads are all there (a call still in
flight when its session is ended is not).

*Failures.* A hook that raises, returns something else or takes over ``HOOK_TIMEOUT`` seconds is logged with its
traceback and tried again after an exponential backoff, up to ``hook_retries`` attempts. Scoring never holds up
serving: jobs wait in a bounded queue (``MAX_JOBS``), and when it is full a job is dropped (logged), never a
span. At shutdown, queued jobs get ``DRAIN_TIMEOUT`` seconds; calls committed after that and groups still
filling are not scored. ``GET /healthz`` shows the counts (``hooks``: queued, running, done, failed...).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import inspect
import logging
import numbers
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import orjson
from aiohttp import web

from optimizers.ports import Judge
from proxy import providers
from proxy.config import Config
from proxy.errors import ConfigError
from proxy.feedback import FeedbackDesk
from store import queries
from store.feedback import SessionEnd
from store.items import content_text
from store.spans import SPAN_COLUMNS, Span, model_calls
from store.writer import Writer

log = logging.getLogger(__name__)

SPAN, SESSION, GROUP = "span", "session", "group"
DEFAULT_NAME = "reward"
OFFERED = frozenset({"config", "complete"})  # keywords a hook may take (see above)
HOOK_WORKERS = 4  # jobs run at once
MAX_JOBS = 10_000  # jobs waiting to run; past this, new jobs are dropped (logged)
HOOK_TIMEOUT = 300.0  # seconds one attempt of a hook may take
RETRY_DELAY = 0.5  # seconds before the first retry, doubled for each further one, with jitter
MAX_RETRY_DELAY = 30.0
DRAIN_TIMEOUT = 10.0  # seconds queued jobs get at shutdown
GROUP_TIMEOUT = 600.0  # seconds after its first session ended that a partial group (2 or more) is scored
MAX_GROUPS = 10_000  # tasks whose group is filling; past this, the oldest is given up
DROP_LOG_EVERY = 1_000


@dataclass(frozen=True, slots=True)
class Hook:
    name: str  # module:function
    kind: str  # span | session | group
    fn: Callable[..., Any]
    keywords: frozenset[str]  # the keywords offered to hooks (OFFERED) that this one takes

    @property
    def source(self) -> str:
        return "hook:" + self.name

    async def __call__(self, payload: Any, config: Config) -> Any:
        offered = {"config": config, "complete": providers.complete}
        kwargs = {name: value for name, value in offered.items() if name in self.keywords}
        if inspect.iscoroutinefunction(self.fn):
            result = await self.fn(payload, **kwargs)
        else:
            result = await _in_thread(self.fn, payload, **kwargs)
        return await result if inspect.isawaitable(result) else result


def judges(names: tuple[str, ...], config: Config) -> tuple[Judge, ...]:
    """The optimizer's judges of offline evaluations: these span hooks, each answer scored as ``"reward"`` (or the
    hook's only named reward)."""
    return tuple(_judge(load_hook(name, "eval"), config) for name in names)


def _judge(hook: Hook, config: Config) -> Judge:
    async def score(span: dict[str, Any]) -> float | None:
        scored = rewards(await hook(span, config))
        return scored.get(DEFAULT_NAME, next(iter(scored.values()))) if scored else None

    return Judge(hook.name, score)


def load_hook(name: str, kind: str) -> Hook:
    """Import the function named ``module:function``; a :class:`ConfigError` says what is wrong with the name."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{kind} hook {name!r}: name it as module:function, e.g. optimizers.rewards:json_valid")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{kind} hook {name!r}: cannot import {module_name} ({exc})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{kind} hook {name!r}: {module_name} has no function {attr}")
    return Hook(name, kind, fn, _keywords(fn))


@dataclass(slots=True)
class Job:
    hook: Hook | None  # None: put an ended session into its task's group
    span: Span | None = None
    sessions: tuple[str, ...] = ()
    key: str = field(default_factory=lambda: os.urandom(8).hex())  # makes a retry's feedback ids the same

    def describe(self) -> str:
        return f"span {self.span.span_id}" if self.span is not None else "session " + ", ".join(self.sessions)


@dataclass(slots=True)
class _Group:
    task: str
    sessions: list[str] = field(default_factory=list)
    since: float = field(default_factory=time.monotonic)


class HookRunner:
    """Runs the configured reward hooks of one proxy process."""

    def __init__(self, config: Config, *, group_timeout: float = GROUP_TIMEOUT, max_jobs: int = MAX_JOBS) -> None:
        self.config = config
        self.group_timeout = group_timeout
        kinds = ((SPAN, config.span_hooks), (SESSION, config.session_hooks), (GROUP, config.group_hooks))
        self.hooks = {kind: tuple(load_hook(name, kind) for name in names) for kind, names in kinds}
        self.done = self.failed = self.retried = self.dropped = self.running = 0
        self._queue: asyncio.Queue[Job] = asyncio.Queue(max_jobs)
        self._groups: OrderedDict[str, _Group] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: Writer | None = None
        self._desk: FeedbackDesk | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def active(self) -> bool:
        return any(self.hooks.values())

    def stats(self) -> dict[str, int]:
        return {
            "queued": self._queue.qsize(),
            "running": self.running,
            "done": self.done,
            "failed": self.failed,
            "retried": self.retried,
            "dropped": self.dropped,
            "groups_filling": len(self._groups),
        }

    # -- life cycle -------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def run(self, writer: Writer, desk: FeedbackDesk) -> AsyncIterator[None]:
        """Run the hooks while the block runs (an aiohttp cleanup context's body)."""
        self._writer, self._desk = writer, desk
        self._tasks = [asyncio.create_task(self._work()) for _ in range(HOOK_WORKERS)]
        if self.hooks[GROUP]:
            self._tasks.append(asyncio.create_task(self._sweep_groups()))
        self._loop = asyncio.get_running_loop()
        try:
            yield
        finally:
            await self._stop()

    async def _stop(self) -> None:
        try:
            await asyncio.wait_for(self._queue.join(), DRAIN_TIMEOUT)
        except TimeoutError:
            log.warning("reward hooks: %d jobs not run at shutdown", self._queue.qsize() + self.running)
        self._loop = None
        if self._groups:
            log.info("reward hooks: %d groups still filling are not scored", len(self._groups))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- what the store committed (writer thread) and what follows (event loop) -------------------------------

    def committed(self, records: Sequence[object]) -> None:
        """The writer's ``on_commit``: hand committed calls and session ends to the event loop. Thread-safe."""
        loop = self._loop
        if loop is None:
            return
        spans = model_calls(records) if self.hooks[SPAN] else []
        ended = [r.session_id for r in records if isinstance(r, SessionEnd)]
        if spans or (ended and (self.hooks[SESSION] or self.hooks[GROUP])):
            with contextlib.suppress(RuntimeError):  # the loop is closing: nothing more will be scored
                loop.call_soon_threadsafe(self._accept, spans, ended)

    def _accept(self, spans: list[Span], ended: list[str]) -> None:
        if self._loop is None:
            return
        for span in spans:
            for hook in self.hooks[SPAN]:
                self._enqueue(Job(hook, span=span))
        for session_id in ended:
            self.session_ended(session_id)

    def session_ended(self, session_id: str) -> None:
        """Queue the session hooks of an ended session whose spans are committed, and group it by task."""
        for hook in self.hooks[SESSION]:
            self._enqueue(Job(hook, sessions=(session_id,)))
        if self.hooks[GROUP]:
            self._enqueue(Job(None, sessions=(session_id,)))

    def _enqueue(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped % DROP_LOG_EVERY == 1:
                log.warning(
                    "reward hooks: queue full, scoring job for %s dropped (%d so far)", job.describe(), self.dropped
                )

    # -- running jobs -----------------------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            self.running += 1
            try:
                if job.hook is None:
                    await self._join_group(job.sessions[0])
                else:
                    await self._run(job, job.hook)
            except Exception:
                log.exception("reward hooks: job for %s failed", job.describe())
            finally:
                self.running -= 1
                self._queue.task_done()

    async def _run(self, job: Job, hook: Hook) -> None:
        attempts = max(1, self.config.hook_retries)
        for attempt in range(1, attempts + 1):
            try:
                await asyncio.wait_for(self._attempt(job, hook), HOOK_TIMEOUT)
            except Exception:
                if attempt == attempts:
                    self.failed += 1
                    log.error(
                        "reward hook %s gave up on %s after %d attempts",
                        hook.name,
                        job.describe(),
                        attempts,
                        exc_info=True,
                    )
                    return
                delay = min(RETRY_DELAY * 2 ** (attempt - 1), MAX_RETRY_DELAY) * random.uniform(0.5, 1.0)
                self.retried += 1
                log.warning(
                    "reward hook %s failed on %s (attempt %d of %d); trying again in %.1f s",
                    hook.name,
                    job.describe(),
                    attempt,
                    attempts,
                    delay,
                    exc_info=True,
                )
                await asyncio.sleep(delay)
            else:
                self.done += 1
                return

    async def _attempt(self, job: Job, hook: Hook) -> None:
        assert self._desk is not None
        targets: list[dict[str, str]]
        if job.span is not None:
            payload: Any = span_dict({name: getattr(job.span, name) for name in SPAN_COLUMNS})
            targets = [{"span_id": job.span.span_id}]
        else:
            assert self._writer is not None
            sessions = await self._writer.read(read_sessions, job.sessions)
            payload = sessions if hook.kind == GROUP else sessions[0]
            targets = [{"session_id": session_id} for session_id in job.sessions]
        result = await hook(payload, self.config)
        if hook.kind == GROUP:
            if not isinstance(result, Sequence) or isinstance(result, str) or len(result) != len(targets):
                raise TypeError(f"group hook {hook.name} must return a list of {len(targets)} scores, not {result!r}")
            scores = [rewards(r) for r in result]
        else:
            scores = [rewards(result)]
        for target, named in zip(targets, scores, strict=True):
            for name, value in named.items():
                feedback_id = "hk-" + hashlib.blake2b(f"{job.key}|{target}|{name}".encode(), digest_size=12).hexdigest()
                body = {**target, "name": name, "reward": value, "feedback_id": feedback_id}
                await self._desk.post(body, source=hook.source)

    # -- groups -----------------------------------------------------------------------------------------------

    async def _join_group(self, session_id: str) -> None:
        assert self._writer is not None
        task = await self._writer.read(read_task, session_id)
        if not task:
            log.debug("reward hooks: session %s has no user message; not grouped", session_id)
            return
        key = hashlib.blake2b(task.encode(), digest_size=16).hexdigest()
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(task)
            while len(self._groups) > MAX_GROUPS:
                _, oldest = self._groups.popitem(last=False)
                log.warning("reward hooks: too many groups filling; %d sessions given up", len(oldest.sessions))
        if session_id not in group.sessions:
            group.sessions.append(session_id)
        if len(group.sessions) >= max(1, self.config.group_size):
            del self._groups[key]
            self._score_group(group)

    async def _sweep_groups(self) -> None:
        while True:
            await asyncio.sleep(min(self.group_timeout / 4, 5.0))
            cutoff = time.monotonic() - self.group_timeout
            for key, group in list(self._groups.items()):
                if group.since < cutoff:
                    del self._groups[key]
                    if len(group.sessions) >= 2:
                        self._score_group(group)
                    else:
                        log.debug("reward hooks: no other session of task %r came; not scored", group.task[:80])

    def _score_group(self, group: _Group) -> None:
        for hook in self.hooks[GROUP]:
            self._enqueue(Job(hook, sessions=tuple(group.sessions)))


HOOKS = web.AppKey("hooks", HookRunner)


# -- payloads and results -------------------------------------------------------------------------------------


def span_dict(row: dict[str, Any]) -> dict[str, Any]:
    """A span as hooks see it: its columns, ``request`` and ``response`` parsed from JSON."""
    for key in ("request", "response"):
        if isinstance(row.get(key), str):
            with contextlib.suppress(orjson.JSONDecodeError):
                row[key] = orjson.loads(row[key])
    return row


def read_sessions(con: duckdb.DuckDBPyConnection, session_ids: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for session_id in session_ids:
        rows = queries.session_spans(con, session_id, ", ".join(SPAN_COLUMNS))
        spans = [span_dict(dict(zip(SPAN_COLUMNS, row, strict=True))) for row in rows]
        request = spans[0]["request"] if spans else None
        out.append({"session_id": session_id, "task": task_of(request), "spans": spans})
    return out


def read_task(con: duckdb.DuckDBPyConnection, session_id: str) -> str | None:
    rows = queries.session_spans(con, session_id, "request", limit=1)
    if not rows:
        return None
    with contextlib.suppress(orjson.JSONDecodeError):
        return task_of(orjson.loads(rows[0][0]))
    return None


def task_of(request: Any) -> str | None:
    """The task of a call: the text of its first user message, or its prompt (a text completion)."""
    if not isinstance(request, dict):
        return None
    for message in request.get("messages") or ():
        if isinstance(message, dict) and message.get("role") == "user":
            return content_text(message.get("content")) or None
    prompt = request.get("prompt")
    return prompt if isinstance(prompt, str) and prompt else None


def rewards(result: Any) -> dict[str, float]:
    """A hook's result as named rewards: a number or bool is ``"reward"``, a dict names its own, None is none."""
    if result is None:
        return {}
    items = result.items() if isinstance(result, Mapping) else [(DEFAULT_NAME, result)]
    out = {}
    for name, value in items:
        if value is None:
            continue
        if not isinstance(name, str) or not name or not isinstance(value, numbers.Real) or not _finite(value):
            raise TypeError(f"a reward hook returns a finite number, a bool, a dict of them or None; got {result!r}")
        out[name] = float(value)
    return out


def _finite(value: numbers.Real) -> bool:
    return float("-inf") < float(value) < float("inf")


def _keywords(fn: Callable[..., Any]) -> frozenset[str]:
    """The offered keywords that ``fn`` takes: those it names, or all of them when it takes ``**kwargs``."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return OFFERED
    return OFFERED & {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


async def _in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a new daemon thread: unlike an executor's, it never holds up the process's exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # timed out meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        result, error = None, None
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            error = exc
        except BaseException as exc:
            error = RuntimeError(f"reward hook ended its thread with {exc!r}")
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="lightwire-hook", daemon=True).start()
    return await future

"""How long the event loop stalls: every call waits for it, so its stalls are the proxy's latency tail.

A task asks to wake every ``TICK`` seconds and notes how late it woke: the time the loop spent on something else
(a long callback, a collection, the GIL held by another thread). The longest stalls are kept with the time they
ended, and the garbage collector's pauses are timed through ``gc.callbacks`` and charged to the stalls they fall
in, so that a stall can be told apart as a collection or not. ``GET /healthz`` shows both (``loop``).

The tick bounds what is seen: a stall is measured from the wake-up it delayed, so one that starts just after a
wake-up reads up to ``TICK`` short, and a stall shorter than ``MIN_STALL`` is only counted. A wake-up is not free
(~0.15 ms of CPU on a 2-core VM, most of it the kernel's timer and switch), so ticking every 5 ms and sampling every
10 ms kept an idle sidecar at ~4 % of a core. The watch therefore ticks at ``TICK`` only while requests are in
flight or one ended less than ``IDLE_AFTER`` ago, and at ``IDLE_TICK`` otherwise; a request arriving then wakes it
at once (:func:`watch_middleware`). Stalls with no request waiting are measured the coarser way.

What a stall was is sampled: a thread looks at the loop every ``SAMPLE`` seconds and, while the loop's last
wake-up is ``STACK_AFTER`` or more behind, takes the loop thread's innermost Python frames and counts them, so
that each stack's count is about the stalled time spent there, in ``SAMPLE``s. A stack that ends in the selector
(``selectors.py ... select``) is a loop that had nothing to run and did not get back the CPU or the GIL in time:
the stall was another thread's or process's, not the loop's own work; what the other threads were at in the
same looks is counted beside (``beside``: thread name and innermost frames).

Where the stalled loop thread's time went, by the kernel's account (Linux: ``/proc/self/task/<id>/schedstat``,
read at every look): on a CPU (its own work, a system call's), runnable but waiting for a CPU (another thread or
process had its core), or off the CPU (blocked: waiting for the GIL, a lock, a page fault's I/O). Only intervals
between two looks that lie wholly inside a stall count (``stalled_time``). A stack in a system call that releases
the GIL (a socket write, the selector) reads "off the CPU" when the loop waited for the GIL after it, "waiting for
a CPU" when for its core.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import os
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator
from operator import itemgetter
from types import FrameType
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

TICK = 0.005  # seconds between wake-ups while requests come
IDLE_TICK = 0.1  # and while none has for IDLE_AFTER seconds
IDLE_AFTER = 1.0
MIN_STALL = 0.002  # seconds late from which a wake-up counts as a stall and may be kept
KEPT = 8  # longest stalls kept
BUCKETS_MS = (2, 5, 10, 50, 100)  # stalls are counted by the first of these they reach
SAMPLE = 0.01  # seconds between two looks of the sampler at the loop
STACK_AFTER = 0.02  # seconds since the loop's last wake-up from which the sampler takes its stack
FRAMES = 6  # innermost frames that make a stack
BESIDE_FRAMES = 3  # and one of another thread's, seen during a stall
STACKS_KEPT = 256  # distinct stacks counted; later new ones count as "other"
STACKS_SHOWN = 8


class LoopWatch:
    """The stalls of one event loop, and the collector's pauses, since it started."""

    def __init__(self) -> None:
        self.wakeups = 0
        self.longest: list[tuple[float, float, float]] = []  # a min-heap of (ms late, ms collecting, when)
        self.counts = dict.fromkeys(BUCKETS_MS, 0)
        self.gc_count = [0, 0, 0]
        self.gc_longest_ms = [0.0, 0.0, 0.0]
        self.gc_total_s = 0.0
        self._gc_started = 0.0
        self.stacks: Counter[tuple[str, ...]] = Counter()  # samples taken in stalls, by stack
        self.beside: Counter[tuple[str, ...]] = Counter()  # what the other threads were at then: name, stack
        self._beat = time.monotonic()  # the loop's last wake-up
        self.tick = TICK  # the current one: TICK or IDLE_TICK
        self.in_flight = 0  # requests
        self._last_request = time.monotonic()  # when one last ended
        self._waiter: asyncio.Future[None] | None = None  # what the next wake-up resolves
        self.stalled_time = {"on_cpu": 0.0, "waiting_for_cpu": 0.0, "off_cpu": 0.0}  # seconds, see the docstring

    def report(self) -> dict[str, Any]:
        return {
            "tick_ms": self.tick * 1000,
            "wakeups": self.wakeups,
            "stalls": {f">={ms}ms": n for ms, n in self.counts.items()},
            "longest": [
                {"ms": round(ms, 2), "gc_ms": round(gc_ms, 2), "ago_s": round(time.monotonic() - when, 1)}
                for ms, gc_ms, when in sorted(self.longest, reverse=True)
            ],
            "gc": {
                "collections": self.gc_count,
                "longest_ms": [round(ms, 2) for ms in self.gc_longest_ms],
                "total_s": round(self.gc_total_s, 3),
            },
            "stalled_time_ms": {k: round(v * 1000) for k, v in self.stalled_time.items()},
            "stacks": [
                {"samples": n, "ms": round(n * SAMPLE * 1000), "frames": list(stack)} for stack, n in _top(self.stacks)
            ],
            "beside": [
                {"samples": n, "thread": thread, "frames": list(stack)} for (thread, *stack), n in _top(self.beside)
            ],
        }

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            gc_before = self.gc_total_s
            idle = not self.in_flight and time.monotonic() - self._last_request >= IDLE_AFTER
            self.tick = IDLE_TICK if idle else TICK
            due = time.monotonic() + self.tick  # not loop.time(): uvloop's counts whole milliseconds
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(self.tick, _wake, waiter)
            await waiter
            timer.cancel()
            self._beat = time.monotonic()
            self.wakeups += 1
            late = self._beat - due  # < 0 when a request woke an idle watch
            if late >= MIN_STALL:
                self._stall(late * 1000, (self.gc_total_s - gc_before) * 1000)

    def request_began(self) -> None:
        self.in_flight += 1
        if self.tick == IDLE_TICK and self._waiter is not None:
            _wake(self._waiter)  # tick often from now on

    def request_ended(self) -> None:
        self.in_flight -= 1
        self._last_request = time.monotonic()

    def _stall(self, ms: float, gc_ms: float) -> None:
        for bucket in reversed(BUCKETS_MS):
            if ms >= bucket:
                self.counts[bucket] += 1
                break
        entry = (ms, gc_ms, time.monotonic())
        if len(self.longest) < KEPT:
            heapq.heappush(self.longest, entry)
        elif ms > self.longest[0][0]:
            heapq.heapreplace(self.longest, entry)

    def sample(self, loop_thread: int, loop_native_id: int, stop: threading.Event) -> None:
        """The sampler thread's loop: at each look that finds the loop stalled, count the loop thread's stack and
        account for its time since the look before."""
        with _Schedstat(loop_native_id) as schedstat:
            looked, times = time.monotonic(), schedstat.read()
            while not stop.wait(SAMPLE if self.tick == TICK else IDLE_TICK):
                before, times_before = looked, times
                looked, times = time.monotonic(), schedstat.read()
                if looked - self._beat < STACK_AFTER + self.tick - TICK:
                    continue
                if times is not None and times_before is not None and before >= self._beat:  # wholly stalled
                    on_cpu, waiting = times[0] - times_before[0], times[1] - times_before[1]
                    self.stalled_time["on_cpu"] += on_cpu
                    self.stalled_time["waiting_for_cpu"] += waiting
                    self.stalled_time["off_cpu"] += max(0.0, looked - before - on_cpu - waiting)
                self._look(loop_thread)

    def _look(self, loop_thread: int) -> None:
        frames = sys._current_frames()
        names = {thread.ident: thread.name for thread in threading.enumerate()}
        for ident, frame in frames.items():
            if ident == loop_thread:
                _count(self.stacks, _stack(frame, FRAMES))
            elif ident != threading.get_ident():
                _count(self.beside, (names.get(ident, "?"), *_stack(frame, BESIDE_FRAMES)))
        del frames

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        took = time.perf_counter() - self._gc_started
        generation = info["generation"]
        self.gc_count[generation] += 1
        self.gc_total_s += took
        self.gc_longest_ms[generation] = max(self.gc_longest_ms[generation], took * 1000)


class _Schedstat:
    """One thread's time by the kernel's account, in seconds: on a CPU, and runnable waiting for one. None where
    there is no ``/proc`` (not Linux)."""

    def __init__(self, native_id: int) -> None:
        try:
            self._fd: int | None = os.open(f"/proc/self/task/{native_id}/schedstat", os.O_RDONLY)
        except OSError:
            self._fd = None

    def __enter__(self) -> _Schedstat:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)

    def read(self) -> tuple[float, float] | None:
        if self._fd is None:
            return None
        on_cpu, waiting, _ = os.pread(self._fd, 128, 0).split()
        return int(on_cpu) / 1e9, int(waiting) / 1e9


def _top(counter: Counter[tuple[str, ...]]) -> list[tuple[tuple[str, ...], int]]:
    """The most counted stacks, from a copy: the sampler thread may count a new one meanwhile (copying a dict is
    one step under the GIL; iterating it, as ``Counter.most_common`` does, is not)."""
    return sorted(dict(counter).items(), key=itemgetter(1), reverse=True)[:STACKS_SHOWN]


def _count(counter: Counter[tuple[str, ...]], stack: tuple[str, ...]) -> None:
    counter[stack if stack in counter or len(counter) < STACKS_KEPT else ("other",)] += 1


def _stack(frame: FrameType, depth: int) -> tuple[str, ...]:
    """The innermost ``depth`` frames, as ``file:line function``; an import's own frames as one ``(importing)``."""
    stack: list[str] = []
    for f in traceback.StackSummary.extract(traceback.walk_stack(frame), limit=depth + 16, lookup_lines=False):
        if f.filename.startswith("<frozen importlib"):
            if not stack or stack[-1] != "(importing)":
                stack.append("(importing)")
        else:
            stack.append(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}")
    return tuple(stack[:depth])


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


LOOP_WATCH = web.AppKey("loop_watch", LoopWatch)


@web.middleware
async def watch_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tells the app's watch which requests are in flight (see the module's docstring)."""
    watch = request.app[LOOP_WATCH]
    watch.request_began()
    try:
        return await handler(request)
    finally:
        watch.request_ended()


async def loop_watch_ctx(app: web.Application) -> AsyncIterator[None]:
    """Watch the loop while the app runs (an aiohttp cleanup context)."""
    watch = app[LOOP_WATCH] = LoopWatch()
    gc.callbacks.append(watch._on_gc)
    task = asyncio.create_task(watch.run())
    stop = threading.Event()
    sampler = threading.Thread(
        target=watch.sample,
        args=(threading.get_ident(), threading.get_native_id(), stop),
        name="lightwire-loop-sampler",
        daemon=True,
    )
    sampler.start()
    try:
        yield
    finally:
        stop.set()
        sampler.join()
        gc.callbacks.remove(watch._on_gc)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

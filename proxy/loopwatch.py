"""How long the event loop stalls: every call waits for it, so its stalls are the proxy's latency tail.

A task asks to wake every ``TICK`` seconds and notes how late it woke: the time the loop spent on something else
(a long callback, a collection, the GIL held by another thread). The longest stalls are kept with the time they
ended, and the garbage collector's pauses are timed through ``gc.callbacks`` and charged to the stalls they fall
in, so that a stall can be told apart as a collection or not. ``GET /healthz`` shows both (``loop``).

The tick bounds what is seen: a stall is measured from the wake-up it delayed, so one that starts just after a
wake-up reads up to ``TICK`` short, and a stall shorter than ``MIN_STALL`` is only counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

TICK = 0.005  # seconds between wake-ups: ~200 a second, a few microseconds of CPU each
MIN_STALL = 0.002  # seconds late from which a wake-up counts as a stall and may be kept
KEPT = 8  # longest stalls kept
BUCKETS_MS = (2, 5, 10, 50, 100)  # stalls are counted by the first of these they reach


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

    def report(self) -> dict[str, Any]:
        return {
            "tick_ms": TICK * 1000,
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
        }

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            gc_before = self.gc_total_s
            due = loop.time() + TICK
            await asyncio.sleep(TICK)
            self.wakeups += 1
            late = loop.time() - due
            if late >= MIN_STALL:
                self._stall(late * 1000, (self.gc_total_s - gc_before) * 1000)

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

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        took = time.perf_counter() - self._gc_started
        generation = info["generation"]
        self.gc_count[generation] += 1
        self.gc_total_s += took
        self.gc_longest_ms[generation] = max(self.gc_longest_ms[generation], took * 1000)


LOOP_WATCH = web.AppKey("loop_watch", LoopWatch)


async def loop_watch_ctx(app: web.Application) -> AsyncIterator[None]:
    """Watch the loop while the app runs (an aiohttp cleanup context)."""
    watch = app[LOOP_WATCH] = LoopWatch()
    gc.callbacks.append(watch._on_gc)
    task = asyncio.create_task(watch.run())
    try:
        yield
    finally:
        gc.callbacks.remove(watch._on_gc)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

"""What the store's writing costs the event loop: the loop's lag while the real store writer records real calls,
in one process pinned to one CPU as a proxy would be, under each setting that the tail was traced to.

    .venv/bin/python -m bench.loop_lag [--seconds 10] [--rounds 2] [--rate 3000] [--stream-rate 1000] [--out FILE]

An asyncio loop submits ``--rate`` calls a second (``--stream-rate`` for streams): ``proxy.relay.Call`` objects,
built and ended as the request path does, non-streaming and 50-chunk streams by turns of rounds, to a
``store.writer.Writer`` on a fresh DuckDB file, while a timer asking to wake every millisecond notes how late it
wakes: the wait any request would have seen.

Variants, interleaved round by round so that machine noise hits them alike:

* ``before``: CPython's 5 ms GIL switch interval, DuckDB with a thread per core (its default);
* ``duckdb_1_thread``: the same, DuckDB with one thread (``db_threads``), so that its work stays on the nice
  writer thread instead of threads competing with the loop at its priority;
* ``after``: that and a 1 ms switch interval (``proxy.cli.GIL_SWITCH_INTERVAL``), so that the writer thread,
  turning calls into rows in Python, hands the GIL back to the loop within a millisecond.

Lag figures are wall-clock: on a machine where other processes want the same CPU they include that wait too (the
report says how busy the machine was).
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench import report as report_cli
from bench.machine import busy_seconds
from bench.proxy_overhead import percentile
from proxy.cli import GC_YOUNG_THRESHOLD, GIL_SWITCH_INTERVAL
from proxy.relay import Call
from proxy.telemetry import TraceIds
from store.feedback import Feedback, SessionEnd
from store.spans import Span
from store.writer import Writer

CPU = 1
TICK_S = 0.001
STREAM_CHUNKS = 50
DEFAULT_SWITCH_INTERVAL = 0.005
VARIANTS = {  # name -> (GIL switch interval, DuckDB threads)
    "before": (DEFAULT_SWITCH_INTERVAL, os.cpu_count() or 1),
    "duckdb_1_thread": (DEFAULT_SWITCH_INTERVAL, 1),
    "after": (GIL_SWITCH_INTERVAL, 1),
}
BODY = {"model": "bench", "messages": [{"role": "user", "content": "Say hello."}]}
ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7},
    }
)


def ended_call(stream: bool) -> Call:
    call = Call("chat", {**BODY, "stream": stream}, orjson.dumps(BODY), TraceIds.new(None), "openai")
    call.session_id, call.status = "lw-bench", 200
    if stream:
        delta = {"index": 0, "delta": {"content": "word"}, "finish_reason": None, "logprobs": None}
        chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "bench"}
        call.chunks = [{**chunk, "choices": [delta]} for _ in range(STREAM_CHUNKS)]
    else:
        call.response_raw = ANSWER
    call.end()
    return call


async def trial(variant: str, *, stream: bool, seconds: float, rate: int, db: Path) -> dict[str, Any]:
    switch, threads = VARIANTS[variant]
    sys.setswitchinterval(switch)
    writer = Writer(db, kinds=[Span, Feedback, SessionEnd], threads=threads)
    writer.open()
    lags: list[float] = []
    stopping = False

    async def watch() -> None:
        loop = asyncio.get_running_loop()
        while not stopping:
            due = loop.time() + TICK_S
            await asyncio.sleep(TICK_S)
            lags.append((loop.time() - due) * 1000)

    watcher = asyncio.create_task(watch())
    started, sent = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - started) < seconds:
        while sent < int(elapsed * rate):
            await writer.reserve()
            writer.submit(ended_call(stream))
            sent += 1
        await asyncio.sleep(TICK_S)
    stopping = True
    await watcher
    await writer.close()
    sys.setswitchinterval(DEFAULT_SWITCH_INTERVAL)
    return {
        "variant": variant,
        "stream": stream,
        "calls": sent,
        "written": writer.written,
        "lag_p50_ms": percentile(lags, 0.5),
        "lag_p99_ms": percentile(lags, 0.99),
        "lag_p999_ms": percentile(lags, 0.999),
        "lag_max_ms": round(max(lags), 2),
    }


def main() -> None:
    parser = report_cli.parser(__doc__ or "")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per trial")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every variant, non-streaming then streams")
    parser.add_argument("--rate", type=int, default=3000, help="non-streaming calls submitted a second")
    parser.add_argument("--stream-rate", type=int, default=1000, help="streams submitted a second")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    args = parser.parse_args()
    if CPU in os.sched_getaffinity(0):
        os.sched_setaffinity(0, {CPU})
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])  # as `lightwire serve` runs
    trials = []
    busy_before, started = busy_seconds(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lightwire-lag-") as tmp:
        for r in range(args.rounds * 2):
            for i, variant in enumerate(VARIANTS):
                db = Path(tmp) / f"{r}-{i}.duckdb"
                stream = r % 2 == 1
                rate = args.stream_rate if stream else args.rate
                run = trial(variant, stream=stream, seconds=args.seconds, rate=rate, db=db)
                trials.append(asyncio.run(run))
    busy = busy_seconds() - busy_before
    by_variant: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        for stream in (False, True):
            mine = [t for t in trials if t["variant"] == variant and t["stream"] == stream]
            key = "streams" if stream else "non_streaming"
            by_variant.setdefault(variant, {})[key] = {
                "lag_p99_ms": max(t["lag_p99_ms"] for t in mine),
                "lag_max_ms": max(t["lag_max_ms"] for t in mine),
            }
    report = {
        "settings": {
            "seconds": args.seconds,
            "rounds": args.rounds,
            "rate": args.rate,
            "stream_rate": args.stream_rate,
            "cpu": CPU,
        },
        "variants": {name: {"gil_switch_s": s, "duckdb_threads": t} for name, (s, t) in VARIANTS.items()},
        "machine_cpu_busy_share": round(busy / ((time.perf_counter() - started) * (os.cpu_count() or 1)), 3),
        "by_variant": by_variant,
        "trials": trials,
    }
    line = "; ".join(
        f"{name}: {v['non_streaming']['lag_p99_ms']} / {v['non_streaming']['lag_max_ms']} plain, "
        f"{v['streams']['lag_p99_ms']} / {v['streams']['lag_max_ms']} streams"
        for name, v in by_variant.items()
    )
    busy_share = report["machine_cpu_busy_share"]
    report_cli.emit(
        report, args.out, f"loop lag p99 / max, ms (worst round): {line}; the machine was {busy_share:.0%} busy"
    )


if __name__ == "__main__":
    main()

"""The store alone as spans accumulate: its memory, and what a lookup costs, for checkouts side by side.

    .venv/bin/python -m bench.store_growth [--spans 1000000] [--before DIR ...] [--out FILE]

A sidecar's growth with traffic is the store's: DuckDB keeps each table's ART indexes resident. For each checkout
(this one, and each ``--before`` folder: a ``git worktree`` of an earlier commit, put first on ``PYTHONPATH``) a
process runs that checkout's real ``store.writer.Writer`` over ``--spans`` spans with the soak's ids (a session
of 4 calls, its id made as that checkout's proxy makes one, a random response id and span id each; the same
~200-byte request and response), offered in batches
of ``BATCH`` every ``PAUSE_S`` as a loaded sidecar's writer receives them (``RATE`` calls a second of start
times), and each session's end after its last call. At 10k, 100k, 250k, 500k, 750k and 1M spans it notes the
process's RSS, DuckDB's index memory (``art_index``) and the CPU spent; at the end, the time of the lookups the
proxy and hooks make of calls its session index no longer holds: a call by response id and by span id, a
session's turn count, a session's spans as hooks read them (a session a third of the way in, and the newest).
Then a second process opens the store as a sidecar starting on it would, and makes the scan for sessions a killed
proxy left open (as that checkout makes it): its time, and RSS opened, at the peak, and idle after a trim. A
checkout whose store predates a lookup's function is measured with the one it had.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench import report as report_cli
from bench.machine import rss_mb

MARKS = (10_000, 100_000, 250_000, 500_000, 750_000, 1_000_000)
BATCH = 2_000
PAUSE_S = 0.2
TURNS = 4
RATE = 1_500.0  # calls a second, for their start times
LOOKUP_REPEATS = 10
REQUEST = json.dumps({"model": "m", "messages": [{"role": "user", "content": "What is the capital of France? " * 3}]})
RESPONSE = json.dumps({"id": "x", "choices": [{"message": {"role": "assistant", "content": "Paris. " * 10}}]})


async def grow(db: Path, spans: int) -> dict[str, Any]:
    """One checkout's figures (run in a process whose ``PYTHONPATH`` starts with that checkout)."""
    from proxy import telemetry
    from proxy.hooks import read_sessions
    from store import queries
    from store.feedback import SessionEnd
    from store.spans import Span
    from store.writer import Writer

    writer = Writer(db, kinds=[Span, SessionEnd])
    writer.open()
    marks: list[dict[str, Any]] = []
    started = time.process_time()
    epoch = datetime.now(UTC)
    counted = "turns" in SessionEnd.__dataclass_fields__  # the session's row keeps its turns
    make_id = getattr(telemetry, "time_ordered_hex", None) or (lambda n: os.urandom(n).hex())  # ids in time order
    session, first = "", epoch
    for i in range(spans):
        now = epoch + timedelta(seconds=i / RATE)
        if i % TURNS == 0:
            session, first = "lw-" + make_id(12), now
        await writer.reserve()
        span = Span(
            os.urandom(8).hex(), os.urandom(16).hex(), None, session, "chat", "openai", "m", "m",
            f"chatcmpl-{uuid.uuid4().hex}", False, 64, None, None, ["stop"], 20, 10, REQUEST, RESPONSE,
            None, None, None, now, 1.0, None, 200, None, None, i % TURNS, "header"
        )  # fmt: skip
        writer.submit(span)
        if i % TURNS == TURNS - 1:
            await writer.reserve()
            row: dict[str, Any] = {"turns": TURNS, "started_at": first} if counted else {}
            writer.submit(SessionEnd(session_id=session, ended_at=now, end_reason="idle", **row))
        if (i + 1) % BATCH == 0:
            await asyncio.sleep(PAUSE_S)
        if i + 1 in MARKS:
            await writer.flush()
            with writer.cursor() as con:
                memory = dict(con.execute("SELECT tag, memory_usage_bytes FROM duckdb_memory()").fetchall())
            marks.append(
                {
                    "spans": i + 1,
                    "rss_mb": rss_mb(os.getpid()),
                    "index_mb": round(memory.get("ART_INDEX", 0) / 2**20, 1),
                    "cpu_s": round(time.process_time() - started, 1),
                }
            )
            print(json.dumps(marks[-1]), file=sys.stderr, flush=True)
    await writer.flush()
    lookups: dict[str, float] = {}
    with writer.cursor() as con:
        span_id, response_id, session_id = con.execute(
            "SELECT span_id, response_id, session_id FROM spans LIMIT 1 OFFSET ?", [spans // 3]
        ).fetchone() or ("", "", "")
        newest = con.execute("SELECT session_id FROM spans ORDER BY start_time DESC LIMIT 1").fetchone() or ("",)
        turns = getattr(queries, "session_record", None) or queries.session_turns  # type: ignore[attr-defined]
        for name, lookup in {
            "call_by_response_id": lambda: queries.find_call(con, response_id=response_id),
            "call_by_span_id": lambda: queries.find_call(con, span_id=span_id),
            "session_turns": lambda: turns(con, session_id),
            "session_spans_for_hooks": lambda: read_sessions(con, [session_id]),
            "newest_session_spans_for_hooks": lambda: read_sessions(con, [newest[0]]),
        }.items():
            assert lookup(), name  # found; and the first run reads what the next ones find cached
            t = time.perf_counter()
            for _ in range(LOOKUP_REPEATS):
                lookup()
            lookups[name] = round((time.perf_counter() - t) / LOOKUP_REPEATS * 1000, 2)
    await writer.close()
    return {"marks": marks, "lookup_ms": lookups, "peak_rss_mb": peak_rss_mb()}


async def start(db: Path) -> dict[str, Any]:
    """A sidecar's start on the store ``grow`` left: the scan for sessions a crash left open, as the checkout's
    proxy makes it, in a fresh process; its time, and RSS before, at the peak, and after the trim that follows."""
    import inspect

    from store import queries, writer
    from store.feedback import Feedback, SessionEnd
    from store.spans import Span

    store = writer.Writer(db, kinds=[Span, Feedback, SessionEnd])
    store.open()
    opened = rss_mb(os.getpid())
    lean = {"lean": True} if "lean" in inspect.signature(store.read).parameters else {}
    t = time.perf_counter()
    await store.read(queries.interrupted_sessions, **lean)
    scan_ms = (time.perf_counter() - t) * 1000
    scanned = rss_mb(os.getpid())
    await asyncio.sleep(writer.TRIM_INTERVAL + 1)  # no call comes
    idle = rss_mb(os.getpid())
    await store.close()
    return {
        "scan_ms": round(scan_ms, 1),
        "rss_mb": {"opened": opened, "scanned": scanned, "peak": peak_rss_mb(), "idle_after_a_trim": idle},
    }


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_checkout(checkout: Path, db: Path, spans: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}

    def worker(*args: str) -> dict[str, Any]:
        command = [sys.executable, __file__, *args, str(db), "--spans", str(spans)]
        return dict(json.loads(subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout))

    return {**worker("--worker"), "start": worker("--start")}


def main() -> None:
    parser = report_cli.parser(__doc__ or "")
    parser.add_argument("--spans", type=int, default=1_000_000, help="spans to write (default 1M)")
    parser.add_argument("--before", type=Path, action="append", default=[], help="an earlier checkout (repeatable)")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # the DuckDB file of one checkout's run
    parser.add_argument("--start", type=Path, help=argparse.SUPPRESS)  # the same file, opened again
    args = parser.parse_args()
    if args.worker or args.start:
        print(json.dumps(asyncio.run(grow(args.worker, args.spans) if args.worker else start(args.start))))
        return
    here = Path(__file__).resolve().parent.parent
    checkouts = {**{f"before-{i}": path.resolve() for i, path in enumerate(args.before)}, "this": here}
    with tempfile.TemporaryDirectory(prefix="lightwire-store-growth-") as tmp:
        runs = {name: run_checkout(path, Path(tmp) / f"{name}.duckdb", args.spans) for name, path in checkouts.items()}
    report = {"settings": {"spans": args.spans, "checkouts": {n: str(p) for n, p in checkouts.items()}}, "runs": runs}
    line = "; ".join(
        f"{name}: RSS {r['marks'][0]['rss_mb']} -> {r['marks'][-1]['rss_mb']} MB, "
        f"indexes {r['marks'][-1]['index_mb']} MB, "
        + ", ".join(f"{k} {v} ms" for k, v in r["lookup_ms"].items())
        + f", start: scan {r['start']['scan_ms']} ms, RSS {r['start']['rss_mb']}"
        for name, r in runs.items()
    )
    report_cli.emit(report, args.out, line)


if __name__ == "__main__":
    main()

"""A sidecar's CPU: at rest, and a call at the rates a service usually sends, for checkouts side by side.

    .venv/bin/python -m bench.cpu_per_call [--rounds 3] [--before DIR ...] [--out FILE]

``bench.proxy_overhead --pin`` loads the proxy until its core is full; most sidecars idle or serve tens of calls
a second, where what a call costs is set by wake-ups and commits rather than by work per byte. Each round starts
Lightwire with its defaults, pinned to its own core as in ``--pin`` (the fake upstream and this load generator on
the other), once per checkout: this one, and each ``--before`` folder (a ``git worktree`` of an earlier commit,
put first on the server's ``PYTHONPATH``). For each it measures, against the same fake upstream:

- at rest: CPU a second over ``REST_S`` seconds with no request, once its start-up has settled;
- open loops of ``RATES`` non-streaming calls a second, then a closed loop of 32 (saturation): CPU a call, the
  event loop's thread apart from the others (the store's writer, the loop watch's sampler, DuckDB's), latency.

Checkouts alternate within each round, so that the machine's drift falls on all alike; the JSON has every round
and the medians.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench import proxy_overhead as po
from bench import report as report_cli
from bench.machine import process_seconds

RATES = (50.0, 700.0)
REST_S = 10.0
SETTLE_S = 3.0  # after start-up, before the rest is measured
WARMUP_S = 3.0
RUN_S = 15.0
CLOSED_RUN_S = 10.0


def loop_and_others(pid: int) -> tuple[float, float]:
    """CPU seconds of a process's main thread (its event loop) and of all its other threads."""
    loop = process_seconds(pid, thread=pid)
    return loop, process_seconds(pid) - loop


async def measure(session: aiohttp.ClientSession, server: po.Target) -> dict[str, Any]:
    await asyncio.sleep(SETTLE_S)
    before = loop_and_others(server.pid)
    await asyncio.sleep(REST_S)
    after = loop_and_others(server.pid)
    out: dict[str, Any] = {"at_rest_cpu_ms_per_s": round((sum(after) - sum(before)) / REST_S * 1000, 2)}
    scenarios = [po.at_rate(rate) for rate in RATES] + [po.Scenario("chat_c32", stream=False, concurrency=32)]
    for scenario in scenarios:
        await po.load(session, server, scenario, WARMUP_S, po.Tally(), po.PINNED)
        tally = po.Tally()
        before = loop_and_others(server.pid)
        took = await po.load(session, server, scenario, RUN_S if scenario.rate else CLOSED_RUN_S, tally, po.PINNED)
        loop, others = (b - a for a, b in zip(before, loop_and_others(server.pid), strict=True))
        calls = max(tally.ok, 1)
        out[scenario.name] = {
            "cpu_ms_per_call": round((loop + others) / calls * 1000, 3),
            "event_loop_ms_per_call": round(loop / calls * 1000, 3),
            "other_threads_ms_per_call": round(others / calls * 1000, 3),
            "calls_per_s": round(tally.ok / took, 1),
            "errors": tally.errors,
            "p50_ms": po.percentile(tally.latency_ms, 0.50),
            "p99_ms": po.percentile(tally.latency_ms, 0.99),
        }
    return out


async def bench(workdir: Path, checkouts: dict[str, Path | None], rounds: int) -> dict[str, list[dict[str, Any]]]:
    fleet = po.Fleet(workdir, pin=True)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in checkouts}
    connector = aiohttp.TCPConnector(limit=po.CLIENT_CONNECTIONS, keepalive_timeout=po.CLIENT_KEEPALIVE_S)
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            fake = await po.start_fake(fleet)
            for round_ in range(rounds):
                for name, path in checkouts.items():
                    db = workdir / f"{name}-{round_}.duckdb"
                    server = await po.start_lightwire(
                        session, fleet, fake.base_url, db, name=f"{name}-{round_}", checkout=path
                    )
                    runs[name].append(await measure(session, server))
                    await fleet.stop(server.name)
                    print(name, round_, runs[name][-1], flush=True)
        finally:
            await fleet.stop_all()
    return runs


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"at_rest_cpu_ms_per_s": statistics.median(r["at_rest_cpu_ms_per_s"] for r in runs)}
    for scenario, first in runs[0].items():
        if isinstance(first, dict):
            out[scenario] = {
                key: statistics.median(r[scenario][key] for r in runs if r[scenario][key] is not None)
                for key in first
                if key != "errors"
            }
    return out


def main() -> None:
    parser = report_cli.parser(__doc__ or "")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", type=Path, action="append", default=[], help="an earlier checkout (repeatable)")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    parser.add_argument("--workdir", type=Path, help="keep logs and DuckDB files here (default: a temp dir)")
    args = parser.parse_args()
    if not {po.LOADGEN_CPU, po.PROXY_CPU} <= os.sched_getaffinity(0):
        parser.error(f"needs CPUs {po.LOADGEN_CPU} and {po.PROXY_CPU}")
    checkouts: dict[str, Path | None] = {f"before-{i}": path.resolve() for i, path in enumerate(args.before)}
    checkouts["this"] = None
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        workdir = report_cli.work_dir(stack, args.workdir, "lightwire-cpu-")
        runs = asyncio.run(bench(workdir, checkouts, args.rounds))
    summary = {name: medians(r) for name, r in runs.items()}
    report = {
        "settings": {
            "checkouts": {name: str(path) if path else "this" for name, path in checkouts.items()},
            "rounds": args.rounds,
            "rates": RATES,
            "cpus": po.PLACEMENT,
        },
        "medians": summary,
        "runs": runs,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    line = "; ".join(
        f"{name}: at rest {m['at_rest_cpu_ms_per_s']} ms/s, "
        + ", ".join(f"{s} {m[s]['cpu_ms_per_call']} ms a call" for s in m if isinstance(m[s], dict))
        for name, m in summary.items()
    )
    report_cli.emit(report, args.out, line)


if __name__ == "__main__":
    main()

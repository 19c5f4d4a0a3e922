"""Soak: Lightwire under minutes of mixed traffic at concurrency 32, against the fake upstream. Does anything grow
(memory) or slow down (the latency it adds) as calls accumulate, and is every call recorded?

    .venv/bin/python -m bench.soak [--minutes 10] [--window-s 60] [--out FILE]

Placement as in ``bench/proxy_overhead.py``: this process (the load) and the fake upstream on CPU 0, Lightwire alone
on CPU 1 (``taskset``; ``--no-pin`` leaves it to the kernel), with its default settings.

Traffic: ``WORKERS`` closed-loop workers, each holding a conversation of up to ``TURNS`` calls in which every call
sends the previous reply back (Lightwire links them into one session), every conversation's opening distinct. One
call in ``STREAM_EVERY`` streams (``STREAM_CHUNKS`` chunks); one answered non-streaming call in ``FEEDBACK_EVERY``
gets a reward through ``POST /feedback``, by its response id. Each window (a minute by default) ends with
``PROBE_S`` seconds of the same calls sent to the fake upstream directly: the window's own direct p99, so that the
latency Lightwire adds is measured under the machine's load of that moment.

Checks (``goals`` in the JSON report):

* spans written (read from the DuckDB file once Lightwire has exited on SIGTERM) = model calls sent to it, and
  feedback rows = feedback it accepted;
* memory flat after the first window: every RSS sample after it within ``RSS_FLAT`` of the RSS at its end;
* the added p99 of non-streaming calls and of streams' first chunk in the last window within ``P99_DRIFT`` of the
  first window's (below ``P99_FLOOR_MS`` a difference is noise: the first window's figure counts as that floor).

RSS is also noted when the calls sent pass 10k, 100k and 1M (issue 16's figures), and the report carries
Lightwire's ``/healthz`` at the end of every window (its event loop's stalls, spans pending).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import duckdb
import orjson
from tqdm import tqdm

from bench import report as report_cli
from bench.machine import busy_seconds, rss_mb
from bench.proxy_overhead import (
    API_KEY,
    CLIENT_CONNECTIONS,
    EXAMPLES_KEPT,
    LOADGEN_CPU,
    MODEL,
    PROXY_CPU,
    REQUEST_TIMEOUT_S,
    Fleet,
    percentile,
    read_spans,
    start_fake,
    start_lightwire,
)

WORKERS = 32
TURNS = 4
STREAM_EVERY = 10
FEEDBACK_EVERY = 10
STREAM_CHUNKS = 20
PROBE_S = 5.0
RSS_EVERY_S = 5.0
MILESTONES = (10_000, 100_000, 1_000_000)
RSS_FLAT = 0.10
P99_DRIFT = 0.20
P99_FLOOR_MS = 1.0
HEADERS = {
    "Authorization": f"Bearer {API_KEY}",
    "Content-Type": "application/json",
    "x-fake-chunks": str(STREAM_CHUNKS),
}


@dataclass
class Window:
    """Latencies of one window, through Lightwire and direct."""

    latency_ms: dict[str, list[float]] = field(default_factory=lambda: {"lightwire": [], "direct": []})
    ttfc_ms: dict[str, list[float]] = field(default_factory=lambda: {"lightwire": [], "direct": []})

    def report(self) -> dict[str, Any]:
        def p99(values: dict[str, list[float]]) -> dict[str, Any]:
            out = {name: percentile(v, 0.99) for name, v in values.items()}
            a, b = out["lightwire"], out["direct"]
            return out | {"added": None if a is None or b is None else round(a - b, 3)}

        return {
            "calls": {name: len(v) for name, v in self.latency_ms.items()},
            "p99_ms": p99(self.latency_ms),
            "ttfc_p99_ms": p99(self.ttfc_ms),
        }


@dataclass
class Load:
    """The workers' shared state: where calls go now, and what happened."""

    session: aiohttp.ClientSession
    urls: dict[str, str]  # target name -> base URL ending in /v1
    pid: int  # Lightwire's
    target: str = "lightwire"
    window: Window = field(default_factory=Window)
    stop: bool = False
    calls: int = 0  # model calls sent, to either target
    sent: int = 0  # model calls sent to Lightwire
    answered: int = 0  # non-streaming calls Lightwire answered
    feedback_sent: int = 0
    feedback_ok: int = 0
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    rss_at_calls: dict[str, float] = field(default_factory=dict)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_examples) < EXAMPLES_KEPT:
            self.error_examples.append(what)

    async def worker(self, index: int) -> None:
        conversation = 0
        while not self.stop:
            messages: list[dict[str, Any]] = [{"role": "user", "content": f"worker {index}, task {conversation}"}]
            conversation += 1
            for _ in range(TURNS):
                reply = await self.call(messages)
                if reply is None or self.stop:
                    break
                messages += [reply, {"role": "user", "content": "Go on."}]

    async def call(self, messages: list[dict[str, Any]]) -> dict[str, Any] | None:
        """One model call; returns the assistant's reply, or None if it failed."""
        target, window = self.target, self.window
        self.calls += 1
        stream = self.calls % STREAM_EVERY == 0
        if target == "lightwire":
            self.sent += 1
            if self.sent in MILESTONES:
                self.rss_at_calls[str(self.sent)] = rss_mb(self.pid)
        body = orjson.dumps({"model": MODEL, "messages": messages, "stream": stream})
        started = time.perf_counter()
        try:
            async with self.session.post(f"{self.urls[target]}/chat/completions", data=body, headers=HEADERS) as resp:
                if resp.status != 200:
                    self.error(f"{target}: HTTP {resp.status}: {(await resp.read())[:200]!r}")
                    return None
                if stream:
                    content = await self.read_stream(resp, started, window.ttfc_ms[target])
                    window.latency_ms[target].append((time.perf_counter() - started) * 1000)
                    return {"role": "assistant", "content": content}
                answer = orjson.loads(await resp.read())
                window.latency_ms[target].append((time.perf_counter() - started) * 1000)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.error(f"{target}: {exc!r}")
            return None
        if target == "lightwire":
            self.answered += 1
            if self.answered % FEEDBACK_EVERY == 0:
                await self.feedback(answer["id"])
        return answer["choices"][0]["message"]

    async def read_stream(self, resp: aiohttp.ClientResponse, started: float, ttfc_ms: list[float]) -> str:
        parts: list[str] = []
        async for line in resp.content:
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            if not parts:
                ttfc_ms.append((time.perf_counter() - started) * 1000)
            choices = orjson.loads(line[5:])["choices"]
            parts.append((choices[0]["delta"].get("content") or "") if choices else "")
        return "".join(parts)

    async def feedback(self, response_id: str) -> None:
        self.feedback_sent += 1
        body = orjson.dumps({"response_id": response_id, "reward": self.feedback_sent % 2})
        base = self.urls["lightwire"].removesuffix("/v1")
        try:
            async with self.session.post(f"{base}/feedback", data=body, headers=HEADERS) as resp:
                if resp.status == 200:
                    self.feedback_ok += 1
                else:
                    self.error(f"feedback: HTTP {resp.status}: {(await resp.read())[:200]!r}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.error(f"feedback: {exc!r}")


async def sample_rss(load: Load, started: float, samples: list[tuple[float, int, float]]) -> None:
    while True:
        samples.append((round(time.perf_counter() - started, 1), load.sent, rss_mb(load.pid)))
        await asyncio.sleep(RSS_EVERY_S)


async def healthz(load: Load) -> dict[str, Any]:
    async with load.session.get(load.urls["lightwire"].removesuffix("/v1") + "/healthz") as resp:
        body: dict[str, Any] = await resp.json()
        return body


async def soak(minutes: float, window_s: float, pin: bool, workdir: Path) -> dict[str, Any]:
    if pin:
        os.sched_setaffinity(0, {LOADGEN_CPU})
    db = workdir / "lightwire.duckdb"
    fleet = Fleet(workdir, pin)
    connector = aiohttp.TCPConnector(limit=CLIENT_CONNECTIONS)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    windows: list[dict[str, Any]] = []
    samples: list[tuple[float, int, float]] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        try:
            direct = await start_fake(fleet)
            lightwire = await start_lightwire(session, fleet, direct.base_url, db)
            load = Load(session, {"lightwire": lightwire.base_url, "direct": direct.base_url}, lightwire.pid)
            rss_start = rss_mb(lightwire.pid)
            started, busy_before = time.perf_counter(), busy_seconds()
            sampler = asyncio.create_task(sample_rss(load, started, samples))
            workers = [asyncio.create_task(load.worker(i)) for i in range(WORKERS)]
            for _ in tqdm(range(max(1, round(minutes * 60 / window_s))), desc="windows", leave=False, disable=None):
                load.window, load.target = Window(), "lightwire"
                await asyncio.sleep(window_s - PROBE_S)
                load.target = "direct"
                await asyncio.sleep(PROBE_S)
                windows.append(load.window.report() | {"end_s": round(time.perf_counter() - started, 1)})
                windows[-1] |= {"rss_mb": rss_mb(lightwire.pid), "healthz": await healthz(load)}
            load.stop = True
            await asyncio.gather(*workers)
            sampler.cancel()
            elapsed, busy = time.perf_counter() - started, busy_seconds() - busy_before
            rss_end = rss_mb(lightwire.pid)
            shutdown = await fleet.stop("lightwire")
        finally:
            await fleet.stop_all()
    with duckdb.connect(str(db), read_only=True) as con:
        row = con.execute("SELECT count(*) FROM feedback").fetchone()
    spans = read_spans(db) | {"calls_sent": load.sent, "feedback_rows": row[0] if row else 0}
    return {
        "wall_s": round(elapsed, 1),
        "calls_per_s": round(load.sent / elapsed, 1),
        "machine_cpu_busy_share": round(busy / (elapsed * (os.cpu_count() or 1)), 3),
        "feedback": {"sent": load.feedback_sent, "accepted": load.feedback_ok},
        "errors": load.errors,
        "error_examples": load.error_examples,
        "rss_mb": {"start": rss_start, "end": rss_end, "at_calls": load.rss_at_calls},
        "rss_samples": samples,
        "windows": windows,
        "spans": spans,
        "shutdown": {k: shutdown[k] for k in ("exit_code", "stop_s", "killed")},
        "servers": fleet.stopped,
    }


def goals(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spans, windows = run["spans"], run["windows"]
    out: dict[str, dict[str, Any]] = {
        "spans_equal_calls": {
            "value": f"{spans['rows']}/{spans['calls_sent']}",
            "met": spans["rows"] == spans["calls_sent"],
        },
        "feedback_rows_equal_accepted": {
            "value": f"{spans['feedback_rows']}/{run['feedback']['accepted']}",
            "met": spans["feedback_rows"] == run["feedback"]["accepted"],
        },
    }
    if len(windows) < 2:
        return out
    base = windows[0]["rss_mb"]
    later = [rss for t, _, rss in run["rss_samples"] if t > windows[0]["end_s"]] + [run["rss_mb"]["end"]]
    drift = max(abs(rss - base) for rss in later) / base
    out["rss_flat_after_first_window"] = {"value": round(drift, 3), "limit": RSS_FLAT, "met": drift <= RSS_FLAT}
    for key in ("p99_ms", "ttfc_p99_ms"):
        first, last = windows[0][key]["added"], windows[-1][key]["added"]
        limit = None if first is None else round(max(first, P99_FLOOR_MS) * (1 + P99_DRIFT), 3)
        out[f"added_{key}_last_vs_first"] = {
            "value": last,
            "first": first,
            "limit": limit,
            "met": last is not None and limit is not None and last <= limit,
        }
    return out


def summary(report: dict[str, Any]) -> str:
    g = report["goals"]
    marks = ", ".join(f"{name} {'met' if v['met'] else 'NOT MET'} ({v['value']})" for name, v in g.items())
    rss = report["rss_mb"]
    return (
        f"soak: {report['spans']['calls_sent']} calls in {report['wall_s']:.0f} s ({report['calls_per_s']}/s); RSS "
        f"{rss['start']} -> {rss['end']} MB, at calls {rss['at_calls']}; {marks}; the machine was "
        f"{report['machine_cpu_busy_share']:.0%} busy"
    )


def main() -> None:
    parser = report_cli.parser(__doc__ or "")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to load Lightwire (default 10)")
    parser.add_argument("--window-s", type=float, default=60.0, help="seconds per window, its direct probe included")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--workdir", type=Path, help="keep logs and the DuckDB file here (default: a temp dir)")
    args = parser.parse_args()
    if args.window_s <= PROBE_S:
        parser.error(f"--window-s must be over the {PROBE_S:g} s direct probe")
    can_pin = {LOADGEN_CPU, PROXY_CPU} <= os.sched_getaffinity(0) and shutil.which("taskset") is not None
    with contextlib.ExitStack() as stack:
        workdir = report_cli.work_dir(stack, args.workdir, "lightwire-soak-")
        run = asyncio.run(soak(args.minutes, args.window_s, can_pin and not args.no_pin, workdir))
    report: dict[str, Any] = {
        "settings": {
            "minutes": args.minutes,
            "window_s": args.window_s,
            "probe_s": PROBE_S,
            "workers": WORKERS,
            "mix": {"stream_every": STREAM_EVERY, "feedback_every": FEEDBACK_EVERY, "turns": TURNS},
            "pinned": can_pin and not args.no_pin,
            "python": sys.version.split()[0],
        },
        **run,
    }
    report["goals"] = goals(report)
    report_cli.emit(report, args.out, summary(report))


if __name__ == "__main__":
    main()

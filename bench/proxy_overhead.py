"""Proxy overhead: the same closed-loop load sent to the fake upstream directly, through Lightwire and through
LiteLLM's proxy, interleaved in one run, every target's numbers side by side.

    .venv/bin/python -m bench.proxy_overhead [--quick | --pin] [--rate R ...] [--out FILE]

Load: one aiohttp ``ClientSession`` in this process; C workers each send requests back to back (closed loop) for a
fixed time. Three scenarios: non-streaming chat at concurrency 1 and 32, and 32 concurrent streams of
``STREAM_CHUNKS`` chunks ``CHUNK_DELAY_S`` apart (the fake upstream's ``x-fake-*`` headers); and two of the
Responses API, direct and through Lightwire only: one call at a time, and 32 streams of typed events (the first
event's time is their ``ttfc``). The schedule is rounds
of scenario x target, the target order rotated every round, so that machine noise hits all targets alike; every
measured run starts with a short warm-up at its own concurrency, and every target gets a longer one at the start.
Latencies are pooled over rounds per target; req/s is successful requests over the runs' total time.

CPU placement (2 cores, 4 busy processes): this process (the load generator) and the fake upstream share CPU 0; the
proxy under test has CPU 1 to itself. Both proxies are pinned there, but only one is loaded at a time, so each gets
exactly one core (as with one worker in production) and neither competes with the load it is measured under. Direct
runs leave CPU 1 idle. ``--no-pin`` leaves placement to the kernel.

LiteLLM, made comparable (see ``litellm_config``): one uvicorn worker (``--num_workers 1``); no database (no
``DATABASE_URL``, so no spend or error logs) and no callbacks; ``LITELLM_LOG=ERROR``, which also turns off uvicorn's
per-request access log (Lightwire writes none unless at debug level); ``LITELLM_LOCAL_MODEL_COST_MAP=True`` (no
network fetch at start); ``LITELLM_MODE=PRODUCTION`` (no ``.env`` loading). It refuses to start without a master
key, so Lightwire gets the same key (``--api-key``): both check a bearer token, the fake checks none. LiteLLM does not
pass client ``x-`` headers upstream, so the stream shape is set in its model entry (``extra_headers``; the fake
ignores them on non-streaming calls). A difference that matters: LiteLLM's CLI runs uvicorn on uvloop with httptools,
Lightwire runs aiohttp on the default asyncio loop. Lightwire otherwise runs with its defaults.

Spans: after the load Lightwire gets SIGTERM; once it has exited, its DuckDB file must hold one ``spans`` row per
model call this bench sent it, warm-ups included.

``--pin`` reproduces issue 16's table: placement as above (required), 5-second runs, three rounds (about two minutes
of load on each proxy), streams of ``PIN_STREAM_CHUNKS`` chunks sent without delay, and the issue's targets for the
added p99 at concurrency 32 and the added first-chunk p99 (``MAX_ADDED_P99_PINNED_MS``). Every mode reports each
proxy's resident memory (RSS) right after start and at the end of the load, and Lightwire's event loop's longest
stalls and the collector's pauses (its ``/healthz``, from ``proxy/loopwatch.py``).

``--rate R`` (repeatable) adds an open loop, direct and through Lightwire: non-streaming calls arriving R a second
(Poisson), each one's latency counted from when it was due. A closed loop of 32 keeps the proxy's core full, so its
p99 is the queue of a saturated server; an open loop below saturation is the tail a service sees at that load.

Reading the report: every request carries the same messages, as mock benchmarks do. ``rps_per_round`` shows a target
that slows down as calls accumulate; ``server_cpu_ms_per_request`` (the target server's CPU time, all threads, per
call) is the figure machine noise disturbs least; ``machine_during_runs`` says how much CPU other processes took.
Pinned, Lightwire's store writer thread shares its one core with its event loop; unpinned it may use the second.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import duckdb
import orjson
from tqdm import tqdm

from bench import memory_lookup
from bench import report as report_cli
from bench.machine import busy_seconds, process_seconds, rss_mb

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's scripts: lightwire, litellm

MODEL = "bench"
API_KEY = "sk-bench-0123456789abcdef0123456789abcdef"  # LiteLLM's master key and Lightwire's client key
STREAM_CHUNKS = 20
CHUNK_DELAY_S = 0.01
PIN_STREAM_CHUNKS = 50
MESSAGES = [{"role": "user", "content": "Say hello."}]

# Targets from the issue.
MAX_ADDED_P50_MS = 0.5  # latency Lightwire adds at concurrency 1
MIN_RPS_VS_LITELLM = 5.0  # Lightwire req/s over LiteLLM req/s at concurrency 32
MAX_ADDED_TTFC_P99_MS = 2.0  # what streaming through Lightwire adds to the first chunk's p99
MAX_ADDED_P99_PINNED_MS = 5.0  # issue 16, --pin: added p99 at c=32 and added first-chunk p99 with 32 streams
MAX_MEMORY_ADDED_P50_MS = 0.3  # with --memory: what memory adds to Lightwire's p50 at concurrency 1

LOADGEN_CPU = 0
PROXY_CPU = 1
CLIENT_CONNECTIONS = 256
CLIENT_KEEPALIVE_S = 2.0  # below uvicorn's 5 s, so that no server closes a pooled connection under a request
REQUEST_TIMEOUT_S = 30.0
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
POLL_S = 0.2
EXAMPLES_KEPT = 3
MEMORY = "lightwire_memory"  # the target with --memory
PLACEMENT = f"load generator and fake upstream on CPU {LOADGEN_CPU}, proxy under test on CPU {PROXY_CPU}"


@dataclass(frozen=True)
class Profile:
    rounds: int
    run_s: float  # measured seconds per round, scenario and target
    run_warmup_s: float  # before each measured run, at its concurrency
    target_warmup_s: float  # per target before the first round, split over the scenarios
    stream_chunks: int = STREAM_CHUNKS
    chunk_delay_s: float = CHUNK_DELAY_S
    added_ttfc_p99_limit_ms: float = MAX_ADDED_TTFC_P99_MS
    added_p99_c32_limit_ms: float | None = None

    @property
    def fake_headers(self) -> dict[str, str]:
        """How the fake upstream streams (it ignores these on non-streaming calls)."""
        return {"x-fake-chunks": str(self.stream_chunks), "x-fake-chunk-delay": str(self.chunk_delay_s)}

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **self.fake_headers}

    @property
    def stream_events(self) -> int:
        return self.stream_chunks + 1  # content chunks, then one with finish_reason; then [DONE]


FULL = Profile(rounds=3, run_s=6.0, run_warmup_s=0.5, target_warmup_s=3.0)
QUICK = Profile(rounds=1, run_s=1.5, run_warmup_s=0.2, target_warmup_s=0.9)
PINNED = Profile(
    rounds=3,
    run_s=5.0,
    run_warmup_s=0.5,
    target_warmup_s=3.0,
    stream_chunks=PIN_STREAM_CHUNKS,
    chunk_delay_s=0.0,
    added_ttfc_p99_limit_ms=MAX_ADDED_P99_PINNED_MS,
    added_p99_c32_limit_ms=MAX_ADDED_P99_PINNED_MS,
)
PROFILES = {"full": FULL, "quick": QUICK, "pin": PINNED}


@dataclass(frozen=True)
class Scenario:
    name: str
    stream: bool
    concurrency: int
    api: str = "chat"  # "responses": POST /v1/responses, direct and Lightwire only (LiteLLM is compared on chat)
    rate: float = 0.0  # > 0: an open loop of this many requests a second (``--rate``), direct and Lightwire only

    @property
    def everyone(self) -> bool:
        """Whether LiteLLM runs it too: it is compared on chat calls, in closed loops (~130 req/s pinned)."""
        return self.api == "chat" and not self.rate


def at_rate(rate: float) -> Scenario:
    return Scenario(f"chat_rate_{rate:g}", stream=False, concurrency=0, rate=rate)


SCENARIOS = (
    Scenario("chat_c1", stream=False, concurrency=1),
    Scenario("chat_c32", stream=False, concurrency=32),
    Scenario("stream_c32", stream=True, concurrency=32),
    Scenario("responses_c1", stream=False, concurrency=1, api="responses"),
    Scenario("responses_stream_c32", stream=True, concurrency=32, api="responses"),
)
PATHS = {"chat": "/chat/completions", "responses": "/responses"}
BODIES = {
    ("chat", stream): orjson.dumps({"model": MODEL, "messages": MESSAGES, "stream": stream}) for stream in (False, True)
} | {
    ("responses", stream): orjson.dumps({"model": MODEL, "input": "Say hello.", "stream": stream})
    for stream in (False, True)
}
# A Responses stream: created, in_progress, output_item.added, content_part.added, the deltas, output_text.done,
# content_part.done, output_item.done, completed (its end: no [DONE]).
RESPONSES_EXTRA_EVENTS = 8


@dataclass
class Target:
    name: str
    base_url: str  # OpenAI-style, ending in /v1
    pid: int  # the server that answers it, whose CPU time is charged to it
    sent: int = 0  # model calls sent, warm-ups included


@dataclass
class Tally:
    """What one target did in one scenario, over all rounds."""

    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0  # the target's server process, all threads
    latency_ms: list[float] = field(default_factory=list)
    ttfc_ms: list[float] = field(default_factory=list)
    gap_ms: list[float] = field(default_factory=list)
    complete: int = 0  # streams with every chunk and [DONE]
    incomplete: int = 0
    round_rps: list[float] = field(default_factory=list)
    error_examples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_examples) < EXAMPLES_KEPT:
            self.error_examples.append(what)

    def report(self, stream: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": self.ok + self.errors,
            "errors": self.errors,
            "rps": round(self.ok / self.seconds, 1) if self.seconds else None,
            "rps_per_round": [round(r, 1) for r in self.round_rps],
            "p50_ms": percentile(self.latency_ms, 0.50),
            "p99_ms": percentile(self.latency_ms, 0.99),
            "server_cpu_ms_per_request": round(self.cpu_s * 1000 / self.ok, 3) if self.ok else None,
        }
        if stream:
            out |= {
                "ttfc_p50_ms": percentile(self.ttfc_ms, 0.50),
                "ttfc_p99_ms": percentile(self.ttfc_ms, 0.99),
                "gap_p50_ms": percentile(self.gap_ms, 0.50),
                "gap_p99_ms": percentile(self.gap_ms, 0.99),
                "streams_complete": self.complete,
                "streams_incomplete": self.incomplete,
                "all_chunks_arrived": self.incomplete == 0 and self.errors == 0,
            }
        if self.error_examples:
            out["error_examples"] = self.error_examples
        return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return round(ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo), 3)


# -- load -----------------------------------------------------------------------------------------------------------


async def call(
    session: aiohttp.ClientSession,
    target: Target,
    scenario: Scenario,
    tally: Tally,
    profile: Profile,
    started: float | None = None,
) -> None:
    """One request; its latency counts from ``started`` (when it was due), or from now."""
    target.sent += 1
    started = time.perf_counter() if started is None else started
    stream, url = scenario.stream, target.base_url + PATHS[scenario.api]
    try:
        async with session.post(url, data=BODIES[scenario.api, stream], headers=profile.headers) as resp:
            if resp.status != 200:
                tally.error(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
            elif stream and scenario.api == "responses":
                await read_stream(resp, started, tally, profile.stream_chunks + RESPONSES_EXTRA_EVENTS, typed=True)
            elif stream:
                await read_stream(resp, started, tally, profile.stream_events)
            else:
                await resp.read()
                tally.latency_ms.append((time.perf_counter() - started) * 1000)
                tally.ok += 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.error(repr(exc))


async def read_stream(
    resp: aiohttp.ClientResponse, started: float, tally: Tally, expected_events: int, *, typed: bool = False
) -> None:
    """Time a stream's events; a chat stream ends with [DONE], a Responses stream (``typed``) with its
    ``response.completed`` event."""
    events = 0
    done = False
    last: float | None = None
    async for line in resp.content:
        if not line.startswith(b"data:"):
            continue
        now = time.perf_counter()
        if line[5:].strip() == b"[DONE]":
            done = True
            continue
        if last is None:
            tally.ttfc_ms.append((now - started) * 1000)
        else:
            tally.gap_ms.append((now - last) * 1000)
        last = now
        events += 1
        done = done or (typed and b'"type":"response.completed"' in line)
    tally.latency_ms.append((time.perf_counter() - started) * 1000)
    tally.ok += 1
    if done and events == expected_events:
        tally.complete += 1
    else:
        tally.incomplete += 1
        if len(tally.error_examples) < EXAMPLES_KEPT:
            tally.error_examples.append(f"stream with {events} events, [DONE] {'seen' if done else 'missing'}")


async def closed_loop(
    session: aiohttp.ClientSession, target: Target, scenario: Scenario, seconds: float, tally: Tally, profile: Profile
) -> float:
    """``scenario.concurrency`` workers send back to back until ``seconds`` have passed; returns the time taken."""
    started = time.perf_counter()
    deadline = started + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            await call(session, target, scenario, tally, profile)

    await asyncio.gather(*(worker() for _ in range(scenario.concurrency)))
    return time.perf_counter() - started


async def open_loop(
    session: aiohttp.ClientSession, target: Target, scenario: Scenario, seconds: float, tally: Tally, profile: Profile
) -> float:
    """Requests arrive ``scenario.rate`` a second (Poisson) for ``seconds``, answered or not, as a service's
    users send them; each one's latency counts from when it was due, so a stall delays every call due in it (a
    closed loop would send fewer calls instead, and hide them)."""
    arrivals = random.Random(0)
    started = due = time.perf_counter()
    calls: set[asyncio.Task[None]] = set()
    while (due := due + arrivals.expovariate(scenario.rate)) < started + seconds:
        await asyncio.sleep(due - time.perf_counter())
        calls.add(asyncio.create_task(call(session, target, scenario, tally, profile, started=due)))
    await asyncio.gather(*calls)
    return time.perf_counter() - started


async def load(
    session: aiohttp.ClientSession, target: Target, scenario: Scenario, seconds: float, tally: Tally, profile: Profile
) -> float:
    send = open_loop if scenario.rate else closed_loop
    return await send(session, target, scenario, seconds, tally, profile)


async def measured_run(
    session: aiohttp.ClientSession, target: Target, scenario: Scenario, profile: Profile, tally: Tally
) -> None:
    await load(session, target, scenario, profile.run_warmup_s, Tally(), profile)
    ok_before = tally.ok
    cpu_before = process_seconds(target.pid)
    seconds = await load(session, target, scenario, profile.run_s, tally, profile)
    tally.cpu_s += process_seconds(target.pid) - cpu_before
    tally.seconds += seconds
    tally.round_rps.append((tally.ok - ok_before) / seconds)


# -- servers --------------------------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    proc: asyncio.subprocess.Process
    log: Path


@dataclass
class Fleet:
    """The server processes of one run: where their files go, which CPU each gets, and stopping them all."""

    workdir: Path
    pin: bool
    servers: dict[str, Server] = field(default_factory=dict)
    stopped: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def spawn(
        self, name: str, argv: list[str], *, cpu: int, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> Server:
        """Start a server in ``cwd`` (default: the work dir), its output in ``NAME.log`` there."""
        if self.pin:
            argv = ["taskset", "-c", str(cpu), *argv]
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as fh:
            stdout = asyncio.subprocess.PIPE if name == "fake" else fh  # the fake prints its URL on stdout
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=stdout, stderr=fh, cwd=cwd or self.workdir, env=env
            )
        self.servers[name] = server = Server(name, proc, log)
        return server

    async def stop(self, name: str) -> dict[str, Any]:
        """SIGTERM, then wait for the exit (SIGKILL after ``STOP_TIMEOUT_S``)."""
        proc = self.servers[name].proc
        started = time.perf_counter()
        killed = False
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                killed = True
                await proc.wait()
        self.stopped[name] = {"exit_code": proc.returncode, "stop_s": round(time.perf_counter() - started, 2)}
        self.stopped[name] |= {"killed": killed, "log": log_problems(self.servers[name].log)}
        return self.stopped[name]

    async def stop_all(self) -> None:
        for name in reversed(self.servers):
            if name not in self.stopped:
                await self.stop(name)

    def cpu_seconds(self) -> float:
        """CPU time of this process and of the live servers."""
        mine = os.times()
        alive = [s.proc.pid for s in self.servers.values() if s.proc.returncode is None]
        return mine.user + mine.system + sum(process_seconds(pid) for pid in alive)


async def wait_ready(session: aiohttp.ClientSession, server: Server, url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if server.proc.returncode is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{tail(server.log)}")
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url) as resp:
                if resp.status == 200:
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name} not ready after {START_TIMEOUT_S:g} s:\n{tail(server.log)}")
        await asyncio.sleep(POLL_S)


def tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def log_problems(log: Path) -> dict[str, Any]:
    lines = log.read_text(errors="replace").splitlines()
    bad = [line for line in lines if any(w in line for w in ("ERROR", "Traceback", "WARNING", "Exception"))]
    return {"lines": len(lines), "problem_lines": len(bad), "examples": bad[:EXAMPLES_KEPT], "last": lines[-2:]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def start_fake(fleet: Fleet) -> Target:
    argv = [sys.executable, "-m", "tests.fake_upstream", "--port", "0"]
    server = await fleet.spawn("fake", argv, cpu=LOADGEN_CPU, cwd=REPO)
    assert server.proc.stdout is not None
    line = await asyncio.wait_for(server.proc.stdout.readline(), START_TIMEOUT_S)
    if not line.startswith(b"http"):
        raise RuntimeError(f"the fake upstream did not print its URL:\n{tail(server.log)}")
    return Target("direct", line.decode().strip(), server.proc.pid)


async def start_lightwire(
    session: aiohttp.ClientSession,
    fleet: Fleet,
    upstream: str,
    db: Path,
    *,
    name: str = "lightwire",
    bank: int = 0,
    checkout: Path | None = None,
) -> Target:
    """Lightwire with its defaults; with ``bank`` trajectories, a second one serving an active memory bank of
    that many, in which every call here finds examples (one trajectory in ten shares its words); with
    ``checkout``, the code of that folder (first on its ``PYTHONPATH``)."""
    port = free_port()
    argv = [str(BIN / "lightwire"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--db", str(db), "--upstream", upstream, "--api-key", API_KEY]
    if bank:
        memory_lookup.seed(db, fleet.workdir / "memory", bank, mention=MESSAGES[-1]["content"])
        argv += ["--memory", MODEL]
    env = dict(os.environ, PYTHONPATH=str(checkout)) if checkout is not None else None
    server = await fleet.spawn(name, argv, cpu=PROXY_CPU, env=env)
    await wait_ready(session, server, f"http://127.0.0.1:{port}/healthz")
    return Target(name, f"http://127.0.0.1:{port}/v1", server.proc.pid)


def litellm_config(upstream: str, profile: Profile) -> dict[str, Any]:
    params: dict[str, Any] = {"model": f"openai/{MODEL}", "api_base": upstream, "api_key": "sk-upstream"}
    params["extra_headers"] = profile.fake_headers
    return {
        "model_list": [{"model_name": MODEL, "litellm_params": params}],
        "litellm_settings": {"set_verbose": False, "callbacks": []},
        "general_settings": {"master_key": API_KEY, "disable_spend_logs": True, "disable_error_logs": True},
    }


async def start_litellm(session: aiohttp.ClientSession, fleet: Fleet, upstream: str, profile: Profile) -> Target:
    config = fleet.workdir / "litellm.yaml"  # JSON is YAML
    config.write_bytes(orjson.dumps(litellm_config(upstream, profile)))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_HOST", "REDIS_URL")}
    env |= {"LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MODE": "PRODUCTION"}
    port = free_port()
    argv = [str(BIN / "litellm"), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    server = await fleet.spawn("litellm", [*argv, "--num_workers", "1"], cpu=PROXY_CPU, env=env)
    await wait_ready(session, server, f"http://127.0.0.1:{port}/health/liveliness")
    return Target("litellm", f"http://127.0.0.1:{port}/v1", server.proc.pid)


def read_spans(db: Path) -> dict[str, Any]:
    """Count Lightwire's rows (only once it has exited: DuckDB allows one process per file)."""
    with duckdb.connect(str(db), read_only=True) as con:
        total, distinct, streams = con.execute(
            "SELECT count(*), count(DISTINCT span_id), count(*) FILTER (WHERE request_stream) FROM spans"
        ).fetchone() or (0, 0, 0)
        statuses = con.execute(
            "SELECT coalesce(CAST(http_status AS VARCHAR), 'none'), count(*) FROM spans GROUP BY 1 ORDER BY 1"
        ).fetchall()
    rejected = db.with_suffix(".rejected.jsonl")
    return {
        "rows": total,
        "distinct_span_ids": distinct,
        "stream_rows": streams,
        "by_http_status": dict(statuses),
        "rejected_rows_file": sum(1 for _ in rejected.open()) if rejected.exists() else 0,
    }


# -- the run --------------------------------------------------------------------------------------------------------


async def measure(
    session: aiohttp.ClientSession,
    targets: list[Target],
    profile: Profile,
    fleet: Fleet,
    scenarios: tuple[Scenario, ...],
) -> dict[str, Any]:
    """Warm every target up, then run the rounds; returns the tallies and what else the machine was doing."""

    def runs(target: Target, scenario: Scenario) -> bool:
        return scenario.everyone or target.name != "litellm"

    for target in targets:
        for scenario in scenarios:
            if runs(target, scenario):
                warmup = profile.target_warmup_s / len(scenarios)
                await load(session, target, scenario, warmup, Tally(), profile)
    tallies = {t.name: {s.name: Tally() for s in scenarios} for t in targets}
    schedule = [
        (scenario, targets[(i + r) % len(targets)])  # the target order rotates every round
        for r in range(profile.rounds)
        for scenario in scenarios
        for i in range(len(targets))
        if runs(targets[(i + r) % len(targets)], scenario)
    ]
    most_pending = 0
    busy_before, ours_before, started = busy_seconds(), fleet.cpu_seconds(), time.perf_counter()
    for scenario, target in tqdm(schedule, desc="runs", unit="run", leave=False, disable=None):
        await measured_run(session, target, scenario, profile, tallies[target.name][scenario.name])
        if target.name == "lightwire":  # rows still queued for the store right after a run
            async with session.get(target.base_url.removesuffix("/v1") + "/healthz") as resp:
                most_pending = max(most_pending, (await resp.json())["spans_pending"])
    others = busy_seconds() - busy_before - (fleet.cpu_seconds() - ours_before)
    capacity = (time.perf_counter() - started) * (os.cpu_count() or 1)
    return {
        "results": {t.name: {s.name: tallies[t.name][s.name].report(s.stream) for s in scenarios} for t in targets},
        "most_pending_spans_after_a_run": most_pending,
        "machine_during_runs": {
            "other_processes_cpu_s": round(others, 1),
            "other_processes_cpu_share": round(others / capacity, 3),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        },
    }


async def bench(
    profile: Profile, pin: bool, workdir: Path, bank: int = 0, rates: tuple[float, ...] = ()
) -> dict[str, Any]:
    if pin:
        os.sched_setaffinity(0, {LOADGEN_CPU})
    db = workdir / "lightwire.duckdb"
    fleet = Fleet(workdir, pin)
    connector = aiohttp.TCPConnector(limit=CLIENT_CONNECTIONS, keepalive_timeout=CLIENT_KEEPALIVE_S)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        try:
            direct = await start_fake(fleet)
            lightwire, litellm = await asyncio.gather(
                start_lightwire(session, fleet, direct.base_url, db),
                start_litellm(session, fleet, direct.base_url, profile),
            )
            proxies = (lightwire, litellm)
            memory = {t.name: {"rss_mb_start": rss_mb(t.pid)} for t in proxies}
            targets = [direct, lightwire, litellm]
            if bank:
                bank_db = workdir / "lightwire-memory.duckdb"
                targets.append(await start_lightwire(session, fleet, direct.base_url, bank_db, name=MEMORY, bank=bank))
            run = await measure(session, targets, profile, fleet, SCENARIOS + tuple(map(at_rate, rates)))
            for t in proxies:
                memory[t.name]["rss_mb_end"] = rss_mb(t.pid)
            async with session.get(lightwire.base_url.removesuffix("/v1") + "/healthz") as resp:
                loop = (await resp.json())["loop"]
            shutdown = await fleet.stop("lightwire")
        finally:
            await fleet.stop_all()
    rows = read_spans(db)
    spans = {
        "requests_sent": lightwire.sent,
        **rows,
        "equal": rows["rows"] == lightwire.sent,
        "most_pending_after_a_run": run.pop("most_pending_spans_after_a_run"),
        "shutdown": {k: shutdown[k] for k in ("exit_code", "stop_s", "killed")},
    }
    return run | {"memory": memory, "lightwire_event_loop": loop, "spans": spans, "servers": fleet.stopped}


def compare(results: dict[str, Any], rates: tuple[float, ...] = ()) -> dict[str, Any]:
    """Each proxy against direct, Lightwire against LiteLLM, and Lightwire at each open-loop rate."""
    direct = results["direct"]

    def minus(target: str, scenario: str, key: str) -> float | None:
        a, b = results[target][scenario][key], direct[scenario][key]
        return None if a is None or b is None else round(a - b, 3)

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a and b else None

    out: dict[str, Any] = {}
    for proxy in ("lightwire", "litellm"):
        out[proxy] = {
            "added_p50_ms_c1": minus(proxy, "chat_c1", "p50_ms"),
            "added_p99_ms_c1": minus(proxy, "chat_c1", "p99_ms"),
            "added_p50_ms_c32": minus(proxy, "chat_c32", "p50_ms"),
            "added_p99_ms_c32": minus(proxy, "chat_c32", "p99_ms"),
            "added_ttfc_p50_ms": minus(proxy, "stream_c32", "ttfc_p50_ms"),
            "added_ttfc_p99_ms": minus(proxy, "stream_c32", "ttfc_p99_ms"),
            "added_p50_ms_c1_responses": minus(proxy, "responses_c1", "p50_ms"),
            "added_first_event_p99_ms_responses": minus(proxy, "responses_stream_c32", "ttfc_p99_ms"),
            "added_gap_p99_ms": minus(proxy, "stream_c32", "gap_p99_ms"),
            "rps_c1_vs_direct": ratio(results[proxy]["chat_c1"]["rps"], direct["chat_c1"]["rps"]),
            "rps_c32_vs_direct": ratio(results[proxy]["chat_c32"]["rps"], direct["chat_c32"]["rps"]),
        }
    if MEMORY in results:  # what memory adds to Lightwire itself
        out[MEMORY] = {
            "added_p50_ms_c1_vs_lightwire": round(
                results[MEMORY]["chat_c1"]["p50_ms"] - results["lightwire"]["chat_c1"]["p50_ms"], 3
            ),
            "added_p50_ms_c32_vs_lightwire": round(
                results[MEMORY]["chat_c32"]["p50_ms"] - results["lightwire"]["chat_c32"]["p50_ms"], 3
            ),
            "cpu_ms_per_request_c32": results[MEMORY]["chat_c32"].get("server_cpu_ms_per_request"),
            "lightwire_cpu_ms_per_request_c32": results["lightwire"]["chat_c32"].get("server_cpu_ms_per_request"),
        }
    out["lightwire_at_rate"] = {
        f"{rate:g}": {
            "added_p50_ms": minus("lightwire", at_rate(rate).name, "p50_ms"),
            "added_p99_ms": minus("lightwire", at_rate(rate).name, "p99_ms"),
            "rps": results["lightwire"][at_rate(rate).name]["rps"],
            "direct_p99_ms": direct[at_rate(rate).name]["p99_ms"],
        }
        for rate in rates
    }
    out["lightwire_vs_litellm_rps_c32"] = ratio(
        results["lightwire"]["chat_c32"]["rps"], results["litellm"]["chat_c32"]["rps"]
    )
    return out


def goals(overhead: dict[str, Any], spans: dict[str, Any], profile: Profile) -> dict[str, dict[str, Any]]:
    def at_most(value: float | None, limit: float) -> dict[str, Any]:
        return {"value": value, "limit": limit, "met": value is not None and value <= limit}

    speedup = overhead["lightwire_vs_litellm_rps_c32"]
    out = {
        "added_p50_ms_c1": at_most(overhead["lightwire"]["added_p50_ms_c1"], MAX_ADDED_P50_MS),
        "rps_c32_vs_litellm": {
            "value": speedup,
            "limit": MIN_RPS_VS_LITELLM,
            "met": speedup is not None and speedup >= MIN_RPS_VS_LITELLM,
        },
        "added_ttfc_p99_ms": at_most(overhead["lightwire"]["added_ttfc_p99_ms"], profile.added_ttfc_p99_limit_ms),
        "responses_added_p50_ms_c1": at_most(overhead["lightwire"]["added_p50_ms_c1_responses"], MAX_ADDED_P50_MS),
        "responses_added_first_event_p99_ms": at_most(
            overhead["lightwire"]["added_first_event_p99_ms_responses"], profile.added_ttfc_p99_limit_ms
        ),
        "rows_equal_requests": {"value": f"{spans['rows']}/{spans['requests_sent']}", "met": spans["equal"]},
    }
    if profile.added_p99_c32_limit_ms is not None:
        out["added_p99_ms_c32"] = at_most(overhead["lightwire"]["added_p99_ms_c32"], profile.added_p99_c32_limit_ms)
    if MEMORY in overhead:
        added = overhead[MEMORY]["added_p50_ms_c1_vs_lightwire"]
        out["memory_added_p50_ms_c1"] = at_most(added, MAX_MEMORY_ADDED_P50_MS)
    return out


def summary(report: dict[str, Any]) -> str:
    g = report["goals"]

    def mark(name: str) -> str:
        return "met" if g[name]["met"] else "NOT MET"

    def added(name: str) -> str:
        value = g[name]["value"]
        return "n/a" if value is None else f"{value:+.3f}"

    tail = ""
    if "added_p99_ms_c32" in g:
        limit = g["added_p99_ms_c32"]["limit"]
        tail = f"{added('added_p99_ms_c32')} ms p99 at c=32 (<= {limit:g} ms: {mark('added_p99_ms_c32')}); "
    for rate, row in report["overhead"]["lightwire_at_rate"].items():
        tail += f"{row['added_p99_ms']:+.3f} ms p99 at {rate} req/s; "
    rss = report["memory"]["lightwire"]
    longest = [stall["ms"] for stall in report["lightwire_event_loop"]["longest"][:3]]
    return (
        f"Lightwire: {added('added_p50_ms_c1')} ms p50 at c=1 "
        f"(<= {MAX_ADDED_P50_MS:g} ms: {mark('added_p50_ms_c1')}); "
        f"{g['rps_c32_vs_litellm']['value']}x LiteLLM req/s at c=32 (>= {MIN_RPS_VS_LITELLM:g}x: "
        f"{mark('rps_c32_vs_litellm')}); {added('added_ttfc_p99_ms')} ms first-chunk p99 "
        f"(<= {g['added_ttfc_p99_ms']['limit']:g} ms: {mark('added_ttfc_p99_ms')}); {tail}"
        f"Responses: {added('responses_added_p50_ms_c1')} ms p50 at c=1 ({mark('responses_added_p50_ms_c1')}), "
        f"{added('responses_added_first_event_p99_ms')} ms first-event p99 "
        f"({mark('responses_added_first_event_p99_ms')}); "
        f"spans {g['rows_equal_requests']['value']} rows/requests ({mark('rows_equal_requests')}); RSS "
        f"{rss['rss_mb_start']} -> {rss['rss_mb_end']} MB; longest loop stalls {longest} ms; "
        f"{report['wall_s']:.0f} s, other processes took "
        f"{report['machine_during_runs']['other_processes_cpu_share']:.0%} of the CPU"
    )


def main() -> None:
    parser = report_cli.parser(__doc__ or "")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="one short round (a smoke test, under a minute)")
    mode.add_argument("--pin", action="store_true", help="issue 16's table: pinned, 5 s runs, 50-chunk streams")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs (see the module docstring)")
    parser.add_argument("--workdir", type=Path, help="keep logs, config and the DuckDB file here (default: a temp dir)")
    parser.add_argument(
        "--memory",
        type=int,
        default=0,
        help="also measure Lightwire with an active memory bank of this many trajectories",
    )
    parser.add_argument(
        "--rate",
        type=float,
        action="append",
        default=[],
        help="also send non-streaming calls in an open loop at this many a second (repeatable): the tail below "
        "saturation, where a closed loop of 32 keeps the proxy's core full",
    )
    args = parser.parse_args()

    name = "quick" if args.quick else "pin" if args.pin else "full"
    profile = PROFILES[name]
    can_pin = {LOADGEN_CPU, PROXY_CPU} <= os.sched_getaffinity(0) and shutil.which("taskset") is not None
    if args.pin and not (can_pin and not args.no_pin):
        parser.error(f"--pin needs CPUs {LOADGEN_CPU} and {PROXY_CPU} and taskset, and excludes --no-pin")
    pin = can_pin and not args.no_pin
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        workdir = report_cli.work_dir(stack, args.workdir, "lightwire-bench-")
        run = asyncio.run(bench(profile, pin, workdir, args.memory, tuple(args.rate)))
    report: dict[str, Any] = {
        "settings": {
            "profile": name,
            "memory_trajectories": args.memory,
            "open_loop_rates": args.rate,
            "rounds": profile.rounds,
            "run_s": profile.run_s,
            "stream": {"chunks": profile.stream_chunks, "chunk_delay_s": profile.chunk_delay_s},
            "cpus": PLACEMENT if pin else "not pinned",
            "versions": {
                "python": sys.version.split()[0],
                **{pkg: metadata.version(pkg) for pkg in ("lightwire", "litellm", "aiohttp", "uvicorn")},
            },
        },
        **run,
    }
    report["overhead"] = compare(run["results"], tuple(args.rate))
    report["goals"] = goals(report["overhead"], run["spans"], profile)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report_cli.emit(report, args.out, summary(report))


if __name__ == "__main__":
    main()

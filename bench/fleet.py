"""Fleet mode: what shipping to a share costs a sidecar, how soon its data is in the share, how soon every sidecar
follows a registry change, and whether every call reaches the share.

    .venv/bin/python -m bench.fleet [--quick] [--out FILE]

Processes: the fake upstream in vLLM mode (``tests/fake_upstream.py``: it answers any model name, so a registry
can name versions it never loaded), a sidecar without a share (``alone``), and two sidecars ``a`` and ``b`` that
share a folder, all three ``lightwire serve --vllm FAKE`` with their defaults (``share_interval`` 2 s,
``share_poll`` 0.5 s).

1. **Throughput**: closed-loop chat calls at concurrency ``CONCURRENCY`` for ``run_s`` seconds to each sidecar in
   turn, the order rotated every round; each shared sidecar's req/s over ``alone``'s (target >= 0.95).
2. **Segment lag**: calls at a steady ``LAG_RATE`` per second to ``a`` and ``b``; a watcher lists the share every
   ``WATCH_S`` and reads the span ids of each new segment. Lag = first seen in the share - response received
   (target p99 <= 5 s; the watcher's period adds up to ``WATCH_S``).
3. **Registry change**: the registry is rewritten (as the learner does) with a new active version,
   ``CHANGES`` times; each sidecar's ``/healthz`` is read every ``WATCH_S`` until it routes to it. Per change: the
   slower sidecar (target p99 <= 2 s).
4. **Spans in the share**: after SIGTERM, distinct span ids in the share's segments = calls answered by ``a`` and
   ``b``, every phase included.

On a 2-core machine shared with other work the figures are noisy; ``machine`` says how busy it was.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import duckdb
import orjson

from bench.machine import busy_seconds
from bench.proxy_overhead import BIN, REPO, free_port, percentile
from store.share import Registry, Share, write_registry

CONCURRENCY = 16
LAG_RATE = 20.0  # calls per second, to each shared sidecar
WATCH_S = 0.02
CHANGES = 20
MIN_THROUGHPUT_RATIO = 0.95
MAX_LAG_P99_S = 5.0
MAX_FOLLOW_P99_S = 2.0
BODY = orjson.dumps({"model": "agent", "messages": [{"role": "user", "content": "Say hello."}]})
SIDECARS = ("alone", "a", "b")


@dataclass(frozen=True)
class Profile:
    rounds: int
    run_s: float
    lag_s: float
    changes: int


FULL = Profile(rounds=3, run_s=5.0, lag_s=15.0, changes=CHANGES)
QUICK = Profile(rounds=1, run_s=2.0, lag_s=6.0, changes=5)


@dataclass
class Sidecar:
    name: str
    root: str
    proc: asyncio.subprocess.Process
    db: Path
    answered: int = 0


async def start_fake() -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fake_upstream", "--vllm", "--port", "0", cwd=REPO, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    return proc, (await proc.stdout.readline()).decode().strip()


async def start_sidecar(http: aiohttp.ClientSession, name: str, vllm: str, work: Path, share: Path | None) -> Sidecar:
    port = free_port()
    argv = [str(BIN / "lightwire"), "serve", "--port", str(port), "--vllm", vllm, "--db", str(work / f"{name}.duckdb")]
    argv += ["--share", str(share)] if share else []
    with open(work / f"{name}.log", "wb") as log:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=log)
    root = f"http://127.0.0.1:{port}"
    async with asyncio.timeout(120):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(root + "/readyz") as resp:
                    if resp.status == 200:
                        return Sidecar(name, root, proc, work / f"{name}.duckdb")
            await asyncio.sleep(0.1)


async def chat(http: aiohttp.ClientSession, sidecar: Sidecar) -> str | None:
    """One call; its span id, or None when it failed."""
    async with http.post(sidecar.root + "/v1/chat/completions", data=BODY) as resp:
        await resp.read()
        if resp.status != 200:
            return None
        sidecar.answered += 1
        return resp.headers["x-lightwire-span-id"]


async def closed_loop(http: aiohttp.ClientSession, sidecar: Sidecar, seconds: float) -> int:
    """``CONCURRENCY`` workers calling back to back for ``seconds``; the calls answered."""
    deadline = time.perf_counter() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            if await chat(http, sidecar) is not None:
                done += 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done


async def throughput(http: aiohttp.ClientSession, sidecars: dict[str, Sidecar], profile: Profile) -> dict[str, Any]:
    done = {name: 0 for name in sidecars}
    order = list(SIDECARS)
    for round_ in range(profile.rounds):
        for name in order[round_ % 3 :] + order[: round_ % 3]:
            done[name] += await closed_loop(http, sidecars[name], profile.run_s)
    rps = {name: round(n / (profile.rounds * profile.run_s), 1) for name, n in done.items()}
    ratios = {name: round(rps[name] / rps["alone"], 3) for name in ("a", "b")}
    return {"concurrency": CONCURRENCY, "rps": rps, "ratio_to_alone": ratios}


async def segment_lag(http: aiohttp.ClientSession, sidecars: list[Sidecar], share: Path, seconds: float) -> list[float]:
    answered: dict[str, float] = {}
    seen: dict[str, float] = {}
    read: set[Path] = set()
    stop = asyncio.Event()

    async def watch() -> None:
        while not (stop.is_set() and answered.keys() <= seen.keys()):
            new = [p for p in (share / "spans").glob("*.parquet") if p not in read]
            now = time.perf_counter()
            for path in new:
                for span_id in await asyncio.to_thread(_span_ids, path):
                    seen.setdefault(span_id, now)
                read.add(path)
            await asyncio.sleep(WATCH_S)

    async def send(sidecar: Sidecar) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            span_id = await chat(http, sidecar)
            if span_id is not None:
                answered[span_id] = time.perf_counter()
            await asyncio.sleep(1 / LAG_RATE)

    watcher = asyncio.create_task(watch())
    await asyncio.gather(*(send(s) for s in sidecars))
    stop.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(watcher, 30)
    return [seen[s] - t for s, t in answered.items() if s in seen]


def _span_ids(path: Path) -> list[str]:
    with duckdb.connect() as con:
        return [r[0] for r in con.execute("SELECT span_id FROM read_parquet(?)", [str(path)]).fetchall()]


async def follow_times(http: aiohttp.ClientSession, sidecars: list[Sidecar], share: Path, changes: int) -> list[float]:
    times = []
    for i in range(changes):
        version = f"v{i + 1}"
        registry = Registry(
            versions={version: {"served_name": f"lw-{version}-bench", "lora_path": f"/adapters/{version}"}},
            active=version,
        )
        started = time.perf_counter()
        await asyncio.to_thread(write_registry, Share(str(share)), registry)
        pending = {s.name for s in sidecars}
        while pending:
            for sidecar in sidecars:
                if sidecar.name in pending:
                    async with http.get(sidecar.root + "/healthz") as resp:
                        if (await resp.json())["policy"]["active"] == version:
                            pending.discard(sidecar.name)
            await asyncio.sleep(WATCH_S)
        times.append(time.perf_counter() - started)
        await asyncio.sleep(0.3)  # off the poll's phase
    return times


async def bench(profile: Profile, work: Path) -> dict[str, Any]:
    share = work / "share"
    fake, vllm = await start_fake()
    busy_before, wall_before = busy_seconds(), time.perf_counter()
    sidecars: dict[str, Sidecar] = {}
    try:
        connector = aiohttp.TCPConnector(limit=256)
        async with aiohttp.ClientSession(connector=connector) as http:
            for name in SIDECARS:
                sidecars[name] = await start_sidecar(http, name, vllm, work, None if name == "alone" else share)
            shared = [sidecars["a"], sidecars["b"]]
            report: dict[str, Any] = {"throughput": await throughput(http, sidecars, profile)}
            lags = await segment_lag(http, shared, share, profile.lag_s)
            report["segment_lag_s"] = {"calls": len(lags), "p50": percentile(lags, 0.5), "p99": percentile(lags, 0.99)}
            follows = await follow_times(http, shared, share, profile.changes)
            report["registry_to_every_sidecar_s"] = {
                "changes": len(follows),
                "p50": percentile(follows, 0.5),
                "p99": percentile(follows, 0.99),
            }
    finally:
        for sidecar in sidecars.values():
            sidecar.proc.send_signal(signal.SIGTERM)
        for sidecar in sidecars.values():
            await sidecar.proc.wait()
        fake.terminate()
        await fake.wait()
    wall = time.perf_counter() - wall_before
    with duckdb.connect() as con:
        (in_share,) = con.execute(
            f"SELECT count(DISTINCT span_id) FROM read_parquet('{share}/spans/*.parquet')"
        ).fetchone() or (0,)
    sent = sidecars["a"].answered + sidecars["b"].answered
    report["spans_in_share"] = {"calls_answered": sent, "spans": in_share, "all": in_share == sent}
    report["machine"] = {
        "cores": os.cpu_count(),
        "busy_cores_during_run": round((busy_seconds() - busy_before) / wall, 2),
    }
    report["goals"] = goals(report)
    return report


def goals(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    ratio = min(report["throughput"]["ratio_to_alone"].values())
    lag, follow = report["segment_lag_s"]["p99"], report["registry_to_every_sidecar_s"]["p99"]
    return {
        "throughput_vs_alone": {
            "value": ratio,
            "target": f">= {MIN_THROUGHPUT_RATIO}",
            "met": ratio >= MIN_THROUGHPUT_RATIO,
        },
        "segment_lag_p99_s": {
            "value": lag,
            "target": f"<= {MAX_LAG_P99_S}",
            "met": lag is not None and lag <= MAX_LAG_P99_S,
        },
        "registry_follow_p99_s": {
            "value": follow,
            "target": f"<= {MAX_FOLLOW_P99_S}",
            "met": follow is not None and follow <= MAX_FOLLOW_P99_S,
        },
        "spans_in_share_equal_calls": {
            "value": report["spans_in_share"]["all"],
            "target": "all",
            "met": report["spans_in_share"]["all"],
        },
    }


def summary(report: dict[str, Any]) -> str:
    g = report["goals"]
    return (
        f"fleet: throughput {g['throughput_vs_alone']['value']:.2f}x alone, segment lag p99 "
        f"{g['segment_lag_p99_s']['value']:.2f} s, registry to every sidecar p99 "
        f"{g['registry_follow_p99_s']['value']:.2f} s, spans in share {report['spans_in_share']['spans']}/"
        f"{report['spans_in_share']['calls_answered']}; targets met: "
        f"{sum(v['met'] for v in g.values())}/{len(g)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short round (a smoke run, not a measurement)")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lightwire-bench-fleet-") as tmp:
        report = asyncio.run(bench(QUICK if args.quick else FULL, Path(tmp)))
    data = orjson.dumps(report, option=orjson.OPT_INDENT_2)
    if args.out:
        args.out.write_bytes(data + b"\n")
    print(data.decode())
    print(summary(report))


if __name__ == "__main__":
    main()

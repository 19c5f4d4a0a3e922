"""The hot-swap loop on a real vLLM-CPU server: how soon a new adapter on disk serves its first token, whether swaps
under load fail or stall anything, and what each way of serving a version costs in throughput, for both swap modes.

    .venv/bin/python -m bench.hotswap [--quick] [--out FILE] [--workdir DIR]

One vLLM (``proxy.vllm_server.VllmServer`` on the embedded SmolLM2-135M) serves two Lightwire processes, one after
the other, each attached with ``--vllm``: first ``--swap-mode lora``, then ``--swap-mode merged``. Adapters are
random ones from ``tests.vllm_fixtures.make_adapter`` (rank 16), made in a subprocess while vLLM starts. Calls go
through Lightwire, versions change only through its admin API. Each run:

1. **disk to first token**: a prepared adapter is copied to a fresh folder (the clock starts when the copy is
   complete), registered (``POST /admin/adapters``), activated, and a streaming chat is sent at once; the sample ends
   at its first content chunk. Afterwards ``/healthz`` must show the version active and, once Lightwire has exited,
   the stream's span (``x-lightwire-span-id``) must carry that ``adapter_version``. In lora mode each sample follows
   one straight to vLLM (load the copy under a new name, stream from it): the floor with no checks and no proxy. In
   merged mode the merge subprocess is watched (``/proc``): ``merge_until_folder_ms`` ends when its complete folder
   is renamed into place, ``merge_ms`` when the process has exited (Lightwire waits for that), and "reload to first
   token" runs from there to the first token. The first sample's version is the one measured in 2; the other
   samples follow 2.
2. **throughput**: 8 closed-loop streaming clients (``max_tokens`` 64, temperature 1, ``ignore_eos`` so that every
   request decodes as many tokens whatever the weights) for a fixed window per segment; segments alternate between
   the version and the base model (activate, rollback), so that the base model is measured in both runs, next to
   what it is compared with. Tokens are the content chunks that arrived inside the window (vLLM sends one per token;
   ``chunks_per_token`` checks it on streams that finished). Streams still running when a window ends are cancelled:
   they are in the store as 499 (client gone), by design.
3. **swaps under load**: 4 closed-loop clients (streaming and not alternately, 16 tokens), alone for 3 s, then
   while 20 activations alternate between the last two versions. Failed: non-200, an exception, a stream without
   ``[DONE]``, a body without choices. Stall: the largest gap between two chunks of a stream that overlaps a swap
   (from the activate request to its answer) beside the same outside swaps; and the time to first chunk of streams
   started during a swap (merged mode holds new calls at a gate while running ones drain and weights reload). Every
   span of a call that did not start during a swap must name the version active when it started.
4. **back to base**: rollback until ``/healthz`` says ``base``, one greedy request after each rollback (each must
   succeed); the greedy answer of the base model from the start of the run must come back word for word. The LoRA
   adapters a run leaves in vLLM are then unloaded, so that the next run starts clean.

The machine is shared: ``other_processes_cpu_share`` is the share of all CPUs used by processes outside this bench's
own tree (sampled every 2 s), for the whole run and for each mode; the vLLM CPU engine runs on one core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import duckdb
import orjson

from bench.machine import CLOCK_TICKS
from optimizers.embedded import DEFAULT_MODEL_NAME, prepare_default_model
from proxy.vllm_server import VllmOptions, VllmServer

log = logging.getLogger("bench.hotswap")

REPO = Path(__file__).resolve().parent.parent
MODES = ("lora", "merged")
MODEL = "agent-model"  # any name: without a route, calls go to the policy
SPAN_HEADER = "x-lightwire-span-id"
ADAPTER_RANK = 16  # the trainer's default rank, and vLLM's --max-lora-rank here

# Targets from the issue.
MAX_DISK_TO_FIRST_TOKEN_P50_MS = 200.0  # lora mode
MIN_MERGED_VS_BASE_THROUGHPUT = 0.9
MAX_FAILED_REQUESTS = 0

THROUGHPUT_CLIENTS = 8
THROUGHPUT_MAX_TOKENS = 64
SWAP_CLIENTS = 4
SWAP_MAX_TOKENS = 16
GREEDY_MAX_TOKENS = 16
ROLLBACK_LIMIT = 80  # rollbacks allowed on the way back to base
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
LOAD_DRAIN_TIMEOUT_S = 120.0  # for the calls in flight when a load stops
WATCH_INTERVAL_S = 0.005
FIRST_TOKEN_PAUSE_S = 0.3  # between samples: background unloads of retired versions run outside the next one
CPU_SAMPLE_S = 2.0
EXAMPLES_KEPT = 5
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=600, sock_read=120)

# The bodies. No session header: every call starts a new session, so it gets the active version (a session keeps
# the version it started with).
THROUGHPUT_BODY = orjson.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a short story about a robot who learns to paint."}],
        "max_tokens": THROUGHPUT_MAX_TOKENS,
        "temperature": 1.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
)
FIRST_TOKEN_BODY = orjson.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
    }
)
GREEDY_BODY = orjson.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": GREEDY_MAX_TOKENS,
        "temperature": 0,
    }
)
SWAP_BODIES = {
    stream: orjson.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Name a few colors and a fruit of each color."}],
            "max_tokens": SWAP_MAX_TOKENS,
            "temperature": 0.7,
            "ignore_eos": True,
            "stream": stream,
        }
    )
    for stream in (False, True)
}
SWAP_MIX = [(True, SWAP_BODIES[True]), (False, SWAP_BODIES[False])]
JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Profile:
    segment_rounds: int  # throughput: rounds of (version, base)
    warmup_s: float  # throughput: before each window
    window_s: float  # throughput: measured seconds per segment
    first_token_reps: dict[str, int]
    swaps: int
    swap_gap_s: float  # load alone between two swaps
    load_warmup_s: float  # load alone before the first swap: calls then count as "outside swaps"


FULL = Profile(2, 1.5, 8.0, {"lora": 10, "merged": 3}, swaps=20, swap_gap_s=0.4, load_warmup_s=3.0)
QUICK = Profile(1, 1.0, 3.0, {"lora": 3, "merged": 2}, swaps=4, swap_gap_s=0.3, load_warmup_s=1.0)


def now() -> float:
    return time.perf_counter()


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return round(ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo), 1)


def spread(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 0.5), "p90": percentile(values, 0.9), "max": percentile(values, 1.0)}


# -- one call ---------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One chat call as the client saw it (filled in as it goes, so that a cancelled call keeps what it got)."""

    stream: bool
    started: float = field(default_factory=now)
    status: int | None = None
    span_id: str | None = None
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk with content
    done: bool = False  # [DONE] seen (streams) or choices in the body
    tokens: int | None = None  # usage.completion_tokens
    text: str = ""
    error: str | None = None
    cancelled: bool = False
    ended: float | None = None

    @property
    def failed(self) -> bool:
        return not self.cancelled and (self.status != 200 or self.error is not None or not self.done)

    def why(self) -> str:
        return self.error or f"HTTP {self.status}, {'complete' if self.done else 'no [DONE]/choices'}"


async def chat(http: aiohttp.ClientSession, url: str, body: bytes, out: Outcome) -> Outcome:
    try:
        async with http.post(url + "/v1/chat/completions", data=body, headers=JSON) as resp:
            out.status, out.span_id = resp.status, resp.headers.get(SPAN_HEADER)
            if resp.status != 200:
                out.error = f"HTTP {resp.status}: {(await resp.read())[:300].decode(errors='replace')}"
            elif out.stream:
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        out.done = True
                        continue
                    event = orjson.loads(data)
                    if event.get("usage"):
                        out.tokens = event["usage"].get("completion_tokens")
                    for choice in event.get("choices") or ():
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            out.chunks.append(now())
                            out.text += content
            else:
                answer = orjson.loads(await resp.read())
                out.done = bool(answer.get("choices"))
                out.tokens = (answer.get("usage") or {}).get("completion_tokens")
                out.text = answer["choices"][0]["message"]["content"] if out.done else ""
    except asyncio.CancelledError:
        out.cancelled = True
        raise
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
        out.error = repr(exc)[:300]
    finally:
        out.ended = now()
    return out


async def closed_loop(
    http: aiohttp.ClientSession,
    url: str,
    clients: int,
    bodies: list[tuple[bool, bytes]],
    stop: asyncio.Event,
    outcomes: list[Outcome],
) -> None:
    """``clients`` workers send back to back until ``stop``, each cycling through ``bodies`` (stream?, body)."""

    async def worker(index: int) -> None:
        turn = index
        while not stop.is_set():
            stream, body = bodies[turn % len(bodies)]
            out = Outcome(stream)
            outcomes.append(out)
            await chat(http, url, body, out)
            turn += 1

    await asyncio.gather(*(worker(i) for i in range(clients)))


# -- Lightwire --------------------------------------------------------------------------------------------------------


@dataclass
class Lightwire:
    mode: str
    url: str  # http://127.0.0.1:PORT, no /v1
    proc: asyncio.subprocess.Process
    workdir: Path
    http: aiohttp.ClientSession

    @property
    def db(self) -> Path:
        return self.workdir / "spans.duckdb"

    @property
    def adapters_dir(self) -> Path:
        return self.workdir / "adapters"

    @property
    def log(self) -> Path:
        return self.workdir / "lightwire.log"

    async def admin(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        request = self.http.post(self.url + path, json=body) if body is not None else self.http.get(self.url + path)
        async with request as resp:
            return resp.status, await resp.json(content_type=None)

    async def active(self) -> str:
        async with self.http.get(self.url + "/healthz") as resp:
            return str((await resp.json())["policy"]["active"])

    async def greedy(self) -> Outcome:
        return await chat(self.http, self.url, GREEDY_BODY, Outcome(stream=False))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_lightwire(
    http: aiohttp.ClientSession, mode: str, vllm_url: str, model_dir: Path, workdir: Path
) -> Lightwire:
    workdir.mkdir(parents=True)
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--vllm",
        vllm_url + "/v1",
        "--model-dir",
        str(model_dir),
        "--swap-mode",
        mode,
        "--db",
        str(workdir / "spans.duckdb"),
        "--adapters-dir",
        str(workdir / "adapters"),
    ]
    # Measure the hot-swap alone: no background optimizer runs (they need rewards, which this bench never sends).
    env = {**os.environ, "LIGHTWIRE_OPTIMIZE": "false", "LIGHTWIRE_RUNS_DIR": str(workdir / "runs")}
    with open(workdir / "lightwire.log", "wb") as fh:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=fh, stderr=fh, cwd=REPO, env=env)
    lw = Lightwire(mode, f"http://127.0.0.1:{port}", proc, workdir, http)
    deadline = now() + START_TIMEOUT_S
    while now() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"Lightwire ({mode}) exited with {proc.returncode}:\n{tail(lw.log)}")
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(lw.url + "/healthz") as resp:
                if resp.status == 200 and (await resp.json()).get("policy", {}).get("ready"):
                    return lw
        await asyncio.sleep(0.2)
    raise RuntimeError(f"Lightwire ({mode}) not ready after {START_TIMEOUT_S:g} s:\n{tail(lw.log)}")


async def stop_lightwire(lw: Lightwire) -> dict[str, Any]:
    started = now()
    if lw.proc.returncode is None:
        lw.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(lw.proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            lw.proc.kill()
            await lw.proc.wait()
    lines = lw.log.read_text(errors="replace").splitlines()
    problems = [line for line in lines if re.search(r"ERROR|WARNING|Traceback|Exception", line)]
    return {
        "exit_code": lw.proc.returncode,
        "stop_s": round(now() - started, 2),
        "log_lines": len(lines),
        "log_problem_lines": len(problems),
        "log_problem_examples": problems[:EXAMPLES_KEPT],
    }


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# -- phase 1: throughput ----------------------------------------------------------------------------------------------


async def throughput_segment(lw: Lightwire, profile: Profile) -> dict[str, Any]:
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    load = asyncio.create_task(
        closed_loop(lw.http, lw.url, THROUGHPUT_CLIENTS, [(True, THROUGHPUT_BODY)], stop, outcomes)
    )
    await asyncio.sleep(profile.warmup_s)
    t0 = now()
    await asyncio.sleep(profile.window_s)
    t1 = now()
    load.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await load
    finished = [o for o in outcomes if o.done and o.tokens]
    failed = [o for o in outcomes if o.failed]
    return {
        "tokens": sum(1 for o in outcomes for t in o.chunks if t0 <= t < t1),
        "seconds": t1 - t0,
        "finished": len(finished),
        "cancelled": sum(o.cancelled for o in outcomes),
        "failed": len(failed),
        "failed_examples": [o.why() for o in failed[:EXAMPLES_KEPT]],
        "chunks": sum(len(o.chunks) for o in finished),
        "usage_tokens": sum(o.tokens or 0 for o in finished),
        "ttft_ms": [ms(o.chunks[0] - o.started) for o in outcomes if o.chunks],
    }


async def throughput(lw: Lightwire, version: str, profile: Profile) -> dict[str, Any]:
    """Alternate segments served by ``version`` (active at the start) and by the base model (a rollback)."""
    label = "lora" if lw.mode == "lora" else "merged"
    segments: dict[str, list[dict[str, Any]]] = {label: [], "base": []}
    switches = []
    for _ in range(profile.segment_rounds):
        for name, path in ((label, f"/admin/adapters/{version}/activate"), ("base", "/admin/rollback")):
            if name == label and await lw.active() == version:
                pass  # the first round starts with it active
            else:
                started = now()
                status, answer = await lw.admin(path, {})
                switches.append({"to": name, "status": status, "ms": ms(now() - started)})
                if status != 200:
                    raise RuntimeError(f"{path} answered {status}: {answer}")
            log.info("%s: throughput through %s (active: %s)", lw.mode, name, await lw.active())
            segments[name].append(await throughput_segment(lw, profile))
    out: dict[str, Any] = {"switches": switches}
    for name, runs in segments.items():
        tokens, seconds = sum(r["tokens"] for r in runs), sum(r["seconds"] for r in runs)
        chunks, usage = sum(r["chunks"] for r in runs), sum(r["usage_tokens"] for r in runs)
        ttft = [t for r in runs for t in r["ttft_ms"]]
        out[name] = {
            "tokens_per_s": round(tokens / seconds, 1),
            "tokens_per_s_per_segment": [round(r["tokens"] / r["seconds"], 1) for r in runs],
            "window_s": round(seconds, 1),
            "requests_finished": sum(r["finished"] for r in runs),
            "requests_cancelled_at_window_end": sum(r["cancelled"] for r in runs),
            "failed": sum(r["failed"] for r in runs),
            "failed_examples": [e for r in runs for e in r["failed_examples"]][:EXAMPLES_KEPT],
            "chunks_per_token": round(chunks / usage, 3) if usage else None,
            "ttft_ms": spread([t for t in ttft if t is not None]),
        }
    out[f"{label}_vs_base"] = round(out[label]["tokens_per_s"] / out["base"]["tokens_per_s"], 3)
    # Each round's segments ran seconds apart: their ratio shows how much of the difference is noise.
    pairs = zip(out[label]["tokens_per_s_per_segment"], out["base"]["tokens_per_s_per_segment"], strict=True)
    out[f"{label}_vs_base_per_round"] = [round(v / b, 3) if b else None for v, b in pairs]
    return out


# -- phase 2: disk to first token -------------------------------------------------------------------------------------


async def first_token_sample(lw: Lightwire, source: Path, fresh: Path) -> dict[str, Any]:
    """Copy ``source`` to ``fresh``, register it, activate it, and stream until the first token."""
    copy_started = now()
    await asyncio.to_thread(shutil.copytree, source, fresh)
    t0 = now()  # the folder is on disk
    status, registered = await lw.admin("/admin/adapters", {"path": str(fresh)})
    t1 = now()
    if status != 200:
        raise RuntimeError(f"register answered {status}: {registered}")
    version = registered["version"]
    merge = MergeWatch(lw.proc.pid, lw.adapters_dir / version / "merged" / "config.json")
    watching = asyncio.create_task(merge.run()) if lw.mode == "merged" else None
    status, activated = await lw.admin(f"/admin/adapters/{version}/activate", {})
    t2 = now()
    if watching is not None:
        watching.cancel()
    if status != 200:
        raise RuntimeError(f"activate {version} answered {status}: {activated}")
    out = await chat(lw.http, lw.url, FIRST_TOKEN_BODY, Outcome(stream=True))
    first = out.chunks[0] if out.chunks else None
    sample: dict[str, Any] = {
        "version": version,
        "copy_ms": ms(t0 - copy_started),
        "register_ms": ms(t1 - t0),
        "activate_ms": ms(t2 - t1),
        "first_token_ms": ms(first - t2) if first else None,
        "total_ms": ms(first - t0) if first else None,
    }
    if lw.mode == "merged" and merge.folder_at and merge.exited_at:
        sample |= {
            "merge_ms": ms(merge.exited_at - t1),  # Lightwire waits for the process, not just for the folder
            "merge_until_folder_ms": ms(merge.folder_at - t1),
            "merge_exit_after_folder_ms": ms(merge.exited_at - merge.folder_at),
            "reload_ms": ms(t2 - merge.exited_at),  # gate, drain, reload_weights, reset_prefix_cache, record
            "reload_to_first_token_ms": ms(first - merge.exited_at) if first else None,
        }
    sample |= {
        "span_id": out.span_id,
        "stream_ok": not out.failed,
        "error": out.error,
        "active_after": await lw.active(),
    }
    log.info("%s: disk to first token %s: %s ms", lw.mode, version, sample["total_ms"])
    return sample


async def direct_first_token_sample(
    http: aiohttp.ClientSession, vllm_url: str, source: Path, fresh: Path
) -> dict[str, Any]:
    """The floor: the same adapter loaded into vLLM and streamed from directly, with no checks and no proxy."""
    await asyncio.to_thread(shutil.copytree, source, fresh)
    name = f"bench-{fresh.name}"
    t0 = now()
    async with http.post(vllm_url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(fresh)}) as resp:
        loaded = resp.status
        await resp.read()
    t1 = now()
    body = orjson.dumps({**orjson.loads(FIRST_TOKEN_BODY), "model": name})
    out = await chat(http, vllm_url, body, Outcome(stream=True))
    first = out.chunks[0] if out.chunks else None
    async with http.post(vllm_url + "/v1/unload_lora_adapter", json={"lora_name": name}) as resp:
        await resp.read()
    return {
        "load_status": loaded,
        "load_ms": ms(t1 - t0),
        "first_token_ms": ms(first - t1) if first else None,
        "total_ms": ms(first - t0) if first else None,
        "stream_ok": not out.failed,
    }


class MergeWatch:
    """When the merge subprocess that Lightwire (``parent``) starts has written its folder, and when it exits."""

    def __init__(self, parent: int, folder: Path) -> None:
        self.parent, self.folder = parent, folder
        self.pid: int | None = None
        self.folder_at: float | None = None
        self.exited_at: float | None = None

    async def run(self) -> None:
        while self.exited_at is None:
            t = now()
            if self.pid is None:
                self.pid = _merge_child(self.parent)
            if self.folder_at is None and self.folder.exists():
                self.folder_at = t
            if self.pid is not None and not _alive(self.pid):
                self.exited_at = t
            await asyncio.sleep(WATCH_INTERVAL_S)


def _merge_child(parent: int) -> int | None:
    for children in Path(f"/proc/{parent}/task").glob("*/children"):
        for pid in children.read_text().split():
            with contextlib.suppress(OSError):
                if b"optimizers.merge" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return int(pid)
    return None


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def summarize_first_token(samples: list[dict[str, Any]], direct: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    keys = ["register_ms", "activate_ms", "first_token_ms", "total_ms"]
    if mode == "merged":
        keys += ["merge_ms", "merge_until_folder_ms", "merge_exit_after_folder_ms", "reload_ms"]
        keys += ["reload_to_first_token_ms"]
    out: dict[str, Any] = {
        "reps": len(samples),
        **{key: spread([s[key] for s in samples if s.get(key) is not None]) for key in keys},
        "served_by_new_version": sum(s["active_after"] == s["version"] and s["stream_ok"] for s in samples),
        "samples": samples,
    }
    if direct:
        out["direct_to_vllm"] = {
            **{key: spread([d[key] for d in direct if d[key] is not None]) for key in ("load_ms", "first_token_ms")},
            "total_ms": spread([d["total_ms"] for d in direct if d["total_ms"] is not None]),
            "failed": sum(d["load_status"] != 200 or not d["stream_ok"] for d in direct),
        }
        lw, floor = out["total_ms"]["p50"], out["direct_to_vllm"]["total_ms"]["p50"]
        out["p50_vs_direct"] = round(lw / floor, 2) if lw and floor else None
    return out


# -- phase 3: swaps under load ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Swap:
    version: str
    start: float  # the activate request was sent
    end: float  # its answer arrived
    status: int
    error: str | None


def overlaps(start: float, end: float, windows: list[tuple[float, float]]) -> bool:
    return any(start < b and end > a for a, b in windows)


async def swaps_under_load(lw: Lightwire, pair: tuple[str, str], profile: Profile) -> dict[str, Any]:
    """``pair[1]`` is active; activate ``pair[0]``, ``pair[1]``, ... while the load runs."""
    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    load = asyncio.create_task(closed_loop(lw.http, lw.url, SWAP_CLIENTS, SWAP_MIX, stop, outcomes))
    await asyncio.sleep(profile.load_warmup_s)
    swaps: list[Swap] = []
    for k in range(profile.swaps):
        version = pair[k % 2]
        start = now()
        status, answer = await lw.admin(f"/admin/adapters/{version}/activate", {})
        error = None if status == 200 else str(answer)[:300]
        swaps.append(Swap(version, start, now(), status, error))
        await asyncio.sleep(profile.swap_gap_s)
    stop.set()
    await asyncio.wait_for(load, LOAD_DRAIN_TIMEOUT_S)

    windows = [(s.start, s.end) for s in swaps]
    gaps_in: list[float] = []
    gaps_out: list[float] = []
    ttft_in: list[float] = []
    ttft_out: list[float] = []
    latency_in: list[float] = []
    latency_out: list[float] = []
    for o in outcomes:
        assert o.ended is not None
        if o.stream and o.chunks:
            for prev, cur in itertools.pairwise(o.chunks):
                (gaps_in if overlaps(prev, cur, windows) else gaps_out).append((cur - prev) * 1000)
            first = o.chunks[0]
            (ttft_in if overlaps(o.started, first, windows) else ttft_out).append((first - o.started) * 1000)
        elif not o.stream and o.done:
            (latency_in if overlaps(o.started, o.ended, windows) else latency_out).append((o.ended - o.started) * 1000)
    failed = [o for o in outcomes if o.failed]
    return {
        "swaps": len(swaps),
        "swaps_failed": sum(s.status != 200 for s in swaps),
        "swap_errors": [s.error for s in swaps if s.error][:EXAMPLES_KEPT],
        "swap_ms": spread([(s.end - s.start) * 1000 for s in swaps]),
        "requests": len(outcomes),
        "streams": sum(o.stream for o in outcomes),
        "failed": len(failed),
        "failed_examples": [o.why() for o in failed[:EXAMPLES_KEPT]],
        "chunk_gap_ms_during_swaps": {"n": len(gaps_in), **spread(gaps_in)},
        "chunk_gap_ms_outside_swaps": {"n": len(gaps_out), **spread(gaps_out)},
        "ttft_ms_started_during_swaps": {"n": len(ttft_in), **spread(ttft_in)},
        "ttft_ms_outside_swaps": {"n": len(ttft_out), **spread(ttft_out)},
        "latency_ms_non_stream_during_swaps": {"n": len(latency_in), **spread(latency_in)},
        "latency_ms_non_stream_outside_swaps": {"n": len(latency_out), **spread(latency_out)},
        # for the span check after the run: the version each call should have been served by
        "_expected": expected_versions(outcomes, swaps, pair),
    }


def expected_versions(outcomes: list[Outcome], swaps: list[Swap], pair: tuple[str, str]) -> dict[str, str]:
    """Span id -> the version active when the call started, for calls that did not start during a swap."""
    expected = {}
    for o in outcomes:
        if o.span_id is None or any(s.start <= o.started <= s.end for s in swaps):
            continue
        before = [s for s in swaps if s.end < o.started and s.status == 200]
        expected[o.span_id] = before[-1].version if before else pair[1]
    return expected


# -- phase 4: back to base --------------------------------------------------------------------------------------------


async def back_to_base(lw: Lightwire, base_answer: str) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    while await lw.active() != "base" and len(steps) < ROLLBACK_LIMIT:
        started = now()
        status, answer = await lw.admin("/admin/rollback", {})
        took = now() - started
        out = await lw.greedy()
        steps.append(
            {
                "status": status,
                "ms": took * 1000,
                "active": answer.get("active"),
                "request_ok": not out.failed,
                "request_error": out.error,
            }
        )
        if status != 200:
            break
    final = await lw.greedy()
    failed = [s for s in steps if not s["request_ok"]]
    return {
        "rollbacks": len(steps),
        "rollbacks_failed": sum(s["status"] != 200 for s in steps),
        "rollback_ms": spread([s["ms"] for s in steps]),
        "requests_failed": len(failed),
        "failed_examples": [f"after rollback to {s['active']}: {s['request_error']}" for s in failed[:EXAMPLES_KEPT]],
        "active_at_end": await lw.active(),
        "base_answer_restored": final.text == base_answer,
    }


# -- the spans --------------------------------------------------------------------------------------------------------


def check_spans(db: Path, first_token: list[dict[str, Any]], expected: dict[str, str]) -> dict[str, Any]:
    """Read Lightwire's store once it has exited (DuckDB allows one process per file)."""
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT span_id, adapter_version, http_status, error_type FROM spans").fetchall()
    served = {span: version for span, version, _, _ in rows}
    statuses = Counter(str(status) for _, _, status, _ in rows)
    errors = Counter(error for _, _, _, error in rows if error)
    wrong_first = [s["version"] for s in first_token if served.get(s["span_id"]) != s["version"]]
    wrong_load = {span: (want, served.get(span)) for span, want in expected.items() if served.get(span) != want}
    return {
        "rows": len(rows),
        "by_http_status": dict(statuses),
        "error_types": dict(errors),
        "first_token_spans_with_new_version": len(first_token) - len(wrong_first),
        "first_token_spans_wrong": wrong_first,
        "swap_load_spans_checked": len(expected),
        "swap_load_spans_wrong_version": len(wrong_load),
        "swap_load_wrong_examples": list(wrong_load.items())[:EXAMPLES_KEPT],
    }


# -- vLLM -------------------------------------------------------------------------------------------------------------


async def unload_leftovers(http: aiohttp.ClientSession, vllm_url: str) -> list[str]:
    """Unload the LoRA adapters a Lightwire run left in vLLM, so that the next run starts clean."""
    async with http.get(vllm_url + "/v1/models") as resp:
        names = [m["id"] for m in (await resp.json())["data"] if m.get("parent")]
    for name in names:
        async with http.post(vllm_url + "/v1/unload_lora_adapter", json={"lora_name": name}) as resp:
            await resp.read()
    return names


def vllm_admin_calls(log_path: Path, start_line: int) -> tuple[dict[str, int], int]:
    """Count the admin calls vLLM logged (path and status) after ``start_line``; returns them and the line count."""
    lines = log_path.read_text(errors="replace").splitlines()
    pattern = re.compile(
        r'"(?:POST|GET) (/v1/(?:un)?load_lora_adapter|/collective_rpc|/reset_prefix_cache|/v1/models)'
        r' HTTP/1\.1" (\d+)'
    )
    counts: Counter[str] = Counter()
    for line in lines[start_line:]:
        if match := pattern.search(line):
            counts[f"{match[1]} {match[2]}"] += 1
    return dict(counts), len(lines)


async def make_adapters(model_dir: Path, out: Path, count: int) -> list[Path]:
    """Random peft adapters (``tests.vllm_fixtures.make_adapter``), made in a subprocess: torch stays out of here."""
    paths = [out / f"seed{i + 1}" for i in range(count)]
    script = (
        "import sys; from pathlib import Path; from tests.vllm_fixtures import make_adapter\n"
        "for i, p in enumerate(sys.argv[3:]):\n"
        "    make_adapter(Path(sys.argv[1]), Path(p), rank=int(sys.argv[2]), seed=i + 1)\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        str(model_dir),
        str(ADAPTER_RANK),
        *map(str, paths),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"making adapters failed:\n{output.decode()[-3000:]}")
    return paths


# -- the machine ------------------------------------------------------------------------------------------------------


class CpuWatch:
    """CPU seconds used by every process outside this bench's own tree (vLLM, Lightwire and merges are ours),
    sampled every ``CPU_SAMPLE_S``: how much other work competed with the measurements."""

    def __init__(self) -> None:
        self.others_s = 0.0
        self.started = now()
        self._last: dict[int, float] = {}

    def sample(self) -> None:
        procs: dict[int, tuple[int, float]] = {}  # pid -> (parent, cpu seconds)
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    fields = Path(entry.path, "stat").read_text().rpartition(")")[2].split()
                    procs[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
        ours = {os.getpid()}
        grew = True
        while grew:
            more = {pid for pid, (parent, _) in procs.items() if parent in ours} - ours
            ours |= more
            grew = bool(more)
        others = {pid: cpu for pid, (_, cpu) in procs.items() if pid not in ours}
        self.others_s += sum(max(0.0, cpu - self._last[pid]) for pid, cpu in others.items() if pid in self._last)
        self._last = others

    async def run(self) -> None:
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(CPU_SAMPLE_S)

    def mark(self) -> tuple[float, float]:
        return now(), self.others_s

    def share_since(self, mark: tuple[float, float]) -> float:
        """Share of the machine's CPUs other processes used since ``mark``."""
        seconds = now() - mark[0]
        return round((self.others_s - mark[1]) / (seconds * (os.cpu_count() or 1)), 3) if seconds > 0 else 0.0


# -- the run ----------------------------------------------------------------------------------------------------------


async def run_mode(
    http: aiohttp.ClientSession,
    mode: str,
    vllm: VllmServer,
    model_dir: Path,
    prepared: list[Path],
    profile: Profile,
    workdir: Path,
    cpu: CpuWatch,
) -> dict[str, Any]:
    vllm_log_start = vllm_admin_calls(vllm.options.log_path, 0)[1]
    started, cpu_mark = now(), cpu.mark()
    lw = await start_lightwire(http, mode, vllm.base_url, model_dir, workdir / mode)
    result: dict[str, Any] = {"lightwire_start_s": round(now() - started, 1)}
    incoming = workdir / "incoming"
    samples: list[dict[str, Any]] = []
    direct: list[dict[str, Any]] = []
    expected: dict[str, str] = {}

    async def first_token(i: int) -> None:
        source = prepared[i % len(prepared)]
        if mode == "lora":  # the floor, interleaved with Lightwire's samples
            direct.append(await direct_first_token_sample(http, vllm.base_url, source, incoming / f"direct-{i:02d}"))
        samples.append(await first_token_sample(lw, source, incoming / f"{mode}-{i:02d}"))
        await asyncio.sleep(FIRST_TOKEN_PAUSE_S)

    try:
        base = await lw.greedy()
        if base.failed:
            raise RuntimeError(f"the base model did not answer: {base.why()}")
        # The first disk-to-first-token sample is also the version whose throughput is measured (one merge less).
        await first_token(0)
        result["throughput"] = await throughput(lw, samples[0]["version"], profile)
        for i in range(1, profile.first_token_reps[mode]):
            await first_token(i)
        result["disk_to_first_token"] = summarize_first_token(samples, direct, mode)
        pair = (samples[-2]["version"], samples[-1]["version"])
        log.info("%s: %d swaps under load between %s and %s", mode, profile.swaps, *pair)
        swaps = await swaps_under_load(lw, pair, profile)
        expected = swaps.pop("_expected")
        result["swaps_under_load"] = swaps
        log.info("%s: rolling back to base", mode)
        result["back_to_base"] = await back_to_base(lw, base.text)
    finally:
        result["lightwire"] = await stop_lightwire(lw)
    result["spans"] = check_spans(lw.db, samples, expected)
    result["vllm_admin_calls"] = vllm_admin_calls(vllm.options.log_path, vllm_log_start)[0]
    result["loras_left_in_vllm"] = await unload_leftovers(http, vllm.base_url)
    result["wall_s"] = round(now() - started, 1)
    result["other_processes_cpu_share"] = cpu.share_since(cpu_mark)
    return result


async def bench(profile: Profile, workdir: Path) -> dict[str, Any]:
    started = now()
    model_dir = await asyncio.to_thread(prepare_default_model, Path.home() / ".cache" / "lightwire")
    adapters = asyncio.create_task(make_adapters(model_dir, workdir / "prepared", 2))
    options = VllmOptions(model_dir=model_dir, served_model_name=DEFAULT_MODEL_NAME, log_path=workdir / "vllm.log")
    setup: dict[str, Any] = {}
    results: dict[str, Any] = {}
    cpu = CpuWatch()
    watching = asyncio.create_task(cpu.run())
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector, timeout=HTTP_TIMEOUT) as http:
        try:
            async with VllmServer(options).running(wait_ready=True) as vllm:
                setup["vllm_start_s"] = round(now() - started, 1)
                log.info("vLLM ready on %s after %.0f s", vllm.base_url, setup["vllm_start_s"])
                prepared = await adapters
                setup["adapters_ready_s"] = round(now() - started, 1)
                for mode in MODES:
                    log.info("%s: starting Lightwire", mode)
                    results[mode] = await run_mode(http, mode, vllm, model_dir, prepared, profile, workdir, cpu)
        finally:
            if not adapters.done():
                adapters.cancel()
            watching.cancel()
    machine = {"cpus": os.cpu_count(), "other_processes_cpu_share": cpu.share_since((cpu.started, 0.0))}
    return {"setup": setup, "modes": results, "machine": machine}


def goals(modes: dict[str, Any]) -> dict[str, dict[str, Any]]:
    def at_most(value: float | None, limit: float) -> dict[str, Any]:
        return {"value": value, "limit": limit, "met": value is not None and value <= limit}

    failed = 0
    for mode, m in modes.items():
        served = m["throughput"]["lora" if mode == "lora" else "merged"]
        failed += m["swaps_under_load"]["failed"] + m["swaps_under_load"]["swaps_failed"]
        failed += m["throughput"]["base"]["failed"] + served["failed"]
        failed += m["disk_to_first_token"]["reps"] - m["disk_to_first_token"]["served_by_new_version"]
    ratio = modes["merged"]["throughput"]["merged_vs_base"]
    return {
        "disk_to_first_token_p50_ms_lora": at_most(
            modes["lora"]["disk_to_first_token"]["total_ms"]["p50"], MAX_DISK_TO_FIRST_TOKEN_P50_MS
        ),
        "merged_vs_base_throughput": {
            "value": ratio,
            "limit": MIN_MERGED_VS_BASE_THROUGHPUT,
            "met": ratio >= MIN_MERGED_VS_BASE_THROUGHPUT,
        },
        "failed_requests": at_most(failed, MAX_FAILED_REQUESTS),
        # Not in the targets, but a user would notice: every rollback must leave a servable version.
        "failed_requests_after_rollbacks": at_most(
            sum(m["back_to_base"]["requests_failed"] for m in modes.values()), MAX_FAILED_REQUESTS
        ),
    }


def summary(report: dict[str, Any]) -> str:
    g, lora, merged = report["goals"], report["modes"]["lora"], report["modes"]["merged"]

    def mark(name: str) -> str:
        return "met" if g[name]["met"] else "NOT MET"

    dl, dm = lora["disk_to_first_token"], merged["disk_to_first_token"]
    sl, sm = lora["swaps_under_load"], merged["swaps_under_load"]
    tl, tm = lora["throughput"], merged["throughput"]
    return (
        f"hotswap: disk->first token p50 {dl['total_ms']['p50']} ms lora (direct to vLLM "
        f"{dl['direct_to_vllm']['total_ms']['p50']} ms; <= {MAX_DISK_TO_FIRST_TOKEN_P50_MS:g}: "
        f"{mark('disk_to_first_token_p50_ms_lora')}); merged: merge {dm['merge_ms']['p50']} ms + reload->first token "
        f"{dm['reload_to_first_token_ms']['p50']} ms; tokens/s base {tl['base']['tokens_per_s']}/"
        f"{tm['base']['tokens_per_s']}, lora {tl['lora']['tokens_per_s']} ({tl['lora_vs_base']}x), merged "
        f"{tm['merged']['tokens_per_s']} ({tm['merged_vs_base']}x, >= {MIN_MERGED_VS_BASE_THROUGHPUT:g}: "
        f"{mark('merged_vs_base_throughput')}); {sl['swaps']}+{sm['swaps']} swaps under load, max chunk gap "
        f"during/outside {sl['chunk_gap_ms_during_swaps']['max']}/{sl['chunk_gap_ms_outside_swaps']['max']} ms lora, "
        f"{sm['chunk_gap_ms_during_swaps']['max']}/{sm['chunk_gap_ms_outside_swaps']['max']} ms merged; failed "
        f"requests {g['failed_requests']['value']} ({mark('failed_requests')}), after rollbacks "
        f"{g['failed_requests_after_rollbacks']['value']} ({mark('failed_requests_after_rollbacks')}); other "
        f"processes {report['machine']['other_processes_cpu_share']:.0%} of the CPUs; {report['wall_s']:.0f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and shorter windows (a smoke run)")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    parser.add_argument("--workdir", type=Path, help="keep logs, adapters and DuckDB files here (default: a temp dir)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    profile = QUICK if args.quick else FULL
    started = now()
    load_before = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            workdir = args.workdir.resolve()
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lightwire-hotswap-")))
        run = asyncio.run(bench(profile, workdir))
    wall = now() - started
    report: dict[str, Any] = {
        "settings": {
            "profile": "quick" if args.quick else "full",
            "model": DEFAULT_MODEL_NAME,
            "adapter": f"tests.vllm_fixtures.make_adapter, rank {ADAPTER_RANK}, q/v/o_proj, random weights",
            "throughput": {
                "clients": THROUGHPUT_CLIENTS,
                "max_tokens": THROUGHPUT_MAX_TOKENS,
                "temperature": 1.0,
                "ignore_eos": True,
                "window_s": profile.window_s,
                "rounds": profile.segment_rounds,
            },
            "swaps": {
                "clients": SWAP_CLIENTS,
                "max_tokens": SWAP_MAX_TOKENS,
                "swaps": profile.swaps,
                "gap_s": profile.swap_gap_s,
            },
            "first_token_reps": profile.first_token_reps,
        },
        **run,
    }
    report["machine"] |= {
        "load_average_1m_before": round(load_before, 2),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
    }
    report["goals"] = goals(run["modes"])
    report["wall_s"] = round(wall, 1)
    text = orjson.dumps(report, option=orjson.OPT_INDENT_2).decode()
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    print(summary(report))


if __name__ == "__main__":
    main()

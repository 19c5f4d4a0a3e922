"""The optimizer: from rewarded spans to a better adapter, in the background, while serving goes on.

A run starts when ``train_min_turns`` new rewards have arrived since the last run started and that run has ended
(and, when set, ``train_min_interval`` seconds have passed since it started), or at once, from ``POST /admin/train``
/ ``lightwire train``. The default starts runs back to back as rewards come in, as ``lightwire demo`` does (one run
a round); a fixed 300 s interval had allowed an agent on ``lightwire serve`` at most four runs in 20 minutes.
Read it top to bottom:

1. **Data.** Export the store's records (credit assignment as configured) into the run folder: the sessions
   since the data the active version was trained on (``train_window`` = ``new``), or all of them (``all``).
   Sessions are split into train and held-out by a hash of their id (``eval_split``). The sha256 is recorded.
2. **Train** in a separate process (``python -m optimizers.trainer``): serving never pauses. It starts from the
   weights being served: in ``merged`` mode a fresh LoRA on the active merged weights, in ``lora`` mode the
   active adapter trained further.
3. **Register** the adapter as a candidate version, with the run's data and settings.
4. **Evaluate** against the active version. With judging hooks (``eval_hooks``, else the span hooks): offline,
   by replaying held-out prompts greedily through vLLM with both versions, ``EVAL_CONCURRENCY`` at a time, and
   scoring the answers with the hooks. Without hooks:
   online, as a canary on ``eval_canary_fraction`` of new sessions until each arm has ``eval_min_sessions``
   rewarded sessions (or ``eval_timeout`` passes: then there is no evidence, and the candidate is retired).
   The rule, both ways: **promote only if the candidate's mean reward is at least the active version's**, on the
   same held-out prompts (offline) or over the sessions that began during the canary (online). Online, a
   candidate that is clearly worse (a one-sided test, :mod:`optimizers.canary`) is retired before that, once
   each arm has a few rewarded sessions. A candidate that scores worse is never promoted.
5. **Publish** through the hot-swap, or retire the candidate, and record the run with its decision and why.

Offline, a call that fails (an error status, no answer, no connection) is counted apart, never scored: a
candidate with any failed call is retired whatever its mean, and the means compare the prompts both versions
answered. A run belongs to the process, not to whoever started it (see :meth:`Optimizer.run`); whatever ends it
(a decision, an exception, the process's shutdown), its canary stops and its record gets a final status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from optimizers import canary
from optimizers.errors import NotReady, RunCancelled
from optimizers.ports import Judge, Publishing, Served, Settings
from store import export
from store.runs import Run
from store.runs import load_all as load_runs
from store.writer import Writer

log = logging.getLogger(__name__)

POLL_S = 10.0  # how often the loop checks whether a run is due
EVAL_POLL_S = 5.0  # how often an online evaluation counts rewards
EVAL_MAX_TOKENS = 256
EVAL_CONCURRENCY = 8  # held-out prompts replayed at once: vLLM batches them
TRAINER_NO_DATA = 3  # optimizers.trainer's exit status when nothing is usable


class Optimizer:
    def __init__(
        self,
        config: Settings,
        writer: Writer,
        publisher: Callable[[], Publishing | None],
        judges: tuple[Judge, ...] = (),
    ) -> None:
        self.config = config
        self.writer = writer
        self._publisher = publisher  # None while the policy is not ready
        self.judges = judges  # score offline evaluations; none: evaluate online
        self.runs_dir = config.runs_dir.resolve()
        self._lock = asyncio.Lock()
        self._last_start = 0.0
        self._runs: set[asyncio.Task[Run]] = set()
        self._stopping = False

    @property
    def publisher(self) -> Publishing:
        publisher = self._publisher()
        if publisher is None:
            raise NotReady("the policy that versions are published into is not ready")
        return publisher

    # -- when ---------------------------------------------------------------------------------------------------

    async def loop(self) -> None:
        """Run whenever enough new rewards have come in; meant to be a background task. Cancelling it (its
        owner stops) cancels the run it waits for, which then ends as at :meth:`stop`."""
        while True:
            await asyncio.sleep(POLL_S)
            waiting = time.monotonic() - self._last_start < self.config.train_min_interval
            if self._lock.locked() or waiting or self._stopping or self._publisher() is None:
                continue
            if await self._read(_new_rewards) >= self.config.train_min_turns:
                try:
                    await self._start()  # not shielded: the loop's owner stops, so does its run
                except Exception:  # a run's failure is recorded with the run; the loop goes on
                    log.exception("optimizer run failed")

    # -- what ---------------------------------------------------------------------------------------------------

    async def run(self) -> Run:
        """One run, start to finish; returns its record.

        The run is the sidecar's, not its caller's: a caller that goes away (a client dropping ``POST
        /admin/train``, Ctrl-C on ``lightwire train``) only stops waiting, and the run goes on to its decision,
        recorded in ``GET /admin/runs``; cancelling it half-way would throw away minutes of training for a
        dropped connection. Only the sidecar's shutdown cancels runs (:meth:`stop`): a caller still waiting then
        gets 503, and the run is recorded ``cancelled``.
        """
        task = self._start()
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                raise  # the caller went away; the run goes on
            raise RunCancelled("the process stopped during the optimizer run; the run was cancelled") from None

    def _start(self) -> asyncio.Task[Run]:
        if self._stopping:
            raise RunCancelled("the process is stopping; no optimizer run starts now")
        task = asyncio.create_task(self._run())
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)
        return task

    async def stop(self) -> None:
        """Cancel the runs in progress (at shutdown); return once each has stopped its canary and recorded it."""
        self._stopping = True
        runs = list(self._runs)
        for task in runs:
            task.cancel()
        await asyncio.gather(*runs, return_exceptions=True)

    async def close_interrupted(self) -> None:
        """Record as ``cancelled`` the runs that a killed process left ``running`` (at start-up)."""
        for run in await self._read(load_runs):
            if run.status == "running":
                await self._save(run.update(status="cancelled", reason="the sidecar stopped during the run"))

    async def _run(self) -> Run:
        async with self._lock:
            self._last_start = time.monotonic()
            active = self.publisher.active
            run_id = datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S-%f")
            folder = self.runs_dir / run_id
            run = Run(
                run_id=run_id,
                status="running",
                algorithm=self.config.train_algorithm,
                parent=active.version,
                candidate=None,
                data=None,
                hyperparameters=None,
                training=None,
                evaluation=None,
                reason=None,
                started_at=datetime.now(UTC),
                ended_at=None,
            )
            undecided = None  # the candidate while no decision has taken it out of this run's hands
            try:
                run = await self._save(run.update(data=await self._export(folder)))
                trained = await self._train(folder, active)
                if trained is None:
                    return await self._save(run.update(status="no_data", reason="no usable data: no adapter made"))
                training, adapter_dir = trained
                run = await self._save(run.update(training=training, hyperparameters=self._hyperparameters()))
                candidate = await self.publisher.register(
                    adapter_dir,
                    parent=active.version,
                    algorithm=self.config.train_algorithm,
                    data={"run": run_id, **(json.loads(run.data or "{}"))},
                )
                undecided = candidate.version
                run = await self._save(run.update(candidate=candidate.version))
                evaluation = await self._evaluate(candidate.version, active, folder)
                run = await self._save(run.update(evaluation=evaluation))
                undecided = None
                if evaluation["promote"]:
                    await self.publisher.activate(candidate.version)
                    return await self._save(run.update(status="published", reason=evaluation["why"]))
                await self.publisher.reject(candidate.version, "rejected: " + evaluation["why"])
                return await self._save(run.update(status="rejected", reason=evaluation["why"]))
            except asyncio.CancelledError:
                await self._end(run, undecided, "cancelled", "the sidecar shut down during the run")
                raise
            except Exception as exc:
                await self._end(run, undecided, "failed", f"{type(exc).__name__}: {exc}")
                raise

    async def _end(self, run: Run, candidate: str | None, status: str, reason: str) -> None:
        """Record a run that ended before its decision, once its candidate serves no one (its canary stops)."""
        adapter = self.publisher.adapters.get(candidate or "")
        if adapter is not None and adapter.status in ("candidate", "canary"):
            try:
                await self.publisher.reject(adapter.version, f"{run.run_id} {status}: {reason}")
            except Exception:  # the run's record matters more; the reason is logged
                log.exception("could not retire %s after %s ended", adapter.version, run.run_id)
        await self._save(run.update(status=status, reason=reason))

    async def _export(self, folder: Path) -> dict[str, Any]:
        since = self._window_start()
        options = export.Options(
            credit_policy=self.config.credit_policy,
            discount=self.config.discount,
            session_split=self.config.eval_split,
            since=since,
        )

        def write() -> dict[str, Any]:
            with self.writer.cursor() as con:
                return export.write(con, folder / "data.jsonl", options)

        await self.writer.flush()  # the calls and rewards that came in just before the run count
        meta = await asyncio.to_thread(write)
        return {
            "records": meta["records"],
            "splits": meta["splits"],
            "sha256": meta["sha256"],
            "since": since.isoformat() if since else None,
            "until": meta["created_at"],
            "credit_policy": meta["credit_policy"],
        }

    def _window_start(self) -> datetime | None:
        """Where the run's data starts: with ``train_window`` = ``new``, after the data the active version was
        trained on (it has learned that already; a run starts from its weights); else, and for the base model or
        a version made elsewhere, at the beginning."""
        active = self.publisher.active.version
        adapter = self.publisher.adapters.get(active or "")
        if self.config.train_window == "all" or adapter is None:
            return None
        until = json.loads(adapter.data or "{}").get("until")
        return datetime.fromisoformat(until) if until else None

    def _hyperparameters(self) -> dict[str, Any]:
        return {
            "learning_rate": self.config.train_learning_rate,
            "epochs": self.config.train_epochs,
            "lora_r": self.config.max_lora_rank,
            "swap_mode": self.publisher.mode,
        }

    async def _train(self, folder: Path, active: Served) -> tuple[dict[str, Any], Path] | None:
        """Train in a child process on the run's training split; None when there was nothing to learn from."""
        train_file = folder / "train.jsonl"
        await asyncio.to_thread(_train_split, folder / "data.jsonl", train_file)
        command = [
            sys.executable,
            "-m",
            "optimizers.trainer",
            "--data",
            str(train_file),
            "--out",
            str(folder / "trainer"),
            "--algorithm",
            self.config.train_algorithm,
            "--learning-rate",
            str(self.config.train_learning_rate),
            "--epochs",
            str(self.config.train_epochs),
            "--lora-r",
            str(self.config.max_lora_rank),
            "--lora-alpha",
            str(2 * self.config.max_lora_rank),
            "--cache-dir",
            str(self.config.cache_dir),
        ]
        if self.config.train_threads:
            command += ["--threads", str(self.config.train_threads)]
        if self.config.train_processes > 1:
            command += ["--nproc", str(self.config.train_processes)]
        base = active.merged_path or self.publisher.base_dir
        if base is not None:
            command += ["--base", str(base)]
        if active.lora_path is not None:
            command += ["--init-adapter", str(active.lora_path)]
        log.info("training: %s", " ".join(command[3:]))
        with open(folder / "trainer.log", "wb") as trainer_log:
            proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE, stderr=trainer_log)
            try:
                output, _ = await proc.communicate()
            except asyncio.CancelledError:
                proc.terminate()  # the trainer saves a checkpoint on SIGTERM
                await proc.wait()
                raise
        if proc.returncode == TRAINER_NO_DATA:
            return None
        if proc.returncode != 0:
            raise RuntimeError(f"the trainer exited with {proc.returncode}; see {folder / 'trainer.log'}")
        summary = json.loads(output.decode().strip().splitlines()[-1])
        kept = ("losses", "tokens", "seconds", "tokens_per_second", "examples", "step", "note", "precision")
        training = {k: summary.get(k) for k in kept}
        return training, Path(summary["adapter_dir"])

    # -- evaluation ---------------------------------------------------------------------------------------------

    async def _evaluate(self, version: str, active: Served, folder: Path) -> dict[str, Any]:
        if self.judges:
            return await self._offline(version, active, folder / "data.jsonl")
        return await self._online(version)

    async def _offline(self, version: str, active: Served, data: Path) -> dict[str, Any]:
        prompts = await asyncio.to_thread(_heldout_prompts, data, self.config.eval_max_prompts)
        if not prompts:
            return {"method": "offline", "promote": False, "why": "no held-out prompts to evaluate on"}
        candidate = await self.publisher.load_candidate(version)
        gate = asyncio.Semaphore(EVAL_CONCURRENCY)

        async def score(model: str, messages: list[dict[str, Any]]) -> float | None:
            async with gate:
                return await self._score(model, messages)

        scores: dict[str, list[float | None]] = {}  # None: the call failed
        for arm, model in (("active", active.served_name), ("candidate", candidate.served_name)):
            scores[arm] = await asyncio.gather(*(score(model, messages) for messages in prompts))
        return offline_decision(scores, self.judges)

    async def _score(self, model: str, messages: list[dict[str, Any]]) -> float | None:
        body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": EVAL_MAX_TOKENS}
        status, response = await self.publisher.complete(body)
        return await judge(self.judges, body, response, status)

    async def _online(self, version: str) -> dict[str, Any]:
        await self.publisher.start_canary(version, self.config.eval_canary_fraction)

        async def arms_since(started: datetime) -> dict[str, canary.Arm]:
            return await self._read(canary.arm_rewards, started, version)

        config = self.config
        return await canary.watch(
            arms_since, min_sessions=config.eval_min_sessions, timeout=config.eval_timeout, poll=EVAL_POLL_S
        )

    # -- the record ---------------------------------------------------------------------------------------------

    async def _save(self, run: Run) -> Run:
        return await save_run(self.writer, run, "optimizer")

    async def _read(self, query: Any, *args: Any) -> Any:
        return await read_store(self.writer, query, *args)

    async def runs(self) -> list[Run]:
        await self.writer.flush()
        return list(await self._read(load_runs))


async def save_run(writer: Writer, run: Run, kind: str) -> Run:
    """Record ``run`` as it now stands (and log it)."""
    await writer.reserve()
    writer.submit(run)
    log.info("%s %s: %s%s", kind, run.run_id, run.status, f" ({run.reason})" if run.reason else "")
    return run


async def read_store(writer: Writer, query: Any, *args: Any) -> Any:
    """``query(connection, *args)`` on the store's cursor, in a worker thread."""

    def read() -> Any:
        with writer.cursor() as con:
            return query(con, *args)

    return await asyncio.to_thread(read)


def offline_decision(scores: dict[str, list[float | None]], judges: tuple[Judge, ...]) -> dict[str, Any]:
    """The offline rule, over each arm's scores on the same held-out prompts (None: the call failed).

    A failed call is counted apart, never scored: a candidate with any is retired whatever its mean. Otherwise
    promote iff the candidate's mean is at least the active's, over the prompts both answered.
    """
    prompts = len(scores["candidate"])
    failed = {arm: sum(value is None for value in values) for arm, values in scores.items()}
    pairs = zip(scores["active"], scores["candidate"], strict=True)
    both = [(a, c) for a, c in pairs if a is not None and c is not None]  # the prompts both versions answered
    result: dict[str, Any] = {"method": "offline", "prompts": prompts, "failed": failed, "means": None}
    if failed["candidate"]:
        why = (
            f"{failed['candidate']} of the candidate's {prompts} held-out calls failed "
            f"(the active version's: {failed['active']}); a version whose calls fail is never published"
        )
        return {**result, "promote": False, "why": why}
    if not both:
        why = f"the active version answered none of the {prompts} held-out prompts: nothing to compare"
        return {**result, "promote": False, "why": why}
    means = {"active": sum(a for a, _ in both) / len(both), "candidate": sum(c for _, c in both) / len(both)}
    why = (
        f"held-out mean reward {means['candidate']:.3f} (candidate) vs {means['active']:.3f} (active) "
        f"on {len(both)} prompts, scored by {', '.join(h.name for h in judges)}"
    )
    if failed["active"]:
        why += f"; {failed['active']} prompts left out: the active version's calls failed"
    return {**result, "means": means, "promote": means["candidate"] >= means["active"], "why": why}


async def judge(judges: tuple[Judge, ...], body: dict[str, Any], response: Any, status: int) -> float | None:
    """The judges' mean reward for one replayed answer (0 when none scored it); None when the call failed (an
    error status, or no answer): a failure is not an answer worth 0."""
    if status != 200 or not isinstance(response, dict) or not response.get("choices"):
        log.warning("offline evaluation: a replayed call answered %d: %.200s", status, response)
        return None
    span = {"request": body, "response": response, "http_status": status, "operation_name": "chat"}
    values = [value for one in judges if (value := await one.score(span)) is not None]
    return sum(values) / len(values) if values else 0.0


def _new_rewards(con: Any) -> int:
    """Rewards that arrived since the last adapter run started (all of them before the first run)."""
    row = con.execute(
        "SELECT count(*) FROM feedback WHERE created_at > coalesce((SELECT max(started_at) FROM runs "
        "WHERE algorithm != 'memory'), TIMESTAMPTZ '1970-01-01')"
    ).fetchone()
    return int(row[0])


def _train_split(data: Path, out: Path) -> None:
    with open(data, "rb") as source, open(out, "wb") as target:
        for line in source:
            if json.loads(line).get("split") == "train":
                target.write(line)


def _heldout_prompts(data: Path, limit: int) -> list[list[dict[str, Any]]]:
    """The distinct first-turn chat prompts of held-out sessions."""
    seen: dict[str, list[dict[str, Any]]] = {}
    with open(data, "rb") as source:
        for line in source:
            record = json.loads(line)
            if record.get("split") != "heldout" or record.get("turn_index") or not record.get("messages"):
                continue
            seen.setdefault(json.dumps(record["messages"], sort_keys=True), record["messages"])
    return list(seen.values())[:limit]


@contextlib.asynccontextmanager
async def running(loop: Callable[[], Coroutine[Any, Any, None]]) -> AsyncIterator[None]:
    """A background loop (:meth:`Optimizer.loop`, :meth:`optimizers.memory.Builder.loop`) for an app's lifetime."""
    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

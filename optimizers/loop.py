"""The optimizer: from rewarded spans to a better adapter, in the background, while serving goes on.

A run starts when ``train_min_turns`` new rewards have arrived and ``train_min_interval`` seconds have passed
since the last run (or at once, from ``POST /admin/train`` / ``lightwire train``). Read it top to bottom:

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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from optimizers import canary
from optimizers.publish import Publisher
from proxy.backends import Backends
from proxy.config import Config
from proxy.hooks import Hook, rewards
from proxy.policy import Version
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
    def __init__(self, config: Config, writer: Writer, backends: Backends, judges: tuple[Hook, ...] = ()) -> None:
        self.config = config
        self.writer = writer
        self.backends = backends
        self.judges = judges  # span hooks that score offline evaluations; none: evaluate online
        self.runs_dir = config.runs_dir.resolve()
        self._lock = asyncio.Lock()
        self._last_start = 0.0

    @property
    def publisher(self) -> Publisher:
        return self.backends.require_publisher()

    # -- when ---------------------------------------------------------------------------------------------------

    async def loop(self) -> None:
        """Run whenever enough new rewards have come in; meant to be a background task."""
        while True:
            await asyncio.sleep(POLL_S)
            waiting = time.monotonic() - self._last_start < self.config.train_min_interval
            if self._lock.locked() or waiting or self.backends.publisher is None:
                continue
            if await self._read(_new_rewards) >= self.config.train_min_turns:
                try:
                    await self.run()
                except Exception:  # a run's failure is recorded with the run; the loop goes on
                    log.exception("optimizer run failed")

    # -- what ---------------------------------------------------------------------------------------------------

    async def run(self) -> Run:
        """One run, start to finish; returns its record."""
        async with self._lock:
            self._last_start = time.monotonic()
            active = self.publisher.policy.active
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
                run = await self._save(run.update(candidate=candidate.version))
                evaluation = await self._evaluate(candidate.version, active, folder)
                run = await self._save(run.update(evaluation=evaluation))
                if evaluation["promote"]:
                    await self.publisher.activate(candidate.version)
                    return await self._save(run.update(status="published", reason=evaluation["why"]))
                await self.publisher.reject(candidate.version, "rejected: " + evaluation["why"])
                return await self._save(run.update(status="rejected", reason=evaluation["why"]))
            except Exception as exc:
                await self._save(run.update(status="failed", reason=f"{type(exc).__name__}: {exc}"))
                raise

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
        active = self.publisher.policy.active.version
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
            "swap_mode": self.publisher.policy.mode,
        }

    async def _train(self, folder: Path, active: Version) -> tuple[dict[str, Any], Path] | None:
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
        training = {
            k: summary.get(k) for k in ("losses", "tokens", "seconds", "tokens_per_second", "examples", "step", "note")
        }
        return training, Path(summary["adapter_dir"])

    # -- evaluation ---------------------------------------------------------------------------------------------

    async def _evaluate(self, version: str, active: Version, folder: Path) -> dict[str, Any]:
        if self.judges:
            return await self._offline(version, active, folder / "data.jsonl")
        return await self._online(version)

    async def _offline(self, version: str, active: Version, data: Path) -> dict[str, Any]:
        prompts = await asyncio.to_thread(_heldout_prompts, data, self.config.eval_max_prompts)
        if not prompts:
            return {"method": "offline", "promote": False, "why": "no held-out prompts to evaluate on"}
        candidate = await self.publisher.load_candidate(version)
        gate = asyncio.Semaphore(EVAL_CONCURRENCY)

        async def score(model: str, messages: list[dict[str, Any]]) -> float:
            async with gate:
                return await self._score(model, messages)

        scores = {}
        for arm, model in (("active", active.served_name), ("candidate", candidate.served_name)):
            scores[arm] = await asyncio.gather(*(score(model, messages) for messages in prompts))
        means = {arm: sum(values) / len(values) for arm, values in scores.items()}
        promote = means["candidate"] >= means["active"]
        why = (
            f"held-out mean reward {means['candidate']:.3f} (candidate) vs {means['active']:.3f} (active) "
            f"on {len(prompts)} prompts, scored by {', '.join(h.name for h in self.judges)}"
        )
        return {"method": "offline", "prompts": len(prompts), "means": means, "promote": promote, "why": why}

    async def _score(self, model: str, messages: list[dict[str, Any]]) -> float:
        replica = next(r for r in self.publisher.policy.replicas if r.usable())
        body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": EVAL_MAX_TOKENS}
        async with self.publisher.session.post(
            replica.upstream.url("/chat/completions"), json=body, timeout=aiohttp.ClientTimeout(total=300)
        ) as resp:
            response = await resp.json()
        span = {"request": body, "response": response, "http_status": resp.status, "operation_name": "chat"}
        values = []
        for hook in self.judges:
            scored = rewards(await hook(span, self.config))
            if scored:
                values.append(scored.get("reward", next(iter(scored.values()))))
        return sum(values) / len(values) if values else 0.0

    async def _online(self, version: str) -> dict[str, Any]:
        await self.publisher.start_canary(version, self.config.eval_canary_fraction)
        started = datetime.now(UTC)
        deadline = time.monotonic() + self.config.eval_timeout
        arms: dict[str, canary.Arm] = {}
        decision = None
        while decision is None and time.monotonic() < deadline:
            await asyncio.sleep(EVAL_POLL_S)
            arms = await self._read(canary.arm_rewards, started, version)
            decision = canary.decide(arms, self.config.eval_min_sessions)
        counts = {arm: arms.get(arm, canary.Arm()).public() for arm in canary.ARMS}
        if decision is None:
            sessions = {arm: count["sessions"] for arm, count in counts.items()}
            why = f"not enough rewarded sessions in {self.config.eval_timeout:g} s: {sessions}"
            return {"method": "online", "arms": counts, "promote": False, "why": why}
        promote, why = decision
        return {"method": "online", "arms": counts, "promote": promote, "why": why}

    # -- the record ---------------------------------------------------------------------------------------------

    async def _save(self, run: Run) -> Run:
        await self.writer.reserve()
        self.writer.submit(run)
        log.info("optimizer %s: %s%s", run.run_id, run.status, f" ({run.reason})" if run.reason else "")
        return run

    async def _read(self, query: Any, *args: Any) -> Any:
        def read() -> Any:
            with self.writer.cursor() as con:
                return query(con, *args)

        return await asyncio.to_thread(read)

    async def runs(self) -> list[Run]:
        await self.writer.flush()
        return list(await self._read(load_runs))


def _new_rewards(con: Any) -> int:
    """Rewards that arrived since the last run started (all of them before the first run)."""
    row = con.execute(
        "SELECT count(*) FROM feedback WHERE created_at > coalesce((SELECT max(started_at) FROM runs), "
        "TIMESTAMPTZ '1970-01-01')"
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


OPTIMIZER = web.AppKey("optimizer", Optimizer)


@contextlib.asynccontextmanager
async def running(optimizer: Optimizer) -> AsyncIterator[Optimizer]:
    """The optimizer's background loop for an app's lifetime."""
    task = asyncio.create_task(optimizer.loop())
    try:
        yield optimizer
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

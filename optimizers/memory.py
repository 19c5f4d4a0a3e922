"""Memory runs: a new memory-bank version built from the rewarded data, gated, and published or retired.

A run (``POST /admin/memory/build``, ``lightwire memory build``, or in the background once ``train_min_turns``
new rewards have arrived and memory is on for some route) changes what serves through the bank publisher it is
handed (:class:`optimizers.ports.BankPublishing`; the sidecar's is :mod:`proxy.memory_publish`, which also
activates and rolls back banks on request). Read it top to bottom:

1. **Data.** The store's records with credited rewards (:mod:`store.export`, all of them: a bank keeps the best
   of everything seen), sessions split into train and held-out by ``eval_split`` as for adapters.
2. **Select.** From the train split, one trajectory per session (and per group sample): its last turn's
   messages and answer, without system messages, rewarded with that turn's credited reward. Per task (the
   session's first call) the best-rewarded one is kept, only when its reward is above 0; at most
   ``memory_size`` per model, the best first.
3. **Register** the bank (a JSONL file in ``adapters_dir/memory``) as a candidate version ``m1``, ``m2``...
4. **Evaluate** against the active bank by the adapters' rule (:mod:`optimizers.loop`): offline with judging
   hooks, replaying held-out first calls through their own route with each bank's examples (the completions
   client it is handed, :class:`optimizers.ports.Completing`); else online, as a canary over whole sessions
   (:mod:`optimizers.canary`, by ``memory_version``). Promote only if the candidate's mean reward is at least
   the active bank's.
5. **Publish** (the candidate serves every new call at once: a bank is in memory, nothing to load into a
   backend) or retire it, and record the run in ``runs`` (algorithm ``memory``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import duckdb
import orjson

from optimizers import canary
from optimizers.loop import judge, offline_decision, read_store, save_run
from optimizers.ports import BankPublishing, Completing, Judge, Settings
from store import export
from store.memory import Trajectory
from store.runs import Run
from store.writer import Writer

log = logging.getLogger(__name__)

ALGORITHM = "memory"
POLL_S = 10.0  # how often the background loop checks whether a run is due
EVAL_POLL_S = 5.0  # how often an online evaluation counts rewards
EVAL_MAX_TOKENS = 256
EVAL_CONCURRENCY = 8


@dataclass(frozen=True, slots=True)
class Prompt:
    model: str
    messages: list[dict[str, Any]]


def select(con: duckdb.DuckDBPyConnection, config: Settings) -> tuple[list[Trajectory], list[Prompt], dict[str, Any]]:
    """The best trajectories of the train split, the held-out first calls, and counts for the run's record."""
    options = export.Options(
        credit_policy=config.credit_policy, discount=config.discount, session_split=config.eval_split
    )
    last: dict[str, dict[str, Any]] = {}  # per session (a group sample: per span), its last turn's best choice
    first: dict[str, list[dict[str, Any]]] = {}  # per session, its first call's messages: the task
    heldout: dict[bytes, dict[str, Any]] = {}
    records = 0
    with export.snapshot(con):
        for record in export.records(con, options):
            records += 1
            key = record["session_id"] or record["span_id"]
            turn = record["turn_index"] or 0
            if record["split"] == "heldout":
                if turn == 0 and record["messages"]:
                    heldout.setdefault(orjson.dumps(record["messages"]), record)
                continue
            if turn == 0 or key not in first:
                first[key] = record["messages"]
            kept = last.get(key)
            if kept is None or (kept["turn_index"] or 0, kept["reward"] or 0) < (turn, record["reward"] or 0):
                last[key] = record
        models = _request_models(con, [r["span_id"] for r in (*last.values(), *heldout.values())])
    best: dict[tuple[str, bytes], Trajectory] = {}
    for key, record in last.items():
        reward, model = record["reward"], models.get(record["span_id"])
        if reward is None or reward <= 0 or model is None or not isinstance(record["messages"], list):
            continue
        conversation = [m for m in record["messages"] if m.get("role") not in ("system", "developer")]
        trajectory = Trajectory(record["span_id"], model, float(reward), (*conversation, *record["completion"]))
        task = (model, orjson.dumps(first.get(key)))
        kept_one = best.get(task)
        if kept_one is None or (kept_one.reward, -len(kept_one.messages)) < (reward, -len(trajectory.messages)):
            best[task] = trajectory
    chosen: dict[str, list[Trajectory]] = {}
    for trajectory in sorted(best.values(), key=lambda t: (-t.reward, len(t.messages))):
        of_model = chosen.setdefault(trajectory.model, [])
        if len(of_model) < config.memory_size:
            of_model.append(trajectory)
    trajectories = [t for of_model in chosen.values() for t in of_model]
    prompts = [
        Prompt(models[r["span_id"]], r["messages"]) for r in heldout.values() if models.get(r["span_id"]) is not None
    ][: config.eval_max_prompts]
    counts = {
        "records": records,
        "trajectories": {model: len(items) for model, items in chosen.items()},
        "heldout_prompts": len(prompts),
    }
    return trajectories, prompts, counts


def _request_models(con: duckdb.DuckDBPyConnection, span_ids: list[str]) -> dict[str, str]:
    rows = con.execute("SELECT span_id, request_model FROM spans WHERE list_contains($ids, span_id)", {"ids": span_ids})
    return {span_id: model for span_id, model in rows.fetchall() if model is not None}


class Builder:
    """Memory runs for one process: select, register, evaluate, publish or retire, through the bank publisher it
    is handed (the proxy's :class:`proxy.memory_publish.BankPublisher`)."""

    def __init__(
        self,
        config: Settings,
        writer: Writer,
        publisher: BankPublishing,
        complete: Completing,
        judges: tuple[Judge, ...] = (),
    ) -> None:
        self.config = config
        self.writer = writer
        self.publisher = publisher
        self.complete = complete  # the offline evaluation's replays, through the route a model name goes to
        self.judges = judges
        self._building = asyncio.Lock()

    async def loop(self) -> None:
        """Build whenever ``train_min_turns`` new rewards have come in since the last memory run."""
        while True:
            await asyncio.sleep(POLL_S)
            if await self._read(_new_rewards) >= self.config.train_min_turns:
                try:
                    await self.build()
                except Exception:  # recorded with the run; the loop goes on
                    log.exception("memory run failed")

    async def build(self) -> Run:
        """One run: select, register, evaluate, publish or retire; returns its record. One at a time."""
        async with self._building:
            return await self._build()

    async def _build(self) -> Run:
        now = datetime.now(UTC)
        publisher = self.publisher
        run = Run(now.strftime("run-%Y%m%d-%H%M%S-%f"), "running", ALGORITHM, publisher.active_version, None, None,
                  None, None, None, None, now, None)  # fmt: skip
        try:
            await self.writer.flush()  # the calls and rewards that came in just before the run count
            trajectories, prompts, counts = await self._read(select, self.config)
            run = await self._run(run.update(data={**counts, "until": now.isoformat()}))
            if not trajectories:
                return await self._run(run.update(status="no_data", reason="no rewarded trajectory: no bank made"))
            candidate = await publisher.register(trajectories, data={"run": run.run_id, **counts})
            run = await self._run(run.update(candidate=candidate.version))
            evaluation = await self._evaluate(candidate.version, prompts)
            run = await self._run(run.update(evaluation=evaluation))
            if evaluation["promote"]:
                await publisher.activate(candidate.version)
                return await self._run(run.update(status="published", reason=evaluation["why"]))
            await publisher.reject(candidate.version, "rejected: " + evaluation["why"])
            return await self._run(run.update(status="rejected", reason=evaluation["why"]))
        except Exception as exc:
            await self._run(run.update(status="failed", reason=f"{type(exc).__name__}: {exc}"))
            raise

    async def _evaluate(self, version: str, prompts: list[Prompt]) -> dict[str, Any]:
        if not self.judges:
            return await self._online(version)
        if not prompts:
            return {"method": "offline", "promote": False, "why": "no held-out prompts to evaluate on"}
        return await self._offline(version, prompts)

    async def _offline(self, version: str, prompts: list[Prompt]) -> dict[str, Any]:
        gate = asyncio.Semaphore(EVAL_CONCURRENCY)
        calls = [(prompt.model, prompt.messages) for prompt in prompts]

        async def score(prompt: Prompt, sent: list[dict[str, Any]]) -> float | None:
            async with gate:
                return await self._score(prompt, sent)

        scores: dict[str, list[float | None]] = {}  # None: the call failed
        for arm, bank in (("active", self.publisher.active_version), ("candidate", version)):
            sent = await self.publisher.with_examples(bank, calls)
            scores[arm] = list(await asyncio.gather(*(score(p, m) for p, m in zip(prompts, sent, strict=True))))
        return offline_decision(scores, self.judges)

    async def _score(self, prompt: Prompt, sent: list[dict[str, Any]]) -> float | None:
        """Replay ``prompt`` with a bank's examples (``sent``); the judges see the call as the client made it, as
        a span records it: a judge that reads the agent's question by position must not read an example's."""
        body = {"model": prompt.model, "temperature": 0, "max_tokens": EVAL_MAX_TOKENS}
        status, response = await self.complete({**body, "messages": sent})
        return await judge(self.judges, {**body, "messages": prompt.messages}, response, status)

    async def _online(self, version: str) -> dict[str, Any]:
        await self.publisher.start_canary(version, self.config.eval_canary_fraction)

        async def arms_since(started: datetime) -> dict[str, canary.Arm]:
            return await self._read(_arms, started, version)

        config = self.config
        return await canary.watch(
            arms_since, min_sessions=config.eval_min_sessions, timeout=config.eval_timeout, poll=EVAL_POLL_S
        )

    async def _run(self, run: Run) -> Run:
        return await save_run(self.writer, run, "memory")

    async def _read(self, query: Any, *args: Any) -> Any:
        return await read_store(self.writer, query, *args)


def _arms(con: duckdb.DuckDBPyConnection, since: datetime, version: str) -> dict[str, canary.Arm]:
    return canary.arm_rewards(con, since, version, column="memory_version")


def _new_rewards(con: duckdb.DuckDBPyConnection) -> int:
    row = con.execute(
        "SELECT count(*) FROM feedback WHERE created_at > coalesce((SELECT max(started_at) FROM runs "
        "WHERE algorithm = $memory), TIMESTAMPTZ '1970-01-01')",
        {"memory": ALGORITHM},
    ).fetchone()
    return int(row[0]) if row else 0

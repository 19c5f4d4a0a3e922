"""The service around the agent: runs questions, scores each answer, and posts the reward to Lightwire.

The reward is computed here, where the reference answer lives: 1.0 when the agent's final result set equals the
reference query's, else 0.0. Rows compare as sets (duplicates and row order do not matter) unless the reference
sorts (``ORDER BY``), then as lists; within a row the column order does not matter, floats compare rounded to
:data:`DECIMALS` places. The trainer never sees the reference query, only the reward.

The reward goes to ``POST /feedback`` naming the agent's last response id: that call is the one whose answer was
judged, and Lightwire has linked the attempt's earlier turns (failed queries and their error messages) into the
same session, so session-level credit assignment reaches them too. Held-out evaluation posts nothing
(``--no-feedback``): the calls are recorded, but an unrewarded call teaches the trainer nothing.

Run it against a sidecar::

    python -m examples.text2sql.service --base-url http://127.0.0.1:8400/v1 --split train --n 200 --temperature 1.0
    python -m examples.text2sql.service --split heldout --n 20 --temperature 0 --no-feedback
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import openai
from tqdm import tqdm

from examples.text2sql import agent, db, tasks

DEFAULT_BASE_URL = "http://127.0.0.1:8400/v1"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # Lightwire routes any model name to the policy
DEFAULT_CONCURRENCY = 8
DECIMALS = 4
FEEDBACK_TIMEOUT = 30.0
DB_ENV = "TEXT2SQL_DB"  # the database :func:`judge` runs queries against

log = logging.getLogger("text2sql")


@dataclass(frozen=True)
class Outcome:
    """One attempt at one task and how it was judged."""

    task: tasks.Task
    attempt: agent.Attempt
    reward: float
    posted: bool


def reward(rows: Sequence[tuple[Any, ...]] | None, reference: Sequence[tuple[Any, ...]], *, ordered: bool) -> float:
    """1.0 when ``rows`` is the reference's result set (as lists when ``ordered``, else as sets), else 0.0."""
    if rows is None:
        return 0.0
    return 1.0 if _comparable(rows, ordered) == _comparable(reference, ordered) else 0.0


def _comparable(rows: Sequence[tuple[Any, ...]], ordered: bool) -> list[tuple[Any, ...]]:
    canonical = [tuple(sorted((_value(v) for v in row), key=repr)) for row in rows]
    return canonical if ordered else sorted(set(canonical), key=repr)


def _value(value: Any) -> Any:
    if isinstance(value, float):
        value = round(value, DECIMALS)
        return int(value) if value.is_integer() else value
    return value


def judge(span: dict[str, Any]) -> float | None:
    """The reward the service would give one recorded call, as a span hook (``examples.text2sql.service:judge``).

    The question is read from the call's messages and its reference query recovered from the templates
    (:func:`tasks.find`); the reply's SQL runs against the database in ``$TEXT2SQL_DB`` (default: the default
    one). None for a call that is not one of this agent's questions. Meant as an ``eval_hook``: the optimizer
    replays held-out prompts with a candidate and the active version and compares their judged answers; the
    trainer still learns only from the rewards the service posts.
    """
    messages = (span.get("request") or {}).get("messages") or []
    if len(messages) <= agent.QUESTION_INDEX:
        return None
    task = tasks.find(str(messages[agent.QUESTION_INDEX].get("content") or ""))
    if task is None:
        return None
    choices = (span.get("response") or {}).get("choices") or [{}]
    sql = agent.parse_sql((choices[0].get("message") or {}).get("content") or "")
    if sql is None:
        return 0.0
    db_path = db.ensure(Path(os.environ.get(DB_ENV) or db.default_path()))
    try:
        rows = agent.run_sql(db_path, sql)
    except sqlite3.Error:
        return 0.0
    return reward(rows, reference(db_path, task.sql), ordered=task.ordered)


@cache
def reference(db_path: Path, sql: str) -> tuple[tuple[Any, ...], ...]:
    """The rows of a reference query, run once per database and query (the database never changes)."""
    return tuple(agent.run_sql(db_path, sql))


def feedback_url(base_url: str) -> str:
    """``/feedback`` of the sidecar behind an OpenAI base URL (``.../v1``, or ``.../s/<session>/v1``)."""
    root = base_url.rstrip("/").removesuffix("/v1")
    head, sep, _ = root.rpartition("/s/")
    return f"{head if sep else root}/feedback"


async def post_feedback(http: httpx.AsyncClient, url: str, response_id: str, value: float) -> None:
    """Post ``value`` as the reward of the call that answered ``response_id``; raises on an error status."""
    answer = await http.post(url, json={"response_id": response_id, "reward": value})
    answer.raise_for_status()


async def run_tasks(
    client: openai.AsyncOpenAI,
    task_list: Sequence[tasks.Task],
    db_path: Path,
    *,
    model: str,
    temperature: float,
    feedback: httpx.AsyncClient | None,
    url: str = "",
    concurrency: int = DEFAULT_CONCURRENCY,
    progress: bool = False,
) -> list[Outcome]:
    """Solve every task (``concurrency`` at a time), score it, and post its reward to ``url`` unless ``feedback``
    is ``None``. A task whose calls fail is logged and left out of the outcomes."""
    gate = asyncio.Semaphore(concurrency)

    async def one(task: tasks.Task) -> Outcome | None:
        async with gate:
            try:
                attempt = await agent.solve(client, task, db_path, model=model, temperature=temperature)
            except openai.APIError as exc:
                log.warning("%s: the model call failed: %s", task.id, exc)
                return None
        value = reward(attempt.rows, await asyncio.to_thread(reference, db_path, task.sql), ordered=task.ordered)
        posted = False
        if feedback is not None and attempt.last_response_id is not None:
            try:
                await post_feedback(feedback, url, attempt.last_response_id, value)
                posted = True
            except httpx.HTTPError as exc:
                log.warning("%s: feedback was not accepted: %s", task.id, exc)
        return Outcome(task, attempt, value, posted)

    jobs = [asyncio.ensure_future(one(task)) for task in task_list]
    outcomes = []
    try:
        for job in tqdm(asyncio.as_completed(jobs), total=len(jobs), disable=not progress, unit="task"):
            outcome = await job
            if outcome is not None:
                outcomes.append(outcome)
    finally:
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
    order = {task.id: i for i, task in enumerate(task_list)}
    return sorted(outcomes, key=lambda o: order[o.task.id])


def success_by_family(outcomes: Sequence[Outcome]) -> dict[str, tuple[int, int]]:
    """``family -> (solved, attempted)``, families in their usual order, then ``all``."""
    table = {family: (0, 0) for family in tasks.FAMILIES}
    for outcome in outcomes:
        solved, attempted = table[outcome.task.family]
        table[outcome.task.family] = (solved + (outcome.reward == 1.0), attempted + 1)
    table = {family: counts for family, counts in table.items() if counts[1]}
    table["all"] = (sum(s for s, _ in table.values()), sum(n for _, n in table.values()))
    return table


def report(outcomes: Sequence[Outcome]) -> str:
    """The success rate per family as a small table, and the mean number of turns."""
    lines = [f"{'family':<10} {'solved':>9} {'rate':>6}"]
    for family, (solved, attempted) in success_by_family(outcomes).items():
        lines.append(f"{family:<10} {f'{solved}/{attempted}':>9} {solved / attempted:>6.0%}")
    if outcomes:
        turns = sum(len(o.attempt.turns) for o in outcomes) / len(outcomes)
        posted = sum(o.posted for o in outcomes)
        lines.append(f"mean turns {turns:.2f}; feedback posted for {posted} of {len(outcomes)}")
    return "\n".join(lines)


def record(outcome: Outcome) -> dict[str, Any]:
    """One outcome as a JSON-able dict (for ``--jsonl``)."""
    return {
        "id": outcome.task.id,
        "family": outcome.task.family,
        "template": outcome.task.template,
        "question": outcome.task.question,
        "sqls": outcome.attempt.sqls,
        "errors": [turn.error for turn in outcome.attempt.turns],
        "response_ids": outcome.attempt.response_ids,
        "reward": outcome.reward,
        "posted": outcome.posted,
    }


async def run(args: argparse.Namespace) -> list[Outcome]:
    db_path = db.ensure(args.db or db.default_path(args.db_seed), args.db_seed)
    task_list = tasks.questions(args.split, args.n, args.seed)
    task_list = [
        tasks.Task(f"{t.id}.{r}", t.question, t.sql, t.family, t.template, t.split)
        for t in task_list
        for r in range(args.repeat)
    ]
    api_key = os.environ.get("OPENAI_API_KEY") or "none"
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=api_key)
    key = args.admin_key or api_key
    headers = {"Authorization": f"Bearer {key}"}
    async with client, httpx.AsyncClient(headers=headers, timeout=FEEDBACK_TIMEOUT) as http:
        return await run_tasks(
            client,
            task_list,
            db_path,
            model=args.model,
            temperature=args.temperature,
            feedback=None if args.no_feedback else http,
            url=feedback_url(args.base_url),
            concurrency=args.concurrency,
            progress=sys.stderr.isatty(),
        )


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(description="Run the text-to-SQL agent over questions; post rewards to Lightwire.")
    where = cli.add_argument_group("where")
    where.add_argument(
        "--base-url", default=os.environ.get("OPENAI_BASE_URL", DEFAULT_BASE_URL), help="OpenAI base URL (sidecar)"
    )
    where.add_argument("--model", default=DEFAULT_MODEL, help="model name the agent asks for")
    where.add_argument(
        "--admin-key", default=os.environ.get("LIGHTWIRE_ADMIN_KEY"), help="key for /feedback (default: API key)"
    )
    what = cli.add_argument_group("what")
    what.add_argument("--split", choices=tasks.SPLITS, default="train", help="train questions, or held-out ones")
    what.add_argument("--n", type=int, default=20, help="number of questions")
    what.add_argument("--repeat", type=int, default=1, help="attempts per question (a group, for group rewards)")
    what.add_argument("--seed", type=int, default=tasks.DEFAULT_SEED, help="seed of the questions and the split")
    what.add_argument("--db", type=Path, default=None, help="SQLite file (default: built in the temp folder)")
    what.add_argument("--db-seed", type=int, default=db.DEFAULT_SEED, help="seed of the database's data")
    how = cli.add_argument_group("how")
    how.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    how.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="questions in flight at once")
    how.add_argument("--no-feedback", action="store_true", help="post no rewards (held-out evaluation)")
    how.add_argument("--jsonl", type=Path, default=None, help="also write one JSON record per attempt here")
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        outcomes = asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    if args.jsonl is not None:
        with args.jsonl.open("w") as out:
            out.writelines(json.dumps(record(o)) + "\n" for o in outcomes)
    print(report(outcomes))
    return 0


if __name__ == "__main__":
    sys.exit(main())

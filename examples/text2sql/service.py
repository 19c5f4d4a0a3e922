"""The service around the agent: runs questions, scores each answer, and posts the reward to Lightwire.

The reward is computed here, where the reference answer lives: 1.0 when the agent's final result set equals the
reference query's, else 0.0. Rows compare as sets (duplicates and row order do not matter) unless the reference
sorts (``ORDER BY``), then as lists; within a row the column order does not matter, floats compare rounded to
:data:`DECIMALS` places. The trainer never sees the reference query, only the reward.

Running questions, posting rewards to ``POST /feedback`` and the command line are shared with the other examples
(:mod:`examples.harness`): the reward names the agent's last response id, and the attempt's earlier turns
(failed queries and their error messages) are in its session. Held-out evaluation posts nothing (``--no-feedback``).

Run it against a sidecar::

    python -m examples.text2sql.service --base-url http://127.0.0.1:8400/v1 --split train --n 200 --temperature 1.0
    python -m examples.text2sql.service --split heldout --n 20 --temperature 0 --no-feedback
"""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
import sys
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from examples import harness
from examples.text2sql import agent, db, tasks

DECIMALS = 4
DB_ENV = "TEXT2SQL_DB"  # the database :func:`judge` runs queries against


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
    call = harness.recorded_call(span, agent.QUESTION_INDEX)
    task = tasks.find(call[0]) if call else None
    if call is None or task is None:
        return None
    sql = agent.parse_sql(call[1])
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


def example(db_path: Path) -> harness.Example:
    """The text-to-SQL example, over the database at ``db_path``."""

    async def score(task: tasks.Task, attempt: agent.Attempt) -> float:
        expected = await asyncio.to_thread(reference, db_path, task.sql)
        return reward(attempt.rows, expected, ordered=task.ordered)

    return harness.Example(
        name="text2sql",
        families=tasks.FAMILIES,
        questions=tasks.questions,
        solve=functools.partial(agent.solve, db_path=db_path),
        score=score,
        details=lambda attempt: {"sqls": attempt.sqls},
        judge="examples.text2sql.service:judge",
        environment={DB_ENV: str(db_path)},
    )


def main(argv: Sequence[str] | None = None) -> int:
    cli, what = harness.parser(
        "Run the text-to-SQL agent over questions; post rewards to Lightwire.", tasks.DEFAULT_SEED
    )
    what.add_argument("--db", type=Path, default=None, help="SQLite file (default: built in the temp folder)")
    what.add_argument("--db-seed", type=int, default=db.DEFAULT_SEED, help="seed of the database's data")
    args = cli.parse_args(argv)
    return harness.main(args, example(db.ensure(args.db or db.default_path(args.db_seed), args.db_seed)))


if __name__ == "__main__":
    sys.exit(main())

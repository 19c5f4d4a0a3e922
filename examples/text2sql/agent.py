"""The agent: asks the model for SQL, runs it, and on an error sends the error back and asks again.

It is written only against the ``openai`` SDK and knows nothing of Lightwire: the client it is given reads
``OPENAI_BASE_URL`` like any other, and no request carries a header of Lightwire's. The conversation of one
question is one growing list of messages (the reply is sent back as it came), so a sidecar that links
conversations sees the turns of an attempt as one session.

The prompt is short (the model's context is 2048 tokens and every token costs sampling time on a CPU): a system
message with the schema, one line per table, read from the database itself; two worked examples as earlier
turns of the conversation, in the format the model must answer in; then the question.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import openai

from examples import harness
from examples.text2sql.tasks import Task

MAX_TURNS = 3
MAX_TOKENS = 160  # a query is 10-60 tokens; this bounds a model that rambles
MAX_ROWS = 200  # rows of a result kept; a query returning more is cut (and is wrong for every question here)
QUERY_SECONDS = 2.0  # a query running longer is interrupted (a runaway cross join)

INSTRUCTIONS = "You write SQLite queries. Answer with one SQL query only, no explanation."
EXAMPLES = (  # one listing with a filter, one count: the shapes a small model can copy; no question's template
    ("Which products cost less than 20?", "SELECT name FROM products WHERE price < 20;"),
    ("How many customers are 30 years old?", "SELECT COUNT(*) FROM customers WHERE age = 30;"),
)
RETRY = "Error: {error}\nWrite a corrected SQL query."
QUESTION_INDEX = 1 + 2 * len(EXAMPLES)  # where the question is in every call's messages: after the system and examples

_FENCE = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)(?:```|$)", re.DOTALL)
_START = re.compile(r"\b(SELECT|WITH)\b", re.IGNORECASE)


@dataclass
class Turn:
    """One call: the model's reply, the SQL read from it, and what running it gave (rows, or an error)."""

    response_id: str
    content: str
    sql: str | None
    rows: list[tuple[Any, ...]] | None = None
    error: str | None = None


class Attempt(harness.Attempt[Turn]):
    """All the turns of one question; the answer is the last turn's rows (``None`` when every turn failed)."""

    @property
    def rows(self) -> list[tuple[Any, ...]] | None:
        return self.turns[-1].rows if self.turns else None

    @property
    def sqls(self) -> list[str | None]:
        return [turn.sql for turn in self.turns]


async def solve(
    client: openai.AsyncOpenAI,
    task: Task,
    db_path: Path,
    *,
    model: str,
    temperature: float,
    max_turns: int = MAX_TURNS,
) -> Attempt:
    """Answer ``task.question`` (nothing else of the task is read) with up to ``max_turns`` calls to the model."""
    messages: list[Any] = [*prompt(db_path), {"role": "user", "content": task.question}]
    attempt = Attempt(task.question)
    for _ in range(max_turns):
        response = await client.chat.completions.create(
            model=model, messages=messages, temperature=temperature, max_tokens=MAX_TOKENS
        )
        content = response.choices[0].message.content or ""
        turn = Turn(response.id, content, parse_sql(content))
        attempt.turns.append(turn)
        if turn.sql is None:
            turn.error = "no SQL query found in the answer"
        else:
            try:
                turn.rows = await asyncio.to_thread(run_sql, db_path, turn.sql)
            except sqlite3.Error as exc:
                turn.error = str(exc)
        if turn.error is None:
            break
        messages += [
            {"role": "assistant", "content": content},
            {"role": "user", "content": RETRY.format(error=turn.error)},
        ]
    return attempt


def prompt(db_path: Path) -> list[dict[str, str]]:
    """The messages before the question: instructions and schema, then the worked examples."""
    messages = [{"role": "system", "content": f"{INSTRUCTIONS}\n{describe(db_path)}"}]
    for question, sql in EXAMPLES:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": sql}]
    return messages


@cache
def describe(db_path: Path) -> str:
    """The schema in a few lines: ``table(col, ...)`` for each table, then how the tables join."""
    with _connect(db_path) as con:
        tables = [name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY rowid")]
        lines, joins = [], []
        for table in tables:
            columns = [row[1] for row in con.execute(f"PRAGMA table_info({table})")]
            lines.append(f"{table}({', '.join(columns)})")
            for row in con.execute(f"PRAGMA foreign_key_list({table})"):
                joins.append(f"{table}.{row[3]} = {row[2]}.{row[4]}")
    if joins:
        lines.append("Joins: " + ", ".join(joins))
    return "\n".join(lines)


def parse_sql(content: str) -> str | None:
    """The first SQL statement in a reply: inside a ``` fence if there is one, from SELECT/WITH to the first ``;``
    outside quotes (or a blank line, or the end)."""
    fenced = _FENCE.search(content)
    text = fenced.group(1) if fenced else content
    start = _START.search(text)
    if start is None:
        return None
    text = text[start.start() :]
    quote = None
    for i, char in enumerate(text):
        if quote is not None:
            if char == quote:
                quote = None
        elif char in "'\"`":
            quote = char
        elif char == ";" or text.startswith("\n\n", i):
            text = text[:i]
            break
    return " ".join(text.split()) or None


def run_sql(db_path: Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` run read-only (at most :data:`MAX_ROWS`); ``sqlite3.Error`` when it fails or runs too long."""
    deadline = time.monotonic() + QUERY_SECONDS
    with _connect(db_path) as con:
        con.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
        return con.execute(sql).fetchmany(MAX_ROWS)


def _connect(db_path: Path) -> contextlib.closing[sqlite3.Connection]:
    """A read-only connection, closed on exit (``sqlite3.connect`` as a context manager only commits)."""
    return contextlib.closing(sqlite3.connect(f"{Path(db_path).resolve().as_uri()}?mode=ro", uri=True))

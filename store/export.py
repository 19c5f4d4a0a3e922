"""Training datasets from the store: one record per successful call and per choice, rewards credited to turns.

Only successful calls are exported (``http_status`` 200, no ``error_type``); a call with ``n > 1`` gives one
record per choice. A record::

    span_id, session_id, turn_index   the call and its place in its session
    choice                            the choice's index in the response
    split                             "train" or "heldout": a hash of session_id, so a session never straddles
                                      (a group sample, which has none: of its client's session)
    model, adapter_version            the model that answered (response_model) and the adapter that served it
    messages                          the request's messages (chat) or its prompt (text completions), as sent;
                                      for a Responses call, the whole conversation as chat messages: its
                                      instructions, the input items of the responses it continues and their
                                      output (``previous_response_id`` chains and ``conversation``s are rebuilt
                                      from their spans, so a backend without state loses nothing), then its own
    prompt                            the same as messages: TRL's and verl's name for it
    completion                        chat: [the choice's assistant message] (null fields dropped); text: its text;
                                      Responses: [its output items as one assistant message, tool calls included]
    reward                            the reward named ``reward_name`` after credit assignment; null when none
    rewards                           every named reward of the turn after credit assignment, {name: value}
    prompt_token_ids                  exact tokens, when the backend returned them (vLLM), else null; null too when
                                      memory put examples in front of the call (the tokens include them)
    completion_token_ids              this choice's sampled tokens, else null
    completion_logprobs               this choice's logprob of each sampled token, else null (and with memory)
    data_source, ability              for verl: "lightwire" and the operation ("chat" or "text_completion")
    reward_model                      for verl: {"style": "recorded", "ground_truth": reward}
    extra_info                        for verl: {span_id, session_id, turn_index, choice, split}

How trainers read it:

* **TRL** (SFT, KTO, GRPO...): ``prompt`` + ``completion`` is its *prompt-completion* type, conversational for
  chat (lists of ``{"role", "content"}`` messages) and standard for text completions (strings). Select those
  columns (a dataset that also has ``messages`` may be read as language modelling); KTO also wants a boolean
  ``label``, e.g. ``reward > 0``.
* **verl**: a parquet file with ``data_source``, ``prompt`` (chat messages), ``ability``, ``reward_model`` and
  ``extra_info``; a custom ``compute_score`` may replay the recorded reward from ``reward_model.ground_truth``.

Credit assignment (:mod:`store.credit`) runs over each session's successful calls, all of them, whatever
``since`` says, so that a turn's reward does not depend on the export window. ``min_reward`` keeps records whose
credited reward is at least that value (unrewarded ones are dropped).

Formats: ``jsonl`` (one JSON object a line, messages exactly as sent) and ``parquet``, written by DuckDB's own
parquet writer (no pyarrow). Parquet needs one type per column: message fields absent from some messages are
null there, and when some messages carry ``content`` as a list of parts and others as a string, that column
holds JSON text; so does ``rewards`` (Hugging Face ``datasets``, which TRL and verl read through, has no type for
a Parquet map). Next to the data, ``<file>.meta.json`` records the settings, filters, counts and the data's
sha256. Every function takes a DuckDB connection: the sidecar's writer cursor, or a read-only connection.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson

from store import credit, idkeys, items, queries
from store.spans import MODEL_CALL, RESPONSES, SAMPLE_SOURCE

FORMATS = ("jsonl", "parquet")
DEFAULT_SESSION_SPLIT = 0.1
DATA_SOURCE = "lightwire"
FETCH_ROWS = 256  # spans read from the store at a time
# Model calls (other /v1/ paths are spans too, named by their path) that succeeded.
OK = f"http_status = 200 AND error_type IS NULL AND {MODEL_CALL}"
# Parquet column types; None: inferred from the records (message shapes vary).
PARQUET_TYPES: dict[str, str | None] = {
    "span_id": "VARCHAR",
    "session_id": "VARCHAR",
    "turn_index": "INTEGER",
    "choice": "INTEGER",
    "split": "VARCHAR",
    "model": "VARCHAR",
    "adapter_version": "VARCHAR",
    "messages": None,
    "prompt": None,
    "completion": None,
    "reward": "DOUBLE",
    "rewards": "JSON",  # {name: value} as JSON text: Hugging Face datasets reads no Parquet MAP
    "prompt_token_ids": "INTEGER[]",
    "completion_token_ids": "INTEGER[]",
    "completion_logprobs": "DOUBLE[]",
    "data_source": "VARCHAR",
    "ability": "VARCHAR",
    "reward_model": "STRUCT(style VARCHAR, ground_truth DOUBLE)",
    "extra_info": "STRUCT(span_id VARCHAR, session_id VARCHAR, turn_index INTEGER, choice INTEGER, split VARCHAR)",
}
MIN_OBJECT_BYTES = 16 * 1024 * 1024  # DuckDB's default read_json limit for one record


@dataclass(frozen=True, kw_only=True)
class Options:
    """What to export and how to credit rewards."""

    format: str = "jsonl"
    credit_policy: str = "discounted"
    discount: float = 0.9
    reward_name: str = credit.DEFAULT_NAME
    since: datetime | None = None
    min_reward: float | None = None
    session_split: float = DEFAULT_SESSION_SPLIT

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be {' or '.join(FORMATS)}, not {self.format!r}")
        if self.credit_policy not in credit.POLICIES:
            raise ValueError(f"credit_policy must be one of {', '.join(credit.POLICIES)}, not {self.credit_policy!r}")
        if not 0.0 <= self.session_split <= 1.0:
            raise ValueError(f"session_split must be between 0 and 1, not {self.session_split}")
        if not math.isfinite(self.discount) or not math.isfinite(self.min_reward or 0.0):
            raise ValueError("discount and min_reward must be finite numbers")
        if self.since is not None and self.since.tzinfo is None:
            object.__setattr__(self, "since", self.since.replace(tzinfo=UTC))

    def describe(self) -> dict[str, Any]:
        """The options as the metadata file records them."""
        return {
            "format": self.format,
            "credit_policy": self.credit_policy,
            "discount": self.discount,
            "reward_name": self.reward_name,
            "filters": {
                "since": self.since.isoformat() if self.since else None,
                "min_reward": self.min_reward,
                "session_split": self.session_split,
            },
        }


@contextlib.contextmanager
def snapshot(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """One transaction around several reads, so that they see the same data while the writer commits more."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    finally:
        con.execute("ROLLBACK")


def split_of(session_id: str, heldout: float) -> str:
    """``"heldout"`` for a stable ``heldout`` fraction of sessions (by a hash of the id), else ``"train"``."""
    digest = hashlib.sha256(session_id.encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") / 2**64 < heldout else "train"


def meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


# -- rewards -----------------------------------------------------------------------------------------------


def turn_rewards(
    con: duckdb.DuckDBPyConnection, *, policy: str, discount: float, since: datetime | None = None
) -> dict[str, dict[str, float]]:
    """Every named reward of each successful call after credit assignment, by span id.

    With ``since``, only the sessions with a successful call at or after it (all of their calls).
    """
    window = "WHERE session IN (SELECT session FROM ok WHERE start_time >= $since)" if since else ""
    turns = con.execute(
        f"""
        WITH ok AS (SELECT span_id, coalesce(session_id, span_id) AS session, turn_index, start_time
                    FROM spans WHERE {OK})
        SELECT session, span_id, turn_index FROM ok {window}
        ORDER BY session, turn_index NULLS LAST, start_time, span_id
        """,
        {"since": since} if since else {},
    ).fetchall()
    sessions: dict[str, list[credit.Turn]] = {}
    for session, span_id, turn_index in turns:
        group = sessions.setdefault(session, [])
        group.append(credit.Turn(span_id, turn_index if turn_index is not None else len(group)))
    ratings: dict[str, list[credit.Rating]] = {}
    for session, *rating in con.execute(
        """
        SELECT coalesce(f.session_id, s.session_id, f.span_id), f.span_id, f.name, f.value, f.created_at
        FROM feedback f LEFT JOIN spans s ON s.span_id = f.span_id
        ORDER BY f.created_at, f.feedback_id
        """
    ).fetchall():
        if session in sessions:
            ratings.setdefault(session, []).append(credit.Rating(*rating))
    out: dict[str, dict[str, float]] = {}
    for session, group in sessions.items():
        out.update(credit.assign_all(group, ratings.get(session, ()), policy=policy, discount=discount))
    return out


# -- records -----------------------------------------------------------------------------------------------


def records(con: duckdb.DuckDBPyConnection, options: Options) -> Iterator[dict[str, Any]]:
    """The dataset's records, oldest call first."""
    rewards = turn_rewards(con, policy=options.credit_policy, discount=options.discount, since=options.since)
    window = "AND start_time >= $since" if options.since else ""
    history = Conversations(con)
    cursor = con.execute(
        f"""
        SELECT span_id, session_id, turn_index, operation_name, request, response, prompt_token_ids,
               completion_token_ids, completion_logprobs, adapter_version, response_model,
               coalesce(session_id, (SELECT client.session_id FROM spans client
                                     WHERE client.span_id = spans.parent_span_id AND spans.session_source = $sample)),
               len(coalesce(memory_examples, [])) > 0, start_time
        FROM spans WHERE {OK} {window} ORDER BY start_time, span_id
        """,
        {"sample": SAMPLE_SOURCE, **({"since": options.since} if options.since else {})},
    )
    while rows := cursor.fetchmany(FETCH_ROWS):
        for row in rows:
            for record in _call_records(row, rewards.get(row[0], {}), options, history):
                reward = record["reward"]
                if options.min_reward is None or (reward is not None and reward >= options.min_reward):
                    yield record


def _call_records(
    row: tuple[Any, ...], rewards: dict[str, float], options: Options, history: Conversations
) -> Iterator[dict[str, Any]]:
    span_id, session_id, turn_index, operation, request, response, prompt_ids, completion_ids, logprobs = row[:9]
    adapter_version, model, split_session, remembered, start_time = row[9:]
    if remembered:  # the model saw memory's examples too: its logged prompt and logprobs are not the client's call
        prompt_ids, logprobs = None, None
    body = orjson.loads(request)
    chat = operation in ("chat", RESPONSES)
    prompt = body.get("messages") if chat else body.get("prompt")
    split = split_of(split_session or span_id, options.session_split)  # a group sample: its client's session
    reward = rewards.get(options.reward_name)
    choices = (orjson.loads(response).get("choices") or []) if response else []
    if operation == RESPONSES:
        reply = orjson.loads(response) if response else {}
        prompt, choices = history.as_chat(body, reply, session_id, turn_index, start_time)
    for position, choice in enumerate(choices):
        if chat and not isinstance(choice.get("message"), dict):
            continue
        index = choice.get("index", position)
        completion = [_message(choice["message"])] if chat else choice.get("text", "")
        yield {
            "span_id": span_id,
            "session_id": session_id,
            "turn_index": turn_index,
            "choice": index,
            "split": split,
            "model": model,
            "adapter_version": adapter_version,
            "messages": prompt,
            "prompt": prompt,
            "completion": completion,
            "reward": reward,
            "rewards": rewards,
            "prompt_token_ids": prompt_ids,
            "completion_token_ids": _nth(completion_ids, position),
            "completion_logprobs": _nth(logprobs, position),
            "data_source": DATA_SOURCE,
            "ability": operation,
            "reward_model": {"style": "recorded", "ground_truth": reward},
            "extra_info": {
                "span_id": span_id,
                "session_id": session_id,
                "turn_index": turn_index,
                "choice": index,
                "split": split,
            },
        }


class Conversations:
    """Rebuilds the whole input of Responses calls that continue earlier ones, from the earlier calls' spans."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con
        self._items: dict[str, list[Any]] = {}  # response id -> the conversation's items up to its output

    def as_chat(
        self,
        body: dict[str, Any],
        response: dict[str, Any],
        session_id: str | None,
        turn_index: int | None,
        start_time: datetime,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The call's prompt as chat messages, and its output as one chat choice (none when it has no output)."""
        earlier = self._before(body, session_id, turn_index, start_time)
        instructions = body.get("instructions") if isinstance(body.get("instructions"), str) else None
        prompt = items.to_messages([*earlier, *items.input_items(body)], instructions=instructions)
        reply = items.reply(response)
        return prompt, [{"index": 0, "message": reply}] if reply is not None else []

    def _before(
        self, body: dict[str, Any], session_id: str | None, turn_index: int | None, start_time: datetime
    ) -> list[Any]:
        previous = body.get("previous_response_id")
        if isinstance(previous, str):
            return self._through(previous)
        conversation = items.conversation_id(body)
        if conversation is None or conversation != session_id or turn_index is None:
            return []
        within, bounds = queries.session_window(self.con, conversation, until=start_time)  # its earlier turns
        rows = self.con.execute(
            f"""SELECT request, response FROM spans WHERE session_id = ? AND turn_index < ? AND {OK}
                AND operation_name = '{RESPONSES}' {within} ORDER BY turn_index""",
            [conversation, turn_index, *bounds],
        ).fetchall()
        return [item for request, response in rows for item in _exchange(request, response)]

    def _through(self, response_id: str) -> list[Any]:
        """Every item of the conversation up to and including the output of ``response_id``."""
        chain: list[str] = []  # the responses not rebuilt yet, newest first; each holds its own items meanwhile
        cursor: str | None = response_id
        while cursor is not None and cursor not in self._items:
            row = self.con.execute(
                f"SELECT request, response FROM spans WHERE {idkeys.match('response_id')} AND {OK} LIMIT 1",
                idkeys.args(cursor),
            ).fetchone()
            if row is None:
                break  # a response this store never saw: the conversation starts after it
            chain.append(cursor)
            self._items[cursor] = _exchange(row[0], row[1])
            previous = orjson.loads(row[0]).get("previous_response_id")
            cursor = previous if isinstance(previous, str) else None
        items = self._items.get(cursor, []) if cursor is not None else []
        for known in reversed(chain):
            items = self._items[known] = [*items, *self._items[known]]
        return self._items.get(response_id, [])


def _exchange(request: str, response: str | None) -> list[Any]:
    """A Responses call's input items followed by its output items."""
    output = (orjson.loads(response) or {}).get("output") if response else None
    return [*items.input_items(orjson.loads(request)), *(output or ())]


def _message(message: dict[str, Any]) -> dict[str, Any]:
    """The assistant message without null or empty fields (``content`` is kept: null is meaningful with tools)."""
    return {k: v for k, v in message.items() if k == "content" or (v is not None and v != [])}


def _nth(lists: list[Any] | None, i: int) -> Any:
    return lists[i] if lists is not None and i < len(lists) else None


# -- files -------------------------------------------------------------------------------------------------


def write(con: duckdb.DuckDBPyConnection, path: Path, options: Options) -> dict[str, Any]:
    """Write the dataset to ``path`` and its metadata next to it; return the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".lightwire-export-") as tmp:
        staging = Path(tmp) / "records.jsonl"
        with snapshot(con):
            counts, longest = _write_jsonl(staging, records(con, options))
        data = staging
        if options.format == "parquet":
            data = Path(tmp) / "records.parquet"
            _jsonl_to_parquet(con, staging, data, longest)
        digest = file_sha256(data)
        os.replace(data, path)
    meta = {
        **options.describe(),
        "records": sum(counts.values()),
        "splits": counts,
        "created_at": datetime.now(UTC).isoformat(),
        "sha256": digest,
    }
    write_meta(path, meta)
    return meta


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    meta_path(path).write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2) + b"\n")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _write_jsonl(path: Path, rows: Iterator[dict[str, Any]]) -> tuple[dict[str, int], int]:
    """Write one record a line; return the count per split and the longest line's length."""
    counts = {"train": 0, "heldout": 0}
    longest = 0
    with open(path, "wb") as fh:
        for record in rows:
            line = orjson.dumps(record) + b"\n"
            fh.write(line)
            counts[record["split"]] += 1
            longest = max(longest, len(line))
    return counts, longest


def _jsonl_to_parquet(con: duckdb.DuckDBPyConnection, source: Path, target: Path, longest: int) -> None:
    """Convert with DuckDB: fixed types where known, message columns typed from the records themselves."""
    reader = "read_json($source, format = 'newline_delimited', maximum_object_size = $size"
    params: dict[str, Any] = {"source": str(source), "size": max(MIN_OBJECT_BYTES, longest + 1)}
    described = con.execute(f"DESCRIBE SELECT * FROM {reader}, sample_size = -1)", params).fetchall()
    inferred = {name: kind for name, kind, *_ in described}
    columns = {name: kind or _inferred(inferred.get(name)) for name, kind in PARQUET_TYPES.items()}
    con.execute(
        f"COPY (SELECT * FROM {reader}, columns = $columns)) TO '{_sql_path(target)}' (FORMAT parquet)",
        {**params, "columns": columns},
    )


def _inferred(kind: str | None) -> str:
    return "JSON" if kind is None or kind.strip('"') == "NULL" else kind


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")

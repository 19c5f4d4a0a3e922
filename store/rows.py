"""Rows into DuckDB: typed Arrow batches, values a column cannot hold, and rows the store refuses.

* **Typed by the database.** A batch's columns are built with the Arrow types of the table's own columns (read
  from DuckDB when the store opens), so DuckDB casts nothing and a value is checked once, in Python.
* **A value that does not fit is stored as NULL, never the reason to lose a row.** A client may send
  ``"max_tokens": 1e300`` and a backend ``"id": 7``; such a value goes in as NULL in its typed column (logged),
  and stays as it came in the request or response JSON.
* **One bad row never aborts its batch.** A batch is one transaction; when DuckDB refuses a row in it (a required
  column without a value, malformed JSON), the batch is written again row by row and only that row is refused.
* **Refused rows stay readable.** They go to ``<db>.rejected.jsonl``, one JSON object a line:
  ``{"table": "spans", "reason": "...", "row": {"span_id": ..., ...}}``. ``lightwire store reimport`` inserts
  them (after a fix, or an upgrade whose schema takes them) and keeps in the file only those still refused.
* **Idempotent.** Tables with ``replace`` rewrite a row by key; in the others, a row whose key is there already
  is taken as written (a batch retried after a failure half-way). Plain ``INSERT`` is used for them and the
  check is made only when a batch fails: ``INSERT OR IGNORE`` made every batch of spans ~2.7x slower.

Errors are of two kinds: :data:`ROW_ERRORS`, about one row, and every other error, about the store (disk full,
I/O, a lost file): the caller keeps those rows and tries again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from store import idkeys

log = logging.getLogger(__name__)

REJECTED_SUFFIX = ".rejected.jsonl"  # rows the store refused, for a person to look at and re-import
BATCH = "lightwire_batch"  # the name an Arrow batch has in the insert statement
SHARE_SEQ = "share_seq"  # the sequence (and column) that orders rows for shipping to a share (store/segments.py)
# DuckDB's errors about one row (the others are about the store: I/O, disk full, out of memory...).
ROW_ERRORS = (duckdb.ConstraintException, duckdb.ConversionException, duckdb.InvalidInputException)
# What pa.array raises for a value its type cannot hold.
_VALUE_ERRORS = (pa.ArrowException, OverflowError, TypeError, ValueError)
# Earlier versions wrote a refused span as a positional list, its datetimes as repr().
_OLD_DATETIME = re.compile(r"^datetime\.datetime\(([\d, ]+?)(?:, tzinfo=.*)?\)$")


@dataclass(frozen=True)
class Refusal:
    table: str
    reason: str
    row: dict[str, Any] | None  # None: the record could not even be made into a row


@dataclass(frozen=True)
class Table:
    """How rows of one table are typed and inserted."""

    name: str
    columns: tuple[str, ...]
    schema: pa.Schema
    required: frozenset[str]  # NOT NULL columns
    sql: str
    replace: bool  # rows update earlier ones with the same key (the first column)

    @classmethod
    def read(cls, con: duckdb.DuckDBPyConnection, name: str, columns: Iterable[str], *, replace: bool) -> Table:
        columns = tuple(columns)
        names = ", ".join(columns)
        schema = con.sql(f"SELECT {names} FROM {name} LIMIT 0").to_arrow_table().schema
        described = con.execute(f"DESCRIBE {name}").fetchall()
        required = frozenset(row[0] for row in described if row[2] == "NO")
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        sql = f"{verb} INTO {name} BY NAME SELECT {names}{idkeys.derived(name)} FROM {BATCH}"
        if replace and SHARE_SEQ in {row[0] for row in described} and SHARE_SEQ not in columns:
            # INSERT OR REPLACE keeps the columns it is not given: a replaced row would keep the sequence number
            # it shipped under, and its new value (a session's second end) would never reach the share.
            sql = f"{verb} INTO {name} ({names}, {SHARE_SEQ}) SELECT {names}, nextval('{SHARE_SEQ}') FROM {BATCH}"
        return cls(name, columns, schema, required, sql, replace)

    def latest(self, rows: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
        """The rows to insert from a batch: for a replacing table, the last one of each key. DuckDB's INSERT OR
        REPLACE keeps the *first* of two rows with one key in the same statement, which silently lost an adapter's
        activation when it came within a flush interval of its registration."""
        return list({row[0]: row for row in rows}.values()) if self.replace else rows

    def named(self, row: tuple[object, ...]) -> dict[str, Any]:
        return dict(zip(self.columns, row, strict=True))

    def batch(self, rows: list[tuple[object, ...]]) -> tuple[pa.Table, list[Refusal]]:
        """The rows as an Arrow table of the table's types; a value its column cannot hold becomes NULL, and a
        row with such a value in a required column is refused (left out, and returned)."""
        arrays = []
        refused: dict[int, str] = {}
        columns = list(zip(*rows, strict=True)) or [()] * len(self.schema)
        for field, values in zip(self.schema, columns, strict=True):
            try:
                arrays.append(pa.array(values, type=field.type))
                continue
            except _VALUE_ERRORS:
                pass
            fitted: list[object] = []
            for j, value in enumerate(values):
                try:
                    pa.array([value], type=field.type)
                except _VALUE_ERRORS as exc:
                    if field.name in self.required:
                        refused.setdefault(j, f"{self.name}.{field.name} cannot hold {value!r:.200} ({exc})")
                    else:
                        log.warning("%s.%s cannot hold %.200r (%s): stored NULL", self.name, field.name, value, exc)
                    value = None
                fitted.append(value)
            arrays.append(pa.array(fitted, type=field.type))
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        if refused:
            table = table.filter(pa.array([j not in refused for j in range(len(rows))]))
        return table, [Refusal(self.name, why, self.named(rows[j])) for j, why in refused.items()]


def write(
    con: duckdb.DuckDBPyConnection, tables: dict[str, Table], rows: dict[str, list[tuple[object, ...]]]
) -> list[Refusal]:
    """Insert the rows, in one transaction, or row by row when DuckDB refuses one of them; return the refused.

    Raises DuckDB's errors about the store (the caller keeps the rows and tries again).
    """
    batches: dict[str, pa.Table] = {}
    refused: list[Refusal] = []
    for name, table_rows in rows.items():
        batches[name], bad = tables[name].batch(tables[name].latest(table_rows))
        refused += bad
    try:
        _insert(con, tables, batches)
        return refused
    except ROW_ERRORS:
        pass
    for name, batch in batches.items():
        for i in range(batch.num_rows):
            one = batch.slice(i, 1)
            try:
                _insert(con, tables, {name: one})
            except ROW_ERRORS as exc:
                if isinstance(exc, duckdb.ConstraintException) and "Duplicate key" in str(exc):
                    continue  # written by an earlier try of this batch
                row = {key: values[0] for key, values in one.to_pydict().items()}
                refused.append(Refusal(name, str(exc).splitlines()[0], row))
    return refused


def _insert(con: duckdb.DuckDBPyConnection, tables: dict[str, Table], batches: dict[str, pa.Table]) -> None:
    con.execute("BEGIN TRANSACTION")
    try:
        for name, batch in batches.items():
            con.register(BATCH, batch)
            try:
                con.execute(tables[name].sql)
            finally:
                con.unregister(BATCH)
        con.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(duckdb.Error):  # a failed COMMIT has already ended the transaction
            con.execute("ROLLBACK")
        raise


# -- files of rows ----------------------------------------------------------------------------------------------


def append(path: Path, entries: Iterable[dict[str, Any]]) -> None:
    """Append JSON lines (datetimes in ISO 8601, anything else JSON lacks as its text)."""
    text = "".join(json.dumps(entry, default=plain) + "\n" for entry in entries)
    if text:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(text)


def refusal_line(refusal: Refusal) -> dict[str, Any]:
    return {"table": refusal.table, "reason": refusal.reason, "row": refusal.row}


def read(path: Path, tables: dict[str, Table]) -> Iterator[tuple[str | None, tuple[object, ...] | None, str]]:
    """The rows of a file written by :func:`append`: ``(table, row, text of the line)``; table and row are None
    for a line that is not a row of a known table (it is kept as it is)."""
    spans = tables.get("spans")
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                yield None, None, line
                continue
            if isinstance(entry, list) and spans is not None and len(entry) == len(spans.columns):
                entry = {"table": "spans", "row": dict(zip(spans.columns, entry, strict=True))}
            table = tables.get(str(entry.get("table"))) if isinstance(entry, dict) else None
            row = entry.get("row") if isinstance(entry, dict) else None
            if table is None or not isinstance(row, dict) or not set(row) <= set(table.columns):
                yield None, None, line
                continue
            typed = (_typed(row.get(name), kind) for name, kind in zip(table.columns, table.schema.types, strict=True))
            yield table.name, tuple(typed), line


def plain(value: object) -> object:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _typed(value: object, kind: pa.DataType) -> object:
    """A value read back from JSON, as the column's Arrow type takes it (datetimes were written as text)."""
    if isinstance(value, str) and pa.types.is_timestamp(kind):
        old = _OLD_DATETIME.match(value)
        if old:
            parts = [int(part) for part in old.group(1).split(",")]
            return datetime(*parts[:7], tzinfo=UTC)  # type: ignore[arg-type,misc]
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value)
    return value

"""Finding a call by its response id or span id without an index.

An ART index on random ids is touched all over by every batch, so DuckDB holds it whole: the one on the spans'
response ids held ~50 bytes a span, and the lookup it was for (the newest call with a response id: feedback and
``previous_response_id`` naming a call the session index no longer holds) did not even use it. The spans' primary
key is by start time first for the same reason (migration ``013_spans_by_time``), so it cannot find a span id
alone either. Instead each id has a key column, 64 bits of the MD5 of its UTF-8 bytes, filled as a row is
inserted, and a lookup scans it: ~5 ms at 1M spans (``bench.store_growth``). A collision of keys costs a
comparison of the ids, never a wrong answer.
"""

from __future__ import annotations

import hashlib

# Table -> key column -> the id column it is made from.
KEYS: dict[str, dict[str, str]] = {"spans": {"response_key": "response_id", "span_key": "span_id"}}
_KEY_OF = {column: key for keys in KEYS.values() for key, column in keys.items()}


def sql(column: str) -> str:
    """The SQL expression of the key of ``column``'s value (NULL for NULL); :func:`key` in Python."""
    return f"CAST(md5_number({column}) >> 64 AS UBIGINT)"


def key(value: str) -> int:
    """The key of an id, as :func:`sql` computes it: DuckDB's ``md5_number`` reads the digest little-endian."""
    return int.from_bytes(hashlib.md5(value.encode()).digest()[8:], "little")


def match(column: str) -> str:
    """A filter for the rows whose ``column`` is a given id; its parameters are :func:`args` of the id."""
    return f"{_KEY_OF[column]} = ? AND {column} = ?"


def args(value: str) -> list[object]:
    return [key(value), value]


def derived(table: str) -> str:
    """The key columns of ``table`` as a select list (``key AS name, ...``) for an insert; empty for a table
    without keys."""
    return "".join(f", {sql(column)} AS {name}" for name, column in KEYS.get(table, {}).items())


def stored(table: str) -> str:
    """A select list of ``table``'s columns but its keys, for a copy that another store inserts (with
    :func:`derived`)."""
    keys = KEYS.get(table)
    return f"* EXCLUDE ({', '.join(keys)})" if keys else "*"

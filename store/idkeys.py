"""Finding a call by its response id without an index.

An ART index stays in memory for the life of the process, and the one on the spans' response ids held ~50 bytes a
span; the lookup it was for (the newest call with a response id: feedback and ``previous_response_id`` naming a
call the session index no longer holds) did not even use it. Instead the id has a key column, 64 bits of the MD5
of its UTF-8 bytes, filled as a row is inserted, and a lookup scans it: 9.9 ms at 1M spans, where the lookup took
52.9 ms with the index (``bench.store_growth``). A collision of keys costs a comparison of the ids, never a wrong
answer.

The session id keeps its index: a call naming a session the proxy does not hold in memory counts that session's
earlier calls on the request path (~1 ms at 1M spans with the index, 9-15 ms scanning a key).
"""

from __future__ import annotations

import hashlib

# Table -> key column -> the id column it is made from.
KEYS: dict[str, dict[str, str]] = {"spans": {"response_key": "response_id"}}
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

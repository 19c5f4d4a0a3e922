"""Opening the store's DuckDB file for writing, with row groups sized for rows that arrive a batch at a time.

A checkpoint rewrites a table's last, partly filled row group whole. At DuckDB's default size (122,880 rows, some
120 MB of spans) the sidecar's checkpoints grew with that group as it filled. ``bench.row_groups`` (600k spans of
~1.2 KB through this schema): the slowest insert 445 ms at the default and 59 ms at 2,048 rows (DuckDB's
smallest), RSS's largest rise during one 179 and 35 MB, all the inserts 11.0 and 6.0 s; scans as fast. The cost is
compression across fewer rows: that bench's file (200 distinct texts) grew 69 -> 218 MB, a scratch run with more
varied text 249 -> 266 MB. DuckDB keeps no row group size in the file (a connection opened without it merges
small groups back at its next checkpoint), so every connection that writes the file comes from :func:`connect`.

DuckDB keeps what it has loaded of an attached file until it is detached: each row group's metadata (~80 KB at
any size, so ~40 bytes a span at 2,048 rows), and the parts of the ART indexes that writes touched. A sidecar's
memory would grow with its store, so the writer detaches the file and attaches it again now and then
(:func:`detach`, :func:`attach`; ``store.writer.REATTACH_ROWS``), which loads back only what is used next.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import duckdb

ROW_GROUP_SIZE = 2048
CATALOG = "store"  # the file's name inside the connection (ATTACH ... AS store)

Setting = str | bool | int | float | list[str]  # a value of DuckDB's configuration
Config = Mapping[str, Setting]


def connect(
    path: Path, config: Config | None = None, *, row_group_size: int = ROW_GROUP_SIZE
) -> duckdb.DuckDBPyConnection:
    """A connection whose default catalog is the file at ``path`` (created if missing); raises
    :class:`duckdb.IOException` if another process holds it. (``row_group_size`` is for ``bench.row_groups``.)"""
    # Spills go beside the file, as they would for duckdb.connect(path), not into the working directory.
    con = duckdb.connect(":memory:", config={"temp_directory": f"{path}.tmp", **(config or {})})
    try:
        attach(con, path, row_group_size=row_group_size)
    except BaseException:
        con.close()
        raise
    return con


def attach(con: duckdb.DuckDBPyConnection, path: Path, *, row_group_size: int = ROW_GROUP_SIZE) -> None:
    """Attach the file as the default catalog of ``con`` (and by name of every cursor of its connection)."""
    literal = str(path).replace("'", "''")
    con.execute(f"ATTACH '{literal}' AS {CATALOG} (ROW_GROUP_SIZE {row_group_size})")
    con.execute(f"USE {CATALOG}")


def detach(con: duckdb.DuckDBPyConnection) -> None:
    """Detach the file (DuckDB checkpoints it first), freeing all it had loaded; no cursor may be reading it."""
    con.execute("USE memory")
    con.execute(f"DETACH {CATALOG}")


def cursor(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """A cursor of a :func:`connect` connection (for another thread): a cursor starts in the in-memory catalog."""
    cur = con.cursor()
    cur.execute(f"USE {CATALOG}")
    return cur

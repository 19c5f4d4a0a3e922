"""``lightwire store reimport``: write the rows the store refused (``<db>.rejected.jsonl``) into it.

Run it with the sidecar stopped (DuckDB lets one process hold the file), after whatever refused the rows is
fixed: an upgrade whose schema takes them (such as the spans earlier versions refused for a
``max_tokens`` over INTEGER, written as positional lists), or the rows edited by hand. Rows written leave the
file; rows still refused stay, with the new reason.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from store import database, rows
from store.adapters import Adapter
from store.feedback import Feedback, SessionEnd
from store.migrations import migrate
from store.runs import Run
from store.spans import Span
from store.writer import Record, columns_of

KINDS: tuple[type[Record], ...] = (Span, Feedback, SessionEnd, Adapter, Run)


@dataclass
class Report:
    path: Path
    written: dict[str, int] = field(default_factory=dict)  # rows per table written (or there already)
    refused: int = 0  # rows refused again
    unreadable: int = 0  # lines that are no row of a known table

    def summary(self) -> str:
        if not self.written and not self.refused and not self.unreadable:
            return f"{self.path}: nothing to import"
        tables = ", ".join(f"{n} {table}" for table, n in self.written.items()) or "no rows"
        kept = self.refused + self.unreadable
        tail = f"; {kept} lines kept in {self.path} ({self.refused} refused again)" if kept else ""
        return f"imported {tables}{tail}"


def reimport(db: Path) -> Report:
    """Write the refused rows of ``db`` into it; raise :class:`duckdb.IOException` if another process holds it."""
    path = db.with_suffix(rows.REJECTED_SUFFIX)
    report = Report(path)
    if not path.exists():
        return report
    con = database.connect(db)
    try:
        migrate(con)
        tables = {
            kind.table: rows.Table.read(con, kind.table, columns_of(kind), replace=getattr(kind, "replace", False))
            for kind in KINDS
        }
        by_table: dict[str, list[tuple[object, ...]]] = {}
        kept: list[str] = []
        for table, row, line in rows.read(path, tables):
            if table is None or row is None:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                by_table.setdefault(table, []).append(row)
        refused = rows.write(con, tables, by_table)
    finally:
        con.close()
    report.unreadable = len(kept)
    report.refused = len(refused)
    for table, table_rows in by_table.items():
        n = len(table_rows) - sum(1 for r in refused if r.table == table)
        if n:
            report.written[table] = n
    kept += [json.dumps(rows.refusal_line(r), default=rows.plain) + "\n" for r in refused]
    if kept:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    else:
        path.unlink()
    return report

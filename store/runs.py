"""Rows of the ``runs`` table: one per optimizer run, rewritten whole as it goes."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any, ClassVar

import duckdb
import orjson

from store.writer import Row

JSON_FIELDS = ("data", "hyperparameters", "training", "evaluation")


@dataclass(slots=True, frozen=True)
class Run(Row):
    table: ClassVar[str] = "runs"
    replace: ClassVar[bool] = True

    run_id: str
    status: str
    algorithm: str
    parent: str | None
    candidate: str | None
    data: str | None
    hyperparameters: str | None
    training: str | None
    evaluation: str | None
    reason: str | None
    started_at: datetime
    ended_at: datetime | None

    def update(self, **changes: Any) -> Run:
        """A copy with ``changes``; dict values of the JSON columns are serialized, a final status ends it."""
        for key in JSON_FIELDS:
            if key in changes and changes[key] is not None and not isinstance(changes[key], str):
                changes[key] = orjson.dumps(changes[key]).decode()
        if changes.get("status", "running") != "running":
            changes.setdefault("ended_at", datetime.now(UTC))
        return replace(self, **changes)

    def public(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in JSON_FIELDS:
            out[key] = orjson.loads(out[key]) if out[key] else None
        for key in ("started_at", "ended_at"):
            out[key] = out[key].isoformat() if out[key] else None
        return out


def load_all(con: duckdb.DuckDBPyConnection) -> list[Run]:
    names = [f.name for f in fields(Run)]
    rows = con.execute(f"SELECT {', '.join(names)} FROM runs ORDER BY started_at").fetchall()
    return [Run(**dict(zip(names, row, strict=True))) for row in rows]

"""The adapter registry: one row per version in the ``adapters`` table, rewritten whole on every change."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

import duckdb
import orjson

from store.writer import Row

if TYPE_CHECKING:
    from store.memory import MemoryBank

STATUSES = ("candidate", "canary", "active", "retired", "failed")


@dataclass(slots=True, frozen=True)
class Adapter(Row):
    table: ClassVar[str] = "adapters"
    replace: ClassVar[bool] = True

    version: str
    path: str
    merged_path: str | None
    parent: str | None
    algorithm: str | None
    data: str | None  # JSON
    status: str
    served_name: str | None
    metrics: str | None  # JSON
    message: str | None
    created_at: datetime
    updated_at: datetime

    def with_status(self, status: str, message: str | None = None, **changes: Any) -> Adapter:
        assert status in STATUSES, status
        return replace(self, status=status, message=message, updated_at=datetime.now(UTC), **changes)

    def public(self) -> dict[str, Any]:
        return public(self)


def public(row: Adapter | MemoryBank) -> dict[str, Any]:
    """A registry row as the admin API shows it: its JSON columns parsed, its times in ISO 8601."""
    out = {f.name: getattr(row, f.name) for f in fields(row)}
    for key in ("data", "metrics"):
        out[key] = orjson.loads(out[key]) if out[key] else None
    for key in ("created_at", "updated_at"):
        out[key] = out[key].isoformat()
    return out


def new_adapter(
    version: str,
    path: str,
    *,
    lora_name: str,
    parent: str | None,
    algorithm: str | None,
    data: dict[str, Any] | None = None,
) -> Adapter:
    now = datetime.now(UTC)
    return Adapter(
        version=version,
        path=path,
        merged_path=None,
        parent=parent,
        algorithm=algorithm,
        data=orjson.dumps(data).decode() if data is not None else None,
        status="candidate",
        served_name=lora_name,
        metrics=None,
        message=None,
        created_at=now,
        updated_at=now,
    )


def load_all(con: duckdb.DuckDBPyConnection) -> list[Adapter]:
    names = [f.name for f in fields(Adapter)]
    rows = con.execute(f"SELECT {', '.join(names)} FROM adapters ORDER BY created_at").fetchall()
    return [Adapter(**dict(zip(names, row, strict=True))) for row in rows]

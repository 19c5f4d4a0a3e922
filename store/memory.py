"""The memory-bank registry: one row per bank version in the ``memory_banks`` table, rewritten whole on every
change (as :mod:`store.adapters` does for adapters). The bank itself is a JSONL file, one :class:`Trajectory` a
line: an optimizer run (:mod:`optimizers.memory`) selects them, the proxy (:mod:`proxy.memory`) serves them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import duckdb
import orjson

from store.adapters import STATUSES, public
from store.writer import Row


@dataclass(frozen=True, slots=True)
class Trajectory:
    """The conversation of one rewarded session as its last turn saw it, without system messages, ending with the
    rewarded answer."""

    id: str  # the span id of the session's last turn
    model: str  # the model the client asked for
    reward: float
    messages: tuple[dict[str, Any], ...]

    def line(self) -> bytes:
        return orjson.dumps({"id": self.id, "model": self.model, "reward": self.reward, "messages": self.messages})

    @classmethod
    def parse(cls, line: bytes) -> Trajectory:
        record = orjson.loads(line)
        return cls(record["id"], record["model"], float(record["reward"]), tuple(record["messages"]))


def write_bank(path: Path, trajectories: Iterable[Trajectory]) -> None:
    """Write a bank's file whole, or not at all (a half-written one never takes its name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    with open(staging, "wb") as out:
        for trajectory in trajectories:
            out.write(trajectory.line() + b"\n")
    staging.replace(path)


def read_bank(path: Path) -> list[Trajectory]:
    with open(path, "rb") as lines:
        return [Trajectory.parse(line) for line in lines if line.strip()]


@dataclass(slots=True, frozen=True)
class MemoryBank(Row):
    table: ClassVar[str] = "memory_banks"
    replace: ClassVar[bool] = True

    version: str
    path: str
    parent: str | None
    data: str | None  # JSON
    status: str
    metrics: str | None  # JSON
    message: str | None
    created_at: datetime
    updated_at: datetime

    def with_status(self, status: str, message: str | None = None, **changes: Any) -> MemoryBank:
        assert status in STATUSES, status
        return replace(self, status=status, message=message, updated_at=datetime.now(UTC), **changes)

    def public(self) -> dict[str, Any]:
        return public(self)


def new_bank(version: str, path: str, *, parent: str | None, data: dict[str, Any]) -> MemoryBank:
    now = datetime.now(UTC)
    return MemoryBank(
        version=version,
        path=path,
        parent=parent,
        data=orjson.dumps(data).decode(),
        status="candidate",
        metrics=None,
        message=None,
        created_at=now,
        updated_at=now,
    )


def load_all(con: duckdb.DuckDBPyConnection) -> list[MemoryBank]:
    names = [f.name for f in fields(MemoryBank)]
    rows = con.execute(f"SELECT {', '.join(names)} FROM memory_banks ORDER BY created_at").fetchall()
    return [MemoryBank(**dict(zip(names, row, strict=True))) for row in rows]

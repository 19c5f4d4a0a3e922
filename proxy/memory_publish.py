"""Publishing memory-bank versions into the request path, and taking them back: what :class:`~proxy.memory.Memory`
serves changes here, as :mod:`proxy.publish` changes what vLLM serves.

A bank is registered as a candidate ``m1``, ``m2``... (its file in ``adapters_dir/memory``), then activated (every
new call on the routes memory is on for), tried as a canary on a fraction of sessions, retired, or rolled back to
the bank active before. A bank is in memory: publishing it loads nothing into a backend, and takes effect with the
next call. The registry is the ``memory_banks`` table (:mod:`store.memory`); at start-up the active bank serves
again as it did before a restart. Memory runs (:mod:`optimizers.memory`) are handed a :class:`BankPublisher`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from optimizers.loop import read_store
from proxy.errors import InvalidRequest, NotFound
from proxy.memory import Bank, Memory
from store.memory import MemoryBank, Trajectory, new_bank, write_bank
from store.memory import load_all as load_banks
from store.writer import Writer


class BankPublisher:
    """The memory-bank versions of one sidecar (an :class:`optimizers.ports.BankPublishing`)."""

    def __init__(self, memory: Memory, writer: Writer, *, folder: Path) -> None:
        self.memory = memory
        self.writer = writer
        self.folder = folder
        self.banks: dict[str, MemoryBank] = {}
        self._lock = asyncio.Lock()  # registry changes

    async def start(self) -> None:
        """Read the registry and serve the active bank, as it was before a restart."""
        rows = await read_store(self.writer, load_banks)
        self.banks = {row.version: row for row in rows}
        for row in rows:
            if row.status == "active":
                self.memory.active = await asyncio.to_thread(Bank.load, row.version, Path(row.path))
                if row.parent in self.banks:
                    self.memory.history.append(await self._bank(row.parent))

    @property
    def active_version(self) -> str | None:
        return self.memory.label

    async def register(self, trajectories: list[Trajectory], *, data: dict[str, Any]) -> MemoryBank:
        version = f"m{len(self.banks) + 1}"
        path = self.folder / f"{version}.jsonl"
        await asyncio.to_thread(write_bank, path, trajectories)
        return await self._save(new_bank(version, str(path), parent=self.memory.label, data=data))

    async def activate(self, version: str) -> MemoryBank:
        async with self._lock:
            bank = await self._bank(version)
            previous = self.memory.active
            if previous is None or previous.version != version:
                self.memory.history.append(previous)
                if previous is not None:
                    await self._save(self._row(previous.version).with_status("retired", f"replaced by {version}"))
            self.memory.active = bank
            if self.memory.canary is not None and self.memory.canary.version == version:
                self.memory.canary, self.memory.canary_fraction = None, 0.0
            return await self._save(self._row(version).with_status("active"))

    async def start_canary(self, version: str, fraction: float) -> MemoryBank:
        if not 0.0 < fraction <= 1.0:
            raise InvalidRequest("fraction must be a number in (0, 1].", param="fraction")
        async with self._lock:
            self.memory.canary, self.memory.canary_fraction = await self._bank(version), fraction
            return await self._save(self._row(version).with_status("canary"))

    async def rollback(self) -> dict[str, Any]:
        """Stop a running canary, or else return to the bank active before (or to none)."""
        async with self._lock:
            memory = self.memory
            if memory.canary is not None:
                left = memory.canary.version
                memory.canary, memory.canary_fraction = None, 0.0
                await self._save(self._row(left).with_status("retired", "canary rolled back"))
                return {"rolled_back": left, "active": memory.label}
            if memory.active is None or not memory.history:
                raise InvalidRequest("There is no earlier memory bank to roll back to.")
            left = memory.active.version
            memory.active = memory.history.pop()
            await self._save(self._row(left).with_status("retired", "rolled back"))
            if memory.active is not None:
                await self._save(self._row(memory.active.version).with_status("active"))
            return {"rolled_back": left, "active": memory.label}

    async def reject(self, version: str, reason: str) -> None:
        if self.memory.canary is not None and self.memory.canary.version == version:
            self.memory.canary, self.memory.canary_fraction = None, 0.0
        await self._save(self._row(version).with_status("retired", reason))

    async def with_examples(
        self, version: str | None, calls: Sequence[tuple[str, list[dict[str, Any]]]]
    ) -> list[list[dict[str, Any]]]:
        """Each call's (model, messages) messages as they go upstream with bank ``version``'s worked examples (None:
        no bank): what an offline evaluation replays."""
        bank = await self._bank(version) if version is not None else None
        if bank is None:
            return [messages for _, messages in calls]
        return [bank.examples(model, messages, self.memory.examples).messages for model, messages in calls]

    def _row(self, version: str) -> MemoryBank:
        row = self.banks.get(version)
        if row is None:
            raise NotFound(f"No memory bank {version!r}.", param="version")
        return row

    async def _bank(self, version: str) -> Bank:
        for loaded in (self.memory.active, self.memory.canary, *self.memory.history):
            if loaded is not None and loaded.version == version:
                return loaded
        return await asyncio.to_thread(Bank.load, version, Path(self._row(version).path))

    async def _save(self, row: MemoryBank) -> MemoryBank:
        self.banks[row.version] = row
        await self.writer.reserve()
        self.writer.submit(row)
        return row


BANKS = web.AppKey("memory_banks", BankPublisher)

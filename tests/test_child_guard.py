"""A child's whole process group dies with the process that started it, even one killed with SIGKILL; a group
ended on purpose is left alone by its guard."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

# Starts a process group of three (a shell and two sleeps), guards it, prints its id, then waits to be killed.
PARENT = """
import asyncio, sys
from proxy.child_guard import ChildGuard

async def main():
    child = await asyncio.create_subprocess_exec(
        "sh", "-c", "sleep 300 & sleep 300; :", stdout=asyncio.subprocess.DEVNULL, start_new_session=True
    )
    guard = await ChildGuard.start(child.pid)
    if sys.argv[1] == "stand-down":
        await guard.stand_down()
    print(child.pid, flush=True)
    await asyncio.sleep(300)

asyncio.run(main())
"""
ROOT = str(Path(__file__).resolve().parents[1])  # where the child imports proxy from
#: How long the guard may take to notice: it starts an interpreter, which takes well under a second.
GUARD_TIMEOUT_S = 30


def group_members(pgid: int) -> list[int]:
    """The live processes (not zombies) whose process group is ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        state, _ppid, group = stat.rsplit(")", 1)[1].split()[:3]
        if int(group) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


async def wait_until_gone(pgid: int, timeout: float) -> list[int]:
    """Wait until no process of group ``pgid`` is left, up to ``timeout`` seconds; return those left."""
    async with asyncio.timeout(timeout):
        while group_members(pgid):
            await asyncio.sleep(0.1)
    return group_members(pgid)


async def guarded_group(mode: str) -> tuple[asyncio.subprocess.Process, int]:
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PARENT, mode, stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": ROOT}
    )
    assert parent.stdout is not None
    pgid = int(await asyncio.wait_for(parent.stdout.readline(), GUARD_TIMEOUT_S))
    async with asyncio.timeout(GUARD_TIMEOUT_S):  # the shell starts its sleeps a moment after it starts
        while len(group_members(pgid)) < 2:
            await asyncio.sleep(0.05)
    return parent, pgid


async def test_a_sigkilled_parent_takes_the_childs_whole_group_with_it() -> None:
    parent, pgid = await guarded_group("guard")
    parent.kill()
    await parent.wait()
    assert await wait_until_gone(pgid, GUARD_TIMEOUT_S) == []


async def test_a_guard_told_to_stand_down_kills_nothing() -> None:
    parent, pgid = await guarded_group("stand-down")  # stand_down() waited for the guard to exit
    parent.kill()
    await parent.wait()
    try:
        assert len(group_members(pgid)) >= 2
    finally:
        os.killpg(pgid, signal.SIGKILL)

"""A guard that ends a child's whole process group when Lightwire dies, however it dies (SIGKILL included).

vLLM runs in its own process group: its API server, engine core and workers. Were Lightwire killed with SIGKILL,
nothing would stop them, and they would keep the port, gigabytes of memory and the CPU. ``PR_SET_PDEATHSIG``
would not do: it reaches only the API server (its engine and workers outlive it) and fires when the *thread* that
forked the child ends, not the process.

So each child gets a guard: a tiny process in a session of its own (a Ctrl-C meant for Lightwire does not end it
first), blocked reading a pipe whose write end only Lightwire holds. The kernel closes that end when Lightwire
exits in any way; the guard then reads end-of-file and sends SIGKILL to the child's process group. When Lightwire
ends the child itself, it tells the guard to stand down (one byte) before closing the pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

STAND_DOWN = b"s"


class ChildGuard:
    """Kills process group ``pgid`` if this process dies before :meth:`stand_down` is called."""

    def __init__(self, process: asyncio.subprocess.Process, pipe: int) -> None:
        self._process = process
        self._pipe = pipe

    @classmethod
    async def start(cls, pgid: int) -> ChildGuard:
        read_end, write_end = os.pipe()  # not inheritable: no other child of ours holds the write end open
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy.child_guard",
                str(pgid),
                stdin=read_end,
                stdout=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        return cls(process, write_end)

    async def stand_down(self) -> None:
        """The group has been ended on purpose: let the guard exit without killing anything."""
        if self._pipe < 0:
            return
        with contextlib.suppress(OSError):  # the guard is gone already
            os.write(self._pipe, STAND_DOWN)
        os.close(self._pipe)
        self._pipe = -1
        await self._process.wait()


def main() -> None:
    pgid = int(sys.argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.stdin.buffer.read(1) != STAND_DOWN:  # end-of-file: the process that started us is gone
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


if __name__ == "__main__":
    main()

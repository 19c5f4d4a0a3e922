"""What the machine did while a benchmark ran, from Linux's ``/proc``: CPU seconds of everything and of given
processes, so that a report can say how much of the CPU other processes took. On a shared machine the absolute
figures move with that load; ratios measured side by side in one run move much less."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU time spent by everything on this machine (all cores) since boot: all but idle and iowait."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def process_seconds(pid: int, thread: int | None = None) -> float:
    """User and system CPU time of a live process, all its threads, or of one of them (a thread id)."""
    stat = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    fields = Path(stat).read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def rss_mb(pid: int) -> float:
    """Resident memory of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise ValueError(f"no VmRSS for process {pid}")

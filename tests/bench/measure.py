"""What the bench reads from the machine (``/proc``) and how it summarizes samples."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuTime:
    """A process's CPU time, read two ways: ``/proc/<pid>/stat`` (user + system, every
    thread that ever ran, in clock ticks of 10 ms) and the sum of its live threads'
    ``schedstat`` (nanoseconds, but a thread that ended is no longer counted)."""

    ticks_s: float
    sched_s: float

    @classmethod
    def read(cls, pid: int) -> CpuTime:
        raw = Path(f"/proc/{pid}/stat").read_text()
        fields = raw.rsplit(")", 1)[1].split()  # the command name may hold spaces
        ticks = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14, 15 of stat(5)
        sched_ns = 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                sched_ns += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # the thread ended while being read
        return cls(ticks, sched_ns / 1e9)

    def seconds_since(self, earlier: CpuTime) -> float:
        """CPU seconds used since ``earlier``: the fine reading, unless threads that ended
        took more than the coarse reading's granularity with them."""
        return max(self.sched_s - earlier.sched_s, self.ticks_s - earlier.ticks_s)


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size (``VmHWM``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


@dataclass(frozen=True)
class MachineCpu:
    """The whole machine's CPU counters (``/proc/stat``), to tell how busy it was."""

    busy: int
    total: int

    @classmethod
    def read(cls) -> MachineCpu:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
        values = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
        idle = values[3] + values[4]
        return cls(sum(values) - idle, sum(values))

    def busy_cores_since(self, earlier: MachineCpu) -> float:
        """Cores busy on average between ``earlier`` and this reading."""
        total = self.total - earlier.total
        cores = os.cpu_count() or 1
        return round((self.busy - earlier.busy) / total * cores, 2) if total else 0.0


def percentiles(values: list[float]) -> dict[str, float] | None:
    """p50, p99 and max (nearest rank), rounded to 0.1 ms; None without values."""
    if not values:
        return None
    ordered = sorted(values)

    def rank(q: float) -> float:
        return round(nearest_rank(ordered, q), 1)

    return {"p50": rank(0.50), "p99": rank(0.99), "max": round(ordered[-1], 1)}


def nearest_rank(ordered: list[float], q: float) -> float:
    """The q-quantile (0..1) of sorted, non-empty values, by nearest rank."""
    return ordered[max(0, min(len(ordered) - 1, int(q * len(ordered) + 0.5) - 1))]


def machine() -> dict[str, Any]:
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }

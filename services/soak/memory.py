"""Resident memory of the soak's processes over the run: the first, highest and last sample of each
(by name, so a restarted worker continues its line), from /proc. A service whose queues are bounded
keeps a flat line under minutes of load; one that grows with every request shows it here."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


def rss_mib(pid: int) -> float | None:
    """The process's resident set size in MiB (VmRSS), or None if it is gone or unreadable."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # kB
    return None


@dataclass
class _Line:
    first: float
    peak: float
    last: float


class MemoryTrack:
    """Samples every running process of a cluster; `report()` gives first/peak/last MiB by name."""

    def __init__(self) -> None:
        self._lines: dict[str, _Line] = {}

    def sample(self, processes: Mapping[str, subprocess.Popen[bytes]]) -> None:
        for name, process in processes.items():
            if process.poll() is not None:
                continue
            mib = rss_mib(process.pid)
            if mib is None:
                continue
            line = self._lines.get(name)
            if line is None:
                self._lines[name] = _Line(mib, mib, mib)
            else:
                line.peak, line.last = max(line.peak, mib), mib

    def report(self) -> dict[str, dict[str, float]]:
        return {
            name: {"first": round(line.first, 1), "peak": round(line.peak, 1), "last": round(line.last, 1)}
            for name, line in sorted(self._lines.items())
        }

"""CPU use of Baton's processes while a benchmark runs: which one is saturated, and on which thread.

Samples /proc every INTERVAL seconds until killed (or for --duration), and prints one line per sample
and process: the process's CPU in cores, its main thread's (the event loop of every Baton service)
and its busiest other thread's (the engine thread of a worker). A thread that waits for the GIL uses
no CPU, so a main thread well under 1.0 beside a busy engine thread is starved, one at 1.0 saturated.

    python benchmarks/proc_cpu.py [--interval 0.5] [--duration 60] > cpu.log
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
_ROLES = ("gateway", "router", "serve", "bench", "prefill", "decode")


def _cpu_ticks(stat_path: Path) -> int:
    fields = stat_path.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _baton_processes() -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv if a]
        if not any("baton" in w for w in words) or any("proc_cpu" in w for w in words):
            continue
        role = next(
            (w for w in words if w in ("gateway", "router", "serve", "bench", "prefill", "decode")), ""
        )
        for flag in ("--worker-id",):
            if flag in words and words.index(flag) + 1 < len(words):
                role += " " + words[words.index(flag) + 1]
        found[int(entry.name)] = role.strip() or " ".join(words[1:4])
    return found


def _thread_ticks(pid: int) -> dict[int, int]:
    ticks = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            ticks[int(task.name)] = _cpu_ticks(task / "stat")
        except (OSError, ValueError, IndexError):
            continue
    return ticks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--duration", type=float, default=3600.0)
    args = parser.parse_args()
    before: dict[int, dict[int, int]] = {}
    start = time.monotonic()
    while time.monotonic() - start < args.duration:
        now: dict[int, dict[int, int]] = {}
        for pid, role in _baton_processes().items():
            try:
                now[pid] = _thread_ticks(pid)
            except OSError:
                continue
            if pid not in before:
                continue
            delta = {
                tid: (t - before[pid].get(tid, 0)) / _TICK / args.interval for tid, t in now[pid].items()
            }
            main_thread = delta.get(pid, 0.0)
            others = sorted((v for tid, v in delta.items() if tid != pid), reverse=True)
            total = sum(delta.values())
            if total >= 0.05:
                print(
                    f"{time.monotonic() - start:7.1f}s {role:<24} cores {total:5.2f}  "
                    f"main {main_thread:4.2f}  busiest other {others[0] if others else 0.0:4.2f}",
                    flush=True,
                )
        before = now
        time.sleep(args.interval)


if __name__ == "__main__":
    main()

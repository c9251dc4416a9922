"""Where a served burst's requests spend their time: reads the log of `baton serve --log-requests`
(e.g. `SERVE_ARGS=--log-requests bash benchmarks/serve_anchor.sh OUT --served-only`, then
OUT/serve.log) and prints, per burst (bursts are split at the longest pause between arrivals), when
each stage was reached, in ms from the burst's first arrival at the gateway (p10 / p50 / p90 / max),
and the prefill worker's per-push timings.

    python3 benchmarks/request_timeline.py serve.log
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import re
from pathlib import Path

LINE = re.compile(
    r"^\S+\s*\| (?P<ts>\S+ \S+) INFO baton\.requests\.(?P<logger>\S+): "
    r"request (?P<rid>[0-9a-f]+)(?:~\d+)?:? ?(?:attempt \d+: )?(?P<msg>.*)"
)
STAGES = ("gateway", "router", "placed", "reserved", "kv_complete", "prefilled", "ended")


def stage_of(logger: str, msg: str) -> str | None:
    """The lifecycle stage a request log line marks (None: a line this tool does not use)."""
    if logger == "gateway.context":
        return "gateway"
    if logger == "router.service" and "max_tokens" in msg:
        return "router"
    if logger == "router.disaggregated":
        return "placed"
    if "blocks reserved" in msg:
        return "reserved"
    if "complete (handoff" in msg:
        return "kv_complete"
    if "prefilled" in msg:
        return "prefilled"
    if msg.startswith("ended"):
        return "ended"
    return None


def read(path: Path) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Each request's first time at each stage (epoch seconds), and its prefill line."""
    times: dict[str, dict[str, float]] = {}
    prefill_lines: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = LINE.match(line)
        if match is None:
            continue
        stage = stage_of(match["logger"], match["msg"])
        if stage is None:
            continue
        at = datetime.datetime.strptime(match["ts"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        times.setdefault(match["rid"], {}).setdefault(stage, at)
        if stage == "prefilled":
            prefill_lines[match["rid"]] = match["msg"]
    return times, prefill_lines


def bursts(times: dict[str, dict[str, float]]) -> list[list[str]]:
    """Request ids split into bursts at the longest pauses between gateway arrivals (one per pass)."""
    ids = sorted((r for r in times if "gateway" in times[r]), key=lambda r: times[r]["gateway"])
    arrivals = [times[r]["gateway"] for r in ids]
    cuts = [i + 1 for i, (a, b) in enumerate(itertools.pairwise(arrivals)) if b - a > 1.0]
    edges = [0, *cuts, len(ids)]
    return [ids[a:b] for a, b in itertools.pairwise(edges)]


def quantiles(values: list[float]) -> str:
    values = sorted(values)
    at = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return f"p10 {at(0.1):7.0f}  p50 {at(0.5):7.0f}  p90 {at(0.9):7.0f}  max {values[-1]:7.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", type=Path)
    args = parser.parse_args()
    times, prefill_lines = read(args.log)
    for index, ids in enumerate(bursts(times), 1):
        start = min(times[r]["gateway"] for r in ids)
        print(f"burst {index}: {len(ids)} requests (ms from the first arrival)")
        for stage in STAGES:
            reached = [(times[r][stage] - start) * 1000 for r in ids if stage in times[r]]
            if reached:
                print(f"  {stage:12s} {quantiles(reached)}")
        fields: dict[str, list[float]] = {}
        for rid in ids:
            line = prefill_lines.get(rid, "")
            for key, value in re.findall(r"(\w+_ms) (\d+)", line):
                fields.setdefault(key, []).append(float(value))
        for key, values in fields.items():
            print(f"  push {key:18s} {quantiles(values)}")


if __name__ == "__main__":
    main()

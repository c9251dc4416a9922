"""Where an engine's step time goes, per kind of step: how long the host took to queue each step
(schedule, inputs, kernel launches), how long it then waited for the device's tokens, and how long it
took to take them in (scheduler update, outputs). A step whose launch takes longer than its wait is
host-bound: the device idled while it was queued. The launch's CPU time (the launching thread's own)
tells work from waiting: a launch whose CPU time is well below its wall time waited (for the GIL, or
for a synchronization), one whose CPU time matches it worked or spun (a full launch queue spins)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from baton.shared.engine.scheduler import SchedulerOutput


@dataclass
class StepKindTotals:
    """Totals over the steps of one kind."""

    steps: int = 0
    tokens: int = 0
    launch_s: float = 0.0
    launch_cpu_s: float = 0.0
    wait_s: float = 0.0
    finish_s: float = 0.0
    continued: int = 0
    """Steps queued before their predecessor's tokens were read (async scheduling)."""

    def per_step(self) -> dict[str, float]:
        """Means per step: tokens, and milliseconds of launch, wait and finish."""
        n = max(self.steps, 1)
        return {
            "steps": self.steps,
            "continued": self.continued,
            "tokens": self.tokens / n,
            "launch_ms": 1e3 * self.launch_s / n,
            "launch_cpu_ms": 1e3 * self.launch_cpu_s / n,
            "wait_ms": 1e3 * self.wait_s / n,
            "finish_ms": 1e3 * self.finish_s / n,
        }


@dataclass
class StepStats:
    """Per-kind totals: `prefill` steps compute prompt tokens (decodes may ride along), `decode` steps
    compute one token per request."""

    prefill: StepKindTotals = field(default_factory=StepKindTotals)
    decode: StepKindTotals = field(default_factory=StepKindTotals)

    def launched(
        self, sched: SchedulerOutput, seconds: float, cpu_seconds: float, continued: bool = False
    ) -> StepKindTotals:
        """Count a step that took `seconds` to launch (`cpu_seconds` of the launching thread's CPU),
        `continued` if queued before its predecessor's tokens were read; returns the totals it counts
        in, for its wait and finish times."""
        num_tokens = sched.num_tokens
        totals = self.prefill if num_tokens > len(sched.chunks) else self.decode
        totals.steps += 1
        totals.continued += continued
        totals.tokens += num_tokens
        totals.launch_s += seconds
        totals.launch_cpu_s += cpu_seconds
        return totals

    def reset(self) -> None:
        self.prefill, self.decode = StepKindTotals(), StepKindTotals()

    def as_dict(self) -> dict[str, Any]:
        """Totals and per-step means of each kind."""
        return {
            kind: asdict(totals) | {"per_step": totals.per_step()}
            for kind, totals in (("prefill", self.prefill), ("decode", self.decode))
        }

    def summary(self) -> str:
        """One line: each kind's steps and their mean tokens, launch, wait and finish times."""
        return ", ".join(
            describe_steps(kind, totals.per_step())
            for kind, totals in (("prefill", self.prefill), ("decode", self.decode))
        )


def describe_steps(kind: str, per_step: dict[str, float]) -> str:
    """`per_step` (StepKindTotals.per_step) in words."""
    continued = f", {per_step['continued']:.0f} continued" if per_step.get("continued") else ""
    return (
        f"{per_step['steps']:.0f} {kind} steps{continued} (mean {per_step['tokens']:.0f} tokens, "
        f"launch {per_step['launch_ms']:.2f} ms ({per_step['launch_cpu_ms']:.2f} ms CPU), "
        f"wait {per_step['wait_ms']:.2f} ms, "
        f"finish {per_step['finish_ms']:.2f} ms)"
    )

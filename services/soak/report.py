"""The soak's tally of request outcomes, its progress line and its final JSON report."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from baton.services.registry_check import IdleResult
from baton.services.soak.outcome import Outcome
from baton.services.soak.workload import SoakRequest

MAX_LOST_EXAMPLES = 20
MAX_BODY_TAIL_BYTES = 300


@dataclass(frozen=True)
class Restart:
    """One worker killed (SIGKILL) and started again."""

    worker: str
    killed_at_s: float
    """Seconds into the load."""
    serving_after_s: float | None
    """Seconds from the kill until it had registered and served again; None if it did not."""
    error: str | None = None


@dataclass
class Tally:
    """Every request's outcome, counted as they end."""

    sent: int = 0
    in_flight: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    """Failed requests, by their error (status, type and message)."""
    lost_examples: list[dict[str, Any]] = field(default_factory=list)

    def started(self, request: SoakRequest) -> None:
        self.sent += 1
        self.in_flight += 1
        self.by_kind[request.kind] += 1

    def ended(self, request: SoakRequest, outcome: Outcome, body: bytes) -> None:
        self.in_flight -= 1
        self.outcomes[outcome.kind] += 1
        if outcome.kind == "failed":
            self.errors[outcome.detail] += 1
        elif outcome.kind == "lost" and len(self.lost_examples) < MAX_LOST_EXAMPLES:
            self.lost_examples.append(
                {
                    "detail": outcome.detail,
                    "path": request.path,
                    "body": request.body,
                    "cancel": repr(request.cancel),
                    "response_tail": body[-MAX_BODY_TAIL_BYTES:].decode(errors="replace"),
                }
            )

    def progress_line(self, elapsed_s: float, duration_s: float) -> str:
        o = self.outcomes
        return (
            f"soak {elapsed_s:5.0f}/{duration_s:g} s: sent {self.sent}, completed {o['completed']}, "
            f"cancelled {o['cancelled']}, failed {o['failed']}, lost {o['lost']}, in flight {self.in_flight}"
        )


def build_report(
    tally: Tally,
    restarts: list[Restart],
    idle: IdleResult,
    unexpected_exits: dict[str, int],
    durations_s: dict[str, float],
    config: dict[str, Any],
    memory_rss_mib: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """The JSON report (`memory_rss_mib`: each process's first, peak and last resident MiB); `ok` is
    what the exit status says: nothing lost, nothing leaked, the audit
    clean, every restart served again, no other process died, and some requests completed."""
    o = tally.outcomes
    report: dict[str, Any] = {
        "sent": tally.sent,
        "completed": o["completed"],
        "cancelled": o["cancelled"],
        "failed_with_clear_error": {"total": o["failed"], "by_error": dict(tally.errors.most_common())},
        "lost": o["lost"],
        "leaked_blocks": idle.leaked_blocks,
        "held_blocks_by_worker": idle.held_blocks,
        "registry_audit": {"clean": not idle.problems, "problems": idle.problems},
        "worker_restarts": [_rounded(vars(r)) for r in restarts],
        "unexpected_exits": unexpected_exits,
        "sent_by_kind": dict(sorted(tally.by_kind.items())),
        "durations_s": {k: round(v, 1) for k, v in durations_s.items()},
        "memory_rss_mib": memory_rss_mib or {},
        "config": config,
        "lost_examples": tally.lost_examples,
    }
    report["ok"] = not failures(report)
    return report


def failures(report: dict[str, Any]) -> list[str]:
    """Why the soak failed; [] when it passed."""
    why = []
    if report["lost"]:
        why.append(f"{report['lost']} requests lost")
    if report["leaked_blocks"]:
        why.append(f"{report['leaked_blocks']} blocks leaked")
    if not report["registry_audit"]["clean"]:
        why.append("the registry audit is not clean")
    if not report["worker_restarts"] or any(r["serving_after_s"] is None for r in report["worker_restarts"]):
        why.append("a worker restart did not happen or did not serve again")
    if report["unexpected_exits"]:
        why.append(f"processes exited unexpectedly: {report['unexpected_exits']}")
    if not report["completed"]:
        why.append("no request completed")
    return why


def _rounded(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in fields.items()}

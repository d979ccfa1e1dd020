"""What an episode and a campaign report, and the exit code (no I/O)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

#: The L0 event loop may need a moment to wake up after the ack timeout fired: a tlbsync wait
#: counts as over its bound only past ack_timeout + this.
WAIT_GRACE_S = 0.5
#: Error texts that do not say what happened: grpc's client sets "Internal error from Core"
#: when a write fails on a call the server already ended, hiding the server's status.
OPAQUE_ERRORS = ("Internal error from Core",)


def is_clear(detail: str) -> bool:
    """An error line that says what happened (not empty, not one of grpc's opaque statuses)."""
    return bool(detail.strip()) and not any(o in detail for o in OPAQUE_ERRORS)


@dataclass
class Config:
    accesses: int = 3000  # per vCPU of the episode's workloads
    vcpus: int = 2
    probe_accesses: int = 500
    ack_timeout: float = 2.0  # L0's --ack-timeout: the documented tlbsync bound
    recover_timeout: float = 45.0
    settle_timeout: float = 10.0
    workload_timeout: float = 120.0


@dataclass
class EpisodeReport:
    index: int
    fault: str
    target: str
    onset_s: float
    hold_s: float
    seed: int
    netem: str = ""
    recovered_s: float = -1.0
    audit_during: str = "not taken"
    violations_during_fault: list[str] = field(default_factory=list)
    audit: str = "not taken"
    violations: list[str] = field(default_factory=list)
    inconclusive: bool = False
    leaks: list[str] = field(default_factory=list)
    l0_longest_wait_ms: float = 0.0
    workloads: int = 0
    accesses: int = 0
    accesses_not_run: int = 0
    vcpu_failures: int = 0
    access_errors: int = 0
    error_details: list[str] = field(default_factory=list)
    unclear_errors: list[str] = field(default_factory=list)
    rpc_errors: list[str] = field(default_factory=list)
    churn: dict[str, int] = field(default_factory=dict)
    lost_writes: int = 0
    probe: str = "not run"
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def survived(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["survived"] = self.survived
        return d


def summary(reports: list[EpisodeReport], planned: int, cfg: Config, seed: int, mode: str, log_hint: str, seconds: float, longest_ms: float) -> dict[str, Any]:
    """The campaign's JSON object."""
    kinds = Counter(r.fault for r in reports)
    return {
        "mode": mode,
        "seed": seed,
        "episodes": planned,
        "episodes_run": len(reports),
        "episodes_survived": sum(r.survived for r in reports),
        "faults_by_kind": dict(sorted(kinds.items())),
        "survived_by_kind": {k: sum(r.survived for r in reports if r.fault == k) for k in sorted(kinds)},
        "violations": sum(len(r.violations) for r in reports if not r.inconclusive),
        "violations_during_fault": sum(len(r.violations_during_fault) for r in reports),
        "inconclusive_audits": sum(r.inconclusive for r in reports),
        "leaks": sum(len(r.leaks) for r in reports),
        "lost_writes": sum(r.lost_writes for r in reports),
        "data_mode": "on",
        "longest_invalidation_wait_ms": round(longest_ms, 3),
        "invalidation_wait_bound_ms": round((cfg.ack_timeout + WAIT_GRACE_S) * 1000, 3),
        "ack_timeout_s": cfg.ack_timeout,
        "vcpu_failures": sum(r.vcpu_failures for r in reports),
        "access_errors": sum(r.access_errors for r in reports),
        "workload_rpc_errors": sum(len(r.rpc_errors) for r in reports),
        "unclear_errors": sum(len(r.unclear_errors) for r in reports),
        "workloads": sum(r.workloads for r in reports),
        "accesses": sum(r.accesses for r in reports),
        "accesses_not_run": sum(r.accesses_not_run for r in reports),
        "longest_recovery_s": max((r.recovered_s for r in reports), default=0.0),
        "failures": [f"episode {r.index} ({r.fault} {r.target}): {f}" for r in reports for f in r.failures],
        "seconds": round(seconds, 3),
        "logs": log_hint,
        "episode_reports": [r.to_dict() for r in reports],
    }


def progress_line(r: EpisodeReport, total: int) -> str:
    what = f"{r.fault} {r.target}" + (f" ({r.netem})" if r.netem else "")
    errs = f"{r.vcpu_failures} vCPU failures, {r.access_errors} access errors, {len(r.rpc_errors)} workload RPC errors"
    verdict = "ok" if r.survived else "FAILED: " + "; ".join(r.failures)
    return (
        f"[chaos] episode {r.index}/{total} {what} held {r.hold_s:.1f}s: recovered in {r.recovered_s:.1f}s, "
        f"audit {r.audit} (during: {r.audit_during}), leaks {len(r.leaks)}, L0 longest wait {r.l0_longest_wait_ms:.0f} ms, {errs} -> {verdict}"
    )


def exit_code(rep: dict[str, Any]) -> int:
    """0 all survived; 1 failures (violations, leaks, lost writes, waits past the bound, ...);
    4 no failure but an audit after a heal was inconclusive."""
    if rep["failures"] or rep["episodes_run"] < rep["episodes"]:
        return 1
    if rep["inconclusive_audits"]:
        return 4
    return 0

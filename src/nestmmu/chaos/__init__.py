"""``nestmmu chaos``: a seeded fault-injection campaign against a running cluster.

Each episode creates one guest per L1, runs a workload on it through L2 while L1 tree changes
and host migrations churn (:func:`nestmmu.cluster.churn`), injects one fault while they run,
holds it, heals it, waits until the cluster is healthy again and then checks what must hold
after any fault the real system survives:

* **recovery**: every service healthy, every L1 registered with L0 again and connected;
* **service**: a new workload succeeds (zero errors) on every L1, on the episode's guest if
  it survived the fault, else on a fresh one;
* **audit**: clean after the heal (an audit taken *while* the fault lasts may be
  inconclusive; its violations fail the episode only where the audit can say inconclusive);
* **no leaks**: after the episode's guests are destroyed and the vCPUs gone: L0 has one
  session per L1, no run stream, no LPID not accounted for by an L1 or a registered nested
  guest, no nested guest (shadow tree) for a guest its L1 no longer has;
* **bounded invalidation**: no tlbsync wait longer than the ack timeout (plus a small grace
  for L0's event loop to wake up);
* **clear errors**: every L2 access ran or is counted in ``accesses_not_run`` and every
  failed vCPU has a line in ``error_details``; a RunWorkload that failed as a whole (its L2
  was killed) failed with a gRPC status and a message.

The fault schedule is a pure function of the seed (:func:`schedule`), so a campaign is
reproducible up to the timing of the machine. What "survive" means for each fault is in
docs/design-notes.md ("Fault injection").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc

from .checks import rpc_error, wait_recovered
from .episode import run_episode
from .report import OPAQUE_ERRORS, WAIT_GRACE_S, Config, EpisodeReport, exit_code, is_clear, progress_line, summary
from .schedule import COMPOSE_FAULTS, LOCAL_FAULTS, Episode, schedule
from .targets import COMPOSE_PORTS, ComposeTargets, LocalTargets, Targets


async def run_campaign(t: Targets, episodes: list[Episode], cfg: Config, seed: int, progress: Callable[[EpisodeReport], None] | None = None) -> dict[str, Any]:
    """Run the episodes in order; stop early only if the cluster did not recover."""
    t0 = time.monotonic()
    state = {"longest_ms": 0.0}
    reports: list[EpisodeReport] = []
    try:
        for ep in episodes:
            try:
                r = await run_episode(t, ep, cfg, state)
            except (grpc.aio.AioRpcError, TimeoutError, RuntimeError) as e:
                # A step the episode needs failed outright (not the fault's own effects): a
                # failure of the episode; go on if the cluster is still (or again) usable.
                r = EpisodeReport(ep.index, ep.fault, ep.target, ep.onset, ep.hold, ep.seed)
                r.failures.append(f"episode could not complete: {rpc_error(e)}")
                t.cleanup()
                try:
                    await wait_recovered(t, cfg.recover_timeout)
                    r.recovered_s = 0.0
                except (TimeoutError, grpc.aio.AioRpcError) as e2:
                    r.failures.append(f"did not recover: {rpc_error(e2)}")
            reports.append(r)
            if progress is not None:
                progress(r)
            if r.recovered_s < 0:
                break
    finally:
        t.cleanup()
    return summary(reports, len(episodes), cfg, seed, t.mode, t.log_hint, time.monotonic() - t0, state["longest_ms"])


__all__ = [
    "COMPOSE_FAULTS",
    "COMPOSE_PORTS",
    "LOCAL_FAULTS",
    "OPAQUE_ERRORS",
    "WAIT_GRACE_S",
    "ComposeTargets",
    "Config",
    "Episode",
    "EpisodeReport",
    "LocalTargets",
    "Targets",
    "exit_code",
    "is_clear",
    "progress_line",
    "run_campaign",
    "schedule",
    "summary",
]

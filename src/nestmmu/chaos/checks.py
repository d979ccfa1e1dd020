"""The checks after a heal: recovery, leaks, the audit's outcome, the workload reports."""

from __future__ import annotations

import asyncio
import time

import grpc

from nestmmu import cluster
from nestmmu.protos import l0_pb2, l0_pb2_grpc, l1_pb2, l1_pb2_grpc, l2_pb2

from .report import EpisodeReport, is_clear
from .targets import Targets


def rpc_error(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"


def audit_outcome(r: l0_pb2.AuditResponse) -> tuple[str, list[str]]:
    """("clean" | "violations" | "inconclusive: <reasons>", violations)."""
    found = [f"{v.invariant}: {v.detail}" for v in r.violations]
    outcome = cluster.audit_outcome(r)
    if outcome == "INCONCLUSIVE":
        return "inconclusive: " + "; ".join(r.inconclusive_reasons), found
    return ("violations" if outcome == "VIOLATIONS" else "clean"), found


async def l0_stats(addr: str) -> l0_pb2.GetStatsResponse:
    async with cluster.insecure_channel(addr) as ch:
        return await l0_pb2_grpc.L0ServiceStub(ch).GetStats(l0_pb2.GetStatsRequest(), timeout=10)


async def l1_guests(addr: str) -> list[int]:
    async with cluster.insecure_channel(addr) as ch:
        r = await l1_pb2_grpc.L1ServiceStub(ch).ListGuests(l1_pb2.ListGuestsRequest(), timeout=10)
    return [g.lpid for g in r.guests]


def account(rep: EpisodeReport, r: l2_pb2.WorkloadReport, expected: int) -> None:
    """Fold one workload report into the episode: accesses ran or not-run with a reason."""
    extra = dict(r.extra)
    failed = extra.get("vcpu_failures", 0)
    not_run = extra.get("accesses_not_run", 0)
    rep.accesses += r.accesses
    rep.accesses_not_run += not_run
    rep.vcpu_failures += failed
    rep.access_errors += max(0, r.errors - failed)
    rep.error_details += list(r.error_details)
    rep.lost_writes += r.lost_writes + r.misplaced_writes
    if r.accesses + not_run != expected:
        rep.failures.append(f"lpid {r.lpid}: {r.accesses} accesses ran + {not_run} not run != {expected} requested")
    if failed > len(r.error_details):
        rep.failures.append(f"lpid {r.lpid}: {failed} vCPU failures but only {len(r.error_details)} error_details")
    rep.unclear_errors += [d for d in r.error_details if not is_clear(d)]
    # Accesses answered ACCESS_OUTCOME_ERROR: L0 sends each one's reason (error_reasons), and
    # the L2 reports them as "... ended in ERROR: <reason>" lines.
    if r.errors > failed and not any("ended in ERROR: " in d for d in r.error_details):
        rep.unclear_errors.append(f"lpid {r.lpid}: {r.errors - failed} accesses ended in ERROR with no reason")


async def wait_recovered(t: Targets, timeout: float) -> None:
    """Every service healthy, every L1 registered with L0 and connected to it."""
    deadline = time.monotonic() + timeout
    t.refresh()
    await cluster.wait_healthy([t.l0, *t.l1s.values(), t.l2], timeout)
    missing: list[str] = []
    while True:
        missing = []
        try:
            names = {s.name for s in (await l0_stats(t.l0)).l1_summaries}
            missing = [f"{n} not registered with L0" for n in t.l1s if n not in names]
            for n, a in t.l1s.items():
                async with cluster.insecure_channel(a) as ch:
                    st = await l1_pb2_grpc.L1ServiceStub(ch).GetStats(l1_pb2.GetStatsRequest(), timeout=5)
                if not st.counters.values.get("connected", 0):
                    missing.append(f"{n} has no L0 session")
        except grpc.aio.AioRpcError as e:
            missing.append(rpc_error(e))
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"not recovered after {timeout}s: {'; '.join(missing)}")
        await asyncio.sleep(0.1)


async def check_leaks(t: Targets, gone: dict[str, list[int]]) -> list[str]:
    """What L0 still holds that nothing accounts for (empty: no leak).

    ``gone``: per L1, lpids of guests destroyed in this episode (their shadow trees must be
    gone)."""
    st = await l0_stats(t.l0)
    c = dict(st.counters.values)
    leaks = []
    if c.get("svc.l1_sessions", 0) != len(t.l1s):
        leaks.append(f"L0 has {c.get('svc.l1_sessions', 0)} L1 sessions for {len(t.l1s)} live L1s")
    if c.get("svc.run_streams", 0):
        leaks.append(f"{c['svc.run_streams']} run streams open with no workload running")
    nested = sum(s.nested_guests for s in st.l1_summaries)
    # Every LPID is an L1's or a registered nested guest's. (A run token holds a reference on a
    # guest, but L0 drops the tokens of a guest its L1 destroys, so a token pins no LPID.)
    unaccounted = c.get("svc.lpids_in_use", 0) - len(st.l1_summaries) - nested
    if unaccounted:
        leaks.append(
            f"{c.get('svc.lpids_in_use', 0)} LPIDs in use for {len(st.l1_summaries)} L1s, {nested} registered nested guests"
            f" and {c.get('svc.run_tokens', 0)} unused run tokens"
        )
    for s in st.l1_summaries:
        if s.run_streams:
            leaks.append(f"{s.name}: {s.run_streams} run streams")
        addr = t.l1s.get(s.name)
        if addr is None:
            leaks.append(f"L0 holds a session for {s.name!r}, which is not one of the cluster's L1s")
            continue
        have = await l1_guests(addr)
        if s.nested_guests > len(have):
            leaks.append(f"{s.name}: L0 has {s.nested_guests} nested guests, the L1 has {len(have)} guests")
        if not have and s.shadow_leaves:
            leaks.append(f"{s.name}: {s.shadow_leaves} shadow leaves and no guest")
        async with cluster.insecure_channel(t.l0) as ch:
            stub = l0_pb2_grpc.L0ServiceStub(ch)
            for lpid in gone.get(s.name, []):
                if lpid in have:
                    continue
                try:
                    d = await stub.DumpShadowTree(l0_pb2.DumpShadowTreeRequest(l1_name=s.name, l1_lpid=lpid), timeout=10)
                    leaks.append(f"{s.name}: destroyed guest lpid {lpid} still has a nested guest in L0 ({len(d.leaves)} shadow leaves)")
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.NOT_FOUND:
                        raise
    return leaks


async def longest_wait_ms(l0: str) -> float:
    c = dict((await l0_stats(l0)).counters.values)
    us = c.get("svc.broadcast_latency_us_max", c.get("svc.broadcast_latency_us_p99", 0))
    return us / 1000.0

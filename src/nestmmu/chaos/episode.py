"""One episode: guests, workloads and churn, the fault held and healed, then the checks."""

from __future__ import annotations

import asyncio
import time

import grpc

from nestmmu import cluster
from nestmmu.protos import l0_pb2, l1_pb2, l1_pb2_grpc, l2_pb2, l2_pb2_grpc

from .checks import account, audit_outcome, check_leaks, l1_guests, longest_wait_ms, rpc_error, wait_recovered
from .report import WAIT_GRACE_S, Config, EpisodeReport, is_clear
from .schedule import Episode
from .targets import Targets


async def _create_guest(addr: str, g: cluster.GuestPlan) -> int:
    async with cluster.insecure_channel(addr) as ch:
        # A data guest: its pages move with their contents, so the workloads' checker can tell
        # a lost write from a page that moved (see "Data mode" in docs/design-notes.md).
        req = l1_pb2.CreateGuestRequest(page_shift=g.page_shift, memory_bytes=g.memory, data=True)
        r = await l1_pb2_grpc.L1ServiceStub(ch).CreateGuest(req, timeout=30)
    return int(r.lpid)


async def _destroy_guest(addr: str, lpid: int) -> None:
    async with cluster.insecure_channel(addr) as ch:
        await l1_pb2_grpc.L1ServiceStub(ch).DestroyGuest(l1_pb2.DestroyGuestRequest(lpid=lpid), timeout=30)


def _workload(accesses: int, seed: int, footprint: int, fresh: bool) -> l2_pb2.Workload:
    """Every workload runs in data mode: each load is checked against the vCPU's last store.
    ``fresh``: the guest was just created, so a word never stored must read zero."""
    return l2_pb2.Workload(
        pattern="hot",
        accesses=accesses,
        seed=seed,
        footprint_bytes=footprint,
        store_fraction=0.3,
        ifetch_fraction=0.05,
        batch_size=256,
        data=True,
        data_fresh=fresh,
    )


async def _run_workload(l2: str, l1_addr: str, lpid: int, g: cluster.GuestPlan, vcpus: int, w: l2_pb2.Workload, timeout: float) -> l2_pb2.WorkloadReport:
    async with cluster.insecure_channel(l2) as ch:
        req = l2_pb2.RunWorkloadRequest(l1_address=l1_addr, lpid=lpid, vcpus=vcpus, page_shift=g.page_shift, workload=w)
        r = await l2_pb2_grpc.L2ServiceStub(ch).RunWorkload(req, timeout=timeout)
    return r.report


def _plan(seed: int) -> cluster.GuestPlan:
    return cluster.GuestPlan(16 if seed % 2 else 21, 64 << 20, 2)


async def run_episode(t: Targets, ep: Episode, cfg: Config, state: dict[str, float]) -> EpisodeReport:
    """One episode; ``state`` carries the campaign's longest tlbsync wait across L0 restarts."""
    t0 = time.monotonic()
    rep = EpisodeReport(ep.index, ep.fault, ep.target, ep.onset, ep.hold, ep.seed)
    if ep.kind == "netem":
        rep.netem = f"delay {ep.delay_ms}ms loss {ep.loss_pct}%"
    footprint = 16 << 20
    # 1. one guest per L1, a workload on each, churn meanwhile
    jobs: list[tuple[str, str, int, cluster.GuestPlan]] = []
    for i, (name, addr) in enumerate(t.l1s.items()):
        g = _plan(ep.seed + i)
        jobs.append((name, addr, await _create_guest(addr, g), g))
    created = {name: [lpid] for name, _, lpid, _ in jobs}
    stop = asyncio.Event()
    churned: dict[str, int] = {}
    churner = asyncio.create_task(cluster.churn(jobs, t.l0, footprint, ep.seed, stop, churned))
    healed = asyncio.Event()

    async def keep_running(i: int, name: str, lpid: int, g: cluster.GuestPlan) -> list[l2_pb2.WorkloadReport | BaseException]:
        """Workloads one after another on this guest until one ends after the heal, so vCPUs
        are running whenever the fault strikes; a failed RunWorkload is kept as its error."""
        out: list[l2_pb2.WorkloadReport | BaseException] = []
        n = 0
        while True:
            w = _workload(cfg.accesses, ep.seed + 1000 * i + n, footprint, fresh=n == 0)
            try:
                r = await _run_workload(t.l2, t.l1_for_l2[name], lpid, g, cfg.vcpus, w, cfg.workload_timeout)
                out.append(r)
                failed = bool(r.errors)
            except grpc.aio.AioRpcError as e:
                out.append(e)
                failed = True
            if failed and not healed.is_set():
                await asyncio.sleep(0.5)  # the fault is on: try again, but do not spin
            n += 1
            if healed.is_set():
                return out

    runs = [asyncio.create_task(keep_running(i, name, lpid, g)) for i, (name, _, lpid, g) in enumerate(jobs)]
    audit_during: asyncio.Task[l0_pb2.AuditResponse] | None = None
    injected = False
    try:
        await asyncio.sleep(ep.onset)
        if ep.fault == "kill:l0":  # L0's counters die with it: read its longest wait first
            state["longest_ms"] = max(state["longest_ms"], await longest_wait_ms(t.l0))
        # 2. the fault, held while the workloads run; an audit meanwhile (not through a dead L0)
        t.inject(ep)
        injected = True
        if ep.target != "l0":
            audit_during = asyncio.create_task(cluster.audit(t.l0))
        await asyncio.sleep(ep.hold)
    finally:
        try:
            if injected:
                t.heal(ep)
        finally:
            healed.set()
            if not injected:  # the fault could not be injected: end this episode's work
                stop.set()
                await asyncio.gather(churner, *runs, return_exceptions=True)
    heal_t = time.monotonic()
    # 3. workloads end (completed, or with a clear error); churn stops
    done = await asyncio.gather(*runs, return_exceptions=True)
    stop.set()
    await churner
    rep.churn = dict(sorted(churned.items()))
    for (name, _, lpid, _), rs in zip(jobs, done, strict=True):
        for r in rs if isinstance(rs, list) else [rs]:
            rep.workloads += 1
            if isinstance(r, BaseException):
                msg = rpc_error(r)
                rep.rpc_errors.append(f"{name} lpid {lpid}: {msg}")
                rep.accesses_not_run += cfg.vcpus * cfg.accesses
                if not isinstance(r, grpc.aio.AioRpcError) or not is_clear(r.details() or ""):
                    rep.unclear_errors.append(f"RunWorkload on {name} lpid {lpid}: {msg}")
            else:
                account(rep, r, cfg.vcpus * cfg.accesses)
    if rep.unclear_errors:
        rep.failures.append(f"{len(rep.unclear_errors)} errors that do not say what happened, first: {rep.unclear_errors[0]}")
    if audit_during is not None:
        try:
            rep.audit_during, rep.violations_during_fault = audit_outcome(await audit_during)
            if rep.audit_during == "violations":
                # An audit that can say "could not look" has no excuse for a violation.
                rep.failures.append(f"audit during the fault: {len(rep.violations_during_fault)} violations, first: {rep.violations_during_fault[0]}")
        except grpc.aio.AioRpcError as e:
            rep.audit_during = f"error: {rpc_error(e)}"
    # 4. recovery
    try:
        await wait_recovered(t, cfg.recover_timeout)
    except (TimeoutError, grpc.aio.AioRpcError) as e:
        rep.failures.append(f"did not recover: {e}")
        rep.seconds = round(time.monotonic() - t0, 3)
        return rep
    rep.recovered_s = round(time.monotonic() - heal_t, 3)
    # 5. new work succeeds: on the episode's guest if it survived, else on a fresh guest
    probes = []
    for i, (name, _, lpid, g) in enumerate(jobs):
        addr = t.l1s[name]  # read again after the heal: a restarted container may have a new host port
        fresh = lpid not in await l1_guests(addr)
        if fresh:
            g = _plan(ep.seed + i)
            lpid = await _create_guest(addr, g)
            created[name].append(lpid)
        w = _workload(cfg.probe_accesses, ep.seed + 100 + i, footprint, fresh=fresh)
        probes.append(_run_workload(t.l2, t.l1_for_l2[name], lpid, g, 1, w, cfg.workload_timeout))
    probe_problems = []
    for (name, _, _, _), r in zip(jobs, await asyncio.gather(*probes, return_exceptions=True), strict=True):
        if isinstance(r, BaseException):
            probe_problems.append(f"{name}: {rpc_error(r)}")
        else:
            rep.lost_writes += r.lost_writes + r.misplaced_writes
            if r.errors or r.accesses != cfg.probe_accesses:
                probe_problems.append(f"{name}: {r.errors} errors, {r.accesses}/{cfg.probe_accesses} accesses {list(r.error_details)}")
    rep.probe = "ok" if not probe_problems else "; ".join(probe_problems)
    if probe_problems:
        rep.failures.append(f"new workloads after the heal failed: {rep.probe}")
    # 6. destroy what the episode created, then: no leak (settling: streams end asynchronously)
    for name, lpids in created.items():
        have = await l1_guests(t.l1s[name])
        for lpid in sorted(set(lpids)):  # a restarted L1 may hand out the same lpid again
            if lpid in have:
                await _destroy_guest(t.l1s[name], lpid)
    deadline = time.monotonic() + cfg.settle_timeout
    while True:
        rep.leaks = await check_leaks(t, created)
        if not rep.leaks or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    if rep.leaks:
        rep.failures += [f"leak: {x}" for x in rep.leaks]
    # 7. the audit after the heal
    aud = await cluster.audit(t.l0)
    rep.audit, rep.violations = audit_outcome(aud)
    rep.inconclusive = rep.audit.startswith("inconclusive")
    if rep.violations and not rep.inconclusive:
        rep.failures.append(f"audit after the heal: {len(rep.violations)} violations, first: {rep.violations[0]}")
    # 8. the longest tlbsync wait against its bound
    rep.l0_longest_wait_ms = await longest_wait_ms(t.l0)
    bound_ms = (cfg.ack_timeout + WAIT_GRACE_S) * 1000
    if ep.fault == "stop:l0":  # a frozen L0 keeps no clock: a wait spanning the freeze also lasts it
        bound_ms += ep.hold * 1000
    if rep.l0_longest_wait_ms > bound_ms and rep.l0_longest_wait_ms > state["longest_ms"]:
        rep.failures.append(f"a tlbsync waited {rep.l0_longest_wait_ms:.0f} ms, past the bound {bound_ms:.0f} ms")
    state["longest_ms"] = max(state["longest_ms"], rep.l0_longest_wait_ms)
    if rep.lost_writes:
        rep.failures.append(f"{rep.lost_writes} lost writes")
    rep.seconds = round(time.monotonic() - t0, 3)
    return rep

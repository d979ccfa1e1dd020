"""L0's inspection RPCs: GetStats, DumpShadowTree and the online Audit (and the counters the
metrics export).  The servicer in :mod:`services.l0.server` delegates to these functions.

The audit is right or says it cannot be
---------------------------------------
A running cluster changes while it is read, so one look is taken on quiesced state, and what
cannot be quiesced is accounted for instead of being judged:

* **Nested faults and L1 invalidations** change shadow trees only under the guest's
  ``tlb_lock``.  A look takes every live nested guest's lock (ascending shadow LPID, then any
  guest that appeared meanwhile).  No core operation holds two of these locks or waits for
  anything that needs one while holding one (exits are reflected after the lock is released),
  so this cannot deadlock.  Host events (unmap, migrate, dirty logging) run in one synchronous
  step and keep L0's table and the shadow trees consistent at every await.
* **L1 tree changes in flight.**  L1 writes its tree, then issues the invalidation hcall; in
  between, a shadow leaf may still be built from the old entry, and with the locks held that
  hcall waits for the audit.  L1 reports, with every walk, how many changes of that guest are
  in that window (``L1Reply.tree_changes_in_flight``); such leaves are not judged.  The audit
  looks again (after releasing the locks so the hcalls complete) up to ``AUDIT_LOOKS`` times.
* **An L1 that does not answer** (stopped, gone, timed out) makes its leaves "not looked at":
  the outcome is INCONCLUSIVE with the reason, never an I1 violation.  Every L1 is probed
  with one trivial walk before any lock is taken, so a silent L1 costs the audit one
  ``L1_CALL_TIMEOUT`` without stalling other guests' faults.  Likewise a vCPU whose TLB dump
  does not come back within the ack timeout.
* **TLB dumps** are judged against the shadow trees as they were when the dumps were requested
  (a vCPU answers in stream order, after every fill and tlbie queued before the request).
* **Confirmation.**  Violations are looked at twice; only those seen both times are reported
  (matched by :attr:`Violation.key`: the invariant and the leaf, not PTE bits that other
  accesses may set in between; the others are counted as ``violations_unconfirmed`` and logged: they would mean the
  quiescing above missed a race).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
import structlog

from nestmmu.core import formats as f
from nestmmu.core.audit import INCONCLUSIVE, VIOLATIONS, AuditReport, NotLooked, snapshot_shadow
from nestmmu.core.audit import audit as core_audit
from nestmmu.core.l0 import KvmNestedGuest, L1Vm, count_nest_rmap
from nestmmu.core.radix import WalkResult
from nestmmu.core.vcpu import TlbEntry
from nestmmu.protos import common_pb2, l0_pb2

if TYPE_CHECKING:
    from .server import L0Servicer

log = structlog.get_logger("l0")

#: Looks at most, while some leaves cannot be judged because an L1 change was in flight.
AUDIT_LOOKS = 5
#: Pause before the n-th look (n * this), letting in-flight invalidation hcalls complete.
AUDIT_RETRY_PAUSE = 0.05

OUTCOME_TO_PB = {
    "CLEAN": l0_pb2.AUDIT_OUTCOME_CLEAN,
    VIOLATIONS: l0_pb2.AUDIT_OUTCOME_VIOLATIONS,
    INCONCLUSIVE: l0_pb2.AUDIT_OUTCOME_INCONCLUSIVE,
}

Walks = dict[tuple[str, int, int], "WalkResult | NotLooked"]


# ==================================================================== counters / GetStats
def counters(svc: L0Servicer) -> dict[str, int]:
    out = {f"l0.{k}": int(v) for k, v in svc.core.stats.items()}
    out.update({f"svc.{k}": int(v) for k, v in svc.stats.items()})
    out["svc.l1_sessions"] = len(svc.by_name)
    out["svc.run_streams"] = sum(len(v) for v in svc.streams.values())
    out["svc.lpids_in_use"] = len(svc.core.lpids_in_use)
    # Current state (gauges): guests, tokens, tables, host blocks, nested rmap live vs stale.
    out["svc.run_tokens"] = len(svc.run_tokens)
    out["l0.nested_guests"] = len(svc.core.live_guests)
    out["l0.shadow_leaves"] = sum(len(svc.core.shadow_leaves(gp)) for gp in svc.core.live_guests)
    out["l0.host_blocks"] = len(svc.core.alloc.in_use)
    rm = count_nest_rmap(svc.core)
    out["l0.nest_rmap_entries"] = rm.entries
    out["l0.nest_rmap_live"] = rm.live
    out["l0.nest_rmap_stale"] = rm.stale
    lat = sorted(svc.latencies_us)
    if lat:
        out["svc.broadcast_latency_us_p50"] = int(lat[len(lat) // 2])
        out["svc.broadcast_latency_us_p99"] = int(lat[min(len(lat) - 1, (len(lat) * 99) // 100)])
    return out


async def get_stats(svc: L0Servicer) -> l0_pb2.GetStatsResponse:
    resp = l0_pb2.GetStatsResponse(counters=common_pb2.Counters(values=counters(svc)))
    for s in svc.by_name.values():
        leaves = sum(len(svc.core.shadow_leaves(gp)) for gp in s.vm.nested.values())
        resp.l1_summaries.add(name=s.name, l1_lpid_host=s.vm.lpid, nested_guests=len(s.vm.nested), shadow_leaves=leaves, run_streams=len(s.streams))
    return resp


async def dump_shadow_tree(svc: L0Servicer, request: l0_pb2.DumpShadowTreeRequest, context: grpc.aio.ServicerContext) -> l0_pb2.DumpShadowTreeResponse:
    vm = await svc._vm(context, request.l1_name)
    gp = vm.nested.get(request.l1_lpid)
    if gp is None:
        await context.abort(grpc.StatusCode.NOT_FOUND, f"L1 {request.l1_name!r} has no nested guest with lpid {request.l1_lpid}")
    assert gp is not None
    resp = l0_pb2.DumpShadowTreeResponse(shadow_lpid=gp.shadow_lpid)
    for slot in svc.core.shadow_leaves(gp):
        resp.leaves.add(n_gpa=slot.gpa, pte=slot.pte, host_address=slot.pte & f.PTE_RPN_MASK, page_shift=slot.shift)
    return resp


# ==================================================================== the audit
async def audit(svc: L0Servicer) -> l0_pb2.AuditResponse:
    """I1-I7 across the services, right or inconclusive (see the module docstring)."""
    silent = await _probe_l1s(svc)
    rep = await _look(svc, silent)
    looks = 1
    while rep.transient and looks < AUDIT_LOOKS:
        await asyncio.sleep(AUDIT_RETRY_PAUSE * looks)
        rep = await _look(svc, silent)
        looks += 1
    if rep.violations:
        again = await _look(svc, silent)
        looks += 1
        seen = {v.key for v in again.violations}
        gone = [v for v in rep.violations if v.key not in seen]
        if gone:
            rep.count("violations_unconfirmed", len(gone))
            log.warning("audit_violation_not_confirmed", count=len(gone), first=str(gone[0]))
        rep.violations = [v for v in rep.violations if v.key in seen]
        for why in again.inconclusive:
            if why not in rep.inconclusive:
                rep.inconclusive.append(why)
    rep.count("looks", looks)
    resp = l0_pb2.AuditResponse(
        ok=rep.ok, checked=common_pb2.Counters(values=rep.checked), outcome=OUTCOME_TO_PB[rep.outcome], inconclusive_reasons=rep.inconclusive
    )
    for v in rep.violations:
        resp.violations.add(invariant=v.invariant, detail=v.detail)
    svc.stats["audits"] += 1
    svc.stats[f"audits_{rep.outcome.lower()}"] += 1
    if rep.violations:
        log.warning("audit_violations", count=len(rep.violations), first=str(rep.violations[0]))
    elif rep.inconclusive:
        log.info("audit_inconclusive", reasons=rep.inconclusive)
    return resp


async def _probe_l1s(svc: L0Servicer) -> dict[str, NotLooked]:
    """Ask every L1 one trivial walk, before any lock is taken: an L1 that does not answer is
    left out of this audit at once, so its timeout never stalls other L1s' guests' faults."""
    silent: dict[str, NotLooked] = {}

    async def probe(vm: L1Vm) -> None:
        try:
            await svc.call_l1(vm, l0_pb2.L0Call(walk=l0_pb2.WalkCall(pate_dw0=0, l1_lpid=0, n_gpa=0)))
        except TimeoutError:
            silent[vm.name] = NotLooked(f"L1 {vm.name!r} did not answer a walk within {svc.l1_timeout}s")
        except Exception as e:  # L1Gone: the session ended or the L1 refused the call
            silent[vm.name] = NotLooked(f"L1 {vm.name!r} could not be asked: {e}")

    await asyncio.gather(*(probe(s.vm) for s in list(svc.by_name.values())))
    return silent


#: Passes over the live guests when taking their locks (guests created meanwhile are taken in
#: the next pass; any still unlocked after the last pass are not judged in this look).
LOCK_PASSES = 3


async def _lock_all(svc: L0Servicer) -> tuple[list[asyncio.Lock], set[KvmNestedGuest]]:
    """Take the tlb_lock of every live nested guest, including guests created meanwhile."""
    held: list[asyncio.Lock] = []
    locked: set[KvmNestedGuest] = set()
    try:
        for _ in range(LOCK_PASSES):
            todo = sorted((gp for gp in svc.core.live_guests if gp not in locked), key=lambda g: g.shadow_lpid)
            if not todo:
                break
            for gp in todo:
                lock = svc._lock(gp)
                await lock.acquire()
                held.append(lock)
                locked.add(gp)
    except BaseException:
        for lock in held:
            lock.release()
        raise
    return held, locked


async def _walk_l1(svc: L0Servicer, vm: L1Vm, keys: list[tuple[int, int, int]], walks: Walks) -> None:
    """Walk one L1's trees for (l1_lpid, pate, n_gpa) keys; a first walk probes the L1 so an
    L1 that does not answer costs one timeout, not one per leaf."""
    name = vm.name

    async def one(l1_lpid: int, pate: int, n_gpa: int) -> bool:
        key = (name, pate, n_gpa)
        try:
            r = await svc.call_l1(vm, l0_pb2.L0Call(walk=l0_pb2.WalkCall(pate_dw0=pate, l1_lpid=l1_lpid, n_gpa=n_gpa)))
        except TimeoutError:
            walks[key] = NotLooked(f"L1 {name!r} did not answer a walk within {svc.l1_timeout}s")
            return False
        except Exception as e:  # L1Gone: the session ended or the L1 refused the call
            walks[key] = NotLooked(f"L1 {name!r} could not be asked: {e}")
            return False
        if r.tree_changes_in_flight:
            walks[key] = NotLooked(f"L1 {name!r} lpid {l1_lpid}: a tree change was in flight (its invalidation hcall had not returned)", transient=True)
            return True
        w = r.walk
        if w.ok:
            walks[key] = WalkResult(0, w.leaf_pte, w.l1_gpa, w.page_shift, 0, w.leaf_address, w.memory_references)
        else:
            walks[key] = WalkResult(w.dsisr_code or f.DSISR_NOHPTE, fault_gpa=w.fault_gpa, refs=w.memory_references)
        return True

    if not keys:
        return
    if not await one(*keys[0]):
        why = walks[(name, keys[0][1], keys[0][2])]
        for _, pate, n_gpa in keys[1:]:
            walks[(name, pate, n_gpa)] = why
        return
    await asyncio.gather(*(one(*k) for k in keys[1:]))


async def _look(svc: L0Servicer, silent: dict[str, NotLooked]) -> AuditReport:
    """One look at quiesced state: locks, L1 walks, TLB dumps, then the core's checks."""
    held, locked = await _lock_all(svc)
    try:
        walks: Walks = {}
        jobs = []
        for s in list(svc.by_name.values()):
            guests = [gp for gp in list(s.vm.nested.values()) if gp in locked]  # others: see walk()
            keys = sorted({(gp.l1_lpid, gp.l1_gr_to_hr, slot.gpa) for gp in guests for slot in svc.core.shadow_leaves(gp)})
            if s.name in silent:
                walks.update({(s.name, pate, n_gpa): silent[s.name] for _, pate, n_gpa in keys})
            else:
                jobs.append(_walk_l1(svc, s.vm, keys, walks))
        await asyncio.gather(*jobs)

        def walk(name: str, pate: int, n_gpa: int) -> WalkResult | NotLooked:
            got = walks.get((name, pate, n_gpa))
            if got is None:  # a guest created during the look (not locked) or a leaf since
                return NotLooked(f"L1 {name!r}: a nested guest or shadow leaf appeared during the audit", transient=True)
            return got

        # TLB dumps: requested in one synchronous step, judged against the shadow state of
        # that instant.
        loop = asyncio.get_running_loop()
        dumps = []
        for ss in svc.streams.values():
            for st in ss:
                if st.alive:
                    did = svc.next_inv
                    svc.next_inv += 1
                    fut: asyncio.Future[list[TlbEntry]] = loop.create_future()
                    st.dumps[did] = fut
                    st.flush_results()
                    st.out.put_nowait(l0_pb2.RunResponse(tlb_dump_request=l0_pb2.TlbDumpRequest(id=did)))
                    dumps.append((st, fut))
        reference = snapshot_shadow(svc.core)
        if dumps:
            await asyncio.wait([d[1] for d in dumps], timeout=svc.ack_timeout)
        tlbs: list[tuple[str, TlbEntry]] = []
        late = []
        for st, fut in dumps:
            vcpu = f"{st.session.name}/{st.gp.l1_lpid}/{st.vcpu_id}"
            if fut.done():
                tlbs += [(vcpu, e) for e in fut.result()]
            else:
                late.append(vcpu)
                for did, d in list(st.dumps.items()):
                    if d is fut:
                        del st.dumps[did]
        rep = core_audit(svc.core, walk, tlbs, tlb_reference=reference)
        for vcpu in late:
            rep.cannot_look(NotLooked(f"vCPU {vcpu} did not return its TLB dump within {svc.ack_timeout}s"))
        # Service-level I7: no stream or token outlives its L1 or its guest.
        for ss in svc.streams.values():
            for st in ss:
                if st.session.released:
                    rep.add("I7", f"run stream of released L1 {st.session.name!r} still open")
        for s, gp, _ in svc.run_tokens.values():
            if s.released or gp.freed:
                rep.add("I7", f"run token of released L1 {s.name!r} or freed guest still valid")
        rep.count("tlb_dumps", len(dumps) - len(late))
        return rep
    finally:
        for lock in held:
            lock.release()

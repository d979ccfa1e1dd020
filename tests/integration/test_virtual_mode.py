"""Virtual mode across real processes: L2 effective addresses through L2's own page tables.

A small lackey-format trace with pages in two distant EA regions (a program's text/heap at
0x10000000 and its stack near 0x7fff00000000, which real mode's folding into a 1 MiB footprint
would alias) runs on an L2 guest in virtual mode: its L2 kernel (in the L2 service) boots,
registers its process table with L1 (H_REGISTER_PROC_TBL), and demand-maps every page on the
guest faults the 2-D walk in L0 raises; its page-table stores go through L0 as real-mode data
stores.  Then a bare vCPU attached to the same guest walks every EA page again through L0 and
must get distinct L2 real and host pages for distinct EA pages, and the audit must be clean.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from nestmmu import cluster
from nestmmu.protos import common_pb2, l0_pb2, l0_pb2_grpc, l1_pb2, l1_pb2_grpc, l2_pb2, l2_pb2_grpc

pytestmark = [pytest.mark.integration]

PID = 7
#: EA pages of 64K (the L2 kernel's base page): four near the program's start, three on its
#: stack. 0x10000000 and 0x7fff00000000 are both 0 modulo the 1 MiB footprint.
TEXT = [0x1000_0000 + i * 0x1_0000 for i in range(4)]
STACK = [0x7FFF_0000_0000 - i * 0x1_0000 for i in range(3)]
FOOTPRINT = 1 << 20


def write_trace(path: Path) -> int:
    """Lackey lines (I, L, S, M) touching every page of TEXT and STACK; returns the access count."""
    lines = ["==1== Lackey, an example Valgrind tool", "==1== Command: ./synthetic"]
    n = 0
    for i, page in enumerate(TEXT):
        lines.append(f"I  {page + 0x40 * i:08x},4")
        lines.append(f" L {page + 0x100:08x},8")
        lines.append(f" S {page + 0x208:08x},8")
        n += 3
    for page in STACK:
        lines.append(f" S {page - 0x10:x},8")  # below the page boundary: the previous page
        lines.append(f" M {page + 0x18:x},8")  # load then store
        lines.append(f" L {page + 0x18:x},8")
        n += 4
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return n


def ea_pages() -> list[int]:
    pages = {p & ~0xFFFF for p in TEXT}
    for page in STACK:
        pages |= {(page - 0x10) & ~0xFFFF, page & ~0xFFFF}
    return sorted(pages)


@pytest.fixture(scope="module")
def lc() -> Iterator[cluster.LocalCluster]:
    with cluster.local_cluster(("l1a",)) as c:
        yield c


def test_folding_would_alias_the_two_regions() -> None:
    """The premise: in real mode the trace's two regions land on the same L2 real page."""
    assert TEXT[0] % FOOTPRINT == STACK[0] % FOOTPRINT


def test_a_lackey_trace_runs_in_virtual_mode_through_the_l2_kernel(lc: cluster.LocalCluster, tmp_path: Path) -> None:
    trace = tmp_path / "lackey.out"
    per_pass = write_trace(trace)
    accesses = 3 * per_pass  # the trace replays from the start: later passes hit the TLB

    async def go() -> tuple[l2_pb2.WorkloadReport, dict[str, int], list[tuple[int, int, int, int, int]], list[int], l0_pb2.AuditResponse]:
        async with grpc.aio.insecure_channel(lc.l2) as ch2, grpc.aio.insecure_channel(lc.l1s["l1a"]) as ch1, grpc.aio.insecure_channel(lc.l0) as ch0:
            before = await cluster.l0_counters(lc.l0)
            rep = (
                await l2_pb2_grpc.L2ServiceStub(ch2).RunWorkload(
                    l2_pb2.RunWorkloadRequest(
                        l1_address=lc.l1s["l1a"],
                        lpid=0,  # a new (data) guest sized for the kernel's tables and the footprint
                        vcpus=2,
                        page_shift=16,
                        workload=l2_pb2.Workload(
                            pattern="trace", trace_path=str(trace), accesses=accesses, footprint_bytes=FOOTPRINT, batch_size=8, virtual_mode=True, pid=PID
                        ),
                    ),
                    timeout=120,
                )
            ).report
            after = await cluster.l0_counters(lc.l0)
            delta = {k: v - before.get(k, 0) for k, v in after.items()}
            # A bare vCPU on the same guest: every EA page again, through L0's 2-D walk.
            l1 = l1_pb2_grpc.L1ServiceStub(ch1)
            a = await l1.AttachVcpu(l1_pb2.AttachVcpuRequest(lpid=rep.lpid, vcpu_id=5), timeout=30)
            v = cluster.RawVcpu(l0_pb2_grpc.L0ServiceStub(ch0), a.run_token)
            try:
                await asyncio.wait_for(v.attached, 10)
                pages = ea_pages()
                res = await v.run(pages, [1] * len(pages), pid=PID)
                real = list(v.real_pages)
            finally:
                await v.close()
            aud = await cluster.audit(lc.l0)
            return rep, delta, res, real, aud

    rep, delta, res, real, aud = asyncio.run(go())
    # Every access completed: no error, no segfault (the whole space is anonymous memory).
    assert rep.accesses == 2 * accesses and rep.errors == 0 and not rep.error_details, (rep.errors, list(rep.error_details))
    assert rep.segfaults == 0
    # Guest faults happened (first touch of each page, C on the first store) and were handled.
    assert rep.guest_faults >= len(ea_pages()), rep
    assert rep.guest_faults_handled == rep.guest_faults, rep
    # The kernel built its trees through L0: PRTE, table PDEs and leaves as real-mode stores.
    assert rep.kernel_stores >= len(ea_pages()) + 1, rep
    assert rep.tlb_hits > 0
    # L0 counted the 2-D walks: every process-scoped level read through the shadow.
    assert delta.get("l0.walk_refs_2d", 0) > 0 and delta.get("l0.walk_refs_shadow", 0) > 0, {k: v for k, v in delta.items() if "walk" in k}
    assert delta["l0.walk_refs_2d"] > delta["l0.walk_refs_shadow"]
    # Distinct EA pages have distinct translations (no aliasing), at L2 real and host level.
    pages = ea_pages()
    assert [o for o, *_ in res] == [l0_pb2.ACCESS_OUTCOME_FILL] * len(pages), res
    assert [p for _, p, *_ in res] == pages  # EA translations are keyed by the EA page
    assert len(set(real)) == len(pages) and 0 not in real, real
    hosts = [h for _, _, h, *_ in res]
    assert len(set(hosts)) == len(pages), hosts
    # And the whole state is consistent.
    assert cluster.audit_outcome(aud) == "CLEAN", (list(aud.violations), list(aud.inconclusive_reasons))


@pytest.mark.parametrize("rpt", [False, True], ids=["tlbie", "h_rpt_invalidate"])
def test_l2_kernel_munmaps_reach_every_vcpu_of_the_guest(lc: cluster.LocalCluster, tmp_path: Path, rpt: bool) -> None:
    """The L2 kernel's process-scoped flushes after munmap (radix__flush_tlb_range) reach every
    vCPU of the guest through L0's broadcast for its shadow LPID: with GTSE as tlbie PRS=1
    (ProcessTlbie), without it as H_RPT_INVALIDATE, which exits to L0 and L0 performs itself
    (kvmppc_nested_h_rpt_invalidate -> do_h_rpt_invalidate_prt).  A bystander vCPU of the same
    guest receives and acknowledges each one, tagged with the PID, and the workload still
    completes (pages refault into fresh ones) with a clean audit."""
    trace = tmp_path / "lackey.out"
    per_pass = write_trace(trace)
    accesses = 4 * per_pass

    async def go() -> tuple[l2_pb2.WorkloadReport, list[common_pb2.Invalidation], dict[str, int], l0_pb2.AuditResponse]:
        async with grpc.aio.insecure_channel(lc.l2) as ch2, grpc.aio.insecure_channel(lc.l1s["l1a"]) as ch1, grpc.aio.insecure_channel(lc.l0) as ch0:
            l1 = l1_pb2_grpc.L1ServiceStub(ch1)
            g = await l1.CreateGuest(l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=(8 << 20) + FOOTPRINT, data=True), timeout=30)
            a = await l1.AttachVcpu(l1_pb2.AttachVcpuRequest(lpid=g.lpid, vcpu_id=9), timeout=30)
            bystander = cluster.RawVcpu(l0_pb2_grpc.L0ServiceStub(ch0), a.run_token)
            try:
                await asyncio.wait_for(bystander.attached, 10)
                rep = (
                    await l2_pb2_grpc.L2ServiceStub(ch2).RunWorkload(
                        l2_pb2.RunWorkloadRequest(
                            l1_address=lc.l1s["l1a"],
                            lpid=g.lpid,
                            vcpus=2,
                            workload=l2_pb2.Workload(
                                pattern="trace",
                                trace_path=str(trace),
                                accesses=accesses,
                                footprint_bytes=FOOTPRINT,
                                batch_size=4,
                                virtual_mode=True,
                                pid=PID,
                                unmap_every=2,
                                l2_rpt_invalidate=rpt,
                            ),
                        ),
                        timeout=120,
                    )
                ).report
                seen = list(bystander.invalidations)
            finally:
                await bystander.close()
            return rep, seen, await cluster.l0_counters(lc.l0), await cluster.audit(lc.l0)

    rep, seen, counters, aud = asyncio.run(go())
    assert rep.accesses == 2 * accesses and rep.errors == 0 and rep.segfaults == 0, (rep.errors, list(rep.error_details))
    flushes = rep.extra["l2_rpt_invalidates"] if rpt else rep.process_tlbies
    assert rep.extra["munmaps"] > 0 and flushes > 0, rep
    assert (rep.process_tlbies if rpt else rep.extra.get("l2_rpt_invalidates", 0)) == 0, rep
    # The pages came back: more guest faults than pages (refaults after the munmaps).
    assert rep.guest_faults_handled > len(ea_pages())
    # Every process-scoped flush reached the bystander, as the kernel issued it (one page each).
    l2_flushes = [i for i in seen if i.prs]
    assert len(l2_flushes) == flushes, (len(l2_flushes), flushes)
    assert all(i.pid == PID and i.scope == common_pb2.INVALIDATION_SCOPE_ADDRESS and i.size_bytes == 1 << 16 for i in l2_flushes)
    assert {i.address for i in l2_flushes} <= set(ea_pages())
    assert {i.reason for i in l2_flushes} == ({"rpt_prt_va"} if rpt else {"l2_flush_page"})
    if rpt:
        assert counters.get("l0.hcall.L2_H_RPT_INVALIDATE", 0) >= flushes
    else:
        assert counters.get("svc.process_tlbies", 0) >= flushes
    assert cluster.audit_outcome(aud) == "CLEAN", (list(aud.violations), list(aud.inconclusive_reasons))


def test_virtual_mode_needs_a_data_guest_and_keeps_its_kernel_across_workloads(lc: cluster.LocalCluster, tmp_path: Path) -> None:
    """A guest whose memory L1 may drop when it moves pages cannot hold page tables: refused
    with a one-line reason.  A data guest keeps its L2 kernel from one workload to the next
    (the second run finds its pages mapped: no demand faults).  An EA outside the 52-bit space
    is a segfault, reported."""
    trace = tmp_path / "lackey.out"
    per_pass = write_trace(trace)
    with trace.open("a", encoding="utf-8") as fh:  # and one EA no process may use: bit 52 set
        fh.write(" L 10000010000000,8\n")

    async def go() -> tuple[grpc.aio.AioRpcError, list[l2_pb2.WorkloadReport], l1_pb2.GuestInfo]:
        async with grpc.aio.insecure_channel(lc.l2) as ch2, grpc.aio.insecure_channel(lc.l1s["l1a"]) as ch1:
            l1 = l1_pb2_grpc.L1ServiceStub(ch1)
            l2 = l2_pb2_grpc.L2ServiceStub(ch2)
            w = l2_pb2.Workload(pattern="trace", trace_path=str(trace), accesses=per_pass + 1, batch_size=8, virtual_mode=True, pid=PID)
            plain = await l1.CreateGuest(l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=16 << 20), timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await l2.RunWorkload(l2_pb2.RunWorkloadRequest(l1_address=lc.l1s["l1a"], lpid=plain.lpid, vcpus=1, workload=w), timeout=60)
            g = await l1.CreateGuest(l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=16 << 20, data=True), timeout=30)
            reps = [
                (await l2.RunWorkload(l2_pb2.RunWorkloadRequest(l1_address=lc.l1s["l1a"], lpid=g.lpid, vcpus=1, workload=w), timeout=60)).report
                for _ in range(2)
            ]
            info = (await l1.GetGuest(l1_pb2.GetGuestRequest(lpid=g.lpid), timeout=30)).guest
            return refused.value, reps, info

    refused, reps, info = asyncio.run(go())
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "is not a data guest" in (refused.details() or "")
    first, second = reps
    assert first.errors == second.errors == 0 and first.guest_faults > 0
    # The bad EA: a segment interrupt, which no VMA can fix: SIGSEGV, the access ends, and the
    # report says where (not an error of the model).
    assert first.segfaults == second.segfaults == 1
    assert list(second.segfault_details) == [f"lpid {second.lpid} vCPU 0: SIGSEGV: load at EA 0x10000010000000 of PID {PID} (DSISR 0x0)"]
    assert second.guest_faults == 1 and second.kernel_stores == 0  # the same kernel, its pages still mapped: only the bad EA faults
    assert info.data and info.pate_dw1 >> 63  # GR, and the registered process table
    assert info.pate_dw1 & 0x0FFF_FFFF_FFFF_F000


def test_l0_routes_a_process_tlbie_to_every_vcpu_of_the_lpid_and_refuses_partition_scope(lc: cluster.LocalCluster) -> None:
    """ProcessTlbie on the Run stream: L0 tags it with the stream's shadow LPID, delivers it to
    every vCPU of that LPID (issuer included) and answers ProcessTlbieDone once all acked; a
    partition-scoped one (PRS=0) is the hypervisor's to issue, so the stream is ended with a
    one-line INVALID_ARGUMENT reason."""

    def tlbie(id_: int, prs: bool) -> l0_pb2.RunRequest:
        inv = common_pb2.Invalidation(scope=common_pb2.INVALIDATION_SCOPE_ADDRESS, address=TEXT[0], size_bytes=1 << 16, prs=prs, pid=PID)
        return l0_pb2.RunRequest(process_tlbie=l0_pb2.ProcessTlbie(id=id_, invalidations=[inv]))

    async def go() -> tuple[list[str], list[common_pb2.Invalidation], list[common_pb2.Invalidation], str | None]:
        async with grpc.aio.insecure_channel(lc.l1s["l1a"]) as ch1, grpc.aio.insecure_channel(lc.l0) as ch0:
            l1 = l1_pb2_grpc.L1ServiceStub(ch1)
            l0 = l0_pb2_grpc.L0ServiceStub(ch0)
            g = await l1.CreateGuest(l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=16 << 20, data=True), timeout=30)
            vs = []
            for vcpu_id in (0, 1):
                a = await l1.AttachVcpu(l1_pb2.AttachVcpuRequest(lpid=g.lpid, vcpu_id=vcpu_id), timeout=30)
                v = cluster.RawVcpu(l0, a.run_token)
                await asyncio.wait_for(v.attached, 10)
                vs.append(v)
            issuer, other = vs
            try:
                issuer.q.put_nowait(tlbie(1, True))
                for _ in range(100):
                    if "process_tlbie_done" in issuer.log:
                        break
                    await asyncio.sleep(0.05)
                issuer.q.put_nowait(tlbie(2, False))
                await asyncio.wait_for(issuer.task, 10)
                return list(issuer.log), list(issuer.invalidations), list(other.invalidations), issuer.ended
            finally:
                for v in vs:
                    await v.close()

    log, mine, theirs, ended = asyncio.run(go())
    assert "process_tlbie_done" in log and log.index("invalidate") < log.index("process_tlbie_done")
    for got in (mine, theirs):
        assert len(got) == 1 and got[0].prs and got[0].pid == PID and got[0].address == TEXT[0]
    assert mine[0].lpid == theirs[0].lpid != 0  # the shadow LPID, tagged by L0
    assert ended is not None and ended.startswith("INVALID_ARGUMENT: process_tlbie.invalidations[0].prs:"), ended

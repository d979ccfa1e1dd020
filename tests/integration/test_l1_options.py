"""`nestmmu serve l1` options of issue 7: `--forget-flush` (semantics §9.17: an L1 that changes a
leaf without the invalidation hcall, and L0's audit catching the stale shadow leaf) and
`--hdec-every` (HDEC exits on the logical clock), plus L1's MMIO instruction fetch with
H_COPY_TOFROM_GUEST.  Real processes on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from nestmmu import cluster
from nestmmu.cluster import RawVcpu
from nestmmu.protos import l0_pb2, l1_pb2, l1_pb2_grpc, l2_pb2, l2_pb2_grpc

HDEC_EVERY = 50

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def lc() -> Iterator[cluster.LocalCluster]:
    with cluster.local_cluster(("l1a",), l1_args=("--forget-flush", "--hdec-every", str(HDEC_EVERY))) as c:
        yield c


def test_forgotten_flush_after_remap_is_reported_by_the_audit(lc: cluster.LocalCluster) -> None:
    async def go() -> tuple[l1_pb2.RemapPagesResponse, l0_pb2.AuditResponse, dict[str, int]]:
        async with cluster.insecure_channel(lc.l0) as ch0, cluster.insecure_channel(lc.l1s["l1a"]) as ch1:
            l1 = l1_pb2_grpc.L1ServiceStub(ch1)
            l0 = cluster.l0_pb2_grpc.L0ServiceStub(ch0)
            lpid = (await l1.CreateGuest(l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=16 << 20), timeout=30)).lpid
            a = await l1.AttachVcpu(l1_pb2.AttachVcpuRequest(lpid=lpid, vcpu_id=0), timeout=30)
            v = RawVcpu(l0, a.run_token)
            await asyncio.wait_for(v.attached, 10)
            res = await v.run([0x10000], [1])
            assert [o for o, *_ in res] == [l0_pb2.ACCESS_OUTCOME_FILL]
            remap = await l1.RemapPages(l1_pb2.RemapPagesRequest(lpid=lpid, n_gpa=0x10000, length=0x10000), timeout=30)
            audit = await l0.Audit(l0_pb2.AuditRequest(), timeout=30)
            stats = dict((await l1.GetStats(l1_pb2.GetStatsRequest(), timeout=10)).counters.values)
            await v.close()
            return remap, audit, stats

    remap, audit, stats = asyncio.run(go())
    assert remap.pages_changed == 1 and remap.hcall_rc == 0  # no hcall was issued at all
    assert stats["l1.flush_forgotten"] == 1
    assert audit.outcome == l0_pb2.AUDIT_OUTCOME_VIOLATIONS
    assert {v.invariant for v in audit.violations} & {"I1", "I4"}, [f"{v.invariant}: {v.detail}" for v in audit.violations]


def test_l1_mmio_issues_h_copy_tofrom_guest_over_grpc(lc: cluster.LocalCluster) -> None:
    """The same L1 emulating MMIO beyond its L2's memory fetches the instruction with
    H_COPY_TOFROM_GUEST (kvmhv_load_from_eaddr) over its session; the text page was never run,
    so L0 answers H_NOT_FOUND and L1 counts kvmppc_ld's fallback."""

    async def go() -> tuple[list[int], dict[str, int], dict[str, int]]:
        async with cluster.insecure_channel(lc.l0) as ch0, cluster.insecure_channel(lc.l1s["l1a"]) as ch1:
            l1 = l1_pb2_grpc.L1ServiceStub(ch1)
            l0 = cluster.l0_pb2_grpc.L0ServiceStub(ch0)
            before = dict((await l1.GetStats(l1_pb2.GetStatsRequest(), timeout=10)).counters.values)
            lpid = (await l1.CreateGuest(l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=16 << 20), timeout=30)).lpid
            a = await l1.AttachVcpu(l1_pb2.AttachVcpuRequest(lpid=lpid, vcpu_id=0), timeout=30)
            v = RawVcpu(l0, a.run_token)
            await asyncio.wait_for(v.attached, 10)
            res = await v.run([(16 << 20) + 0x40], [1])
            after = dict((await l1.GetStats(l1_pb2.GetStatsRequest(), timeout=10)).counters.values)
            await v.close()
            return [o for o, *_ in res], before, after

    outcomes, before, after = asyncio.run(go())
    assert outcomes == [l0_pb2.ACCESS_OUTCOME_L1_EMULATED]
    assert after["session.hcall.copy_tofrom_guest"] - before.get("session.hcall.copy_tofrom_guest", 0) == 1
    assert after["l1.mmio.insn_fallback"] - before.get("l1.mmio.insn_fallback", 0) == 1


def test_hdec_and_l2_hcall_exits_reach_l1_through_l0_and_every_entry_counts(lc: cluster.LocalCluster) -> None:
    """kvmppc_handle_nested_exit: the L2 vCPU reports its HDEC (L1's --hdec-every) and its
    H_PUT_TERM_CHAR (Workload.hcall_every) on the logical clock; L0 hands each to L1, which
    enters again: one H_ENTER_NESTED per entry on both sides."""

    async def stats() -> tuple[dict[str, int], dict[str, int]]:
        async with cluster.insecure_channel(lc.l0) as ch0, cluster.insecure_channel(lc.l1s["l1a"]) as ch1:
            s0 = dict((await cluster.l0_pb2_grpc.L0ServiceStub(ch0).GetStats(l0_pb2.GetStatsRequest(), timeout=10)).counters.values)
            s1 = dict((await l1_pb2_grpc.L1ServiceStub(ch1).GetStats(l1_pb2.GetStatsRequest(), timeout=10)).counters.values)
            return s0, s1

    async def go() -> l2_pb2.WorkloadReport:
        async with cluster.insecure_channel(lc.l2) as ch2:
            w = l2_pb2.Workload(pattern="sequential", accesses=400, seed=1, footprint_bytes=1 << 20, hcall_every=40, batch_size=64)
            req = l2_pb2.RunWorkloadRequest(l1_address=lc.l1s["l1a"], vcpus=1, page_shift=16, workload=w)
            return (await l2_pb2_grpc.L2ServiceStub(ch2).RunWorkload(req, timeout=60)).report

    b0, b1 = asyncio.run(stats())
    rep = asyncio.run(go())
    a0, b = asyncio.run(stats())

    def d(after: dict[str, int], before: dict[str, int], k: str) -> int:
        return after.get(k, 0) - before.get(k, 0)

    assert rep.accesses == 400 and rep.errors == 0
    assert (d(b, b1, "l1.exit.hdec"), d(b, b1, "l1.exit.hcall.H_PUT_TERM_CHAR")) == (400 // HDEC_EVERY, 400 // 40)
    assert (d(a0, b0, "l0.nested_exit.hdec"), d(a0, b0, "l0.nested_exit.hcall")) == (400 // HDEC_EVERY, 400 // 40)
    assert d(b, b1, "l1.hcall.H_ENTER_NESTED") == d(a0, b0, "l0.hcall.H_ENTER_NESTED") > 400 // HDEC_EVERY + 400 // 40

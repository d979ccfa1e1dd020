"""`nestmmu serve l1 --forget-flush` (semantics §9.17): an L1 that changes a leaf without the
invalidation hcall, and L0's audit catching the stale shadow leaf.  Real processes on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from nestmmu import cluster
from nestmmu.cluster import RawVcpu
from nestmmu.protos import l0_pb2, l1_pb2, l1_pb2_grpc

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def lc() -> Iterator[cluster.LocalCluster]:
    with cluster.local_cluster(("l1a",), l1_args=("--forget-flush",)) as c:
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

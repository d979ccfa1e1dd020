"""Every failure a vCPU meets says what happened: an access that ends in ERROR carries L0's
reason, and a Run stream that L0 ends carries its reason even to a vCPU that was paused and
wrote into the already-ended stream (grpc's client then reports only INTERNAL)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import pytest

from nestmmu import cluster
from nestmmu.cluster import RawVcpu
from nestmmu.protos import l0_pb2, l1_pb2, l1_pb2_grpc, l2_pb2, l2_pb2_grpc

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def lc() -> Iterator[cluster.LocalCluster]:
    with cluster.local_cluster(("l1a",)) as c:
        yield c


def test_an_access_that_ends_in_error_carries_its_reason(lc: cluster.LocalCluster) -> None:
    """A 4K-page guest on a 64K L0: the nested fault stops at step 6 (L1 page smaller than
    L0's), L1 sees the raw HDSI and re-enters until L0 calls it a livelock, an ERROR outcome;
    the wire and the workload report both say why."""

    async def go() -> tuple[RawVcpu, list[tuple[int, int, int, int, int]], l2_pb2.WorkloadReport]:
        async with cluster.insecure_channel(lc.l0) as ch0, cluster.insecure_channel(lc.l1s["l1a"]) as ch1, cluster.insecure_channel(lc.l2) as ch2:
            l1 = l1_pb2_grpc.L1ServiceStub(ch1)
            lpid = (await l1.CreateGuest(l1_pb2.CreateGuestRequest(page_shift=12, memory_bytes=16 << 20), timeout=30)).lpid
            a = await l1.AttachVcpu(l1_pb2.AttachVcpuRequest(lpid=lpid, vcpu_id=0), timeout=30)
            v = RawVcpu(cluster.l0_pb2_grpc.L0ServiceStub(ch0), a.run_token)
            await asyncio.wait_for(v.attached, 10)
            res = await v.run([0x0, 0x1000], [1, 2])
            await v.close()
            w = l2_pb2.Workload(pattern="sequential", accesses=64, seed=1, footprint_bytes=1 << 20)
            rep = await l2_pb2_grpc.L2ServiceStub(ch2).RunWorkload(
                l2_pb2.RunWorkloadRequest(l1_address=lc.l1s["l1a"], lpid=lpid, vcpus=1, page_shift=12, workload=w), timeout=60
            )
            return v, res, rep.report

    v, res, rep = asyncio.run(go())
    assert [o for o, *_ in res] == [l0_pb2.ACCESS_OUTCOME_ERROR] * 2
    assert set(v.error_reasons) == {0, 1}
    assert all("L1 page shift 12 < L0 page shift 16" in why for why in v.error_reasons.values()), v.error_reasons
    assert rep.errors > 0
    assert all(why.startswith("livelock: -EINVAL:") for why in v.error_reasons.values()), v.error_reasons
    assert any("ended in ERROR: livelock: -EINVAL: L1 page shift 12 < L0 page shift 16" in d for d in rep.error_details), list(rep.error_details)


def test_a_paused_vcpu_cut_for_a_missing_ack_learns_why(lc: cluster.LocalCluster) -> None:
    """SIGSTOP the L2 while L1 unmaps a page its vCPU uses: L0 cuts the silent vCPU after the
    ack timeout (2 s). On SIGCONT the vCPU still reports L0's reason, not grpc's INTERNAL."""
    l2 = lc.procs[-1]

    async def go() -> l2_pb2.WorkloadReport:
        async with cluster.insecure_channel(lc.l1s["l1a"]) as ch1, cluster.insecure_channel(lc.l2) as ch2:
            l1 = l1_pb2_grpc.L1ServiceStub(ch1)
            lpid = (await l1.CreateGuest(l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=16 << 20), timeout=30)).lpid
            w = l2_pb2.Workload(pattern="uniform", accesses=3_000_000, seed=1, footprint_bytes=1 << 20, batch_size=256)
            req = l2_pb2.RunWorkloadRequest(l1_address=lc.l1s["l1a"], lpid=lpid, vcpus=1, page_shift=16, workload=w)
            run = asyncio.ensure_future(l2_pb2_grpc.L2ServiceStub(ch2).RunWorkload(req, timeout=120))
            while (await l1.GetGuest(l1_pb2.GetGuestRequest(lpid=lpid), timeout=10)).guest.mapped_pages < 4:
                await asyncio.sleep(0.05)  # the vCPU runs and has faulted pages in
            os.kill(l2.pid, signal.SIGSTOP)
            try:
                r = await l1.UnmapPages(l1_pb2.UnmapPagesRequest(lpid=lpid, n_gpa=0, length=1 << 20), timeout=60)
                assert r.pages_changed > 0
                await asyncio.sleep(0.5)
            finally:
                os.kill(l2.pid, signal.SIGCONT)
            return (await run).report

    rep = asyncio.run(go())
    assert rep.errors >= 1 and rep.extra["vcpu_failures"] == 1, rep
    details = list(rep.error_details)
    assert any("L0 ended the Run stream: no acknowledgement of an invalidation within" in d for d in details), details
    assert not any("Internal error from Core" in d for d in details), details

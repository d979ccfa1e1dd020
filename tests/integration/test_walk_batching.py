"""Walks fetched ahead (services/l0/walks.py), on real processes: a batch of nested faults
costs a constant number of L0 -> L1 calls, gives exactly the results one walk per fault
gives, and never uses a walk fetched before L1 could have changed its tree."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from nestmmu import bench_figures as bf
from nestmmu import cluster
from nestmmu.cluster import RawVcpu, insecure_channel
from nestmmu.core.formats import Access
from nestmmu.protos import l0_pb2, l0_pb2_grpc, l1_pb2, l1_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

PAGE = 64 << 10
LOAD = int(Access.LOAD)
STORE = int(Access.STORE)


@pytest.fixture(scope="module")
def batching() -> Iterator[cluster.LocalCluster]:
    with cluster.local_cluster(("l1a",)) as c:
        yield c


@pytest.fixture(scope="module")
def one_by_one() -> Iterator[cluster.LocalCluster]:
    with cluster.local_cluster(("l1a",), l0_args=("--no-walk-batching",)) as c:
        yield c


class Vcpu:
    """A RawVcpu of a fresh guest of ``pages`` pages, the first ``mapped`` mapped by L1."""

    def __init__(self, c: cluster.LocalCluster) -> None:
        self.c = c

    async def start(self, pages: int, mapped: int) -> None:
        l1 = self.c.l1s["l1a"]
        self.ch1 = insecure_channel(l1)
        self.ch0 = insecure_channel(self.c.l0)
        self.l1 = l1_pb2_grpc.L1ServiceStub(self.ch1)
        self.l0 = l0_pb2_grpc.L0ServiceStub(self.ch0)
        self.lpid = await bf.create_guest(l1, pages * PAGE)
        if mapped:
            await bf.map_all(l1, self.lpid, mapped * PAGE)
        a = await self.l1.AttachVcpu(l1_pb2.AttachVcpuRequest(lpid=self.lpid, vcpu_id=0), timeout=30)
        self.v = RawVcpu(self.l0, a.run_token)
        await asyncio.wait_for(self.v.attached, 30)

    async def stats(self) -> dict[str, int]:
        return dict((await self.l0.GetStats(l0_pb2.GetStatsRequest(), timeout=10)).counters.values)

    async def close(self) -> None:
        await self.v.close()
        await self.l1.DestroyGuest(l1_pb2.DestroyGuestRequest(lpid=self.lpid), timeout=30)
        await self.ch1.close()
        await self.ch0.close()


@pytest_asyncio.fixture
async def vb(batching: cluster.LocalCluster) -> AsyncIterator[Vcpu]:
    v = Vcpu(batching)
    yield v
    await v.close()


def _delta(after: dict[str, int], before: dict[str, int], prefix: str) -> dict[str, int]:
    return {k[len(prefix) :]: after[k] - before.get(k, 0) for k in after if k.startswith(prefix) and after[k] != before.get(k, 0)}


async def test_a_batch_of_faults_costs_one_call_to_l1(vb: Vcpu) -> None:
    n = 1000
    await vb.start(n, n)
    before = await vb.stats()
    res = await vb.v.run([p * PAGE + 8 for p in range(n)], [LOAD] * n)
    after = await vb.stats()
    assert all(r[0] == l0_pb2.ACCESS_OUTCOME_FILL for r in res)
    assert after["l0.nested_faults"] - before.get("l0.nested_faults", 0) == n
    assert _delta(after, before, "svc.l1_calls.") == {"walk_batch": 1}, "one message carries the walks of all 1000 faults"
    assert after["svc.walks_fetched_ahead_used"] - before.get("svc.walks_fetched_ahead_used", 0) == n - 1


async def test_results_are_those_of_one_walk_per_fault(batching: cluster.LocalCluster, one_by_one: cluster.LocalCluster) -> None:
    """Loads and stores over mapped and unmapped pages (reflected to L1, which maps them):
    the same outcomes, pages, flags and DSISRs either way, and far fewer calls batched."""
    got = []
    calls = []
    faults = []
    addrs = [(p % 96) * PAGE + (p * 40) % 4096 for p in range(0, 400, 3)]
    kinds = [STORE if p % 5 == 0 else LOAD for p in range(len(addrs))]
    for c in (batching, one_by_one):
        v = Vcpu(c)
        await v.start(128, 64)  # pages 64.. are not mapped: their faults are reflected to L1
        before = await v.stats()
        res = await v.v.run(addrs, kinds)
        after = await v.stats()
        got.append([(o, page, flags, dsisr) for o, page, _host, flags, dsisr in res])
        calls.append(_delta(after, before, "svc.l1_calls."))
        faults.append(after["l0.nested_faults"] - before.get("l0.nested_faults", 0))
        await v.close()
    assert got[0] == got[1]
    assert faults[0] == faults[1] > 50
    assert calls[1]["walk"] == faults[1] and "walk_batch" not in calls[1], "one walk per fault"
    assert calls[0]["handle_exit"] == calls[1]["handle_exit"] > 0
    # Batched: one call for the first fault's walks and one after each exit (a new epoch).
    assert calls[0].get("walk", 0) + calls[0]["walk_batch"] <= calls[0]["handle_exit"] + 1, calls[0]


async def test_a_reflected_exit_drops_the_walks_fetched_before_it(vb: Vcpu) -> None:
    """Page 1 is not mapped: its fault is reflected to L1, which maps it -- and might have
    changed anything else in its tree meanwhile, so page 2's walk, fetched with page 1's,
    is fetched again after the exit instead of being used."""
    await vb.start(8, 0)
    await vb.l1.MapPages(l1_pb2.MapPagesRequest(lpid=vb.lpid, n_gpa=2 * PAGE, length=PAGE, read=True, write=True), timeout=30)
    before = await vb.stats()
    res = await vb.v.run([1 * PAGE, 2 * PAGE], [LOAD, LOAD])
    after = await vb.stats()
    assert [r[0] for r in res] == [l0_pb2.ACCESS_OUTCOME_FILL] * 2
    assert _delta(after, before, "svc.l1_calls.") == {"walk_batch": 2, "handle_exit": 1}
    assert after["svc.walks_fetched_ahead"] - before.get("svc.walks_fetched_ahead", 0) == 2
    assert after["svc.walks_fetched_ahead_used"] - before.get("svc.walks_fetched_ahead_used", 0) == 1


async def test_an_hcall_drops_the_walks_fetched_before_it(vb: Vcpu) -> None:
    """A walk fetched for an access that then hit the shadow table (another 4K of the same
    64K page faulted first) is left unused; L1 then unmaps that page and flushes (an hcall):
    the next fault there must walk L1's tree again and find the page gone (an exit to L1),
    never use the walk fetched while it was mapped."""
    await vb.start(8, 8)
    res = await vb.v.run([0, 0x1000, PAGE], [LOAD] * 3)
    assert [r[0] for r in res] == [l0_pb2.ACCESS_OUTCOME_FILL] * 3
    mid = await vb.stats()
    assert mid["svc.walks_fetched_ahead"] - mid.get("svc.walks_fetched_ahead_used", 0) >= 1, "the walk for 0x1000 was fetched and not used"
    await vb.l1.UnmapPages(l1_pb2.UnmapPagesRequest(lpid=vb.lpid, n_gpa=0, length=PAGE), timeout=30)
    before = await vb.stats()
    res = await vb.v.run([0x1000], [LOAD])
    after = await vb.stats()
    calls = _delta(after, before, "svc.l1_calls.")
    assert calls.get("handle_exit", 0) == 1, ("page 0 is unmapped in L1: the fault must be reflected to it", calls)
    assert after.get("svc.walks_fetched_ahead_used", 0) == before.get("svc.walks_fetched_ahead_used", 0)

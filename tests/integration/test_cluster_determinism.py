"""A seeded run gives the same per-vCPU outcome in-process and across the real cluster.

Both run the same core; the cluster only adds processes, streams and RPCs. Without concurrent
invalidations, nothing about the transport may change what a vCPU observes.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from nestmmu import cluster
from nestmmu.core import formats as f
from nestmmu.core.l1 import GuestRegion
from nestmmu.core.sim import InProcessCluster
from nestmmu.core.workload import WorkloadSpec
from nestmmu.protos import l1_pb2, l1_pb2_grpc, l2_pb2, l2_pb2_grpc

pytestmark = [pytest.mark.integration]

KEYS = ("accesses", "tlb_hits", "misses_sent", "fills", "storage_interrupts", "mmio_emulated", "l1_emulated", "errors", "tlb_evictions")
MB = 1 << 20


def in_process(spec: WorkloadSpec) -> dict[str, int]:
    c = InProcessCluster()
    c.add_l1("l1a")
    regions = [GuestRegion("rom", 32 * MB, 2 * MB), GuestRegion("mmio", 34 * MB, 2 * MB), GuestRegion("protect", 36 * MB, 2 * MB, f.PTE_EAA_READ)]
    lpid = c.create_guest("l1a", page_shift=16, memory=64 * MB, regions=regions)
    s = c.attach_vcpu("l1a", lpid, 0)
    stats = c.run_workload(s, spec, vcpu_index=0)
    assert c.audit().ok
    return {k: int(stats.get(k, 0)) for k in KEYS}


async def over_the_cluster(lc: cluster.LocalCluster, spec: WorkloadSpec) -> dict[str, int]:
    async with grpc.aio.insecure_channel(lc.l1s["l1a"]) as ch:
        req = l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=64 * MB)
        req.regions.add(n_gpa=32 * MB, size_bytes=2 * MB, kind=l1_pb2.GUEST_REGION_KIND_READ_ONLY_L1_SLOT, read=True, write=True, execute=True)
        req.regions.add(n_gpa=34 * MB, size_bytes=2 * MB, kind=l1_pb2.GUEST_REGION_KIND_MMIO_HOLE, read=True, write=True, execute=True)
        req.regions.add(n_gpa=36 * MB, size_bytes=2 * MB, kind=l1_pb2.GUEST_REGION_KIND_PROTECTED, read=True)
        lpid = (await l1_pb2_grpc.L1ServiceStub(ch).CreateGuest(req, timeout=30)).lpid
    wl = l2_pb2.Workload(
        pattern=spec.pattern,
        accesses=spec.accesses,
        seed=spec.seed,
        footprint_bytes=spec.footprint,
        store_fraction=spec.store_fraction,
        ifetch_fraction=spec.ifetch_fraction,
        batch_size=spec.batch_size,
        trace_path=spec.trace_path,
        tlb_entries=spec.tlb_entries,
        tlb_ways=spec.tlb_ways,
    )
    async with grpc.aio.insecure_channel(lc.l2) as ch:
        r = await l2_pb2_grpc.L2ServiceStub(ch).RunWorkload(l2_pb2.RunWorkloadRequest(l1_address=lc.l1s["l1a"], lpid=lpid, vcpus=1, workload=wl), timeout=300)
    extra = dict(r.report.extra)
    return {k: int(extra.get(k, 0)) for k in KEYS}


@pytest.mark.parametrize("seed", [1, 2])
def test_seeded_run_same_in_process_and_across_the_cluster(seed: int) -> None:
    spec = WorkloadSpec(pattern="hot", accesses=20_000, seed=seed, footprint=40 * MB, store_fraction=0.3, ifetch_fraction=0.05, batch_size=1024)
    expected = in_process(spec)
    assert expected["fills"] > 100 and expected["storage_interrupts"] > 0 and expected["mmio_emulated"] > 0  # the run exercises every path
    with cluster.local_cluster(("l1a",)) as lc:
        got = asyncio.run(over_the_cluster(lc, spec))
    assert got == expected


@pytest.mark.parametrize(("entries", "ways"), [(64, 4), (32, 1)])
def test_a_small_tlb_evicts_the_same_in_process_and_across_the_cluster(entries: int, ways: int) -> None:
    """The geometry reaches the L2 service's vCPUs, and LRU replacement is part of the
    deterministic outcome: the same evictions, hits and fills over the cluster."""
    spec = WorkloadSpec(pattern="uniform", accesses=20_000, seed=5, footprint=40 * MB, batch_size=1024, tlb_entries=entries, tlb_ways=ways)
    expected = in_process(spec)
    assert expected["tlb_evictions"] > 1000  # the working set (640 pages) is far above the TLB
    with cluster.local_cluster(("l1a",)) as lc:
        got = asyncio.run(over_the_cluster(lc, spec))
    assert got == expected


def test_real_program_trace_same_in_process_and_across_the_cluster(tmp_path: Path) -> None:
    """A workload no one here wrote: valgrind lackey's memory trace of /bin/true."""
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    trace = tmp_path / "true.lackey"
    subprocess.run(["valgrind", "--tool=lackey", "--trace-mem=yes", f"--log-file={trace}", "/bin/true"], check=True, capture_output=True)
    spec = WorkloadSpec(pattern="trace", trace_path=str(trace), accesses=30_000, footprint=40 * MB, batch_size=1024)
    expected = in_process(spec)
    assert expected["accesses"] == 30_000 and expected["fills"] > 10
    with cluster.local_cluster(("l1a",)) as lc:
        got = asyncio.run(over_the_cluster(lc, spec))
    assert got == expected

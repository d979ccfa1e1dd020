"""Data mode across real processes: values survive L1 remaps/unmaps and host migrations.

Two L1s, two data guests each (64K and 2M pages, two vCPUs each), a seeded data workload with
churn running meanwhile; the checker in every vCPU must see every load return the last value
stored at its L2 address.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from nestmmu import cluster
from nestmmu.protos import l0_pb2, l0_pb2_grpc, l1_pb2, l1_pb2_grpc, l2_pb2, l2_pb2_grpc

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def lc() -> Iterator[cluster.LocalCluster]:
    with cluster.local_cluster(("l1a", "l1b")) as c:
        yield c


async def host_swapper(lc: cluster.LocalCluster, stop: asyncio.Event, counts: dict[str, int]) -> None:
    """Extra churn: the host swaps out pages backing the guests (HostUnmap) meanwhile."""
    import random

    rng = random.Random(3)
    async with grpc.aio.insecure_channel(lc.l0) as ch0:
        l0 = l0_pb2_grpc.L0ServiceStub(ch0)
        while not stop.is_set():
            name = rng.choice(sorted(lc.l1s))
            async with grpc.aio.insecure_channel(lc.l1s[name]) as ch1:
                l1 = l1_pb2_grpc.L1ServiceStub(ch1)
                guests = (await l1.ListGuests(l1_pb2.ListGuestsRequest(), timeout=10)).guests
                if guests:
                    g = rng.choice(list(guests))
                    size = 1 << g.page_shift
                    n_gpa = rng.randrange((4 << 20) // size) * size
                    w = await l1.WalkTree(l1_pb2.WalkTreeRequest(lpid=g.lpid, n_gpa=n_gpa), timeout=10)
                    if w.result.ok:
                        await l0.HostUnmap(l0_pb2.HostUnmapRequest(l1_name=name, gpa=w.result.l1_gpa), timeout=10)
                        counts["host_unmaps"] = counts.get("host_unmaps", 0) + 1
            await asyncio.sleep(0.02)


def test_data_workload_with_churn_loses_no_write(lc: cluster.LocalCluster) -> None:
    churn: dict[str, int] = {}

    async def go() -> tuple[list[object], dict[str, int], l0_pb2.AuditResponse]:
        stop = asyncio.Event()
        swapper = asyncio.create_task(host_swapper(lc, stop, churn))
        try:
            # A small footprint so that loads often find a word this vCPU stored.
            reports = await cluster.run_default_workload(
                lc.l1s, lc.l2, accesses=6_000, seed=11, footprint=4 << 20, l0=lc.l0, with_churn=True, churn_counts=churn, data=True
            )
        finally:
            stop.set()
            await swapper
        return list(reports), await cluster.l0_counters(lc.l0), await cluster.audit(lc.l0)

    reports, counters, aud = asyncio.run(go())
    summary = cluster.summarize(reports, counters, aud, churn)  # type: ignore[arg-type]
    data = summary["data"]
    assert data["lost_writes"] == 0 and data["misplaced_writes"] == 0, data["details"]
    assert data["data_loads_checked"] > 5_000 and data["data_stores"] > 5_000
    assert summary["errors"] == 0
    assert summary["accesses"] == 8 * 6_000
    # The churn really moved pages while the data was live.
    assert churn.get("l1_remaps", 0) > 0 and churn.get("l1_unmaps", 0) > 0 and churn.get("host_migrations", 0) > 0 and churn.get("host_unmaps", 0) > 0
    assert counters.get("l0.host_frames_copied", 0) > 0 and counters.get("l0.l1_bytes_copied", 0) > 0
    assert counters.get("l0.host_pages_swapped_out", 0) > 0
    assert aud.ok, [f"{v.invariant}: {v.detail}" for v in aud.violations]


def test_copy_l1_memory_needs_an_l1_session(lc: cluster.LocalCluster) -> None:
    async def go() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(lc.l0) as ch:
            try:
                await l0_pb2_grpc.L0ServiceStub(ch).CopyL1Memory(l0_pb2.CopyL1MemoryRequest(dst_gpa=0x200000, src_gpa=0x100000, length=4096), timeout=10)
            except grpc.aio.AioRpcError as e:
                return e.code()
        return grpc.StatusCode.OK

    assert asyncio.run(go()) == grpc.StatusCode.UNAUTHENTICATED


def test_raw_data_batches_store_then_hit_load_and_bad_batch_is_refused(lc: cluster.LocalCluster) -> None:
    """The wire protocol by hand: a miss store (L0 translates and writes), a hit load at the
    host address the fill gave (L0 reads it back), then a batch with too few values."""

    async def go() -> tuple[list[l0_pb2.AccessResults], list[l0_pb2.AccessResults], grpc.aio.AioRpcError | None]:
        addr = 0x30040
        async with grpc.aio.insecure_channel(lc.l0) as ch0, grpc.aio.insecure_channel(lc.l1s["l1a"]) as ch1:
            l1 = l1_pb2_grpc.L1ServiceStub(ch1)
            g = await l1.CreateGuest(l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=16 << 20, data=True), timeout=30)
            a = await l1.AttachVcpu(l1_pb2.AttachVcpuRequest(lpid=g.lpid, vcpu_id=0), timeout=30)
            v = cluster.RawVcpu(l0_pb2_grpc.L0ServiceStub(ch0), a.run_token)
            try:
                await asyncio.wait_for(v.attached, 10)
                batch = l0_pb2.AccessBatch(batch_id=1, addresses=[addr], kinds=bytes([2]), data=True, values=[0xFEED], host_addresses=[0])
                v.q.put_nowait(l0_pb2.RunRequest(batch=batch))
                first = await asyncio.wait_for(v.done.get(), 10)
                fill = next(p for p in first if p.outcomes)
                host = fill.host_addresses[0] + (addr - fill.page_addresses[0])
                batch = l0_pb2.AccessBatch(batch_id=2, addresses=[addr], kinds=bytes([1]), data=True, values=[0], host_addresses=[host])
                v.q.put_nowait(l0_pb2.RunRequest(batch=batch))
                second = await asyncio.wait_for(v.done.get(), 10)
                bad = l0_pb2.AccessBatch(batch_id=3, addresses=[addr, addr], kinds=bytes([1, 1]), data=True, values=[0], host_addresses=[host, 0])
                v.q.put_nowait(l0_pb2.RunRequest(batch=bad))
                await asyncio.wait_for(v.task, 10)
                return first, second, v.error
            finally:
                await v.close()
                await l1.DestroyGuest(l1_pb2.DestroyGuestRequest(lpid=g.lpid), timeout=30)

    first, second, err = asyncio.run(go())
    assert first[-1].batch_done and bytes(first[-1].data_done) == b"\x01"
    assert list(second[-1].data_loaded) == [0xFEED] and bytes(second[-1].data_done) == b"\x01"
    assert not any(p.outcomes for p in second)  # a hit: no translation work in L0
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT and "values" in (err.details() or "")


def test_data_mode_refuses_more_vcpus_than_words_per_line(lc: cluster.LocalCluster) -> None:
    async def go() -> grpc.aio.AioRpcError | None:
        async with grpc.aio.insecure_channel(lc.l2) as ch:
            try:
                await l2_pb2_grpc.L2ServiceStub(ch).RunWorkload(
                    l2_pb2.RunWorkloadRequest(l1_address=lc.l1s["l1a"], vcpus=9, workload=l2_pb2.Workload(accesses=10, data=True)), timeout=30
                )
            except grpc.aio.AioRpcError as e:
                return e
        return None

    err = asyncio.run(go())
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT and "8 vCPUs" in (err.details() or "")

"""L0's Prometheus endpoint reflects what the core counts."""

from __future__ import annotations

import asyncio
import re
import urllib.request

import grpc
import pytest

from nestmmu import cluster
from nestmmu.cluster import RawVcpu
from nestmmu.protos import l0_pb2_grpc, l1_pb2, l1_pb2_grpc

pytestmark = [pytest.mark.integration]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def value(text: str, metric: str) -> float:
    m = re.search(rf"^{re.escape(metric)} (\S+)$", text, re.M)
    assert m, f"{metric} not exported"
    return float(m.group(1))


def test_l0_metrics_follow_the_core() -> None:
    mport = cluster.free_port()
    with cluster.local_cluster(("l1a",), l0_args=("--metrics-port", str(mport))) as c:
        before = scrape(mport)
        assert value(before, "nestmmu_l0_l1_sessions") == 1

        async def fault() -> None:
            async with grpc.aio.insecure_channel(c.l1s["l1a"]) as ch1, grpc.aio.insecure_channel(c.l0) as ch0:
                l1 = l1_pb2_grpc.L1ServiceStub(ch1)
                lpid = (await l1.CreateGuest(l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=16 << 20), timeout=10)).lpid
                a = await l1.AttachVcpu(l1_pb2.AttachVcpuRequest(lpid=lpid, vcpu_id=0), timeout=10)
                v = RawVcpu(l0_pb2_grpc.L0ServiceStub(ch0), a.run_token)
                await v.run([0x10000, 0x20000], [1, 2])
                assert value(scrape(mport), "nestmmu_l0_run_streams") == 1
                await v.close()

        asyncio.run(fault())
        after = scrape(mport)
    assert value(after, 'nestmmu_l0_events_total{event="l0.nested_faults"}') >= 4  # two pages, each NOHPTE then fill
    assert value(after, 'nestmmu_l0_events_total{event="l0.reflected.NOHPTE"}') == 2
    assert value(after, "nestmmu_l0_lpids_in_use") == 2  # the L1 and its nested guest
    # Nested rmap accounting: gauges (they go down), live + stale = entries.
    assert re.search(r"^# TYPE nestmmu_l0_nest_rmap_stale gauge$", after, re.M)
    entries = value(after, "nestmmu_l0_nest_rmap_entries")
    assert entries == 2 and value(after, "nestmmu_l0_nest_rmap_live") + value(after, "nestmmu_l0_nest_rmap_stale") == entries
    assert value(after, "nestmmu_l0_nested_guests") == 1 and value(after, "nestmmu_l0_shadow_leaves") == 2

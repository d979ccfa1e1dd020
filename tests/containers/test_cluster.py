"""The cluster in real containers (docker compose), driven from the host through published ports."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest

from nestmmu import cluster
from nestmmu.protos import l0_pb2, l0_pb2_grpc, l1_pb2, l1_pb2_grpc, l2_pb2, l2_pb2_grpc

from .helpers import NestmmuCompose

SERVICES = ["l0", "l1a", "l1b", "l2"]
# Addresses as the containers see each other on the compose network.
IN_NET = {"l1a": "l1a:50052", "l1b": "l1b:50054"}


def addr(c: NestmmuCompose, svc: str) -> str:
    host, port = c.endpoint(svc)
    return f"{host}:{port}"


@pytest.fixture
def up(nestmmu_image: str) -> Iterator[NestmmuCompose]:
    c = NestmmuCompose(services=SERVICES, wait=True)
    with c:
        asyncio.run(cluster.wait_healthy([addr(c, s) for s in SERVICES], 60))
        asyncio.run(cluster.wait_l1s_registered(addr(c, "l0"), 2, 60))
        yield c


async def _stats(l0: str) -> l0_pb2.GetStatsResponse:
    async with grpc.aio.insecure_channel(l0) as ch:
        return await l0_pb2_grpc.L0ServiceStub(ch).GetStats(l0_pb2.GetStatsRequest(), timeout=10)


def test_cluster_healthy_runs_workload_audit_clean(up: NestmmuCompose) -> None:
    # The compose file's own one-shot workload: its report (with the audit) is in its output.
    # (`compose run` replaces the service's command, so the full command line is repeated.)
    args = ["workload", "--l1", "l1a=l1a:50052", "--l1", "l1b=l1b:50054", "--l2", "l2:50053", "--l0", "l0:50051", "--accesses", "5000", "--json"]
    out = up.compose("run", "--rm", "--no-deps", "workload", *args).stdout.decode()
    rep = json.loads(out.strip().splitlines()[-1])
    assert rep["accesses"] > 0 and rep["nested_faults"] > 0 and rep["tlb_hits"] > 0
    assert rep["audit"]["ok"], rep["audit"]["violations"]
    assert rep["errors"] == 0
    # One audit ran while the vCPUs were attached: their TLBs were dumped (I5 checked).
    assert rep["audit_attached"]["ok"] and rep["audit_attached"]["checked"]["tlb_dumps"] > 0, rep["audit_attached"]
    st = asyncio.run(_stats(addr(up, "l0")))
    assert sorted(s.name for s in st.l1_summaries) == ["l1a", "l1b"]
    assert asyncio.run(cluster.audit(addr(up, "l0"))).ok


def test_stopping_an_l1_container_releases_its_guests(up: NestmmuCompose) -> None:
    l0 = addr(up, "l0")

    async def go_host() -> None:
        async with grpc.aio.insecure_channel(addr(up, "l1b")) as ch:
            lpid = (await l1_pb2_grpc.L1ServiceStub(ch).CreateGuest(l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=16 << 20), timeout=30)).lpid
        async with grpc.aio.insecure_channel(addr(up, "l2")) as ch:
            wl = l2_pb2.Workload(pattern="hot", accesses=3000, seed=1, footprint_bytes=8 << 20, store_fraction=0.3, batch_size=512)
            r = await l2_pb2_grpc.L2ServiceStub(ch).RunWorkload(
                l2_pb2.RunWorkloadRequest(l1_address=IN_NET["l1b"], lpid=lpid, vcpus=2, workload=wl), timeout=120
            )
        assert r.report.errors == 0 and r.report.accesses == 6000

    asyncio.run(go_host())
    before = asyncio.run(_stats(l0))
    assert {s.name: s.nested_guests for s in before.l1_summaries}["l1b"] == 1
    lpids_before = before.counters.values["svc.lpids_in_use"]
    up.compose("stop", "l1b")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = asyncio.run(_stats(l0))
        if [s.name for s in st.l1_summaries] == ["l1a"]:
            break
        time.sleep(0.3)
    assert [s.name for s in st.l1_summaries] == ["l1a"]
    assert st.counters.values["svc.lpids_in_use"] == lpids_before - 2  # l1b's own LPID and its guest's
    assert asyncio.run(cluster.audit(l0)).ok


def test_cutting_l2_off_the_network_does_not_hang_an_invalidation(up: NestmmuCompose) -> None:
    l1 = addr(up, "l1a")

    async def create() -> int:
        async with grpc.aio.insecure_channel(l1) as ch:
            r = await l1_pb2_grpc.L1ServiceStub(ch).CreateGuest(l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=16 << 20), timeout=30)
        return int(r.lpid)

    lpid = asyncio.run(create())
    # A long-running workload on that guest, started in the background from the host.
    script = (
        "import asyncio,grpc,sys\n"
        "from nestmmu.protos import l2_pb2,l2_pb2_grpc\n"
        "async def m():\n"
        f"  async with grpc.aio.insecure_channel('{addr(up, 'l2')}') as ch:\n"
        f"    await l2_pb2_grpc.L2ServiceStub(ch).RunWorkload(l2_pb2.RunWorkloadRequest(l1_address='{IN_NET['l1a']}', lpid={lpid}, vcpus=2,"
        " workload=l2_pb2.Workload(pattern='hot', accesses=50_000_000, seed=1, footprint_bytes=1<<20, store_fraction=0.3, batch_size=256)), timeout=120)\n"
        "asyncio.run(m())\n"
    )
    bg = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Wait until both vCPUs have faulted pages in (shadow leaves exist).
        async def leaves() -> int:
            async with grpc.aio.insecure_channel(addr(up, "l0")) as ch:
                try:
                    r = await l0_pb2_grpc.L0ServiceStub(ch).DumpShadowTree(l0_pb2.DumpShadowTreeRequest(l1_name="l1a", l1_lpid=lpid), timeout=10)
                except grpc.aio.AioRpcError as e:  # no vCPU has entered the guest yet
                    assert e.code() == grpc.StatusCode.NOT_FOUND
                    return 0
            return len(r.leaves)

        deadline = time.monotonic() + 60
        while asyncio.run(leaves()) < 4 and time.monotonic() < deadline:
            time.sleep(0.3)
        assert asyncio.run(leaves()) >= 4
        assert asyncio.run(_stats(addr(up, "l0"))).counters.values["svc.run_streams"] == 2  # both vCPUs live
        l2_id = up.compose("ps", "-q", "l2").stdout.decode().strip()
        net = f"{up.project_name}_mmu"
        subprocess.run(["docker", "network", "disconnect", net, l2_id], check=True, capture_output=True)

        async def unmap() -> tuple[int, float]:
            t = time.monotonic()
            async with grpc.aio.insecure_channel(l1) as ch:
                r = await l1_pb2_grpc.L1ServiceStub(ch).UnmapPages(l1_pb2.UnmapPagesRequest(lpid=lpid, n_gpa=0, length=1 << 20), timeout=60)
            return r.hcall_rc, time.monotonic() - t

        rc, took = asyncio.run(unmap())
        assert rc == 0
        assert took < 20, f"the invalidation waited {took:.1f}s for an unreachable vCPU"
        # Whether L0 saw the streams break or cut them after the ack timeout, they are gone.
        st = asyncio.run(_stats(addr(up, "l0")))
        assert st.counters.values["svc.run_streams"] == 0
        assert asyncio.run(cluster.audit(addr(up, "l0"))).ok
    finally:
        bg.kill()
        bg.wait()

"""1,000 guest lifecycles through the gRPC surface: nothing leaks, the rmap stays bounded, RSS
stays flat.  Real processes on loopback (slow: about a minute on 2 cores)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest

from nestmmu import cluster
from nestmmu.cluster import RawVcpu
from nestmmu.protos import l0_pb2, l0_pb2_grpc, l1_pb2, l1_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CYCLES = 1000
WARMUP = 100
#: Accesses per cycle: four 64K pages of a 16 MiB guest, stores (so C is set too).
PAGES = [0x10000, 0x20000, 0x30000, 0x40000]
#: RSS growth allowed between the warm-up and the end, per process (allocator noise, grpc
#: buffers); a leak of one small object per cycle would show as several MiB.
RSS_SLACK_KIB = 3 * 1024
#: Counters that describe current state and must return to their value after one cycle.
STATE = ("l0.nested_guests", "svc.lpids_in_use", "svc.run_streams", "svc.run_tokens", "svc.l1_sessions", "l0.shadow_leaves", "l0.host_blocks")


@pytest.fixture(scope="module")
def lc() -> Iterator[cluster.LocalCluster]:
    with cluster.local_cluster(("l1a",)) as c:
        yield c


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_thousand_guest_lifecycles_leak_nothing(lc: cluster.LocalCluster) -> None:
    async def main() -> None:
        async with grpc.aio.insecure_channel(lc.l0) as ch0, grpc.aio.insecure_channel(lc.l1s["l1a"]) as ch1:
            l0 = l0_pb2_grpc.L0ServiceStub(ch0)
            l1 = l1_pb2_grpc.L1ServiceStub(ch1)

            async def stats() -> dict[str, int]:
                return dict((await l0.GetStats(l0_pb2.GetStatsRequest(), timeout=10)).counters.values)

            async def settled() -> dict[str, int]:
                # L0 notices a closed run stream asynchronously: wait until it has.
                for _ in range(100):
                    s = await stats()
                    if not s.get("svc.run_streams") and not s.get("svc.run_tokens"):
                        return s
                    await asyncio.sleep(0.01)
                return s

            async def cycle() -> None:
                lpid = (await l1.CreateGuest(l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=16 << 20), timeout=10)).lpid
                a = await l1.AttachVcpu(l1_pb2.AttachVcpuRequest(lpid=lpid, vcpu_id=0), timeout=10)
                v = RawVcpu(l0, a.run_token)
                res = await v.run(PAGES, [2] * len(PAGES))
                assert [o for o, *_ in res] == [l0_pb2.ACCESS_OUTCOME_FILL] * len(PAGES)
                await v.close()
                d = await l1.DestroyGuest(l1_pb2.DestroyGuestRequest(lpid=lpid), timeout=10)
                assert d.hcall_rc == 0

            await cycle()  # the first cycle faults L1's memory in (host backing stays: it is L1's)
            start = await settled()
            t0 = time.monotonic()
            warm: dict[str, int] = {}
            rss_warm: list[int] = []
            for i in range(1, CYCLES):
                await cycle()
                if i == WARMUP:
                    warm = await settled()
                    rss_warm = [rss_kib(p.pid) for p in lc.procs]
            took = time.monotonic() - t0
            end = await settled()
            rss_end = [rss_kib(p.pid) for p in lc.procs]
            print(
                f"{CYCLES} cycles in {took:.1f}s; rmap entries start/warm/end "
                f"{start['l0.nest_rmap_entries']}/{warm['l0.nest_rmap_entries']}/{end['l0.nest_rmap_entries']} "
                f"(stale {end['l0.nest_rmap_stale']}); RSS KiB warm {rss_warm} end {rss_end}"
            )
            for key in STATE:
                assert end.get(key, 0) == start.get(key, 0), (key, start.get(key), end.get(key))
            assert end["l0.nested_guests_created"] - start["l0.nested_guests_created"] == CYCLES - 1
            # Stale rmap: every entry is stale (no guest is left) and the count is at its bound:
            # one entry per (L1 page, l1_lpid, n_gpa) ever paired; the guests reuse lpid 1 and L1
            # reuses its pages, so at most len(PAGES) n_gpa per L1 page, flat after warm-up.
            assert end["l0.nest_rmap_live"] == 0 and end["l0.nest_rmap_stale"] == end["l0.nest_rmap_entries"]
            assert end["l0.nest_rmap_entries"] == warm["l0.nest_rmap_entries"] <= len(PAGES) ** 2
            for proc, w, e in zip(lc.procs, rss_warm, rss_end, strict=True):
                assert e - w <= RSS_SLACK_KIB, (proc.args, w, e)
            r = await l0.Audit(l0_pb2.AuditRequest(), timeout=30)
            assert r.outcome == l0_pb2.AUDIT_OUTCOME_CLEAN, [f"{v.invariant}: {v.detail}" for v in r.violations]

    asyncio.run(main())

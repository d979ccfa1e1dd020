"""Soak: the cluster stays up, idle and at a trickle of traffic, for SOAK_SECONDS.

Before the keepalive policy was shared (services/connection.py), L1's 10 s keepalive pings met
L0's default server policy (pings without data at most every 5 minutes, 2 strikes): L0 sent
GOAWAY too_many_pings after 2-3.5 minutes, the Connect stream ended and L0 released every
guest and vCPU of that L1. This test runs L0, two L1s and an L2 (watching L0's health) as
processes for longer than that, with vCPUs attached the whole time (some never send a thing,
some send a batch now and then) and an L2 workload every so often, then checks that nothing
was lost: no session ended, no guest released, no stream closed but the L2's own, no GOAWAY
in any log, the audit clean (TLBs dumped from the attached vCPUs).
"""

from __future__ import annotations

import asyncio
import glob
import os
import re
import time

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nestmmu import cluster
from nestmmu.cluster import RawVcpu
from nestmmu.protos import l0_pb2, l0_pb2_grpc, l1_pb2, l1_pb2_grpc, l2_pb2, l2_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: How long the cluster must stay up (>= 360 s: the old failure came after 120-210 s).
SOAK_SECONDS = 360.0
#: One trickle round (a batch on some vCPUs, an L1 tree change) every TRICKLE_SECONDS.
TRICKLE_SECONDS = 5.0
#: One L2 workload (attach, run, detach one vCPU) every L2_EVERY rounds.
L2_EVERY = 6
FILL = l0_pb2.ACCESS_OUTCOME_FILL
LOAD = 1
#: What a lost connection leaves in a service log.
BAD_LOG = re.compile(r"GOAWAY|too_many_pings|Too many pings|l1_released|l0_session_closed|Traceback|vcpu_failed", re.IGNORECASE)


async def _health(address: str) -> int:
    async with cluster.insecure_channel(address) as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(r.status)


async def _soak(c: cluster.LocalCluster) -> dict[str, int]:
    ch0 = cluster.insecure_channel(c.l0)
    l0 = l0_pb2_grpc.L0ServiceStub(ch0)
    ch1 = {n: cluster.insecure_channel(a) for n, a in c.l1s.items()}
    l1 = {n: l1_pb2_grpc.L1ServiceStub(ch) for n, ch in ch1.items()}
    ch2 = cluster.insecure_channel(c.l2)
    l2 = l2_pb2_grpc.L2ServiceStub(ch2)
    vcpus: list[RawVcpu] = []
    try:
        # Per L1: a guest with two attached vCPUs (one idle all along, one at a trickle), and
        # on l1a a second guest for the L2 service's workloads.
        guests: dict[str, int] = {}
        for name in c.l1s:
            g = await l1[name].CreateGuest(l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=16 << 20), timeout=30)
            guests[name] = g.lpid
            for vcpu_id in (0, 1):
                a = await l1[name].AttachVcpu(l1_pb2.AttachVcpuRequest(lpid=g.lpid, vcpu_id=vcpu_id), timeout=30)
                assert a.hcall_rc == 0, a
                v = RawVcpu(l0, a.run_token)
                await asyncio.wait_for(v.attached, 10)
                vcpus.append(v)
        l2_guest = (await l1["l1a"].CreateGuest(l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=16 << 20), timeout=30)).lpid
        idle, busy = vcpus[0::2], vcpus[1::2]
        before = dict((await l0.GetStats(l0_pb2.GetStatsRequest(), timeout=10)).counters.values)
        l2_runs = 0
        rounds = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < SOAK_SECONDS:
            rounds += 1
            for i, v in enumerate(busy):  # a trickle: 8 loads per busy vCPU
                page = ((rounds * 8 + i) % 200) << 16
                res = await v.run([page + k * 64 for k in range(8)], [LOAD] * 8)
                assert all(r[0] == FILL for r in res), res
            name = "l1a" if rounds % 2 else "l1b"  # an L1 tree change (unmap + invalidation hcall)
            await l1[name].UnmapPages(l1_pb2.UnmapPagesRequest(lpid=guests[name], n_gpa=(rounds % 200) << 16, length=1 << 16), timeout=30)
            if rounds % L2_EVERY == 1:
                wl = l2_pb2.Workload(pattern="hot", accesses=400, seed=rounds, footprint_bytes=1 << 20, batch_size=64)
                r = await l2.RunWorkload(l2_pb2.RunWorkloadRequest(l1_address=c.l1s["l1a"], lpid=l2_guest, vcpus=1, workload=wl), timeout=60)
                assert r.report.errors == 0 and r.report.accesses == 400, r.report
                l2_runs += 1
            for v in vcpus:
                assert v.error is None, f"a Run stream ended: {v.error}"
            await asyncio.sleep(TRICKLE_SECONDS)
        elapsed = time.monotonic() - t0

        # Every idle vCPU is still attached: its stream still runs accesses.
        for v in idle:
            assert v.error is None, f"an idle Run stream ended: {v.error}"
            res = await v.run([0x10000, 0x20000], [LOAD, LOAD])
            assert [r[0] for r in res] == [FILL, FILL]
        after = dict((await l0.GetStats(l0_pb2.GetStatsRequest(), timeout=10)).counters.values)
        assert after.get("svc.l1_released", 0) == before.get("svc.l1_released", 0) == 0
        # The only streams that closed are the L2 workloads' own (one vCPU each).
        assert after.get("svc.run_streams_closed", 0) - before.get("svc.run_streams_closed", 0) == l2_runs
        assert after["svc.l1_sessions"] == 2 and after["svc.run_streams"] == len(vcpus)
        for name in c.l1s:
            st = dict((await l1[name].GetStats(l1_pb2.GetStatsRequest(), timeout=10)).counters.values)
            assert st["session.registrations"] == 1, (name, st)  # never reconnected
            assert st["connected"] == 1
            listed = await l1[name].ListGuests(l1_pb2.ListGuestsRequest(), timeout=10)
            assert guests[name] in [g.lpid for g in listed.guests]
        for addr in (c.l0, *c.l1s.values(), c.l2):
            assert await _health(addr) == health_pb2.HealthCheckResponse.SERVING, addr
        aud = await l0.Audit(l0_pb2.AuditRequest(), timeout=60)
        assert aud.ok, [f"{v.invariant}: {v.detail}" for v in aud.violations]
        assert aud.checked.values["tlb_dumps"] == len(vcpus)  # taken with the vCPUs attached
        return {"seconds": int(elapsed), "rounds": rounds, "l2_runs": l2_runs, "vcpus": len(vcpus)}
    finally:
        for v in vcpus:
            await v.close()
        for ch in (ch0, ch2, *ch1.values()):
            await ch.close()


def test_cluster_survives_soak_idle_and_trickle() -> None:
    with cluster.local_cluster(("l1a", "l1b"), l2_watch_l0=True) as c:
        summary = asyncio.run(_soak(c))
        logs = sorted(glob.glob(os.path.join(c.log_dir, "*.log")))
        assert len(logs) == 4
        for path in logs:
            with open(path, encoding="utf-8", errors="replace") as fh:
                bad = [line.strip() for line in fh if BAD_LOG.search(line)]
            assert not bad, f"{os.path.basename(path)}: {bad[:5]}"
    assert summary["seconds"] >= SOAK_SECONDS and summary["l2_runs"] >= SOAK_SECONDS // (TRICKLE_SECONDS * L2_EVERY) - 1, summary
    print(f"soak: {summary}")

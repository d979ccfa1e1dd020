"""A short chaos campaign on real processes: one episode of each local fault, checks after each heal.

The long campaign is a documented command (README, "Fault injection"):
``nestmmu chaos --episodes 200 --seed 1 --json``.
"""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from nestmmu import chaos, cli, cluster
from nestmmu.protos import l0_pb2, l0_pb2_grpc, l1_pb2, l1_pb2_grpc

pytestmark = [pytest.mark.integration]

REQUIRED_KEYS = {
    "episodes",
    "episodes_run",
    "episodes_survived",
    "faults_by_kind",
    "violations",
    "leaks",
    "lost_writes",
    "longest_invalidation_wait_ms",
    "invalidation_wait_bound_ms",
    "episode_reports",
    "failures",
}


@pytest.mark.slow
def test_short_local_campaign_survives_every_fault() -> None:
    """Six episodes, one per fault (kill -9 + restart and SIGSTOP/SIGCONT of L0, an L1, L2), about 40 s."""
    cfg = chaos.Config(accesses=2000)
    episodes = chaos.schedule(1, len(chaos.LOCAL_FAULTS), chaos.LOCAL_FAULTS, max_hold=3.0)
    with cluster.local_cluster(("l1a", "l1b"), l0_args=("--ack-timeout", str(cfg.ack_timeout))) as c:
        rep = asyncio.run(chaos.run_campaign(chaos.LocalTargets(c), episodes, cfg, 1))
        assert all(p.poll() is None for p in c.procs), "every service is running again after its heal"
    assert not REQUIRED_KEYS - rep.keys(), REQUIRED_KEYS - rep.keys()
    json.dumps(rep)  # the CLI prints it as JSON
    assert rep["failures"] == [], rep["failures"]
    assert rep["episodes_run"] == rep["episodes_survived"] == 6
    assert rep["faults_by_kind"] == {f: 1 for f in chaos.LOCAL_FAULTS}
    assert rep["violations"] == 0 and rep["leaks"] == 0 and rep["lost_writes"] == 0
    assert 0 < rep["longest_invalidation_wait_ms"] <= rep["invalidation_wait_bound_ms"]
    by_fault = {e["fault"]: e for e in rep["episode_reports"]}
    for e in by_fault.values():
        assert e["audit"] == "clean" and e["probe"] == "ok" and e["leaks"] == [] and e["recovered_s"] >= 0, e
    # The faults struck while work ran, and what they broke ended with a clear error:
    # a killed L0 or L1 cut its vCPUs off (one line of error_details per failed vCPU) ...
    for f in ("kill:l0", "kill:l1"):
        assert by_fault[f]["vcpu_failures"] > 0 and len(by_fault[f]["error_details"]) >= by_fault[f]["vcpu_failures"], by_fault[f]
    assert any("Run stream broke" in d or "not connected to L0" in d for d in by_fault["kill:l0"]["error_details"])
    # ... and a killed L2 failed its RunWorkload calls with a gRPC status.
    assert by_fault["kill:l2"]["rpc_errors"] and all("UNAVAILABLE" in x for x in by_fault["kill:l2"]["rpc_errors"])
    # Churn (L1 tree changes and host migrations) ran in every episode.
    assert all(sum(v for k, v in e["churn"].items() if not k.startswith("churn_")) > 0 for e in by_fault.values())


def test_network_faults_need_compose(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["chaos", "--faults", "netem:l1", "--episodes", "2"]) == 2
    assert "--compose" in capsys.readouterr().err
    assert cli.main(["chaos", "--faults", "kill:l3"]) == 2
    assert "unknown fault" in capsys.readouterr().err


def test_destroying_a_guest_drops_its_unused_run_tokens() -> None:
    """Found by chaos (kill:l2 between AttachVcpu and Run): a run token nobody will use pinned
    the destroyed guest and its shadow LPID until the token expired (60 s). Now L0 drops the
    tokens of a guest its L1 destroys, as it closes that guest's run streams."""
    with cluster.local_cluster(("l1a",)) as c:

        async def go() -> None:
            async with grpc.aio.insecure_channel(c.l1s["l1a"]) as ch1, grpc.aio.insecure_channel(c.l0) as ch0:
                l1, l0 = l1_pb2_grpc.L1ServiceStub(ch1), l0_pb2_grpc.L0ServiceStub(ch0)

                async def counters() -> dict[str, int]:
                    return dict((await l0.GetStats(l0_pb2.GetStatsRequest(), timeout=10)).counters.values)

                lpid = (await l1.CreateGuest(l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=16 << 20), timeout=30)).lpid
                a = await l1.AttachVcpu(l1_pb2.AttachVcpuRequest(lpid=lpid, vcpu_id=0), timeout=30)
                assert a.hcall_rc == 0
                st = await counters()
                assert (st["svc.run_tokens"], st["svc.lpids_in_use"]) == (1, 2)  # the L1's LPID and the guest's shadow LPID
                await l1.DestroyGuest(l1_pb2.DestroyGuestRequest(lpid=lpid), timeout=30)
                st = await counters()
                assert (st["svc.run_tokens"], st["svc.lpids_in_use"]) == (0, 1)  # at once, not after the token's 60 s
                # a vCPU that shows up late with the token is refused, with a reason
                v = cluster.RawVcpu(l0, a.run_token)
                await asyncio.wait_for(v.task, 10)
                assert v.error is not None and v.error.code() == grpc.StatusCode.PERMISSION_DENIED
                assert (await cluster.audit(c.l0)).ok

        asyncio.run(go())

"""Connection health: the shared keepalive policy, health that follows L0, and the small things
found on the way (Run cancelled right after attach, corrupt request bytes, a busy port)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from nestmmu import cluster
from nestmmu.protos import L0_SERVICE_NAME, l0_pb2, l0_pb2_grpc, l1_pb2, l1_pb2_grpc, l2_pb2, l2_pb2_grpc
from nestmmu.services import connection

pytestmark = [pytest.mark.integration]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
#: L1 sees its Connect stream break at once when L0's process dies (the socket closes); the L2's
#: Watch stream likewise. Back up again: L1's reconnect backoff (<= 2 s) plus registration.
HEALTH_FLIP_BOUND = 5.0
#: A peer that stops answering (SIGSTOP) is noticed by a client's keepalive within
#: keepalive_time + keepalive_timeout (docs/design-notes.md, "Connection health").
DEAD_PEER_BOUND = (connection.CLIENT_KEEPALIVE_MS + connection.KEEPALIVE_TIMEOUT_MS) / 1000


def test_keepalive_policy_agrees_between_clients_and_servers() -> None:
    server = dict(connection.server_options())
    client = dict(connection.channel_options())
    # A client pinging more often than the server allows gets GOAWAY too_many_pings.
    assert client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_recv_ping_interval_without_data_ms"]
    assert server["grpc.keepalive_permit_without_calls"] == client["grpc.keepalive_permit_without_calls"] == 1
    assert client["grpc.http2.max_pings_without_data"] == 0  # idle streams keep being probed
    # grpcio enforces an unanswered ping with ping_timeout_ms (default 60 s), not keepalive_timeout_ms.
    assert client["grpc.http2.ping_timeout_ms"] == client["grpc.keepalive_timeout_ms"]
    assert server["grpc.http2.ping_timeout_ms"] == server["grpc.keepalive_timeout_ms"]
    assert server["grpc.so_reuseport"] == 0
    # The documented dead-peer bounds (docs/design-notes.md, "Connection health").
    assert (client["grpc.keepalive_time_ms"] + client["grpc.keepalive_timeout_ms"]) / 1000 == 30
    assert (server["grpc.keepalive_time_ms"] + server["grpc.keepalive_timeout_ms"]) / 1000 == 40
    # A paused peer keeps its session through every application-level timeout (L1 calls 5 s).
    assert client["grpc.keepalive_timeout_ms"] > 5_000 and server["grpc.keepalive_timeout_ms"] > 5_000


async def _status(address: str) -> int | None:
    async with cluster.insecure_channel(address) as ch:
        try:
            r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.aio.AioRpcError:
            return None
    return int(r.status)


async def _wait_status(address: str, want: int, bound: float) -> float:
    t0 = time.monotonic()
    while (got := await _status(address)) != want:
        assert time.monotonic() - t0 < bound, f"{address}: health {got}, wanted {want} within {bound}s"
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


def test_l1_and_l2_health_follow_l0_down_up_and_frozen() -> None:
    with cluster.local_cluster(("l1a",), l2_watch_l0=True) as c:
        l1, l2 = c.l1s["l1a"], c.l2

        async def scenario() -> None:
            assert await _status(l1) == SERVING and await _status(l2) == SERVING
            c.procs[0].kill()
            c.procs[0].wait()
            await _wait_status(l1, NOT_SERVING, HEALTH_FLIP_BOUND)
            await _wait_status(l2, NOT_SERVING, HEALTH_FLIP_BOUND)
            # L1 refuses work that needs L0 while it says NOT_SERVING.
            async with cluster.insecure_channel(l1) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await l1_pb2_grpc.L1ServiceStub(ch).CreateGuest(l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=1 << 20), timeout=5)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            port = c.l0.rsplit(":", 1)[1]
            c.procs[0] = cluster._spawn(["serve", "l0", "--host", "127.0.0.1", "--port", port], f"{c.log_dir}/l0.log")
            await _wait_status(l1, SERVING, HEALTH_FLIP_BOUND + 5)
            await _wait_status(l2, SERVING, HEALTH_FLIP_BOUND + 5)
            async with cluster.insecure_channel(l1) as ch:
                r = await l1_pb2_grpc.L1ServiceStub(ch).CreateGuest(l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=1 << 20), timeout=10)
                assert r.lpid > 0
            # A frozen L0 (its sockets stay open): only keepalive can tell, within its bound.
            os.kill(c.procs[0].pid, signal.SIGSTOP)
            try:
                await _wait_status(l1, NOT_SERVING, DEAD_PEER_BOUND + 1)
                await _wait_status(l2, NOT_SERVING, DEAD_PEER_BOUND + 1)
            finally:
                os.kill(c.procs[0].pid, signal.SIGCONT)
            await _wait_status(l1, SERVING, HEALTH_FLIP_BOUND + 5)
            await _wait_status(l2, SERVING, HEALTH_FLIP_BOUND + 5)

        asyncio.run(scenario())
        with open(f"{c.log_dir}/l1a.log", encoding="utf-8") as fh:
            l1_log = fh.read()
        with open(f"{c.log_dir}/l2.log", encoding="utf-8") as fh:
            l2_log = fh.read()
    # Each flip is logged: SERVING (registered), NOT_SERVING (L0 died), SERVING (back),
    # NOT_SERVING (L0 frozen), SERVING (thawed).
    assert re.findall(r'"status": "(\w+)"', "\n".join(line for line in l1_log.splitlines() if '"event": "health"' in line)) == [
        "SERVING",
        "NOT_SERVING",
        "SERVING",
        "NOT_SERVING",
        "SERVING",
    ]
    assert '"serving": false' in l2_log and '"serving": true' in l2_log


def test_l2_without_l0_flag_watches_the_l0_its_vcpus_used() -> None:
    with cluster.local_cluster(("l1a",)) as c:

        async def scenario() -> None:
            assert await _status(c.l2) == SERVING  # no L0 known yet: nothing to follow
            async with cluster.insecure_channel(c.l2) as ch:
                wl = l2_pb2.Workload(pattern="hot", accesses=100, seed=1, footprint_bytes=1 << 20)
                r = await l2_pb2_grpc.L2ServiceStub(ch).RunWorkload(l2_pb2.RunWorkloadRequest(l1_address=c.l1s["l1a"], vcpus=1, workload=wl), timeout=60)
                assert r.report.errors == 0 and r.report.accesses == 100
            assert await _status(c.l2) == SERVING
            c.procs[0].kill()
            c.procs[0].wait()
            await _wait_status(c.l2, NOT_SERVING, HEALTH_FLIP_BOUND)
            port = c.l0.rsplit(":", 1)[1]
            c.procs[0] = cluster._spawn(["serve", "l0", "--host", "127.0.0.1", "--port", port], f"{c.log_dir}/l0.log")
            await _wait_status(c.l2, SERVING, HEALTH_FLIP_BOUND + 5)

        asyncio.run(scenario())


@pytest.fixture(scope="module")
def lc() -> Iterator[cluster.LocalCluster]:
    with cluster.local_cluster(("l1a",)) as c:
        yield c


def _l0_log(c: cluster.LocalCluster) -> str:
    with open(f"{c.log_dir}/l0.log", encoding="utf-8") as fh:
        return fh.read()


def test_run_cancelled_right_after_attach_logs_no_traceback(lc: cluster.LocalCluster) -> None:
    """Cancel Run streams right after attach, while L0 is still streaming a batch's results.

    L0's Run generator is then left suspended at a yield and finalised later in another
    Context; resetting its structlog contextvars tokens there raised ValueError (a traceback
    per stream in L0's log, about one cancel in two before the fix).
    """
    n = 12

    async def scenario() -> None:
        async with cluster.insecure_channel(lc.l0) as ch0, cluster.insecure_channel(lc.l1s["l1a"]) as ch1:
            l0, l1 = l0_pb2_grpc.L0ServiceStub(ch0), l1_pb2_grpc.L1ServiceStub(ch1)
            lpid = (await l1.CreateGuest(l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=16 << 20), timeout=10)).lpid
            before = dict((await l0.GetStats(l0_pb2.GetStatsRequest(), timeout=10)).counters.values).get("svc.run_streams_closed", 0)
            for vcpu_id in range(n):
                a = await l1.AttachVcpu(l1_pb2.AttachVcpuRequest(lpid=lpid, vcpu_id=vcpu_id), timeout=10)
                batch = l0_pb2.AccessBatch(batch_id=1, addresses=[(k % 256) << 16 for k in range(4096)], kinds=bytes([1] * 4096))
                reqs = [l0_pb2.RunRequest(attach=l0_pb2.RunAttach(run_token=a.run_token)), l0_pb2.RunRequest(batch=batch)]

                async def requests(reqs: list[l0_pb2.RunRequest] = reqs) -> AsyncIterator[l0_pb2.RunRequest]:
                    for r in reqs:
                        yield r
                    await asyncio.Event().wait()  # keep the stream open until cancelled

                call = l0.Run(requests())
                for want in ("attached", "results"):
                    msg = await call.read()
                    assert isinstance(msg, l0_pb2.RunResponse) and msg.WhichOneof("message") == want
                call.cancel()  # right after attach, with results still coming
            deadline = time.monotonic() + 10
            while dict((await l0.GetStats(l0_pb2.GetStatsRequest(), timeout=10)).counters.values).get("svc.run_streams_closed", 0) - before < n:
                assert time.monotonic() < deadline, "L0 did not close the cancelled streams"
                await asyncio.sleep(0.05)

    asyncio.run(scenario())
    time.sleep(1.0)  # generators left at a yield are finalised by the garbage collector
    log = _l0_log(lc)
    assert log.count('"event": "vcpu_detached"') >= n
    assert "Traceback" not in log and "different Context" not in log


def _bad_request(e: grpc.aio.AioRpcError) -> error_details_pb2.BadRequest:
    st = rpc_status.from_call(e)
    assert st is not None
    br = error_details_pb2.BadRequest()
    assert st.details[0].Unpack(br)
    return br


def test_corrupt_request_bytes_answered_invalid_argument(lc: cluster.LocalCluster) -> None:
    corrupt = b"\xff\xff\xff\xff"

    async def scenario() -> None:
        async with cluster.insecure_channel(lc.l0) as ch:
            ident = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
            # unary-unary (L0's own servicer)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await ch.unary_unary(f"/{L0_SERVICE_NAME}/GetStats", **ident)(corrupt, timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid GetStats request" in (e.value.details() or "")
            assert _bad_request(e.value).field_violations[0].field == "request"
            # unary-unary of the health service (not ours: the interceptor covers every handler)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await ch.unary_unary("/grpc.health.v1.Health/Check", **ident)(corrupt, timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # unary-stream written with context.write (Health.Watch)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in ch.unary_stream("/grpc.health.v1.Health/Watch", **ident)(corrupt, timeout=5):
                    pass
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # stream-stream: a corrupt first message on Run
            call = ch.stream_stream(f"/{L0_SERVICE_NAME}/Run", **ident)(iter([corrupt]), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in call:
                    pass
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # and the server is fine afterwards
            r = await l0_pb2_grpc.L0ServiceStub(ch).GetStats(l0_pb2.GetStatsRequest(), timeout=5)
            assert r.counters.values["svc.l1_sessions"] == 1

    asyncio.run(scenario())
    assert "Traceback" not in _l0_log(lc)


def test_second_serve_on_a_busy_port_fails_with_one_line(lc: cluster.LocalCluster) -> None:
    port = lc.l0.rsplit(":", 1)[1]
    exe = os.path.join(os.path.dirname(sys.executable), "nestmmu")
    r = subprocess.run([exe, "serve", "l0", "--host", "127.0.0.1", "--port", port], capture_output=True, text=True, timeout=30)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert r.stderr.strip() == f"nestmmu serve: l0: cannot listen on 127.0.0.1:{port} (address already in use)"
    assert '"serving"' not in r.stdout

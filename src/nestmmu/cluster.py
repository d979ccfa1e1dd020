"""Client-side orchestration of a running cluster: local processes, the default workload, reports.

Used by ``nestmmu demo`` / ``workload`` / ``audit`` / ``bench`` and by the integration tests.
Everything here talks to the services only through their gRPC surface.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nestmmu.protos import common_pb2, l0_pb2, l0_pb2_grpc, l1_pb2, l1_pb2_grpc, l2_pb2, l2_pb2_grpc

DEADLINE = 60.0  # seconds; every RPC here carries a deadline


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalCluster:
    """L0, L1s and an L2 as child processes on loopback."""

    l0: str
    l1s: dict[str, str]
    l2: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    log_dir: str = ""

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def kill_l1(self, name: str) -> None:
        """SIGKILL an L1 process (the tests' 'L1 dies')."""
        idx = 1 + list(self.l1s).index(name)
        self.procs[idx].kill()
        self.procs[idx].wait()


def _spawn(args: list[str], log_path: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen([sys.executable, "-m", "nestmmu.cli", *args], stdout=out, stderr=subprocess.STDOUT, env=env)


@contextlib.contextmanager
def local_cluster(
    l1_names: tuple[str, ...] = ("l1a", "l1b"), log_dir: str | None = None, l0_args: tuple[str, ...] = (), timeout: float = 30.0
) -> Iterator[LocalCluster]:
    """Start the services as processes on free loopback ports; stop them on exit."""
    import tempfile

    log_dir = log_dir or tempfile.mkdtemp(prefix="nestmmu-")
    p0 = free_port()
    c = LocalCluster(f"127.0.0.1:{p0}", {}, "", log_dir=log_dir)
    try:
        c.procs.append(_spawn(["serve", "l0", "--host", "127.0.0.1", "--port", str(p0), *l0_args], f"{log_dir}/l0.log"))
        for name in l1_names:
            p = free_port()
            c.l1s[name] = f"127.0.0.1:{p}"
            c.procs.append(_spawn(["serve", "l1", "--name", name, "--l0", c.l0, "--host", "127.0.0.1", "--port", str(p)], f"{log_dir}/{name}.log"))
        p2 = free_port()
        c.l2 = f"127.0.0.1:{p2}"
        c.procs.append(_spawn(["serve", "l2", "--host", "127.0.0.1", "--port", str(p2)], f"{log_dir}/l2.log"))
        addrs = [c.l0, *c.l1s.values(), c.l2]
        _run_blocking(lambda: wait_healthy(addrs, timeout))
        _run_blocking(lambda: wait_l1s_registered(c.l0, len(l1_names), timeout))
        yield c
    finally:
        c.stop()


def _run_blocking(make: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """asyncio.run, also when called from code that already runs an event loop (a thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(make())
        return
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        ex.submit(lambda: asyncio.run(make())).result()


async def wait_healthy(addresses: list[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for addr in addresses:
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                try:
                    r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"service at {addr} not healthy after {timeout}s")
                await asyncio.sleep(0.1)


async def wait_l1s_registered(l0: str, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(l0) as ch:
        stub = l0_pb2_grpc.L0ServiceStub(ch)
        while True:
            r = await stub.GetStats(l0_pb2.GetStatsRequest(), timeout=5.0)
            if len(r.l1_summaries) >= n:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(r.l1_summaries)} of {n} L1s registered with L0 after {timeout}s")
            await asyncio.sleep(0.1)


# ---------------------------------------------------------------- the default scenario
@dataclass(frozen=True)
class GuestPlan:
    page_shift: int
    memory: int
    vcpus: int
    regions: tuple[tuple[int, int, int, bool, bool, bool], ...] = ()  # (kind, n_gpa, size, r, w, x)


def default_plan() -> list[GuestPlan]:
    """Per L1: a 64K-page guest with ROM, MMIO and a read-only region, and a 2M-page guest."""
    rom = l1_pb2.GUEST_REGION_KIND_READ_ONLY_L1_SLOT
    mmio = l1_pb2.GUEST_REGION_KIND_MMIO_HOLE
    prot = l1_pb2.GUEST_REGION_KIND_PROTECTED
    return [
        GuestPlan(
            16,
            64 << 20,
            2,
            ((rom, 32 << 20, 2 << 20, True, True, True), (mmio, 34 << 20, 2 << 20, True, True, False), (prot, 36 << 20, 2 << 20, True, False, False)),
        ),
        GuestPlan(21, 64 << 20, 2),
    ]


async def churn(jobs: list[tuple[str, str, int, GuestPlan]], l0: str | None, footprint: int, seed: int, stop: asyncio.Event, counts: dict[str, int]) -> None:
    """While the vCPUs run: L1 unmaps and remaps pages (each followed by its invalidation
    hcall), and, given L0, the host migrates pages backing the guests.  Seeded choices."""
    import random

    rng = random.Random(seed)
    chans = {addr: grpc.aio.insecure_channel(addr) for _, addr, _, _ in jobs}
    ch0 = grpc.aio.insecure_channel(l0) if l0 else None
    try:
        while not stop.is_set():
            name, addr, lpid, g = jobs[rng.randrange(len(jobs))]
            stub = l1_pb2_grpc.L1ServiceStub(chans[addr])
            size = 1 << g.page_shift
            n_gpa = rng.randrange(min(footprint, g.memory) // size) * size
            op = rng.choice(("unmap", "remap", "migrate") if ch0 else ("unmap", "remap"))
            try:
                if op == "unmap":
                    r = await stub.UnmapPages(l1_pb2.UnmapPagesRequest(lpid=lpid, n_gpa=n_gpa, length=size), timeout=DEADLINE)
                    counts["l1_unmaps"] = counts.get("l1_unmaps", 0) + r.pages_changed
                elif op == "remap":
                    r2 = await stub.RemapPages(l1_pb2.RemapPagesRequest(lpid=lpid, n_gpa=n_gpa, length=size), timeout=DEADLINE)
                    counts["l1_remaps"] = counts.get("l1_remaps", 0) + r2.pages_changed
                elif ch0 is not None:
                    w = await stub.WalkTree(l1_pb2.WalkTreeRequest(lpid=lpid, n_gpa=n_gpa), timeout=DEADLINE)
                    if w.result.ok:
                        m = await l0_pb2_grpc.L0ServiceStub(ch0).HostMigrate(l0_pb2.HostMigrateRequest(l1_name=name, gpa=w.result.l1_gpa), timeout=DEADLINE)
                        counts["host_migrations"] = counts.get("host_migrations", 0) + (m.old_host_address != m.new_host_address)
            except grpc.aio.AioRpcError as e:
                counts["churn_errors"] = counts.get("churn_errors", 0) + 1
                counts["churn_last_error_" + e.code().name] = 1
            await asyncio.sleep(0.02)
    finally:
        for ch in chans.values():
            await ch.close()
        if ch0 is not None:
            await ch0.close()


async def run_default_workload(
    l1s: dict[str, str],
    l2: str,
    accesses: int = 20_000,
    seed: int = 1,
    pattern: str = "hot",
    footprint: int = 40 << 20,
    plan: list[GuestPlan] | None = None,
    l0: str | None = None,
    with_churn: bool = False,
    churn_counts: dict[str, int] | None = None,
    trace_path: str = "",
) -> list[l2_pb2.WorkloadReport]:
    """Create guests on every L1 and run a seeded workload on all of them concurrently.

    With ``with_churn``, L1 tree changes and host migrations run meanwhile (see :func:`churn`).
    """
    plan = plan or default_plan()
    jobs = []
    for name, addr in l1s.items():
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = l1_pb2_grpc.L1ServiceStub(ch)
            for g in plan:
                req = l1_pb2.CreateGuestRequest(page_shift=g.page_shift, memory_bytes=g.memory)
                for kind, start, size, r, w, x in g.regions:
                    req.regions.add(n_gpa=start, size_bytes=size, kind=kind, read=r, write=w, execute=x)
                resp = await stub.CreateGuest(req, timeout=DEADLINE)
                jobs.append((name, addr, resp.lpid, g))
    stop = asyncio.Event()
    counts = churn_counts if churn_counts is not None else {}
    churner = asyncio.create_task(churn(jobs, l0, footprint, seed, stop, counts)) if with_churn else None
    try:
        async with grpc.aio.insecure_channel(l2) as ch:
            stub2 = l2_pb2_grpc.L2ServiceStub(ch)
            calls = [
                stub2.RunWorkload(
                    l2_pb2.RunWorkloadRequest(
                        l1_address=addr,
                        lpid=lpid,
                        vcpus=g.vcpus,
                        page_shift=g.page_shift,
                        workload=l2_pb2.Workload(
                            pattern="trace" if trace_path else pattern,
                            trace_path=trace_path,
                            accesses=accesses,
                            seed=seed + i,
                            footprint_bytes=min(footprint, g.memory),
                            store_fraction=0.3,
                            ifetch_fraction=0.05,
                            batch_size=1024,
                        ),
                    ),
                    timeout=600.0,
                )
                for i, (_, addr, lpid, g) in enumerate(jobs)
            ]
            results = await asyncio.gather(*calls)
    finally:
        stop.set()
        if churner is not None:
            await churner
    return [r.report for r in results]


async def audit(l0: str) -> l0_pb2.AuditResponse:
    async with grpc.aio.insecure_channel(l0) as ch:
        return await l0_pb2_grpc.L0ServiceStub(ch).Audit(l0_pb2.AuditRequest(), timeout=DEADLINE)


def audit_outcome(r: l0_pb2.AuditResponse) -> str:
    """CLEAN, VIOLATIONS or INCONCLUSIVE (an L0 that predates the outcome field: from ok)."""
    if r.violations or not r.ok:
        return "VIOLATIONS"
    if r.outcome == l0_pb2.AUDIT_OUTCOME_INCONCLUSIVE or r.inconclusive_reasons:
        return "INCONCLUSIVE"
    return "CLEAN"


async def l0_counters(l0: str) -> dict[str, int]:
    async with grpc.aio.insecure_channel(l0) as ch:
        r = await l0_pb2_grpc.L0ServiceStub(ch).GetStats(l0_pb2.GetStatsRequest(), timeout=DEADLINE)
    return dict(r.counters.values)


def summarize(
    reports: list[l2_pb2.WorkloadReport], counters: dict[str, int], aud: l0_pb2.AuditResponse | None, churn_counts: dict[str, int] | None = None
) -> dict[str, Any]:
    """The report `nestmmu demo --json` prints."""
    tot: dict[str, int] = {}
    for r in reports:
        for k in ("accesses", "tlb_hits", "misses_sent", "fills", "storage_interrupts", "mmio", "errors", "invalidations_applied", "acks_sent"):
            tot[k] = tot.get(k, 0) + int(getattr(r, k))
    reflected = {k.split(".", 2)[2]: v for k, v in counters.items() if k.startswith("l0.reflected.")}
    invalidations = {k.split(".", 2)[2]: v for k, v in counters.items() if k.startswith("l0.inval.")}
    tlbies = {k.split(".", 2)[2]: v for k, v in counters.items() if k.startswith("svc.invalidations.")}
    out: dict[str, Any] = {
        "accesses": tot.get("accesses", 0),
        "tlb_hits": tot.get("tlb_hits", 0),
        "shadow_hits": counters.get("l0.shadow_hits", 0),
        "nested_faults": counters.get("l0.nested_faults", 0),
        "reflected_to_l1": reflected,
        "rc_faults": counters.get("l0.rc_faults", 0),
        "invalidations": {"hcalls": invalidations, "tlbies": tlbies},
        "broadcast_acks": counters.get("svc.broadcast_acks", 0),
        "broadcast_latency_us": {"p50": counters.get("svc.broadcast_latency_us_p50", 0), "p99": counters.get("svc.broadcast_latency_us_p99", 0)},
        "storage_interrupts": tot.get("storage_interrupts", 0),
        "mmio": tot.get("mmio", 0),
        "errors": tot.get("errors", 0),
        "vcpu_seconds": round(sum(r.seconds for r in reports), 3),
        "churn": dict(sorted((churn_counts or {}).items())),
    }
    if aud is not None:
        out["audit"] = {"ok": aud.ok, "violations": [f"{v.invariant}: {v.detail}" for v in aud.violations], "checked": dict(aud.checked.values)}
    return out


class RawVcpu:
    """A vCPU speaking the run stream directly (tests, bench): no TLB, every access goes to L0.

    It acknowledges every tlbie as soon as it arrives (unless ``ack`` is False, to play a vCPU
    that never answers) and records what it received, in order.
    """

    def __init__(self, stub: l0_pb2_grpc.L0ServiceStub, run_token: str, ack: bool = True) -> None:
        self.ack = ack
        self.q: asyncio.Queue[l0_pb2.RunRequest | None] = asyncio.Queue()
        self.q.put_nowait(l0_pb2.RunRequest(attach=l0_pb2.RunAttach(run_token=run_token)))
        self.call: Any = stub.Run(self._requests())  # type: ignore[arg-type]  # aio stream; stubs type the sync API
        self.attached: asyncio.Future[l0_pb2.RunAttached] = asyncio.get_running_loop().create_future()
        self.done: asyncio.Queue[list[l0_pb2.AccessResults]] = asyncio.Queue()
        self.invalidations: list[common_pb2.Invalidation] = []
        self.log: list[str] = []  # "results" / "invalidate" in arrival order
        self.error: grpc.aio.AioRpcError | None = None
        self._partial: list[l0_pb2.AccessResults] = []
        self._next = 1
        self.task = asyncio.create_task(self._loop())

    async def _requests(self) -> AsyncIterator[l0_pb2.RunRequest]:
        while (m := await self.q.get()) is not None:
            yield m

    async def _loop(self) -> None:
        try:
            async for resp in self.call:
                kind = resp.WhichOneof("message")
                self.log.append(kind)
                if kind == "attached":
                    self.attached.set_result(resp.attached)
                elif kind == "invalidate":
                    self.invalidations.extend(resp.invalidate.invalidations)
                    if self.ack:
                        ids = [i.id for i in resp.invalidate.invalidations]
                        self.q.put_nowait(l0_pb2.RunRequest(ack=l0_pb2.InvalidationAck(invalidation_ids=ids)))
                elif kind == "results":
                    self._partial.append(resp.results)
                    if resp.results.batch_done:
                        self.done.put_nowait(self._partial)
                        self._partial = []
                elif kind == "tlb_dump_request":
                    self.q.put_nowait(l0_pb2.RunRequest(tlb_dump=l0_pb2.TlbDump(id=resp.tlb_dump_request.id)))
        except grpc.aio.AioRpcError as e:
            self.error = e
        except asyncio.CancelledError:
            pass

    async def run(self, addrs: list[int], kinds: list[int], timeout: float = 30.0) -> list[tuple[int, int, int, int, int]]:
        """Send one batch; return (outcome, page, host, flags, dsisr) per access, in order."""
        bid = self._next
        self._next += 1
        self.q.put_nowait(l0_pb2.RunRequest(batch=l0_pb2.AccessBatch(batch_id=bid, addresses=addrs, kinds=bytes(kinds))))
        parts = await asyncio.wait_for(self.done.get(), timeout)
        out: list[tuple[int, int, int, int, int]] = []
        for p in parts:
            out += list(zip(p.outcomes, p.page_addresses, p.host_addresses, p.flags, p.dsisrs, strict=True))
        return out

    async def close(self) -> None:
        self.q.put_nowait(None)
        self.call.cancel()
        self.task.cancel()


@contextlib.asynccontextmanager
async def l0_stub(addr: str) -> AsyncIterator[l0_pb2_grpc.L0ServiceStub]:
    async with grpc.aio.insecure_channel(addr) as ch:
        yield l0_pb2_grpc.L0ServiceStub(ch)


__all__ = ["LocalCluster", "audit", "common_pb2", "default_plan", "l0_counters", "local_cluster", "run_default_workload", "summarize", "wait_healthy"]

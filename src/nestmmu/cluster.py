"""Client-side orchestration of a running cluster: local processes, the default workload, reports.

Used by ``nestmmu demo`` / ``workload`` / ``audit`` / ``bench`` and by the integration tests.
Everything here talks to the services only through their gRPC surface.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nestmmu.core.vcpu import POWER9_TLB_ENTRIES, POWER9_TLB_WAYS
from nestmmu.protos import common_pb2, l0_pb2, l0_pb2_grpc, l1_pb2, l1_pb2_grpc, l2_pb2, l2_pb2_grpc
from nestmmu.services import connection as _connection

DEADLINE = 60.0  # seconds; every RPC here carries a deadline


def insecure_channel(address: str) -> grpc.aio.Channel:
    """A client channel with the keepalive policy every nestmmu client uses (services/connection.py)."""
    return grpc.aio.insecure_channel(address, options=_connection.channel_options())


class ServiceProblem(Exception):
    """A service a command needs cannot be used; the message is one line naming its address."""


class ClusterStartError(Exception):
    """The local cluster did not become healthy; the message names the log directory and
    shows the last lines of the failing service's log."""


def describe_rpc_error(e: grpc.RpcError) -> str:
    """What went wrong talking to a service, as a short phrase ("is unreachable (connection refused)")."""
    code = e.code()
    details = str(e.details() or "")
    low = details.lower()
    if code == grpc.StatusCode.UNAVAILABLE:
        if "connection refused" in low:
            return "is unreachable (connection refused)"
        if "resolv" in low or "lookup" in low or "dns" in low:
            return "cannot be resolved (unknown host name)"
        if "timed out" in low or "timeout" in low or "deadline" in low:
            return "is unreachable (connection timed out)"
        return f"is unavailable ({details})"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "did not answer in time (deadline exceeded)"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return "does not implement this call (another kind of service listens there?)"
    return f"answered {code.name}: {details}"


_NOT_SERVING_HINT = {"L1": " (it has no session with L0)", "L2": " (it reaches no L0)"}


async def check_service(label: str, address: str, service: str, timeout: float = 5.0) -> None:
    """Ask ``address``'s health service about ``service``; ServiceProblem (one line) unless SERVING.

    Tells "nothing listens there" from "a different service listens there" (health NOT_FOUND)
    from "not a gRPC health server" (UNIMPLEMENTED) from "up but not serving".
    """
    async with insecure_channel(address) as ch:
        try:
            r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise ServiceProblem(f"{label} at {address} does not serve {service} (another service listens there?)") from None
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise ServiceProblem(f"{label} at {address} is not a nestmmu service (no gRPC health service)") from None
            raise ServiceProblem(f"{label} at {address} {describe_rpc_error(e)}") from None
    if r.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        raise ServiceProblem(f"{label} at {address} is {status}{_NOT_SERVING_HINT.get(label, '')}")


async def check_services(targets: list[tuple[str, str, str]], timeout: float = 5.0) -> None:
    """check_service for each (label, address, service name), concurrently; the first problem."""
    await asyncio.gather(*(check_service(label, addr, svc, timeout) for label, addr, svc in targets))


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
    #: Keep log_dir after a clean exit (set by callers that found a problem).
    keep_logs: bool = False
    names: list[str] = field(default_factory=list)  # process names, in procs order (l0, l1s, l2)

    def log_tail(self, name: str, lines: int = 12) -> str:
        """The last lines of one service's log (for error messages)."""
        try:
            with open(os.path.join(self.log_dir, f"{name}.log"), encoding="utf-8", errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"

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

    # Process control for fault injection (``nestmmu chaos``): services by name, "l0", an L1
    # name or "l2"; a restarted service gets the same command line (same port) and log file.
    def proc(self, name: str) -> subprocess.Popen[bytes]:
        names = ["l0", *self.l1s, "l2"]
        if name not in names:
            raise KeyError(f"no service {name!r} in this cluster (services: {', '.join(names)})")
        return self.procs[names.index(name)]

    def kill(self, name: str) -> None:
        """SIGKILL a service (kill -9) and reap it."""
        p = self.proc(name)
        if p.poll() is None:
            p.kill()
        p.wait()

    def restart(self, name: str) -> None:
        """Start a killed (or exited) service again with the same arguments; a live one is killed first."""
        old = self.proc(name)
        self.kill(name)
        with open(f"{self.log_dir}/{name}.log", "ab") as out:
            new = subprocess.Popen(old.args, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.procs[self.procs.index(old)] = new

    def pause(self, name: str) -> None:
        """SIGSTOP a service: it keeps its sockets but answers nothing until resumed."""
        self.proc(name).send_signal(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self.proc(name).send_signal(signal.SIGCONT)


def _spawn(args: list[str], log_path: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    # -P: do not put the cwd first on sys.path (a folder holding a clone named "nestmmu"
    # would shadow the installed package and every server would fail to import).
    return subprocess.Popen([sys.executable, "-P", "-m", "nestmmu.cli", *args], stdout=out, stderr=subprocess.STDOUT, env=env)


def _start_failure(c: LocalCluster, err: Exception) -> ClusterStartError:
    """Which service failed to come up, and the end of its log."""
    addrs = [c.l0, *c.l1s.values(), c.l2]
    culprit = next((n for n, p in zip(c.names, c.procs, strict=False) if p.poll() is not None), None)
    if culprit is None:
        culprit = next((n for n, a in zip(c.names, addrs, strict=False) if a and a in str(err)), c.names[0] if c.names else "l0")
    idx = c.names.index(culprit) if culprit in c.names else -1
    exited = f" (exited with {c.procs[idx].returncode})" if idx >= 0 and c.procs[idx].poll() is not None else ""
    tail = c.log_tail(culprit).rstrip()
    return ClusterStartError(f"the local cluster did not start: {err}; {culprit}{exited}, last lines of {c.log_dir}/{culprit}.log:\n{tail}")


@contextlib.contextmanager
def local_cluster(
    l1_names: tuple[str, ...] = ("l1a", "l1b"),
    log_dir: str | None = None,
    l0_args: tuple[str, ...] = (),
    timeout: float = 30.0,
    l2_watch_l0: bool = False,
    l1_args: tuple[str, ...] = (),
) -> Iterator[LocalCluster]:
    """Start the services as processes on free loopback ports; stop them on exit.

    A temporary log directory (``log_dir`` not given) is removed after a clean exit and kept
    (its path printed on stderr) when the block raised or set ``keep_logs``. When a service
    does not become healthy: :class:`ClusterStartError` naming it, the log directory and the
    end of its log. ``l2_watch_l0``: start L2 with ``--l0`` (its health follows L0's).
    ``l1_args``: extra ``serve l1`` options for every L1 (e.g. ``--forget-flush``).
    """
    import shutil
    import tempfile

    own_dir = log_dir is None
    log_dir = log_dir or tempfile.mkdtemp(prefix="nestmmu-")
    p0 = free_port()
    c = LocalCluster(f"127.0.0.1:{p0}", {}, "", log_dir=log_dir)
    clean = False
    try:
        c.names.append("l0")
        c.procs.append(_spawn(["serve", "l0", "--host", "127.0.0.1", "--port", str(p0), *l0_args], f"{log_dir}/l0.log"))
        for name in l1_names:
            p = free_port()
            c.l1s[name] = f"127.0.0.1:{p}"
            c.names.append(name)
            c.procs.append(_spawn(["serve", "l1", "--name", name, "--l0", c.l0, "--host", "127.0.0.1", "--port", str(p), *l1_args], f"{log_dir}/{name}.log"))
        p2 = free_port()
        c.l2 = f"127.0.0.1:{p2}"
        c.names.append("l2")
        watch = ["--l0", c.l0] if l2_watch_l0 else []
        c.procs.append(_spawn(["serve", "l2", "--host", "127.0.0.1", "--port", str(p2), *watch], f"{log_dir}/l2.log"))
        addrs = [c.l0, *c.l1s.values(), c.l2]
        try:
            _run_blocking(lambda: wait_healthy(addrs, timeout))
            _run_blocking(lambda: wait_l1s_registered(c.l0, len(l1_names), timeout))
        except (TimeoutError, grpc.RpcError) as e:
            raise _start_failure(c, e) from None
        yield c
        clean = not c.keep_logs
    finally:
        c.stop()
        if own_dir and clean:
            shutil.rmtree(log_dir, ignore_errors=True)
        elif own_dir:
            print(f"nestmmu: service logs kept in {log_dir}", file=sys.stderr)


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
        async with insecure_channel(addr) as ch:
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
    async with insecure_channel(l0) as ch:
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


def host_backed(g: GuestPlan, n_gpa: int) -> bool:
    """Whether the L1 address behind ``n_gpa`` is memory L0 backs with host pages.

    An MMIO-hole region is mapped by L1 onto an address in no memslot: there is no host page
    to migrate there, and L0 rightly refuses HostMigrate for it (INVALID_ARGUMENT, "no memslot").
    """
    mmio = l1_pb2.GUEST_REGION_KIND_MMIO_HOLE
    return not any(kind == mmio and start <= n_gpa < start + size for kind, start, size, *_ in g.regions)


async def churn(
    jobs: list[tuple[str, str, int, GuestPlan]],
    l0: str | None,
    footprint: int,
    seed: int,
    stop: asyncio.Event,
    counts: dict[str, int],
    gate: asyncio.Lock | None = None,
) -> None:
    """While the vCPUs run: L1 unmaps and remaps pages (each followed by its invalidation
    hcall), and, given L0, the host migrates pages backing the guests.  Seeded choices.
    Each operation runs holding ``gate`` (if given): whoever holds it pauses the churn."""
    import random

    rng = random.Random(seed)
    chans = {addr: insecure_channel(addr) for _, addr, _, _ in jobs}
    ch0 = insecure_channel(l0) if l0 else None
    try:
        while not stop.is_set():
            name, addr, lpid, g = jobs[rng.randrange(len(jobs))]
            stub = l1_pb2_grpc.L1ServiceStub(chans[addr])
            size = 1 << g.page_shift
            n_gpa = rng.randrange(min(footprint, g.memory) // size) * size
            op = rng.choice(("unmap", "remap", "migrate") if ch0 else ("unmap", "remap"))
            if op == "migrate" and not host_backed(g, n_gpa):
                counts["migrations_skipped_mmio"] = counts.get("migrations_skipped_mmio", 0) + 1
                await asyncio.sleep(0.02)
                continue
            if gate is not None:
                await gate.acquire()
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
            finally:
                if gate is not None:
                    gate.release()
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
    batch_size: int = 1024,
    data: bool = False,
    attached_audit: dict[str, Any] | None = None,
    hcall_every: int = 0,
    virtual: bool = False,
    pid: int = 1,
    no_gtse: bool = False,
    tlb_entries: int = POWER9_TLB_ENTRIES,
    tlb_ways: int = POWER9_TLB_WAYS,
) -> list[l2_pb2.WorkloadReport]:
    """Create guests on every L1 and run a seeded workload on all of them concurrently.

    With ``virtual``, the vCPUs run process ``pid`` of each guest's L2 kernel: effective
    addresses through the 2-D walk (a trace replays unfolded; the synthetic patterns span at
    most ``VIRTUAL_FOOTPRINT`` of EAs, so the kernel's pages fit the guests); the guests are
    data guests (their page tables are memory contents L1 must keep when it moves pages).
    ``no_gtse``: the L2 kernels flush with process-scoped H_RPT_INVALIDATE instead of tlbie.

    With ``with_churn``, L1 tree changes and host migrations run meanwhile (see :func:`churn`).
    With ``data``, the guests are data guests and the workloads run in data mode (checked).
    With ``attached_audit`` (a dict, filled in) and ``l0``: one audit is taken while vCPUs are
    attached (the churn paused around it), so the vCPUs' TLBs are dumped and I5 is checked.
    ``hcall_every``: each vCPU's program calls H_PUT_TERM_CHAR every that many accesses.
    ``tlb_entries``/``tlb_ways``: each vCPU's TLB geometry (entries 0 = unbounded).
    """
    plan = plan or default_plan()
    if virtual:
        footprint = min(footprint, VIRTUAL_FOOTPRINT)
    jobs = []
    for name, addr in l1s.items():
        async with insecure_channel(addr) as ch:
            stub = l1_pb2_grpc.L1ServiceStub(ch)
            for g in plan:
                req = l1_pb2.CreateGuestRequest(page_shift=g.page_shift, memory_bytes=g.memory, data=data or virtual)
                for kind, start, size, r, w, x in g.regions:
                    req.regions.add(n_gpa=start, size_bytes=size, kind=kind, read=r, write=w, execute=x)
                resp = await stub.CreateGuest(req, timeout=DEADLINE)
                jobs.append((name, addr, resp.lpid, g))
    stop = asyncio.Event()
    counts = churn_counts if churn_counts is not None else {}
    churn_gate = asyncio.Lock()
    churner = asyncio.create_task(churn(jobs, l0, footprint, seed, stop, counts, churn_gate)) if with_churn else None
    auditor = asyncio.create_task(_audit_while_attached(l0, stop, churn_gate, attached_audit)) if l0 and attached_audit is not None else None
    try:
        async with insecure_channel(l2) as ch:
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
                            batch_size=batch_size,
                            data=data,
                            data_fresh=data,  # the guests were created just above
                            hcall_every=hcall_every,
                            virtual_mode=virtual,
                            pid=pid if virtual else 0,
                            unmap_every=L2_UNMAP_EVERY if virtual and with_churn else 0,
                            l2_rpt_invalidate=virtual and no_gtse,
                            tlb_entries=tlb_entries,
                            tlb_ways=tlb_ways,
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
        if auditor is not None:
            await auditor
    return [r.report for r in results]


#: Virtual mode: the most effective-address span the synthetic patterns use in the default
#: plan (the L2 kernel of its 64K guest has 24 MiB of plain RAM for pages below the regions).
VIRTUAL_FOOTPRINT = 16 << 20
#: Virtual mode with churn: each vCPU's process munmaps a page after every this many batches
#: (process-scoped tlbies from the L2 kernel to every vCPU of its guest).
L2_UNMAP_EVERY = 4
#: The audit taken while vCPUs run waits for this many shadow leaves (vCPUs well under way).
ATTACHED_AUDIT_MIN_LEAVES = 64
ATTACHED_AUDIT_POLL_S = 0.2


async def _audit_while_attached(l0: str, stop: asyncio.Event, churn_gate: asyncio.Lock, out: dict[str, Any]) -> None:
    """Once vCPUs are attached and have faulted pages in (L0's run_streams and shadow_leaves
    gauges), pause the churn and take one audit: their TLBs then hold entries to check (I5)."""
    async with insecure_channel(l0) as ch:
        stub = l0_pb2_grpc.L0ServiceStub(ch)
        while not stop.is_set():
            r = await stub.GetStats(l0_pb2.GetStatsRequest(), timeout=DEADLINE)
            values = r.counters.values
            if values.get("svc.run_streams", 0) > 0 and values.get("l0.shadow_leaves", 0) >= ATTACHED_AUDIT_MIN_LEAVES:
                break
            # Not faster: each GetStats makes L0 count its nested rmap and walk every shadow
            # tree (gauges), work on L0's loop that the running vCPUs would wait behind.
            await asyncio.sleep(ATTACHED_AUDIT_POLL_S)
        else:
            return
        async with churn_gate:  # no L1 tree change or migration in flight while it looks
            aud = await stub.Audit(l0_pb2.AuditRequest(), timeout=DEADLINE)
    out.update(audit_summary(aud))


async def audit(l0: str) -> l0_pb2.AuditResponse:
    async with insecure_channel(l0) as ch:
        return await l0_pb2_grpc.L0ServiceStub(ch).Audit(l0_pb2.AuditRequest(), timeout=DEADLINE)


def audit_summary(r: l0_pb2.AuditResponse) -> dict[str, Any]:
    """An audit as the demo/workload/chaos reports show it."""
    return {
        "ok": r.ok,
        "outcome": audit_outcome(r),
        "violations": [f"{v.invariant}: {v.detail}" for v in r.violations],
        "inconclusive_reasons": list(r.inconclusive_reasons),
        "checked": dict(r.checked.values),
    }


def audit_outcome(r: l0_pb2.AuditResponse) -> str:
    """CLEAN, VIOLATIONS or INCONCLUSIVE (an L0 that predates the outcome field: from ok)."""
    if r.violations or not r.ok:
        return "VIOLATIONS"
    if r.outcome == l0_pb2.AUDIT_OUTCOME_INCONCLUSIVE or r.inconclusive_reasons:
        return "INCONCLUSIVE"
    return "CLEAN"


async def l0_counters(l0: str) -> dict[str, int]:
    async with insecure_channel(l0) as ch:
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
        "tlb_evictions": sum(int(r.extra.get("tlb_evictions", 0)) for r in reports),
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
        "error_details": [d for r in reports for d in r.error_details],
    }
    if any(r.data_stores or r.data_loads_checked for r in reports):
        out["data"] = {
            "data_stores": sum(r.data_stores for r in reports),
            "data_loads_checked": sum(r.data_loads_checked for r in reports),
            "lost_writes": sum(r.lost_writes for r in reports),
            "misplaced_writes": sum(r.misplaced_writes for r in reports),
            "details": [d for r in reports for d in r.lost_write_details][:16],
        }
    if any(r.guest_faults or r.kernel_stores for r in reports):
        out["virtual"] = virtual_summary(reports, counters)
    if aud is not None:
        out["audit"] = audit_summary(aud)
    return out


def virtual_summary(reports: list[l2_pb2.WorkloadReport], counters: dict[str, int]) -> dict[str, Any]:
    """Virtual mode: what the L2 kernels did and what the 2-D walks cost (L0's counters).

    ``walk_refs_2d`` counts every memory reference of L0's 2-D walks: ``walk_refs_process``
    reads of L2's process table and tree entries and ``walk_refs_shadow`` reads of the shadow
    table made to translate those entries' L2 real addresses and the final one."""
    out: dict[str, Any] = {
        "guest_faults": sum(r.guest_faults for r in reports),
        "guest_faults_handled": sum(r.guest_faults_handled for r in reports),
        "segfaults": sum(r.segfaults for r in reports),
        "kernel_stores": sum(r.kernel_stores for r in reports),
        "process_tlbies": sum(r.process_tlbies for r in reports),
        "munmaps": sum(r.extra.get("munmaps", 0) for r in reports),
        "l2_rpt_invalidates": sum(r.extra.get("l2_rpt_invalidates", 0) for r in reports),
    }
    if counters:  # L0's counters (workload without --l0 has none)
        walks = counters.get("l0.walks_2d", 0)
        refs = counters.get("l0.walk_refs_2d", 0)
        out |= {
            "walks_2d": walks,
            "walk_refs_2d": refs,
            "walk_refs_process": counters.get("l0.walk_refs_process", 0),
            "walk_refs_shadow": counters.get("l0.walk_refs_shadow", 0),
            "walk_refs_per_2d_walk": round(refs / walks, 2) if walks else 0,
            "prtable_faults": counters.get("l0.prtable_faults", 0),
        }
    out["segfault_details"] = [d for r in reports for d in r.segfault_details][:16]
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
        self.error_reasons: dict[int, str] = {}  # ERROR outcomes' reasons, by index in their batch
        self.ended: str | None = None  # the reason L0 gave before ending the stream (RunEnded)
        self.error: grpc.aio.AioRpcError | None = None
        #: Virtual mode: the L2 real page of each access of the last batch run (0 unless FILL).
        self.real_pages: list[int] = []
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
                elif kind == "ended":
                    self.ended = resp.ended.reason
                elif kind == "results":
                    self.error_reasons.update(resp.results.error_reasons)
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

    async def run(self, addrs: list[int], kinds: list[int], timeout: float = 30.0, pid: int = -1) -> list[tuple[int, int, int, int, int]]:
        """Send one batch; return (outcome, page, host, flags, dsisr) per access, in order.
        ``pid`` >= 0: a virtual-mode batch (effective addresses of that PID); the L2 real page
        of each fill is then in ``real_pages``."""
        bid = self._next
        self._next += 1
        batch = l0_pb2.AccessBatch(batch_id=bid, addresses=addrs, kinds=bytes(kinds))
        if pid >= 0:
            batch.virtual_mode = True
            batch.pid = pid
        self.q.put_nowait(l0_pb2.RunRequest(batch=batch))
        parts = await asyncio.wait_for(self.done.get(), timeout)
        out: list[tuple[int, int, int, int, int]] = []
        self.real_pages = []
        for p in parts:
            out += list(zip(p.outcomes, p.page_addresses, p.host_addresses, p.flags, p.dsisrs, strict=True))
            self.real_pages += list(p.real_page_addresses) or [0] * len(p.outcomes)
        return out

    async def close(self) -> None:
        self.q.put_nowait(None)
        self.call.cancel()
        self.task.cancel()


@contextlib.asynccontextmanager
async def l0_stub(addr: str) -> AsyncIterator[l0_pb2_grpc.L0ServiceStub]:
    async with insecure_channel(addr) as ch:
        yield l0_pb2_grpc.L0ServiceStub(ch)


__all__ = ["LocalCluster", "audit", "common_pb2", "default_plan", "l0_counters", "local_cluster", "run_default_workload", "summarize", "wait_healthy"]

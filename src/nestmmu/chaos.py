"""``nestmmu chaos``: a seeded fault-injection campaign against a running cluster.

Each episode creates one guest per L1, runs a workload on it through L2 while L1 tree changes
and host migrations churn (:func:`nestmmu.cluster.churn`), injects one fault while they run,
holds it, heals it, waits until the cluster is healthy again and then checks what must hold
after any fault the real system survives:

* **recovery**: every service healthy, every L1 registered with L0 again and connected;
* **service**: a new workload succeeds (zero errors) on every L1, on the episode's guest if
  it survived the fault, else on a fresh one;
* **audit**: clean after the heal (an audit taken *while* the fault lasts may be
  inconclusive; its violations fail the episode only where the audit can say inconclusive);
* **no leaks**: after the episode's guests are destroyed and the vCPUs gone: L0 has one
  session per L1, no run stream, no LPID not accounted for by an L1 or a registered nested
  guest, no nested guest (shadow tree) for a guest its L1 no longer has;
* **bounded invalidation**: no tlbsync wait longer than the ack timeout (plus a small grace
  for L0's event loop to wake up);
* **clear errors**: every L2 access ran or is counted in ``accesses_not_run`` and every
  failed vCPU has a line in ``error_details``; a RunWorkload that failed as a whole (its L2
  was killed) failed with a gRPC status and a message.

The fault schedule is a pure function of the seed (:func:`schedule`), so a campaign is
reproducible up to the timing of the machine. What "survive" means for each fault is in
docs/design-notes.md ("Fault injection").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import grpc

from nestmmu import cluster
from nestmmu.protos import l0_pb2, l0_pb2_grpc, l1_pb2, l1_pb2_grpc, l2_pb2, l2_pb2_grpc

#: Faults of a local cluster of processes: SIGKILL then restart, SIGSTOP then SIGCONT.
LOCAL_FAULTS = ("kill:l0", "kill:l1", "kill:l2", "stop:l0", "stop:l1", "stop:l2")
#: Faults of the container cluster add network cuts and tc netem delay/loss.
COMPOSE_FAULTS = (*LOCAL_FAULTS, "partition:l0", "partition:l1", "partition:l2", "netem:l0", "netem:l1", "netem:l2")
#: The L0 event loop may need a moment to wake up after the ack timeout fired: a tlbsync wait
#: counts as over its bound only past ack_timeout + this.
WAIT_GRACE_S = 0.5
_DATA_MODE = "data_mode" in l2_pb2.Workload.DESCRIPTOR.fields_by_name
#: An AuditResponse with ``outcome`` can say "inconclusive" instead of reporting what it could
#: not look at as violations; then violations found while a fault lasts are failures too.
AUDIT_CAN_BE_INCONCLUSIVE = "outcome" in l0_pb2.AuditResponse.DESCRIPTOR.fields_by_name
#: Error texts that do not say what happened: grpc's client sets "Internal error from Core"
#: when a write fails on a call the server already ended, hiding the server's status.
OPAQUE_ERRORS = ("Internal error from Core",)


def is_clear(detail: str) -> bool:
    """An error line that says what happened (not empty, not one of grpc's opaque statuses)."""
    return bool(detail.strip()) and not any(o in detail for o in OPAQUE_ERRORS)


# ------------------------------------------------------------------ the schedule (pure)
@dataclass(frozen=True)
class Episode:
    """One fault: what, on which service, when and for how long."""

    index: int
    fault: str  # "kind:level", e.g. "kill:l1"
    target: str  # service name: "l0", an L1 name, "l2"
    onset: float  # seconds after the workloads started
    hold: float  # seconds the fault lasts (kill: how long the service stays dead)
    seed: int  # workload and churn seed of this episode
    delay_ms: int = 0  # netem only
    loss_pct: float = 0.0  # netem only

    @property
    def kind(self) -> str:
        return self.fault.split(":")[0]


def schedule(
    seed: int, episodes: int, faults: tuple[str, ...] = LOCAL_FAULTS, l1_names: tuple[str, ...] = ("l1a", "l1b"), max_hold: float = 6.0
) -> list[Episode]:
    """The campaign's episodes, a pure function of its arguments.

    Faults come in shuffled rounds (every fault once per round of ``len(faults)`` episodes), so
    a campaign of at least ``len(faults)`` episodes reaches every fault kind."""
    if episodes < 0:
        raise ValueError("episodes must be >= 0")
    if not faults:
        raise ValueError("at least one fault kind is needed")
    for fk in faults:
        if fk not in COMPOSE_FAULTS:
            raise ValueError(f"unknown fault {fk!r} (known: {', '.join(COMPOSE_FAULTS)})")
    if max_hold < 0.5:
        raise ValueError("max_hold must be at least 0.5 s")
    rng = random.Random(seed)
    out: list[Episode] = []
    round_: list[str] = []
    for i in range(episodes):
        if not round_:
            round_ = list(faults)
            rng.shuffle(round_)
        fault = round_.pop()
        level = fault.split(":")[1]
        target = rng.choice(l1_names) if level == "l1" else level
        onset = round(rng.uniform(0.2, 1.0), 3)
        hold = round(rng.uniform(0.5, max_hold), 3)
        delay, loss = rng.choice((20, 50, 100, 200)), rng.choice((0.0, 1.0, 5.0, 10.0))
        wseed = rng.randrange(1, 1 << 31)
        netem = fault.startswith("netem:")
        out.append(Episode(i + 1, fault, target, onset, hold, wseed, delay if netem else 0, loss if netem else 0.0))
    return out


# ------------------------------------------------------------------ fault targets
class Targets(Protocol):
    """Where the services are and how to hurt and heal them."""

    mode: str
    l0: str  # addresses this client dials
    l1s: dict[str, str]
    l2: str
    l1_for_l2: dict[str, str]  # L1 addresses as the L2 service dials them
    log_hint: str

    def inject(self, ep: Episode) -> None: ...
    def heal(self, ep: Episode) -> None: ...
    def refresh(self) -> None: ...
    def cleanup(self) -> None: ...


class LocalTargets:
    """A :class:`nestmmu.cluster.LocalCluster`: kill -9 / restart, SIGSTOP / SIGCONT."""

    mode = "local"

    def __init__(self, c: cluster.LocalCluster) -> None:
        self.c = c
        self.l0, self.l1s, self.l2 = c.l0, dict(c.l1s), c.l2
        self.l1_for_l2 = dict(c.l1s)
        self.log_hint = c.log_dir
        self._stopped: set[str] = set()

    def inject(self, ep: Episode) -> None:
        if ep.kind == "kill":
            self.c.kill(ep.target)
        elif ep.kind == "stop":
            self.c.pause(ep.target)
            self._stopped.add(ep.target)
        else:
            raise ValueError(f"fault {ep.fault} needs the container cluster (--compose)")

    def heal(self, ep: Episode) -> None:
        if ep.kind == "kill":
            self.c.restart(ep.target)
        elif ep.kind == "stop":
            self.c.resume(ep.target)
            self._stopped.discard(ep.target)

    def refresh(self) -> None:
        pass

    def cleanup(self) -> None:
        for name in list(self._stopped):
            self.c.resume(name)
        self._stopped.clear()


def _docker(*args: str, check: bool = True) -> str:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60, check=False)
    if check and r.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip()


#: Container ports of the services in docker-compose.yml.
COMPOSE_PORTS = {"l0": 50051, "l1a": 50052, "l1b": 50054, "l2": 50053}


class ComposeTargets:
    """The containers of one compose project (docker-compose.yml, started by deploy/up.sh).

    Only containers carrying that project's compose label are ever touched: kill -9 and
    ``docker start``; ``docker pause``/``unpause``; ``docker network disconnect``/``connect``
    (with the service's DNS alias back); ``tc qdisc ... netem`` in the container's eth0
    (the image has iproute2; the services have NET_ADMIN)."""

    mode = "compose"

    def __init__(self, project: str = "nestmmu") -> None:
        self.project = project
        self.ids: dict[str, str] = {}
        for svc in COMPOSE_PORTS:
            cid = _docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={project}", "--filter", f"label=com.docker.compose.service={svc}")
            if not cid:
                raise RuntimeError(f"compose project {project!r} has no {svc} container (start it with deploy/up.sh)")
            self.ids[svc] = cid.splitlines()[0]
        self.l1_for_l2 = {n: f"{n}:{COMPOSE_PORTS[n]}" for n in ("l1a", "l1b")}
        self.log_hint = f"docker compose -p {project} logs"
        self._nets: dict[str, list[str]] = {}
        self._hurt: dict[str, Episode] = {}
        self.l0, self.l2 = "", ""
        self.l1s: dict[str, str] = {}
        self.refresh()

    def netem_unavailable(self) -> str:
        """Why tc netem cannot run in the containers ("" if it can): the qdisc is a kernel
        module of the Docker host (sch_netem), which a container cannot load."""
        cid = self.ids["l0"]
        r = subprocess.run(
            ["docker", "exec", "-u", "0", cid, "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "1ms"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if r.returncode == 0:
            _docker("exec", "-u", "0", cid, "tc", "qdisc", "del", "dev", "eth0", "root")
            return ""
        why = r.stderr.strip() or r.stdout.strip()
        if "unknown" in why.lower():
            why += " (the Docker host's kernel has no sch_netem: `modprobe sch_netem` on the host)"
        return f"tc netem does not work in the containers: {why}"

    def _host_addr(self, svc: str) -> str:
        out = _docker("port", self.ids[svc], f"{COMPOSE_PORTS[svc]}/tcp").splitlines()
        v4 = [a for a in out if a.startswith("127.0.0.1:") or a.startswith("0.0.0.0:")]
        if not v4:
            raise RuntimeError(f"{svc} publishes no 127.0.0.1 port (docker port: {out})")
        return v4[0].replace("0.0.0.0:", "127.0.0.1:")

    def refresh(self) -> None:
        """Host-side addresses (a restarted container may get a new random host port)."""
        self.l0 = self._host_addr("l0")
        self.l1s = {n: self._host_addr(n) for n in ("l1a", "l1b")}
        self.l2 = self._host_addr("l2")

    def inject(self, ep: Episode) -> None:
        cid = self.ids[ep.target]
        self._hurt[ep.target] = ep
        if ep.kind == "kill":
            _docker("kill", "-s", "KILL", cid)
        elif ep.kind == "stop":
            _docker("pause", cid)
        elif ep.kind == "partition":
            nets = json.loads(_docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", cid))
            self._nets[ep.target] = sorted(nets)
            for net in self._nets[ep.target]:
                _docker("network", "disconnect", net, cid)
        elif ep.kind == "netem":
            _docker("exec", "-u", "0", cid, "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", f"{ep.delay_ms}ms", "loss", f"{ep.loss_pct}%")

    def heal(self, ep: Episode) -> None:
        cid = self.ids[ep.target]
        if ep.kind == "kill":
            _docker("start", cid)
        elif ep.kind == "stop":
            _docker("unpause", cid)
        elif ep.kind == "partition":
            for net in self._nets.pop(ep.target, []):
                _docker("network", "connect", "--alias", ep.target, net, cid)
        elif ep.kind == "netem":
            _docker("exec", "-u", "0", cid, "tc", "qdisc", "del", "dev", "eth0", "root")
        self._hurt.pop(ep.target, None)

    def cleanup(self) -> None:
        for ep in list(self._hurt.values()):
            with contextlib.suppress(RuntimeError):
                self.heal(ep)


# ------------------------------------------------------------------ one episode
@dataclass
class Config:
    accesses: int = 3000  # per vCPU of the episode's workloads
    vcpus: int = 2
    probe_accesses: int = 500
    ack_timeout: float = 2.0  # L0's --ack-timeout: the documented tlbsync bound
    recover_timeout: float = 45.0
    settle_timeout: float = 10.0
    workload_timeout: float = 120.0


@dataclass
class EpisodeReport:
    index: int
    fault: str
    target: str
    onset_s: float
    hold_s: float
    seed: int
    netem: str = ""
    recovered_s: float = -1.0
    audit_during: str = "not taken"
    violations_during_fault: list[str] = field(default_factory=list)
    audit: str = "not taken"
    violations: list[str] = field(default_factory=list)
    inconclusive: bool = False
    leaks: list[str] = field(default_factory=list)
    l0_longest_wait_ms: float = 0.0
    workloads: int = 0
    accesses: int = 0
    accesses_not_run: int = 0
    vcpu_failures: int = 0
    access_errors: int = 0
    error_details: list[str] = field(default_factory=list)
    unclear_errors: list[str] = field(default_factory=list)
    rpc_errors: list[str] = field(default_factory=list)
    churn: dict[str, int] = field(default_factory=dict)
    lost_writes: int = 0
    probe: str = "not run"
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def survived(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["survived"] = self.survived
        return d


def _rpc_error(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"


def _audit_outcome(r: l0_pb2.AuditResponse) -> tuple[str, list[str]]:
    """("clean" | "violations" | "inconclusive: ...", violations); uses ``outcome`` if the
    AuditResponse has it (audits that can say they could not look), else ``ok``."""
    found = [f"{v.invariant}: {v.detail}" for v in r.violations]
    fields = r.DESCRIPTOR.fields_by_name
    if "outcome" in fields:
        fd = fields["outcome"]
        value = getattr(r, "outcome")  # noqa: B009 - a field newer protos may have
        name = fd.enum_type.values_by_number[value].name if fd.enum_type is not None and value in fd.enum_type.values_by_number else str(value)
        if "INCONCLUSIVE" in name.upper():
            why = [str(getattr(r, k)) for k in ("inconclusive_reason", "reason", "inconclusive") if k in fields and getattr(r, k)]
            return "inconclusive" + (f": {'; '.join(why)}" if why else ""), found
    if found or not r.ok:
        return "violations", found
    return "clean", found


async def _l0_stats(addr: str) -> l0_pb2.GetStatsResponse:
    async with grpc.aio.insecure_channel(addr) as ch:
        return await l0_pb2_grpc.L0ServiceStub(ch).GetStats(l0_pb2.GetStatsRequest(), timeout=10)


async def _l1_guests(addr: str) -> list[int]:
    async with grpc.aio.insecure_channel(addr) as ch:
        r = await l1_pb2_grpc.L1ServiceStub(ch).ListGuests(l1_pb2.ListGuestsRequest(), timeout=10)
    return [g.lpid for g in r.guests]


async def _create_guest(addr: str, g: cluster.GuestPlan) -> int:
    async with grpc.aio.insecure_channel(addr) as ch:
        r = await l1_pb2_grpc.L1ServiceStub(ch).CreateGuest(l1_pb2.CreateGuestRequest(page_shift=g.page_shift, memory_bytes=g.memory), timeout=30)
    return int(r.lpid)


async def _destroy_guest(addr: str, lpid: int) -> None:
    async with grpc.aio.insecure_channel(addr) as ch:
        await l1_pb2_grpc.L1ServiceStub(ch).DestroyGuest(l1_pb2.DestroyGuestRequest(lpid=lpid), timeout=30)


def _workload(accesses: int, seed: int, footprint: int) -> l2_pb2.Workload:
    w = l2_pb2.Workload(pattern="hot", accesses=accesses, seed=seed, footprint_bytes=footprint, store_fraction=0.3, ifetch_fraction=0.05, batch_size=256)
    if _DATA_MODE:
        setattr(w, "data_mode", True)  # noqa: B010 - the data helper's checker; lost writes come back in extra
    return w


async def _run_workload(l2: str, l1_addr: str, lpid: int, g: cluster.GuestPlan, vcpus: int, w: l2_pb2.Workload, timeout: float) -> l2_pb2.WorkloadReport:
    async with grpc.aio.insecure_channel(l2) as ch:
        req = l2_pb2.RunWorkloadRequest(l1_address=l1_addr, lpid=lpid, vcpus=vcpus, page_shift=g.page_shift, workload=w)
        r = await l2_pb2_grpc.L2ServiceStub(ch).RunWorkload(req, timeout=timeout)
    return r.report


def _account(rep: EpisodeReport, r: l2_pb2.WorkloadReport, expected: int) -> None:
    """Fold one workload report into the episode: accesses ran or not-run with a reason."""
    extra = dict(r.extra)
    failed = extra.get("vcpu_failures", 0)
    not_run = extra.get("accesses_not_run", 0)
    rep.accesses += r.accesses
    rep.accesses_not_run += not_run
    rep.vcpu_failures += failed
    rep.access_errors += max(0, r.errors - failed)
    rep.error_details += list(r.error_details)
    rep.lost_writes += extra.get("lost_writes", 0)
    if r.accesses + not_run != expected:
        rep.failures.append(f"lpid {r.lpid}: {r.accesses} accesses ran + {not_run} not run != {expected} requested")
    if failed > len(r.error_details):
        rep.failures.append(f"lpid {r.lpid}: {failed} vCPU failures but only {len(r.error_details)} error_details")
    rep.unclear_errors += [d for d in r.error_details if not is_clear(d)]
    if r.errors > failed:  # an access answered ACCESS_OUTCOME_ERROR: the wire carries no reason
        rep.unclear_errors.append(f"lpid {r.lpid}: {r.errors - failed} accesses ended in ERROR with no reason (AccessResults carries none)")


async def wait_recovered(t: Targets, timeout: float) -> None:
    """Every service healthy, every L1 registered with L0 and connected to it."""
    deadline = time.monotonic() + timeout
    t.refresh()
    await cluster.wait_healthy([t.l0, *t.l1s.values(), t.l2], timeout)
    missing: list[str] = []
    while True:
        missing = []
        try:
            names = {s.name for s in (await _l0_stats(t.l0)).l1_summaries}
            missing = [f"{n} not registered with L0" for n in t.l1s if n not in names]
            for n, a in t.l1s.items():
                async with grpc.aio.insecure_channel(a) as ch:
                    st = await l1_pb2_grpc.L1ServiceStub(ch).GetStats(l1_pb2.GetStatsRequest(), timeout=5)
                if not st.counters.values.get("connected", 0):
                    missing.append(f"{n} has no L0 session")
        except grpc.aio.AioRpcError as e:
            missing.append(_rpc_error(e))
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"not recovered after {timeout}s: {'; '.join(missing)}")
        await asyncio.sleep(0.1)


async def check_leaks(t: Targets, gone: dict[str, list[int]]) -> list[str]:
    """What L0 still holds that nothing accounts for (empty: no leak).

    ``gone``: per L1, lpids of guests destroyed in this episode (their shadow trees must be
    gone)."""
    st = await _l0_stats(t.l0)
    c = dict(st.counters.values)
    leaks = []
    if c.get("svc.l1_sessions", 0) != len(t.l1s):
        leaks.append(f"L0 has {c.get('svc.l1_sessions', 0)} L1 sessions for {len(t.l1s)} live L1s")
    if c.get("svc.run_streams", 0):
        leaks.append(f"{c['svc.run_streams']} run streams open with no workload running")
    nested = sum(s.nested_guests for s in st.l1_summaries)
    # Every LPID is an L1's or a registered nested guest's. (A run token holds a reference on a
    # guest, but L0 drops the tokens of a guest its L1 destroys, so a token pins no LPID.)
    unaccounted = c.get("svc.lpids_in_use", 0) - len(st.l1_summaries) - nested
    if unaccounted:
        leaks.append(
            f"{c.get('svc.lpids_in_use', 0)} LPIDs in use for {len(st.l1_summaries)} L1s, {nested} registered nested guests"
            f" and {c.get('svc.run_tokens', 0)} unused run tokens"
        )
    for s in st.l1_summaries:
        if s.run_streams:
            leaks.append(f"{s.name}: {s.run_streams} run streams")
        addr = t.l1s.get(s.name)
        if addr is None:
            leaks.append(f"L0 holds a session for {s.name!r}, which is not one of the cluster's L1s")
            continue
        have = await _l1_guests(addr)
        if s.nested_guests > len(have):
            leaks.append(f"{s.name}: L0 has {s.nested_guests} nested guests, the L1 has {len(have)} guests")
        if not have and s.shadow_leaves:
            leaks.append(f"{s.name}: {s.shadow_leaves} shadow leaves and no guest")
        async with grpc.aio.insecure_channel(t.l0) as ch:
            stub = l0_pb2_grpc.L0ServiceStub(ch)
            for lpid in gone.get(s.name, []):
                if lpid in have:
                    continue
                try:
                    d = await stub.DumpShadowTree(l0_pb2.DumpShadowTreeRequest(l1_name=s.name, l1_lpid=lpid), timeout=10)
                    leaks.append(f"{s.name}: destroyed guest lpid {lpid} still has a nested guest in L0 ({len(d.leaves)} shadow leaves)")
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.NOT_FOUND:
                        raise
    return leaks


async def _longest_wait_ms(l0: str) -> float:
    c = dict((await _l0_stats(l0)).counters.values)
    us = c.get("svc.broadcast_latency_us_max", c.get("svc.broadcast_latency_us_p99", 0))
    return us / 1000.0


def _plan(seed: int) -> cluster.GuestPlan:
    return cluster.GuestPlan(16 if seed % 2 else 21, 64 << 20, 2)


async def run_episode(t: Targets, ep: Episode, cfg: Config, state: dict[str, float]) -> EpisodeReport:
    """One episode; ``state`` carries the campaign's longest tlbsync wait across L0 restarts."""
    t0 = time.monotonic()
    rep = EpisodeReport(ep.index, ep.fault, ep.target, ep.onset, ep.hold, ep.seed)
    if ep.kind == "netem":
        rep.netem = f"delay {ep.delay_ms}ms loss {ep.loss_pct}%"
    footprint = 16 << 20
    # 1. one guest per L1, a workload on each, churn meanwhile
    jobs: list[tuple[str, str, int, cluster.GuestPlan]] = []
    for i, (name, addr) in enumerate(t.l1s.items()):
        g = _plan(ep.seed + i)
        jobs.append((name, addr, await _create_guest(addr, g), g))
    created = {name: [lpid] for name, _, lpid, _ in jobs}
    stop = asyncio.Event()
    churned: dict[str, int] = {}
    churner = asyncio.create_task(cluster.churn(jobs, t.l0, footprint, ep.seed, stop, churned))
    healed = asyncio.Event()

    async def keep_running(i: int, name: str, lpid: int, g: cluster.GuestPlan) -> list[l2_pb2.WorkloadReport | BaseException]:
        """Workloads one after another on this guest until one ends after the heal, so vCPUs
        are running whenever the fault strikes; a failed RunWorkload is kept as its error."""
        out: list[l2_pb2.WorkloadReport | BaseException] = []
        n = 0
        while True:
            w = _workload(cfg.accesses, ep.seed + 1000 * i + n, footprint)
            try:
                r = await _run_workload(t.l2, t.l1_for_l2[name], lpid, g, cfg.vcpus, w, cfg.workload_timeout)
                out.append(r)
                failed = bool(r.errors)
            except grpc.aio.AioRpcError as e:
                out.append(e)
                failed = True
            if failed and not healed.is_set():
                await asyncio.sleep(0.5)  # the fault is on: try again, but do not spin
            n += 1
            if healed.is_set():
                return out

    runs = [asyncio.create_task(keep_running(i, name, lpid, g)) for i, (name, _, lpid, g) in enumerate(jobs)]
    audit_during: asyncio.Task[l0_pb2.AuditResponse] | None = None
    injected = False
    try:
        await asyncio.sleep(ep.onset)
        if ep.fault == "kill:l0":  # L0's counters die with it: read its longest wait first
            state["longest_ms"] = max(state["longest_ms"], await _longest_wait_ms(t.l0))
        # 2. the fault, held while the workloads run; an audit meanwhile (not through a dead L0)
        t.inject(ep)
        injected = True
        if ep.target != "l0":
            audit_during = asyncio.create_task(cluster.audit(t.l0))
        await asyncio.sleep(ep.hold)
    finally:
        try:
            if injected:
                t.heal(ep)
        finally:
            healed.set()
            if not injected:  # the fault could not be injected: end this episode's work
                stop.set()
                await asyncio.gather(churner, *runs, return_exceptions=True)
    heal_t = time.monotonic()
    # 3. workloads end (completed, or with a clear error); churn stops
    done = await asyncio.gather(*runs, return_exceptions=True)
    stop.set()
    await churner
    rep.churn = dict(sorted(churned.items()))
    for (name, _, lpid, _), rs in zip(jobs, done, strict=True):
        for r in rs if isinstance(rs, list) else [rs]:
            rep.workloads += 1
            if isinstance(r, BaseException):
                msg = _rpc_error(r)
                rep.rpc_errors.append(f"{name} lpid {lpid}: {msg}")
                rep.accesses_not_run += cfg.vcpus * cfg.accesses
                if not isinstance(r, grpc.aio.AioRpcError) or not is_clear(r.details() or ""):
                    rep.unclear_errors.append(f"RunWorkload on {name} lpid {lpid}: {msg}")
            else:
                _account(rep, r, cfg.vcpus * cfg.accesses)
    if rep.unclear_errors:
        rep.failures.append(f"{len(rep.unclear_errors)} errors that do not say what happened, first: {rep.unclear_errors[0]}")
    if audit_during is not None:
        try:
            rep.audit_during, rep.violations_during_fault = _audit_outcome(await audit_during)
            if AUDIT_CAN_BE_INCONCLUSIVE and rep.audit_during == "violations":
                # An audit that can say "could not look" has no excuse for a violation.
                rep.failures.append(f"audit during the fault: {len(rep.violations_during_fault)} violations, first: {rep.violations_during_fault[0]}")
        except grpc.aio.AioRpcError as e:
            rep.audit_during = f"error: {_rpc_error(e)}"
    # 4. recovery
    try:
        await wait_recovered(t, cfg.recover_timeout)
    except (TimeoutError, grpc.aio.AioRpcError) as e:
        rep.failures.append(f"did not recover: {e}")
        rep.seconds = round(time.monotonic() - t0, 3)
        return rep
    rep.recovered_s = round(time.monotonic() - heal_t, 3)
    # 5. new work succeeds: on the episode's guest if it survived, else on a fresh guest
    probes = []
    for i, (name, _, lpid, g) in enumerate(jobs):
        addr = t.l1s[name]  # read again after the heal: a restarted container may have a new host port
        if lpid not in await _l1_guests(addr):
            g = _plan(ep.seed + i)
            lpid = await _create_guest(addr, g)
            created[name].append(lpid)
        probes.append(_run_workload(t.l2, t.l1_for_l2[name], lpid, g, 1, _workload(cfg.probe_accesses, ep.seed + 100 + i, footprint), cfg.workload_timeout))
    probe_problems = []
    for (name, _, _, _), r in zip(jobs, await asyncio.gather(*probes, return_exceptions=True), strict=True):
        if isinstance(r, BaseException):
            probe_problems.append(f"{name}: {_rpc_error(r)}")
        else:
            rep.lost_writes += dict(r.extra).get("lost_writes", 0)
            if r.errors or r.accesses != cfg.probe_accesses:
                probe_problems.append(f"{name}: {r.errors} errors, {r.accesses}/{cfg.probe_accesses} accesses {list(r.error_details)}")
    rep.probe = "ok" if not probe_problems else "; ".join(probe_problems)
    if probe_problems:
        rep.failures.append(f"new workloads after the heal failed: {rep.probe}")
    # 6. destroy what the episode created, then: no leak (settling: streams end asynchronously)
    for name, lpids in created.items():
        have = await _l1_guests(t.l1s[name])
        for lpid in sorted(set(lpids)):  # a restarted L1 may hand out the same lpid again
            if lpid in have:
                await _destroy_guest(t.l1s[name], lpid)
    deadline = time.monotonic() + cfg.settle_timeout
    while True:
        rep.leaks = await check_leaks(t, created)
        if not rep.leaks or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    if rep.leaks:
        rep.failures += [f"leak: {x}" for x in rep.leaks]
    # 7. the audit after the heal
    aud = await cluster.audit(t.l0)
    rep.audit, rep.violations = _audit_outcome(aud)
    rep.inconclusive = rep.audit.startswith("inconclusive")
    if rep.violations and not rep.inconclusive:
        rep.failures.append(f"audit after the heal: {len(rep.violations)} violations, first: {rep.violations[0]}")
    # 8. the longest tlbsync wait against its bound
    rep.l0_longest_wait_ms = await _longest_wait_ms(t.l0)
    bound_ms = (cfg.ack_timeout + WAIT_GRACE_S) * 1000
    if ep.fault == "stop:l0":  # a frozen L0 keeps no clock: a wait spanning the freeze also lasts it
        bound_ms += ep.hold * 1000
    if rep.l0_longest_wait_ms > bound_ms and rep.l0_longest_wait_ms > state["longest_ms"]:
        rep.failures.append(f"a tlbsync waited {rep.l0_longest_wait_ms:.0f} ms, past the bound {bound_ms:.0f} ms")
    state["longest_ms"] = max(state["longest_ms"], rep.l0_longest_wait_ms)
    if rep.lost_writes:
        rep.failures.append(f"{rep.lost_writes} lost writes")
    rep.seconds = round(time.monotonic() - t0, 3)
    return rep


# ------------------------------------------------------------------ the campaign
def summary(reports: list[EpisodeReport], planned: int, cfg: Config, seed: int, mode: str, log_hint: str, seconds: float, longest_ms: float) -> dict[str, Any]:
    """The campaign's JSON object."""
    kinds = Counter(r.fault for r in reports)
    return {
        "mode": mode,
        "seed": seed,
        "episodes": planned,
        "episodes_run": len(reports),
        "episodes_survived": sum(r.survived for r in reports),
        "faults_by_kind": dict(sorted(kinds.items())),
        "survived_by_kind": {k: sum(r.survived for r in reports if r.fault == k) for k in sorted(kinds)},
        "audit_during_fault_checked": AUDIT_CAN_BE_INCONCLUSIVE,
        "violations": sum(len(r.violations) for r in reports if not r.inconclusive),
        "violations_during_fault": sum(len(r.violations_during_fault) for r in reports),
        "inconclusive_audits": sum(r.inconclusive for r in reports),
        "leaks": sum(len(r.leaks) for r in reports),
        "lost_writes": sum(r.lost_writes for r in reports),
        "data_mode": "on" if _DATA_MODE else "unavailable",
        "longest_invalidation_wait_ms": round(longest_ms, 3),
        "invalidation_wait_bound_ms": round((cfg.ack_timeout + WAIT_GRACE_S) * 1000, 3),
        "ack_timeout_s": cfg.ack_timeout,
        "vcpu_failures": sum(r.vcpu_failures for r in reports),
        "access_errors": sum(r.access_errors for r in reports),
        "workload_rpc_errors": sum(len(r.rpc_errors) for r in reports),
        "unclear_errors": sum(len(r.unclear_errors) for r in reports),
        "workloads": sum(r.workloads for r in reports),
        "accesses": sum(r.accesses for r in reports),
        "accesses_not_run": sum(r.accesses_not_run for r in reports),
        "longest_recovery_s": max((r.recovered_s for r in reports), default=0.0),
        "failures": [f"episode {r.index} ({r.fault} {r.target}): {f}" for r in reports for f in r.failures],
        "seconds": round(seconds, 3),
        "logs": log_hint,
        "episode_reports": [r.to_dict() for r in reports],
    }


def progress_line(r: EpisodeReport, total: int) -> str:
    what = f"{r.fault} {r.target}" + (f" ({r.netem})" if r.netem else "")
    errs = f"{r.vcpu_failures} vCPU failures, {r.access_errors} access errors, {len(r.rpc_errors)} workload RPC errors"
    verdict = "ok" if r.survived else "FAILED: " + "; ".join(r.failures)
    return (
        f"[chaos] episode {r.index}/{total} {what} held {r.hold_s:.1f}s: recovered in {r.recovered_s:.1f}s, "
        f"audit {r.audit} (during: {r.audit_during}), leaks {len(r.leaks)}, L0 longest wait {r.l0_longest_wait_ms:.0f} ms, {errs} -> {verdict}"
    )


async def run_campaign(t: Targets, episodes: list[Episode], cfg: Config, seed: int, progress: Callable[[EpisodeReport], None] | None = None) -> dict[str, Any]:
    """Run the episodes in order; stop early only if the cluster did not recover."""
    t0 = time.monotonic()
    state = {"longest_ms": 0.0}
    reports: list[EpisodeReport] = []
    try:
        for ep in episodes:
            try:
                r = await run_episode(t, ep, cfg, state)
            except (grpc.aio.AioRpcError, TimeoutError, RuntimeError) as e:
                # A step the episode needs failed outright (not the fault's own effects): a
                # failure of the episode; go on if the cluster is still (or again) usable.
                r = EpisodeReport(ep.index, ep.fault, ep.target, ep.onset, ep.hold, ep.seed)
                r.failures.append(f"episode could not complete: {_rpc_error(e)}")
                t.cleanup()
                try:
                    await wait_recovered(t, cfg.recover_timeout)
                    r.recovered_s = 0.0
                except (TimeoutError, grpc.aio.AioRpcError) as e2:
                    r.failures.append(f"did not recover: {_rpc_error(e2)}")
            reports.append(r)
            if progress is not None:
                progress(r)
            if r.recovered_s < 0:
                break
    finally:
        t.cleanup()
    return summary(reports, len(episodes), cfg, seed, t.mode, t.log_hint, time.monotonic() - t0, state["longest_ms"])


def exit_code(rep: dict[str, Any]) -> int:
    """0 all survived; 1 failures (violations, leaks, lost writes, waits past the bound, ...);
    4 no failure but an audit after a heal was inconclusive."""
    if rep["failures"] or rep["episodes_run"] < rep["episodes"]:
        return 1
    if rep["inconclusive_audits"]:
        return 4
    return 0


__all__ = ["COMPOSE_FAULTS", "LOCAL_FAULTS", "ComposeTargets", "Config", "Episode", "LocalTargets", "run_campaign", "schedule", "summary"]

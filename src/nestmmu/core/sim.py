"""An in-process cluster: L0, L1s and L2 vCPUs wired together synchronously.

This is the reference driver of the core's effects (see :mod:`.effects`): it answers every
effect by calling the right L1 directly, delivers every invalidation to the TLBs of its LPID
before the operation that caused it returns (so I5 holds at every step), and checks that tlb
locks are used as a kernel would (never taken twice).  Tests, the property suite, determinism
checks and the hot-path benchmark run on it; the gRPC services run the same core.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from . import formats as f
from .audit import AuditReport, audit
from .data import DataVcpu
from .effects import (
    AccessResult,
    AcquireTlbLock,
    Effect,
    ExitReply,
    Invalidation,
    NestedExit,
    Op,
    Outcome,
    Preempt,
    ReadL1Memory,
    ReflectExit,
    ReleaseTlbLock,
    Scope,
    WaitHostPage,
    WalkL1Tree,
    WriteL1Memory,
    run_sync,
)
from .exitclock import ExitClock, clocked
from .formats import Access
from .l0 import ConfigError, KvmNestedGuest, L0Config, L0Hypervisor, L1Vm, Memslot
from .l1 import (
    CopyL1Pages,
    CopyToFromGuest,
    GuestRegion,
    Hcall,
    L1Hypervisor,
    L1Step,
    MemslotSpec,
    RptInvalidate,
    SetPartitionTable,
    TlbInvalidate,
    default_memslots,
)
from .l2 import KernelOps, L2Error, L2Kernel
from .radix import WalkResult
from .vcpu import POWER9_TLB_ENTRIES, POWER9_TLB_WAYS, Vcpu, tlb_geometry_error
from .workload import WorkloadSpec, generate


@dataclass
class VcpuSession:
    name: str
    l1: str
    l1_lpid: int
    vcpu: Vcpu
    gp: KvmNestedGuest
    data: DataVcpu | None = field(default=None)
    clock: ExitClock = field(default_factory=ExitClock)  # HDEC and L2-hcall exits (logical)


class InProcessCluster:
    """L0 + L1s + vCPUs in one process, driven synchronously and deterministically."""

    def __init__(self, config: L0Config | None = None) -> None:
        self.l0 = L0Hypervisor(config)
        self.l1s: dict[str, L1Hypervisor] = {}
        self.vms: dict[str, L1Vm] = {}
        self.sessions: dict[str, VcpuSession] = {}
        self.stats: Counter[str] = Counter()
        self.locks_held: set[int] = set()
        self.preempt_hook: Callable[[str], None] | None = None
        self.hcall_log: list[tuple[str, Hcall, int]] = []
        self.kernels: dict[tuple[str, int], L2Kernel] = {}  # (L1 name, L1's lpid) -> L2 OS

    # ---------------------------------------------------------------- effects
    def answer(self, eff: Effect) -> Any:
        self.deliver(self.l0.take_invalidations())
        if isinstance(eff, WalkL1Tree):
            return self.l1s[eff.l1.name].walk(eff.pate_dw0, eff.n_gpa)
        if isinstance(eff, ReadL1Memory):
            return self.l1s[eff.l1.name].read_memory(eff.gpa, eff.length)
        if isinstance(eff, WriteL1Memory):
            return self.l1s[eff.l1.name].write_memory(eff.gpa, eff.data)
        if isinstance(eff, ReflectExit):
            l1 = self.l1s[eff.l1.name]
            reply, hcalls = l1.handle_exit(eff.l1_lpid, eff.vcpu_id, eff.exit)
            self.stats["exits_reflected"] += 1
            for h in hcalls:
                self.issue(eff.l1.name, h)
            return reply
        if isinstance(eff, AcquireTlbLock):
            key = id(eff.gp)
            if key in self.locks_held:
                raise AssertionError(f"tlb_lock of {eff.gp!r} taken twice: a deadlock on real hardware")
            self.locks_held.add(key)
            return None
        if isinstance(eff, ReleaseTlbLock):
            self.locks_held.discard(id(eff.gp))
            return None
        if isinstance(eff, WaitHostPage):
            # Host operations here run both phases at once, so nothing is ever mid-move.
            return None
        if isinstance(eff, Preempt):
            if self.preempt_hook is not None:
                self.preempt_hook(eff.where)
            return None
        raise TypeError(f"unknown effect {eff!r}")

    def drive(self, op: Op[Any]) -> Any:
        result = run_sync(op, self.answer)
        self.deliver(self.l0.take_invalidations())
        return result

    def deliver(self, invs: list[Invalidation]) -> None:
        """Broadcast tlbies to every vCPU running with that LPID (tlbsync is immediate here)."""
        for inv in invs:
            self.stats[f"tlbie.{inv.scope.value}"] += 1
            for s in self.sessions.values():
                if inv.scope is Scope.ALL or s.vcpu.lpid == inv.lpid:
                    s.vcpu.invalidate(inv)
                    self.stats["broadcast_acks"] += 1

    # ---------------------------------------------------------------- L1s and hcalls
    def add_l1(
        self,
        name: str,
        memslots: list[MemslotSpec] | None = None,
        use_rpt_invalidate: bool = True,
        pats: int = 4,
        forget_flush: bool = False,
        hdec_every: int = 0,
    ) -> L1Hypervisor:
        """Boot an L1.  ``forget_flush``: the §9.17 teaching failure mode (L1 skips the
        invalidation after changing a leaf); ``hdec_every``: L1's HDEC expires every that many
        accesses of each of its L2 vCPUs (0 = never)."""
        specs = memslots or default_memslots()
        l1 = L1Hypervisor(name, specs, self.l0.page_shift, use_rpt_invalidate, pats, forget_flush=forget_flush, hdec_every=hdec_every)
        vm = self.l0.create_l1(name, [Memslot(s.index, s.base, s.size, s.read_only, s.backing_shift) for s in specs])
        self.l1s[name] = l1
        self.vms[name] = vm
        for h in l1.boot():
            rc = self.issue(name, h)
            if rc != f.H.SUCCESS:
                raise ConfigError(f"H_SET_PARTITION_TABLE failed for {name}: {rc}")
        return l1

    def issue(self, l1_name: str, h: Hcall) -> int:
        vm = self.vms[l1_name]
        l0 = self.l0
        rc: int
        if isinstance(h, SetPartitionTable):
            rc = l0.h_set_partition_table(vm, h.ptcr)
        elif isinstance(h, TlbInvalidate):
            rc = self.drive(l0.h_tlb_invalidate(vm, h.instr, h.rs, h.rb))
        elif isinstance(h, RptInvalidate):
            rc = self.drive(l0.h_rpt_invalidate(vm, h.id, h.target, h.type, h.pg_sizes, h.start, h.end))
        elif isinstance(h, CopyL1Pages):
            rc = l0.l1_zero_memory(vm, h.dst, h.length) if h.zero else l0.l1_copy_memory(vm, h.dst, h.src, h.length)
        elif isinstance(h, CopyToFromGuest):
            rc = self.drive(l0.h_copy_tofrom_guest(vm, h.lpid, h.pid, h.eaddr, h.to_gpa, h.from_gpa, h.n))
            if h.done is not None:
                h.done(rc)
        elif isinstance(h, L1Step):
            h.run()
            rc = f.H.SUCCESS
        else:  # pragma: no cover
            raise TypeError(f"unknown hcall {h!r}")
        self.deliver(l0.take_invalidations())
        self.hcall_log.append((l1_name, h, rc))
        return rc

    def issue_all(self, l1_name: str, hcalls: list[Hcall]) -> list[int]:
        return [self.issue(l1_name, h) for h in hcalls]

    def create_guest(
        self, l1_name: str, lpid: int = 0, page_shift: int = 16, memory: int = 64 << 20, regions: list[GuestRegion] | None = None, data: bool = False
    ) -> int:
        guest, hcalls = self.l1s[l1_name].create_guest(lpid, page_shift, memory, regions, data=data)
        self.issue_all(l1_name, hcalls)
        return guest.lpid

    def destroy_guest(self, l1_name: str, lpid: int) -> list[int]:
        return self.issue_all(l1_name, self.l1s[l1_name].destroy_guest(lpid))

    # ---------------------------------------------------------------- vCPUs
    def attach_vcpu(
        self,
        l1_name: str,
        lpid: int,
        vcpu_id: int,
        hcall_every: int = 0,
        pid: int = -1,
        tlb_entries: int = POWER9_TLB_ENTRIES,
        tlb_ways: int = POWER9_TLB_WAYS,
    ) -> VcpuSession:
        """L1 enters the guest on a vCPU: H_ENTER_NESTED; the vCPU starts with an empty TLB.

        ``hcall_every``: the L2 program on this vCPU issues H_PUT_TERM_CHAR every that many
        accesses (0 = never); with L1's ``hdec_every`` it drives the vCPU's logical clock.
        ``pid`` >= 0: the vCPU runs with translation on and PIDR = pid (see :meth:`access_ea`).
        ``tlb_entries``/``tlb_ways``: the TLB's geometry (entries 0 = unbounded)."""
        tlb_error = tlb_geometry_error(tlb_entries, tlb_ways)
        if tlb_error is not None:
            raise ConfigError(tlb_error)
        l1 = self.l1s[l1_name]
        state = l1.hv_guest_state(lpid, vcpu_id)
        rc, gp = self.drive(self.l0.h_enter_nested(self.vms[l1_name], state))
        if rc != f.H.SUCCESS or gp is None:
            raise ConfigError(f"H_ENTER_NESTED for {l1_name}/{lpid} failed with {f.H(rc).name}")
        name = f"{l1_name}/{lpid}/{vcpu_id}"
        if name in self.sessions:
            self.l0.kvmhv_put_nested(gp)
            raise ConfigError(f"vCPU {name} is already attached")
        s = VcpuSession(name, l1_name, lpid, Vcpu(vcpu_id, gp.shadow_lpid, pid, tlb_entries, tlb_ways), gp, clock=ExitClock(l1.hdec_every, hcall_every))
        self.sessions[name] = s
        return s

    def detach_vcpu(self, name: str) -> None:
        s = self.sessions.pop(name)
        self.l0.kvmhv_put_nested(s.gp)
        self.deliver(self.l0.take_invalidations())

    def remove_l1(self, name: str) -> None:
        """The L1 dies: its vCPUs go with it, then every nested guest is released."""
        for sname in [n for n, s in self.sessions.items() if s.l1 == name]:
            self.detach_vcpu(sname)
        self.l0.destroy_l1(self.vms.pop(name))
        self.deliver(self.l0.take_invalidations())
        del self.l1s[name]

    def access(self, s: VcpuSession, addr: int, kind: Access) -> AccessResult:
        """One access that missed the TLB (the vCPU's TLB is not consulted)."""
        res: AccessResult = self.drive(self.l0.run_access(s.gp, s.vcpu.vcpu_id, addr, kind))
        s.vcpu.apply(res)
        return res

    def nested_exit(self, s: VcpuSession, ex: NestedExit) -> ExitReply:
        """A non-fault exit of the vCPU (its hcall, the HDEC): L0 hands it to L1, L1 re-enters."""
        self.stats[f"nested_exit.{'hdec' if ex.trap == f.BOOK3S_INTERRUPT_HV_DECREMENTER else 'hcall'}"] += 1
        reply: ExitReply = self.drive(self.l0.kvmppc_handle_nested_exit(s.gp, s.vcpu.vcpu_id, ex))
        return reply

    def _clocked(self, s: VcpuSession, addrs: list[int], kinds: list[int], run: Callable[[list[int], list[int]], None]) -> None:
        """Run a batch in pieces cut at the vCPU's logical-clock events, taking each event's
        exit (HDEC, L2 hcall) between the accesses where it falls (deterministic)."""
        for item in clocked([(addrs, kinds)], s.clock):
            if isinstance(item, NestedExit):
                self.nested_exit(s, item)
            else:
                run(*item)

    def run_batch(self, s: VcpuSession, addrs: list[int], kinds: list[int]) -> None:
        """One batch through the vCPU: hits stay local, misses are resolved by L0 in rounds
        (effective addresses of PIDR when the vCPU has one, with L2's page faults handled)."""
        self._clocked(s, addrs, kinds, lambda a, k: self._run_batch(s, a, k))

    def _run_batch(self, s: VcpuSession, addrs: list[int], kinds: list[int]) -> None:
        vcpu = s.vcpu
        send = vcpu.run_hits(addrs, kinds)
        while send:
            for addr, kind in send:
                if vcpu.pid >= 0:
                    self.access_ea(s, addr, Access(kind))
                    continue
                res = self.drive(self.l0.run_access(s.gp, vcpu.vcpu_id, addr, Access(kind)))
                vcpu.apply(res)
            send = vcpu.next_round()

    # ---------------------------------------------------------------- the L2 OS (2-D walk)
    def boot_l2_kernel(self, s: VcpuSession, page_shift: int = 16, pids: tuple[int, ...] = (1,), **kw: Any) -> L2Kernel:
        """Boot the L2 OS of the vCPU's guest: allocate its process table, register it with
        L1 (H_REGISTER_PROC_TBL -> PATE dw1 + RIC=2 flush), create the processes ``pids``.
        Table stores run on vCPU ``s`` as real-mode stores."""
        key = (s.l1, s.l1_lpid)
        if key in self.kernels:
            raise ConfigError(f"guest {s.l1}/{s.l1_lpid} already runs an L2 kernel")
        guest = self.l1s[s.l1].guest(s.l1_lpid)
        k = L2Kernel(guest.memory, page_shift, **kw)
        self.kernels[key] = k
        self.apply_kernel_ops(s, k.setup())
        self.issue_all(s.l1, self.l1s[s.l1].h_register_proc_tbl(s.l1_lpid, k.proc_tbl_dw1()))
        for pid in pids:
            self.apply_kernel_ops(s, k.create_process(pid))
        return k

    def kernel(self, s: VcpuSession) -> L2Kernel:
        k = self.kernels.get((s.l1, s.l1_lpid))
        if k is None:
            raise ConfigError(f"guest {s.l1}/{s.l1_lpid} runs no L2 kernel: boot_l2_kernel first")
        return k

    def apply_kernel_ops(self, s: VcpuSession, ops: KernelOps) -> None:
        """The L2 kernel's CPU work: its stores, as real-mode data stores through the access
        path (they take nested faults like any L2 store), then its process-scoped tlbies,
        which reach every vCPU running with the guest's shadow LPID."""
        for addr, value in ops.stores:
            self.real_store(s, addr, value)
        self.stats["l2_kernel_stores"] += len(ops.stores)
        self.deliver(ops.tagged(s.vcpu.lpid))
        for pid, type_, pg_sizes, start, end in ops.rpt_invalidates:
            # The L2's hcall exits to L0, which performs it for the shadow LPID.
            rc = self.l0.kvmppc_nested_h_rpt_invalidate(s.gp, pid, type_, pg_sizes, start, end)
            if rc != f.H.SUCCESS:
                raise ConfigError(f"L2's process-scoped H_RPT_INVALIDATE failed: {rc}")
            self.deliver(self.l0.take_invalidations())

    def real_store(self, s: VcpuSession, addr: int, value: int) -> None:
        """One real-mode doubleword store by L2 (MSR[DR]=0) through TLB, shadow and faults."""
        vcpu = s.vcpu
        # ``mask`` first: a store that hits uses the entry, which refreshes its LRU stamp.
        e = vcpu.tlb.lookup(vcpu.lpid, addr) if vcpu.tlb.mask(vcpu.lpid, addr) & (1 << Access.STORE) else None
        if e is not None:
            host = e.host + (addr - e.page)
        else:
            res = cast(AccessResult, self.drive(self.l0.run_access(s.gp, vcpu.vcpu_id, addr, Access.STORE)))
            vcpu.apply(res)
            t = res.translation
            if res.outcome is not Outcome.FILL or t is None:
                raise ConfigError(f"L2 kernel store at real address {addr:#x} failed: {res.outcome.name} {res.detail}")
            host = t.host + (addr - t.page)
        self.l0.data_store(host, value)

    def access_ea(self, s: VcpuSession, ea: int, kind: Access, max_faults: int = 8) -> AccessResult:
        """One effective-address access of PIDR that missed the TLB: the 2-D walk; a
        process-scoped fault goes to the L2 kernel (do_page_fault), whose fix is applied and
        the access retried.  Returns the last result (GUEST_FAULT = segfault)."""
        vcpu = s.vcpu
        k = self.kernels.get((s.l1, s.l1_lpid))
        res = AccessResult(Outcome.ERROR, detail="no attempt")
        for _ in range(max_faults):
            res = cast(AccessResult, self.drive(self.l0.run_access(s.gp, vcpu.vcpu_id, ea, kind, pid=vcpu.pid)))
            vcpu.apply(res)
            if res.outcome is not Outcome.GUEST_FAULT or k is None:
                return res
            pid = 0 if ea >> f.EA_QUADRANT_SHIFT == 3 else vcpu.pid
            try:
                ops = k.handle_fault(pid, ea, kind, res.dsisr)
            except L2Error:
                ops = None  # out of L2 memory: the OOM killer's business, not the MMU's
                self.stats["l2_oom"] += 1
            if ops is None:
                self.stats["l2_segv"] += 1
                return res
            self.apply_kernel_ops(s, ops)
        self.stats["l2_fault_loops"] += 1
        return res

    def run_workload(self, s: VcpuSession, spec: WorkloadSpec, vcpu_index: int = 0, data: bool = False) -> Counter[str]:
        """Run ``generate(spec, vcpu_index)`` on the vCPU, with the spec's TLB geometry (as the
        L2 service gives its vCPUs); returns the vCPU's counters."""
        spec.validate()
        s.vcpu.set_tlb_geometry(spec.tlb_entries, spec.tlb_ways)
        if spec.hcall_every:  # the L2 program's hcalls (as the L2 service runs it)
            s.clock.hcall_every = spec.hcall_every
        for addrs, kinds in generate(spec, vcpu_index):
            if data:
                self.run_data_batch(s, addrs, kinds, vcpu_index)
            else:
                self.run_batch(s, addrs, kinds)
        return s.vcpu.stats

    # ---------------------------------------------------------------- data mode
    def data_vcpu(self, s: VcpuSession, vcpu_index: int = 0, fresh: bool = False) -> DataVcpu:
        """The vCPU's data path; ``fresh``: the guest is new, so unwritten words must read 0."""
        if s.data is None:
            s.data = DataVcpu(s.vcpu, vcpu_index, initial_zero=fresh)
        return s.data

    def run_data_batch(self, s: VcpuSession, addrs: list[int], kinds: list[int], vcpu_index: int = 0) -> None:
        """Data mode: messages of TLB hits ended by one miss; every access is a memory
        operation in L0 at the host address the vCPU translated (see :mod:`.data`)."""
        self._clocked(s, addrs, kinds, lambda a, k: self._run_data_batch(s, a, k, vcpu_index))

    def _run_data_batch(self, s: VcpuSession, addrs: list[int], kinds: list[int], vcpu_index: int) -> None:
        dv = self.data_vcpu(s, vcpu_index)
        vcpu = s.vcpu
        l0 = self.l0
        start = 0
        while start < len(addrs):
            msg = dv.message(addrs, kinds, start)
            start += len(msg.addrs)
            done: list[bool] = []
            loaded: list[int] = []
            for addr, kind, value, host in zip(msg.addrs, msg.kinds, msg.values, msg.hosts, strict=True):
                if not host:
                    res = self.drive(l0.run_access(s.gp, vcpu.vcpu_id, addr, Access(kind)))
                    vcpu.apply(res)
                    t = res.translation
                    if res.outcome is Outcome.FILL and t is not None:
                        host = t.host + (addr - t.page)
                if host:
                    loaded.append(l0.data_access(host, kind, value))
                    done.append(True)
                else:
                    loaded.append(0)
                    done.append(False)
            dv.complete(msg, done, loaded)

    def data_counters(self) -> dict[str, int]:
        """The checker's counters summed over every vCPU in data mode."""
        out: Counter[str] = Counter()
        for s in self.sessions.values():
            if s.data is not None:
                out.update(s.data.checker.counters())
        return dict(sorted(out.items()))

    def lost_write_details(self) -> list[dict[str, object]]:
        return [{"vcpu": s.name, **d.as_dict()} for s in self.sessions.values() if s.data is not None for d in s.data.checker.details]

    # ---------------------------------------------------------------- host events (two phases)
    def host_migrate(self, l1_name: str, gpa: int) -> tuple[int, int, int]:
        """Migrate a host page as the kernel does: unmap + tlbie, tlbsync, then copy."""
        vm = self.vms[l1_name]
        removed, old, new, chunk = self.l0.host_invalidate_start(vm, gpa, migrate=True)
        self.deliver(self.l0.take_invalidations())
        self.l0.host_invalidate_finish(vm, chunk)
        return removed, old, new

    def host_unmap(self, l1_name: str, gpa: int) -> int:
        """Swap a host page out: unmap + tlbie, tlbsync, then save its contents and free it."""
        vm = self.vms[l1_name]
        removed, _, _, chunk = self.l0.host_invalidate_start(vm, gpa, migrate=False)
        self.deliver(self.l0.take_invalidations())
        self.l0.host_invalidate_finish(vm, chunk)
        return removed

    # ---------------------------------------------------------------- audit
    def walk(self, l1_name: str, pate_dw0: int, n_gpa: int) -> WalkResult:
        return self.l1s[l1_name].walk(pate_dw0, n_gpa)

    def audit(self) -> AuditReport:
        tlbs = ((s.name, e) for s in self.sessions.values() for e in s.vcpu.tlb.entries())
        return audit(self.l0, self.walk, tlbs)

    def counters(self) -> dict[str, int]:
        """L0, driver and summed vCPU counters, flattened (deterministic for a seeded run)."""
        out: Counter[str] = Counter()
        out.update({f"l0.{k}": v for k, v in self.l0.stats.items()})
        out.update({f"sim.{k}": v for k, v in self.stats.items()})
        for s in self.sessions.values():
            out.update({f"vcpu.{k}": v for k, v in s.vcpu.stats.items()})
        for l1 in self.l1s.values():
            out.update({f"l1.{k}": v for k, v in l1.stats.items()})
        return dict(sorted(out.items()))


def demo_cluster(seed: int = 1, accesses: int = 20_000, config: L0Config | None = None) -> InProcessCluster:
    """Two L1s with mixed page sizes and special regions, several vCPUs, a seeded workload."""
    c = InProcessCluster(config)
    for l1_name in ("l1a", "l1b"):
        c.add_l1(l1_name)
    regions = [GuestRegion("rom", 32 << 20, 2 << 20), GuestRegion("mmio", 34 << 20, 2 << 20), GuestRegion("protect", 36 << 20, 2 << 20, f.PTE_EAA_READ)]
    lp_a1 = c.create_guest("l1a", page_shift=16, memory=64 << 20, regions=regions)
    lp_a2 = c.create_guest("l1a", page_shift=21, memory=64 << 20)
    lp_b1 = c.create_guest("l1b", page_shift=16, memory=64 << 20)
    sessions = [c.attach_vcpu("l1a", lp_a1, 0), c.attach_vcpu("l1a", lp_a1, 1), c.attach_vcpu("l1a", lp_a2, 0), c.attach_vcpu("l1b", lp_b1, 0)]
    for i, s in enumerate(sessions):
        c.run_workload(s, WorkloadSpec(pattern="hot", accesses=accesses, seed=seed, footprint=40 << 20), vcpu_index=i)
    return c


def data_churn_cluster(seed: int = 1, accesses: int = 5_000, data: bool = True, batch_size: int = 256) -> InProcessCluster:
    """Two L1s, two guests (64K and 2M pages), four vCPUs, a seeded workload cut by churn:
    L1 unmaps (swap-out) and remaps (page migration), host migrations and host swap-outs.
    With ``data`` the guests are data guests and the vCPUs run in data mode (checked)."""
    c = InProcessCluster()
    for l1_name in ("l1a", "l1b"):
        c.add_l1(l1_name)
    la = c.create_guest("l1a", page_shift=16, memory=64 << 20, data=data)
    lb = c.create_guest("l1b", page_shift=21, memory=64 << 20, data=data)
    sessions = [c.attach_vcpu("l1a", la, 0), c.attach_vcpu("l1a", la, 1), c.attach_vcpu("l1b", lb, 0), c.attach_vcpu("l1b", lb, 1)]
    spec = WorkloadSpec(pattern="hot", accesses=accesses, seed=seed, footprint=16 << 20, batch_size=batch_size)
    streams = [generate(spec, i) for i in range(len(sessions))]
    if data:
        for i, s in enumerate(sessions):
            c.data_vcpu(s, i, fresh=True)
    ga, gb = c.l1s["l1a"].guests[la], c.l1s["l1b"].guests[lb]
    for step, batches in enumerate(zip(*streams, strict=True)):
        for i, (s, (addrs, kinds)) in enumerate(zip(sessions, batches, strict=True)):
            if data:
                c.run_data_batch(s, addrs, kinds, i)
            else:
                c.run_batch(s, addrs, kinds)
        k = step % 4
        if k == 0:
            c.issue_all("l1a", c.l1s["l1a"].unmap_pages(la, (step * 7 % 25) << 16, 2 << 16)[1])
            c.issue_all("l1b", c.l1s["l1b"].remap_pages(lb, (step % 8) << 21, 1 << 21)[1])
        elif k == 1:
            c.issue_all("l1a", c.l1s["l1a"].remap_pages(la, (step * 5 % 25) << 16, 3 << 16)[1])
            c.issue_all("l1b", c.l1s["l1b"].unmap_pages(lb, (step % 8) << 21, 1 << 21)[1])
        elif k == 2:
            for g, name in ((ga, "l1a"), (gb, "l1b")):
                if g.backing:
                    pages = sorted(g.backing)
                    c.host_migrate(name, g.backing[pages[step % len(pages)]])
        else:
            for g, name in ((ga, "l1a"), (gb, "l1b")):
                if g.backing:
                    pages = sorted(g.backing)
                    c.host_unmap(name, g.backing[pages[(step * 3) % len(pages)]])
    return c


def ea_demo_cluster(
    seed: int = 1, accesses: int = 20_000, trace_path: str = "", guest_page_shift: int = 16, l2_page_shift: int = 16, memory: int = 256 << 20
) -> InProcessCluster:
    """One L1, one guest running an L2 OS, one vCPU running PID 1: a seeded workload (or a
    lackey trace, replayed unfolded) of effective addresses through the 2-D walk.  L0's
    ``walk_refs_2d`` / ``walk_refs_shadow`` / ``walk_refs_process`` counters then give the
    cost of the process-scoped translation beside ``walk_refs_real``."""
    c = InProcessCluster()
    c.add_l1("l1a")
    lpid = c.create_guest("l1a", page_shift=guest_page_shift, memory=memory)
    s = c.attach_vcpu("l1a", lpid, 0, pid=1)
    c.boot_l2_kernel(s, page_shift=l2_page_shift)
    if trace_path:
        spec = WorkloadSpec(pattern="trace", trace_path=trace_path, accesses=accesses, seed=seed, virtual=True)
    else:
        spec = WorkloadSpec(pattern="hot", accesses=accesses, seed=seed, footprint=16 << 20, base=0x1000_0000, virtual=True)
    c.run_workload(s, spec)
    return c

"""Helpers for the nested-fault, R/C, invalidation, host-event, quirk and audit unit tests.

One :class:`Env` is an in-process cluster with one L1 ("a" unless told otherwise), one L2
guest and one attached vCPU, plus accessors that read the exact state a test asserts on: L1's
leaf for an L2 address, L0's PTE for an L1 address, the shadow leaf, the TLB entry, the rmap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nestmmu.core import formats as f
from nestmmu.core.effects import AccessResult, ExitReply, NestedExit
from nestmmu.core.formats import Access
from nestmmu.core.l0 import KvmNestedGuest, L0Config, L0Hypervisor, L1Vm, Memslot
from nestmmu.core.l1 import GuestRegion, Hcall, L1Hypervisor, L2Guest, MemslotSpec, TlbInvalidate
from nestmmu.core.radix import Slot, WalkResult
from nestmmu.core.sim import InProcessCluster, VcpuSession
from nestmmu.core.vcpu import TlbEntry

T = TypeVar("T")
MiB = 1 << 20
GiB = 1 << 30
PERM_ALL = f.PTE_EAA_READ | f.PTE_EAA_RW | f.PTE_EAA_EXEC


def base_page_memslots() -> list[MemslotSpec]:
    """16 GiB of RAM backed by L0 base pages (no THP), plus the usual 64 MiB ROM slot."""
    return [MemslotSpec(0, 0, 16 * GiB, backing_shift=0), MemslotSpec(1, 16 * GiB, 64 * MiB, read_only=True)]


@dataclass
class Env:
    c: InProcessCluster
    l1: L1Hypervisor
    vm: L1Vm
    guest: L2Guest
    s: VcpuSession
    exits: list[NestedExit] = field(default_factory=list)

    # ------------------------------------------------------------------ accessors
    @property
    def l0(self) -> L0Hypervisor:
        return self.c.l0

    @property
    def gp(self) -> KvmNestedGuest:
        return self.s.gp

    @property
    def lpid(self) -> int:
        return self.guest.lpid

    def memslot(self, index: int = 0) -> Memslot:
        return self.l0.memslot_by_index(self.vm, index)

    def l1_leaf(self, n_gpa: int) -> WalkResult:
        """L1's leaf for an L2 address, walked in L1 memory."""
        return self.l1.walk(self.guest.pate_dw0(), n_gpa)

    def l1_gpa(self, n_gpa: int) -> int:
        g = self.l1_leaf(n_gpa)
        assert g.ok, f"L1 has no leaf for {n_gpa:#x} (code {g.code:#x})"
        return g.raddr

    def l0_pte(self, l1_gpa: int) -> Slot | None:
        return self.vm.pgtable.lookup_leaf(l1_gpa)

    def shadow(self, n_gpa: int) -> Slot | None:
        table = self.gp.shadow_pgtable
        return None if table is None else table.lookup_leaf(n_gpa)

    def shadow_leaves(self) -> list[Slot]:
        return self.l0.shadow_leaves(self.gp)

    def tlb(self, n_gpa: int, s: VcpuSession | None = None) -> TlbEntry | None:
        s = s or self.s
        return s.vcpu.tlb.lookup(s.vcpu.lpid, n_gpa)

    def rmap_entry(self, n_gpa: int, l1_lpid: int | None = None) -> int:
        return f.rmap_entry(self.lpid if l1_lpid is None else l1_lpid, n_gpa)

    # ------------------------------------------------------------------ actions
    def access(self, addr: int, kind: Access, s: VcpuSession | None = None) -> AccessResult:
        """One access that missed the TLB (the TLB is not consulted, only filled)."""
        return self.c.access(s or self.s, addr, kind)

    def run(self, addr: int, kind: Access, s: VcpuSession | None = None) -> None:
        """One access through the vCPU: a TLB hit never reaches L0."""
        self.c.run_batch(s or self.s, [addr], [int(kind)])

    def issue(self, hcalls: list[Hcall], l1_name: str | None = None) -> list[int]:
        return self.c.issue_all(l1_name or self.l1.name, hcalls)

    def tlbie(self, ric: int, is_: int, lpid: int | None = None, epn: int = 0, ap: int = 0, l1_name: str | None = None) -> int:
        """H_TLB_INVALIDATE as Linux-as-L1 builds it (partition scope, R=1)."""
        instr, rs, rb = f.encode_tlbie(ric, 0, 1, self.lpid if lpid is None else lpid, is_, epn, ap)
        return self.c.issue(l1_name or self.l1.name, TlbInvalidate(instr, rs, rb))

    def flush_page(self, n_gpa: int) -> None:
        """L1 flushes one of its L2 pages without changing its tree."""
        self.issue([self.l1._flush_page_hcall(self.lpid, n_gpa & ~(self.guest.page_size - 1), self.guest.page_shift)])

    def write_l1_leaf(self, n_gpa: int, pte: int) -> None:
        """Rewrite L1's leaf in L1 memory *without* an invalidation hcall (a protocol slip)."""
        g = self.l1_leaf(n_gpa)
        assert g.ok
        self.l1.mem.write_u64(g.leaf_addr, pte)

    def host(self, fn: Callable[..., T], *args: Any) -> T:
        """Run an L0 host event and broadcast its tlbies, as a driver must before returning."""
        out = fn(*args)
        self.c.deliver(self.l0.take_invalidations())
        return out

    def capture_exits(self) -> list[NestedExit]:
        """Record every exit L0 reflects to this L1 (L1.handle_exit is wrapped)."""
        orig = self.l1.handle_exit

        def handle_exit(l1_lpid: int, vcpu_id: int, ex: NestedExit) -> tuple[ExitReply, list[Hcall]]:
            self.exits.append(ex)
            return orig(l1_lpid, vcpu_id, ex)

        self.l1.handle_exit = handle_exit  # type: ignore[method-assign]
        return self.exits

    def violations(self) -> set[str]:
        return {v.invariant for v in self.c.audit().violations}


def make_env(
    config: L0Config | None = None,
    memslots: list[MemslotSpec] | None = None,
    page_shift: int = 16,
    memory: int = 64 * MiB,
    regions: list[GuestRegion] | None = None,
    l1_name: str = "a",
    use_rpt_invalidate: bool = True,
) -> Env:
    c = InProcessCluster(config)
    l1 = c.add_l1(l1_name, memslots, use_rpt_invalidate=use_rpt_invalidate)
    lpid = c.create_guest(l1_name, page_shift=page_shift, memory=memory, regions=regions)
    s = c.attach_vcpu(l1_name, lpid, 0)
    env = Env(c, l1, c.vms[l1_name], l1.guest(lpid), s)
    env.capture_exits()
    return env


def violations(c: InProcessCluster) -> set[str]:
    return {v.invariant for v in c.audit().violations}


def assert_shadow_c_implies_l0_c(env: Env) -> None:
    """I3's half that dirty logging relies on: shadow C => L0 C, for every shadow leaf."""
    for slot in env.shadow_leaves():
        if slot.pte & f.PTE_C:
            l0 = env.l0_pte(env.l1_gpa(slot.gpa))
            assert l0 is not None and l0.pte & f.PTE_C, f"shadow {slot.gpa:#x} has C but L0 does not"

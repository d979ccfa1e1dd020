"""The online audit: invariants I1-I7 of architecture.md, checked on quiescent state.

The checks only *read*: L0's tables, the L1s' trees (through a walk function, so the same code
audits an in-process cluster and a running one), and TLB entries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from . import formats as f
from .l0 import KvmNestedGuest, L0Hypervisor
from .radix import WalkResult
from .vcpu import TlbEntry, allowed_mask

# walk(l1_name, pate_dw0, n_gpa) -> WalkResult of the L1's tree
WalkFn = Callable[[str, int, int], WalkResult]

PERMS = f.PTE_EAA_READ | f.PTE_EAA_RW | f.PTE_EAA_EXEC


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.detail}"


@dataclass
class AuditReport:
    violations: list[Violation] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def add(self, inv: str, detail: str) -> None:
        self.violations.append(Violation(inv, detail))

    def count(self, key: str, n: int = 1) -> None:
        self.checked[key] = self.checked.get(key, 0) + n


def audit(l0: L0Hypervisor, walk: WalkFn, tlbs: Iterable[tuple[str, TlbEntry]] = ()) -> AuditReport:
    """Check I1-I4, I6 and I7 on L0 and the L1 trees, and I4/I5 on the given TLB entries.

    ``tlbs`` yields (vcpu name, entry) for every live vCPU.
    """
    rep = AuditReport()
    by_shadow: dict[int, KvmNestedGuest] = {}
    for vm in l0.l1s.values():
        for gp in vm.nested.values():
            by_shadow[gp.shadow_lpid] = gp
            _audit_guest(l0, gp, walk, rep)
    for gp in l0.live_guests:
        by_shadow.setdefault(gp.shadow_lpid, gp)
    _audit_tlbs(l0, by_shadow, tlbs, rep)
    _audit_leaks(l0, rep)
    return rep


def _audit_guest(l0: L0Hypervisor, gp: KvmNestedGuest, walk: WalkFn, rep: AuditReport) -> None:
    vm = gp.l1_host
    table = gp.shadow_pgtable
    if table is None:
        rep.add("I7", f"registered nested guest {vm.name}/{gp.l1_lpid} has no shadow table")
        return
    for slot in table.leaves():
        rep.count("shadow_leaves")
        where = f"{vm.name} lpid {gp.l1_lpid} (shadow {gp.shadow_lpid}) n_gpa {slot.gpa:#x}"
        spte = slot.pte
        hpa = spte & f.PTE_RPN_MASK
        size = 1 << slot.shift
        # I4: the host range must be memory this L1 owns.
        owner = l0.host_owner_of(hpa)
        owner_end = l0.host_owner_of(hpa + size - 1)
        if owner is None or owner[0] != vm.name or owner_end is None or owner_end[0] != vm.name:
            rep.add("I4", f"{where}: shadow leaf maps host {hpa:#x}+{size:#x} not owned by {vm.name}")
        # I1: composition of L1's tree and L0's table.
        g = walk(vm.name, gp.l1_gr_to_hr, slot.gpa)
        if not g.ok:
            rep.add("I1", f"{where}: valid shadow leaf but L1's walk fails (code {g.code:#x})")
            continue
        if g.page_shift < slot.shift:
            rep.add("I1", f"{where}: shadow leaf size 2^{slot.shift} exceeds L1 leaf size 2^{g.page_shift}")
        l0slot = vm.pgtable.lookup_leaf(g.raddr)
        if l0slot is None:
            rep.add("I1", f"{where}: L1 address {g.raddr:#x} has no L0 PTE")
            continue
        if l0slot.shift < slot.shift:
            rep.add("I1", f"{where}: shadow leaf size 2^{slot.shift} exceeds L0 leaf size 2^{l0slot.shift}")
        expect = (l0slot.pte & f.PTE_RPN_MASK) + (g.raddr - l0slot.gpa)
        if expect & ~(size - 1) != hpa:
            rep.add("I1", f"{where}: shadow maps {hpa:#x}, L1∘L0 gives {expect & ~(size - 1):#x}")
        # I2: permissions.
        extra = (spte & PERMS) & ~(g.pte & PERMS & l0slot.pte)
        if extra:
            rep.add("I2", f"{where}: shadow perms {spte & PERMS:#x} exceed L1 {g.pte & PERMS:#x} ∩ L0 {l0slot.pte & PERMS:#x}")
        # I3: R/C.
        if spte & f.PTE_R and not (g.pte & f.PTE_R and l0slot.pte & f.PTE_R):
            rep.add("I3", f"{where}: shadow R without L1 R and L0 R")
        if spte & f.PTE_C and not (g.pte & f.PTE_C and l0slot.pte & f.PTE_C):
            rep.add("I3", f"{where}: shadow C without L1 C and L0 C")
        # I6: rmap completeness (entry kept at the L0-page-aligned gfn).
        memslot = vm.memslot_for(g.raddr)
        gfn = l0slot.gpa >> l0.page_shift
        entry = f.rmap_entry(gp.l1_lpid, slot.gpa)
        if memslot is None or entry not in memslot.rmap.get(gfn, ()):
            rep.add("I6", f"{where}: no rmap entry at gfn {gfn:#x}")


def _audit_tlbs(l0: L0Hypervisor, by_shadow: dict[int, KvmNestedGuest], tlbs: Iterable[tuple[str, TlbEntry]], rep: AuditReport) -> None:
    for name, e in tlbs:
        rep.count("tlb_entries")
        where = f"vCPU {name} TLB lpid {e.lpid} page {e.page:#x}"
        gp = by_shadow.get(e.lpid)
        if gp is None or gp.shadow_pgtable is None:
            rep.add("I5", f"{where}: no live nested guest has this shadow LPID")
            continue
        owner = l0.host_owner_of(e.host)
        if owner is None or owner[0] != gp.l1_host.name:
            rep.add("I4", f"{where}: host {e.host:#x} not owned by {gp.l1_host.name}")
        slot = gp.shadow_pgtable.lookup_leaf(e.page)
        if slot is None or slot.shift != e.shift or slot.pte & f.PTE_RPN_MASK != e.host:
            rep.add("I5", f"{where}: no matching shadow leaf (stale translation)")
            continue
        if e.mask & ~allowed_mask(slot.pte):
            rep.add("I5", f"{where}: TLB allows more than the shadow leaf (mask {e.mask:#x} vs {allowed_mask(slot.pte):#x})")


def _audit_leaks(l0: L0Hypervisor, rep: AuditReport) -> None:
    expected = {vm.lpid for vm in l0.l1s.values()} | {gp.shadow_lpid for gp in l0.live_guests}
    if l0.lpids_in_use != expected:
        rep.add("I7", f"LPIDs in use {sorted(l0.lpids_in_use ^ expected)} not accounted for by L1s or live nested guests")
    for gp in l0.live_guests:
        registered = gp.l1_host.nested.get(gp.l1_lpid) is gp
        if gp.l1_host.released:
            rep.add("I7", f"nested guest {gp!r} outlives its L1")
        elif not registered and gp.refcnt <= 0:
            rep.add("I7", f"nested guest {gp!r} is neither registered nor referenced")
    for vm in l0.l1s.values():
        for gp in vm.nested.values():
            if gp.freed or gp not in l0.live_guests:
                rep.add("I7", f"registry of {vm.name} holds freed guest {gp!r}")
    # Host memory: partition table + L0 tables + shadow tables + backing.
    tables = sum(vm.pgtable.table_pages for vm in l0.l1s.values()) + sum(gp.shadow_pgtable.table_pages for gp in l0.live_guests if gp.shadow_pgtable)
    blocks = len(l0.alloc.in_use)
    backing = sum(len(vm.backing) for vm in l0.l1s.values())
    # A page mid-move (data mode's two phases) holds its old frame and, migrating, the new one.
    backing += sum(1 + bool(new) for vm in l0.l1s.values() for _, new, _ in vm.moving.values())
    if blocks != 1 + tables + backing:
        rep.add("I7", f"host allocator holds {blocks} blocks, expected {1 + tables + backing} (leak or double free)")
    rep.count("lpids", len(l0.lpids_in_use))

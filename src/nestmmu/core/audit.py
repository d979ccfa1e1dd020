"""The online audit: invariants I1-I7 of architecture.md, checked on quiescent state.

The checks only *read*: L0's tables, the L1s' trees (through a walk function, so the same code
audits an in-process cluster and a running one), and TLB entries.

Right or inconclusive.  A running cluster changes while it is read, and an L1 may not answer.
The audit therefore never judges what it could not look at, nor what was legitimately in
transition: the walk function may answer :class:`NotLooked` instead of a walk (the L1 did not
answer; or it had changed that guest's tree and its invalidation hcall had not yet returned,
the window in which the shadow may still hold a leaf built from the old L1 entry).  Such leaves
are skipped and the reason recorded; the report is then INCONCLUSIVE unless a violation was
found elsewhere.  TLB entries are judged against the shadow trees as they were when the dump
was requested (:func:`snapshot_shadow`): a vCPU answers its dump in stream order, so its TLB
reflects exactly the fills and tlbies queued before that moment.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from . import formats as f
from .l0 import KvmNestedGuest, L0Hypervisor
from .radix import WalkResult
from .vcpu import TlbEntry, allowed_mask


@dataclass(frozen=True)
class NotLooked:
    """A walk that was not done or cannot be trusted: the leaf proves nothing either way.

    ``transient``: a change was in flight (an L1 tree change whose invalidation hcall has not
    returned, a guest that appeared during the audit); a later look may settle it.  Otherwise
    the L1 could not be asked at all (gone, stopped, timed out).
    """

    reason: str
    transient: bool = False


# walk(l1_name, pate_dw0, n_gpa) -> WalkResult of the L1's tree, or NotLooked
WalkFn = Callable[[str, int, int], "WalkResult | NotLooked"]

CLEAN = "CLEAN"
VIOLATIONS = "VIOLATIONS"
INCONCLUSIVE = "INCONCLUSIVE"

PERMS = f.PTE_EAA_READ | f.PTE_EAA_RW | f.PTE_EAA_EXEC


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str
    #: The part of ``detail`` that names the violation, without values that may change while it
    #: persists (PTE bits another access sets): what a second look must see again to confirm it.
    identity: str = ""

    def __str__(self) -> str:
        return f"{self.invariant}: {self.detail}"

    @property
    def key(self) -> str:
        return f"{self.invariant}: {self.identity or self.detail}"


@dataclass
class AuditReport:
    violations: list[Violation] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    #: Why something could not be examined (unique, in order of discovery).
    inconclusive: list[str] = field(default_factory=list)
    #: Leaves skipped because a change was in flight (a retry may settle them).
    transient: int = 0

    @property
    def ok(self) -> bool:
        """No violation (the audit may still be inconclusive: see :attr:`outcome`)."""
        return not self.violations

    @property
    def outcome(self) -> str:
        if self.violations:
            return VIOLATIONS
        return INCONCLUSIVE if self.inconclusive else CLEAN

    def add(self, inv: str, detail: str, identity: str = "") -> None:
        self.violations.append(Violation(inv, detail, identity))

    def cannot_look(self, why: NotLooked) -> None:
        if why.transient:
            self.transient += 1
        if why.reason not in self.inconclusive:
            self.inconclusive.append(why.reason)

    def count(self, key: str, n: int = 1) -> None:
        self.checked[key] = self.checked.get(key, 0) + n


@dataclass(frozen=True)
class ShadowSnapshot:
    """The shadow trees at one instant, for judging TLB dumps requested at that instant."""

    owner: dict[int, str]  # shadow LPID -> L1 name, for every live nested guest
    # shadow LPID -> {(leaf gpa, shift): (pte, L1 owning the leaf's host page then, or "")}
    leaves: dict[int, dict[tuple[int, int], tuple[int, str]]]

    def lookup(self, lpid: int, page: int) -> tuple[int, int, str] | None:
        """(shift, pte, host owner) of the leaf of ``lpid`` covering ``page``, if any."""
        leaves = self.leaves.get(lpid)
        if not leaves:
            return None
        for shift in {k[1] for k in leaves}:
            got = leaves.get((page & ~((1 << shift) - 1), shift))
            if got is not None:
                return shift, got[0], got[1]
        return None


def snapshot_shadow(l0: L0Hypervisor) -> ShadowSnapshot:
    """Copy every live nested guest's shadow leaves (and who owned their host pages)."""
    owner: dict[int, str] = {}
    leaves: dict[int, dict[tuple[int, int], tuple[int, str]]] = {}
    for gp in l0.live_guests:
        if gp.shadow_pgtable is None:
            continue
        owner[gp.shadow_lpid] = gp.l1_host.name
        mine = leaves[gp.shadow_lpid] = {}
        for s in gp.shadow_pgtable.leaves():
            who = l0.host_owner_of(s.pte & f.PTE_RPN_MASK)
            mine[(s.gpa, s.shift)] = (s.pte, who[0] if who else "")
    return ShadowSnapshot(owner, leaves)


def audit(l0: L0Hypervisor, walk: WalkFn, tlbs: Iterable[tuple[str, TlbEntry]] = (), tlb_reference: ShadowSnapshot | None = None) -> AuditReport:
    """Check I1-I4, I6 and I7 on L0 and the L1 trees, and I4/I5 on the given TLB entries.

    ``tlbs`` yields (vcpu name, entry) for every live vCPU; ``tlb_reference`` is the shadow
    state when the TLBs were dumped (default: now, right for an in-process, quiescent cluster).
    """
    rep = AuditReport()
    for vm in l0.l1s.values():
        for gp in vm.nested.values():
            _audit_guest(l0, gp, walk, rep)
    _audit_tlbs(l0, tlb_reference or snapshot_shadow(l0), tlbs, rep)
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
        if isinstance(g, NotLooked):
            rep.count("shadow_leaves_not_judged")
            rep.cannot_look(g)
            continue
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
        for bit, name in ((f.PTE_R, "R"), (f.PTE_C, "C")):
            if spte & bit and not (g.pte & bit and l0slot.pte & bit):
                what = f"{where}: shadow {name} without both L1 {name} and L0 {name}"
                missing = " and ".join(f"{who} {name}" for who, pte in (("L1", g.pte), ("L0", l0slot.pte)) if not pte & bit)
                ptes = f"shadow PTE {spte:#x}, L1 PTE {g.pte:#x}, L0 PTE {l0slot.pte:#x}"
                rep.add("I3", f"{what}: {missing} missing ({ptes})", identity=what)
        # I6: rmap completeness (entry kept at the L0-page-aligned gfn).
        memslot = vm.memslot_for(g.raddr)
        gfn = l0slot.gpa >> l0.page_shift
        entry = f.rmap_entry(gp.l1_lpid, slot.gpa)
        if memslot is None or entry not in memslot.rmap.get(gfn, ()):
            rep.add("I6", f"{where}: no rmap entry at gfn {gfn:#x}")


def _audit_tlbs(l0: L0Hypervisor, ref: ShadowSnapshot, tlbs: Iterable[tuple[str, TlbEntry]], rep: AuditReport) -> None:
    for name, e in tlbs:
        rep.count("tlb_entries")
        where = f"vCPU {name} TLB lpid {e.lpid} page {e.page:#x}"
        l1_name = ref.owner.get(e.lpid)
        if l1_name is None:
            rep.add("I5", f"{where}: no live nested guest has this shadow LPID")
            continue
        if e.pid >= 0:
            # An EA entry (2-D walk): its real page must still be mapped by a shadow leaf at
            # least as large, to the same host address.
            where = f"{where} (PID {e.pid}, real page {e.real_page:#x})"
            leaf = ref.lookup(e.lpid, e.real_page)
            if leaf is None or leaf[0] < e.shift or (leaf[1] & f.PTE_RPN_MASK) + (e.real_page & ((1 << leaf[0]) - 1)) != e.host:
                rep.add("I5", f"{where}: no matching shadow leaf (stale translation)")
                continue
        else:
            leaf = ref.lookup(e.lpid, e.page)
            if leaf is None or leaf[0] != e.shift or leaf[1] & f.PTE_RPN_MASK != e.host:
                rep.add("I5", f"{where}: no matching shadow leaf (stale translation)")
                continue
        if leaf[2] != l1_name:
            rep.add("I4", f"{where}: host {e.host:#x} not owned by {l1_name}")
        if e.mask & ~allowed_mask(leaf[1]):
            rep.add("I5", f"{where}: TLB allows more than the shadow leaf (mask {e.mask:#x} vs {allowed_mask(leaf[1]):#x})")


def _audit_leaks(l0: L0Hypervisor, rep: AuditReport) -> None:
    expected = {vm.lpid for vm in l0.l1s.values()} | {gp.shadow_lpid for gp in l0.live_guests}
    if l0.lpids_in_use != expected:
        rep.add("I7", f"LPIDs in use {sorted(l0.lpids_in_use ^ expected)} not accounted for by L1s or live nested guests")
    for gp in l0.live_guests:
        registered = gp.l1_host.nested.get(gp.l1_lpid) is gp
        if gp.l1_host.released:
            rep.add("I7", f"nested guest {gp!r} outlives its L1")
        elif gp.creating:
            # kvmhv_get_nested between kvmhv_alloc_nested and registering it (H_ENTER_NESTED
            # in flight, reading L1's PATE): held by its creator, not leaked.
            rep.count("nested_guests_being_created")
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

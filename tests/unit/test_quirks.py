"""Edge cases and kernel bugs of semantics §9, each shown against the correct default."""

from __future__ import annotations

import pytest
from _helpers_fault import Env, MiB, make_env

from nestmmu.core import formats as f
from nestmmu.core.effects import NestedExit, Outcome, Scope
from nestmmu.core.formats import Access
from nestmmu.core.l0 import FaultKind, KernelBugs, L0Config
from nestmmu.core.l1 import GuestRegion, L2Guest
from nestmmu.core.radix import RadixTable
from nestmmu.core.sim import InProcessCluster

HDSI = f.BOOK3S_INTERRUPT_H_DATA_STORAGE


# ---------------------------------------------------------------- §9.6 dirty-harvest race
def race_harvest_into_a_store_fault(bugs: KernelBugs) -> tuple[Env, int, list[list[int]]]:
    """A store's nested fault samples L0's PTE (with C); a harvest runs before the insert."""
    e = make_env(L0Config(bugs=bugs))
    e.host(e.l0.set_dirty_logging, e.vm, 0, True)
    p = 0x10000
    e.run(p, Access.STORE)  # L1 leaf, L0 PTE and shadow all have C
    e.flush_page(p)  # shadow gone; L0 PTE keeps C
    l1_gpa = e.l1_gpa(p)
    l0 = e.l0_pte(l1_gpa)
    assert l0 is not None and l0.pte & f.PTE_C
    harvested: list[list[int]] = []

    def hook(where: str) -> None:
        if where == "nested_fault:after_l0_pte_read" and not harvested:
            harvested.append(e.l0.harvest_dirty(e.vm, 0))

    e.c.preempt_hook = hook
    e.run(p + 8, Access.STORE)
    e.c.preempt_hook = None
    assert harvested == [[l1_gpa]]  # the first store was harvested mid-fault
    return e, l1_gpa, harvested


def test_dirty_harvest_race_default_retries_and_the_store_is_seen_by_the_next_harvest() -> None:
    e, l1_gpa, _ = race_harvest_into_a_store_fault(KernelBugs())
    assert e.l0.stats["mmu_seq_retry"] == 1
    sh = e.shadow(0x10000)
    l0 = e.l0_pte(l1_gpa)
    assert sh is not None and sh.pte & f.PTE_C and l0 is not None and l0.pte & f.PTE_C
    assert e.c.audit().ok
    assert e.host(e.l0.harvest_dirty, e.vm, 0) == [l1_gpa]


def test_dirty_harvest_race_without_seq_bump_loses_the_dirty_page() -> None:
    e, l1_gpa, _ = race_harvest_into_a_store_fault(KernelBugs(dirty_harvest_no_seq_bump=True))
    assert e.l0.stats["mmu_seq_retry"] == 0
    sh = e.shadow(0x10000)
    l0 = e.l0_pte(l1_gpa)
    assert sh is not None and sh.pte & f.PTE_C  # shadow C ...
    assert l0 is not None and not l0.pte & f.PTE_C  # ... without L0 C
    assert e.violations() == {"I3"}
    # The L2 keeps storing through its TLB; dirty logging never hears about it.
    faults = e.l0.stats["nested_faults"]
    e.run(0x10010, Access.STORE)
    assert e.l0.stats["nested_faults"] == faults
    assert e.host(e.l0.harvest_dirty, e.vm, 0) == []


# ---------------------------------------------------------------- §9.7 RC-clear tlbie lpid
@pytest.mark.parametrize("buggy", [False, True], ids=["default", "rc_clear_tlbie_l1_lpid"])
def test_harvest_tlbie_must_use_the_shadow_lpid(buggy: bool) -> None:
    e = make_env(L0Config(bugs=KernelBugs(rc_clear_tlbie_l1_lpid=buggy)))
    e.host(e.l0.set_dirty_logging, e.vm, 0, True)
    p = 0x10000
    e.run(p, Access.STORE)
    l1_gpa = e.l1_gpa(p)
    tlb = e.tlb(p)
    assert tlb is not None and tlb.pte & f.PTE_C

    e.l0.harvest_dirty(e.vm, 0)
    invs = e.l0.take_invalidations()
    rc_clear = [i for i in invs if i.reason == "rc_clear" and i.address == p]
    assert [i.lpid for i in rc_clear] == [e.lpid if buggy else e.gp.shadow_lpid]
    e.c.deliver(invs)

    sh = e.shadow(p)
    assert sh is not None and not sh.pte & f.PTE_C  # the leaf itself was cleaned either way
    faults = e.l0.stats["nested_faults"]
    if buggy:
        tlb = e.tlb(p)
        assert tlb is not None and tlb.pte & f.PTE_C  # stale entry with C survived
        assert e.violations() == {"I5"}
        e.run(p + 8, Access.STORE)  # hits the TLB: no fault, no C anywhere in L0
        assert e.l0.stats["nested_faults"] == faults
        assert e.host(e.l0.harvest_dirty, e.vm, 0) == []
    else:
        assert e.tlb(p) is None
        assert e.c.audit().ok
        e.run(p + 8, Access.STORE)
        assert e.l0.stats["nested_faults"] == faults + 1  # SET_RC, absorbed by L0
        assert e.host(e.l0.harvest_dirty, e.vm, 0) == [l1_gpa]


# ---------------------------------------------------------------- §9.10 teardown tlbie address
@pytest.mark.parametrize("buggy", [False, True], ids=["default", "free_pte_tlbie_uses_hpa"])
def test_2m_leaf_installed_over_live_small_ptes_tlbies_each_old_pte(buggy: bool) -> None:
    c = InProcessCluster(L0Config(bugs=KernelBugs(free_pte_tlbie_uses_hpa=buggy)))
    c.add_l1("a")
    l0, vm = c.l0, c.vms["a"]
    l0.set_dirty_logging(vm, 0, True)
    base = 64 * MiB
    small = [base, base + 0x10000]
    for gpa in small:
        assert l0.kvmppc_book3s_radix_page_fault(vm, gpa, f.DSISR_NOHPTE) == 0
    hpas = []
    for gpa in small:
        slot = vm.pgtable.lookup_leaf(gpa)
        assert slot is not None and slot.shift == 16
        hpas.append(slot.pte & f.PTE_RPN_MASK)
    assert set(hpas) != set(small)
    # The window of "Remove user-triggerable WARN_ON": the new memslot (logging off) is live
    # before the old one is flushed, so a fault installs a 2M leaf over the small PTEs.
    vm.memslots[0].dirty_logging = False
    l0.take_invalidations()
    assert l0.kvmppc_book3s_radix_page_fault(vm, base + 0x20000, f.DSISR_NOHPTE) == 0
    big = vm.pgtable.lookup_leaf(base)
    assert big is not None and big.shift == 21
    assert l0.stats["create_pte.free_lower_table"] == 1
    unmaps = [i for i in l0.take_invalidations() if i.scope is Scope.ADDRESS and i.lpid == vm.lpid]
    assert all(i.size == 0x10000 for i in unmaps)
    assert [i.address for i in unmaps] == (hpas if buggy else small)


# ---------------------------------------------------------------- §9.11 THP collapse
def test_thp_collapse_makes_the_fault_resume_the_guest_once() -> None:
    e = make_env()
    e.l1.map_pages(e.lpid, 0x10000, 0x10000)
    e.l0.host_thp_collapse(e.vm, e.l1_gpa(0x10000))
    ex = NestedExit(HDSI, 0x10000, f.DSISR_NOHPTE, 0x10000, Access.LOAD)
    res = e.c.drive(e.l0.kvmhv_nested_page_fault(e.gp, ex))
    assert res.kind is FaultKind.RESUME_GUEST
    assert e.shadow(0x10000) is None and e.l0_pte(e.l1_gpa(0x10000)) is None
    res = e.c.drive(e.l0.kvmhv_nested_page_fault(e.gp, ex))
    assert res.kind is FaultKind.RESUME_GUEST
    assert e.shadow(0x10000) is not None
    assert e.l0.stats["thp_collapse_retry"] == 1 and e.l0.stats["shadow_inserted"] == 1


def test_thp_collapse_invalidates_l0_leaf_and_shadow_leaves_before_the_pte_goes() -> None:
    """khugepaged's collapse_huge_page calls mmu_notifier_invalidate_range_start: KVM's
    kvm_unmap_radix unmaps L0's leaf for the host page and, via the rmap
    (kvmhv_remove_nest_rmap_range), every shadow leaf built on it, with their tlbies; the
    range end bumps mmu_invalidate_seq.  (The model used to leave both leaves in place.)"""
    e = make_env()  # 2M THP-backed RAM
    pages = [0x10000, 0x20000]
    for p in pages:
        assert e.access(p, Access.STORE).outcome is Outcome.FILL
    l1_gpa = e.l1_gpa(0x10000)
    l0 = e.l0_pte(l1_gpa)
    assert l0 is not None and l0.shift == 21 and len(e.shadow_leaves()) == 2
    seq = e.vm.mmu_invalidate_seq

    assert e.host(e.l0.host_thp_collapse, e.vm, l1_gpa) == 1

    assert e.l0_pte(l1_gpa) is None
    assert e.shadow_leaves() == []
    assert all(e.tlb(p) is None for p in pages)
    assert e.l0.stats["rmap_shadow_unmapped"] == 2
    assert e.vm.mmu_invalidate_seq == seq + 1
    assert e.c.audit().ok
    # The host PTE is still absent for the next fault (§9.11): it resumes the guest once.
    assert e.access(0x10000, Access.LOAD).outcome is Outcome.FILL
    assert e.l0.stats["thp_collapse_retry"] == 1
    assert e.c.audit().ok


def test_thp_collapse_while_logging_records_the_dirty_page() -> None:
    """kvmppc_unmap_pte marks a page with C in the dirty log when it unmaps it."""
    e = make_env()
    e.host(e.l0.set_dirty_logging, e.vm, 0, True)
    e.run(0x10000, Access.STORE)
    l1_gpa = e.l1_gpa(0x10000)
    e.host(e.l0.host_thp_collapse, e.vm, l1_gpa)
    assert l1_gpa in e.host(e.l0.harvest_dirty, e.vm, 0)


# ---------------------------------------------------------------- §9.14 lpid 0
def test_l1_lpid_0_is_accepted_and_its_zero_rmap_entry_still_works() -> None:
    c = InProcessCluster()
    l1 = c.add_l1("a")
    tree = RadixTable(l1.mem, l1.alloc, 16)
    l1.guests[0] = L2Guest(0, 16, 64 * MiB, tree)
    l1._write_pate(0, tree.pate_dw0(), f.make_pate_dw1())
    s = c.attach_vcpu("a", 0, 0)
    assert s.gp.l1_lpid == 0 and c.vms["a"].nested[0] is s.gp
    assert c.access(s, 0x0, Access.LOAD).outcome is Outcome.FILL
    memslot = c.vms["a"].memslots[0]
    l1_gpa = l1.walk(tree.pate_dw0(), 0).raddr
    l0slot = c.vms["a"].pgtable.lookup_leaf(l1_gpa)
    assert l0slot is not None
    assert memslot.rmap[l0slot.gpa >> 16] == [0]  # lpid 0, n_gpa 0: the all-zero entry
    assert c.audit().ok
    # Unlike the kernel's list iterator, the model does not mistake 0 for end-of-list.
    c.l0.host_unmap(c.vms["a"], l1_gpa)
    c.deliver(c.l0.take_invalidations())
    assert c.l0.shadow_leaves(s.gp) == [] and len(s.vcpu.tlb) == 0
    assert c.audit().ok


# ---------------------------------------------------------------- §9.16 PRTABLE_FAULT
def test_prtable_fault_reflection_replaces_asdr_with_the_unreadable_entry() -> None:
    e = make_env()
    e.l1.map_pages(e.lpid, 0, 0x10000)
    hole = e.l1.mmio_base
    e.l1.mem.write_u64(e.guest.tree.root, f.make_pde(hole, 9))
    ex = NestedExit(HDSI, 0x4000_0123, f.DSISR_NOHPTE, 0x4000_0123, Access.LOAD)  # PUD index 1
    res = e.c.drive(e.l0.kvmhv_nested_page_fault(e.gp, ex))
    assert res.kind is FaultKind.RESUME_HOST
    assert res.exit == NestedExit(HDSI, 0x4000_0123, f.DSISR_PRTABLE_FAULT, hole + 8, Access.LOAD)


def test_memslot_less_l1_gpa_with_prtable_fault_injects_dsi_into_l2() -> None:
    mmio = 34 * MiB
    e = make_env(regions=[GuestRegion("mmio", mmio, 2 * MiB)])
    e.l1.map_pages(e.lpid, mmio, 0x10000)
    ex = NestedExit(HDSI, mmio, f.DSISR_PRTABLE_FAULT, mmio, Access.LOAD)
    res = e.c.drive(e.l0.kvmhv_nested_page_fault(e.gp, ex))
    assert res.kind is FaultKind.INJECT_DSI and res.dsisr == f.DSISR_PRTABLE_FAULT
    ex = NestedExit(HDSI, mmio, f.DSISR_NOHPTE, mmio, Access.LOAD)
    res = e.c.drive(e.l0.kvmhv_nested_page_fault(e.gp, ex))
    assert res.kind is FaultKind.MMIO


# ---------------------------------------------------------------- §9.17 OR of a mismatched RPN
def test_l1_remap_without_tlbie_ors_old_and_new_rpn_in_the_shadow_leaf() -> None:
    e = make_env(L0Config(host_write_upgrade=False))
    p = 0x10000
    e.access(p, Access.LOAD)
    sh = e.shadow(p)
    assert sh is not None and not sh.pte & f.PTE_EAA_RW
    old_rpn = sh.pte & f.PTE_RPN_MASK
    # L1 moves the page within the same 2M host page and does not flush (protocol violation).
    new_l1 = e.l1.alloc.alloc(0x10000)
    old_l1 = e.l1_gpa(p)
    assert new_l1 & ~0x1F_FFFF == old_l1 & ~0x1F_FFFF
    g = e.l1_leaf(p)
    e.write_l1_leaf(p, (g.pte & ~f.PTE_RPN_MASK) | new_l1)
    # A store: hardware PROTFAULT (read-only shadow), L1 allows, L0 builds the new PTE and
    # ORs it into the existing same-level leaf.
    e.access(p, Access.STORE)
    assert e.l0.stats["warn.pte_bits_must_match"] == 1
    new_rpn = old_rpn - (old_l1 & 0x1F_0000) + (new_l1 & 0x1F_0000)
    assert old_rpn | new_rpn not in (old_rpn, new_rpn)
    sh = e.shadow(p)
    assert sh is not None and sh.pte & f.PTE_RPN_MASK == old_rpn | new_rpn
    assert "I1" in e.violations()


@pytest.mark.parametrize("buggy", [False, True])
def test_zero_rmap_node_ends_the_kernels_list_walk(buggy: bool) -> None:
    """for_each_nest_rmap_safe assumes non-zero entries: an L1 guest with lpid 0 gets the
    all-zero entry (lpid 0, n_gpa 0) for its page 0, and when that entry is a list node
    (not the first entry of its gfn) the walk in kvmhv_remove_nest_rmap_range stops there.
    The older entry -- lpid 1's shadow leaf on the same L1 page -- is never unmapped: its
    shadow leaf and TLB entry outlive the host page.  Correct by default; the kernel's walk
    with KernelBugs.rmap_zero_entry_ends_walk."""
    c = InProcessCluster(L0Config(bugs=KernelBugs(rmap_zero_entry_ends_walk=buggy)))
    l1 = c.add_l1("a")
    lpid1 = c.create_guest("a", page_shift=16)
    s1 = c.attach_vcpu("a", lpid1, 0)
    assert c.access(s1, 0x30000, Access.LOAD).outcome is Outcome.FILL
    l1_gpa = l1.guests[lpid1].backing[3]
    # lpid 0's page 0 is backed by the same L1 page.
    tree = RadixTable(l1.mem, l1.alloc, 16)
    l1.guests[0] = L2Guest(0, 16, 64 * MiB, tree, backing={0: l1_gpa})
    l1._write_pate(0, tree.pate_dw0(), f.make_pate_dw1())
    s0 = c.attach_vcpu("a", 0, 1)
    assert c.access(s0, 0x0, Access.LOAD).outcome is Outcome.FILL
    vm = c.vms["a"]
    l0slot = vm.pgtable.lookup_leaf(l1_gpa)
    assert l0slot is not None
    gfn = l0slot.gpa >> 16
    assert vm.memslots[0].rmap[gfn] == [f.rmap_entry(lpid1, 0x30000), 0]  # 0 is a list node
    # What every walk of this gfn sees (unmap, R/C update, the insert's dedup): nothing at
    # all in the kernel, whose walk starts at the newest node -- the zero one.
    walked = c.l0.for_each_nest_rmap_safe(vm.memslots[0].rmap[gfn])
    assert walked == ([] if buggy else [f.rmap_entry(lpid1, 0x30000), 0])

    c.l0.host_unmap(vm, l1_gpa)
    c.deliver(c.l0.take_invalidations())

    survivors = len(c.l0.shadow_leaves(s0.gp)) + len(c.l0.shadow_leaves(s1.gp))
    if buggy:
        assert survivors == 2 and len(s1.vcpu.tlb) == 1
        assert c.l0.stats["rmap_walk_ended_at_zero"] >= 1 and c.l0.stats["rmap_entries_leaked"] == 2
        assert "I1" in {v.invariant for v in c.audit().violations}
    else:
        assert survivors == 0 and len(s0.vcpu.tlb) == len(s1.vcpu.tlb) == 0
        assert c.l0.stats["rmap_walk_ended_at_zero"] == 0 and c.l0.stats["rmap_entries_leaked"] == 0
        assert c.audit().ok

"""Reference/change handling (semantics §4): POWER9 never sets R/C itself in radix mode."""

from __future__ import annotations

from _helpers_fault import MiB, assert_shadow_c_implies_l0_c, make_env

from nestmmu.core import formats as f
from nestmmu.core.effects import NestedExit, Outcome
from nestmmu.core.formats import Access
from nestmmu.core.l1 import GuestRegion

HDSI = f.BOOK3S_INTERRUPT_H_DATA_STORAGE


def test_store_after_load_is_a_tlb_miss_and_l0_absorbs_set_rc_because_both_tables_have_c() -> None:
    """kvmppc_book3s_instantiate_page sets C whenever the PTE ends up writable (writing ||
    upgrade_write), in L0's table and in Linux-as-L1's leaf for its L2; the shadow leaf of
    a load still has no C (__kvmhv_nested_page_fault), so the first store traps with SET_RC
    and kvmhv_handle_nested_set_rc absorbs it in L0: no exit to L1 (the model used to
    reflect it, one extra exit)."""
    e = make_env()
    p = 0x40000
    e.run(p, Access.LOAD)
    tlb = e.tlb(p)
    assert tlb is not None and not tlb.pte & f.PTE_C
    g = e.l1_leaf(p)
    l0 = e.l0_pte(g.raddr)
    assert g.pte & f.PTE_C and l0 is not None and l0.pte & f.PTE_C  # C at instantiation
    e.exits.clear()
    faults_before = e.l0.stats["nested_faults"]

    e.run(p + 8, Access.STORE)

    # The TLB entry without C could not satisfy the store: it went to L0.
    assert e.s.vcpu.stats["misses_sent"] == 2
    # L1's leaf had C already: L0 set C in the shadow leaf itself, nothing reflected.
    assert e.exits == []
    assert e.l1.stats.get("exit.set_rc", 0) == 0
    st = e.l0.stats
    assert st["nested_faults"] - faults_before == 1
    assert (st["rc_faults"], st["reflected.SET_RC"], st["rc_set_in_l0"]) == (1, 0, 1)
    sh = e.shadow(p)
    assert sh is not None and sh.pte & f.PTE_C and sh.pte & f.PTE_R
    # And the vCPU now holds the translation with C: the next store is a hit.
    tlb = e.tlb(p)
    assert tlb is not None and tlb.pte == sh.pte
    e.run(p + 16, Access.STORE)
    assert e.s.vcpu.stats["misses_sent"] == 2
    assert e.s.vcpu.stats["tlb_hits"] == 1
    assert e.c.audit().ok


def test_store_to_a_leaf_l1_made_writable_without_c_is_reflected_set_rc_then_l0_sets_c() -> None:
    """kvmhv_handle_nested_set_rc: when L1's leaf lacks C the SET_RC goes to L1 (RESUME_HOST),
    which sets C in its tree; on re-entry L0 sets C in its PTE and the shadow leaf."""
    e = make_env()
    p = 0x40000
    e.run(p, Access.LOAD)
    # L1 takes RW away (C goes with it) and gives it back: the leaf is writable without C.
    e.issue(e.l1.protect_pages(e.lpid, p, 0x10000, f.PTE_EAA_READ | f.PTE_EAA_EXEC)[1])
    e.issue(e.l1.protect_pages(e.lpid, p, 0x10000, f.PTE_EAA_READ | f.PTE_EAA_RW | f.PTE_EAA_EXEC)[1])
    g = e.l1_leaf(p)
    assert g.pte & f.PTE_EAA_RW and not g.pte & f.PTE_C
    e.run(p, Access.LOAD)
    e.exits.clear()
    faults_before = e.l0.stats["nested_faults"]

    e.run(p + 8, Access.STORE)

    assert e.exits == [NestedExit(HDSI, p + 8, f.DSISR_SET_RC | f.DSISR_ISSTORE, p + 8, Access.STORE)]
    assert e.l1.stats["exit.set_rc"] == 1
    g = e.l1_leaf(p)
    assert g.pte & f.PTE_C and g.pte & f.PTE_R
    st = e.l0.stats
    assert st["nested_faults"] - faults_before == 2
    assert (st["reflected.SET_RC"], st["rc_set_in_l0"]) == (1, 1)
    l0 = e.l0_pte(g.raddr)
    assert l0 is not None and l0.pte & f.PTE_C
    sh = e.shadow(p)
    assert sh is not None and sh.pte & f.PTE_C
    assert e.c.audit().ok


def test_read_fault_never_grants_c_even_when_l1_and_l0_both_have_it() -> None:
    e = make_env()
    p = 0x60000
    assert e.access(p, Access.STORE).outcome is Outcome.FILL
    sh = e.shadow(p)
    assert sh is not None and sh.pte & f.PTE_C
    e.flush_page(p)  # shadow gone, both L1 leaf and L0 PTE keep C
    assert e.shadow(p) is None
    g = e.l1_leaf(p)
    l0 = e.l0_pte(g.raddr)
    assert g.pte & f.PTE_C and l0 is not None and l0.pte & f.PTE_C

    assert e.access(p, Access.LOAD).outcome is Outcome.FILL
    sh = e.shadow(p)
    assert sh is not None and sh.pte & f.PTE_R and not sh.pte & f.PTE_C

    # The first store therefore traps with SET_RC, which L0 absorbs (L1 already has C).
    e.exits.clear()
    before = dict(e.l0.stats)
    assert e.access(p, Access.STORE).outcome is Outcome.FILL
    assert e.exits == []
    assert e.l0.stats["rc_set_in_l0"] == before.get("rc_set_in_l0", 0) + 1
    sh = e.shadow(p)
    assert sh is not None and sh.pte & f.PTE_C
    assert e.c.audit().ok


def test_shadow_c_implies_l0_c_after_every_step_of_a_mixed_sequence() -> None:
    e = make_env()
    steps = [
        (0x10000, Access.LOAD),
        (0x10000, Access.STORE),
        (0x20000, Access.STORE),
        (0x30000, Access.IFETCH),
        (0x30000, Access.STORE),
        (0x20000, Access.LOAD),
    ]
    for addr, kind in steps:
        e.run(addr, kind)
        assert_shadow_c_implies_l0_c(e)
    e.flush_page(0x20000)
    e.run(0x20000, Access.LOAD)
    assert_shadow_c_implies_l0_c(e)
    e.run(0x20000, Access.STORE)
    assert_shadow_c_implies_l0_c(e)
    assert e.c.audit().ok


def test_l0_own_guest_set_rc_sets_r_and_c_in_l0_pte() -> None:
    e = make_env()
    l0, vm = e.l0, e.vm
    gpa = 0x0400_0000
    assert l0.kvmppc_book3s_radix_page_fault(vm, gpa, f.DSISR_NOHPTE) == 0
    slot = vm.pgtable.lookup_leaf(gpa)
    # A read fault with the host's write upgrade maps the page writable, hence with C.
    assert slot is not None and slot.pte & f.PTE_R and slot.pte & f.PTE_C
    vm.pgtable.mem.write_u64(slot.addr, slot.pte & ~f.PTE_C)  # as a dirty harvest leaves it
    # Store needing C: set in place, no re-instantiation.
    inst = l0.stats["l0_instantiate"]
    assert l0.kvmppc_book3s_radix_page_fault(vm, gpa, f.DSISR_SET_RC | f.DSISR_ISSTORE) == 0
    slot = vm.pgtable.lookup_leaf(gpa)
    assert slot is not None and slot.pte & f.PTE_C
    assert l0.stats["l1_rc_set"] == 1 and l0.stats["l0_instantiate"] == inst
    # Aging cleared R: a load with SET_RC sets it again (and leaves C alone).
    vm.pgtable.mem.write_u64(slot.addr, slot.pte & ~f.PTE_R)
    assert l0.kvmppc_book3s_radix_page_fault(vm, gpa, f.DSISR_SET_RC) == 0
    slot = vm.pgtable.lookup_leaf(gpa)
    assert slot is not None and slot.pte & f.PTE_R and slot.pte & f.PTE_C
    assert l0.stats["l1_rc_set"] == 2


def test_l0_own_guest_set_rc_on_missing_pte_instantiates() -> None:
    e = make_env()
    gpa = 0x0800_0000
    assert e.vm.pgtable.lookup_leaf(gpa) is None
    assert e.l0.kvmppc_book3s_radix_page_fault(e.vm, gpa, f.DSISR_SET_RC | f.DSISR_ISSTORE) == 0
    slot = e.vm.pgtable.lookup_leaf(gpa)
    assert slot is not None and slot.pte & f.PTE_C and slot.pte & f.PTE_EAA_RW
    assert e.l0.stats["l1_rc_set"] == 0


def test_nested_set_rc_when_l0_pte_vanished_invalidates_shadow_and_retries() -> None:
    e = make_env()
    p = 0x90000
    e.access(p, Access.LOAD)
    e.access(p, Access.STORE)  # L1 leaf now has C
    e.flush_page(p)
    e.access(p, Access.LOAD)  # shadow without C again
    g = e.l1_leaf(p)
    l0 = e.l0_pte(g.raddr)
    assert l0 is not None
    # Remove L0's PTE behind everyone's back (no rmap walk): the R/C update cannot find it.
    e.vm.pgtable.mem.write_u64(l0.addr, 0)
    r = e.access(p, Access.STORE)
    assert r.outcome is Outcome.FILL
    # The SET_RC fault failed, the shadow PTE was dropped, the refault re-instantiated L0.
    sh = e.shadow(p)
    l0 = e.l0_pte(g.raddr)
    assert sh is not None and l0 is not None
    assert sh.pte & f.PTE_C and l0.pte & f.PTE_C


def test_linux_as_l1_leaves_get_c_whenever_writable() -> None:
    """Linux-as-L1 builds its L2's leaves with kvmppc_book3s_instantiate_page too: C whenever
    the leaf ends up writable, whatever the access (a load, a prefault, a remap's new leaf);
    never on a leaf L1 maps without RW."""
    ro = 32 * MiB
    e = make_env(regions=[GuestRegion("protect", ro, 2 * MiB, f.PTE_EAA_READ | f.PTE_EAA_EXEC)])
    assert e.access(0x10000, Access.LOAD).outcome is Outcome.FILL
    assert e.access(ro, Access.LOAD).outcome is Outcome.FILL
    e.issue(e.l1.map_pages(e.lpid, 0x20000, 0x10000)[1])
    for p, c in ((0x10000, True), (0x20000, True), (ro, False)):
        g = e.l1_leaf(p)
        assert g.ok and g.pte & f.PTE_R and bool(g.pte & f.PTE_C) == c, hex(p)
    old = e.l1_gpa(0x10000)
    e.issue(e.l1.remap_pages(e.lpid, 0x10000, 0x10000)[1])
    g = e.l1_leaf(0x10000)
    assert g.raddr != old and g.pte & f.PTE_C
    # The shadow leaf of the load still has no C: the first store takes SET_RC in L0 only.
    e.exits.clear()
    assert e.access(0x20000, Access.LOAD).outcome is Outcome.FILL
    sh = e.shadow(0x20000)
    assert sh is not None and not sh.pte & f.PTE_C
    assert e.access(0x20000, Access.STORE).outcome is Outcome.FILL
    assert e.exits == []
    assert e.c.audit().ok

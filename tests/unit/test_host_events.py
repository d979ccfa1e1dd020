"""L0 host-side events (semantics §6): unmap, migrate, dirty logging and harvest, via the rmap."""

from __future__ import annotations

from _helpers_fault import Env, base_page_memslots, make_env

from nestmmu.core import formats as f
from nestmmu.core.effects import Outcome
from nestmmu.core.formats import Access
from nestmmu.core.l0 import L0Config


def fill(e: Env, addrs: list[int], kind: Access = Access.LOAD) -> None:
    for a in addrs:
        assert e.access(a, kind).outcome is Outcome.FILL


def test_host_unmap_removes_l0_pte_and_every_shadow_leaf_on_it_via_rmap() -> None:
    e = make_env()  # 2M host pages
    pages = [0x10000, 0x20000, 0x30000]
    fill(e, pages)
    chunks = {e.l1_gpa(p) & ~0x1F_FFFF for p in pages}
    assert len(chunks) == 1  # one L0 2M page backs all three L1 pages
    l1_gpa = e.l1_gpa(0x20000)
    l0 = e.l0_pte(l1_gpa)
    assert l0 is not None
    seq = e.vm.mmu_invalidate_seq

    assert e.host(e.l0.host_unmap, e.vm, l1_gpa) == 1

    assert e.l0_pte(l1_gpa) is None
    assert e.shadow_leaves() == []
    assert all(e.tlb(p) is None for p in pages)
    assert e.l0.stats["rmap_shadow_unmapped"] == 3
    assert l0.gpa >> 16 not in e.memslot().rmap
    assert e.vm.mmu_invalidate_seq == seq + 1
    assert e.c.audit().ok
    # Refault works.
    fill(e, [0x20000])
    assert e.c.audit().ok


def test_host_unmap_leaves_shadow_leaves_of_other_host_pages() -> None:
    e = make_env(memslots=base_page_memslots())
    fill(e, [0x10000, 0x20000])
    e.host(e.l0.host_unmap, e.vm, e.l1_gpa(0x10000))
    assert [s.gpa for s in e.shadow_leaves()] == [0x20000]
    assert e.tlb(0x10000) is None and e.tlb(0x20000) is not None
    assert e.c.audit().ok


def test_stale_rmap_entry_is_skipped_by_the_rpn_check() -> None:
    e = make_env(memslots=base_page_memslots())
    p = 0x50000
    fill(e, [p])
    old_l1 = e.l1_gpa(p)
    # RIC=0 frees the shadow tree; the rmap entry at old_l1's gfn stays behind.
    e.tlbie(f.RIC_TLB, f.IS_LPID)
    assert e.memslot().rmap[old_l1 >> 16] == [e.rmap_entry(p)]
    # L1 moves the L2 page to another L1 page and the L2 refaults onto it.
    _, hcalls = e.l1.remap_pages(e.lpid, p, 0x10000)
    e.issue(hcalls)
    fill(e, [p])
    new_l1 = e.l1_gpa(p)
    assert new_l1 != old_l1
    sh = e.shadow(p)
    assert sh is not None
    assert e.memslot().rmap[new_l1 >> 16] == [e.rmap_entry(p)]

    e.host(e.l0.host_unmap, e.vm, old_l1)

    # The stale entry named (lpid, p), whose leaf now maps another host page: kept.
    assert e.l0.stats["rmap_stale_skipped"] == 1
    assert e.l0.stats["rmap_shadow_unmapped"] == 0
    assert e.shadow(p) == sh and e.tlb(p) is not None
    assert old_l1 >> 16 not in e.memslot().rmap
    assert e.c.audit().ok


def test_host_migrate_moves_the_backing_and_the_next_access_refaults_to_it() -> None:
    e = make_env()
    p = 0x10000
    fill(e, [p])
    l1_gpa = e.l1_gpa(p)
    old_sh = e.shadow(p)
    assert old_sh is not None

    removed, old, new = e.host(e.l0.host_migrate, e.vm, l1_gpa)

    assert removed == 1 and old != new and new != 0
    assert old_sh.pte & f.PTE_RPN_MASK & ~0x1F_FFFF == old
    assert e.shadow(p) is None and e.tlb(p) is None
    assert e.l0.host_owner_of(old) is None
    assert e.c.audit().ok
    r = e.access(p, Access.LOAD)
    assert r.outcome is Outcome.FILL and r.translation is not None
    assert r.translation.host == new + (l1_gpa & 0x1F_0000)
    assert e.l0.stats["host_migrate"] == 1
    assert e.c.audit().ok


def test_enabling_dirty_logging_flushes_the_slot_and_forces_base_page_l0_ptes() -> None:
    e = make_env()
    fill(e, [0x10000, 0x20000])
    l1_gpa = e.l1_gpa(0x10000)
    l0 = e.l0_pte(l1_gpa)
    assert l0 is not None and l0.shift == 21
    seq = e.vm.mmu_invalidate_seq

    assert e.host(e.l0.set_dirty_logging, e.vm, 0, True) == 1

    assert e.vm.mmu_invalidate_seq == seq + 1
    assert e.l0_pte(l1_gpa) is None
    assert e.shadow_leaves() == [] and len(e.s.vcpu.tlb) == 0
    fill(e, [0x10000])
    l0 = e.l0_pte(l1_gpa)
    assert l0 is not None and l0.shift == 16
    sh = e.shadow(0x10000)
    assert sh is not None and sh.shift == 16 and sh.pte & f.PTE_RPN_MASK == l0.pte & f.PTE_RPN_MASK
    assert e.c.audit().ok


def test_harvest_returns_stored_pages_clears_c_everywhere_and_refaults_the_next_store() -> None:
    e = make_env()
    e.host(e.l0.set_dirty_logging, e.vm, 0, True)
    stored, loaded = 0x10000, 0x20000
    e.run(stored, Access.STORE)
    e.run(loaded, Access.LOAD)
    l1_stored = e.l1_gpa(stored)
    tlb = e.tlb(stored)
    assert tlb is not None and tlb.pte & f.PTE_C
    seq = e.vm.mmu_invalidate_seq

    l1_loaded = e.l1_gpa(loaded)
    # The load instantiated L0's PTE writable (host write upgrade), hence with C
    # (kvmppc_book3s_instantiate_page): KVM reports the loaded page dirty too.
    assert e.host(e.l0.harvest_dirty, e.vm, 0) == sorted([l1_stored, l1_loaded])

    assert e.vm.mmu_invalidate_seq == seq + 1
    l0 = e.l0_pte(l1_stored)
    sh = e.shadow(stored)
    assert l0 is not None and not l0.pte & f.PTE_C
    assert sh is not None and not sh.pte & f.PTE_C
    assert e.tlb(stored) is None  # the entry with C was flushed
    # kvmhv_update_nest_rmap_rc_list tlbies every shadow leaf it finds on a dirty L0 page,
    # with or without C: the loaded page's entry went too.
    assert e.tlb(loaded) is None
    assert e.l1_leaf(stored).pte & f.PTE_C  # L1's tree is L1's business
    assert e.c.audit().ok

    # Nothing stored since: an empty harvest.
    assert e.host(e.l0.harvest_dirty, e.vm, 0) == []
    # Storing again is a miss, L0 absorbs the SET_RC (L1 already has C), and it is harvested.
    rc = e.l0.stats["rc_set_in_l0"]
    e.exits.clear()
    e.run(stored + 8, Access.STORE)
    assert e.l0.stats["rc_set_in_l0"] == rc + 1 and e.exits == []
    sh = e.shadow(stored)
    l0 = e.l0_pte(l1_stored)
    assert sh is not None and sh.pte & f.PTE_C and l0 is not None and l0.pte & f.PTE_C
    assert e.host(e.l0.harvest_dirty, e.vm, 0) == [l1_stored]
    assert e.c.audit().ok


def test_host_unmap_of_a_dirty_page_while_logging_marks_it_for_the_next_harvest() -> None:
    e = make_env()
    e.host(e.l0.set_dirty_logging, e.vm, 0, True)
    e.run(0x10000, Access.STORE)
    l1_gpa = e.l1_gpa(0x10000)
    e.host(e.l0.host_unmap, e.vm, l1_gpa)
    assert l1_gpa in e.host(e.l0.harvest_dirty, e.vm, 0)


def test_every_host_event_bumps_mmu_invalidate_seq() -> None:
    e = make_env()
    fill(e, [0x10000])
    l1_gpa = e.l1_gpa(0x10000)
    vm, l0 = e.vm, e.l0
    seqs = [vm.mmu_invalidate_seq]
    l0.host_unmap(vm, l1_gpa)
    seqs.append(vm.mmu_invalidate_seq)
    l0.host_migrate(vm, l1_gpa)
    seqs.append(vm.mmu_invalidate_seq)
    l0.set_dirty_logging(vm, 0, True)
    seqs.append(vm.mmu_invalidate_seq)
    l0.harvest_dirty(vm, 0)
    seqs.append(vm.mmu_invalidate_seq)
    l0.set_dirty_logging(vm, 0, False)
    seqs.append(vm.mmu_invalidate_seq)
    assert seqs == list(range(seqs[0], seqs[0] + 6))
    assert vm.mmu_invalidate_in_progress == 0


def test_harvest_after_a_load_only_access_reports_the_page_dirty() -> None:
    """kvmppc_book3s_instantiate_page maps a read fault writable when the host gives the
    write upgrade, and then sets C (writing || upgrade_write): KVM's dirty log reports a page
    L2 only loaded from.  Without the upgrade the PTE is read-only and clean."""
    for upgrade in (True, False):
        e = make_env(L0Config(host_write_upgrade=upgrade), memslots=base_page_memslots())
        e.host(e.l0.set_dirty_logging, e.vm, 0, True)
        e.run(0x10000, Access.LOAD)
        l1_gpa = e.l1_gpa(0x10000)
        l0 = e.l0_pte(l1_gpa)
        assert l0 is not None and bool(l0.pte & f.PTE_EAA_RW) == upgrade and bool(l0.pte & f.PTE_C) == upgrade
        sh = e.shadow(0x10000)
        assert sh is not None and not sh.pte & f.PTE_C  # the shadow gets C only on a store
        assert e.host(e.l0.harvest_dirty, e.vm, 0) == ([l1_gpa] if upgrade else [])
        assert e.c.audit().ok

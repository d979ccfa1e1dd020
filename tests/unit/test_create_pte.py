"""kvmppc_create_pte (semantics §3 step 12, §9.17), called directly on shadow and L1 tables."""

from __future__ import annotations

from _helpers_fault import Env, MiB, make_env

from nestmmu.core import formats as f
from nestmmu.core.effects import Invalidation, Scope
from nestmmu.core.formats import Access
from nestmmu.core.l0 import EAGAIN
from nestmmu.core.radix import RadixTable

RWX = f.PTE_EAA_READ | f.PTE_EAA_RW | f.PTE_EAA_EXEC
HPA = 0x40_0000_0000  # far from anything the cluster allocates; never dereferenced here


def shadow_env() -> tuple[Env, RadixTable]:
    e = make_env()
    table = e.gp.shadow_pgtable
    assert table is not None
    e.l0.take_invalidations()
    return e, table


def create(e: Env, table: RadixTable, pte: int, n_gpa: int, level: int, gfn: int = 0x100, seq: int | None = None) -> int:
    seq = e.vm.mmu_invalidate_seq if seq is None else seq
    rmapp = (e.memslot(), gfn)
    return e.l0.kvmppc_create_pte(e.vm, table, pte, n_gpa, level, seq, e.gp.shadow_lpid, rmapp, e.rmap_entry(n_gpa))


def test_identical_leaf_is_left_alone_and_counted() -> None:
    e, table = shadow_env()
    pte = f.make_pte(HPA, RWX, r=True)
    assert create(e, table, pte, 0x10000, 0) == 0
    assert create(e, table, pte, 0x10000, 0) == 0
    assert e.l0.stats["create_pte.identical"] == 1
    assert e.l0.stats["rmap_inserted"] == 1
    assert e.memslot().rmap[0x100] == [e.rmap_entry(0x10000)]
    slot = table.lookup_leaf(0x10000)
    assert slot is not None and slot.pte == pte


def test_same_level_leaf_ors_in_rc_and_write_without_warning_or_rmap_insert() -> None:
    e, table = shadow_env()
    old = f.make_pte(HPA, f.PTE_EAA_READ | f.PTE_EAA_EXEC, r=True)
    assert create(e, table, old, 0x10000, 0) == 0
    new = f.make_pte(HPA, RWX, r=True, c=True)
    assert create(e, table, new, 0x10000, 0, gfn=0x200) == 0
    slot = table.lookup_leaf(0x10000)
    assert slot is not None and slot.pte == old | new
    assert e.l0.stats["create_pte.or_bits"] == 1
    assert e.l0.stats["warn.pte_bits_must_match"] == 0
    assert 0x200 not in e.memslot().rmap  # no rmap insert for an update
    assert e.l0.take_invalidations() == []  # upgrades need no tlbie


def test_same_level_leaf_with_different_rpn_warns_and_ors_a_corrupt_rpn() -> None:
    """§9.17: the OR is done anyway; an RPN mismatch means L1 skipped a tlbie."""
    e, table = shadow_env()
    old = f.make_pte(HPA + 0x10000, RWX, r=True)
    new = f.make_pte(HPA + 0x20000, RWX, r=True)
    create(e, table, old, 0x10000, 0)
    create(e, table, new, 0x10000, 0)
    slot = table.lookup_leaf(0x10000)
    assert slot is not None
    assert slot.pte & f.PTE_RPN_MASK == HPA + 0x30000  # neither old nor new
    assert e.l0.stats["warn.pte_bits_must_match"] == 1
    # Any attribute bit other than W/C/R that differs also warns (the XOR is checked).
    create(e, table, old | f.ATT_TOLERANT, 0x40000, 0)
    create(e, table, old, 0x40000, 0)
    assert e.l0.stats["warn.pte_bits_must_match"] == 2
    slot = table.lookup_leaf(0x40000)
    assert slot is not None and slot.pte == old | f.ATT_TOLERANT


def test_larger_leaf_in_the_way_is_unmapped_with_a_tlbie() -> None:
    e, table = shadow_env()
    big = f.make_pte(HPA, RWX, r=True)
    assert create(e, table, big, 0x20_0000, 1) == 0
    assert e.l0.take_invalidations() == []
    small = f.make_pte(HPA + 0x10000, RWX, r=True)
    assert create(e, table, small, 0x21_0000, 0) == 0
    assert e.l0.stats["create_pte.replace_larger"] == 1
    assert e.l0.take_invalidations() == [Invalidation(e.gp.shadow_lpid, Scope.ADDRESS, 0x20_0000, 2 * MiB, "unmap")]
    assert table.lookup_leaf(0x20_0000) is None
    slot = table.lookup_leaf(0x21_0000)
    assert slot is not None and slot.shift == 16 and slot.pte == small


def test_lower_level_table_in_the_way_of_a_large_leaf_is_freed_each_pte_unmapped() -> None:
    e, table = shadow_env()
    for i in (0, 1, 5):
        assert create(e, table, f.make_pte(HPA + i * 0x10000, RWX, r=True), 0x40_0000 + i * 0x10000, 0) == 0
    pages = table.table_pages
    big = f.make_pte(HPA, RWX, r=True)
    assert create(e, table, big, 0x40_0000, 1) == 0
    assert e.l0.stats["create_pte.free_lower_table"] == 1
    assert e.l0.stats["pwc_flush"] == 1
    invs = e.l0.take_invalidations()
    assert invs == [Invalidation(e.gp.shadow_lpid, Scope.ADDRESS, 0x40_0000 + i * 0x10000, 0x10000, "unmap") for i in (0, 1, 5)]
    assert table.table_pages == pages - 1
    slot = table.lookup_leaf(0x45_0000)
    assert slot is not None and slot.shift == 21 and slot.pte == big


def test_mmu_seq_change_returns_eagain_and_writes_nothing() -> None:
    e, table = shadow_env()
    seq = e.vm.mmu_invalidate_seq
    e.vm.mmu_invalidate_seq += 1
    pages = table.table_pages
    assert create(e, table, f.make_pte(HPA, RWX, r=True), 0x10000, 0, seq=seq) == EAGAIN
    assert table.table_pages == pages
    assert table.lookup_leaf(0x10000) is None
    assert e.memslot().rmap == {}
    # An invalidation in progress (seq unchanged) also retries.
    e.vm.mmu_invalidate_in_progress += 1
    assert create(e, table, f.make_pte(HPA, RWX, r=True), 0x10000, 0) == EAGAIN
    e.vm.mmu_invalidate_in_progress -= 1
    assert create(e, table, f.make_pte(HPA, RWX, r=True), 0x10000, 0) == 0


def test_rmap_inserted_only_for_new_leaves_with_dedup() -> None:
    e, table = shadow_env()
    pte_a = f.make_pte(HPA, RWX, r=True)
    pte_b = f.make_pte(HPA + 0x10000, RWX, r=True)
    create(e, table, pte_a, 0x10000, 0)
    create(e, table, pte_a | f.PTE_C, 0x10000, 0)  # OR update
    create(e, table, pte_b, 0x20000, 0)
    assert e.memslot().rmap[0x100] == [e.rmap_entry(0x10000), e.rmap_entry(0x20000)]
    assert e.l0.stats["rmap_inserted"] == 2
    # The leaf goes away (rmap left stale), comes back: the same entry is not added twice.
    e.l0.kvmhv_invalidate_shadow_pte(e.gp, 0x10000)
    assert table.lookup_leaf(0x10000) is None
    create(e, table, pte_a, 0x10000, 0)
    assert e.memslot().rmap[0x100] == [e.rmap_entry(0x10000), e.rmap_entry(0x20000)]
    assert e.l0.stats["rmap_inserted"] == 2


def test_small_leaf_over_l1_table_2m_leaf_drops_dependent_shadow_leaves_via_rmap() -> None:
    """On L0's table for the L1, unmapping the larger leaf also reaches the shadow PTEs."""
    e = make_env()
    e.access(0x10000, Access.LOAD)
    e.access(0x20000, Access.LOAD)
    l1_gpa = e.l1_gpa(0x10000)
    l0 = e.l0_pte(l1_gpa)
    assert l0 is not None and l0.shift == 21
    assert len(e.shadow_leaves()) == 2
    e.c.deliver(e.l0.take_invalidations())
    small = f.make_pte((l0.pte & f.PTE_RPN_MASK) + (l1_gpa & 0x1F0000), RWX, r=True)
    ret = e.l0.kvmppc_create_pte(e.vm, e.vm.pgtable, small, l1_gpa & ~0xFFFF, 0, e.vm.mmu_invalidate_seq, e.vm.lpid, None, 0)
    assert ret == 0
    invs = e.l0.take_invalidations()
    assert Invalidation(e.vm.lpid, Scope.ADDRESS, l0.gpa, 2 * MiB, "unmap") in invs
    assert {(i.lpid, i.address) for i in invs if i.lpid == e.gp.shadow_lpid} == {
        (e.gp.shadow_lpid, 0x10000),
        (e.gp.shadow_lpid, 0x20000),
    }
    e.c.deliver(invs)
    assert e.shadow_leaves() == []
    assert e.tlb(0x10000) is None and e.tlb(0x20000) is None
    assert l0.gpa >> 16 not in e.memslot().rmap
    assert e.c.audit().ok

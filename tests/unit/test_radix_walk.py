"""The architected walk (semantics §1.3, §3 table) and L0's RadixTable, over hand-built trees."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from nestmmu.core import formats as f
from nestmmu.core.memory import Allocator, SimMemory
from nestmmu.core.radix import (
    WALK_NOHPTE,
    WALK_OK,
    WALK_PRTABLE_FAULT,
    WALK_UNSUPP_MMU,
    RadixTable,
    level_to_shift,
    shift_to_level,
    walk_radix_tree,
)

ROOT = 0x10_0000  # 2^13 entries * 8 = 64 KiB, 64 KiB aligned
PUD = 0x20_0000  # 512 entries * 8 = 4 KiB
PMD = 0x20_1000
PTE = 0x20_2000  # 4 KiB (9 bits) or 256 B (5 bits)
RWX = f.PTE_EAA_READ | f.PTE_EAA_RW | f.PTE_EAA_EXEC

# An address with a distinct index at every level and a non-zero offset at every size.
EA = (3 << 39) | (5 << 30) | (7 << 21) | (0x1F3 << 12) | 0xABC  # 4K base: PTE index 0x1F3
EA64 = (3 << 39) | (5 << 30) | (7 << 21) | (0x13 << 16) | 0xABCD  # 64K base: PTE index 0x13


def root_entry(ea: int) -> int:
    return ROOT + ((ea >> 39) & 0x1FFF) * 8


def pud_entry(ea: int) -> int:
    return PUD + ((ea >> 30) & 0x1FF) * 8


def pmd_entry(ea: int) -> int:
    return PMD + ((ea >> 21) & 0x1FF) * 8


def pte_entry(ea: int, pte_bits: int = 9) -> int:
    shift = 12 if pte_bits == 9 else 16
    return PTE + ((ea >> shift) & ((1 << pte_bits) - 1)) * 8


def build(mem: SimMemory, ea: int, leaf_level: int, leaf: int, pte_bits: int = 9) -> None:
    """root -> PUD -> PMD -> PTE tables for ea, with ``leaf`` at level 2 (1G), 1 (2M) or 0."""
    mem.write_u64(root_entry(ea), f.make_pde(PUD, 9))
    if leaf_level == 2:
        mem.write_u64(pud_entry(ea), leaf)
        return
    mem.write_u64(pud_entry(ea), f.make_pde(PMD, 9))
    if leaf_level == 1:
        mem.write_u64(pmd_entry(ea), leaf)
        return
    mem.write_u64(pmd_entry(ea), f.make_pde(PTE, pte_bits))
    mem.write_u64(pte_entry(ea, pte_bits), leaf)


@pytest.fixture
def mem() -> SimMemory:
    return SimMemory(1 << 40)


DW0 = f.make_pate_dw0(ROOT, 13)


# --------------------------------------------------------------------------- successful walks
def test_1g_leaf(mem: SimMemory) -> None:
    leaf = f.make_pte(0x40_0000_0000, RWX, r=True)
    build(mem, EA, 2, leaf)
    w = walk_radix_tree(mem, DW0, EA)
    assert w.code == WALK_OK and w.ok
    assert w.page_shift == 30
    assert w.raddr == 0x40_0000_0000 | (EA & ((1 << 30) - 1))
    assert w.refs == 2
    assert w.pte == leaf
    assert w.leaf_addr == pud_entry(EA)


def test_2m_leaf(mem: SimMemory) -> None:
    leaf = f.make_pte(0x1234_0000_0000 & ~((1 << 21) - 1), f.PTE_EAA_READ)
    build(mem, EA, 1, leaf)
    w = walk_radix_tree(mem, DW0, EA)
    assert w.ok
    assert w.page_shift == 21
    assert w.raddr == (0x1234_0000_0000 & ~((1 << 21) - 1)) | (EA & 0x1F_FFFF)
    assert w.refs == 3
    assert w.leaf_addr == pmd_entry(EA)


def test_4k_leaf(mem: SimMemory) -> None:
    leaf = f.make_pte(0x7_7777_7000, f.PTE_EAA_RW, r=True, c=True)
    build(mem, EA, 0, leaf)
    w = walk_radix_tree(mem, DW0, EA)
    assert w.ok
    assert w.page_shift == 12
    assert w.raddr == 0x7_7777_7ABC
    assert w.refs == 4
    assert w.leaf_addr == pte_entry(EA)
    assert w.may_write and w.may_read is False and not w.may_execute
    assert w.rc == f.PTE_R | f.PTE_C


def test_64k_leaf_with_5_bit_pte_level(mem: SimMemory) -> None:
    leaf = f.make_pte(0x5_5555_0000, f.PTE_EAA_READ | f.PTE_EAA_EXEC, r=True)
    build(mem, EA64, 0, leaf, pte_bits=5)
    w = walk_radix_tree(mem, DW0, EA64)
    assert w.ok
    assert w.page_shift == 16
    assert w.raddr == 0x5_5555_ABCD
    assert w.refs == 4
    assert w.leaf_addr == PTE + 0x13 * 8
    assert w.may_read and w.may_execute and not w.may_write


def test_other_addresses_under_same_leaf_share_the_page(mem: SimMemory) -> None:
    build(mem, EA, 1, f.make_pte(0x60_0000, RWX))
    w = walk_radix_tree(mem, DW0, (EA & ~0x1F_FFFF) | 0x1F_FFF8)
    assert w.ok and w.raddr == 0x7F_FFF8


# --------------------------------------------------------------------------- UNSUPP_MMU (§3)
@pytest.mark.parametrize("rts", [20, 22, 0, 31])
def test_rts_other_than_52_bits_is_unsupported(mem: SimMemory, rts: int) -> None:
    build(mem, EA, 1, f.make_pte(0x60_0000, RWX))
    w = walk_radix_tree(mem, f.make_pate_dw0(ROOT, 13, rts=rts), EA)
    assert w.code == WALK_UNSUPP_MMU
    assert w.refs == 0


@pytest.mark.parametrize("rpds", [9, 12, 14, 5])
def test_root_size_other_than_13_bits_is_unsupported(mem: SimMemory, rpds: int) -> None:
    build(mem, EA, 1, f.make_pte(0x60_0000, RWX))
    w = walk_radix_tree(mem, f.make_pate_dw0(ROOT, rpds), EA)
    assert w.code == WALK_UNSUPP_MMU
    assert w.refs == 0


@pytest.mark.parametrize("bad_nls", [8, 10, 5, 13])
def test_wrong_nls_at_pud_level(mem: SimMemory, bad_nls: int) -> None:
    build(mem, EA, 1, f.make_pte(0x60_0000, RWX))
    mem.write_u64(root_entry(EA), f.make_pde(PUD, bad_nls))
    w = walk_radix_tree(mem, DW0, EA)
    assert w.code == WALK_UNSUPP_MMU
    assert w.refs == 1


def test_wrong_nls_at_pmd_level(mem: SimMemory) -> None:
    build(mem, EA, 1, f.make_pte(0x60_0000, RWX))
    mem.write_u64(pud_entry(EA), f.make_pde(PMD, 5))
    w = walk_radix_tree(mem, DW0, EA)
    assert w.code == WALK_UNSUPP_MMU
    assert w.refs == 2


@pytest.mark.parametrize("bad_nls", [4, 6, 7, 8, 10, 13])
def test_pte_level_nls_must_be_5_or_9(mem: SimMemory, bad_nls: int) -> None:
    build(mem, EA, 0, f.make_pte(0x7000, RWX))
    mem.write_u64(pmd_entry(EA), f.make_pde(PTE, bad_nls))
    w = walk_radix_tree(mem, DW0, EA)
    assert w.code == WALK_UNSUPP_MMU
    assert w.refs == 3


def test_misaligned_root_base(mem: SimMemory) -> None:
    # 2^13 entries need a 64 KiB aligned root.
    w = walk_radix_tree(mem, f.make_pate_dw0(ROOT + 0x1000, 13), EA)
    assert w.code == WALK_UNSUPP_MMU
    assert w.refs == 0


def test_misaligned_pud_base(mem: SimMemory) -> None:
    build(mem, EA, 1, f.make_pte(0x60_0000, RWX))
    mem.write_u64(root_entry(EA), f.make_pde(PUD + 0x100, 9))
    w = walk_radix_tree(mem, DW0, EA)
    assert w.code == WALK_UNSUPP_MMU
    assert w.refs == 1


def test_misaligned_pte_table_base(mem: SimMemory) -> None:
    # A 9-bit table is 4 KiB and must be 4 KiB aligned; 256-byte alignment is not enough.
    build(mem, EA, 0, f.make_pte(0x7000, RWX))
    mem.write_u64(pmd_entry(EA), f.make_pde(PTE + 0x100, 9))
    w = walk_radix_tree(mem, DW0, EA)
    assert w.code == WALK_UNSUPP_MMU
    assert w.refs == 3


def test_256_byte_aligned_5_bit_table_is_fine(mem: SimMemory) -> None:
    leaf = f.make_pte(0x5_0000, RWX)
    mem.write_u64(root_entry(EA64), f.make_pde(PUD, 9))
    mem.write_u64(pud_entry(EA64), f.make_pde(PMD, 9))
    mem.write_u64(pmd_entry(EA64), f.make_pde(PTE + 0x100, 5))
    mem.write_u64(PTE + 0x100 + 0x13 * 8, leaf)
    w = walk_radix_tree(mem, DW0, EA64)
    assert w.ok and w.page_shift == 16


def test_leaf_at_the_root_is_unsupported(mem: SimMemory) -> None:
    mem.write_u64(root_entry(EA), f.make_pte(0, RWX))
    w = walk_radix_tree(mem, DW0, EA)
    assert w.code == WALK_UNSUPP_MMU
    assert w.refs == 1


def test_pde_at_the_bottom_level_is_unsupported(mem: SimMemory) -> None:
    build(mem, EA, 0, f.make_pde(0x30_0000, 9))  # a PDE where the PTE must be
    w = walk_radix_tree(mem, DW0, EA)
    assert w.code == WALK_UNSUPP_MMU
    assert w.refs == 4


@pytest.mark.parametrize(
    ("level", "ra"),
    [(2, 0x4000_0000 + (1 << 21)), (1, 0x60_0000 + 0x1000), (0, 0x5_0000 + 0x1000)],
)
def test_misaligned_leaf_rpn_is_unsupported(mem: SimMemory, level: int, ra: int) -> None:
    pte_bits = 5 if level == 0 else 9  # a 64K leaf with a 4K-aligned RPN
    ea = EA64 if level == 0 else EA
    build(mem, ea, level, f.make_pte(ra, RWX), pte_bits=pte_bits)
    w = walk_radix_tree(mem, DW0, ea)
    assert w.code == WALK_UNSUPP_MMU


# --------------------------------------------------------------------------- NOHPTE
@pytest.mark.parametrize("level", [3, 2, 1, 0])
def test_invalid_entry_at_each_level(mem: SimMemory, level: int) -> None:
    build(mem, EA, 0, f.make_pte(0x7000, RWX))
    entry = {3: root_entry(EA), 2: pud_entry(EA), 1: pmd_entry(EA), 0: pte_entry(EA)}[level]
    # Clear only V: the rest of the entry is left as garbage, as after a PTE invalidation.
    mem.write_u64(entry, mem.read_u64(entry) & ~f.PTE_V)
    w = walk_radix_tree(mem, DW0, EA)
    assert w.code == WALK_NOHPTE
    assert w.refs == 4 - level
    assert w.raddr == 0 and w.pte == 0


def test_empty_tree_is_nohpte(mem: SimMemory) -> None:
    w = walk_radix_tree(mem, DW0, EA)
    assert w.code == WALK_NOHPTE and w.refs == 1


# --------------------------------------------------------------------------- PRTABLE_FAULT
@pytest.mark.parametrize(("hole", "entry_of"), [(PMD, pmd_entry), (PTE, pte_entry), (PUD, pud_entry)])
def test_unreadable_table_entry_is_prtable_fault(hole: int, entry_of: Callable[[int], int]) -> None:
    mem = SimMemory(1 << 40, valid=lambda a: not hole <= a < hole + 0x1000)
    # Build with a fully valid memory, then copy the entries that live outside the hole.
    full = SimMemory(1 << 40)
    build(full, EA, 0, f.make_pte(0x7000, RWX))
    for addr in (root_entry(EA), pud_entry(EA), pmd_entry(EA), pte_entry(EA)):
        if not hole <= addr < hole + 0x1000:
            mem.write_u64(addr, full.read_u64(addr))
    w = walk_radix_tree(mem, DW0, EA)
    assert w.code == WALK_PRTABLE_FAULT
    assert w.fault_gpa == entry_of(EA)


def test_unreadable_root_is_prtable_fault() -> None:
    mem = SimMemory(1 << 40, valid=lambda a: a < ROOT)
    w = walk_radix_tree(mem, DW0, EA)
    assert w.code == WALK_PRTABLE_FAULT
    assert w.fault_gpa == root_entry(EA)
    assert w.refs == 0


def test_table_beyond_memory_size_is_prtable_fault() -> None:
    mem = SimMemory(PUD)  # PUD lies just past the end
    mem.write_u64(root_entry(EA), f.make_pde(PUD, 9))
    w = walk_radix_tree(mem, DW0, EA)
    assert w.code == WALK_PRTABLE_FAULT
    assert w.fault_gpa == pud_entry(EA)
    assert w.refs == 1


# --------------------------------------------------------------------------- level helpers
def test_level_shift_helpers() -> None:
    assert [level_to_shift(lv, 16) for lv in (0, 1, 2)] == [16, 21, 30]
    assert level_to_shift(0, 12) == 12
    assert [shift_to_level(s) for s in (12, 16, 21, 30)] == [0, 0, 1, 2]


# --------------------------------------------------------------------------- RadixTable
@pytest.fixture
def alloc() -> Allocator:
    return Allocator(0x100_0000, 0x1_0000_0000)


def test_radix_table_rejects_other_base_page_sizes(mem: SimMemory, alloc: Allocator) -> None:
    with pytest.raises(ValueError, match="12 or 16"):
        RadixTable(mem, alloc, 21)


@pytest.mark.parametrize(("page_shift", "pte_table_size"), [(12, 4096), (16, 256)])
def test_table_sizes(mem: SimMemory, alloc: Allocator, page_shift: int, pte_table_size: int) -> None:
    t = RadixTable(mem, alloc, page_shift)
    assert t.table_size(3) == 64 << 10
    assert t.table_size(2) == 4096
    assert t.table_size(1) == 4096
    assert t.table_size(0) == pte_table_size
    assert t.root % (64 << 10) == 0
    assert t.table_pages == 1
    assert alloc.in_use == {t.root: 64 << 10}


def test_64k_pte_tables_are_256_bytes_in_the_allocator(mem: SimMemory, alloc: Allocator) -> None:
    t = RadixTable(mem, alloc, 16)
    tbl, blocker = t.ensure_table(0x1234_0000, 0)
    assert blocker is None
    assert alloc.in_use[tbl] == 256
    assert tbl % 256 == 0
    assert t.table_pages == 4
    # Another PTE table for a different 2M region is another 256-byte block.
    tbl2, _ = t.ensure_table(0x1234_0000 + (1 << 21), 0)
    assert tbl2 != tbl and alloc.in_use[tbl2] == 256
    assert t.table_pages == 5


def test_ensure_table_allocates_each_level_once(mem: SimMemory, alloc: Allocator) -> None:
    t = RadixTable(mem, alloc, 12)
    tbl, _ = t.ensure_table(0x40_0000, 0)
    assert t.table_pages == 4
    again, _ = t.ensure_table(0x40_1000, 0)
    assert again == tbl and t.table_pages == 4
    pmd, _ = t.ensure_table(0x40_0000, 1)
    assert t.table_pages == 4
    assert mem.read_u64(t.entry_addr(pmd, 1, 0x40_0000)) == f.make_pde(tbl, 9)


def test_ensure_table_stops_at_a_larger_leaf(mem: SimMemory, alloc: Allocator) -> None:
    t = RadixTable(mem, alloc, 16)
    pmd, _ = t.ensure_table(0x20_0000, 1)
    leaf = f.make_pte(0x80_0000, RWX)
    mem.write_u64(t.entry_addr(pmd, 1, 0x20_0000), leaf)
    tbl, blocker = t.ensure_table(0x21_0000, 0)
    assert tbl == 0
    assert blocker is not None
    assert (blocker.level, blocker.shift, blocker.gpa, blocker.pte) == (1, 21, 0x20_0000, leaf)


def test_walk_of_a_radix_table_matches_the_architected_walk(mem: SimMemory, alloc: Allocator) -> None:
    t = RadixTable(mem, alloc, 16)
    gpa = 0x3_4567_0000
    tbl, _ = t.ensure_table(gpa, 0)
    leaf = f.make_pte(0x9_0000, f.PTE_EAA_READ, r=True)
    mem.write_u64(t.entry_addr(tbl, 0, gpa), leaf)
    assert t.pate_dw0() == f.make_pate_dw0(t.root, 13)
    w = walk_radix_tree(mem, t.pate_dw0(), gpa + 0x123)
    assert w.ok and w.page_shift == 16 and w.raddr == 0x9_0123 and w.pte == leaf
    slot, refs = t.walk_refs(gpa + 0x123)
    assert slot is not None and refs == 4
    assert (slot.gpa, slot.shift, slot.level, slot.pte) == (gpa, 16, 0, leaf)


def test_find_pte_and_lookup_leaf(mem: SimMemory, alloc: Allocator) -> None:
    t = RadixTable(mem, alloc, 16)
    gpa = 0x1_0000_0000
    # Nothing below the root: no slot at all.
    assert t.find_pte(gpa) is None
    assert t.lookup_leaf(gpa) is None
    # Tables down to level 0 but no leaf: the empty PTE-level slot.
    tbl, _ = t.ensure_table(gpa, 0)
    slot = t.find_pte(gpa + 0x10)
    assert slot is not None
    assert (slot.addr, slot.pte, slot.level, slot.gpa, slot.shift) == (t.entry_addr(tbl, 0, gpa), 0, 0, gpa, 16)
    assert t.lookup_leaf(gpa) is None
    # A leaf: both find it.
    leaf = f.make_pte(0x5_0000, RWX)
    mem.write_u64(slot.addr, leaf)
    found = t.lookup_leaf(gpa + 0xFFFF)
    assert found is not None and found.pte == leaf and found.gpa == gpa
    assert t.lookup_leaf(gpa + 0x1_0000) is None


def test_find_pte_returns_a_large_leaf_or_none_for_empty_pmd(mem: SimMemory, alloc: Allocator) -> None:
    t = RadixTable(mem, alloc, 16)
    pmd, _ = t.ensure_table(0x4000_0000, 1)
    assert t.find_pte(0x4000_0000) is None  # PMD entry empty: no PTE-level slot exists
    leaf = f.make_pte(0x20_0000, RWX)
    mem.write_u64(t.entry_addr(pmd, 1, 0x4000_0000), leaf)
    slot = t.find_pte(0x401F_FFFF)
    assert slot is not None and slot.level == 1 and slot.shift == 21 and slot.gpa == 0x4000_0000


def test_leaves_in_range_and_order(mem: SimMemory, alloc: Allocator) -> None:
    t = RadixTable(mem, alloc, 16)

    def put(gpa: int, level: int, ra: int) -> None:
        tbl, blocker = t.ensure_table(gpa, level)
        assert blocker is None
        mem.write_u64(t.entry_addr(tbl, level, gpa), f.make_pte(ra, RWX))

    put(0x4000_0000, 2, 0x4000_0000)  # 1G at 1G
    put(0x20_0000, 1, 0x20_0000)  # 2M at 2M
    put(0x1_0000, 0, 0x1_0000)  # 64K at 64K
    put(0x3_0000, 0, 0x3_0000)  # 64K at 192K
    all_ = [(s.gpa, s.shift) for s in t.leaves()]
    assert all_ == [(0x1_0000, 16), (0x3_0000, 16), (0x20_0000, 21), (0x4000_0000, 30)]
    # Intersecting ranges: a range inside a big leaf yields that leaf.
    assert [s.gpa for s in t.leaves(0x4123_0000, 0x4123_1000)] == [0x4000_0000]
    assert [s.gpa for s in t.leaves(0x2_0000, 0x3_0001)] == [0x3_0000]
    assert [s.gpa for s in t.leaves(0x1_FFFF, 0x2_0000)] == [0x1_0000]
    assert [s.gpa for s in t.leaves(0x4_0000, 0x20_0000)] == []
    assert [s.gpa for s in t.leaves(0x3_0000, 0x21_0000)] == [0x3_0000, 0x20_0000]


def test_free_below_releases_every_table(mem: SimMemory, alloc: Allocator) -> None:
    t = RadixTable(mem, alloc, 16)
    for gpa in (0x0, 0x20_0000, 0x4000_0000, 1 << 40):
        tbl, _ = t.ensure_table(gpa, 0)
        mem.write_u64(t.entry_addr(tbl, 0, gpa), f.make_pte(0x1_0000, RWX))
    # root + 2 PUDs (root indexes 0 and 2) + 3 PMDs + 4 PTE tables.
    assert t.table_pages == 1 + 2 + 3 + 4
    assert len(alloc.in_use) == t.table_pages == t.count_tables()
    t.free_below(t.root, 3)
    assert t.table_pages == 1
    assert alloc.in_use == {t.root: 64 << 10}
    assert list(t.leaves()) == []
    assert all(mem.read_u64(t.root + i * 8) == 0 for i in range(1 << 13))
    # The tree is usable again.
    t.ensure_table(0x0, 0)
    assert t.table_pages == 4


def test_free_table_zeroes_and_returns_the_block(mem: SimMemory, alloc: Allocator) -> None:
    t = RadixTable(mem, alloc, 12)
    tbl, _ = t.ensure_table(0, 0)
    mem.write_u64(tbl, 0xDEAD)
    # Detach the PTE table from its PMD, then free it.
    pmd, _ = t.ensure_table(0, 1)
    mem.write_u64(pmd, 0)
    t.free_table(tbl, 0)
    assert tbl not in alloc.in_use
    assert mem.read_u64(tbl) == 0
    assert t.table_pages == 3

"""Radix tree geometry and walks over simulated memory.

Two kinds of walk exist, as in KVM:

* :func:`walk_radix_tree` is ``kvmppc_mmu_walk_radix_tree``: the architected walk of a tree
  described by a PATE doubleword 0 (RTS, RPDB, RPDS) with every check the POWER9 MMU and KVM
  make, used on trees KVM does not own (L1's partition-scoped tree for an L2).  It returns the
  leaf or the precise failure, and counts memory references.
* :class:`RadixTable` is the Linux page-table view of a tree L0 builds itself (the L1->L0
  partition-scoped table, the shadow_pgtable of each nested guest): fixed geometry
  (13/9/9/9 for 4K base pages, 13/9/9/5 for 64K), levels numbered like KVM (0 = PTE,
  1 = PMD/2M, 2 = PUD/1G).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from . import formats as f
from .memory import Allocator, MemoryFault, SimMemory

PMD_SHIFT = 21
PUD_SHIFT = 30
PGD_SHIFT = 39
RADIX_PGD_INDEX_SIZE = 13
# p9_supported_radix_bits, indexed by level (3 = root ... 0 = PTE level).
P9_SUPPORTED_RADIX_BITS = (5, 9, 9, 13)

# Walk outcome codes (the reflection code KVM puts into the DSISR it gives L1).
WALK_OK = 0
WALK_NOHPTE = f.DSISR_NOHPTE  # -ENOENT
WALK_UNSUPP_MMU = f.DSISR_UNSUPP_MMU  # -EINVAL
WALK_PRTABLE_FAULT = f.DSISR_PRTABLE_FAULT  # -EFAULT


@dataclass(frozen=True, slots=True)
class WalkResult:
    """Outcome of walking a partition-scoped tree for one address (``struct kvmppc_pte``).

    ``code`` is 0 on success or the DSISR reflection code; on PRTABLE_FAULT ``fault_gpa`` is the
    address of the entry that could not be read.  ``raddr`` includes the offset in the page.
    """

    code: int
    pte: int = 0
    raddr: int = 0
    page_shift: int = 0
    fault_gpa: int = 0
    leaf_addr: int = 0
    refs: int = 0

    @property
    def ok(self) -> bool:
        return self.code == WALK_OK

    @property
    def may_read(self) -> bool:
        return bool(self.pte & f.PTE_EAA_READ)

    @property
    def may_write(self) -> bool:
        return bool(self.pte & f.PTE_EAA_RW)

    @property
    def may_execute(self) -> bool:
        return bool(self.pte & f.PTE_EAA_EXEC)

    @property
    def rc(self) -> int:
        return self.pte & f.PTE_RC_MASK


def walk_radix_tree(mem: SimMemory, pate_dw0: int, eaddr: int) -> WalkResult:
    """The architected walk (``kvmppc_mmu_walk_radix_tree``) of the tree ``pate_dw0`` names."""
    rts = f.pate_rts(pate_dw0)
    bits = f.pate_rpds(pate_dw0)
    base = f.pate_root(pate_dw0)
    offset = rts + 31
    refs = 0
    # Current implementations only support a 52-bit space.
    if offset != 52:
        return WalkResult(WALK_UNSUPP_MMU)
    pte = 0
    addr = 0
    level = 3
    while level >= 0:
        if level and bits != P9_SUPPORTED_RADIX_BITS[level]:
            return WalkResult(WALK_UNSUPP_MMU, refs=refs)
        if level == 0 and bits not in (5, 9):
            return WalkResult(WALK_UNSUPP_MMU, refs=refs)
        offset -= bits
        index = (eaddr >> offset) & ((1 << bits) - 1)
        # The table base must be aligned to the table's size.
        if base & ((1 << (bits + 3)) - 1):
            return WalkResult(WALK_UNSUPP_MMU, refs=refs)
        addr = base + index * 8
        try:
            pte = mem.read_u64(addr)
        except MemoryFault:
            return WalkResult(WALK_PRTABLE_FAULT, fault_gpa=addr, refs=refs)
        refs += 1
        if not pte & f.PTE_V:
            return WalkResult(WALK_NOHPTE, refs=refs)
        if pte & f.PTE_L:
            break
        base = pte & f.RPDB_MASK
        bits = pte & f.RPDS_MASK
        level -= 1
    # A leaf is needed, and 512G pages (leaf at the root) are not supported.
    if level < 0 or level == 3:
        return WalkResult(WALK_UNSUPP_MMU, refs=refs)
    gpa = pte & 0x01FF_FFFF_FFFF_F000
    if gpa & ((1 << offset) - 1):
        return WalkResult(WALK_UNSUPP_MMU, refs=refs)
    gpa |= eaddr & ((1 << offset) - 1)
    return WalkResult(WALK_OK, pte=pte, raddr=gpa, page_shift=offset, leaf_addr=addr, refs=refs)


def level_to_shift(level: int, page_shift: int) -> int:
    """kvmppc_radix_level_to_shift."""
    return (page_shift, PMD_SHIFT, PUD_SHIFT)[level]


def shift_to_level(shift: int) -> int:
    """kvmppc_radix_shift_to_level (any base-page shift is level 0)."""
    if shift == PUD_SHIFT:
        return 2
    if shift == PMD_SHIFT:
        return 1
    return 0


@dataclass(frozen=True, slots=True)
class Slot:
    """Where a tree entry lives: its address, value, level, the address it covers and its size."""

    addr: int
    pte: int
    level: int
    gpa: int
    shift: int


class RadixTable:
    """A partition-scoped radix tree that L0 owns, in host memory (Linux pgd/pud/pmd/pte)."""

    __slots__ = ("_bits", "_shifts", "alloc", "mem", "page_shift", "pte_bits", "root", "table_pages")

    def __init__(self, mem: SimMemory, alloc: Allocator, page_shift: int) -> None:
        if page_shift not in (12, 16):
            raise ValueError(f"base page shift must be 12 or 16, not {page_shift}")
        self.mem = mem
        self.alloc = alloc
        self.page_shift = page_shift
        self.pte_bits = 9 if page_shift == 12 else 5
        # Per level (3..0): index bits and the shift of the address range one entry covers.
        self._bits = (self.pte_bits, 9, 9, RADIX_PGD_INDEX_SIZE)
        self._shifts = (page_shift, PMD_SHIFT, PUD_SHIFT, PGD_SHIFT)
        self.table_pages = 0
        self.root = self._alloc_table(3)

    # -- table pages ---------------------------------------------------------------------
    def table_size(self, level: int) -> int:
        return 8 << self._bits[level]

    def _alloc_table(self, level: int) -> int:
        size = self.table_size(level)
        addr = self.alloc.alloc(size)
        self.mem.zero(addr, size)
        self.table_pages += 1
        return addr

    def free_table(self, addr: int, level: int) -> None:
        size = self.table_size(level)
        self.mem.zero(addr, size)
        self.alloc.free(addr, size)
        self.table_pages -= 1

    def pate_dw0(self) -> int:
        """PATE dw0 for this tree: HR | RTS(52) | root | RADIX_PGD_INDEX_SIZE."""
        return f.make_pate_dw0(self.root, RADIX_PGD_INDEX_SIZE)

    def entry_addr(self, table: int, level: int, gpa: int) -> int:
        return table + ((gpa >> self._shifts[level]) & ((1 << self._bits[level]) - 1)) * 8

    def level_shift(self, level: int) -> int:
        return self._shifts[level]

    # -- lookups -------------------------------------------------------------------------
    def find_pte(self, gpa: int) -> Slot | None:
        """__find_linux_pte: the leaf covering ``gpa``, or the empty PTE-level slot, or None.

        Returns the slot of a present leaf at any level, or the (not present) PTE-level slot
        when every table down to level 0 exists; None when an upper-level entry is empty.
        """
        table = self.root
        mem = self.mem
        for level in (3, 2, 1, 0):
            addr = self.entry_addr(table, level, gpa)
            pte = mem.read_u64(addr)
            if level == 0 or pte & f.PTE_L:
                if not pte & f.PTE_V and level != 0:
                    return None
                shift = self._shifts[level]
                return Slot(addr, pte, level, gpa & ~((1 << shift) - 1), shift)
            if not pte & f.PTE_V:
                return None
            table = pte & f.PDE_NLB_MASK
        return None  # pragma: no cover

    def lookup_leaf(self, gpa: int) -> Slot | None:
        """The present leaf covering ``gpa``, if any."""
        slot = self.find_pte(gpa)
        if slot is None or not slot.pte & f.PTE_V:
            return None
        return slot

    def walk_refs(self, gpa: int) -> tuple[Slot | None, int]:
        """Hardware walk: the present leaf and how many entries were loaded to find out."""
        table = self.root
        mem = self.mem
        refs = 0
        for level in (3, 2, 1, 0):
            addr = table + ((gpa >> self._shifts[level]) & ((1 << self._bits[level]) - 1)) * 8
            pte = mem.read_u64(addr)
            refs += 1
            if not pte & f.PTE_V:
                return None, refs
            if pte & f.PTE_L:
                shift = self._shifts[level]
                return Slot(addr, pte, level, gpa & ~((1 << shift) - 1), shift), refs
            table = pte & f.PDE_NLB_MASK
        return None, refs

    def ensure_table(self, gpa: int, level: int) -> tuple[int, Slot | None]:
        """Walk down to the table holding level-``level`` entries for ``gpa``, allocating.

        Stops early and returns (0, slot) if a leaf larger than ``level`` is in the way.
        """
        table = self.root
        for lv in range(3, level, -1):
            addr = self.entry_addr(table, lv, gpa)
            pte = self.mem.read_u64(addr)
            if pte & f.PTE_V and pte & f.PTE_L:
                shift = self._shifts[lv]
                return 0, Slot(addr, pte, lv, gpa & ~((1 << shift) - 1), shift)
            if not pte & f.PTE_V:
                new = self._alloc_table(lv - 1)
                self.mem.write_u64(addr, f.make_pde(new, self._bits[lv - 1]))
                table = new
            else:
                table = pte & f.PDE_NLB_MASK
        return table, None

    def leaves(self, start: int = 0, end: int = 1 << 52) -> Iterator[Slot]:
        """Every present leaf intersecting [start, end), in address order."""
        yield from self._leaves(self.root, 3, 0, start, end)

    def _entries(self, table: int, first: int, count: int) -> tuple[int, ...]:
        """``count`` entries of a table from index ``first``, loaded as one block (a sparse
        8192-entry root costs one read, not 8192 ``read_u64`` calls)."""
        return struct.unpack(f">{count}Q", self.mem.read(table + first * 8, count * 8)) if count > 0 else ()

    def _leaves(self, table: int, level: int, base: int, start: int, end: int) -> Iterator[Slot]:
        shift = self._shifts[level]
        n = 1 << self._bits[level]
        first = max(0, (start - base) >> shift) if start > base else 0
        last = min(n, (end - base + (1 << shift) - 1) >> shift) if end > base else 0
        entries = self._entries(table, first, last - first)
        for i in [first + j for j, e in enumerate(entries) if e & f.PTE_V]:
            gpa = base + (i << shift)
            if gpa + (1 << shift) <= start:
                continue
            pte = entries[i - first]
            if pte & f.PTE_L:
                yield Slot(table + i * 8, pte, level, gpa, shift)
            elif level > 0:
                yield from self._leaves(pte & f.PDE_NLB_MASK, level - 1, gpa, start, end)

    def subtables(self, table: int, level: int) -> Iterator[tuple[int, int, int]]:
        """(entry address, value, index) of the present entries of one table."""
        entries = self._entries(table, 0, 1 << self._bits[level])
        for i in [j for j, e in enumerate(entries) if e & f.PTE_V]:
            yield table + i * 8, entries[i], i

    def free_below(self, table: int, level: int) -> None:
        """Free every table below ``table`` (level ``level``) and clear its entries.

        This is kvmppc_free_pgtable's ``full`` mode: no per-PTE work, rmaps are left stale.
        """
        for addr, pte, _ in list(self.subtables(table, level)):
            if not pte & f.PTE_L and level > 0:
                child = pte & f.PDE_NLB_MASK
                self.free_below(child, level - 1)
                self.free_table(child, level - 1)
            self.mem.write_u64(addr, 0)

    def count_tables(self) -> int:
        return self.table_pages

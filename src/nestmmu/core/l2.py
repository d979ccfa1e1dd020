"""L2: the nested guest's own OS (a small Linux-like kernel) and its process-scoped trees.

Theory of operation
-------------------
A Linux L2 runs with MSR[IR,DR]=1: its effective addresses go through *process-scoped* radix
trees it builds itself, in its own (L2 real) memory, found through a process table whose base
and size it registers with its hypervisor (H_REGISTER_PROC_TBL: PATE dw1 PRTB/PRTS).  The
hardware then translates every L2 real address it touches — each table entry it reads and the
final address — partition scoped, through the shadow table (see ``L0Hypervisor.run_access``).

:class:`L2Kernel` is that OS, pure: it owns a process table and one radix tree per PID in a
reserved region of L2 real memory, and hands out anonymous pages from the rest.  It never
writes memory itself: every operation returns a :class:`KernelOps` — the ordered real-mode
stores ``(l2_real_addr, u64)`` its CPU performs, then the process-scoped tlbies Linux issues
(``radix__flush_tlb_page`` / ``radix__flush_tlb_range`` / ``radix__flush_tlb_mm``: tlbie PRS=1,
by address or by PID).  The driver performs the stores as real-mode data stores through the
normal access path (so they take nested faults like any L2 store), tags the tlbies with the
shadow LPID the vCPU runs with and delivers them to every vCPU of that LPID.  The kernel keeps
its own view of what it stored (``mem``), which is what it reads back when it updates a tree.

Page faults (``handle_fault``) follow Linux's ``__handle_mm_fault``: an access inside a VMA
that allows it either demand-maps a zeroed anonymous page (``do_anonymous_page``: R set, C set
on a write) or, when the leaf is there but lacks R (or C for a store), sets them
(``handle_pte_fault`` -> ``ptep_set_access_flags``; the guest manages its own R/C under
LPID != 0).  Anything else is a segfault (None).

Simplifications: base pages only (no THP in the process trees), table pages are never freed
(Linux frees page-table pages only on munmap of whole ranges), no ASID/PID reuse races, and
the process table holds 2^(PRTS+8) PIDs (Linux registers a 2^(mmu_pid_bits+4)-byte table).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from . import formats as f
from .effects import Invalidation, Scope
from .formats import Access
from .memory import Allocator, OutOfMemory, SimMemory
from .radix import RADIX_PGD_INDEX_SIZE, RadixTable, Slot

# radix_tlb.c: above this many pages a range flush becomes a flush of the whole PID.
TLB_SINGLE_PAGE_FLUSH_CEILING = 33
PERM_RWX = f.PTE_EAA_READ | f.PTE_EAA_RW | f.PTE_EAA_EXEC
NO_LPID = -1  # KernelOps invalidations carry no LPID: the driver tags them with LPIDR


class L2Error(ValueError):
    """A request the L2 kernel refuses (unknown PID, range outside its space, ...)."""


@dataclass
class KernelOps:
    """What an L2 kernel operation makes its CPU do: stores in order, then tlbies."""

    stores: list[tuple[int, int]] = field(default_factory=list)  # (L2 real address, u64)
    invalidations: list[Invalidation] = field(default_factory=list)
    # With ``use_rpt_invalidate`` (a pseries L2 without GTSE): the flushes as process-scoped
    # H_RPT_INVALIDATE hcalls (pid, type, pg_sizes, start, end) instead of tlbie, which L0
    # performs for the guest's shadow LPID (kvmppc_nested_h_rpt_invalidate).
    rpt_invalidates: list[tuple[int, int, int, int, int]] = field(default_factory=list)

    def extend(self, other: KernelOps) -> None:
        self.stores += other.stores
        self.invalidations += other.invalidations
        self.rpt_invalidates += other.rpt_invalidates

    def tagged(self, lpid: int) -> list[Invalidation]:
        """The tlbies as the hardware applies them: in the LPID the vCPU runs with."""
        return [replace(inv, lpid=lpid) for inv in self.invalidations]

    def __len__(self) -> int:
        return len(self.stores) + len(self.invalidations) + len(self.rpt_invalidates)


class _KernelMemory(SimMemory):
    """The L2 kernel's view of its own memory; records every doubleword it stores.

    A fresh table page is zero already (the region is fresh guest memory and table pages are
    never freed), so zeroing records nothing."""

    __slots__ = ("log",)

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.log: list[tuple[int, int]] = []

    def write_u64(self, addr: int, value: int) -> None:
        if self.read_u64(addr) != value:
            self.log.append((addr, value & f.U64))
        super().write_u64(addr, value)

    def take(self) -> list[tuple[int, int]]:
        out, self.log = self.log, []
        return out


@dataclass
class Process:
    """One mm: its PID, tree, VMAs (page -> perms) and the anonymous pages it owns."""

    pid: int
    tree: RadixTable
    vmas: dict[int, int] = field(default_factory=dict)  # EA page -> EAA perms (explicit VMAs)
    pages: dict[int, int] = field(default_factory=dict)  # EA page -> L2 real page


class L2Kernel:
    """The L2 OS: process table and per-PID radix trees in L2 real memory.

    ``memory``: L2 real memory size; tables come from ``[table_base, table_base+table_size)``,
    anonymous pages from ``[table_base+table_size, memory)``.  ``page_shift``: base page of the
    process trees (12: 13/9/9/9, 16: 13/9/9/5 as Linux ``radix__``).  ``anon_perms``: what an
    access outside every explicit VMA gets on demand (a process whose whole space is anonymous
    memory, so a trace of any effective addresses replays); 0 makes such accesses segfault.
    """

    def __init__(
        self,
        memory: int,
        page_shift: int = 16,
        prts: int = 4,
        table_base: int = 1 << 20,
        table_size: int = 7 << 20,
        anon_perms: int = PERM_RWX,
        use_rpt_invalidate: bool = False,
    ) -> None:
        if page_shift not in (12, 16):
            raise L2Error(f"L2 base page shift must be 12 or 16, not {page_shift}")
        if not 0 <= prts <= 24:
            raise L2Error(f"PRTS {prts} out of range 0..24")
        data_base = table_base + table_size
        if table_base <= 0 or table_base % (1 << 16) or table_size % (1 << 16) or data_base + (1 << page_shift) > memory:
            raise L2Error(f"L2 memory {memory:#x} too small for a table region at {table_base:#x}+{table_size:#x} and data pages")
        self.memory = memory
        self.page_shift = page_shift
        self.page_size = 1 << page_shift
        self.prts = prts
        self.anon_perms = anon_perms
        self.use_rpt_invalidate = use_rpt_invalidate
        self.mem = _KernelMemory(memory)
        self.table_alloc = Allocator(table_base, data_base)
        self.data_alloc = Allocator(data_base, memory)
        self.process_table = 0
        self.procs: dict[int, Process] = {}
        self.stats: dict[str, int] = {}

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    # ---------------------------------------------------------------- process table
    def setup(self) -> KernelOps:
        """Allocate the process table (zeroed guest memory: no stores) — early boot."""
        if self.process_table:
            raise L2Error("the process table is already set up")
        self.process_table = self.table_alloc.alloc(1 << (12 + self.prts))
        return KernelOps()

    def proc_tbl_dw1(self) -> int:
        """PATE dw1 this OS registers (H_REGISTER_PROC_TBL): GR | PRTB | PRTS."""
        if not self.process_table:
            raise L2Error("setup() first: there is no process table")
        return f.make_pate_dw1(self.process_table, self.prts)

    def max_pids(self) -> int:
        return 1 << (self.prts + 8)

    def prte_addr(self, pid: int) -> int:
        return self.process_table + pid * f.PRTE_SIZE

    def create_process(self, pid: int) -> KernelOps:
        """A new mm: allocate its root (pgd) and write its process-table entry."""
        if not self.process_table:
            raise L2Error("setup() first: there is no process table")
        if not 0 <= pid < self.max_pids():
            raise L2Error(f"PID {pid} outside the process table (0..{self.max_pids() - 1})")
        if pid in self.procs:
            raise L2Error(f"PID {pid} already exists")
        try:
            tree = RadixTable(self.mem, self.table_alloc, self.page_shift)
        except OutOfMemory as e:
            raise L2Error(f"L2 table region exhausted: {e}") from e
        self.procs[pid] = Process(pid, tree)
        self.mem.write_u64(self.prte_addr(pid), f.make_prte_dw0(tree.root, RADIX_PGD_INDEX_SIZE))
        self._count("processes_created")
        return KernelOps(self.mem.take())

    def destroy_process(self, pid: int) -> KernelOps:
        """exit_mmap + destroy_context: unmap everything, clear the entry, flush the PID
        (RIC=2: TLB, page-walk cache and the cached process-table entry)."""
        proc = self._proc(pid)
        ops = KernelOps()
        for page in sorted(proc.pages):
            self._unmap_page(proc, page)
        ops.stores = self.mem.take()
        self.mem.write_u64(self.prte_addr(pid), 0)
        ops.stores += self.mem.take()
        if self.use_rpt_invalidate:
            ops.rpt_invalidates.append((pid, f.H_RPTI_TYPE_ALL, f.H_RPTI_PAGE_ALL, 0, f.U64))
        else:
            ops.invalidations.append(Invalidation(NO_LPID, Scope.PID, reason="l2_destroy_context", prs=True, pid=pid))
        # Table pages of the dead mm are left allocated (see the module note).
        del self.procs[pid]
        return ops

    def _proc(self, pid: int) -> Process:
        p = self.procs.get(pid)
        if p is None:
            raise L2Error(f"no process with PID {pid}")
        return p

    # ---------------------------------------------------------------- lookups
    def lookup(self, pid: int, ea: int) -> Slot | None:
        """The present leaf of PID's tree covering ea (this OS's view of its memory)."""
        p = self.procs.get(pid)
        return None if p is None else p.tree.lookup_leaf(ea & f.EA_VALID_MASK)

    def vma_perms(self, proc: Process, page: int) -> int:
        return proc.vmas.get(page, self.anon_perms)

    def _pages(self, ea: int, length: int) -> range:
        if length <= 0:
            raise L2Error(f"length must be positive, not {length}")
        ea &= f.EA_VALID_MASK
        ps = self.page_size
        start = ea & ~(ps - 1)
        end = (ea + length + ps - 1) & ~(ps - 1)
        if end > 1 << 52:
            raise L2Error(f"range {ea:#x}+{length:#x} leaves the 52-bit effective address space")
        return range(start, end, ps)

    def _check_perms(self, perms: int) -> None:
        if perms & ~PERM_RWX:
            raise L2Error(f"permissions {perms:#x} are not EAA R/RW/X bits")

    def _leaf_perms(self, pid: int, perms: int) -> int:
        # PID 0 is the kernel's own space (quadrant 3): its pages are privileged.
        return perms | (f.PTE_EAA_PRIV if pid == 0 else 0)

    # ---------------------------------------------------------------- mmap / munmap / mprotect
    def map(self, pid: int, ea: int, length: int, perms: int = PERM_RWX) -> KernelOps:
        """mmap(MAP_ANONYMOUS|MAP_POPULATE): a VMA with ``perms`` and every page mapped now
        (R set, C clear: populated pages are clean until written)."""
        self._check_perms(perms)
        proc = self._proc(pid)
        changed = []
        for page in self._pages(ea, length):
            proc.vmas[page] = perms
            slot = proc.tree.lookup_leaf(page)
            if slot is None:
                # A new leaf replaces an invalid entry: nothing cached, nothing to flush.
                self._install(proc, page, perms, dirty=False)
            elif self._reprotect(proc, slot, perms):
                # Mapping over a present page keeps it (MAP_FIXED_NOREPLACE-like) with the
                # new permissions: a change of protection, flushed like mprotect.
                changed.append(page)
        self._count("map")
        return self._ops_with_flush(pid, changed)

    def unmap(self, pid: int, ea: int, length: int) -> KernelOps:
        """munmap / MADV_DONTNEED: clear the leaves, flush them, free the pages.  The range
        reverts to the default anonymous policy (``anon_perms``)."""
        proc = self._proc(pid)
        pages = self._pages(ea, length)
        changed = []
        for page in pages:
            proc.vmas.pop(page, None)
            if self._unmap_page(proc, page):
                changed.append(page)
        self._count("unmap")
        return self._ops_with_flush(pid, changed)

    def protect(self, pid: int, ea: int, length: int, perms: int) -> KernelOps:
        """mprotect: new VMA permissions, and every present leaf rewritten with them
        (change_protection), then flush_tlb_range over the pages that changed."""
        self._check_perms(perms)
        proc = self._proc(pid)
        changed = []
        for page in self._pages(ea, length):
            proc.vmas[page] = perms
            slot = proc.tree.lookup_leaf(page)
            if slot is not None and self._reprotect(proc, slot, perms):
                changed.append(page)
        self._count("protect")
        return self._ops_with_flush(pid, changed)

    def _ops_with_flush(self, pid: int, pages: list[int]) -> KernelOps:
        """The stores made, then the flush of ``pages``: tlbies, or (without GTSE) the
        H_RPT_INVALIDATE Linux's pseries_rpt_invalidate issues for the same range."""
        ops = KernelOps(self.mem.take())
        if not pages:
            return ops
        if not self.use_rpt_invalidate:
            ops.invalidations = self._flush_range(pid, pages)
            return ops
        ps = self.page_size
        bit = f.H_RPTI_PAGE_4K if ps == 1 << 12 else f.H_RPTI_PAGE_64K
        q = 3 << f.EA_QUADRANT_SHIFT if pid == 0 else 0
        if len(pages) > TLB_SINGLE_PAGE_FLUSH_CEILING:
            ops.rpt_invalidates.append((pid, f.H_RPTI_TYPE_TLB, f.H_RPTI_PAGE_ALL, 0, f.U64))
        else:
            # One call per run of consecutive pages (radix__flush_tlb_range flushes a range).
            run = [pages[0]]
            for p in [*pages[1:], -1]:
                if p == run[-1] + ps:
                    run.append(p)
                    continue
                ops.rpt_invalidates.append((pid, f.H_RPTI_TYPE_TLB, bit, (q | run[0]) & f.U64, (q | (run[-1] + ps)) & f.U64))
                run = [p]
        return ops

    def _flush_range(self, pid: int, pages: list[int]) -> list[Invalidation]:
        """radix__flush_tlb_range: one tlbie per page, or the whole PID past the ceiling."""
        if not pages:
            return []
        if len(pages) > TLB_SINGLE_PAGE_FLUSH_CEILING:
            return [Invalidation(NO_LPID, Scope.PID, reason="l2_flush_mm", prs=True, pid=pid)]
        ps = self.page_size
        # RB's EPN is the full effective address: the kernel's own pages (PID 0) are reached
        # through quadrant 3 (0xC000...), as Linux's kernel addresses are.
        q = 3 << f.EA_QUADRANT_SHIFT if pid == 0 else 0
        return [Invalidation(NO_LPID, Scope.ADDRESS, q | page, ps, "l2_flush_page", prs=True, pid=pid) for page in pages]

    # ---------------------------------------------------------------- tree updates
    def _install(self, proc: Process, page: int, perms: int, dirty: bool) -> int:
        """Allocate a zeroed anonymous page and write its leaf (set_pte_at)."""
        try:
            real = self.data_alloc.alloc(self.page_size)
        except OutOfMemory as e:
            raise L2Error(f"L2 out of memory: {e}") from e
        table, _ = proc.tree.ensure_table(page, 0)
        addr = proc.tree.entry_addr(table, 0, page)
        pte = f.make_pte(real, self._leaf_perms(proc.pid, perms), r=True, c=dirty and bool(perms & f.PTE_EAA_RW))
        self.mem.write_u64(addr, pte)
        proc.pages[page] = real
        self._count("pages_mapped")
        return real

    def _reprotect(self, proc: Process, slot: Slot, perms: int) -> bool:
        """change_pte_range: the leaf with new permissions (C dropped without write)."""
        want = (slot.pte & ~PERM_RWX) | self._leaf_perms(proc.pid, perms)
        if not perms & f.PTE_EAA_RW:
            want &= ~f.PTE_C
        if want == slot.pte:
            return False
        self._set_leaf(proc, slot, want)
        return True

    def _set_leaf(self, proc: Process, slot: Slot, pte: int) -> None:
        self.mem.write_u64(slot.addr, pte)

    def _unmap_page(self, proc: Process, page: int) -> bool:
        slot = proc.tree.lookup_leaf(page)
        if slot is None:
            return False
        self.mem.write_u64(slot.addr, 0)
        real = proc.pages.pop(page, None)
        if real is not None:
            # The page is reused only by later operations, after this one's tlbies.
            self.data_alloc.free(real, self.page_size)
        self._count("pages_unmapped")
        return True

    # ---------------------------------------------------------------- page faults
    def handle_fault(self, pid: int, ea: int, access: Access, dsisr: int = 0) -> KernelOps | None:
        """do_page_fault for a process-scoped DSI/ISI: demand-map, or set R (and C on a
        store); None = the access is not allowed (SIGSEGV)."""
        proc = self.procs.get(pid)
        if proc is None or ea & f.EA_RESERVED_MASK or (ea >> f.EA_QUADRANT_SHIFT) in (1, 2):
            # No such mm, or a segment interrupt (not a fault a VMA can fix).
            self._count("segv")
            return None
        page = ea & f.EA_VALID_MASK & ~(self.page_size - 1)
        perms = self.vma_perms(proc, page)
        if not _vma_allows(perms, access):
            self._count("segv")
            return None
        slot = proc.tree.lookup_leaf(page)
        store = access is Access.STORE
        if slot is None:
            self._install(proc, page, perms, dirty=store)
            self._count("fault.anonymous")
            return KernelOps(self.mem.take())
        bits = f.PTE_R | (f.PTE_C if store else 0)
        if not _vma_allows(slot.pte, access):
            # The VMA allows it but the leaf does not (a stale protection): refresh the leaf.
            self._set_leaf(proc, slot, (slot.pte & ~PERM_RWX) | self._leaf_perms(pid, perms) | bits)
            self._count("fault.upgrade")
            return KernelOps(self.mem.take())
        if slot.pte & bits != bits:
            self._set_leaf(proc, slot, slot.pte | bits)
            self._count("fault.set_rc")
            return KernelOps(self.mem.take())
        # The tree already allows it (a fault raced a fix, or the TLB was stale): retry.
        self._count("fault.spurious")
        return KernelOps()


def _vma_allows(perms: int, access: Access) -> bool:
    if access is Access.STORE:
        return bool(perms & f.PTE_EAA_RW)
    if access is Access.IFETCH:
        return bool(perms & f.PTE_EAA_EXEC)
    return bool(perms & (f.PTE_EAA_READ | f.PTE_EAA_RW))


__all__ = ["PERM_RWX", "TLB_SINGLE_PAGE_FLUSH_CEILING", "KernelOps", "L2Error", "L2Kernel", "Process"]

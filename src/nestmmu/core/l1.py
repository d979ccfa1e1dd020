"""L1: a guest hypervisor (Linux KVM-HV running as a pseries guest) and its L2 guests' trees.

L1 owns its memory: its partition table (registered with H_SET_PARTITION_TABLE) and, for each
L2 guest, a partition-scoped radix tree (L2 real -> L1 real) built in that memory with the
guest's page size.  L0 never writes these tables; it asks L1 to walk them and reflects exits
to L1's handler, which behaves like Linux-as-L1's ``kvmppc_book3s_radix_page_fault``.

Every change to an L2 tree is written first and then followed by the invalidation hcall
Linux-as-L1 issues; methods return those hcalls as data (:class:`Hcall`) for the caller to
issue to L0, in order.  That order (tree write, then hcall) is what makes a concurrent nested
fault in L0 safe: L0 holds the guest's tlb_lock across its walk, so the invalidation runs after
any insert built from the old entry and removes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from . import formats as f
from .compact import PageMap
from .effects import ExitAction, ExitReply, NestedExit
from .formats import Access
from .l0 import PTE_BITS_MUST_MATCH, ConfigError, HvGuestState
from .memory import Allocator, MemoryFault, OutOfMemory, SimMemory
from .radix import PMD_SHIFT, PUD_SHIFT, RadixTable, WalkResult, shift_to_level, walk_radix_tree

GUEST_PAGE_SHIFTS = (12, 16, 21, 30)
PERM_RWX = f.PTE_EAA_READ | f.PTE_EAA_RW | f.PTE_EAA_EXEC


# --- hcalls L1 issues (data; the caller sends them to L0) ------------------------------------
@dataclass(frozen=True, slots=True)
class SetPartitionTable:
    ptcr: int


@dataclass(frozen=True, slots=True)
class TlbInvalidate:
    instr: int
    rs: int
    rb: int


@dataclass(frozen=True, slots=True)
class RptInvalidate:
    id: int
    target: int
    type: int
    pg_sizes: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class CopyL1Pages:
    """L1 copies ``length`` bytes of its own memory from ``src`` to ``dst`` (4K aligned).

    L1's memory is host frames in L0, so its memcpy moves bytes there: the model sends the
    copy to L0 (data guests only; see :attr:`L2Guest.data`)."""

    dst: int
    src: int
    length: int
    zero: bool = False  # clear dst instead (clear_page: a fresh page for a data guest)


@dataclass(frozen=True, slots=True)
class CopyToFromGuest:
    """H_COPY_TOFROM_GUEST: L0 copies ``n`` bytes between L2's (pid, eaddr) and L1 memory.

    Linux-as-L1 issues it from ``__kvmhv_copy_tofrom_guest_radix`` (it cannot use quadrants 1
    and 2 itself when it is a pseries guest).  ``done``, when given, receives the hcall's
    return code once L0 answered: L1's continuation (e.g. ``kvmppc_ld``'s fallback)."""

    lpid: int
    pid: int
    eaddr: int
    to_gpa: int
    from_gpa: int
    n: int
    done: Callable[[int], None] | None = None


@dataclass(frozen=True, slots=True)
class L1Step:
    """Not an hcall: work L1 does itself once every hcall before it in the list completed
    (e.g. install the new leaf after the page was copied).  Drivers call ``run()``."""

    run: Callable[[], None]


Hcall = SetPartitionTable | TlbInvalidate | RptInvalidate | CopyL1Pages | CopyToFromGuest | L1Step


@dataclass(frozen=True)
class MemslotSpec:
    """One L1 memslot as L1 registers it with L0 (holes between slots are MMIO)."""

    index: int
    base: int
    size: int
    read_only: bool = False
    backing_shift: int = 0


def default_memslots(memory: int = 16 << 30) -> list[MemslotSpec]:
    """RAM at 0, a 64 MiB read-only slot (ROM) above it, then a 64 MiB MMIO hole."""
    return [MemslotSpec(0, 0, memory, backing_shift=PMD_SHIFT), MemslotSpec(1, memory, 64 << 20, read_only=True)]


@dataclass(frozen=True)
class GuestRegion:
    """A range of an L2 guest's real address space with a special backing.

    kind: "rom" (backed by L1's read-only memslot), "mmio" (mapped onto an L1 MMIO hole: L0
    emulates), or "protect" (ordinary memory that L1 maps only with ``perms``).
    """

    kind: str
    start: int
    size: int
    perms: int = PERM_RWX


@dataclass
class L2Guest:
    """One L2 guest as its L1 sees it: lpid, PATE, tree, which L1 page backs which L2 page."""

    lpid: int
    page_shift: int
    memory: int
    tree: RadixTable
    regions: list[GuestRegion] = field(default_factory=list)
    # L2 page -> L1 real address; compact (8 + 8 bytes a page), with a dict's order.
    backing: PageMap = field(default_factory=PageMap)
    perms: dict[int, int] = field(default_factory=dict)  # L2 page -> EAA override
    # Data mode: L1 keeps the guest's bytes when it moves pages (remap copies, unmap swaps
    # out to a slot of L1 memory, the next fault swaps in), as Linux-as-L1 does.
    data: bool = False
    swap: dict[int, int] = field(default_factory=dict)  # L2 page -> L1 swap slot address
    busy: set[int] = field(default_factory=set)  # pages whose copy is in flight (no leaf yet)
    # The model has no L2 program counter: the instruction of a load/store L1 must emulate is
    # taken to be at this L2 address (the L2 kernel's text at real address 0).
    text: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.backing, PageMap):
            self.backing = PageMap(self.backing)

    @property
    def page_size(self) -> int:
        return 1 << self.page_shift

    def pate_dw0(self) -> int:
        return self.tree.pate_dw0()

    def region_at(self, n_gpa: int) -> GuestRegion | None:
        for r in self.regions:
            if r.start <= n_gpa < r.start + r.size:
                return r
        return None


class L1Hypervisor:
    """The guest hypervisor's state and policies (pure; no I/O)."""

    def __init__(
        self,
        name: str,
        memslots: list[MemslotSpec] | None = None,
        l0_page_shift: int = 16,
        use_rpt_invalidate: bool = True,
        pats: int = 4,
        forget_flush: bool = False,
        hdec_every: int = 0,
    ) -> None:
        self.name = name
        self.memslots = memslots or default_memslots()
        self.l0_page_shift = l0_page_shift
        self.use_rpt_invalidate = use_rpt_invalidate
        # Teaching failure mode (semantics §9.17): change a valid leaf (protect, remap) and
        # "forget" the invalidation hcall Linux-as-L1 must issue after it.  L0 then keeps a
        # shadow leaf built from the old entry; a later fault on it reaches kvmppc_create_pte
        # with a different RPN (WARN + OR), and the audit reports the mismatch.
        self.forget_flush = forget_flush
        if hdec_every < 0:
            raise ConfigError(f"hdec_every must be >= 0 (0 = off), not {hdec_every}")
        # The HDEC L1 programs in hv_guest_state.hdec_expiry, on the model's logical clock:
        # it expires every ``hdec_every`` accesses of an L2 vCPU (0 = never).
        self.hdec_every = hdec_every
        ram = [s for s in self.memslots if not s.read_only]
        rom = [s for s in self.memslots if s.read_only]
        if not ram:
            raise ConfigError("an L1 needs a writable memslot for its tables")
        end = max(s.base + s.size for s in self.memslots)
        self.mmio_base = end  # the hole above the last memslot is MMIO (passed through)
        self.mem = SimMemory(end + (64 << 20), valid=self._valid, valid_span=self._valid_span)
        main = max(ram, key=lambda s: s.size)
        # vcpu->arch.last_inst of each L2 vCPU lives in "L1's kernel" (the low 16 MiB below).
        self.last_inst_base = main.base + (1 << 20)
        # Keep the low 16 MiB for "L1's kernel"; tables and L2 backing come from the rest.
        self.alloc = Allocator(main.base + min(16 << 20, main.size // 2), main.base + main.size)
        self.rom_alloc = Allocator(rom[0].base, rom[0].base + rom[0].size) if rom else None
        if not 0 <= pats <= f.KVM_MAX_NESTED_GUESTS_SHIFT - 8:
            raise ConfigError(f"PATS {pats} out of range 0..{f.KVM_MAX_NESTED_GUESTS_SHIFT - 8}")
        self.pats = pats
        self.partition_table = self.alloc.alloc(1 << (12 + pats))
        self.ptcr = f.make_ptcr(self.partition_table, pats)
        self.guests: dict[int, L2Guest] = {}
        self.exits_handled = 0
        self.stats: dict[str, int] = {}

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def _valid(self, addr: int) -> bool:
        return any(s.base <= addr < s.base + s.size for s in self.memslots)

    def _valid_span(self, lo: int, hi: int) -> bool:
        """[lo, hi) lies inside one memslot (lets the memory skip per-read checks there)."""
        return any(s.base <= lo and hi <= s.base + s.size for s in self.memslots)

    # ---------------------------------------------------------------- memory L0 reads
    def read_memory(self, gpa: int, length: int) -> bytes | None:
        try:
            return self.mem.read(gpa, length)
        except MemoryFault:
            return None

    def write_memory(self, gpa: int, data: bytes) -> bool:
        for s in self.memslots:
            if s.read_only and s.base <= gpa < s.base + s.size:
                return False
        try:
            self.mem.write(gpa, data)
        except MemoryFault:
            return False
        return True

    def walk(self, pate_dw0: int, n_gpa: int) -> WalkResult:
        """Walk one L2 tree (the root L0 cached) in L1's memory: what L0 asks of L1."""
        return walk_radix_tree(self.mem, pate_dw0, n_gpa)

    # ---------------------------------------------------------------- boot and guests
    def boot(self) -> list[Hcall]:
        """Register the partition table with L0."""
        return [SetPartitionTable(self.ptcr)]

    def max_lpids(self) -> int:
        return 1 << (self.pats + 8)

    def _alloc_lpid(self) -> int:
        for lpid in range(1, self.max_lpids()):
            if lpid not in self.guests:
                return lpid
        raise ConfigError(f"L1 {self.name!r} has no free guest LPID (PATS={self.pats})")

    def _write_pate(self, lpid: int, dw0: int, dw1: int) -> None:
        addr = self.partition_table + lpid * f.PATE_SIZE
        self.mem.write_u64(addr, dw0)
        self.mem.write_u64(addr + 8, dw1)

    def create_guest(
        self, lpid: int = 0, page_shift: int = 16, memory: int = 64 << 20, regions: list[GuestRegion] | None = None, data: bool = False
    ) -> tuple[L2Guest, list[Hcall]]:
        """Allocate an lpid, build the root in L1 memory, write the PATE, flush (RIC=2)."""
        if page_shift not in GUEST_PAGE_SHIFTS:
            raise ConfigError(f"guest page_shift must be one of {GUEST_PAGE_SHIFTS}, not {page_shift}")
        if memory <= 0 or memory % (1 << page_shift):
            raise ConfigError(f"guest memory {memory:#x} must be a positive multiple of the page size {1 << page_shift:#x}")
        if memory > 1 << 46:
            raise ConfigError("guest memory above 64 TiB is not supported by this model")
        if lpid == 0:
            lpid = self._alloc_lpid()
        elif not 0 < lpid < self.max_lpids():
            raise ConfigError(f"guest lpid {lpid} outside 1..{self.max_lpids() - 1}")
        elif lpid in self.guests:
            raise ConfigError(f"L1 {self.name!r} already has a guest with lpid {lpid}")
        for r in regions or []:
            if r.kind not in ("rom", "mmio", "protect"):
                raise ConfigError(f"region kind must be rom, mmio or protect, not {r.kind!r}")
            if r.start % (1 << page_shift) or r.size % (1 << page_shift) or r.size <= 0:
                raise ConfigError(f"region {r.kind} at {r.start:#x}: start and size must be multiples of the guest page size")
            if r.start + r.size > memory:
                raise ConfigError(f"region {r.kind} at {r.start:#x} ends beyond guest memory")
            if r.kind == "rom" and self.rom_alloc is None:
                raise ConfigError("a rom region needs a read-only memslot in L1")
        try:
            tree = RadixTable(self.mem, self.alloc, 12 if page_shift == 12 else 16)
        except OutOfMemory as e:
            raise ConfigError(f"L1 {self.name!r} is out of memory for a new tree: {e}") from e
        guest = L2Guest(lpid, page_shift, memory, tree, list(regions or []), data=data)
        self.guests[lpid] = guest
        self._write_pate(lpid, guest.pate_dw0(), f.make_pate_dw1())
        self._count("guests_created")
        return guest, [self._flush_lpid_hcall(lpid)]

    def destroy_guest(self, lpid: int) -> list[Hcall]:
        """PATE := 0, then RIC=2 for the LPID (L0 removes the nested guest), free the tree."""
        guest = self.guest(lpid)
        self._write_pate(lpid, 0, 0)
        hcalls = [self._flush_lpid_hcall(lpid)]
        tree = guest.tree
        tree.free_below(tree.root, 3)
        tree.free_table(tree.root, 3)
        for page, l1_gpa in guest.backing.items():
            self._free_backing(guest, page, l1_gpa)
        for slot in guest.swap.values():
            self.alloc.free(slot)
        del self.guests[lpid]
        self._count("guests_destroyed")
        return hcalls

    def h_register_proc_tbl(self, lpid: int, dw1: int) -> list[Hcall]:
        """The L2 registers its process table (H_REGISTER_PROC_TBL, radix): L1 stores it as
        PATE dw1 of that guest and flushes the LPID with RIC=2, as Linux-as-L1 does for any
        PATE change (kvmhv_set_ptbl_entry -> kvmhv_flush_lpid), so L0 re-reads the PATE."""
        guest = self.guest(lpid)
        dw1 &= f.U64
        if f.pate_prts(dw1) > 24:
            # kvm_vm_ioctl_configure_mmu: a process table beyond 2^36 bytes is refused.
            raise ConfigError(f"process table size field PRTS {f.pate_prts(dw1)} exceeds 24")
        self._write_pate(lpid, guest.pate_dw0(), dw1 | f.PATE_GR)
        self._count("register_proc_tbl")
        return [self._flush_lpid_hcall(lpid)]

    def guest(self, lpid: int) -> L2Guest:
        g = self.guests.get(lpid)
        if g is None:
            raise ConfigError(f"L1 {self.name!r} has no L2 guest with lpid {lpid}")
        return g

    def page_busy(self, lpid: int, n_gpa: int) -> bool:
        """A data guest's page is being copied (its leaf comes back when the copy is done)."""
        g = self.guests.get(lpid)
        return g is not None and bool(g.busy) and (n_gpa >> g.page_shift) in g.busy

    def hv_guest_state(self, lpid: int, vcpu_token: int) -> HvGuestState:
        """The state L1 passes to H_ENTER_NESTED to enter (a vCPU of) its L2.

        Every entry counts here; re-entries after an exit L1 handled count in handle_exit."""
        self.guest(lpid)
        self._count("hcall.H_ENTER_NESTED")
        return HvGuestState(version=2, lpid=lpid, vcpu_token=vcpu_token)

    def last_inst_addr(self, vcpu_id: int) -> int:
        """L1 real address of ``vcpu->arch.last_inst`` of an L2 vCPU (the copy's buffer)."""
        return self.last_inst_base + 8 * (vcpu_id % 4096)

    # ---------------------------------------------------------------- invalidation hcalls
    def _flush_page_hcall(self, lpid: int, n_gpa: int, shift: int) -> Hcall:
        size = 1 << shift
        if self.use_rpt_invalidate:
            bit = {12: f.H_RPTI_PAGE_4K, 16: f.H_RPTI_PAGE_64K, 21: f.H_RPTI_PAGE_2M, 30: f.H_RPTI_PAGE_1G}[shift]
            return RptInvalidate(lpid, f.H_RPTI_TARGET_CMMU, f.H_RPTI_TYPE_NESTED | f.H_RPTI_TYPE_TLB, bit, n_gpa, n_gpa + size)
        instr, rs, rb = f.encode_tlbie(f.RIC_TLB, 0, 1, lpid, f.IS_VA, n_gpa, f.SHIFT_TO_AP[shift])
        return TlbInvalidate(instr, rs, rb)

    def _flush_lpid_hcall(self, lpid: int) -> Hcall:
        if self.use_rpt_invalidate:
            return RptInvalidate(lpid, f.H_RPTI_TARGET_CMMU, f.H_RPTI_TYPE_NESTED | f.H_RPTI_TYPE_NESTED_ALL, f.H_RPTI_PAGE_ALL, 0, f.U64)
        instr, rs, rb = f.encode_tlbie(f.RIC_ALL, 0, 1, lpid, f.IS_LPID)
        return TlbInvalidate(instr, rs, rb)

    # ---------------------------------------------------------------- L2 tree editing
    def _page_perms(self, guest: L2Guest, page: int) -> int:
        if page in guest.perms:
            return guest.perms[page]
        r = guest.region_at(page << guest.page_shift)
        if r is None:
            return PERM_RWX
        if r.kind == "rom":
            return f.PTE_EAA_READ | f.PTE_EAA_EXEC | (r.perms & f.PTE_EAA_RW)
        return r.perms

    def _backing_for(self, guest: L2Guest, page: int) -> int:
        """The L1 real address backing an L2 page, allocating it on first use."""
        got = guest.backing.get(page)
        if got is not None:
            return got
        n_gpa = page << guest.page_shift
        r = guest.region_at(n_gpa)
        size = guest.page_size
        if r is not None and r.kind == "mmio":
            l1_gpa = self.mmio_base + ((n_gpa - r.start) % (64 << 20)) // size * size
        elif r is not None and r.kind == "rom":
            assert self.rom_alloc is not None
            l1_gpa = self.rom_alloc.alloc(max(size, 1 << self.l0_page_shift))
        else:
            l1_gpa = self.alloc.alloc(size)
        guest.backing[page] = l1_gpa
        return l1_gpa

    def _free_backing(self, guest: L2Guest, page: int, l1_gpa: int) -> None:
        r = guest.region_at(page << guest.page_shift)
        if r is not None and r.kind == "mmio":
            return
        if r is not None and r.kind == "rom":
            assert self.rom_alloc is not None
            self.rom_alloc.free(l1_gpa)
            return
        self.alloc.free(l1_gpa)

    def _leaf_slot(self, guest: L2Guest, n_gpa: int) -> int:
        level = shift_to_level(guest.page_shift)
        tbl, blocker = guest.tree.ensure_table(n_gpa, level)
        assert blocker is None, "an L2 tree holds one page size"
        return guest.tree.entry_addr(tbl, level, n_gpa)

    def _read_leaf(self, guest: L2Guest, n_gpa: int) -> tuple[int, int] | None:
        slot = guest.tree.lookup_leaf(n_gpa)
        return None if slot is None else (slot.addr, slot.pte)

    def instantiate(self, guest: L2Guest, n_gpa: int, writing: bool) -> int:
        """Linux-as-L1's kvmppc_book3s_instantiate_page for its L2: back the page, insert a
        leaf with R, and with C whenever the leaf is writable (see :func:`leaf_c`).

        ``writing`` does not change the leaf: L1's host page is writable whenever L1 grants
        RW (the write upgrade), so a load builds the same leaf as a store.  Returns the leaf
        as it is afterwards (see :meth:`_create_leaf` when one was there)."""
        page = n_gpa >> guest.page_shift
        perms = self._page_perms(guest, page)
        l1_gpa = self._backing_for(guest, page)
        pte = f.make_pte(l1_gpa, perms, r=True, c=leaf_c(perms))
        return self._create_leaf(self._leaf_slot(guest, page << guest.page_shift), pte)

    def _create_leaf(self, addr: int, pte: int) -> int:
        """kvmppc_create_pte at the guest's page size, as Linux-as-L1 runs it for its L2.

        A fault L1 handles late may find the leaf already there: another vCPU faulted on the
        same page (both missed before either exit was handled) and its fault put the leaf in.
        The kernel then adds its bits ("Valid 2MB page here already, add our extra bits";
        WARN if other than W/R/C differ) and never clears any: that leaf may already have
        given L2 a shadow leaf with C (and no tlbie follows), so dropping C here would break
        shadow C => L1 C and lose the page's dirty bit."""
        old = self.mem.read_u64(addr)
        if not old & f.PTE_V:
            self.mem.write_u64(addr, pte)
            self._count("leaves_instantiated")
            return pte
        if old == pte:
            self._count("create_pte.identical")
            return old
        if (old ^ pte) & PTE_BITS_MUST_MATCH:
            self._count("warn.pte_bits_must_match")
        self.mem.write_u64(addr, old | pte)
        self._count("create_pte.or_bits")
        return old | pte

    def _pages(self, guest: L2Guest, n_gpa: int, length: int) -> range:
        if length <= 0:
            raise ConfigError("length must be positive")
        if n_gpa < 0 or n_gpa + length > guest.memory:
            raise ConfigError(f"range {n_gpa:#x}+{length:#x} is outside the guest's {guest.memory:#x} bytes")
        first = n_gpa >> guest.page_shift
        last = (n_gpa + length - 1) >> guest.page_shift
        return range(first, last + 1)

    # Each tree op changes one page at a time (``_*_page``: the tree write, then the
    # invalidation hcall that page needs, as Linux-as-L1 issues it after clearing the PTE).
    # ``*_chunks`` validate at once, then change ``chunk_pages`` pages per step, returning each
    # step's (pages changed, hcalls): a caller can issue a step's hcalls and let other work run
    # between steps.  The one-shot op is the same steps with one chunk, so results are identical.
    def map_pages(self, lpid: int, n_gpa: int, length: int, perms: int = 0) -> tuple[int, list[Hcall]]:
        """Prefault: insert leaves now (adding translations needs no invalidation).

        ``perms`` (EAA bits), when given, is what L1 grants the pages it maps now; pages that
        are already mapped keep theirs (changing them is protect_pages, which flushes).
        """
        return _collect(self.map_pages_chunks(lpid, n_gpa, length, perms))

    def unmap_pages(self, lpid: int, n_gpa: int, length: int) -> tuple[int, list[Hcall]]:
        """Clear leaves and free their backing; one invalidation per page (as Linux does)."""
        return _collect(self.unmap_pages_chunks(lpid, n_gpa, length))

    def protect_pages(self, lpid: int, n_gpa: int, length: int, perms: int) -> tuple[int, list[Hcall]]:
        """Change the permissions L1 grants; downgraded leaves are rewritten and flushed."""
        return _collect(self.protect_pages_chunks(lpid, n_gpa, length, perms))

    def remap_pages(self, lpid: int, n_gpa: int, length: int) -> tuple[int, list[Hcall]]:
        """Move mapped L2 pages to fresh L1 pages (e.g. L1 compaction), then flush each."""
        return _collect(self.remap_pages_chunks(lpid, n_gpa, length))

    def map_pages_chunks(self, lpid: int, n_gpa: int, length: int, perms: int = 0, chunk_pages: int = 0) -> Iterator[tuple[int, list[Hcall]]]:
        if perms & ~PERM_RWX:
            raise ConfigError(f"perms {perms:#x} must be a combination of R (4), RW (2), X (1)")
        guest = self.guest(lpid)
        return self._chunks(guest, self._pages(guest, n_gpa, length), chunk_pages, lambda page: self._map_page(guest, page, perms))

    def unmap_pages_chunks(self, lpid: int, n_gpa: int, length: int, chunk_pages: int = 0) -> Iterator[tuple[int, list[Hcall]]]:
        guest = self.guest(lpid)
        pages = self._pages(guest, n_gpa, length)
        self._count("pages_unmapped")  # one count per call, as before chunking
        return self._chunks(guest, pages, chunk_pages, lambda page: self._unmap_page(guest, page))

    def protect_pages_chunks(self, lpid: int, n_gpa: int, length: int, perms: int, chunk_pages: int = 0) -> Iterator[tuple[int, list[Hcall]]]:
        if perms & ~PERM_RWX:
            raise ConfigError(f"perms {perms:#x} must be a combination of R (4), RW (2), X (1)")
        guest = self.guest(lpid)
        return self._chunks(guest, self._pages(guest, n_gpa, length), chunk_pages, lambda page: self._protect_page(guest, page, perms))

    def remap_pages_chunks(self, lpid: int, n_gpa: int, length: int, chunk_pages: int = 0) -> Iterator[tuple[int, list[Hcall]]]:
        guest = self.guest(lpid)
        return self._chunks(guest, self._pages(guest, n_gpa, length), chunk_pages, lambda page: self._remap_page(guest, page))

    def _chunks(self, guest: L2Guest, pages: range, chunk_pages: int, step: Callable[[int], tuple[bool, list[Hcall]]]) -> Iterator[tuple[int, list[Hcall]]]:
        """Run ``step`` on ``pages``, ``chunk_pages`` at a time (0: all at once).

        A guest destroyed between chunks ends the op (its tree and backing are gone)."""
        size = chunk_pages if chunk_pages > 0 else max(1, len(pages))
        for lo in range(0, len(pages), size):
            if self.guests.get(guest.lpid) is not guest:
                return
            n = 0
            hcalls: list[Hcall] = []
            for page in pages[lo : lo + size]:
                changed, hs = step(page)
                n += changed
                hcalls += hs
            yield n, hcalls

    def _map_page(self, guest: L2Guest, page: int, perms: int) -> tuple[bool, list[Hcall]]:
        if page in guest.busy:  # a data guest's page being moved: its move installs the leaf
            return False, []
        if self._read_leaf(guest, page << guest.page_shift) is not None:
            return False, []
        if perms:
            guest.perms[page] = perms
        if page in guest.swap:
            return True, self._swap_in(guest, page, writing=False)
        return True, self._fault_in(guest, page << guest.page_shift, writing=False)

    def _unmap_page(self, guest: L2Guest, page: int) -> tuple[bool, list[Hcall]]:
        addr = page << guest.page_shift
        leaf = self._read_leaf(guest, addr)
        if leaf is None:
            return False, []
        self.mem.write_u64(leaf[0], 0)
        l1_gpa = guest.backing.pop(page, None)
        r = guest.region_at(addr)
        if guest.data and l1_gpa is not None and (r is None or r.kind == "protect"):
            return True, self._swap_out(guest, page, l1_gpa)
        if l1_gpa is not None:
            self._free_backing(guest, page, l1_gpa)
        return True, [self._flush_page_hcall(guest.lpid, addr, guest.page_shift)]

    def _protect_page(self, guest: L2Guest, page: int, perms: int) -> tuple[bool, list[Hcall]]:
        guest.perms[page] = perms
        addr = page << guest.page_shift
        leaf = self._read_leaf(guest, addr)
        if leaf is None:
            return False, []
        old = leaf[1]
        new = (old & ~PERM_RWX) | perms
        if not perms & f.PTE_EAA_RW:
            new &= ~f.PTE_C
        if new == old:
            return False, []
        self.mem.write_u64(leaf[0], new)
        return True, self._leaf_changed_flush(guest, addr)

    def _leaf_changed_flush(self, guest: L2Guest, addr: int) -> list[Hcall]:
        """The invalidation Linux-as-L1 issues after changing a valid leaf, unless this L1 was
        told to forget it (the §9.17 teaching failure mode)."""
        if self.forget_flush:
            self._count("flush_forgotten")
            return []
        return [self._flush_page_hcall(guest.lpid, addr, guest.page_shift)]

    def _remap_page(self, guest: L2Guest, page: int) -> tuple[bool, list[Hcall]]:
        addr = page << guest.page_shift
        leaf = self._read_leaf(guest, addr)
        if leaf is None:
            return False, []
        r = guest.region_at(addr)
        if r is not None and r.kind != "protect":
            return False, []  # ROM and MMIO mappings do not move
        old_gpa = guest.backing.pop(page)
        new_gpa = self._backing_for(guest, page)
        # In Linux-as-L1 the move unmaps the leaf and the next fault instantiates a new one;
        # the model installs that leaf now, so it gets what instantiate gives: C iff writable.
        new_pte = (leaf[1] & ~f.PTE_RPN_MASK & ~f.PTE_C) | new_gpa | (f.PTE_C if leaf_c(leaf[1]) else 0)
        if guest.data:
            return True, self._migrate_page(guest, page, leaf[0], old_gpa, new_gpa, new_pte)
        self._free_backing(guest, page, old_gpa)
        self.mem.write_u64(leaf[0], new_pte)
        return True, self._leaf_changed_flush(guest, addr)

    # ---------------------------------------------------------------- data guests: moving pages
    def _migrate_page(self, guest: L2Guest, page: int, leaf_addr: int, old_gpa: int, new_gpa: int, new_pte: int) -> list[Hcall]:
        """migrate_pages as Linux-as-L1 does it: replace the leaf by a migration entry and
        flush (no vCPU can write the old page any more), copy, then install the new leaf.
        A fault on the page meanwhile waits (the page is busy)."""
        self.mem.write_u64(leaf_addr, 0)
        guest.busy.add(page)
        addr = page << guest.page_shift

        def finish() -> None:
            guest.busy.discard(page)
            self._free_backing(guest, page, old_gpa)
            if self.guests.get(guest.lpid) is guest and guest.backing.get(page) == new_gpa:
                self.mem.write_u64(leaf_addr, new_pte)
            self._count("pages_migrated")

        return [self._flush_page_hcall(guest.lpid, addr, guest.page_shift), CopyL1Pages(new_gpa, old_gpa, guest.page_size), L1Step(_once(finish))]

    def _fault_in(self, guest: L2Guest, n_gpa: int, writing: bool) -> list[Hcall]:
        """instantiate, except that a data guest's brand-new page is cleared first (the page
        L1 hands out may have held another page's bytes): clear it, then the leaf."""
        page = n_gpa >> guest.page_shift
        r = guest.region_at(page << guest.page_shift)
        if not guest.data or page in guest.backing or (r is not None and r.kind != "protect"):
            self.instantiate(guest, n_gpa, writing)
            return []
        new_gpa = self._backing_for(guest, page)
        guest.busy.add(page)
        perms = self._page_perms(guest, page)
        pte = f.make_pte(new_gpa, perms, r=True, c=leaf_c(perms))
        leaf_addr = self._leaf_slot(guest, page << guest.page_shift)

        def finish() -> None:
            guest.busy.discard(page)
            if self.guests.get(guest.lpid) is guest and guest.backing.get(page) == new_gpa:
                self.mem.write_u64(leaf_addr, pte)
                self._count("leaves_instantiated")

        return [CopyL1Pages(new_gpa, 0, guest.page_size, zero=True), L1Step(_once(finish))]

    def _swap_out(self, guest: L2Guest, page: int, l1_gpa: int) -> list[Hcall]:
        """The leaf is already cleared: flush, copy the page to a swap slot, free the page."""
        slot = self.alloc.alloc(guest.page_size)
        guest.swap[page] = slot
        guest.busy.add(page)

        def finish() -> None:
            guest.busy.discard(page)
            self._free_backing(guest, page, l1_gpa)
            self._count("pages_swapped_out")

        return [
            self._flush_page_hcall(guest.lpid, page << guest.page_shift, guest.page_shift),
            CopyL1Pages(slot, l1_gpa, guest.page_size),
            L1Step(_once(finish)),
        ]

    def _swap_in(self, guest: L2Guest, page: int, writing: bool) -> list[Hcall]:
        """A fault on a swapped-out page: a new page, copy the slot into it, then the leaf."""
        slot = guest.swap.pop(page)
        new_gpa = self._backing_for(guest, page)
        guest.busy.add(page)
        n_gpa = page << guest.page_shift
        perms = self._page_perms(guest, page)
        pte = f.make_pte(new_gpa, perms, r=True, c=leaf_c(perms))
        leaf_addr = self._leaf_slot(guest, n_gpa)

        def finish() -> None:
            guest.busy.discard(page)
            self.alloc.free(slot)
            if self.guests.get(guest.lpid) is guest and guest.backing.get(page) == new_gpa:
                self.mem.write_u64(leaf_addr, pte)
            self._count("pages_swapped_in")

        return [CopyL1Pages(new_gpa, slot, guest.page_size), L1Step(_once(finish))]

    # ---------------------------------------------------------------- reflected exits
    def handle_exit(self, l1_lpid: int, vcpu_id: int, ex: NestedExit) -> tuple[ExitReply, list[Hcall]]:
        """What L1 does when H_ENTER_NESTED returns with an exit of its L2 (kvmppc_handle_exit_hv
        of Linux-as-L1, for the traps L0 hands back): then it enters the L2 again."""
        self.exits_handled += 1
        guest = self.guests.get(l1_lpid)
        if guest is None:
            self._count("exit.no_guest")
            return ExitReply(ExitAction.FAILED, detail=f"L1 has no guest with lpid {l1_lpid}"), []
        hcalls: list[Hcall] = []
        if ex.trap == 0:
            # kvmhv_run_single_vcpu: trap 0 is no exit to handle (L0 emulated an MMIO access
            # of the L2 and returned H_TOO_HARD, which L1 sees as 0): RESUME_GUEST.
            self._count("exit.trap0_l0_mmio")
            reply = ExitReply(ExitAction.REENTER, detail="L0 emulated MMIO")
        elif ex.trap == f.BOOK3S_INTERRUPT_HV_DECREMENTER:
            reply = self.kvmppc_hdec_exit(ex)
        elif ex.trap == f.BOOK3S_INTERRUPT_SYSCALL:
            reply = self.kvmppc_pseries_do_hcall(ex)
        elif ex.trap in (f.BOOK3S_INTERRUPT_H_DATA_STORAGE, f.BOOK3S_INTERRUPT_H_INST_STORAGE):
            reply, hcalls = self.kvmppc_book3s_radix_page_fault(guest, vcpu_id, ex)
        else:
            self._count("exit.unknown_trap")
            reply = ExitReply(ExitAction.FAILED, detail=f"L1 does not handle trap {ex.trap:#x}")
        if reply.action is not ExitAction.FAILED:
            # Handled (fixed, injected, emulated): L1 enters its L2 again, one H_ENTER_NESTED
            # per entry.  A failure goes to L1's userspace and the vCPU stops.
            self._count("hcall.H_ENTER_NESTED")
        return reply, hcalls

    def kvmppc_hdec_exit(self, ex: NestedExit) -> ExitReply:
        """BOOK3S_INTERRUPT_HV_DECREMENTER: the HDEC L1 set in hdec_expiry ran out (L0 turned
        its NESTED_HV_DECREMENTER into this trap).  Nothing to fix: count, re-enter."""
        self._count("exit.hdec")
        return ExitReply(ExitAction.REENTER, detail="HDEC expired")

    def kvmppc_pseries_do_hcall(self, ex: NestedExit) -> ExitReply:
        """BOOK3S_INTERRUPT_SYSCALL: an hcall of the L2, reflected by L0 (it handles only
        H_RPT_INVALIDATE itself).  H_PUT_TERM_CHAR is not an in-kernel hcall of Linux-as-L1:
        it returns to L1's userspace (QEMU writes the character), which runs the vCPU again."""
        req = ex.gpr3
        name = "H_PUT_TERM_CHAR" if req == f.H_PUT_TERM_CHAR else f"{req:#x}"
        self._count(f"exit.hcall.{name}")
        self._count("exit.hcall")
        return ExitReply(ExitAction.REENTER, detail=f"L2 hcall {name} handled by L1's userspace")

    def kvmppc_book3s_radix_page_fault(self, guest: L2Guest, vcpu_id: int, ex: NestedExit) -> tuple[ExitReply, list[Hcall]]:
        """An HDSI/HISI of the L2 that L0 reflected, handled as Linux-as-L1's
        ``kvmppc_book3s_radix_page_fault`` does for its own guest, in the kernel's order."""
        dsisr = ex.hdsisr
        ea = ex.hdar
        writing = bool(dsisr & f.DSISR_ISSTORE)
        # Unusual errors first: an unusable tree is -EFAULT out of L1's run loop; a bad access
        # is reflected to the L2 as a DSI.
        if dsisr & f.DSISR_UNSUPP_MMU:
            self._count("exit.bad_tree")
            return ExitReply(ExitAction.FAILED, dsisr, "L1's tree for this guest is unusable"), []
        if dsisr & f.DSISR_BADACCESS:
            self._count("exit.badaccess")
            return ExitReply(ExitAction.INJECT_STORAGE_INTERRUPT, dsisr, "bad access: DSI queued for L2"), []
        # The L2 real address: ASDR's page; the byte offset from HDAR unless the fault was on
        # a table entry (PRTABLE_FAULT: ASDR is that entry's address, the EA is elsewhere).
        n_gpa = ex.asdr & ~0xFFF & ~(0xF << 60) & f.U64
        if dsisr & f.DSISR_PRTABLE_FAULT:
            self._count("exit.prtable_fault")
        else:
            n_gpa |= ea & 0xFFF
        if n_gpa >= guest.memory:
            # No memslot of the L2 there.  A fault on a table entry (or a bad access, or R/C
            # on nothing) is a bad address in the guest's tree: DSI.  Else emulated MMIO.
            if dsisr & (f.DSISR_PRTABLE_FAULT | f.DSISR_BADACCESS | f.DSISR_SET_RC):
                self._count("exit.no_memslot_dsi")
                return ExitReply(ExitAction.INJECT_STORAGE_INTERRUPT, dsisr, f"no memslot at L2 address {n_gpa:#x}: DSI queued for L2"), []
            return self.kvmppc_hv_emulate_mmio(guest, vcpu_id, n_gpa, ex)
        page = n_gpa >> guest.page_shift
        r = guest.region_at(n_gpa)
        if writing and r is not None and r.kind == "rom":
            # KVM_MEM_READONLY and a store: give the guest a DSI, instantiate nothing.
            self._count("exit.rom_store")
            return ExitReply(ExitAction.INJECT_STORAGE_INTERRUPT, f.DSISR_ISSTORE | f.DSISR_PROTFAULT, "store to a read-only memslot of the L2"), []
        leaf = self._read_leaf(guest, page << guest.page_shift)
        perms = self._page_perms(guest, page)
        if leaf is None and page in guest.busy:
            # A migration entry: the page is being copied; the fault retries after it.
            self._count("exit.page_busy")
            return ExitReply(ExitAction.REENTER), []
        if leaf is None and page in guest.swap:
            self._count("exit.swap_in")
            return ExitReply(ExitAction.REENTER), self._swap_in(guest, page, writing and bool(perms & f.PTE_EAA_RW))
        if dsisr & (f.DSISR_NOHPTE | f.DSISR_PRTABLE_FAULT) or leaf is None:
            self._count("exit.nohpte")
            return ExitReply(ExitAction.REENTER), self._fault_in(guest, n_gpa, writing and bool(perms & f.PTE_EAA_RW))
        pte = leaf[1]
        if dsisr & (f.DSISR_PROTFAULT | f.DSISR_NOEXEC_OR_G):
            allowed = _allows(pte, ex.access)
            if allowed:
                self._count("exit.stale_protfault")
                return ExitReply(ExitAction.REENTER), []
            self._count("exit.inject")
            code = f.SRR1_ISI_N_G_OR_CIP if ex.access is Access.IFETCH else f.DSISR_PROTFAULT | (dsisr & f.DSISR_ISSTORE)
            return ExitReply(ExitAction.INJECT_STORAGE_INTERRUPT, code, "L1 maps this page without that permission"), []
        if dsisr & f.DSISR_SET_RC:
            self._count("exit.set_rc")
            bits = f.PTE_R | (f.PTE_C if writing and pte & f.PTE_EAA_RW else 0)
            self.mem.write_u64(leaf[0], pte | bits)
            return ExitReply(ExitAction.REENTER), []
        self._count("exit.other")
        return ExitReply(ExitAction.REENTER), []

    def kvmppc_hv_emulate_mmio(self, guest: L2Guest, vcpu_id: int, n_gpa: int, ex: NestedExit) -> tuple[ExitReply, list[Hcall]]:
        """MMIO in the L2's space, emulated by L1: first the instruction (kvmppc_get_last_inst
        -> kvmppc_ld -> kvmhv_load_from_eaddr), which Linux-as-L1 fetches with
        H_COPY_TOFROM_GUEST into ``vcpu->arch.last_inst``; when the hcall fails, kvmppc_ld
        falls back to its software walk (kvmppc_xlate) and kvm_read_guest."""
        self._count("exit.l1_mmio")
        # (The kernel's fast path for a store to a KVM_FAST_MMIO_BUS device, which needs no
        # instruction, is not modelled: the model has no ioeventfds.)
        # The instruction's address: the faulting PC for an HISI; for a load/store the model
        # has no PC and uses the guest's text address.  L1 strips the quadrant bits and asks
        # for PID 0 (quadrant 3, the L2 kernel).
        pc = ex.hdar if ex.access is Access.IFETCH else guest.text
        pc &= ~(0xFFF << 52) & f.U64

        def fetched(rc: int) -> None:
            if rc == f.H.SUCCESS:
                self._count("mmio.insn_copied")
                return
            # kvmhv_load_from_eaddr failed (not -EAGAIN: this vCPU is not itself nested):
            # kvmppc_ld translates in software (real mode here: raddr = EA) and reads the L2's
            # memslot; without one the instruction cannot be fetched.
            self._count("mmio.insn_fallback")
            if pc >= guest.memory:
                self._count("mmio.insn_fetch_failed")

        copy = CopyToFromGuest(guest.lpid, 0, pc, self.last_inst_addr(vcpu_id), 0, 4, fetched)
        return ExitReply(ExitAction.L1_EMULATED, detail=f"L1 emulated MMIO at L2 address {n_gpa:#x}"), [copy]


def leaf_c(perms: int) -> bool:
    """C in a leaf Linux-as-L1 builds for its L2 (kvmppc_book3s_instantiate_page): set
    whenever the leaf ends up writable (``writing || upgrade_write``), for loads too."""
    return bool(perms & f.PTE_EAA_RW)


def _collect(chunks: Iterator[tuple[int, list[Hcall]]]) -> tuple[int, list[Hcall]]:
    """Run a chunked tree op to the end: (pages changed, every hcall in order)."""
    n = 0
    hcalls: list[Hcall] = []
    for k, hs in chunks:
        n += k
        hcalls += hs
    return n, hcalls


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    """An L1Step body that does its work at most once, however often a driver calls it."""
    ran: list[bool] = []

    def run() -> None:
        if not ran:
            ran.append(True)
            fn()

    return run


def _allows(pte: int, access: Access) -> bool:
    if access is Access.STORE:
        return bool(pte & f.PTE_EAA_RW)
    if access is Access.IFETCH:
        return bool(pte & f.PTE_EAA_EXEC)
    return bool(pte & (f.PTE_EAA_READ | f.PTE_EAA_RW))


__all__ = [
    "GUEST_PAGE_SHIFTS",
    "PERM_RWX",
    "PUD_SHIFT",
    "CopyL1Pages",
    "CopyToFromGuest",
    "GuestRegion",
    "Hcall",
    "L1Hypervisor",
    "L1Step",
    "L2Guest",
    "MemslotSpec",
    "RptInvalidate",
    "SetPartitionTable",
    "TlbInvalidate",
    "default_memslots",
]

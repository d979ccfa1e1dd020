"""A deliberately simple reference model of what the nested MMU should *observably* do.

It never walks a radix tree and shares no code with the core's algorithms: it keeps plain dicts
of what each L1 *intends* (which L2 pages it maps, to which L1 real page, with which permissions
and whether L1's leaf has C) and predicts, for an L2 access at a quiescent point, which class of
outcome the access must get and -- for a fill -- the host address, as the composition of L1's
mapping and L0's backing of that L1 page.

Two things are learned from the real system rather than predicted, because they are allocation
decisions, not translation logic: the L1 real page L1's allocator picks for an L2 page
(``L2Guest.backing``) and the host frame L0's allocator picks for an L1 chunk (``L1Vm.backing``).

The prediction rules paraphrase semantics §3 (nested page fault) and §4 (R/C) at the level of
outcomes, ordered as the fault checks them:

1. L2 address beyond the guest's memory            -> L1_EMULATED (L1 emulates MMIO in L2 space)
2. access not allowed by L1's permissions          -> STORAGE_INTERRUPT (injected by L1)
3. store to a page in L1's read-only memslot       -> STORAGE_INTERRUPT (by L1 when it has no
   leaf, or when it sees the raw HDSI of rule 4; else by L0)
4. L1 page smaller than L0's base page             -> ERROR (-EINVAL in the kernel: livelock)
5. L1 page in an MMIO hole of L1 (region "mmio")   -> MMIO_EMULATED (by L0, H_TOO_HARD to L1)
6. otherwise                                        -> FILL

L1's leaf for a page that is not mapped is created on the first access that reaches it (any
class but 1, and not a store to a read-only page: Linux-as-L1 queues the DSI before
instantiating), or by a map, with R, and with C whenever L1 grants RW: Linux-as-L1 builds it with
``kvmppc_book3s_instantiate_page``, which sets C whenever the PTE ends up writable (``writing ||
upgrade_write``), for a load too.  A store that livelocks (rule 4) also sets C in L1's leaf: L1
handles the raw HDSI as its own fault.  A store that fills leaves C set in L1's leaf.  Protecting
a page without RW clears C; remapping it builds a new leaf (C iff writable).

Dirty logging (on L1's RAM slot): a page is dirty when an L2 store to it filled, and also when
a fill made L0 instantiate its PTE for the L1 page (no L0 PTE there since logging was turned on
or the host last unmapped it): L0 maps RAM writable on a read fault too (the host's write
upgrade), so the PTE gets C at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from nestmmu.core.effects import Outcome

READ, RW, EXEC = 0x4, 0x2, 0x1
LOAD, STORE, IFETCH = 1, 2, 3
U64 = (1 << 64) - 1


@dataclass(frozen=True)
class RefRegion:
    kind: str  # rom | mmio | protect
    start: int
    size: int
    perms: int = READ | RW | EXEC


@dataclass
class RefPage:
    l1_gpa: int  # L1 real address of the L2 page
    perms: int
    c: bool  # L1's leaf has C (R is always set on a mapped page)


@dataclass
class RefGuest:
    lpid: int
    page_shift: int
    memory: int
    regions: list[RefRegion]
    pages: dict[int, RefPage] = field(default_factory=dict)  # L2 page number -> mapping
    perms: dict[int, int] = field(default_factory=dict)  # protect overrides, kept across unmap
    entered: bool = False  # an H_ENTER_NESTED created L0's nested guest

    @property
    def page_size(self) -> int:
        return 1 << self.page_shift

    @property
    def npages(self) -> int:
        return self.memory >> self.page_shift

    def region_at(self, addr: int) -> RefRegion | None:
        for r in self.regions:
            if r.start <= addr < r.start + r.size:
                return r
        return None

    def page_perms(self, page: int) -> int:
        if page in self.perms:
            return self.perms[page]
        r = self.region_at(page << self.page_shift)
        if r is None:
            return READ | RW | EXEC
        if r.kind == "rom":
            return READ | EXEC | (r.perms & RW)
        return r.perms


@dataclass(frozen=True)
class RefMemslot:
    base: int
    size: int
    read_only: bool
    backing_shift: int


@dataclass
class RefL1:
    name: str
    memslots: list[RefMemslot]
    guests: dict[int, RefGuest] = field(default_factory=dict)
    dirty_logging: bool = False  # on memslot 0
    stored: set[int] = field(default_factory=set)  # L0-page-aligned L1 addresses dirtied
    # L0-page-aligned L1 addresses of memslot 0 that L0's table maps (tracked while logging:
    # turning logging on flushes the slot, and L0 then maps base pages only).
    l0_mapped: set[int] = field(default_factory=set)

    def memslot_for(self, gpa: int) -> RefMemslot | None:
        for s in self.memslots:
            if s.base <= gpa < s.base + s.size:
                return s
        return None


def allows(perms: int, kind: int) -> bool:
    if kind == STORE:
        return bool(perms & RW)
    if kind == IFETCH:
        return bool(perms & EXEC)
    return bool(perms & (READ | RW))


class Reference:
    """Per L1: its guests' intended mappings; per L1 page: the host frame (learned)."""

    def __init__(self, l0_page_shift: int) -> None:
        self.l0_page_shift = l0_page_shift
        self.l1s: dict[str, RefL1] = {}

    # ------------------------------------------------------------------ lifecycle
    def add_l1(self, name: str, memslots: list[RefMemslot]) -> None:
        self.l1s[name] = RefL1(name, memslots)

    def remove_l1(self, name: str) -> None:
        del self.l1s[name]

    def create_guest(self, l1: str, lpid: int, page_shift: int, memory: int, regions: list[RefRegion]) -> None:
        self.l1s[l1].guests[lpid] = RefGuest(lpid, page_shift, memory, regions)

    def destroy_guest(self, l1: str, lpid: int) -> None:
        del self.l1s[l1].guests[lpid]

    def entered(self, l1: str, lpid: int) -> None:
        self.l1s[l1].guests[lpid].entered = True

    def expected_lpids(self) -> int:
        """L1s plus the nested guests L0 must hold (entered and not destroyed)."""
        return len(self.l1s) + sum(g.entered for r in self.l1s.values() for g in r.guests.values())

    # ------------------------------------------------------------------ predictions
    def classify(self, l1: str, lpid: int, addr: int, kind: int) -> Outcome:
        g = self.l1s[l1].guests[lpid]
        if addr >= g.memory:
            return Outcome.L1_EMULATED
        page = addr >> g.page_shift
        mapping = g.pages.get(page)
        perms = mapping.perms if mapping is not None else g.page_perms(page)
        if not allows(perms, kind):
            return Outcome.STORAGE_INTERRUPT
        r = g.region_at(addr)
        if r is not None and r.kind == "rom" and kind == STORE:
            return Outcome.STORAGE_INTERRUPT
        if g.page_shift < self.l0_page_shift:
            return Outcome.ERROR
        if r is not None and r.kind == "rom" and kind == LOAD and perms & RW and not perms & READ:
            # __kvmhv_nested_page_fault step 9: the shadow keeps _PAGE_READ only if L1's leaf
            # has it, and _PAGE_WRITE only if L0's PTE has it, which on a read-only memslot it
            # never does (no write upgrade, and step 8 instantiates again only for a store).
            # The shadow leaf then allows no load, the hardware faults again, L1's leaf allows
            # the load (RW), and the kernel resumes the guest forever: L0 gives up after
            # max_reentries (ERROR, counted as a livelock).
            return Outcome.ERROR
        if r is not None and r.kind == "mmio":
            return Outcome.MMIO_EMULATED
        return Outcome.FILL

    def l1_address(self, l1: str, lpid: int, addr: int) -> int | None:
        g = self.l1s[l1].guests[lpid]
        m = g.pages.get(addr >> g.page_shift)
        return None if m is None else m.l1_gpa + (addr & (g.page_size - 1))

    def host_address(self, l1: str, l1_addr: int, l0_backing: dict[int, tuple[int, int]]) -> int | None:
        """Compose with L0's backing: chunk of the memslot's backing size -> host frame."""
        slot = self.l1s[l1].memslot_for(l1_addr)
        if slot is None:
            return None
        shift = slot.backing_shift or self.l0_page_shift
        chunk = l1_addr & ~((1 << shift) - 1)
        got = l0_backing.get(chunk)
        if got is None:
            return None
        return got[0] + (l1_addr - chunk)

    def expected_host(self, l1: str, lpid: int, addr: int, l0_backing: dict[int, tuple[int, int]]) -> int | None:
        a = self.l1_address(l1, lpid, addr)
        return None if a is None else self.host_address(l1, a, l0_backing)

    # ------------------------------------------------------------------ what an access does to L1's intent
    def note_access(self, l1: str, lpid: int, addr: int, kind: int, outcome: Outcome, learn: Callable[[int], int]) -> None:
        """Update L1's intended leaves after an access of predicted class ``outcome``.

        ``learn(page)`` returns the L1 real page L1 backs ``page`` with (its allocator's choice).
        """
        r1 = self.l1s[l1]
        g = r1.guests[lpid]
        if outcome is Outcome.L1_EMULATED:
            return
        page = addr >> g.page_shift
        m = g.pages.get(page)
        r = g.region_at(addr)
        if m is None and kind == STORE and r is not None and r.kind == "rom":
            return  # kvmppc_book3s_radix_page_fault: read-only memslot + store = DSI, no leaf
        if m is None:
            perms = g.page_perms(page)
            m = g.pages[page] = RefPage(learn(page), perms, bool(perms & RW))
        if outcome is Outcome.ERROR and kind == STORE:
            # The livelock of an L1 page smaller than L0's: each round L1 handles the raw HDSI
            # (a store) as its own fault, and instantiating ORs C into its leaf.
            m.c = True
        if outcome is not Outcome.FILL:
            return
        a = m.l1_gpa + (addr & (g.page_size - 1))
        self.l0_fault(l1, a)
        if kind == STORE:
            m.c = True
            slot = r1.memslot_for(a)
            if r1.dirty_logging and slot is r1.memslots[0]:
                ps = self.l0_page_shift
                r1.stored.add(a >> ps << ps)

    def l0_fault(self, l1: str, l1_addr: int) -> None:
        """A nested fault reached L0's PTE for ``l1_addr``: L0 instantiates it if absent,
        writable (RAM) and therefore with C -- the page is dirty."""
        r1 = self.l1s[l1]
        if not r1.dirty_logging or r1.memslot_for(l1_addr) is not r1.memslots[0]:
            return
        ps = self.l0_page_shift
        page = l1_addr >> ps << ps
        if page not in r1.l0_mapped:
            r1.l0_mapped.add(page)
            r1.stored.add(page)

    def l0_wrote(self, l1: str, l1_addr: int) -> None:
        """L0 wrote L1 memory itself (H_COPY_TOFROM_GUEST into L1's buffer, e.g. the
        instruction Linux-as-L1 fetches for MMIO into ``vcpu->arch.last_inst``):
        ``kvm_vcpu_write_guest`` marks the page dirty while logging is on."""
        r1 = self.l1s[l1]
        if r1.dirty_logging and r1.memslot_for(l1_addr) is r1.memslots[0]:
            ps = self.l0_page_shift
            r1.stored.add(l1_addr >> ps << ps)

    def host_unmap(self, l1: str, l1_addr: int) -> None:
        """The host unmapped (or moved) the page backing ``l1_addr``: L0's PTEs in that host
        page are gone (their C, if any, went to the dirty log: already counted dirty)."""
        r1 = self.l1s[l1]
        slot = r1.memslot_for(l1_addr)
        if slot is None:
            return
        size = 1 << (slot.backing_shift or self.l0_page_shift)
        chunk = l1_addr & ~(size - 1)
        r1.l0_mapped = {p for p in r1.l0_mapped if not chunk <= p < chunk + size}

    # ------------------------------------------------------------------ L1 tree edits
    def map_pages(self, l1: str, lpid: int, n_gpa: int, length: int, learn: Callable[[int], int]) -> None:
        g = self.l1s[l1].guests[lpid]
        for page in range(n_gpa >> g.page_shift, ((n_gpa + length - 1) >> g.page_shift) + 1):
            if page not in g.pages:
                perms = g.page_perms(page)
                g.pages[page] = RefPage(learn(page), perms, bool(perms & RW))

    def unmap_pages(self, l1: str, lpid: int, n_gpa: int, length: int) -> None:
        g = self.l1s[l1].guests[lpid]
        for page in range(n_gpa >> g.page_shift, ((n_gpa + length - 1) >> g.page_shift) + 1):
            g.pages.pop(page, None)

    def protect_pages(self, l1: str, lpid: int, n_gpa: int, length: int, perms: int) -> None:
        g = self.l1s[l1].guests[lpid]
        for page in range(n_gpa >> g.page_shift, ((n_gpa + length - 1) >> g.page_shift) + 1):
            g.perms[page] = perms
            m = g.pages.get(page)
            if m is not None:
                m.perms = perms
                if not perms & RW:
                    m.c = False

    def remap_pages(self, l1: str, lpid: int, n_gpa: int, length: int, learn: Callable[[int], int]) -> None:
        g = self.l1s[l1].guests[lpid]
        for page in range(n_gpa >> g.page_shift, ((n_gpa + length - 1) >> g.page_shift) + 1):
            m = g.pages.get(page)
            if m is None:
                continue
            r = g.region_at(page << g.page_shift)
            if r is not None and r.kind != "protect":
                continue  # ROM and MMIO mappings do not move
            m.l1_gpa = learn(page)
            m.c = bool(m.perms & RW)

    # ------------------------------------------------------------------ dirty logging
    def set_dirty_logging(self, l1: str, on: bool) -> None:
        r = self.l1s[l1]
        if r.dirty_logging != on:
            r.stored = set()
            r.l0_mapped = set()  # the toggle flushed every L0 PTE of the slot
        r.dirty_logging = on

    def harvest(self, l1: str) -> set[int]:
        r = self.l1s[l1]
        out, r.stored = r.stored, set()
        return out

    # ------------------------------------------------------------------ hcall return codes
    @staticmethod
    def tlb_invalidate_rc(ric: int, prs: int, r: int, is_: int, ap: int) -> int:
        if r != 1 or prs or ric == 3 or is_ == 1 or (is_ == 0 and ric in (1, 2)):
            return -4  # H_PARAMETER
        if is_ == 0 and ap not in (0b000, 0b101, 0b001, 0b010):
            return -4
        return 0

    def rpt_invalidate_rc(self, l1: str, lpid: int, target: int, type_: int, pg_sizes: int, start: int, end: int) -> int:
        if end < start:
            return -58  # H_P5
        if not type_ & 0x1:
            return 0  # process scoped: nothing modelled to drop
        if target != 0x1:
            return -55  # H_P2
        g = self.l1s[l1].guests.get(lpid)
        if g is None or not g.entered:
            return 0
        if type_ & 0xE == 0xE or (start == 0 and end == U64):
            return 0
        if type_ & 0x2:
            return 0 if pg_sizes & 0xF else -57  # H_P4: no supported size requested
        return 0


@dataclass
class RefTwoD:
    """What the L2 OS of the 2-D guest intends: per PID, the VMA permissions of its pages
    (explicit map / protect; everything else is demand-mapped anonymous memory, RWX)."""

    lpid: int = 0
    page_size: int = 1 << 16
    live: bool = False
    perms: dict[tuple[int, int], int] = field(default_factory=dict)  # (pid, EA page) -> perms

    def expected_lpids(self) -> int:
        return 2 if self.live else 0  # the L1 and its entered guest

    def _page(self, ea: int) -> int:
        return ea & ((1 << 52) - 1) & ~(self.page_size - 1)

    def perms_of(self, pid: int, ea: int) -> int:
        return self.perms.get((pid, self._page(ea)), READ | RW | EXEC)

    def classify(self, pid: int, ea: int, kind: int) -> Outcome:
        """FILL when the VMA allows the access (the L2 OS demand-maps or sets R/C), else the
        L2 OS refuses it: the access ends with GUEST_FAULT (SIGSEGV)."""
        return Outcome.FILL if allows(self.perms_of(pid, ea), kind) else Outcome.GUEST_FAULT

    def allowed_mask(self, pid: int, ea: int) -> int:
        p = self.perms_of(pid, ea)
        return sum(1 << k for k in (LOAD, STORE, IFETCH) if allows(p, k))

    def _pages(self, ea: int, length: int) -> range:
        return range(self._page(ea), self._page(ea + length - 1) + 1, self.page_size)

    def set_perms(self, pid: int, ea: int, length: int, perms: int) -> None:
        for p in self._pages(ea, length):
            self.perms[(pid, p)] = perms

    def forget(self, pid: int, ea: int, length: int) -> None:
        for p in self._pages(ea, length):
            self.perms.pop((pid, p), None)

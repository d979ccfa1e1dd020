"""L0: the host hypervisor (Linux KVM-HV, ``book3s_hv_nested.c`` + ``book3s_64_mmu_radix.c``).

Theory of operation
-------------------
L0 owns host memory, one :class:`L1Vm` per L1 (``struct kvm``: memslots, the L1->L0
partition-scoped table, ``l1_ptcr``, the nested-guest registry, the nested rmap and
``mmu_invalidate_seq``) and one :class:`KvmNestedGuest` per L2 guest an L1 runs (shadow LPID
and ``shadow_pgtable``: L2 real -> host real).  The hardware only walks the shadow table; a miss
there is an HDSI/HISI that :meth:`L0Hypervisor.kvmhv_nested_page_fault` resolves by walking
L1's tree (an effect: L1 holds it), instantiating L1->L0 as for an L1 fault, combining
permissions, R/C and page size, and inserting a shadow leaf plus its rmap entry.

Every function is one architectural step and carries the kernel's name.  Operations that need
another level or a lock are generators yielding effects (see :mod:`.effects`).  Every removal
or downgrade of a translation appends an LPID-tagged :class:`Invalidation` to ``outbox``.

Kernel bugs are modelled correctly by default; :class:`KernelBugs` switches each back to what
the kernel does.
"""

from __future__ import annotations

import itertools
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

from . import formats as f
from .compact import RmapList
from .effects import (
    AccessResult,
    AcquireTlbLock,
    ExitAction,
    ExitReply,
    Invalidation,
    NestedExit,
    Op,
    Outcome,
    Preempt,
    ReadL1Memory,
    ReflectExit,
    ReleaseTlbLock,
    Scope,
    Translation,
    WaitHostPage,
    WalkL1Tree,
    WriteL1Memory,
)
from .formats import Access, H
from .memory import Allocator, OutOfMemory, SimMemory
from .radix import PMD_SHIFT, PUD_SHIFT, RadixTable, Slot, WalkResult, level_to_shift, shift_to_level

EAGAIN = -11
EINVAL = -22
# Bits kvmppc_create_pte allows to differ when OR-ing into an existing leaf.
PTE_BITS_MUST_MATCH = ~(f.PTE_EAA_RW | f.PTE_C | f.PTE_R) & f.U64
# The page allocator's largest order on ppc64 (MAX_PAGE_ORDER = CONFIG_ARCH_FORCE_MAX_ORDER,
# arch/powerpc/Kconfig: default 8 with PPC_64K_PAGES, 12 with 4K pages) by PAGE_SHIFT.
PPC64_MAX_PAGE_ORDER = {16: 8, 12: 12}


def kmalloc_max_size(page_shift: int) -> int:
    """KMALLOC_MAX_SIZE for a ppc64 host with this PAGE_SHIFT (include/linux/slab.h).

    KMALLOC_SHIFT_MAX = MAX_PAGE_ORDER + PAGE_SHIFT and KMALLOC_MAX_SIZE = 1 << that: the
    largest block kmalloc can hand out (larger requests go to the page allocator, which
    cannot give more than 2^MAX_PAGE_ORDER pages).  64K pages: 8 + 16; 4K pages: 12 + 12;
    both 2^24 = 16 MiB.  (Before v6.4 MAX_ORDER was exclusive, with Kconfig defaults 9 and
    13 and KMALLOC_SHIFT_MAX = MAX_ORDER + PAGE_SHIFT - 1: the same 16 MiB.)"""
    return 1 << (PPC64_MAX_PAGE_ORDER[page_shift] + page_shift)


# Not a PAPR return code: the kernel's hcall handler never returns (a KernelBugs loop).
HCALL_NEVER_RETURNS = -(1 << 31)


def kernel_int(value: int) -> int:
    """An unsigned long hcall argument passed on as a C ``int``: the low 32 bits, signed."""
    value &= 0xFFFF_FFFF
    return value - (1 << 32) if value & 0x8000_0000 else value


class ConfigError(ValueError):
    """A request that names impossible state (bad memslot, unknown L1, exhausted LPIDs)."""


@dataclass(frozen=True)
class KernelBugs:
    """Reproduce a kernel bug instead of the correct behaviour (all off by default)."""

    # §9.6: dirty harvest clears C without bumping mmu_invalidate_seq, so a nested fault that
    # sampled the L0 PTE before the harvest installs a shadow PTE with C: lost dirty page.
    dirty_harvest_no_seq_bump: bool = False
    # §9.7: kvmhv_update_nest_rmap_rc issues its tlbie with the L1-visible lpid, not the
    # shadow LPID, so TLBs keep a translation whose C bit was just cleared.
    rc_clear_tlbie_l1_lpid: bool = False
    # §9.10: kvmppc_unmap_free_pte (non-full teardown) unmaps each PTE using its frame address
    # as the guest address, so the tlbie misses the real translation.
    free_pte_tlbie_uses_hpa: bool = False
    # §9.14: for_each_nest_rmap_safe stops at a list node whose rmap value is 0 (it assumes
    # entries are non-zero), and an L1 may use lpid 0: an (lpid 0, n_gpa 0) entry that is not
    # the oldest of its gfn hides every older entry from the walk (their shadow leaves
    # survive a host unmap; dedup and R/C updates miss them; the unwalked nodes leak).
    rmap_zero_entry_ends_walk: bool = False
    # do_tlb_invalidate_nested_tlb steps ``addr += page_size`` in u64 arithmetic: a ranged
    # H_RPT_INVALIDATE whose pages reach the top of the address space wraps to 0 and, as
    # every address of its page class is then below ``end``, never ends (the L1 vCPU's hcall
    # spins in L0, invalidating the whole guest over and over).
    rpt_range_addr_wraps: bool = False


@dataclass(frozen=True)
class L0Config:
    page_shift: int = 16  # L0 PAGE_SHIFT: 16 (64K, POWER9 Linux default) or 12
    host_memory: int = 1 << 40
    nr_lpids: int = f.KVMPPC_NR_LPIDS
    max_reentries: int = 16
    # §3 step 6: an L1 page smaller than L0's makes the nested fault return -EINVAL, which ends
    # L0's run loop: H_ENTER_NESTED returns the raw HDSI to L1, L1 finds nothing to fix and
    # enters again, and the same HDSI comes back -- a livelock.  The model stops after this
    # many such rounds and reports the livelock.
    livelock_rounds: int = 4
    host_write_upgrade: bool = True  # __kvm_faultin_pfn grants writable on read faults
    bugs: KernelBugs = field(default_factory=KernelBugs)

    def __post_init__(self) -> None:
        if self.page_shift not in (12, 16):
            raise ConfigError(f"L0 page_shift must be 12 or 16, not {self.page_shift}")
        if not 2 <= self.nr_lpids <= f.KVMPPC_NR_LPIDS:
            raise ConfigError(f"nr_lpids must be in 2..{f.KVMPPC_NR_LPIDS}")
        if not 1 <= self.livelock_rounds <= self.max_reentries:
            raise ConfigError(f"livelock_rounds must be in 1..max_reentries ({self.max_reentries}), not {self.livelock_rounds}")


@dataclass
class Memslot:
    """One L1 memslot (``struct kvm_memory_slot``) with its nested rmap and dirty bitmap."""

    index: int
    base: int
    size: int
    read_only: bool = False
    backing_shift: int = 0  # host page size backing it: 0 = base page, 21 = THP, 30 = hugetlb
    dirty_logging: bool = False
    dirty: set[int] = field(default_factory=set)  # dirty base gfns
    # gfn -> nested rmap entries, packed u64s oldest first (see RmapList)
    rmap: dict[int, RmapList] = field(default_factory=dict)

    def contains(self, gpa: int) -> bool:
        return self.base <= gpa < self.base + self.size


@dataclass
class HvGuestState:
    """The fields of ``struct hv_guest_state`` that H_ENTER_NESTED checks."""

    version: int
    lpid: int
    vcpu_token: int
    transactional: bool = False


class L1Vm:
    """L0's ``struct kvm`` for one L1 guest hypervisor."""

    def __init__(self, name: str, lpid: int, memslots: list[Memslot], pgtable: RadixTable) -> None:
        self.name = name
        self.lpid = lpid  # the LPID L0 runs this L1 with
        self.memslots = memslots
        self.pgtable = pgtable  # kvm->arch.pgtable: L1 real -> host real
        self.l1_ptcr = 0
        self.nested: dict[int, KvmNestedGuest] = {}  # kvm_nested_guest_idr
        self.mmu_invalidate_seq = 0
        self.mmu_invalidate_in_progress = 0
        self.backing: dict[int, tuple[int, int]] = {}  # host chunk gpa -> (hpa, shift)
        self.thp_collapsing: set[int] = set()
        # Host pages being moved (migration entries): chunk -> (old hpa, new hpa or 0, shift).
        # Between unmapping (tlbies sent) and the tlbsync the old frame still holds the data;
        # the copy (or swap-out) happens only after every TLB dropped the old translation.
        self.moving: dict[int, tuple[int, int, int]] = {}
        # Swapped-out host pages: chunk -> written 4K chunks of the page (offset -> bytes).
        self.swap: dict[int, dict[int, bytes]] = {}
        self.released = False

    def memslot_for(self, gpa: int) -> Memslot | None:
        for slot in self.memslots:
            if slot.base <= gpa < slot.base + slot.size:
                return slot
        return None


class KvmNestedGuest:
    """``struct kvm_nested_guest``: one L2 guest of one L1, as L0 sees it."""

    def __init__(self, l1_host: L1Vm, l1_lpid: int, shadow_lpid: int, shadow_pgtable: RadixTable) -> None:
        self.l1_host = l1_host
        self.l1_lpid = l1_lpid
        self.shadow_lpid = shadow_lpid
        self.shadow_pgtable: RadixTable | None = shadow_pgtable
        self.l1_gr_to_hr = 0  # cached PATE dw0 from L1's partition table
        self.process_table = 0  # cached PATE dw1
        self.refcnt = 0
        self.freed = False
        # Allocated by kvmhv_get_nested but not yet registered: the creator's local pointer
        # (``newgp``) holds it while it reads L1's PATE (the audit counts it, not a leak).
        self.creating = False

    def __repr__(self) -> str:
        return f"<nested {self.l1_host.name} lpid={self.l1_lpid} shadow={self.shadow_lpid} ref={self.refcnt}>"


class FaultKind(Enum):
    RESUME_GUEST = 0
    RESUME_HOST = 1  # reflect the exit to L1
    INJECT_DSI = 2  # L0 gives L2 a storage interrupt directly
    MMIO = 3  # L0 emulated MMIO on L2's behalf (H_TOO_HARD to L1)
    ERROR = 4


@dataclass(frozen=True, slots=True)
class FaultResult:
    kind: FaultKind
    exit: NestedExit | None = None
    dsisr: int = 0
    detail: str = ""


RESUME_GUEST = FaultResult(FaultKind.RESUME_GUEST)


@dataclass(slots=True)
class Walk2D:
    """One 2-D hardware walk: either an exit for L0 or a finished result, and its cost.

    ``refs`` counts every memory reference the walk made: ``process_refs`` reads of L2's
    process table and tree entries, ``shadow_refs`` reads of shadow-table entries (to
    translate those entries' addresses and the final address)."""

    exit: NestedExit | None = None
    result: AccessResult | None = None
    refs: int = 0
    shadow_refs: int = 0
    process_refs: int = 0

    def count_shadow(self, n: int) -> None:
        self.refs += n
        self.shadow_refs += n

    def guest_fault(self, dsisr: int, detail: str) -> Walk2D:
        self.result = AccessResult(Outcome.GUEST_FAULT, dsisr=dsisr, detail=detail)
        return self


def _norm_perms(pte: int) -> int:
    """EAA bits with RW implying R, so two leaves' permissions combine by AND."""
    p = pte & f.PTE_PERM_MASK
    return p | f.PTE_EAA_READ if p & f.PTE_EAA_RW else p


def _process_leaf_check(pte: int, access: Access, problem_state: bool) -> int:
    """The process-scoped leaf's checks (ppc_radix64_check_prot, and R/C which POWER9 radix
    never sets itself): the DSISR/SRR1 cause, or 0 when the access may proceed."""
    if problem_state and pte & f.PTE_EAA_PRIV:
        return f.SRR1_ISI_N_G_OR_CIP if access is Access.IFETCH else f.DSISR_PROTFAULT
    if access is Access.STORE:
        if not pte & f.PTE_EAA_RW:
            return f.DSISR_PROTFAULT
    elif access is Access.IFETCH:
        if not pte & f.PTE_EAA_EXEC:
            return f.SRR1_ISI_N_G_OR_CIP
    elif not pte & (f.PTE_EAA_READ | f.PTE_EAA_RW):
        return f.DSISR_PROTFAULT
    if not pte & f.PTE_R or (access is Access.STORE and not pte & f.PTE_C):
        return f.DSISR_SET_RC
    return 0


_PATE = struct.Struct(">QQ")


class L0Hypervisor:
    """The host hypervisor: host memory, L1 VMs, nested guests, shadow tables, rmap."""

    def __init__(self, config: L0Config | None = None) -> None:
        self.config = config or L0Config()
        self.page_shift = self.config.page_shift
        self.page_size = 1 << self.page_shift
        self.bugs = self.config.bugs
        self.mem = SimMemory(self.config.host_memory)
        self.alloc = Allocator(1 << 20, self.config.host_memory)
        # The hardware partition table (PTCR): one 16-byte PATE per LPID.
        self.partition_table = self.alloc.alloc(f.KVMPPC_NR_LPIDS * f.PATE_SIZE)
        self.lpids_in_use: set[int] = set()
        self.l1s: dict[str, L1Vm] = {}
        self.owner: dict[int, tuple[str, int, int]] = {}  # host chunk -> (l1 name, gpa, shift)
        self.live_guests: set[KvmNestedGuest] = set()  # allocated, not yet freed (I7)
        self.outbox: list[Invalidation] = []
        self.stats: Counter[str] = Counter()

    # ================================================================ bookkeeping
    def take_invalidations(self) -> list[Invalidation]:
        out, self.outbox = self.outbox, []
        return out

    def kvmppc_alloc_lpid(self) -> int | None:
        """IDA over [1, nr_lpids-1], lowest free first; None when exhausted."""
        for lpid in range(1, self.config.nr_lpids):
            if lpid not in self.lpids_in_use:
                self.lpids_in_use.add(lpid)
                return lpid
        return None

    def kvmppc_free_lpid(self, lpid: int) -> None:
        self.lpids_in_use.discard(lpid)

    def set_ptbl_entry(self, lpid: int, dw0: int, dw1: int) -> None:
        """kvmhv_set_ptbl_entry: write the hardware PATE and flush everything cached for lpid."""
        self.mem.write(self.partition_table + lpid * f.PATE_SIZE, _PATE.pack(dw0, dw1))
        self.outbox.append(Invalidation(lpid, Scope.LPID, reason="pate"))

    def read_ptbl_entry(self, lpid: int) -> tuple[int, int]:
        dw0, dw1 = _PATE.unpack(self.mem.read(self.partition_table + lpid * f.PATE_SIZE, 16))
        return dw0, dw1

    def tlbie_page(self, lpid: int, gpa: int, shift: int, reason: str = "unmap") -> None:
        """kvmppc_radix_tlbie_page: RIC=0 IS=0 tlbie of one page in partition scope."""
        size = 1 << shift
        self.outbox.append(Invalidation(lpid, Scope.ADDRESS, gpa & ~(size - 1), size, reason))

    def flush_lpid(self, lpid: int, reason: str = "lpid") -> None:
        """kvmhv_flush_lpid: tlbie RIC=2 IS=2 PRS=0 for the shadow LPID."""
        self.outbox.append(Invalidation(lpid, Scope.LPID, reason=reason))

    def l1(self, name: str) -> L1Vm:
        vm = self.l1s.get(name)
        if vm is None:
            raise ConfigError(f"no L1 named {name!r} is registered")
        return vm

    # ================================================================ L1 lifecycle
    def create_l1(self, name: str, memslots: list[Memslot]) -> L1Vm:
        """An L1 boots: memslots registered, empty partition-scoped table, an LPID."""
        if not name:
            raise ConfigError("L1 name must not be empty")
        if name in self.l1s:
            raise ConfigError(f"an L1 named {name!r} is already registered")
        self._check_memslots(memslots)
        lpid = self.kvmppc_alloc_lpid()
        if lpid is None:
            raise ConfigError(f"no free LPID: all {self.config.nr_lpids - 1} LPIDs are in use")
        try:
            table = RadixTable(self.mem, self.alloc, self.page_shift)
        except OutOfMemory as e:
            self.kvmppc_free_lpid(lpid)
            raise ConfigError(f"host memory exhausted: {e}") from e
        vm = L1Vm(name, lpid, sorted(memslots, key=lambda s: s.base), table)
        self.l1s[name] = vm
        self.set_ptbl_entry(lpid, table.pate_dw0(), 0)
        self.stats["l1_created"] += 1
        return vm

    def _check_memslots(self, memslots: list[Memslot]) -> None:
        if not memslots:
            raise ConfigError("an L1 needs at least one memslot")
        ps = self.page_size
        spans = []
        for s in memslots:
            if s.size <= 0 or s.base < 0:
                raise ConfigError(f"memslot {s.index}: size must be positive and base non-negative")
            if s.base % ps or s.size % ps:
                raise ConfigError(f"memslot {s.index}: base {s.base:#x} and size {s.size:#x} must be multiples of the L0 page size {ps:#x}")
            if s.base + s.size > 1 << 52:
                raise ConfigError(f"memslot {s.index}: ends above the 52-bit real address space")
            if s.backing_shift not in (0, 21, 30):
                raise ConfigError(f"memslot {s.index}: backing_shift must be 0 (base pages), 21 or 30, not {s.backing_shift}")
            spans.append((s.base, s.base + s.size, s.index))
        spans.sort()
        for (_, e1, i1), (b2, _, i2) in itertools.pairwise(spans):
            if b2 < e1:
                raise ConfigError(f"memslots {i1} and {i2} overlap")
        if len({s.index for s in memslots}) != len(memslots):
            raise ConfigError("memslot indexes must be unique")

    def destroy_l1(self, vm: L1Vm) -> None:
        """The L1 VM is destroyed: kvmhv_release_all_nested, then its own table and memory."""
        if vm.released:
            return
        self.kvmhv_release_all_nested(vm)
        for gp in [g for g in self.live_guests if g.l1_host is vm]:
            # Still referenced by a vCPU that never exited: the L1 is gone, so is it.
            self.stats["nested_guests_forced_free"] += 1
            gp.refcnt = 0
            self.kvmhv_release_nested(gp)
        vm.pgtable.free_below(vm.pgtable.root, 3)
        vm.pgtable.free_table(vm.pgtable.root, 3)
        for chunk, (hpa, shift) in list(vm.backing.items()):
            self._free_backing(vm, chunk, hpa, shift)
        for old, new, shift in vm.moving.values():
            self._free_frame(old, shift)
            if new:
                self.alloc.free(new, 1 << shift)
        vm.moving.clear()
        vm.swap.clear()
        self.set_ptbl_entry(vm.lpid, 0, 0)
        self.kvmppc_free_lpid(vm.lpid)
        vm.released = True
        del self.l1s[vm.name]
        self.stats["l1_destroyed"] += 1

    # ================================================================ host backing (hva side)
    def _backing_shift(self, slot: Memslot) -> int:
        return slot.backing_shift or self.page_shift

    def host_faultin(self, vm: L1Vm, slot: Memslot, gpa: int) -> tuple[int, int]:
        """__kvm_faultin_pfn: the host page backing gpa, faulting it in: (hpa of page, shift)."""
        shift = self._backing_shift(slot)
        chunk = gpa & ~((1 << shift) - 1)
        got = vm.backing.get(chunk)
        if got is None:
            hpa = self.alloc.alloc(1 << shift)
            vm.backing[chunk] = got = (hpa, shift)
            self.owner[hpa] = (vm.name, chunk, shift)
            self.stats["host_pages_faulted_in"] += 1
            snap = vm.swap.pop(chunk, None)
            if snap is not None:  # swap-in: the page's contents come back (in a new frame)
                self.mem.restore(hpa, snap)
                self.stats["host_pages_swapped_in"] += 1
        return got

    def _free_backing(self, vm: L1Vm, chunk: int, hpa: int, shift: int) -> None:
        del vm.backing[chunk]
        self._free_frame(hpa, shift)

    def _free_frame(self, hpa: int, shift: int) -> None:
        """Free a data frame; its bytes are cleared (the next owner gets a zeroed page)."""
        del self.owner[hpa]
        self.mem.zero(hpa, 1 << shift)
        self.alloc.free(hpa, 1 << shift)

    def _moving_chunk(self, vm: L1Vm, memslot: Memslot, gpa: int) -> int | None:
        if not vm.moving:
            return None
        chunk = gpa & ~((1 << self._backing_shift(memslot)) - 1)
        return chunk if chunk in vm.moving else None

    # ================================================================ data (data mode)
    def data_load(self, hpa: int) -> int:
        """An L2 load reaching memory at the host address its TLB (or the fill) gave.

        A frame no L1 owns any more (freed after a migration or swap-out) reads as zero: the
        model never lets a stale translation read L0's own tables."""
        if self.host_owner_of(hpa) is None:
            self.stats["data_stray_loads"] += 1
            return 0
        return self.mem.read_u64(hpa & ~7)

    def data_store(self, hpa: int, value: int) -> None:
        """An L2 store reaching memory.  A store to a frame that no longer backs any L1 page
        (a translation kept past its tlbie) is dropped and counted: that write is lost."""
        if self.host_owner_of(hpa) is None:
            self.stats["data_stray_stores"] += 1
            return
        self.mem.write_u64(hpa & ~7, value & f.U64)

    def data_access(self, hpa: int, kind: int, value: int) -> int:
        """One data-mode access at a host address: a store writes ``value``; a load (or an
        instruction fetch) returns the doubleword there."""
        if kind == Access.STORE:
            self.data_store(hpa, value)
            return 0
        return self.data_load(hpa)

    def l1_frame(self, vm: L1Vm, gpa: int, writing: bool) -> int | None:
        """The host address behind L1 real address gpa for L1's own access (its CPU through
        L0's partition-scoped table), faulting the host page in; None without a memslot or
        when storing to a read-only one.  A page being moved still has its old frame."""
        memslot = vm.memslot_for(gpa)
        if memslot is None or (writing and memslot.read_only):
            return None
        shift = self._backing_shift(memslot)
        chunk = gpa & ~((1 << shift) - 1)
        moving = vm.moving.get(chunk)
        hpa = moving[0] if moving is not None else self.host_faultin(vm, memslot, gpa)[0]
        if writing and memslot.dirty_logging:
            # L1's own store dirties the page as its CPU would (C in L0's PTE for it).
            self._mark_dirty(memslot, gpa & ~(self.page_size - 1), self.page_size)
        return hpa + (gpa - chunk)

    def l1_copy_memory(self, vm: L1Vm, dst: int, src: int, length: int) -> int:
        """L1 copies one of its pages to another (Linux-as-L1's migrate_pages / swap copy):
        its memcpy runs on host frames, so L0 moves the bytes.  Page aligned, whole pages."""
        if length <= 0 or (dst | src | length) & 0xFFF:
            return H.PARAMETER
        off = 0
        while off < length:
            s = self.l1_frame(vm, src + off, writing=False)
            d = self.l1_frame(vm, dst + off, writing=True)
            if s is None or d is None:
                return H.PARAMETER
            # Up to the end of whichever host page (base page or larger) ends first.
            step = min(length - off, self._host_room(vm, src + off), self._host_room(vm, dst + off))
            self.mem.copy(d, s, step)
            off += step
        self.stats["l1_bytes_copied"] += length
        return H.SUCCESS

    def l1_zero_memory(self, vm: L1Vm, dst: int, length: int) -> int:
        """L1 clears pages of its own memory (clear_page of a page it hands to an L2)."""
        if length <= 0 or (dst | length) & 0xFFF:
            return H.PARAMETER
        off = 0
        while off < length:
            d = self.l1_frame(vm, dst + off, writing=True)
            if d is None:
                return H.PARAMETER
            step = min(length - off, self._host_room(vm, dst + off))
            self.mem.zero(d, step)
            off += step
        self.stats["l1_bytes_zeroed"] += length
        return H.SUCCESS

    def _host_room(self, vm: L1Vm, gpa: int) -> int:
        memslot = vm.memslot_for(gpa)
        assert memslot is not None
        size = 1 << self._backing_shift(memslot)
        return size - (gpa & (size - 1))

    def host_owner_of(self, hpa: int) -> tuple[str, int] | None:
        """Which L1 owns host address hpa, and the L1 real address it backs."""
        for shift in (12, 16, 21, 30):
            got = self.owner.get(hpa & ~((1 << shift) - 1))
            if got is not None and got[2] == shift:
                return got[0], got[1] + (hpa & ((1 << shift) - 1))
        return None

    # ================================================================ hcalls
    def h_set_partition_table(self, vm: L1Vm, ptcr: int) -> int:
        """H_SET_PARTITION_TABLE: limit to 4096 entries and a visible base gfn; no flush."""
        ptcr &= f.U64
        if (ptcr & f.PRTS_MASK) + 12 - 4 > f.KVM_MAX_NESTED_GUESTS_SHIFT:
            return H.PARAMETER
        if vm.memslot_for(ptcr & f.PRTB_MASK) is None:
            return H.PARAMETER
        vm.l1_ptcr = ptcr
        self.stats["hcall.H_SET_PARTITION_TABLE"] += 1
        return H.SUCCESS

    def h_enter_nested(self, vm: L1Vm, state: HvGuestState) -> Op[tuple[int, KvmNestedGuest | None]]:
        """H_ENTER_NESTED's checks and nested guest lookup/creation; takes a reference."""
        self.stats["hcall.H_ENTER_NESTED"] += 1
        if vm.l1_ptcr == 0:
            return H.NOT_AVAILABLE, None
        if state.transactional:
            return H.BAD_MODE, None
        if state.version not in (1, 2):
            return H.PARAMETER, None
        if not 0 <= state.vcpu_token < f.NR_CPUS:
            return H.PARAMETER, None
        gp = yield from self.kvmhv_get_nested(vm, state.lpid, create=True)
        if gp is None:
            return H.PARAMETER, None
        if not gp.l1_gr_to_hr:
            yield AcquireTlbLock(gp)
            yield from self.kvmhv_update_ptbl_cache(gp)
            yield ReleaseTlbLock(gp)
        return H.SUCCESS, gp

    def h_tlb_invalidate(self, vm: L1Vm, instr: int, rs: int, rb: int) -> Op[int]:
        """H_TLB_INVALIDATE: kvmhv_emulate_priv_tlbie on an L1-built tlbie image."""
        self.stats["hcall.H_TLB_INVALIDATE"] += 1
        t = f.TlbieInstr.decode(instr, rs, rb)
        # r != 1: radix only; prs: not HV privileged; ric 3: reserved; is 1: PID scope;
        # is 0 with ric 1/2: not in the ISA.
        if not t.r or t.prs or t.ric == 3 or t.is_ == 1 or (t.is_ == 0 and t.ric in (1, 2)):
            return H.PARAMETER
        if t.is_ == f.IS_VA:
            if t.ap not in f.AP_TO_SHIFT:
                return H.PARAMETER
            yield from self.kvmhv_emulate_tlbie_tlb_addr(vm, t.lpid, t.ap, t.epn >> 12)
        elif t.is_ == f.IS_LPID:
            yield from self.kvmhv_emulate_tlbie_lpid(vm, t.lpid, t.ric)
        else:
            yield from self.kvmhv_emulate_tlbie_all_lpid(vm, t.ric)
        return H.SUCCESS

    def h_rpt_invalidate(self, vm: L1Vm, id_: int, target: int, type_: int, pg_sizes: int, start: int, end: int) -> Op[int]:
        """H_RPT_INVALIDATE (partition scope with NESTED; process scope is not modelled)."""
        self.stats["hcall.H_RPT_INVALIDATE"] += 1
        start &= f.U64
        end &= f.U64
        pg_sizes &= f.U64
        if end < start:
            return H.P5
        if not type_ & f.H_RPTI_TYPE_NESTED:
            # Process-scoped flush of PID id in L1's own LPID: L1's process-scoped
            # translations are not modelled, so there is nothing cached to drop.
            self.stats["rpt.process_scoped"] += 1
            return H.SUCCESS
        if target != f.H_RPTI_TARGET_CMMU:
            return H.P2
        return (yield from self.do_h_rpt_invalidate_pat(vm, id_, type_, pg_sizes, start, end))

    def kvmppc_nested_h_rpt_invalidate(self, gp: KvmNestedGuest, pid: int, type_: int, pg_sizes: int, start: int, end: int) -> int | None:
        """H_RPT_INVALIDATE issued by an L2 (book3s_hv.c kvmppc_nested_h_rpt_invalidate, from
        the nested exit): a process-scoped request (no NESTED bit, what a pseries L2 without
        GTSE issues for its own trees) is done by L0 for the L2's shadow LPID and returns
        H_SUCCESS to L2; a NESTED one is not L0's: None = the exit goes to L1 (RESUME_HOST)."""
        if type_ & f.H_RPTI_TYPE_NESTED:
            return None
        self.stats["hcall.L2_H_RPT_INVALIDATE"] += 1
        self.do_h_rpt_invalidate_prt(pid, gp.shadow_lpid, type_, pg_sizes & f.U64, start & f.U64, end & f.U64)
        return H.SUCCESS

    def do_h_rpt_invalidate_prt(self, pid: int, lpid: int, type_: int, pg_sizes: int, start: int, end: int) -> None:
        """radix_tlb.c do_h_rpt_invalidate_prt: process-scoped tlbies of (LPID, PID).

        TLB|PWC|PRT -> one RIC=2 PID flush; PWC -> a RIC=1 PID flush (no page-walk cache is
        modelled: nothing to drop); the full range -> RIC=0 PID flush; else, per requested
        page size ascending, a PID flush past the ceiling or one tlbie per page."""
        if type_ & f.H_RPTI_TYPE_ALL == f.H_RPTI_TYPE_ALL:
            self.outbox.append(Invalidation(lpid, Scope.PID, reason="rpt_prt_all", prs=True, pid=pid))
            return
        if type_ & f.H_RPTI_TYPE_PWC:
            self.stats["rpt.prt_pwc"] += 1
        if start == 0 and end == f.U64:
            self.outbox.append(Invalidation(lpid, Scope.PID, reason="rpt_prt_pid", prs=True, pid=pid))
            return
        for bit, shift in f.RPTI_PAGE_BIT_TO_SHIFT:
            if not pg_sizes & bit:
                continue
            if (end - start) >> shift > f.TLB_RANGE_FLUSH_PAGE_CEILING:
                self.outbox.append(Invalidation(lpid, Scope.PID, reason="rpt_prt_ceiling", prs=True, pid=pid))
                return
            addr = start
            while addr < end:
                self.outbox.append(Invalidation(lpid, Scope.ADDRESS, addr, 1 << shift, "rpt_prt_va", prs=True, pid=pid))
                addr += 1 << shift

    def do_h_rpt_invalidate_pat(self, vm: L1Vm, id_: int, type_: int, pg_sizes: int, start: int, end: int) -> Op[int]:
        # The id arrives as an unsigned long but every function it reaches (__find_nested,
        # kvmhv_get_nested, kvmhv_emulate_tlbie_tlb_addr) takes an int lpid: the high 32 bits
        # are dropped and a set bit 31 makes it negative (no such guest).
        lpid = kernel_int(id_)
        # An unknown LPID succeeds: L1 flushes when it writes a PATE, before H_ENTER_NESTED.
        if lpid not in vm.nested:
            self.stats["rpt.unknown_lpid"] += 1
            return H.SUCCESS
        if type_ & f.H_RPTI_TYPE_NESTED_ALL == f.H_RPTI_TYPE_NESTED_ALL:
            yield from self.kvmhv_emulate_tlbie_lpid(vm, lpid, f.RIC_ALL)
            return H.SUCCESS
        if start == 0 and end == f.U64:
            # Quirk §9.9: even a PWC-only full-range request frees the whole shadow tree.
            yield from self.kvmhv_emulate_tlbie_lpid(vm, lpid, f.RIC_TLB)
            return H.SUCCESS
        if type_ & f.H_RPTI_TYPE_TLB:
            ret = H.P4
            for bit, shift in f.RPTI_PAGE_BIT_TO_SHIFT:
                if not pg_sizes & bit:
                    continue
                nr_pages = (end - start) >> shift
                if nr_pages > f.TLB_RANGE_FLUSH_PAGE_CEILING:
                    self.stats["rpt.ceiling_escalations"] += 1
                    yield from self.kvmhv_emulate_tlbie_lpid(vm, lpid, f.RIC_TLB)
                    return H.SUCCESS
                addr = start
                while True:
                    yield from self.kvmhv_emulate_tlbie_tlb_addr(vm, lpid, f.SHIFT_TO_AP[shift], addr >> 12)
                    addr += 1 << shift
                    if addr > f.U64:
                        # The u64 addition wrapped: the range reached the top of the space.
                        if not self.bugs.rpt_range_addr_wraps:
                            break  # correct: nothing lies above the top
                        return (yield from self._rpt_wrapped_loop(vm, lpid))
                    if addr >= end:
                        break
                ret = H.SUCCESS
            return ret
        return H.SUCCESS

    def _rpt_wrapped_loop(self, vm: L1Vm, lpid: int) -> Op[int]:
        """KernelBugs.rpt_range_addr_wraps: addr wrapped to below ``end`` and stays there (all
        its page class lies below ``end``), so do_tlb_invalidate_nested_tlb never returns.  Its
        endless sweep invalidates every shadow leaf of the guest; the model does one sweep
        and answers HCALL_NEVER_RETURNS (the L1 vCPU would be stuck in the hcall)."""
        self.stats["rpt.addr_wrap_never_returns"] += 1
        gp = yield from self.kvmhv_get_nested(vm, lpid, create=False)
        if gp is not None:
            yield AcquireTlbLock(gp)
            table = gp.shadow_pgtable
            if table is not None:
                for slot in list(table.leaves()):
                    self.kvmppc_unmap_pte(vm, table, slot.addr, slot.pte, slot.gpa, slot.shift, gp.shadow_lpid)
            yield ReleaseTlbLock(gp)
            self.kvmhv_put_nested(gp)
        return HCALL_NEVER_RETURNS

    def h_copy_tofrom_guest(self, vm: L1Vm, lpid: int, pid: int, eaddr: int, to_gpa: int, from_gpa: int, n: int) -> Op[int]:
        """H_COPY_TOFROM_GUEST: a quadrant access through the *shadow* table, faults disabled.

        ``eaddr`` is an effective address of ``pid`` in the L2: L0 reaches it with quadrant 1
        (PID = pid) or 2 (PID 0), so the hardware walks L2's process table and tree, every
        read and the final address translated through the shadow table
        (:meth:`kvmhv_quadrant_xlate`).  The L2 side is the host frame that gives (where L2's
        stores land); the L1 side (``to_gpa``/``from_gpa``) is L1's own memory.  Everything on
        the L2 side must be faulted in already.
        """
        self.stats["hcall.H_COPY_TOFROM_GUEST"] += 1
        is_load = to_gpa != 0
        if to_gpa and from_gpa:
            return H.PARAMETER
        if eaddr & (0xFFF << 52):
            return H.PARAMETER
        # kzalloc(n, GFP_KERNEL | __GFP_NOWARN) fails above KMALLOC_MAX_SIZE.
        if n < 0 or n > kmalloc_max_size(self.page_shift):
            return H.NO_MEM
        gp = yield from self.kvmhv_get_nested(vm, lpid, create=False)
        if gp is None:
            return H.PARAMETER
        yield AcquireTlbLock(gp)
        rc: int = H.SUCCESS
        # As kvmhv_copy_tofrom_guest_nested: a load copies all of L2 into a buffer and writes
        # L1's buffer only if that fully succeeded; a store reads all of L1's buffer first.
        buf = b""
        if not is_load:
            got = yield ReadL1Memory(vm, from_gpa, n)
            if got is None:
                rc = H.NOT_FOUND
            buf = got or b""
        done = 0
        parts: list[bytes] = []
        while rc == H.SUCCESS and done < n:
            ea = eaddr + done
            got = self.kvmhv_quadrant_xlate(gp, pid, ea, Access.LOAD if is_load else Access.STORE)
            owner = None if got is None else self.host_owner_of(got[0])
            if got is None or owner is None or owner[0] != vm.name:
                rc = H.NOT_FOUND  # short quadrant copy (faults are disabled)
                break
            hpa, shift = got
            chunk = min(n - done, (1 << shift) - (ea & ((1 << shift) - 1)))
            # The quadrant access goes through the shadow translation to the host frame.
            if is_load:
                parts.append(self.mem.read(hpa, chunk))
            else:
                self.mem.write(hpa, buf[done : done + chunk])
            done += chunk
        if is_load and rc == H.SUCCESS and n:
            ok = yield WriteL1Memory(vm, to_gpa, b"".join(parts))
            if not ok:
                rc = H.NOT_FOUND
            else:
                self.mark_page_dirty(vm, to_gpa, n)
        yield ReleaseTlbLock(gp)
        self.kvmhv_put_nested(gp)
        return rc

    def mark_page_dirty(self, vm: L1Vm, gpa: int, n: int) -> None:
        """kvm_vcpu_write_guest -> mark_page_dirty_in_slot: L0 wrote ``n`` bytes of L1 memory
        at ``gpa`` itself (not through L1's partition-scoped table, so no C bit records it):
        each base page written goes into its memslot's dirty log when logging is on."""
        ps = self.page_size
        for page in range(gpa & ~(ps - 1), gpa + n, ps):
            memslot = vm.memslot_for(page)
            if memslot is not None and memslot.dirty_logging:
                memslot.dirty.add(page >> self.page_shift)
                self.stats["dirty_marked_by_l0_write"] += 1

    def kvmhv_quadrant_xlate(self, gp: KvmNestedGuest, pid: int, eaddr: int, access: Access) -> tuple[int, int] | None:
        """__kvmhv_copy_tofrom_guest_radix's translation: quadrant 1 if pid != 0 else 2, with
        LPIDR = the shadow LPID and page faults disabled, so any fault (process or partition
        scoped) is a short copy.  Returns (host address, size shift of the translation).

        Model convention: an L2 that never registered a process table (PATE dw1 PRTB = 0) is
        a real-mode guest whose effective addresses are its real addresses; its ``eaddr`` goes
        through the shadow table alone, as before the 2-D walk was modelled."""
        _, dw1 = self.read_ptbl_entry(gp.shadow_lpid)
        if not f.pate_prtb(dw1):
            slot, dsisr, _ = self.hw_translate(gp, eaddr, access)
            if slot is None or dsisr:
                return None
            return (slot.pte & f.PTE_RPN_MASK) + (eaddr & ((1 << slot.shift) - 1)), slot.shift
        self.stats["quadrant_walks"] += 1
        w = self.radix_2d_translate(gp, eaddr, access, pid, hv_quadrant=True)
        if w.result is None or w.result.outcome is not Outcome.FILL or w.result.translation is None:
            return None
        t = w.result.translation
        return t.host + (eaddr - t.page), t.shift

    # ================================================================ nested guest registry
    def kvmhv_update_ptbl_cache(self, gp: KvmNestedGuest) -> Op[None]:
        """Re-read the L2's PATE from L1's partition table; rewrite the shadow PATE."""
        vm = gp.l1_host
        ptcr = vm.l1_ptcr
        data = None
        if gp.l1_lpid < 1 << ((ptcr & f.PRTS_MASK) + 12 - 4):
            data = yield ReadL1Memory(vm, (ptcr & f.PRTB_MASK) + (gp.l1_lpid << 4), 16)
        if data is None or len(data) != 16:
            gp.l1_gr_to_hr = 0
            gp.process_table = 0
        else:
            gp.l1_gr_to_hr, gp.process_table = _PATE.unpack(data)
        self.kvmhv_set_nested_ptbl(gp)

    def kvmhv_set_nested_ptbl(self, gp: KvmNestedGuest) -> None:
        """Shadow PATE: dw0 = HR | RTS(52) | shadow root | 13; dw1 = L1's dw1 verbatim."""
        assert gp.shadow_pgtable is not None
        self.set_ptbl_entry(gp.shadow_lpid, gp.shadow_pgtable.pate_dw0(), gp.process_table)

    def kvmhv_alloc_nested(self, vm: L1Vm, l1_lpid: int) -> Op[KvmNestedGuest | None]:
        shadow_lpid = self.kvmppc_alloc_lpid()
        if shadow_lpid is None:
            self.stats["lpid_exhausted"] += 1
            return None
        try:
            table = RadixTable(self.mem, self.alloc, self.page_shift)
        except OutOfMemory:
            self.kvmppc_free_lpid(shadow_lpid)
            return None
        gp = KvmNestedGuest(vm, l1_lpid, shadow_lpid, table)
        self.live_guests.add(gp)
        gp.creating = True
        try:
            yield from self.kvmhv_update_ptbl_cache(gp)
        except GeneratorExit:
            # The hcall was abandoned while L1 was being read (its caller went away): nothing
            # will register this guest, so free it as the kernel frees an unused ``newgp``.
            gp.creating = False
            self.kvmhv_release_nested(gp)
            raise
        return gp

    def kvmhv_get_nested(self, vm: L1Vm, l1_lpid: int, create: bool) -> Op[KvmNestedGuest | None]:
        """Find (and reference) or create the nested guest for L1's lpid."""
        if l1_lpid < 0 or l1_lpid >= 1 << ((vm.l1_ptcr & f.PRTS_MASK) + 12 - 4):
            return None
        gp = vm.nested.get(l1_lpid)
        if gp is not None:
            gp.refcnt += 1
            return gp
        if not create or vm.released:
            return None
        newgp = yield from self.kvmhv_alloc_nested(vm, l1_lpid)
        if newgp is None:
            return None
        # __prealloc_nested: the IDR slot must be free; a concurrent creator that got there
        # first makes us fail (§9.15).
        newgp.creating = False
        if l1_lpid in vm.nested or vm.released:
            self.kvmhv_release_nested(newgp)
            self.stats["nested_create_lost_race"] += 1
            return None
        vm.nested[l1_lpid] = newgp
        newgp.refcnt += 2  # registry + caller
        self.stats["nested_guests_created"] += 1
        return newgp

    def kvmhv_put_nested(self, gp: KvmNestedGuest) -> None:
        gp.refcnt -= 1
        if gp.refcnt == 0:
            self.kvmhv_release_nested(gp)

    def kvmhv_remove_nested(self, gp: KvmNestedGuest) -> None:
        vm = gp.l1_host
        if vm.nested.get(gp.l1_lpid) is gp:
            del vm.nested[gp.l1_lpid]
            gp.refcnt -= 1
            self.stats["nested_guests_removed"] += 1
        if gp.refcnt == 0:
            self.kvmhv_release_nested(gp)

    def kvmhv_release_nested(self, gp: KvmNestedGuest) -> None:
        """Free shadow tree and root, zero the shadow PATE (with flush), free the shadow LPID."""
        if gp.freed:
            return
        table = gp.shadow_pgtable
        if table is not None:
            table.free_below(table.root, 3)
            table.free_table(table.root, 3)
            gp.shadow_pgtable = None
        self.set_ptbl_entry(gp.shadow_lpid, 0, 0)
        self.kvmppc_free_lpid(gp.shadow_lpid)
        gp.freed = True
        self.live_guests.discard(gp)
        self.stats["nested_guests_freed"] += 1

    def kvmhv_release_all_nested(self, vm: L1Vm) -> None:
        """Empty the registry dropping its references, free those at 0, free every rmap."""
        freelist = []
        for l1_lpid, gp in list(vm.nested.items()):
            del vm.nested[l1_lpid]
            gp.refcnt -= 1
            if gp.refcnt == 0:
                freelist.append(gp)
        for gp in freelist:
            self.kvmhv_release_nested(gp)
        for slot in vm.memslots:
            slot.rmap.clear()

    def nested_guests(self) -> list[KvmNestedGuest]:
        return [gp for vm in self.l1s.values() for gp in vm.nested.values()]

    # ================================================================ the hardware
    def hw_translate(self, gp: KvmNestedGuest, n_gpa: int, access: Access) -> tuple[Slot | None, int, int]:
        """What POWER9 does for an L2 access with LPIDR = shadow LPID: walk the shadow tree.

        Returns (leaf, dsisr, memory references).  dsisr 0 means the translation can be used;
        otherwise it is the HDSISR (or SRR1 bits for HISI) of the resulting interrupt.  The
        hardware never sets R or C itself (radix mode): a missing bit is SET_RC.
        """
        table = gp.shadow_pgtable
        store = access is Access.STORE
        isstore = f.DSISR_ISSTORE if store else 0
        if table is None:
            return None, f.DSISR_NOHPTE | isstore, 0
        slot, refs = table.walk_refs(n_gpa)
        if slot is None:
            return None, f.DSISR_NOHPTE | isstore, refs
        pte = slot.pte
        if store:
            if not pte & f.PTE_EAA_RW:
                return slot, f.DSISR_PROTFAULT | isstore, refs
        elif access is Access.IFETCH:
            if not pte & f.PTE_EAA_EXEC:
                return slot, f.SRR1_ISI_N_G_OR_CIP, refs
        elif not pte & (f.PTE_EAA_READ | f.PTE_EAA_RW):
            return slot, f.DSISR_PROTFAULT, refs
        if not pte & f.PTE_R or (store and not pte & f.PTE_C):
            return slot, f.DSISR_SET_RC | isstore, refs
        return slot, 0, refs

    # ================================================================ the 2-D walk (process scope)
    def radix_2d_translate(self, gp: KvmNestedGuest, ea: int, access: Access, pidr: int, hv_quadrant: bool = False) -> Walk2D:
        """What POWER9 does for an L2 access with MSR[DR]=1 (IR=1 for a fetch), LPIDR = the
        shadow LPID: the process-scoped walk of L2's own tree with every table address
        translated partition scoped through the shadow table, then the final partition-scoped
        translation (ISA 3.0 radix; QEMU ``ppc_radix64_xlate`` ->
        ``ppc_radix64_process_scoped_xlate`` / ``ppc_radix64_partition_scoped_xlate``).

        Returns a :class:`Walk2D`: an HDSI/HISI exit for L0 (``exit``), or a finished
        ``result`` (FILL, or GUEST_FAULT delivered to L2 itself), and the memory references
        made.  ``hv_quadrant``: the access is L0's own quadrant-1/2 access (H_COPY_TOFROM_GUEST)
        with ``pidr`` as the PID, privileged.
        """
        w = self._radix_2d_walk(gp, ea, access, pidr, hv_quadrant)
        self._count_walk(w)
        return w

    def _radix_2d_walk(self, gp: KvmNestedGuest, ea: int, access: Access, pidr: int, hv_quadrant: bool) -> Walk2D:
        w = Walk2D()
        store = access is Access.STORE
        isstore = f.DSISR_ISSTORE if store else 0
        # 1. Quadrant and PID (ppc_radix64_get_fully_qualified_addr, MSR[HV]=0).
        if ea & f.EA_RESERVED_MASK:
            return w.guest_fault(0, f"segment interrupt: EA {ea:#x} has bits 2:11 set")
        quadrant = ea >> f.EA_QUADRANT_SHIFT
        if hv_quadrant:
            pid, problem_state = pidr, False
        elif quadrant == 0:
            pid, problem_state = pidr, True  # user: PID = PIDR, MSR[PR]=1
        elif quadrant == 3:
            pid, problem_state = 0, False  # kernel: PID 0
        else:
            return w.guest_fault(0, f"segment interrupt: quadrant {quadrant} is not usable by a guest")
        # 2. The process table from the shadow LPID's PATE dw1 (L1's dw1, copied by
        #    kvmhv_set_nested_ptbl); the PATE itself is assumed cached (not counted).
        _, dw1 = self.read_ptbl_entry(gp.shadow_lpid)
        prtb, prts = f.pate_prtb(dw1), f.pate_prts(dw1)
        if not prtb:
            return w.guest_fault(f.DSISR_NOHPTE | isstore, "no process table registered (PATE dw1 PRTB = 0)")
        if pid * f.PRTE_SIZE >= 1 << (12 + prts):
            return w.guest_fault(f.DSISR_NOHPTE | isstore, f"PID {pid} beyond the process table (PRTS {prts})")
        prte = self._read_table_entry(gp, w, ea, prtb + pid * f.PRTE_SIZE, access)
        if prte is None:
            return w
        # 3. The process-scoped tree, each entry read through the shadow table.
        rts, bits, base = f.pate_rts(prte), f.pate_rpds(prte), f.pate_root(prte)
        offset = rts + 31
        if offset != 52:
            return w.guest_fault(f.DSISR_UNSUPP_MMU | isstore, f"process-table entry of PID {pid}: RTS gives {offset} bits, not 52")
        va = ea & f.EA_VALID_MASK
        level = 3
        pte = 0
        while True:
            if bits < 5 or offset - bits < 12 or base & ((1 << (bits + 3)) - 1):
                return w.guest_fault(f.DSISR_UNSUPP_MMU | isstore, f"PID {pid}: bad radix geometry at level {level}")
            offset -= bits
            entry = base + ((va >> offset) & ((1 << bits) - 1)) * 8
            got = self._read_table_entry(gp, w, ea, entry, access)
            if got is None:
                return w
            pte = got
            if not pte & f.PTE_V:
                return w.guest_fault(f.DSISR_NOHPTE | isstore, f"PID {pid}: no valid entry for EA {ea:#x}")
            if pte & f.PTE_L:
                break
            if level == 0:
                return w.guest_fault(f.DSISR_UNSUPP_MMU | isstore, f"PID {pid}: no leaf at the last level")
            base, bits = pte & f.PDE_NLB_MASK, pte & f.PDE_NLS_MASK
            level -= 1
        # 4. The process-scoped leaf: privilege, permission, then R/C (the guest sets them).
        code = _process_leaf_check(pte, access, problem_state)
        if code:
            return w.guest_fault(code | (isstore if access is not Access.IFETCH else 0), f"PID {pid}: L2's leaf refuses the access")
        pshift = offset
        raddr = (pte & f.PTE_RPN_MASK & ~((1 << pshift) - 1)) | (va & ((1 << pshift) - 1))
        # 5. The final partition-scoped translation: a miss is the ordinary HDSI/HISI.
        slot, dsisr, n = self.hw_translate(gp, raddr, access)
        w.count_shadow(n)
        if dsisr:
            trap = f.BOOK3S_INTERRUPT_H_INST_STORAGE if access is Access.IFETCH else f.BOOK3S_INTERRUPT_H_DATA_STORAGE
            w.exit = NestedExit(trap, ea, dsisr, raddr, access)
            return w
        assert slot is not None
        # 6. The TLB entry: the smaller page, both leaves' permissions and R/C.
        shift = min(pshift, slot.shift)
        real_page = raddr & ~((1 << shift) - 1)
        host = (slot.pte & f.PTE_RPN_MASK) + (real_page - slot.gpa)
        combined = (slot.pte & ~(f.PTE_RPN_MASK | f.PTE_PERM_MASK | f.PTE_RC_MASK)) | host
        combined |= _norm_perms(pte) & _norm_perms(slot.pte) | (pte & slot.pte & f.PTE_RC_MASK)
        page = ea & ~((1 << shift) - 1)
        w.result = AccessResult(Outcome.FILL, Translation(gp.shadow_lpid, page, host, shift, combined, pid, real_page))
        return w

    def _read_table_entry(self, gp: KvmNestedGuest, w: Walk2D, ea: int, entry: int, access: Access) -> int | None:
        """One process-scoped table read: translate the entry's L2 real address through the
        shadow table (a load), then load it from host memory.  A shadow miss is an HDSI (HISI
        for a fetch) with PRTABLE_FAULT: HDAR = EA, ASDR = the entry's L2 real address, DSISR
        ISSTORE from the original access (KVM checks L1's leaf with it, §3 step 3)."""
        slot, dsisr, n = self.hw_translate(gp, entry, Access.LOAD)
        w.count_shadow(n)
        if dsisr:
            isstore = f.DSISR_ISSTORE if access is Access.STORE else 0
            trap = f.BOOK3S_INTERRUPT_H_INST_STORAGE if access is Access.IFETCH else f.BOOK3S_INTERRUPT_H_DATA_STORAGE
            w.exit = NestedExit(trap, ea, (dsisr & ~f.DSISR_ISSTORE) | f.DSISR_PRTABLE_FAULT | isstore, entry, access)
            self.stats["prtable_faults"] += 1
            return None
        assert slot is not None
        hpa = (slot.pte & f.PTE_RPN_MASK) + (entry - slot.gpa)
        w.refs += 1
        w.process_refs += 1
        return self.data_load(hpa)

    def _count_walk(self, w: Walk2D) -> None:
        stats = self.stats
        stats["walks_2d"] += 1
        stats["walk_refs_2d"] += w.refs
        stats["walk_refs_shadow"] += w.shadow_refs
        stats["walk_refs_process"] += w.process_refs

    # ================================================================ running L2 accesses
    def run_access(self, gp: KvmNestedGuest, vcpu_id: int, addr: int, access: Access, pid: int = -1) -> Op[AccessResult]:
        """One L2 access that missed its TLB: hardware walk, nested faults, reflections.

        ``pid`` -1: a real-mode access, ``addr`` is an L2 real address (partition scope
        only).  ``pid`` >= 0: PIDR; ``addr`` is an effective address translated by the 2-D
        walk (:meth:`radix_2d_translate`); a process-scoped fault ends the access with
        GUEST_FAULT for the L2 OS to handle.

        The loop is H_ENTER_NESTED's: L0 absorbs what it can (RESUME_GUEST), reflects the rest
        to L1 (RESUME_HOST; L1 handles it and re-enters), until the access translates or L2
        receives a storage interrupt.
        """
        stats = self.stats
        einval_rounds = 0
        refs = 0
        for attempt in range(self.config.max_reentries):
            if pid >= 0:
                walk = self.radix_2d_translate(gp, addr, access, pid)
                refs += walk.refs
                if walk.result is not None:
                    if attempt == 0 and walk.result.outcome is Outcome.FILL:
                        stats["ea_walk_hits"] += 1
                    return replace(walk.result, refs=refs)
                assert walk.exit is not None
                ex = walk.exit
                dsisr = ex.hdsisr
            else:
                slot, dsisr, n = self.hw_translate(gp, addr, access)
                refs += n
                stats["walk_refs_real"] += n
                if not dsisr:
                    assert slot is not None
                    if attempt == 0:
                        stats["shadow_hits"] += 1
                    return AccessResult(Outcome.FILL, Translation(gp.shadow_lpid, slot.gpa, slot.pte & f.PTE_RPN_MASK, slot.shift, slot.pte), refs=refs)
                trap = f.BOOK3S_INTERRUPT_H_INST_STORAGE if access is Access.IFETCH else f.BOOK3S_INTERRUPT_H_DATA_STORAGE
                ex = NestedExit(trap, addr, dsisr, addr, access)
            yield AcquireTlbLock(gp)
            res = yield from self.kvmhv_nested_page_fault(gp, ex)
            yield ReleaseTlbLock(gp)
            kind = res.kind
            if kind is FaultKind.RESUME_GUEST:
                continue
            if kind is FaultKind.RESUME_HOST:
                assert res.exit is not None
                reply: ExitReply = yield ReflectExit(gp.l1_host, gp.l1_lpid, vcpu_id, res.exit)
                self._l1_reentered(reply)
                if reply.action is ExitAction.REENTER:
                    continue
                if reply.action is ExitAction.INJECT_STORAGE_INTERRUPT:
                    stats["storage_interrupts"] += 1
                    return AccessResult(Outcome.STORAGE_INTERRUPT, dsisr=reply.dsisr, detail="injected by L1")
                if reply.action is ExitAction.L1_EMULATED:
                    stats["l1_emulated"] += 1
                    return AccessResult(Outcome.L1_EMULATED, detail=reply.detail)
                stats["errors"] += 1
                return AccessResult(Outcome.ERROR, dsisr=res.exit.hdsisr, detail=reply.detail or "L1 could not handle the exit")
            if kind is FaultKind.INJECT_DSI:
                stats["storage_interrupts"] += 1
                return AccessResult(Outcome.STORAGE_INTERRUPT, dsisr=res.dsisr, detail=res.detail)
            if kind is FaultKind.MMIO:
                stats["mmio_emulated"] += 1
                # kvmhv_nested_mmio_needed: trap 0 ("no need to reflect"); once L0's userspace
                # completed the MMIO, L1's H_ENTER_NESTED returns with it and L1 enters again.
                done = yield ReflectExit(gp.l1_host, gp.l1_lpid, vcpu_id, NestedExit(0, addr, 0, addr, access))
                self._l1_reentered(done)
                return AccessResult(Outcome.MMIO_EMULATED, detail=res.detail)
            if res.exit is not None:
                # An error out of the run loop: H_ENTER_NESTED returns the raw trap to L1.
                einval_rounds += 1
                stats["einval_rounds"] += 1
                reply = yield ReflectExit(gp.l1_host, gp.l1_lpid, vcpu_id, res.exit)
                self._l1_reentered(reply)
                if reply.action is ExitAction.REENTER and einval_rounds < self.config.livelock_rounds:
                    continue
                if reply.action is ExitAction.REENTER:
                    stats["errors"] += 1
                    stats["livelock"] += 1
                    stats["livelock.einval"] += 1
                    detail = f"livelock: {res.detail}; L1 saw the same HDSI and re-entered {einval_rounds} times"
                    return AccessResult(Outcome.ERROR, dsisr=res.exit.hdsisr, detail=detail)
                if reply.action is ExitAction.INJECT_STORAGE_INTERRUPT:
                    stats["storage_interrupts"] += 1
                    return AccessResult(Outcome.STORAGE_INTERRUPT, dsisr=reply.dsisr, detail="injected by L1")
                if reply.action is ExitAction.L1_EMULATED:
                    stats["l1_emulated"] += 1
                    return AccessResult(Outcome.L1_EMULATED, detail=reply.detail)
            stats["errors"] += 1
            return AccessResult(Outcome.ERROR, dsisr=dsisr, detail=res.detail)
        stats["errors"] += 1
        stats["livelock"] += 1
        return AccessResult(Outcome.ERROR, detail=f"no progress after {self.config.max_reentries} re-entries")

    def _l1_reentered(self, reply: ExitReply) -> None:
        """L1 handled an exit H_ENTER_NESTED returned and (unless it failed) enters again:
        every (re-)entry is one H_ENTER_NESTED hcall."""
        if reply.action is not ExitAction.FAILED:
            self.stats["hcall.H_ENTER_NESTED"] += 1
            self.stats["h_enter_nested.reentries"] += 1

    def kvmppc_handle_nested_exit(self, gp: KvmNestedGuest, vcpu_id: int, ex: NestedExit) -> Op[ExitReply]:
        """An L2 exit that is not a page fault and that L0 does not handle itself: an hcall of
        the L2 (L0 keeps only H_RPT_INVALIDATE, not modelled here) or the expiry of the HDEC L1
        programmed (NESTED_HV_DECREMENTER, handed back as HV_DECREMENTER).  RESUME_HOST:
        H_ENTER_NESTED returns the trap to L1, which handles it and enters again."""
        if ex.trap == f.BOOK3S_INTERRUPT_SYSCALL:
            self.stats["nested_exit.hcall"] += 1
        elif ex.trap == f.BOOK3S_INTERRUPT_HV_DECREMENTER:
            self.stats["nested_exit.hdec"] += 1
        else:
            self.stats["nested_exit.other"] += 1
        reply: ExitReply = yield ReflectExit(gp.l1_host, gp.l1_lpid, vcpu_id, ex)
        self._l1_reentered(reply)
        return reply

    # ================================================================ nested page fault
    def kvmhv_translate_addr_nested(self, gpte: WalkResult, dsisr: int, trap: int) -> int:
        """The reflection code for L1's walk result and the access (0 = usable translation)."""
        if not gpte.ok:
            return gpte.code
        if dsisr & f.DSISR_ISSTORE:
            if not gpte.may_write:
                return f.DSISR_PROTFAULT
        elif trap == f.BOOK3S_INTERRUPT_H_INST_STORAGE:
            if not gpte.may_execute:
                return f.SRR1_ISI_N_G_OR_CIP
        elif not gpte.may_read and not gpte.may_write:
            return f.DSISR_PROTFAULT
        return 0

    def _forward_to_l1(self, ex: NestedExit, dsisr: int, code: int, gpte: WalkResult) -> FaultResult:
        """Reflect to L1 with fault_dsisr = original ISSTORE | code (and ASDR fix-up)."""
        new_dsisr = (dsisr & f.DSISR_ISSTORE) | code
        if ex.trap == f.BOOK3S_INTERRUPT_H_INST_STORAGE:
            # For HISI the code goes into the SRR1 image (masked with SRR1_MSR_BITS).
            new_dsisr = (dsisr & f.SRR1_MSR_BITS & f.DSISR_ISSTORE) | code
        asdr = gpte.fault_gpa if code == f.DSISR_PRTABLE_FAULT else ex.asdr
        self.stats[f"reflected.{_code_name(code)}"] += 1
        return FaultResult(FaultKind.RESUME_HOST, NestedExit(ex.trap, ex.hdar, new_dsisr, asdr, ex.access))

    def kvmhv_nested_page_fault(self, gp: KvmNestedGuest, ex: NestedExit) -> Op[FaultResult]:
        """__kvmhv_nested_page_fault, under gp->tlb_lock (the caller holds it)."""
        vm = gp.l1_host
        stats = self.stats
        stats["nested_faults"] += 1
        dsisr = ex.hdsisr
        ea = ex.hdar
        writing = bool(dsisr & f.DSISR_ISSTORE)
        page_shift = self.page_shift
        if gp.shadow_pgtable is None:
            return FaultResult(FaultKind.ERROR, detail="nested guest already freed")

        # 1. No cached PATE: re-read it; still none -> let L1 see the exit unchanged.
        if not gp.l1_gr_to_hr:
            yield from self.kvmhv_update_ptbl_cache(gp)
            if not gp.l1_gr_to_hr:
                stats["reflected.NO_PATE"] += 1
                return FaultResult(FaultKind.RESUME_HOST, ex)

        # 2. The L2 real address: ASDR's page, and the byte offset from HDAR.
        n_gpa = f.nested_fault_n_gpa(ex.asdr, ea, dsisr)

        # 3. Walk L1's partition-scoped tree (L1 owns it) and check the access against it.
        gpte: WalkResult = yield WalkL1Tree(vm, gp.l1_lpid, gp.l1_gr_to_hr, n_gpa)
        code = self.kvmhv_translate_addr_nested(gpte, dsisr, ex.trap)
        if code:
            # 4. Hardware had a shadow PTE but L1 now denies: drop it and let L2 refault.
            if dsisr & f.DSISR_HW_HAD_PTE:
                stats["shadow_invalidated_l1_denies"] += 1
                self.kvmhv_invalidate_shadow_pte(gp, n_gpa)
                return RESUME_GUEST
            return self._forward_to_l1(ex, dsisr, code, gpte)

        # 5. Reference/change bits hardware could not set.
        if dsisr & f.DSISR_SET_RC:
            stats["rc_faults"] += 1
            rc = self.kvmhv_handle_nested_set_rc(gp, n_gpa, gpte, dsisr)
            if rc is FaultKind.RESUME_HOST:
                stats["reflected.SET_RC"] += 1
                return FaultResult(FaultKind.RESUME_HOST, ex)
            if rc is not None:
                self.kvmhv_invalidate_shadow_pte(gp, n_gpa)
                return RESUME_GUEST
            dsisr &= ~f.DSISR_SET_RC
            if not dsisr & (f.DSISR_BAD_FAULT_64S | f.DSISR_NOHPTE | f.DSISR_PROTFAULT):
                stats["rc_set_in_l0"] += 1
                return RESUME_GUEST

        # 6. L1 may not use a page smaller than L0's own.
        l1_shift = gpte.page_shift
        if l1_shift < page_shift:
            stats["l1_page_smaller_than_l0"] += 1
            # -EINVAL ends kvmhv_run_single_vcpu's loop: L1 gets the trap with the hardware's
            # registers, unchanged (``exit``), and handles it as a fault of its own.
            return FaultResult(FaultKind.ERROR, exit=ex, detail=f"-EINVAL: L1 page shift {l1_shift} < L0 page shift {page_shift}")

        # 7. The L1 real address and its memslot.
        gpa = gpte.raddr
        memslot = vm.memslot_for(gpa)
        if memslot is None:
            if dsisr & (f.DSISR_PRTABLE_FAULT | f.DSISR_BADACCESS):
                return FaultResult(FaultKind.INJECT_DSI, dsisr=dsisr, detail="no memslot: DSI injected into L2")
            return FaultResult(FaultKind.MMIO, detail=f"MMIO at L1 address {gpa:#x} emulated by L0")
        kvm_ro = False
        if memslot.read_only:
            if writing:
                return FaultResult(FaultKind.INJECT_DSI, dsisr=f.DSISR_ISSTORE | f.DSISR_PROTFAULT, detail="store to a read-only L1 memslot")
            kvm_ro = True

        # 8. L0's own PTE for the L1 page; instantiate it like an L1 fault if needed.
        mmu_seq = vm.mmu_invalidate_seq
        slot = vm.pgtable.lookup_leaf(gpa)
        if slot is not None:
            pte, shift = slot.pte, slot.shift
        else:
            pte, shift = 0, page_shift
        if not pte & f.PTE_V or (writing and not pte & f.PTE_EAA_RW):
            got = self.kvmppc_book3s_instantiate_page(vm, gpa, memslot, writing, kvm_ro)
            if got == EAGAIN:
                moving = self._moving_chunk(vm, memslot, gpa)
                if moving is not None:
                    yield WaitHostPage(vm, moving)
                return RESUME_GUEST
            assert isinstance(got, tuple)
            pte, level = got
            shift = level_to_shift(level, page_shift)
        gfn = (gpa & ~((1 << shift) - 1)) >> page_shift
        yield Preempt("nested_fault:after_l0_pte_read")

        # 9. Permissions and R/C: what both L1's leaf and L0's PTE grant; C only on a store.
        perm = 0
        perm |= 0 if gpte.may_read else f.PTE_EAA_READ
        perm |= 0 if gpte.may_write else f.PTE_EAA_RW
        perm |= 0 if gpte.may_execute else f.PTE_EAA_EXEC
        perm |= 0 if gpte.rc & f.PTE_R else f.PTE_R
        perm |= 0 if (gpte.rc & f.PTE_C and writing) else f.PTE_C
        pte &= ~perm

        # 10. Page size: L0's when it fits inside L1's page, else base pages + sub-page RPN.
        if shift > l1_shift:
            actual_shift = page_shift
            if l1_shift > PMD_SHIFT:
                actual_shift = PMD_SHIFT
            mask = (1 << shift) - (1 << actual_shift)
            pte |= gpa & mask
            shift = actual_shift
            stats["shadow_size_fallback"] += 1
        level = shift_to_level(shift)
        n_gpa &= ~((1 << shift) - 1)

        # 11-12. The rmap entry and the shadow insert (retry if an invalidation raced us).
        rmap = f.rmap_entry(gp.l1_lpid, n_gpa)
        assert gp.shadow_pgtable is not None
        ret = self.kvmppc_create_pte(vm, gp.shadow_pgtable, pte, n_gpa, level, mmu_seq, gp.shadow_lpid, (memslot, gfn), rmap)
        if ret == EAGAIN:
            stats["mmu_seq_retry"] += 1
        else:
            stats["shadow_inserted"] += 1
        return RESUME_GUEST

    # ================================================================ R/C
    def kvmppc_hv_handle_set_rc(self, table: RadixTable, writing: bool, gpa: int) -> bool:
        """Set R (and C on a store) in a present PTE that allows the access."""
        slot = table.lookup_leaf(gpa)
        if slot is None or (writing and not slot.pte & f.PTE_EAA_RW):
            return False
        bits = f.PTE_R | (f.PTE_C if writing else 0)
        table.mem.write_u64(slot.addr, slot.pte | bits)
        return True

    def kvmhv_handle_nested_set_rc(self, gp: KvmNestedGuest, n_gpa: int, gpte: WalkResult, dsisr: int) -> FaultKind | None:
        """Nested SET_RC: reflect if L1's leaf lacks a bit, else set it in L0's PTE and shadow.

        Returns None on success, RESUME_HOST to reflect, ERROR when a PTE vanished.
        """
        writing = bool(dsisr & f.DSISR_ISSTORE)
        pgflags = f.PTE_R | (f.PTE_C if writing else 0)
        if pgflags & ~gpte.rc:
            return FaultKind.RESUME_HOST
        vm = gp.l1_host
        # Holding mmu_lock across both keeps shadow C => L0 C.
        if not self.kvmppc_hv_handle_set_rc(vm.pgtable, writing, gpte.raddr):
            return FaultKind.ERROR
        assert gp.shadow_pgtable is not None
        if not self.kvmppc_hv_handle_set_rc(gp.shadow_pgtable, writing, n_gpa):
            return FaultKind.ERROR
        return None

    def kvmppc_book3s_radix_page_fault(self, vm: L1Vm, gpa: int, dsisr: int) -> int:
        """L1's own HDSI on its partition-scoped table (L0's own guest). Returns 0 or -errno.

        SET_RC sets the bits in L0's PTE when present and allowed; anything else left (or a
        missing PTE) instantiates the page.  Used for L1's own accesses and by tests.
        """
        writing = bool(dsisr & f.DSISR_ISSTORE)
        memslot = vm.memslot_for(gpa)
        if memslot is None:
            return EINVAL
        if dsisr & f.DSISR_SET_RC:
            if self.kvmppc_hv_handle_set_rc(vm.pgtable, writing, gpa):
                dsisr &= ~f.DSISR_SET_RC
            if not dsisr & (f.DSISR_BAD_FAULT_64S | f.DSISR_NOHPTE | f.DSISR_PROTFAULT | f.DSISR_SET_RC):
                self.stats["l1_rc_set"] += 1
                return 0
        if memslot.read_only and writing:
            return EINVAL
        got = self.kvmppc_book3s_instantiate_page(vm, gpa, memslot, writing, memslot.read_only)
        return got if isinstance(got, int) else 0

    # ================================================================ L1 -> L0 instantiate
    def kvmppc_book3s_instantiate_page(self, vm: L1Vm, gpa: int, memslot: Memslot, writing: bool, kvm_ro: bool) -> tuple[int, int] | int:
        """Fault in the host page and map it in L1's partition-scoped table: (pte, level)."""
        mmu_seq = vm.mmu_invalidate_seq
        page_shift = self.page_shift
        if self._moving_chunk(vm, memslot, gpa) is not None:
            # A migration entry: the fault waits for the move and retries (the caller waits).
            self.stats["host_page_moving_retry"] += 1
            return EAGAIN
        hpa_base, shift = self.host_faultin(vm, memslot, gpa)
        chunk = gpa & ~((1 << shift) - 1)
        if chunk in vm.thp_collapsing:
            # §9.11: the host PTE is transiently absent during a THP collapse: retry.
            vm.thp_collapsing.discard(chunk)
            self.stats["thp_collapse_retry"] += 1
            return EAGAIN
        large_enable = not memslot.dirty_logging

        def fits(s: int) -> bool:  # the whole large page must lie inside the memslot
            base = gpa & ~((1 << s) - 1)
            return memslot.base <= base and base + (1 << s) <= memslot.base + memslot.size

        if large_enable and shift == PUD_SHIFT and fits(PUD_SHIFT):
            level, hpa = 2, hpa_base
        elif large_enable and shift == PMD_SHIFT and fits(PMD_SHIFT):
            level, hpa = 1, hpa_base
        else:
            level = 0
            # Bring over the offset inside a larger host page to get the base page we want.
            hpa = hpa_base + ((gpa - chunk) & ~((1 << page_shift) - 1))
        # Always +X +R.  A read fault keeps write permission only when the host gives a
        # writable upgrade (__kvm_faultin_pfn's *writable); whenever the PTE ends up writable
        # -- ``writing || upgrade_write`` -- it gets C too (_PAGE_DIRTY): the host page is
        # dirtied at once (set_page_dirty_lock) so the guest's first store needs no SET_RC.
        upgrade_write = self.config.host_write_upgrade and not kvm_ro
        perms = f.PTE_EAA_READ | f.PTE_EAA_EXEC
        rc = f.PTE_R
        if (writing or upgrade_write) and not kvm_ro:
            perms |= f.PTE_EAA_RW
            rc |= f.PTE_C
        pte = f.PTE_V | f.PTE_L | hpa | perms | rc
        lshift = level_to_shift(level, page_shift)
        ret = self.kvmppc_create_pte(vm, vm.pgtable, pte, gpa & ~((1 << lshift) - 1), level, mmu_seq, vm.lpid, None, 0)
        if ret == EAGAIN:
            return EAGAIN
        self.stats["l0_instantiate"] += 1
        return pte, level  # the PTE built here (*inserted_pte), as the kernel hands back

    # ================================================================ create / unmap PTEs
    def mmu_invalidate_retry(self, vm: L1Vm, mmu_seq: int) -> bool:
        return bool(vm.mmu_invalidate_in_progress) or vm.mmu_invalidate_seq != mmu_seq

    def kvmppc_create_pte(
        self,
        vm: L1Vm,
        table: RadixTable,
        pte: int,
        gpa: int,
        level: int,
        mmu_seq: int,
        lpid: int,
        rmapp: tuple[Memslot, int] | None,
        n_rmap: int,
    ) -> int:
        """Insert a leaf at ``level``, replacing whatever is in the way (§3 step 12)."""
        if self.mmu_invalidate_retry(vm, mmu_seq):
            return EAGAIN
        mem = table.mem
        stats = self.stats
        tbl = table.root
        for lv in (3, 2, 1, 0):
            addr = table.entry_addr(tbl, lv, gpa)
            e = mem.read_u64(addr)
            if lv == 3:
                if not e & f.PTE_V:
                    new = table._alloc_table(2)
                    e = f.make_pde(new, 9)
                    mem.write_u64(addr, e)
                tbl = e & f.PDE_NLB_MASK
                continue
            lshift = table.level_shift(lv)
            if lv > 0 and e & f.PTE_V and e & f.PTE_L:
                if level == lv:
                    return self._add_bits_to_leaf(mem, addr, e, pte)
                # A larger leaf is in the way of a smaller one: unmap it.
                stats["create_pte.replace_larger"] += 1
                self.kvmppc_unmap_pte(vm, table, addr, e, gpa & ~((1 << lshift) - 1), lshift, lpid)
                e = 0
            if lv == level:
                if lv > 0 and e & f.PTE_V:
                    # A lower-level table is in the way of a large leaf: free it.
                    stats["create_pte.free_lower_table"] += 1
                    self.kvmppc_unmap_free_entry_table(vm, table, addr, e, lv, gpa & ~((1 << lshift) - 1), lpid)
                elif lv == 0 and e & f.PTE_V:
                    return self._add_bits_to_leaf(mem, addr, e, pte)
                mem.write_u64(addr, pte)
                if rmapp is not None:
                    self.kvmhv_insert_nest_rmap(rmapp[0], rmapp[1], n_rmap)
                return 0
            if not e & f.PTE_V:
                new = table._alloc_table(lv - 1)
                e = f.make_pde(new, 9 if lv - 1 > 0 else table.pte_bits)
                mem.write_u64(addr, e)
            tbl = e & f.PDE_NLB_MASK
        raise AssertionError("unreachable")  # pragma: no cover

    def _add_bits_to_leaf(self, mem: SimMemory, addr: int, old: int, pte: int) -> int:
        """A valid leaf of the same size is there: identical (someone raced us), or OR in our
        bits.  The kernel WARNs when bits other than W/C/R differ (e.g. another RPN: an L1
        that changed a PTE without the tlbie) and ORs anyway (§9.17)."""
        if old == pte:
            self.stats["create_pte.identical"] += 1
            return 0
        if (old ^ pte) & PTE_BITS_MUST_MATCH:
            self.stats["warn.pte_bits_must_match"] += 1
        mem.write_u64(addr, old | pte)
        self.stats["create_pte.or_bits"] += 1
        return 0

    def kvmppc_unmap_pte(self, vm: L1Vm, table: RadixTable, addr: int, old: int, gpa: int, shift: int, lpid: int, memslot: Memslot | None = None) -> None:
        """Clear one leaf and tlbie it; for L1's own table also drop dependent shadow PTEs."""
        table.mem.write_u64(addr, 0)
        self.tlbie_page(lpid, gpa, shift)
        # The following only applies to L1 entries (L0's table for the L1).
        if lpid != vm.lpid:
            return
        if memslot is None:
            memslot = vm.memslot_for(gpa)
            if memslot is None:
                return
        page_size = 1 << shift
        gpa &= ~(page_size - 1)
        hpa = old & f.PTE_RPN_MASK
        self.kvmhv_remove_nest_rmap_range(vm, memslot, gpa, hpa, page_size)
        if old & f.PTE_C and memslot.dirty_logging:
            self._mark_dirty(memslot, gpa, page_size)

    def _mark_dirty(self, memslot: Memslot, gpa: int, size: int) -> None:
        for g in range(gpa, gpa + size, self.page_size):
            if memslot.contains(g):
                memslot.dirty.add(g >> self.page_shift)

    def kvmppc_unmap_free_entry_table(self, vm: L1Vm, table: RadixTable, addr: int, pde: int, level: int, gpa: int, lpid: int) -> None:
        """kvmppc_unmap_free_{pud,pmd}_entry_table: clear PDE, PWC flush, unmap each PTE, free."""
        table.mem.write_u64(addr, 0)
        self.stats["pwc_flush"] += 1  # kvmppc_radix_flush_pwc: the model keeps no PWC
        self._unmap_free(vm, table, pde & f.PDE_NLB_MASK, level - 1, gpa, lpid)

    def _unmap_free(self, vm: L1Vm, table: RadixTable, tbl: int, level: int, base: int, lpid: int) -> None:
        shift = table.level_shift(level)
        for addr, e, idx in list(table.subtables(tbl, level)):
            gpa = base + (idx << shift)
            if e & f.PTE_L:
                # The kernel passes the frame address as the guest address here (§9.10).
                where = (e & f.PTE_RPN_MASK) if self.bugs.free_pte_tlbie_uses_hpa else gpa
                self.kvmppc_unmap_pte(vm, table, addr, e, where, shift, lpid)
            else:
                self._unmap_free(vm, table, e & f.PDE_NLB_MASK, level - 1, gpa, lpid)
                table.mem.write_u64(addr, 0)
        table.free_table(tbl, level)

    # ================================================================ nested rmap
    def for_each_nest_rmap_safe(self, entries: Sequence[int]) -> list[int]:
        """The rmap entries of one gfn that the kernel's list walk visits.

        Kernel layout: the first entry of a gfn sits inline (tagged with
        RMAP_NESTED_IS_SINGLE_ENTRY, so never 0); later ones are list nodes pushed at the
        head, the inline value becoming the tail.  The walk goes newest first and stops at a
        node whose rmap value is 0 -- an (lpid 0, n_gpa 0) entry (§9.14).  Correct by default:
        every entry; ``KernelBugs.rmap_zero_entry_ends_walk`` gives the kernel's walk."""
        if not self.bugs.rmap_zero_entry_ends_walk or len(entries) < 2 or 0 not in entries[1:]:
            return list(entries)
        out: list[int] = []
        for entry in reversed(entries[1:]):  # the list nodes, newest first
            if entry == 0:
                self.stats["rmap_walk_ended_at_zero"] += 1
                return out
            out.append(entry)
        raise AssertionError("unreachable")  # pragma: no cover

    def kvmhv_insert_nest_rmap(self, memslot: Memslot, gfn: int, n_rmap: int) -> None:
        lst = memslot.rmap.get(gfn)
        if lst is None:
            lst = memslot.rmap[gfn] = RmapList()
        if n_rmap in self.for_each_nest_rmap_safe(lst):  # dedup on lpid + n_gpa bounds growth
            return
        lst.append(n_rmap)
        self.stats["rmap_inserted"] += 1

    def _find_nested_pte(self, vm: L1Vm, l1_lpid: int, n_gpa: int) -> tuple[KvmNestedGuest, Slot] | None:
        gp = vm.nested.get(l1_lpid)  # __find_nested: registry only, no reference
        if gp is None or gp.shadow_pgtable is None:
            return None
        slot = gp.shadow_pgtable.lookup_leaf(n_gpa)
        if slot is None:
            return None
        return gp, slot

    def kvmhv_remove_nest_rmap_range(self, vm: L1Vm, memslot: Memslot, gpa: int, hpa: int, nbytes: int) -> None:
        """For every base gfn of an L0 page being unmapped: detach its rmap list and unmap
        each shadow PTE still mapping that host page (stale entries are skipped)."""
        addr_mask = f.PTE_RPN_MASK & ~(nbytes - 1)
        hpa &= addr_mask
        page_shift = self.page_shift
        gfn = gpa >> page_shift
        for g in range(gfn, gfn + (nbytes >> page_shift)):
            entries = memslot.rmap.pop(g, None)  # llist_del_all: the whole list is detached
            if not entries:
                continue
            walked = self.for_each_nest_rmap_safe(entries)
            # Nodes the walk never reached are neither processed nor freed (§9.14).
            self.stats["rmap_entries_leaked"] += len(entries) - len(walked)
            for entry in walked:
                found = self._find_nested_pte(vm, f.rmap_entry_lpid(entry), f.rmap_entry_gpa(entry))
                if found is None or (found[1].pte & addr_mask) != hpa:
                    self.stats["rmap_stale_skipped"] += 1
                    continue
                gp, slot = found
                assert gp.shadow_pgtable is not None
                self.kvmppc_unmap_pte(vm, gp.shadow_pgtable, slot.addr, slot.pte, slot.gpa, slot.shift, gp.shadow_lpid)
                self.stats["rmap_shadow_unmapped"] += 1

    def kvmhv_update_nest_rmap_rc_list(self, vm: L1Vm, memslot: Memslot, gfn: int, clr: int, set_: int, hpa: int, nbytes: int) -> None:
        """Clear/set R/C in every shadow PTE still mapping this host page (rmap kept)."""
        mask = f.PTE_RPN_MASK & ~(nbytes - 1)
        hpa &= mask
        for entry in self.for_each_nest_rmap_safe(memslot.rmap.get(gfn, [])):
            l1_lpid = f.rmap_entry_lpid(entry)
            found = self._find_nested_pte(vm, l1_lpid, f.rmap_entry_gpa(entry))
            if found is None or (found[1].pte & mask) != hpa:
                continue
            gp, slot = found
            assert gp.shadow_pgtable is not None
            gp.shadow_pgtable.mem.write_u64(slot.addr, (slot.pte & ~clr) | set_)
            # §9.7: the kernel tlbies with the L1-visible lpid from the rmap entry.
            lpid = l1_lpid if self.bugs.rc_clear_tlbie_l1_lpid else gp.shadow_lpid
            self.tlbie_page(lpid, slot.gpa, slot.shift, reason="rc_clear")
            self.stats["rmap_rc_updated"] += 1

    # ================================================================ L1-requested invalidation
    def kvmhv_invalidate_shadow_pte(self, gp: KvmNestedGuest, gpa: int) -> int:
        """Unmap the shadow leaf covering gpa if present; return the shift to advance by."""
        table = gp.shadow_pgtable
        if table is None:
            return self.page_shift
        slot = table.find_pte(gpa)
        shift = slot.shift if slot is not None else self.page_shift
        if slot is not None and slot.pte & f.PTE_V:
            self.kvmppc_unmap_pte(gp.l1_host, table, slot.addr, slot.pte, slot.gpa, slot.shift, gp.shadow_lpid)
        return shift

    def kvmhv_emulate_tlbie_tlb_addr(self, vm: L1Vm, lpid: int, ap: int, epn: int) -> Op[None]:
        """Invalidate one L1 page: every shadow leaf backing any part of it."""
        shift = f.AP_TO_SHIFT[ap]
        addr = (epn << 12) & ~((1 << shift) - 1)
        gp = yield from self.kvmhv_get_nested(vm, lpid, create=False)
        if gp is None:
            self.stats["inval.unknown_lpid"] += 1
            return
        yield AcquireTlbLock(gp)
        self.stats["inval.address"] += 1
        table = gp.shadow_pgtable
        if table is not None:
            # The kernel steps through the L1 page by shadow leaf size (PAGE_SIZE where none
            # is mapped): the leaves it removes are exactly those intersecting the page. An
            # AP smaller than L0's page still covers the L0 page holding it (one iteration).
            size = max(1 << shift, self.page_size)
            start = addr & ~(size - 1)
            for slot in list(table.leaves(start, start + size)):
                self.kvmppc_unmap_pte(vm, table, slot.addr, slot.pte, slot.gpa, slot.shift, gp.shadow_lpid)
        yield ReleaseTlbLock(gp)
        self.kvmhv_put_nested(gp)

    def kvmhv_emulate_tlbie_lpid(self, vm: L1Vm, lpid: int, ric: int) -> Op[None]:
        gp = yield from self.kvmhv_get_nested(vm, lpid, create=False)
        if gp is None:
            self.stats["inval.unknown_lpid"] += 1
            return
        yield AcquireTlbLock(gp)
        yield from self._tlbie_lpid_locked(gp, ric)
        yield ReleaseTlbLock(gp)
        self.kvmhv_put_nested(gp)

    def _tlbie_lpid_locked(self, gp: KvmNestedGuest, ric: int) -> Op[None]:
        if ric == f.RIC_TLB:
            self.stats["inval.lpid_tlb"] += 1
            self.kvmhv_free_shadow_tree(gp)
        elif ric == f.RIC_PWC:
            self.stats["inval.lpid_pwc"] += 1  # L0 caches no PWC for L1's tables: no-op
        else:
            self.stats["inval.lpid_all"] += 1
            yield from self.kvmhv_flush_nested(gp)

    def kvmhv_free_shadow_tree(self, gp: KvmNestedGuest) -> None:
        """kvmppc_free_pgtable on the shadow tree (rmaps left stale) + kvmhv_flush_lpid."""
        table = gp.shadow_pgtable
        if table is not None:
            table.free_below(table.root, 3)
        self.flush_lpid(gp.shadow_lpid)

    def kvmhv_flush_nested(self, gp: KvmNestedGuest) -> Op[None]:
        """RIC=2: free the tree, re-read the PATE; a cleared PATE removes the guest."""
        self.kvmhv_free_shadow_tree(gp)
        yield from self.kvmhv_update_ptbl_cache(gp)
        if gp.l1_gr_to_hr == 0:
            self.kvmhv_remove_nested(gp)

    def kvmhv_emulate_tlbie_all_lpid(self, vm: L1Vm, ric: int) -> Op[None]:
        """IS=3: every nested guest of this L1, each held by a reference (the §9.8 fix)."""
        self.stats["inval.all"] += 1
        for _, gp in sorted(vm.nested.items()):  # the IDR walks in ascending lpid
            gp.refcnt += 1
            yield AcquireTlbLock(gp)
            yield from self._tlbie_lpid_locked(gp, ric)
            yield ReleaseTlbLock(gp)
            self.kvmhv_put_nested(gp)

    # ================================================================ host events
    def host_unmap(self, vm: L1Vm, gpa: int) -> int:
        """The host unmaps the page backing L1 address gpa (MMU notifier -> kvm_unmap_radix).

        Returns the number of L0 PTEs removed; shadow PTEs go through the rmap.  The page is
        swapped out, not lost: its contents come back at the next fault-in.  Both phases run
        at once here; a driver that delivers tlbies asynchronously calls
        :meth:`host_invalidate_start`, waits for the tlbsync, then :meth:`host_invalidate_finish`.
        """
        removed, _, _, chunk = self.host_invalidate_start(vm, gpa, migrate=False)
        self.host_invalidate_finish(vm, chunk)
        return removed

    def host_migrate(self, vm: L1Vm, gpa: int) -> tuple[int, int, int]:
        """Move the host page backing gpa: unmap it everywhere, then back it by a new page.

        Returns (L0 PTEs removed, old hpa, new hpa) (0, 0 when the page was not resident).
        """
        removed, old, new, chunk = self.host_invalidate_start(vm, gpa, migrate=True)
        self.host_invalidate_finish(vm, chunk)
        return removed, old, new

    def host_invalidate_finish(self, vm: L1Vm, chunk: int) -> None:
        """After the tlbsync: migration copies the old frame to the new one and switches the
        backing (move_to_new_folio + remove_migration_ptes); swap-out saves the contents with
        the L1 page (the swap entry).  Then the old frame is freed."""
        moving = vm.moving.pop(chunk, None)
        if moving is None:
            return
        old, new, shift = moving
        if new:
            self.copy_frame(new, old, shift)
            vm.backing[chunk] = (new, shift)
            self.owner[new] = (vm.name, chunk, shift)
        else:
            snap = self.mem.snapshot(old, 1 << shift)
            if snap:
                vm.swap[chunk] = snap
                self.stats["host_pages_swapped_out"] += 1
        self._free_frame(old, shift)

    def copy_frame(self, dst: int, src: int, shift: int) -> None:
        """migrate_page_copy: the new frame gets the old frame's bytes."""
        self.mem.copy(dst, src, 1 << shift)
        self.stats["host_frames_copied"] += 1

    def host_invalidate_start(self, vm: L1Vm, gpa: int, migrate: bool) -> tuple[int, int, int, int]:
        """Unmap the host page backing gpa everywhere (tlbies in the outbox) and leave a
        migration entry: faults on it wait until :meth:`host_invalidate_finish`.

        Returns (L0 PTEs removed, old hpa, new hpa, chunk)."""
        return self._host_invalidate(vm, gpa, migrate)

    def _host_invalidate(self, vm: L1Vm, gpa: int, migrate: bool) -> tuple[int, int, int, int]:
        memslot = vm.memslot_for(gpa)
        if memslot is None:
            raise ConfigError(f"L1 {vm.name!r} has no memslot at {gpa:#x}")
        shift = self._backing_shift(memslot)
        chunk = gpa & ~((1 << shift) - 1)
        backing = vm.backing.get(chunk)
        # kvm_mmu_notifier_invalidate_range_start .. end
        vm.mmu_invalidate_in_progress += 1
        removed = 0
        for slot in list(vm.pgtable.leaves(chunk, chunk + (1 << shift))):
            self.kvmppc_unmap_pte(vm, vm.pgtable, slot.addr, slot.pte, slot.gpa, slot.shift, vm.lpid, memslot)
            removed += 1
        old = new = 0
        if backing is not None and chunk not in vm.moving:
            old, bshift = backing
            if migrate:
                # Take the destination while the source is still held: the allocator is LIFO,
                # so faulting in after the free would hand back the same page (no move).
                new = self.alloc.alloc(1 << bshift)
            del vm.backing[chunk]
            vm.moving[chunk] = (old, new, bshift)
        vm.mmu_invalidate_in_progress -= 1
        vm.mmu_invalidate_seq += 1
        self.stats["host_migrate" if migrate else "host_unmap"] += 1
        return removed, old, new, chunk

    def host_thp_collapse(self, vm: L1Vm, gpa: int) -> int:
        """khugepaged collapses the host page backing gpa (§9.11).

        collapse_huge_page brackets the PMD clear with mmu_notifier_invalidate_range_start /
        _end, so KVM (kvm_unmap_gfn_range -> kvm_unmap_radix) unmaps L0's leaf for the range
        and, through the rmap, every shadow leaf built on it, with their tlbies, and the end
        bumps mmu_invalidate_seq.  Then the host PTE stays absent until the huge page is
        installed: the next instantiate finds no host PTE and resumes the guest.  The model
        keeps the data in the same frame (the copy into the new huge page is not modelled).
        Returns the number of L0 PTEs removed."""
        memslot = vm.memslot_for(gpa)
        if memslot is None:
            raise ConfigError(f"L1 {vm.name!r} has no memslot at {gpa:#x}")
        shift = self._backing_shift(memslot)
        chunk = gpa & ~((1 << shift) - 1)
        vm.mmu_invalidate_in_progress += 1  # mmu_notifier_invalidate_range_start
        removed = 0
        for slot in list(vm.pgtable.leaves(chunk, chunk + (1 << shift))):
            self.kvmppc_unmap_pte(vm, vm.pgtable, slot.addr, slot.pte, slot.gpa, slot.shift, vm.lpid, memslot)
            removed += 1
        vm.mmu_invalidate_in_progress -= 1  # mmu_notifier_invalidate_range_end
        vm.mmu_invalidate_seq += 1
        vm.thp_collapsing.add(chunk)  # the PMD is absent until the collapse completes
        self.stats["host_thp_collapse"] += 1
        return removed

    def memslot_by_index(self, vm: L1Vm, index: int) -> Memslot:
        for s in vm.memslots:
            if s.index == index:
                return s
        raise ConfigError(f"L1 {vm.name!r} has no memslot {index}")

    def set_dirty_logging(self, vm: L1Vm, index: int, enabled: bool) -> int:
        """Toggle KVM_MEM_LOG_DIRTY_PAGES: flush the slot's mappings (kvmppc_radix_flush_memslot)."""
        memslot = self.memslot_by_index(vm, index)
        if memslot.dirty_logging == enabled:
            return 0
        vm.mmu_invalidate_in_progress += 1
        removed = 0
        for slot in list(vm.pgtable.leaves(memslot.base, memslot.base + memslot.size)):
            self.kvmppc_unmap_pte(vm, vm.pgtable, slot.addr, slot.pte, slot.gpa, slot.shift, vm.lpid, memslot)
            removed += 1
        memslot.dirty_logging = enabled
        memslot.dirty.clear()
        vm.mmu_invalidate_in_progress -= 1
        vm.mmu_invalidate_seq += 1  # "Close race with page faults around memslot flushes"
        return removed

    def harvest_dirty(self, vm: L1Vm, index: int) -> list[int]:
        """KVM_GET_DIRTY_LOG: clear C in L0's PTEs and, via the rmap, in shadow PTEs.

        Returns the L1 real addresses of dirty base pages, sorted.  Dirtiness is judged from
        L0's C bit alone, valid because shadow C => L0 C.
        """
        memslot = self.memslot_by_index(vm, index)
        if not memslot.dirty_logging:
            raise ConfigError(f"dirty logging is not enabled on memslot {index} of {vm.name!r}")
        page_shift = self.page_shift
        dirty = set(memslot.dirty)
        memslot.dirty.clear()
        for slot in list(vm.pgtable.leaves(memslot.base, memslot.base + memslot.size)):
            if not slot.pte & f.PTE_C:
                continue
            vm.pgtable.mem.write_u64(slot.addr, slot.pte & ~f.PTE_C)
            self.tlbie_page(vm.lpid, slot.gpa, slot.shift, reason="rc_clear")
            gfn = slot.gpa >> page_shift
            self.kvmhv_update_nest_rmap_rc_list(vm, memslot, gfn, f.PTE_C, 0, slot.pte & f.PTE_RPN_MASK, 1 << slot.shift)
            for g in range(gfn, gfn + (1 << (slot.shift - page_shift))):
                dirty.add(g)
        if not self.bugs.dirty_harvest_no_seq_bump:
            # The 2019 fix (absent from mainline): a fault that sampled C must retry.
            vm.mmu_invalidate_seq += 1
        self.stats["dirty_harvests"] += 1
        return sorted(g << page_shift for g in dirty)

    # ================================================================ inspection
    def shadow_leaves(self, gp: KvmNestedGuest) -> list[Slot]:
        return [] if gp.shadow_pgtable is None else list(gp.shadow_pgtable.leaves())


@dataclass(frozen=True)
class NestRmapCount:
    """Nested rmap entries of all L1s: ``live`` ones name a shadow leaf that still maps the
    L1 page they are filed under; the rest are ``stale`` (allowed by I6; see docs)."""

    entries: int
    live: int
    stale: int


def count_nest_rmap(l0: L0Hypervisor) -> NestRmapCount:
    """Count live and stale nested rmap entries (a pure read; not kept on the hot path).

    An entry is live exactly when kvmhv_remove_nest_rmap would act on it if the L1 page were
    invalidated now: its lpid is a registered nested guest (``__find_nested``), whose shadow
    tree has a present leaf at the entry's n_gpa, whose RPN lies in the L0 page at the gfn.
    """
    entries = live = 0
    for vm in l0.l1s.values():
        leaves: dict[int, tuple[dict[tuple[int, int], int], list[int]]] = {}  # l1_lpid -> ({(gpa, shift): pte}, shifts)
        for memslot in vm.memslots:
            for gfn, lst in memslot.rmap.items():
                entries += len(lst)
                l0slot = vm.pgtable.lookup_leaf(gfn << l0.page_shift)
                if l0slot is None:
                    continue
                mask = f.PTE_RPN_MASK & ~((1 << l0slot.shift) - 1)
                hpa = l0slot.pte & mask
                for entry in lst:
                    pte = _nested_leaf_at(vm, leaves, f.rmap_entry_lpid(entry), f.rmap_entry_gpa(entry))
                    if pte is not None and pte & mask == hpa:
                        live += 1
    return NestRmapCount(entries, live, entries - live)


def _nested_leaf_at(vm: L1Vm, cache: dict[int, tuple[dict[tuple[int, int], int], list[int]]], l1_lpid: int, n_gpa: int) -> int | None:
    """PTE of the registered nested guest's shadow leaf covering n_gpa (leaves and their
    sizes cached per lpid: recomputing the sizes per entry made GetStats quadratic, seconds
    of L0's event loop with a few thousand leaves)."""
    got = cache.get(l1_lpid)
    if got is None:
        gp = vm.nested.get(l1_lpid)
        tbl = gp.shadow_pgtable if gp is not None else None
        leaves = {} if tbl is None else {(s.gpa, s.shift): s.pte for s in tbl.leaves()}
        got = cache[l1_lpid] = (leaves, sorted({shift for _, shift in leaves}))
    leaves, shifts = got
    for shift in shifts:
        pte = leaves.get((n_gpa & ~((1 << shift) - 1), shift))
        if pte is not None:
            return pte
    return None


def _code_name(code: int) -> str:
    return {
        f.DSISR_NOHPTE: "NOHPTE",
        f.DSISR_PROTFAULT: "PROTFAULT",
        f.SRR1_ISI_N_G_OR_CIP: "NOEXEC",
        f.DSISR_UNSUPP_MMU: "UNSUPP_MMU",
        f.DSISR_PRTABLE_FAULT: "PRTABLE_FAULT",
    }.get(code, f"{code:#x}")

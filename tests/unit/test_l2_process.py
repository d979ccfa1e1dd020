"""The L2 OS's own translation: process table, per-PID trees and the 2-D hardware walk.

Each test names the kernel, ISA or QEMU function whose behaviour it checks.  Reference counts
are counted by hand in the docstrings (no page-walk caches): a walk of p process-scoped
levels over a q-level shadow reads the process-table entry and p tree entries (p + 1 reads),
each preceded by the q shadow reads that translate its L2 real address, then q shadow reads
for the final address: (p + 1)(q + 1) + q.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from nestmmu.core import formats as f
from nestmmu.core.effects import AccessResult, Invalidation, Outcome, Scope, Translation
from nestmmu.core.formats import Access, H
from nestmmu.core.l0 import ConfigError
from nestmmu.core.l1 import MemslotSpec
from nestmmu.core.l2 import TLB_SINGLE_PAGE_FLUSH_CEILING, KernelOps, L2Error, L2Kernel
from nestmmu.core.sim import InProcessCluster, VcpuSession
from nestmmu.core.vcpu import Tlb
from nestmmu.core.workload import WorkloadSpec

LOAD, STORE, IFETCH = Access.LOAD, Access.STORE, Access.IFETCH
P64K = 1 << 16
EA = 0x1000_0000  # a user address (quadrant 0)
RO = f.PTE_EAA_READ
RW = f.PTE_EAA_READ | f.PTE_EAA_RW
RWX = RW | f.PTE_EAA_EXEC


Booted = tuple[InProcessCluster, VcpuSession, L2Kernel]


def boot(data: bool = False, guest_shift: int = 16, l2_shift: int = 16, memslots: list[MemslotSpec] | None = None) -> Booted:
    c = InProcessCluster()
    c.add_l1("a", memslots)
    lpid = c.create_guest("a", page_shift=guest_shift, memory=64 << 20, data=data)
    s = c.attach_vcpu("a", lpid, 0, pid=1)
    k = c.boot_l2_kernel(s, page_shift=l2_shift, pids=(0, 1, 2))
    return c, s, k


def walk_again(c: InProcessCluster, s: VcpuSession, ea: int, kind: Access = LOAD, pid: int = 1) -> AccessResult:
    """One more access with an empty TLB, everything already faulted in: one hardware walk."""
    s.vcpu.tlb.clear()
    res: AccessResult = c.drive(c.l0.run_access(s.gp, s.vcpu.vcpu_id, ea, kind, pid=pid))
    return res


# ------------------------------------------------------------------ the L2 kernel itself
def test_create_process_writes_a_radix_process_table_entry() -> None:
    """Linux radix__init_new_context / mmu_partition_table_set_entry's process-table half:
    PRTB + 16*PID gets dw0 = RTS(52) | __pa(pgd) | RADIX_PGD_INDEX_SIZE, no HR bit."""
    k = L2Kernel(64 << 20)
    assert k.setup().stores == []
    dw1 = k.proc_tbl_dw1()
    assert f.pate_prtb(dw1) == k.process_table and f.pate_prts(dw1) == 4 and dw1 & f.PATE_GR
    ops = k.create_process(5)
    root = k.procs[5].tree.root
    assert ops.stores == [(k.process_table + 5 * 16, f.make_prte_dw0(root, 13))]
    assert f.pate_rts(ops.stores[0][1]) == f.RTS_52BIT and not ops.stores[0][1] & f.PATE_HR
    with pytest.raises(L2Error):
        k.create_process(5)
    with pytest.raises(L2Error):
        k.create_process(k.max_pids())


def test_map_builds_pdes_then_the_leaf_in_order() -> None:
    """Linux __handle_mm_fault / set_pte_at on a radix tree: PUD, PMD and PTE-page PDEs are
    written top-down before the leaf; a populated page has R set and C clear."""
    k = L2Kernel(64 << 20)
    k.setup()
    k.create_process(1)
    ops = k.map(1, EA, P64K, RW)
    assert len(ops.stores) == 4 and ops.invalidations == []
    *pdes, (leaf_addr, leaf) = ops.stores
    assert all(v & f.PTE_V and not v & f.PTE_L for _, v in pdes)
    assert [v & f.PDE_NLS_MASK for _, v in pdes] == [9, 9, 5]  # 13/9/9/5 for 64K pages
    assert leaf & f.PTE_L and leaf & f.PTE_R and not leaf & f.PTE_C and leaf & f.PTE_PERM_MASK == RW
    slot = k.lookup(1, EA)
    assert slot is not None and slot.addr == leaf_addr
    assert k.table_alloc.base <= leaf_addr < k.data_alloc.base <= f.pte_rpn(leaf)


def test_unmap_flushes_by_address_then_by_pid_past_the_ceiling() -> None:
    """Linux radix__flush_tlb_range: one tlbie (PRS=1, IS=0) per page up to
    tlb_single_page_flush_ceiling pages, else one tlbie of the whole PID (IS=1)."""
    k = L2Kernel(64 << 20)
    k.setup()
    k.create_process(1)
    k.map(1, EA, 4 * P64K)
    ops = k.unmap(1, EA, 4 * P64K)
    assert [(i.scope, i.address, i.size, i.prs, i.pid) for i in ops.invalidations] == [(Scope.ADDRESS, EA + n * P64K, P64K, True, 1) for n in range(4)]
    assert all(v == 0 for _, v in ops.stores) and len(ops.stores) == 4
    n = TLB_SINGLE_PAGE_FLUSH_CEILING + 1
    k.map(1, EA, n * P64K)
    ops = k.unmap(1, EA, n * P64K)
    assert [(i.scope, i.pid, i.prs) for i in ops.invalidations] == [(Scope.PID, 1, True)]
    assert ops.tagged(7)[0].lpid == 7


def test_handle_fault_demand_maps_sets_rc_and_segfaults() -> None:
    """Linux do_page_fault -> __handle_mm_fault: do_anonymous_page (young, dirty on a write),
    handle_pte_fault's ptep_set_access_flags for R/C, and SIGSEGV when the VMA forbids."""
    k = L2Kernel(64 << 20)
    k.setup()
    k.create_process(1)
    ops = k.handle_fault(1, EA + 8, STORE, f.DSISR_NOHPTE | f.DSISR_ISSTORE)
    assert ops is not None and ops.invalidations == []
    slot = k.lookup(1, EA)
    assert slot is not None and slot.pte & f.PTE_R and slot.pte & f.PTE_C
    k.map(1, 2 * EA, P64K, RW)  # populated clean
    ops = k.handle_fault(1, 2 * EA, STORE, f.DSISR_SET_RC | f.DSISR_ISSTORE)
    assert ops is not None and len(ops.stores) == 1 and ops.stores[0][1] & f.PTE_C
    k.protect(1, 2 * EA, P64K, RO)
    assert k.handle_fault(1, 2 * EA, STORE, f.DSISR_PROTFAULT | f.DSISR_ISSTORE) is None
    assert k.handle_fault(1, 2 * EA, IFETCH, 0) is None
    assert k.handle_fault(9, EA, LOAD, 0) is None  # no such mm
    assert k.handle_fault(1, (1 << 62) | EA, LOAD, 0) is None  # quadrant 1: segment interrupt


def test_protect_downgrade_clears_c_and_flushes() -> None:
    """Linux change_protection + flush_tlb_range: a read-only leaf loses write (and C)."""
    k = L2Kernel(64 << 20)
    k.setup()
    k.create_process(1)
    k.map(1, EA, P64K, RW)
    k.handle_fault(1, EA, STORE)
    ops = k.protect(1, EA, P64K, RO)
    slot = k.lookup(1, EA)
    assert slot is not None and slot.pte & f.PTE_PERM_MASK == RO and not slot.pte & f.PTE_C
    assert [(i.scope, i.address, i.prs) for i in ops.invalidations] == [(Scope.ADDRESS, EA, True)]
    assert k.protect(1, EA, P64K, RO).invalidations == []  # nothing changed, nothing flushed


# ------------------------------------------------------------------ H_REGISTER_PROC_TBL
def test_register_proc_tbl_writes_pate_dw1_and_flushes_with_ric2() -> None:
    """Linux-as-L1 kvmhv_set_ptbl_entry -> kvmhv_flush_lpid (RIC=2); L0's
    kvmhv_flush_nested -> kvmhv_update_ptbl_cache re-reads the PATE and
    kvmhv_set_nested_ptbl copies dw1 into the shadow PATE the hardware walks."""
    c, s, k = boot()
    l1 = c.l1s["a"]
    dw0, dw1 = struct.unpack(">QQ", l1.read_memory(l1.partition_table + s.l1_lpid * 16, 16) or b"")
    assert dw1 == k.proc_tbl_dw1() and dw0 == l1.guest(s.l1_lpid).pate_dw0()
    assert s.gp.process_table == dw1
    assert c.l0.read_ptbl_entry(s.gp.shadow_lpid)[1] == dw1
    hcalls = l1.h_register_proc_tbl(s.l1_lpid, k.proc_tbl_dw1())
    assert len(hcalls) == 1 and hcalls[0] == l1._flush_lpid_hcall(s.l1_lpid)
    with pytest.raises(ConfigError):
        l1.h_register_proc_tbl(s.l1_lpid, f.make_pate_dw1(k.process_table, 25))


# ------------------------------------------------------------------ the 2-D walk
def test_ea_access_demand_maps_and_fills_an_ea_translation() -> None:
    """The hardware walk (QEMU ppc_radix64_process_scoped_xlate then
    ppc_radix64_partition_scoped_xlate): the TLB entry maps the EA page, tagged with the
    PID, to the host frame behind the L2 real page L2's leaf names."""
    c, s, k = boot()
    res = c.access_ea(s, EA + 0x18, STORE)
    assert res.outcome is Outcome.FILL and res.translation is not None
    t = res.translation
    slot = k.lookup(1, EA)
    assert slot is not None
    real = f.pte_rpn(slot.pte)
    assert (t.pid, t.page, t.real_page, t.shift) == (1, EA, real, 16)
    shadow = s.gp.shadow_pgtable.lookup_leaf(real) if s.gp.shadow_pgtable else None
    assert shadow is not None and t.host == f.pte_rpn(shadow.pte) + (real - shadow.gpa)
    assert s.vcpu.tlb.lookup(s.vcpu.lpid, EA, 1) is not None
    assert s.vcpu.tlb.lookup(s.vcpu.lpid, EA) is None  # not a real-mode translation
    assert c.audit().ok


def test_refs_fully_mapped_4_level_tree_over_4_level_shadow_is_29() -> None:
    """Counted by hand (ISA radix 2-D walk, no page-walk cache, PATE cached): the 64K-page
    L2 tree has 4 levels (13/9/9/5) and so has the shadow table (L0's 64K RadixTable).
    Process-table entry: 4 shadow reads + 1; root, PUD, PMD, PTE: 4 x (4 + 1) = 20; final
    address: 4.  4 + 1 + 20 + 4 = 29 = (p + 1)(q + 1) + q with p = q = 4."""
    c, s, _ = boot()
    assert c.access_ea(s, EA, LOAD).outcome is Outcome.FILL
    before = dict(c.l0.stats)
    res = walk_again(c, s, EA + 8)
    assert res.outcome is Outcome.FILL and res.refs == 29
    assert c.l0.stats["walks_2d"] - before.get("walks_2d", 0) == 1
    assert c.l0.stats["walk_refs_2d"] - before.get("walk_refs_2d", 0) == 29
    assert c.l0.stats["walk_refs_shadow"] - before.get("walk_refs_shadow", 0) == 24
    assert c.l0.stats["walk_refs_process"] - before.get("walk_refs_process", 0) == 5
    # The real-mode (partition-only) walk of the same L2 real page: q = 4.
    real = res.translation.real_page if res.translation else 0
    assert walk_again(c, s, real, LOAD, pid=-1).refs == 4


def test_refs_counted_not_computed_with_2m_shadow_leaves() -> None:
    """Same walk over a 3-level shadow (2M guest pages backed by THP: shadow leaves at the
    PMD level, kvmppc_create_pte level 1).  By hand: (4 + 1) x (3 + 1) + 3 = 23 — the count
    follows the tree actually walked, not a fixed formula."""
    slots = [MemslotSpec(0, 0, 16 << 30, backing_shift=21)]
    c, s, _ = boot(guest_shift=21, memslots=slots)
    assert c.access_ea(s, EA, LOAD).outcome is Outcome.FILL
    res = walk_again(c, s, EA + 8)
    assert res.outcome is Outcome.FILL and res.refs == 23
    assert res.translation is not None and res.translation.shift == 16  # the smaller leaf


def test_4k_process_pages_over_64k_shadow_fill_4k_entries() -> None:
    """The TLB entry has the smaller page size of the two leaves (ISA: the combined
    translation); a 4K L2 tree is 13/9/9/9, still 4 levels: 29 references."""
    c, s, _ = boot(l2_shift=12)
    assert c.access_ea(s, EA + 0x1008, LOAD).outcome is Outcome.FILL
    res = walk_again(c, s, EA + 0x1008)
    assert res.refs == 29 and res.translation is not None
    assert res.translation.shift == 12 and res.translation.page == EA + 0x1000


def test_shadow_miss_on_a_table_read_is_an_hdsi_with_prtable_fault() -> None:
    """ISA / QEMU ppc_radix64_partition_scoped_xlate with pde_addr: a partition-scoped miss
    while reading a process-scoped table entry raises HDSI with DSISR_PRTABLE_FAULT, HDAR =
    the EA, ASDR = the entry's guest real address, ISSTORE from the original access; KVM's
    __kvmhv_nested_page_fault then uses ASDR without the EA's low bits (§3 step 2)."""
    c, s, k = boot()
    assert c.access_ea(s, EA, LOAD).outcome is Outcome.FILL
    prte = k.prte_addr(1)
    c.l0.kvmhv_invalidate_shadow_pte(s.gp, prte)  # the table page's shadow leaf is gone
    c.deliver(c.l0.take_invalidations())
    w = c.l0.radix_2d_translate(s.gp, EA + 0x123, STORE, 1)
    assert w.exit is not None and w.result is None
    assert w.exit.trap == f.BOOK3S_INTERRUPT_H_DATA_STORAGE
    assert w.exit.hdsisr == f.DSISR_NOHPTE | f.DSISR_PRTABLE_FAULT | f.DSISR_ISSTORE
    assert (w.exit.hdar, w.exit.asdr) == (EA + 0x123, prte)
    assert w.refs == 4  # the shadow walk that missed
    # L0 absorbs it (L1 still maps the page): the shadow leaf comes back, the access fills.
    faults = c.l0.stats["nested_faults"]
    s.vcpu.tlb.clear()
    res = c.access_ea(s, EA + 0x123, LOAD)
    assert res.outcome is Outcome.FILL
    assert c.l0.stats["nested_faults"] == faults + 1 and c.l0.stats["prtable_faults"] >= 2
    assert s.gp.shadow_pgtable is not None and s.gp.shadow_pgtable.lookup_leaf(prte) is not None


def test_prtable_fault_reflected_to_l1_faults_in_the_table_page() -> None:
    """__kvmhv_nested_page_fault: L1's tree has no leaf for the table page, so the exit is
    reflected as NOHPTE with ASDR = the entry's address (kvmhv_translate_addr_nested's code
    replaces PRTABLE_FAULT); Linux-as-L1 maps that page like any fault and re-enters."""
    c, s, k = boot(data=True)
    assert c.access_ea(s, EA, LOAD).outcome is Outcome.FILL
    l1 = c.l1s["a"]
    table_page = k.prte_addr(1) & ~(P64K - 1)
    c.issue_all("a", l1.unmap_pages(s.l1_lpid, table_page, P64K)[1])  # L1 swaps it out
    s.vcpu.tlb.clear()
    reflected = c.l0.stats["reflected.NOHPTE"]
    res = c.access_ea(s, EA, LOAD)
    assert res.outcome is Outcome.FILL
    assert c.l0.stats["reflected.NOHPTE"] == reflected + 1
    assert l1.stats.get("exit.swap_in", 0) == 1  # the table's bytes came back with the page
    assert c.audit().ok


def test_process_scoped_faults_go_to_the_guest_without_an_exit() -> None:
    """ISA radix process-scoped checks (QEMU ppc_radix64_check_prot): invalid entry, no
    permission, or R / C missing in L2's own leaf is a DSI to the L2 OS (DSISR NOHPTE /
    PROTFAULT / SET_RC, | ISSTORE) — L0 sees no HDSI and L1 no exit (§10.4)."""
    c, s, k = boot()
    c.apply_kernel_ops(s, k.map(1, EA, P64K, RO))
    assert c.access_ea(s, EA, LOAD).outcome is Outcome.FILL
    faults, exits = c.l0.stats["nested_faults"], c.stats["exits_reflected"]
    s.vcpu.tlb.clear()
    res = walk_again(c, s, EA, STORE)
    assert res.outcome is Outcome.GUEST_FAULT and res.dsisr == f.DSISR_PROTFAULT | f.DSISR_ISSTORE
    res = walk_again(c, s, EA + 4 * P64K, LOAD)  # nothing mapped there yet
    assert res.outcome is Outcome.GUEST_FAULT and res.dsisr == f.DSISR_NOHPTE
    res = walk_again(c, s, EA, IFETCH)
    assert res.outcome is Outcome.GUEST_FAULT and res.dsisr == f.SRR1_ISI_N_G_OR_CIP
    c.apply_kernel_ops(s, k.map(1, 2 * EA, P64K, RW))  # populated clean: C clear
    res = walk_again(c, s, 2 * EA, STORE)
    assert res.outcome is Outcome.GUEST_FAULT and res.dsisr == f.DSISR_SET_RC | f.DSISR_ISSTORE
    assert (c.l0.stats["nested_faults"], c.stats["exits_reflected"]) == (faults, exits)
    # The L2 OS sets C itself, and the store then fills with C in the combined entry.
    res = c.access_ea(s, 2 * EA, STORE)
    assert res.outcome is Outcome.FILL and res.translation is not None and res.translation.pte & f.PTE_C
    assert c.access_ea(s, EA, STORE).outcome is Outcome.GUEST_FAULT  # SIGSEGV: read-only VMA
    assert c.stats["l2_segv"] == 1


def test_quadrants_pid_selection_and_privilege() -> None:
    """ppc_radix64_get_fully_qualified_addr for MSR[HV]=0: quadrant 0 uses PIDR, quadrant 3
    PID 0 (the kernel, MSR[PR]=0); quadrants 1 and 2 and EA bits 2:11 are a segment
    interrupt.  A problem-state access to a privileged (EAA[0]) leaf is a protection fault."""
    c, s, k = boot()
    kernel_ea = (3 << 62) | EA
    res = c.access_ea(s, kernel_ea, LOAD)
    assert res.outcome is Outcome.FILL and res.translation is not None and res.translation.pid == 0
    slot = k.lookup(0, EA)
    assert slot is not None and slot.pte & f.PTE_EAA_PRIV and k.lookup(1, EA) is None
    for bad in ((1 << 62) | EA, (2 << 62) | EA, (1 << 55) | EA):
        r = walk_again(c, s, bad)
        assert r.outcome is Outcome.GUEST_FAULT and "segment interrupt" in r.detail
    # PIDR = 0 in quadrant 0: PID 0's tree, but as a user: the kernel's page is refused.
    r = walk_again(c, s, EA, LOAD, pid=0)
    assert r.outcome is Outcome.GUEST_FAULT and r.dsisr == f.DSISR_PROTFAULT


def test_pid_beyond_the_process_table_faults() -> None:
    """QEMU ppc_radix64_process_scoped_xlate: PID * 16 >= 2^(PRTS+12) is a DSI (NOPTE)."""
    c, s, k = boot()
    r = walk_again(c, s, EA, LOAD, pid=k.max_pids())
    assert r.outcome is Outcome.GUEST_FAULT and r.dsisr == f.DSISR_NOHPTE and "beyond" in r.detail
    assert r.refs == 0


# ------------------------------------------------------------------ TLB by (LPID, PID)
def test_tlb_is_keyed_by_lpid_and_pid() -> None:
    """ISA: TLB entries are tagged with LPID and PID; process-scoped tlbie (PRS=1) by
    address hits only its PID, by PID (IS=1) all of that PID, never real-mode entries."""
    t = Tlb()
    pte = f.make_pte(0x90000, RW, r=True, c=True)
    t.fill(Translation(5, EA, 0x90000, 16, pte, pid=1, real_page=0x800000))
    t.fill(Translation(5, EA, 0xA0000, 16, pte, pid=2, real_page=0x810000))
    t.fill(Translation(5, EA, 0xB0000, 16, pte))  # real mode, same number
    assert t.mask(5, EA, 1) and t.mask(5, EA, 2) and t.mask(5, EA) and not t.mask(5, EA, 3)
    assert t.lookup(5, EA, 2) is not None and t.lookup(5, EA, 2).host == 0xA0000  # type: ignore[union-attr]
    assert t.invalidate(Invalidation(5, Scope.ADDRESS, EA, P64K, prs=True, pid=1)) == 1
    assert not t.mask(5, EA, 1) and t.mask(5, EA, 2) and t.mask(5, EA)
    assert t.invalidate(Invalidation(5, Scope.PID, prs=True, pid=2)) == 1
    assert not t.mask(5, EA, 2) and t.mask(5, EA)
    assert t.invalidate(Invalidation(5, Scope.PID, prs=True, pid=9)) == 0


def test_partition_scoped_tlbie_drops_ea_entries_of_that_real_page() -> None:
    """ISA tlbie (PRS=0, IS=0): removes every entry derived from the partition-scoped
    translation of that guest real page, including combined EA entries of any PID (what
    kvmhv_emulate_tlbie_tlb_addr relies on when L1 unmaps an L2 page)."""
    t = Tlb()
    pte = f.make_pte(0x90000, RW, r=True, c=True)
    t.fill(Translation(5, EA, 0x90000, 16, pte, pid=1, real_page=0x800000))
    t.fill(Translation(5, 2 * EA, 0x90000, 16, pte, pid=2, real_page=0x800000))
    t.fill(Translation(5, 3 * EA, 0xA0000, 16, pte, pid=1, real_page=0x810000))
    assert t.invalidate(Invalidation(5, Scope.ADDRESS, 0x800000, P64K)) == 2
    assert t.mask(5, 3 * EA, 1) and not t.mask(5, EA, 1) and not t.mask(5, 2 * EA, 2)
    assert t.invalidate(Invalidation(5, Scope.LPID)) == 1 and len(t) == 0


def test_l1_unmap_of_an_l2_page_reaches_the_ea_entry() -> None:
    """End to end: Linux-as-L1 unmaps the L2 real page (H_RPT_INVALIDATE), L0's
    kvmhv_emulate_tlbie_tlb_addr unmaps the shadow leaf and tlbies it partition scoped, and
    the vCPU's EA entry for that page is gone."""
    c, s, _ = boot()
    res = c.access_ea(s, EA, STORE)
    assert res.translation is not None
    real = res.translation.real_page
    assert s.vcpu.tlb.lookup(s.vcpu.lpid, EA, 1) is not None
    c.issue_all("a", c.l1s["a"].unmap_pages(s.l1_lpid, real, P64K)[1])
    assert s.vcpu.tlb.lookup(s.vcpu.lpid, EA, 1) is None
    assert c.audit().ok


def test_l2_kernel_tlbies_reach_every_vcpu_of_the_lpid() -> None:
    """A guest's own process-scoped tlbie is broadcast (tlbie + tlbsync) to every CPU
    running that LPID: both vCPUs drop the EA entry of the unmapped page."""
    c, s, k = boot()
    s2 = c.attach_vcpu("a", s.l1_lpid, 1, pid=1)
    for v in (s, s2):
        assert c.access_ea(v, EA, LOAD).outcome is Outcome.FILL
        assert v.vcpu.tlb.lookup(v.vcpu.lpid, EA, 1) is not None
    c.apply_kernel_ops(s, k.unmap(1, EA, P64K))
    assert all(v.vcpu.tlb.lookup(v.vcpu.lpid, EA, 1) is None for v in (s, s2))


def test_vcpu_batches_hit_per_pid() -> None:
    """Vcpu._scan looks up the (LPID, PIDR) context (quadrant 3: PID 0): a second pass over
    the same EAs is all hits, and another PID misses."""
    c, s, _ = boot()
    addrs = [EA + i * 0x1000 for i in range(32)] + [(3 << 62) | EA]
    kinds = [int(LOAD)] * len(addrs)
    c.run_batch(s, addrs, kinds)
    hits = s.vcpu.stats["tlb_hits"]
    c.run_batch(s, addrs, kinds)
    assert s.vcpu.stats["tlb_hits"] == hits + len(addrs)
    s.vcpu.pid = 2
    c.run_batch(s, addrs[:1], kinds[:1])
    assert s.vcpu.stats["tlb_hits"] == hits + len(addrs)


# ------------------------------------------------------------------ H_COPY_TOFROM_GUEST
def test_h_copy_tofrom_guest_translates_pid_and_ea_through_l2_tables() -> None:
    """kvmhv_copy_tofrom_guest_radix -> __kvmhv_copy_tofrom_guest_radix: quadrant 1 with
    PID = pid (quadrant 2 with PID 0 when pid is 0), LPIDR = the shadow LPID, page faults
    disabled: the bytes of (PID, EA) are copied; an EA L2 never touched is H_NOT_FOUND."""
    c, s, _ = boot(data=True)
    vm, l1 = c.vms["a"], c.l1s["a"]
    scratch = 0x10_0000
    res = c.access_ea(s, EA + 0x40, STORE)
    assert res.translation is not None
    c.l0.data_store(res.translation.host + 0x40, 0xFEED_F00D)
    rc = c.drive(c.l0.h_copy_tofrom_guest(vm, s.l1_lpid, 1, EA + 0x40, scratch, 0, 8))
    assert rc == H.SUCCESS and l1.read_memory(scratch, 8) == struct.pack(">Q", 0xFEED_F00D)
    # Same EA, another PID (never touched): not found.  PID 0 walks the kernel's tree.
    assert c.drive(c.l0.h_copy_tofrom_guest(vm, s.l1_lpid, 2, EA + 0x40, scratch, 0, 8)) == H.NOT_FOUND
    assert c.drive(c.l0.h_copy_tofrom_guest(vm, s.l1_lpid, 0, EA + 0x40, scratch, 0, 8)) == H.NOT_FOUND
    kres = c.access_ea(s, (3 << 62) | EA, STORE)
    assert kres.translation is not None
    c.l0.data_store(kres.translation.host, 0xC0DE)
    assert c.drive(c.l0.h_copy_tofrom_guest(vm, s.l1_lpid, 0, EA, scratch, 0, 8)) == H.SUCCESS
    assert l1.read_memory(scratch, 8) == struct.pack(">Q", 0xC0DE)
    # Into L2: the store lands where the L2 process reads it.
    l1.write_memory(scratch, struct.pack(">Q", 0x1234))
    assert c.drive(c.l0.h_copy_tofrom_guest(vm, s.l1_lpid, 1, EA + 0x40, 0, scratch, 8)) == H.SUCCESS
    assert c.l0.data_load(res.translation.host + 0x40) == 0x1234
    # The L2 real address of that page is not an EA of PID 1.
    assert c.drive(c.l0.h_copy_tofrom_guest(vm, s.l1_lpid, 1, res.translation.real_page + 0x40, scratch, 0, 8)) == H.NOT_FOUND


def test_h_copy_tofrom_guest_needs_rc_in_l2_leaf() -> None:
    """Page faults are disabled in the quadrant copy: a store into a page L2 mapped clean
    (C clear in its own leaf) takes a process-scoped fault, so the copy is short:
    H_NOT_FOUND."""
    c, s, k = boot(data=True)
    c.apply_kernel_ops(s, k.map(1, EA, P64K, RW))
    assert c.access_ea(s, EA, LOAD).outcome is Outcome.FILL
    vm = c.vms["a"]
    assert c.drive(c.l0.h_copy_tofrom_guest(vm, s.l1_lpid, 1, EA, 0x10_0000, 0, 8)) == H.SUCCESS
    assert c.drive(c.l0.h_copy_tofrom_guest(vm, s.l1_lpid, 1, EA, 0, 0x10_0000, 8)) == H.NOT_FOUND


# ------------------------------------------------------------------ workloads
def test_lackey_trace_replays_effective_addresses_unfolded(tmp_path: Path) -> None:
    """With ``ea`` a lackey trace's addresses are effective addresses of PIDR's process:
    the TLB holds EA pages exactly as traced (no folding into the footprint)."""
    trace = tmp_path / "t.lackey"
    trace.write_text("I  04000000,4\n L 1ffefff8c0,8\n S 1ffefff8c8,8\n M 0601f000,4\n")
    c, s, k = boot()
    spec = WorkloadSpec(pattern="trace", trace_path=str(trace), accesses=5, virtual=True, footprint=1 << 20)
    c.run_workload(s, spec)
    pages = {e.page for e in s.vcpu.tlb.entries() if e.pid == 1}
    assert pages == {0x0400_0000, 0x1F_FEFF_0000, 0x0601_0000}
    assert k.lookup(1, 0x1F_FEFF_F8C0) is not None
    assert c.audit().ok


def test_kernel_ops_stores_take_nested_faults_like_any_store() -> None:
    """The L2 kernel's table writes are real-mode stores of the L2 vCPU: a fresh table page
    is faulted in through L0 and L1 (a nested fault) before the store lands."""
    c, s, k = boot()
    faults = c.l0.stats["nested_faults"]
    ops = k.map(1, 1 << 40, P64K)  # new PUD/PMD/PTE pages
    assert isinstance(ops, KernelOps) and len(ops.stores) == 4
    c.apply_kernel_ops(s, ops)
    assert c.l0.stats["nested_faults"] > faults
    assert c.access_ea(s, 1 << 40, LOAD).outcome is Outcome.FILL


def test_kernel_page_flush_uses_the_quadrant_3_address() -> None:
    """tlbie's RB carries the full EA: the L2 kernel's own pages (PID 0) are flushed at their
    quadrant-3 address (Linux radix__flush_tlb_kernel_range on 0xC000... addresses), which
    is what the TLB entry of a quadrant-3 access is tagged with."""
    c, s, k = boot()
    kea = (3 << 62) | EA
    assert c.access_ea(s, kea, LOAD).outcome is Outcome.FILL
    ops = k.protect(0, EA, P64K, 0)
    assert [i.address for i in ops.invalidations] == [kea]
    c.apply_kernel_ops(s, ops)
    assert s.vcpu.tlb.lookup(s.vcpu.lpid, kea, 0) is None
    assert c.access_ea(s, kea, LOAD).outcome is Outcome.GUEST_FAULT


# ------------------------------------------------------------------ L2's own H_RPT_INVALIDATE
def test_l2_process_scoped_rpt_invalidate_is_done_by_l0_for_the_shadow_lpid() -> None:
    """book3s_hv.c kvmppc_nested_h_rpt_invalidate -> radix_tlb.c do_h_rpt_invalidate_prt:
    a NESTED request goes to L1 (RESUME_HOST); otherwise L0 flushes (shadow LPID, PID):
    TLB|PWC|PRT by PID with RIC=2, the full range by PID, a range per page up to the
    ceiling, past it by PID — and returns H_SUCCESS to L2."""
    c, s, _ = boot()
    l0, lpid = c.l0, s.gp.shadow_lpid
    assert l0.kvmppc_nested_h_rpt_invalidate(s.gp, 1, f.H_RPTI_TYPE_NESTED | f.H_RPTI_TYPE_TLB, f.H_RPTI_PAGE_ALL, 0, f.U64) is None
    assert l0.take_invalidations() == []
    cases = [
        (f.H_RPTI_TYPE_ALL, f.H_RPTI_PAGE_ALL, EA, EA + P64K, [(Scope.PID, 0)]),
        (f.H_RPTI_TYPE_TLB, f.H_RPTI_PAGE_ALL, 0, f.U64, [(Scope.PID, 0)]),
        (f.H_RPTI_TYPE_TLB, f.H_RPTI_PAGE_64K, EA, EA + 2 * P64K, [(Scope.ADDRESS, EA), (Scope.ADDRESS, EA + P64K)]),
        (f.H_RPTI_TYPE_TLB, f.H_RPTI_PAGE_64K, EA, EA + 34 * P64K, [(Scope.PID, 0)]),
        (f.H_RPTI_TYPE_TLB, f.H_RPTI_PAGE_1G, EA, EA + P64K, [(Scope.ADDRESS, EA)]),
    ]
    for type_, sizes, start, end, want in cases:
        assert l0.kvmppc_nested_h_rpt_invalidate(s.gp, 3, type_, sizes, start, end) == H.SUCCESS
        got = l0.take_invalidations()
        assert [(i.scope, i.address) for i in got] == want
        assert all(i.lpid == lpid and i.prs and i.pid == 3 for i in got)


def test_l2_without_gtse_flushes_with_h_rpt_invalidate() -> None:
    """A pseries L2 without GTSE (pseries_rpt_invalidate from radix__flush_tlb_range) asks
    for its process-scoped flushes with H_RPT_INVALIDATE; L0 performs them and every vCPU of
    the LPID loses the EA entries of the unmapped range."""
    c = InProcessCluster()
    c.add_l1("a")
    lpid = c.create_guest("a", page_shift=16, memory=64 << 20)
    s = c.attach_vcpu("a", lpid, 0, pid=1)
    s2 = c.attach_vcpu("a", lpid, 1, pid=1)
    k = c.boot_l2_kernel(s, use_rpt_invalidate=True)
    for v in (s, s2):
        for n in range(3):
            assert c.access_ea(v, EA + n * P64K, LOAD).outcome is Outcome.FILL
    ops = k.unmap(1, EA, 2 * P64K)
    assert ops.invalidations == [] and ops.rpt_invalidates == [(1, f.H_RPTI_TYPE_TLB, f.H_RPTI_PAGE_64K, EA, EA + 2 * P64K)]
    c.apply_kernel_ops(s, ops)
    assert c.l0.stats["hcall.L2_H_RPT_INVALIDATE"] == 1
    for v in (s, s2):
        assert [e.page for e in v.vcpu.tlb.entries() if e.pid == 1] == [EA + 2 * P64K]


def test_ea_demo_cluster_runs_a_process_through_the_2d_walk() -> None:
    """The in-process 2-D run: every access is an EA of PID 1; misses walk 2-D, hits stay in
    the (LPID, PID) TLB, the audit is clean, and no walk reads more than the 29 entries of a
    full 4 x 4 walk (faulting walks stop early)."""
    from nestmmu.core.sim import ea_demo_cluster

    c = ea_demo_cluster(accesses=3000)
    s = next(iter(c.sessions.values()))
    st = s.vcpu.stats
    assert st["accesses"] == 3000 and st["tlb_hits"] > 2000 and st["errors"] == 0
    assert all(e.pid in (1, -1) for e in s.vcpu.tlb.entries())
    assert 0 < c.l0.stats["walk_refs_2d"] <= 29 * c.l0.stats["walks_2d"]
    assert c.l0.stats["walk_refs_2d"] == c.l0.stats["walk_refs_shadow"] + c.l0.stats["walk_refs_process"]
    assert c.audit().ok


def test_table_read_miss_during_a_fetch_is_an_hisi_with_prtable_fault() -> None:
    """A process-scoped table read that misses the shadow during an instruction fetch is an
    HISI whose SRR1 carries the PRTABLE_FAULT bit (kept by KVM's DSISR_SRR1_MATCH_64S in
    kvmppc_handle_nested_exit) and no ISSTORE; L0 resolves it like an HDSI."""
    c, s, k = boot()
    assert c.access_ea(s, EA, IFETCH).outcome is Outcome.FILL
    slot = k.lookup(1, EA)
    assert slot is not None
    c.l0.kvmhv_invalidate_shadow_pte(s.gp, slot.addr)  # the PTE page's shadow leaf
    c.deliver(c.l0.take_invalidations())
    w = c.l0.radix_2d_translate(s.gp, EA, IFETCH, 1)
    assert w.exit is not None and w.exit.trap == f.BOOK3S_INTERRUPT_H_INST_STORAGE
    assert w.exit.hdsisr == f.DSISR_NOHPTE | f.DSISR_PRTABLE_FAULT and w.exit.hdsisr & f.DSISR_SRR1_MATCH_64S == w.exit.hdsisr
    # The PUD, PMD and PTE pages share that 64K shadow page: the walk misses at the PUD read
    # after the PRTE (4 + 1) and the root (4 + 1) were read, with 4 shadow reads that missed.
    assert w.exit.asdr >> 16 == slot.addr >> 16 and w.exit.asdr != slot.addr
    assert (w.refs, w.process_refs) == (5 + 5 + 4, 2)
    s.vcpu.tlb.clear()
    assert c.access_ea(s, EA, IFETCH).outcome is Outcome.FILL


def test_destroy_process_clears_its_entry_and_flushes_the_pid() -> None:
    """Linux destroy_context / radix__flush_all_mm: the process-table entry is cleared and
    the PID flushed with RIC=2 (IS=1), which drops every EA entry of that PID only."""
    c, s, k = boot()
    s.vcpu.pid = 2
    assert c.access_ea(s, EA, LOAD).outcome is Outcome.FILL
    s.vcpu.pid = 1
    assert c.access_ea(s, EA, LOAD).outcome is Outcome.FILL
    ops = k.destroy_process(2)
    assert (k.prte_addr(2), 0) in ops.stores
    assert [(i.scope, i.pid, i.prs) for i in ops.invalidations] == [(Scope.PID, 2, True)]
    c.apply_kernel_ops(s, ops)
    assert s.vcpu.tlb.lookup(s.vcpu.lpid, EA, 2) is None and s.vcpu.tlb.lookup(s.vcpu.lpid, EA, 1) is not None
    r = walk_again(c, s, EA, LOAD, pid=2)
    assert r.outcome is Outcome.GUEST_FAULT and r.dsisr & f.DSISR_UNSUPP_MMU  # an empty entry: RTS 0

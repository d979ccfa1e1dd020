"""The nested page fault (semantics §3): reflections, instantiation, special memory, page sizes."""

from __future__ import annotations

from _helpers_fault import GiB, MiB, base_page_memslots, make_env

from nestmmu.core import formats as f
from nestmmu.core.effects import NestedExit, Outcome
from nestmmu.core.formats import Access
from nestmmu.core.l0 import L0Config
from nestmmu.core.l1 import GuestRegion

HDSI = f.BOOK3S_INTERRUPT_H_DATA_STORAGE
HISI = f.BOOK3S_INTERRUPT_H_INST_STORAGE
PROTECT = 32 * MiB


def protect_env(perms: int, **kw: object):
    return make_env(regions=[GuestRegion("protect", PROTECT, 2 * MiB, perms)], **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the whole first-touch path
def test_first_load_reflects_nohpte_l1_and_l0_instantiate_then_shadow_leaf_and_tlb_fill() -> None:
    e = make_env()
    addr = 0x10000 + 0x123
    r = e.access(addr, Access.LOAD)

    assert r.outcome is Outcome.FILL
    # Exactly one reflection: NOHPTE, with the L2 address in ASDR and HDAR.
    assert e.exits == [NestedExit(HDSI, addr, f.DSISR_NOHPTE, addr, Access.LOAD)]
    # L1 instantiated a 64K leaf with R, and C because the leaf is writable
    # (kvmppc_book3s_instantiate_page: writing || upgrade_write).
    g = e.l1_leaf(addr)
    assert g.ok and g.page_shift == 16
    assert g.pte & f.PTE_R and g.pte & f.PTE_C
    assert g.pte & f.PTE_PERM_MASK == f.PTE_EAA_READ | f.PTE_EAA_RW | f.PTE_EAA_EXEC
    # L0 instantiated L1 -> L0 with a 2M leaf (default memslot is THP backed), R, and C
    # with the host's write upgrade on this read fault.
    l0 = e.l0_pte(g.raddr)
    assert l0 is not None and l0.shift == 21
    assert l0.pte & f.PTE_R and l0.pte & f.PTE_C
    assert l0.pte & f.PTE_EAA_RW  # host write upgrade on a read fault
    # Shadow leaf: 64K at the L2 page, host RPN = L0 2M page + offset of the L1 page inside it.
    sh = e.shadow(addr)
    assert sh is not None and sh.shift == 16 and sh.gpa == 0x10000
    assert sh.pte & f.PTE_RPN_MASK == (l0.pte & f.PTE_RPN_MASK) + (g.raddr & 0x1F0000)
    assert sh.pte & f.PTE_R and not sh.pte & f.PTE_C
    # The fill the vCPU got is that leaf.
    assert r.translation is not None
    assert r.translation.lpid == e.gp.shadow_lpid
    assert (r.translation.page, r.translation.shift, r.translation.pte) == (0x10000, 16, sh.pte)
    tlb = e.tlb(addr)
    assert tlb is not None and tlb.host == sh.pte & f.PTE_RPN_MASK
    # rmap entry at the L0-page-aligned gfn of the L1 page.
    assert e.memslot().rmap == {l0.gpa >> 16: [e.rmap_entry(0x10000)]}
    st = e.l0.stats
    assert (st["nested_faults"], st["reflected.NOHPTE"], st["l0_instantiate"], st["shadow_inserted"]) == (2, 1, 1, 1)
    assert e.c.audit().ok


def test_second_access_to_a_filled_page_hits_the_shadow_table_without_reflection() -> None:
    e = make_env()
    e.access(0x10000, Access.LOAD)
    e.s.vcpu.tlb.clear()
    r = e.access(0x10008, Access.LOAD)
    assert r.outcome is Outcome.FILL
    assert len(e.exits) == 1
    assert e.l0.stats["shadow_hits"] == 1


# ---------------------------------------------------------------- reflection codes
def test_store_to_page_l1_maps_read_only_reflects_protfault_and_l2_gets_storage_interrupt() -> None:
    e = protect_env(f.PTE_EAA_READ)
    r = e.access(PROTECT, Access.STORE)
    assert r.outcome is Outcome.STORAGE_INTERRUPT
    assert r.dsisr == f.DSISR_PROTFAULT | f.DSISR_ISSTORE
    assert [x.hdsisr for x in e.exits] == [f.DSISR_NOHPTE | f.DSISR_ISSTORE, f.DSISR_PROTFAULT | f.DSISR_ISSTORE]
    assert e.l0.stats["reflected.PROTFAULT"] == 1
    assert e.shadow_leaves() == []
    # A load is allowed and gets a read-only shadow leaf.
    assert e.access(PROTECT, Access.LOAD).outcome is Outcome.FILL
    sh = e.shadow(PROTECT)
    assert sh is not None and sh.pte & f.PTE_PERM_MASK == f.PTE_EAA_READ
    assert e.c.audit().ok


def test_load_on_page_l1_maps_execute_only_reflects_protfault_without_isstore() -> None:
    e = protect_env(f.PTE_EAA_EXEC)
    r = e.access(PROTECT, Access.LOAD)
    assert r.outcome is Outcome.STORAGE_INTERRUPT
    assert r.dsisr == f.DSISR_PROTFAULT
    assert [x.hdsisr for x in e.exits] == [f.DSISR_NOHPTE, f.DSISR_PROTFAULT]
    # Instruction fetch from the same page works, with an X-only shadow leaf.
    assert e.access(PROTECT, Access.IFETCH).outcome is Outcome.FILL
    sh = e.shadow(PROTECT)
    assert sh is not None and sh.pte & f.PTE_PERM_MASK == f.PTE_EAA_EXEC
    assert e.c.audit().ok


def test_ifetch_on_page_without_execute_reflects_hisi_with_srr1_isi_n_g_or_cip() -> None:
    e = protect_env(f.PTE_EAA_READ | f.PTE_EAA_RW)
    r = e.access(PROTECT, Access.IFETCH)
    assert r.outcome is Outcome.STORAGE_INTERRUPT
    assert r.dsisr == f.SRR1_ISI_N_G_OR_CIP
    assert [(x.trap, x.hdsisr) for x in e.exits] == [(HISI, f.DSISR_NOHPTE), (HISI, f.SRR1_ISI_N_G_OR_CIP)]
    assert e.l0.stats["reflected.NOEXEC"] == 1
    assert e.shadow_leaves() == []


def test_ifetch_with_a_shadow_leaf_lacking_x_drops_it_then_reflects() -> None:
    e = protect_env(f.PTE_EAA_READ)
    e.access(PROTECT, Access.LOAD)
    e.exits.clear()
    r = e.access(PROTECT, Access.IFETCH)
    assert r.outcome is Outcome.STORAGE_INTERRUPT and r.dsisr == f.SRR1_ISI_N_G_OR_CIP
    # Hardware had a PTE (NOEXEC_OR_G): L0 invalidated it, L2 refaulted as NOHPTE, reflected.
    assert e.l0.stats["shadow_invalidated_l1_denies"] == 1
    assert [x.hdsisr for x in e.exits] == [f.SRR1_ISI_N_G_OR_CIP]
    assert e.shadow(PROTECT) is None and e.tlb(PROTECT) is None


def test_bad_nls_in_l1_tree_reflects_unsupp_mmu_and_l1_fails_the_access() -> None:
    e = make_env()
    e.l1.map_pages(e.lpid, 0, 0x10000)  # build the levels
    root = e.guest.tree.root
    pde = e.l1.mem.read_u64(root)
    e.l1.mem.write_u64(root, (pde & ~f.PDE_NLS_MASK) | 7)  # NLS 7 at the PUD level: not P9
    r = e.access(0x10000, Access.LOAD)
    assert r.outcome is Outcome.ERROR
    assert r.dsisr == f.DSISR_UNSUPP_MMU
    assert [x.hdsisr for x in e.exits] == [f.DSISR_UNSUPP_MMU]
    assert e.l0.stats["reflected.UNSUPP_MMU"] == 1
    assert e.l1.stats["exit.bad_tree"] == 1
    assert e.shadow_leaves() == []


def test_pde_into_l1_mmio_hole_reflects_prtable_fault_with_asdr_of_the_failing_entry() -> None:
    e = make_env()
    e.l1.map_pages(e.lpid, 0, 0x10000)
    root = e.guest.tree.root
    hole = e.l1.mmio_base
    e.l1.mem.write_u64(root, f.make_pde(hole, 9))
    addr = (3 << 30) + 0x10000 + 0x44  # PUD index 3
    r = e.access(addr, Access.STORE)
    # L1 (kvmppc_book3s_radix_page_fault) takes ASDR as an address of its L2: no memslot there
    # and PRTABLE_FAULT set, so it queues a DSI for the L2 with that DSISR.
    assert r.outcome is Outcome.STORAGE_INTERRUPT
    assert r.dsisr == f.DSISR_PRTABLE_FAULT | f.DSISR_ISSTORE
    assert len(e.exits) == 1
    ex = e.exits[0]
    assert ex.hdsisr == f.DSISR_PRTABLE_FAULT | f.DSISR_ISSTORE
    assert ex.asdr == hole + 3 * 8  # the PUD entry L0 could not read, not the L2 address
    assert ex.hdar == addr
    assert e.l0.stats["reflected.PRTABLE_FAULT"] == 1


# ---------------------------------------------------------------- step 4
def test_l1_downgrade_without_flush_hardware_protfault_invalidates_shadow_then_reflects() -> None:
    e = make_env(L0Config(host_write_upgrade=False))
    addr = 0x50000
    e.access(addr, Access.LOAD)
    sh = e.shadow(addr)
    assert sh is not None and not sh.pte & f.PTE_EAA_RW  # L0's PTE is read-only
    g = e.l1_leaf(addr)
    # L1 drops write (and execute) in its tree but "forgets" the flush hcall.
    e.write_l1_leaf(addr, g.pte & ~(f.PTE_EAA_RW | f.PTE_EAA_EXEC))
    e.exits.clear()
    r = e.access(addr, Access.STORE)
    assert e.l0.stats["shadow_invalidated_l1_denies"] == 1
    # The first fault (hardware PROTFAULT) was absorbed; the refault (NOHPTE) was reflected.
    assert [x.hdsisr for x in e.exits] == [f.DSISR_PROTFAULT | f.DSISR_ISSTORE]
    assert r.outcome is Outcome.STORAGE_INTERRUPT and r.dsisr == f.DSISR_PROTFAULT | f.DSISR_ISSTORE
    assert e.shadow(addr) is None and e.tlb(addr) is None
    assert e.c.audit().ok


def test_store_after_load_with_read_only_l0_pte_upgrades_both_when_l1_allows() -> None:
    e = make_env(L0Config(host_write_upgrade=False))
    addr = 0x50000
    e.access(addr, Access.LOAD)
    r = e.access(addr, Access.STORE)
    assert r.outcome is Outcome.FILL
    assert e.l0.stats["shadow_invalidated_l1_denies"] == 0
    sh = e.shadow(addr)
    assert sh is not None and sh.pte & f.PTE_EAA_RW and sh.pte & f.PTE_C
    l0 = e.l0_pte(e.l1_gpa(addr))
    assert l0 is not None and l0.pte & f.PTE_EAA_RW and l0.pte & f.PTE_C
    assert e.c.audit().ok


def test_missing_pate_reflects_the_exit_unchanged_and_a_later_fault_rereads_it() -> None:
    from nestmmu.core.sim import InProcessCluster

    c = InProcessCluster()
    l1 = c.add_l1("a")
    lpid = c.create_guest("a")
    guest = l1.guest(lpid)
    l1._write_pate(lpid, 0, 0)
    s = c.attach_vcpu("a", lpid, 0)
    assert s.gp.l1_gr_to_hr == 0
    seen: list[NestedExit] = []
    orig = l1.handle_exit

    def handle_exit(l1_lpid: int, vcpu_id: int, ex: NestedExit):  # type: ignore[no-untyped-def]
        seen.append(ex)
        if len(seen) == 1:
            l1._write_pate(lpid, guest.pate_dw0(), f.make_pate_dw1())
        return orig(l1_lpid, vcpu_id, ex)

    l1.handle_exit = handle_exit  # type: ignore[method-assign]
    addr = 0x20000 + 0x8
    r = c.access(s, addr, Access.LOAD)
    assert seen[0] == NestedExit(HDSI, addr, f.DSISR_NOHPTE, addr, Access.LOAD)
    assert c.l0.stats["reflected.NO_PATE"] == 1
    assert s.gp.l1_gr_to_hr == guest.pate_dw0()
    assert r.outcome is Outcome.FILL


# ---------------------------------------------------------------- page sizes and memory kinds
def test_l1_4k_pages_on_64k_l0_livelock_l1_sees_the_raw_hdsi_each_round() -> None:
    """__kvmhv_nested_page_fault returns -EINVAL (L1 page smaller than L0's); that ends
    kvmhv_run_single_vcpu's loop in kvmhv_enter_nested_guest, which returns the raw trap to L1.
    L1 finds its leaf in place, enters again, and the same HDSI comes back: a livelock the
    model stops after L0Config.livelock_rounds rounds."""
    e = make_env(L0Config(livelock_rounds=3), page_shift=12)
    r = e.access(0x3008, Access.LOAD)
    assert r.outcome is Outcome.ERROR
    assert r.detail.startswith("livelock: -EINVAL: L1 page shift 12 < L0 page shift 16")
    assert "re-entered 3 times" in r.detail
    assert e.l0.stats["l1_page_smaller_than_l0"] == 3
    assert (e.l0.stats["einval_rounds"], e.l0.stats["livelock.einval"], e.l0.stats["livelock"]) == (3, 1, 1)
    # First the reflected NOHPTE (L1 instantiates), then 3 rounds of the raw HDSI.
    raw = NestedExit(HDSI, 0x3008, f.DSISR_NOHPTE, 0x3008, Access.LOAD)
    assert e.exits == [raw] * 4
    assert e.l1.stats["create_pte.identical"] == 3  # L1 finds nothing to fix each round
    assert e.shadow_leaves() == []


def test_l1_4k_pages_on_4k_l0_work_with_4k_shadow_leaves() -> None:
    e = make_env(L0Config(page_shift=12), page_shift=12)
    r = e.access(0x3000, Access.LOAD)
    assert r.outcome is Outcome.FILL
    sh = e.shadow(0x3000)
    assert sh is not None and sh.shift == 12
    l1_gpa = e.l1_gpa(0x3000)
    l0 = e.l0_pte(l1_gpa)
    assert l0 is not None and l0.shift == 21
    assert sh.pte & f.PTE_RPN_MASK == (l0.pte & f.PTE_RPN_MASK) + (l1_gpa & 0x1FF000)
    assert e.c.audit().ok


def test_l1_gpa_without_memslot_is_mmio_emulated_by_l0() -> None:
    e = make_env(regions=[GuestRegion("mmio", 34 * MiB, 2 * MiB)])
    for kind in (Access.LOAD, Access.STORE):
        r = e.access(34 * MiB + 0x100, kind)
        assert r.outcome is Outcome.MMIO_EMULATED
    assert e.l0.stats["mmio_emulated"] == 2
    assert e.l1_gpa(34 * MiB) >= e.l1.mmio_base
    assert e.shadow_leaves() == []
    assert e.c.audit().ok


def test_store_to_rom_gets_dsi_from_l0_directly_and_load_works() -> None:
    rom = 40 * MiB
    e = make_env(regions=[GuestRegion("rom", rom, 2 * MiB)])
    assert e.access(rom, Access.LOAD).outcome is Outcome.FILL
    l0 = e.l0_pte(e.l1_gpa(rom))
    assert l0 is not None and not l0.pte & f.PTE_EAA_RW
    assert e.vm.memslot_for(e.l1_gpa(rom)).read_only  # type: ignore[union-attr]
    e.exits.clear()
    r = e.access(rom, Access.STORE)
    assert r.outcome is Outcome.STORAGE_INTERRUPT
    assert r.dsisr == f.DSISR_ISSTORE | f.DSISR_PROTFAULT
    assert e.exits == []  # injected by L0, not reflected (L1 maps it RW)
    sh = e.shadow(rom)
    assert sh is not None and not sh.pte & f.PTE_EAA_RW
    assert e.c.audit().ok


def test_l1_64k_pages_on_l0_2m_backing_get_64k_shadow_leaves_with_subpage_rpn() -> None:
    e = make_env()
    pages = [0x10000, 0x30000, 0x70000]
    for p in pages:
        assert e.access(p, Access.LOAD).outcome is Outcome.FILL
    rmap = e.memslot().rmap
    for p in pages:
        l1_gpa = e.l1_gpa(p)
        l0 = e.l0_pte(l1_gpa)
        assert l0 is not None and l0.shift == 21
        sh = e.shadow(p)
        assert sh is not None and sh.shift == 16 and sh.level == 0
        assert sh.pte & f.PTE_RPN_MASK == (l0.pte & f.PTE_RPN_MASK) + (l1_gpa & 0x1F0000)
        # §9.1: rmap kept at the gfn of the L0 page (2M aligned), not the L1 page.
        assert e.rmap_entry(p) in rmap[l0.gpa >> 16]
    assert e.l0.stats["shadow_size_fallback"] == 3
    assert e.c.audit().ok


def test_l1_2m_pages_on_l0_2m_backing_get_2m_shadow_leaves() -> None:
    e = make_env(page_shift=21)
    addr = 0x600000 + 0x12345
    assert e.access(addr, Access.LOAD).outcome is Outcome.FILL
    l1_gpa = e.l1_gpa(addr)
    l0 = e.l0_pte(l1_gpa)
    assert l0 is not None and l0.shift == 21
    sh = e.shadow(addr)
    assert sh is not None and sh.shift == 21 and sh.level == 1 and sh.gpa == 0x600000
    assert sh.pte & f.PTE_RPN_MASK == l0.pte & f.PTE_RPN_MASK
    assert e.memslot().rmap[l0.gpa >> 16] == [e.rmap_entry(0x600000)]
    assert e.l0.stats["shadow_size_fallback"] == 0
    assert e.c.audit().ok


def test_l1_1g_pages_on_l0_base_pages_get_base_page_shadow_leaves() -> None:
    e = make_env(memslots=base_page_memslots(), page_shift=30, memory=GiB)
    addrs = [0x1234_5678, 0x1235_0010]
    for a in addrs:
        assert e.access(a, Access.LOAD).outcome is Outcome.FILL
    assert e.l1_leaf(addrs[0]).page_shift == 30
    for a in addrs:
        l1_gpa = e.l1_gpa(a)
        l0 = e.l0_pte(l1_gpa)
        assert l0 is not None and l0.shift == 16
        sh = e.shadow(a)
        assert sh is not None and sh.shift == 16 and sh.gpa == a & ~0xFFFF
        assert sh.pte & f.PTE_RPN_MASK == l0.pte & f.PTE_RPN_MASK
        assert e.rmap_entry(sh.gpa) in e.memslot().rmap[l1_gpa >> 16]
    assert len(e.shadow_leaves()) == 2
    assert e.c.audit().ok


def test_thp_collapse_during_instantiate_retries_once_then_succeeds() -> None:
    e = make_env()
    e.l1.map_pages(e.lpid, 0x80000, 0x10000)  # L1 prefaults: no reflection needed
    l1_gpa = e.l1_gpa(0x80000)
    e.l0.host_thp_collapse(e.vm, l1_gpa)
    r = e.access(0x80000, Access.LOAD)
    assert r.outcome is Outcome.FILL
    assert e.l0.stats["thp_collapse_retry"] == 1
    assert e.l0.stats["nested_faults"] == 2  # RESUME_GUEST once, then the fault that worked
    assert e.exits == []
    assert e.c.audit().ok

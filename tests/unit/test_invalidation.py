"""L1-requested invalidation (semantics §5), guest teardown and L1 isolation."""

from __future__ import annotations

import pytest
from _helpers_fault import Env, MiB, base_page_memslots, make_env, violations

from nestmmu.core import formats as f
from nestmmu.core.effects import Outcome
from nestmmu.core.formats import Access, H
from nestmmu.core.l1 import RptInvalidate
from nestmmu.core.sim import InProcessCluster


def fill(e: Env, addrs: list[int], kind: Access = Access.LOAD) -> None:
    for a in addrs:
        assert e.access(a, kind).outcome is Outcome.FILL


@pytest.mark.parametrize("use_rpt", [True, False], ids=["H_RPT_INVALIDATE", "H_TLB_INVALIDATE"])
def test_invalidating_one_l1_2m_page_removes_every_64k_shadow_leaf_inside(use_rpt: bool) -> None:
    """§9.2: L1 2M pages over L0 base pages give 64K shadow leaves; one tlbie drops them all."""
    e = make_env(memslots=base_page_memslots(), page_shift=21, use_rpt_invalidate=use_rpt)
    inside = [0x20_0000 + k * 0x10000 for k in (0, 1, 7, 31)]
    outside = [0x40_0000, 0x1F_0000]
    fill(e, inside + outside)
    assert {s.gpa for s in e.shadow_leaves()} == set(inside + outside)
    assert all(s.shift == 16 for s in e.shadow_leaves())

    n, hcalls = e.l1.unmap_pages(e.lpid, 0x20_0000, 2 * MiB)
    assert n == 1 and len(hcalls) == 1
    assert e.issue(hcalls) == [H.SUCCESS]

    assert {s.gpa for s in e.shadow_leaves()} == set(outside)
    for a in inside:
        assert e.tlb(a) is None
    for a in outside:
        assert e.tlb(a) is not None
    assert e.l0.stats["inval.address"] == 1
    assert e.c.audit().ok


def test_4k_ap_on_64k_l0_still_removes_the_covering_leaf() -> None:
    e = make_env()
    fill(e, [0x10000, 0x20000])
    assert e.tlbie(f.RIC_TLB, f.IS_VA, epn=0x13000, ap=f.SHIFT_TO_AP[12]) == H.SUCCESS
    assert e.shadow(0x10000) is None and e.tlb(0x10000) is None
    assert e.shadow(0x20000) is not None and e.tlb(0x20000) is not None
    assert e.c.audit().ok


def test_by_lpid_ric0_frees_the_tree_leaves_rmap_stale_and_flushes_the_lpid() -> None:
    e = make_env()
    fill(e, [0x10000, 0x20000, 0x40_0000])
    rmap_before = {k: list(v) for k, v in e.memslot().rmap.items()}
    assert e.gp.shadow_pgtable is not None and e.gp.shadow_pgtable.table_pages > 1
    lpid_flushes = e.c.stats["tlbie.lpid"]

    assert e.tlbie(f.RIC_TLB, f.IS_LPID) == H.SUCCESS

    assert e.shadow_leaves() == []
    assert e.gp.shadow_pgtable.table_pages == 1  # root only
    assert e.memslot().rmap == rmap_before  # stale, not removed
    assert len(e.s.vcpu.tlb) == 0
    assert e.c.stats["tlbie.lpid"] == lpid_flushes + 1
    assert e.vm.nested[e.lpid] is e.gp
    assert e.c.audit().ok
    # The guest keeps running: refaults rebuild the tree.
    fill(e, [0x10000])
    assert e.c.audit().ok


def test_by_lpid_ric1_is_a_noop() -> None:
    e = make_env()
    fill(e, [0x10000, 0x20000])
    leaves = e.shadow_leaves()
    tlb = len(e.s.vcpu.tlb)
    assert e.tlbie(f.RIC_PWC, f.IS_LPID) == H.SUCCESS
    assert e.shadow_leaves() == leaves
    assert len(e.s.vcpu.tlb) == tlb == 2
    assert e.l0.stats["inval.lpid_pwc"] == 1


def test_by_lpid_ric2_rereads_the_pate() -> None:
    e = make_env()
    fill(e, [0x10000])
    # L1 moves the guest to a new (empty) tree: PATE write, then RIC=2.
    from nestmmu.core.radix import RadixTable

    tree = RadixTable(e.l1.mem, e.l1.alloc, 16)
    e.l1._write_pate(e.lpid, tree.pate_dw0(), f.make_pate_dw1())
    assert e.tlbie(f.RIC_ALL, f.IS_LPID) == H.SUCCESS
    assert e.gp.l1_gr_to_hr == tree.pate_dw0()
    assert e.shadow_leaves() == [] and len(e.s.vcpu.tlb) == 0
    assert e.vm.nested[e.lpid] is e.gp
    dw0, dw1 = e.l0.read_ptbl_entry(e.gp.shadow_lpid)
    assert e.gp.shadow_pgtable is not None
    assert dw0 == e.gp.shadow_pgtable.pate_dw0() and dw1 == f.PATE_GR | f.make_pate_dw1()


def test_ric2_with_cleared_pate_removes_the_guest_freed_once_vcpus_detach() -> None:
    e = make_env()
    fill(e, [0x10000, 0x20000])
    gp = e.gp
    shadow_lpid = gp.shadow_lpid
    assert gp.refcnt == 2  # registry + the running vCPU

    assert e.c.destroy_guest("a", e.lpid) == [H.SUCCESS]  # PATE := 0, RIC=2

    assert e.lpid not in e.vm.nested
    assert gp.refcnt == 1 and not gp.freed
    assert shadow_lpid in e.l0.lpids_in_use
    assert len(e.s.vcpu.tlb) == 0
    assert e.c.audit().ok
    e.c.detach_vcpu(e.s.name)
    assert gp.freed and gp.shadow_pgtable is None
    assert shadow_lpid not in e.l0.lpids_in_use
    assert e.l0.read_ptbl_entry(shadow_lpid) == (0, 0)
    assert e.c.audit().ok


def test_destroying_a_guest_without_vcpus_frees_it_immediately() -> None:
    e = make_env()
    fill(e, [0x10000])
    e.c.detach_vcpu(e.s.name)
    gp = e.gp
    assert gp.refcnt == 1 and not gp.freed
    e.c.destroy_guest("a", e.lpid)
    assert gp.freed and gp not in e.l0.live_guests
    assert e.l0.lpids_in_use == {e.vm.lpid}
    assert e.c.audit().ok


def two_l1s() -> tuple[InProcessCluster, Env, Env]:
    """L1 "a" with guests lpid 1 and 2, L1 "b" with guest lpid 1; all touched."""
    a = make_env(l1_name="a")
    c = a.c
    lp_a2 = c.create_guest("a")
    assert (a.lpid, lp_a2) == (1, 2)
    a2 = Env(c, a.l1, a.vm, a.l1.guest(lp_a2), c.attach_vcpu("a", lp_a2, 0))
    b_l1 = c.add_l1("b")
    lp_b = c.create_guest("b")
    assert lp_b == 1
    b = Env(c, b_l1, c.vms["b"], b_l1.guest(lp_b), c.attach_vcpu("b", lp_b, 0))
    for env in (a, a2, b):
        fill(env, [0x10000, 0x20000])
    return c, a, b


def test_is3_applies_to_every_guest_of_that_l1_only() -> None:
    c, a, b = two_l1s()
    a2 = a.vm.nested[2]
    b_leaves = b.shadow_leaves()
    assert a.tlbie(f.RIC_TLB, f.IS_ALL) == H.SUCCESS
    assert a.shadow_leaves() == [] and a.l0.shadow_leaves(a2) == []
    assert b.shadow_leaves() == b_leaves
    for s in c.sessions.values():
        assert (len(s.vcpu.tlb) == 0) == (s.l1 == "a")
    assert violations(c) == set()


def test_an_l1_cannot_reach_another_l1s_guests_with_their_lpid_numbers() -> None:
    c, a, b = two_l1s()
    a_leaves = {lp: a.l0.shadow_leaves(gp) for lp, gp in a.vm.nested.items()}
    a_tlbs = {n: len(s.vcpu.tlb) for n, s in c.sessions.items() if s.l1 == "a"}
    # b flushes "lpid 1" (its own guest 1, not a's) and "lpid 2" (it has none).
    assert b.tlbie(f.RIC_TLB, f.IS_LPID, lpid=1) == H.SUCCESS
    assert b.shadow_leaves() == []
    assert b.tlbie(f.RIC_ALL, f.IS_LPID, lpid=2) == H.SUCCESS
    assert b.tlbie(f.RIC_TLB, f.IS_VA, lpid=2, epn=0x10000, ap=f.SHIFT_TO_AP[16]) == H.SUCCESS
    rpt = RptInvalidate(2, f.H_RPTI_TARGET_CMMU, f.H_RPTI_TYPE_NESTED | f.H_RPTI_TYPE_NESTED_ALL, f.H_RPTI_PAGE_ALL, 0, f.U64)
    assert c.issue("b", rpt) == H.SUCCESS
    assert b.l0.stats["inval.unknown_lpid"] == 2 and b.l0.stats["rpt.unknown_lpid"] >= 1
    assert {lp: a.l0.shadow_leaves(gp) for lp, gp in a.vm.nested.items()} == a_leaves
    assert {n: len(s.vcpu.tlb) for n, s in c.sessions.items() if s.l1 == "a"} == a_tlbs
    assert set(a.vm.nested) == {1, 2}
    assert violations(c) == set()


def test_removing_an_l1_releases_all_its_nested_guests() -> None:
    c, a, b = two_l1s()
    vm_a = a.vm
    guests = list(vm_a.nested.values())
    lpids_a = {vm_a.lpid} | {gp.shadow_lpid for gp in guests}
    assert any(s.rmap for s in vm_a.memslots)
    c.remove_l1("a")
    assert vm_a.released and vm_a.nested == {}
    assert all(gp.freed and gp.shadow_pgtable is None for gp in guests)
    assert not lpids_a & c.l0.lpids_in_use
    assert c.l0.lpids_in_use == {b.vm.lpid, b.gp.shadow_lpid}
    assert all(not s.rmap for s in vm_a.memslots)
    assert all(s.l1 == "b" for s in c.sessions.values())
    assert all(gp.l1_host is b.vm for gp in c.l0.live_guests)
    rep = c.audit()
    assert rep.ok, rep.violations
    # b still works.
    fill(b, [0x30000])

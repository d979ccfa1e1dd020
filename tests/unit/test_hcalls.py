"""Every hypercall return code of semantics §2 (and the §5/§9.9 effects they promise)."""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import pytest

from nestmmu.core import formats as f
from nestmmu.core.effects import AccessResult, Outcome, ReadL1Memory
from nestmmu.core.formats import Access, H
from nestmmu.core.l0 import HCALL_NEVER_RETURNS, HvGuestState, KernelBugs, KvmNestedGuest, L0Config, kmalloc_max_size
from nestmmu.core.sim import InProcessCluster

if TYPE_CHECKING:
    from conftest import GuestRig

PAGE = 1 << 16  # the rig's L2 page size
SIXTEEN_G = 16 << 30  # default memslots: RAM [0, 16G), ROM [16G, 16G+64M), MMIO hole above


# --------------------------------------------------------------------------- helpers
def fault_in(rig: GuestRig, n_gpa: int, kind: Access = Access.LOAD) -> AccessResult:
    res = rig.cluster.access(rig.session, n_gpa, kind)
    assert res.outcome is Outcome.FILL, res
    return res


def shadow_pages(rig: GuestRig) -> list[int]:
    return [s.gpa for s in rig.cluster.l0.shadow_leaves(rig.session.gp)]


def tlbie(rig: GuestRig, ric: int = 0, prs: int = 0, r: int = 1, lpid: int | None = None, is_: int = 0, epn: int = 0, ap: int = 0) -> int:
    lpid = rig.lpid if lpid is None else lpid
    instr, rs, rb = f.encode_tlbie(ric, prs, r, lpid, is_, epn, ap)
    rc: int = rig.cluster.drive(rig.cluster.l0.h_tlb_invalidate(rig.vm, instr, rs, rb))
    return rc


def rpt(
    rig: GuestRig, type_: int, pg_sizes: int = f.H_RPTI_PAGE_ALL, start: int = 0, end: int = f.U64, lpid: int | None = None, target: int = f.H_RPTI_TARGET_CMMU
) -> int:
    lpid = rig.lpid if lpid is None else lpid
    rc: int = rig.cluster.drive(rig.cluster.l0.h_rpt_invalidate(rig.vm, lpid, target, type_, pg_sizes, start, end))
    return rc


def enter(
    c: InProcessCluster, lpid: int, l1: str = "a", version: int = 2, vcpu_token: int = 0, transactional: bool = False
) -> tuple[int, KvmNestedGuest | None]:
    state = HvGuestState(version=version, lpid=lpid, vcpu_token=vcpu_token, transactional=transactional)
    rc, gp = c.drive(c.l0.h_enter_nested(c.vms[l1], state))
    return rc, gp


def clear_pate(rig: GuestRig) -> None:
    """L1 writes PATE := 0 for its guest without telling L0 (no flush hcall)."""
    addr = rig.l1.partition_table + rig.lpid * f.PATE_SIZE
    rig.l1.mem.write_u64(addr, 0)
    rig.l1.mem.write_u64(addr + 8, 0)


NESTED_TLB = f.H_RPTI_TYPE_NESTED | f.H_RPTI_TYPE_TLB
NESTED_PWC = f.H_RPTI_TYPE_NESTED | f.H_RPTI_TYPE_PWC


# =========================================================================== H_SET_PARTITION_TABLE
def test_set_partition_table_pats_above_4_is_parameter(cluster: InProcessCluster) -> None:
    vm, l1 = cluster.vms["a"], cluster.l1s["a"]
    before = vm.l1_ptcr
    assert cluster.l0.h_set_partition_table(vm, f.make_ptcr(l1.partition_table, 5)) == H.PARAMETER
    assert cluster.l0.h_set_partition_table(vm, f.make_ptcr(l1.partition_table, 31)) == H.PARAMETER
    assert vm.l1_ptcr == before


def test_set_partition_table_pats_4_is_the_limit(cluster: InProcessCluster) -> None:
    vm, l1 = cluster.vms["a"], cluster.l1s["a"]
    ptcr = f.make_ptcr(l1.partition_table, 4)
    assert cluster.l0.h_set_partition_table(vm, ptcr) == H.SUCCESS
    assert vm.l1_ptcr == ptcr


@pytest.mark.parametrize("base", [SIXTEEN_G + (64 << 20), SIXTEEN_G + (100 << 20), 1 << 50])
def test_set_partition_table_base_outside_memslots_is_parameter(cluster: InProcessCluster, base: int) -> None:
    vm = cluster.vms["a"]
    before = vm.l1_ptcr
    assert cluster.l0.h_set_partition_table(vm, f.make_ptcr(base, 0)) == H.PARAMETER
    assert vm.l1_ptcr == before


def test_set_partition_table_in_read_only_slot_is_accepted(cluster: InProcessCluster) -> None:
    vm = cluster.vms["a"]
    ptcr = f.make_ptcr(SIXTEEN_G + 0x10000, 2)
    assert vm.memslot_for(SIXTEEN_G).read_only  # type: ignore[union-attr]
    assert cluster.l0.h_set_partition_table(vm, ptcr) == H.SUCCESS
    assert vm.l1_ptcr == ptcr


def test_set_partition_table_stores_l1_ptcr_without_alignment_check(cluster: InProcessCluster) -> None:
    vm = cluster.vms["a"]
    ptcr = f.make_ptcr(0x123_4000, 4)  # a 64 KiB table at a 16 KiB boundary: not checked
    assert cluster.l0.h_set_partition_table(vm, ptcr) == H.SUCCESS
    assert vm.l1_ptcr == ptcr


def test_set_partition_table_zero_then_enter_nested_is_not_available(rig: GuestRig) -> None:
    c = rig.cluster
    assert c.l0.h_set_partition_table(rig.vm, 0) == H.SUCCESS
    assert rig.vm.l1_ptcr == 0
    # Existing nested guests are not touched by the PTCR change.
    assert rig.vm.nested[rig.lpid] is rig.session.gp
    assert enter(c, rig.lpid) == (H.NOT_AVAILABLE, None)


def test_ptcr_change_keeps_guests_but_lookups_use_the_new_bound(cluster: InProcessCluster) -> None:
    """§5: no invalidation on a PTCR change; lookups bound-check against the new PATS."""
    vm, l1 = cluster.vms["a"], cluster.l1s["a"]
    lpid = cluster.create_guest("a", lpid=300)
    rc, gp = enter(cluster, lpid)
    assert rc == H.SUCCESS and gp is not None
    assert cluster.l0.h_set_partition_table(vm, f.make_ptcr(l1.partition_table, 0)) == H.SUCCESS  # 256 entries
    assert vm.nested[lpid] is gp
    assert gp.l1_gr_to_hr == l1.guests[lpid].pate_dw0()
    assert enter(cluster, lpid) == (H.PARAMETER, None)


# =========================================================================== H_ENTER_NESTED
def test_enter_nested_without_ptcr_is_not_available(cluster: InProcessCluster) -> None:
    cluster.l0.h_set_partition_table(cluster.vms["a"], 0)
    # NOT_AVAILABLE comes before every other check.
    assert enter(cluster, 1, version=0, transactional=True) == (H.NOT_AVAILABLE, None)
    assert cluster.vms["a"].nested == {}


def test_enter_nested_transactional_is_bad_mode(cluster: InProcessCluster) -> None:
    assert enter(cluster, 1, transactional=True) == (H.BAD_MODE, None)
    # BAD_MODE comes before the version check.
    assert enter(cluster, 1, version=3, transactional=True) == (H.BAD_MODE, None)
    assert cluster.vms["a"].nested == {}


@pytest.mark.parametrize("version", [0, 3, 4, -1])
def test_enter_nested_unknown_version_is_parameter(cluster: InProcessCluster, version: int) -> None:
    assert enter(cluster, 1, version=version) == (H.PARAMETER, None)
    assert cluster.vms["a"].nested == {}


@pytest.mark.parametrize("version", [1, 2])
def test_enter_nested_versions_1_and_2_are_accepted(cluster: InProcessCluster, version: int) -> None:
    rc, gp = enter(cluster, 1, version=version)
    assert rc == H.SUCCESS and gp is not None


@pytest.mark.parametrize("token", [f.NR_CPUS, f.NR_CPUS + 1, -1])
def test_enter_nested_vcpu_token_out_of_range_is_parameter(cluster: InProcessCluster, token: int) -> None:
    assert enter(cluster, 1, vcpu_token=token) == (H.PARAMETER, None)


def test_enter_nested_last_vcpu_token_is_accepted(cluster: InProcessCluster) -> None:
    rc, _ = enter(cluster, 1, vcpu_token=f.NR_CPUS - 1)
    assert rc == H.SUCCESS


def test_enter_nested_lpid_beyond_partition_table_is_parameter(cluster: InProcessCluster) -> None:
    # PATS=4: 2^(4+8) = 4096 entries.
    assert enter(cluster, 4096) == (H.PARAMETER, None)
    rc, gp = enter(cluster, 4095)
    assert rc == H.SUCCESS and gp is not None and gp.l1_lpid == 4095


def test_enter_nested_lpid_bound_follows_pats(cluster: InProcessCluster) -> None:
    cluster.add_l1("b", pats=0)  # 256 entries
    assert enter(cluster, 256, l1="b") == (H.PARAMETER, None)
    assert enter(cluster, 255, l1="b")[0] == H.SUCCESS


def test_enter_nested_lpid_exhaustion_is_parameter() -> None:
    c = InProcessCluster(L0Config(nr_lpids=3))  # shadow LPIDs 1 and 2 only
    c.add_l1("a")  # takes LPID 1
    c.create_guest("a", lpid=1)
    c.create_guest("a", lpid=2)
    rc, gp1 = enter(c, 1)
    assert rc == H.SUCCESS and gp1 is not None and gp1.shadow_lpid == 2
    assert enter(c, 2) == (H.PARAMETER, None)
    assert c.l0.lpids_in_use == {1, 2}
    assert c.l0.stats["lpid_exhausted"] == 1
    assert 2 not in c.vms["a"].nested
    # Releasing the first guest frees its shadow LPID for the second.
    c.destroy_guest("a", 1)
    c.l0.kvmhv_put_nested(gp1)
    rc, gp2 = enter(c, 2)
    assert rc == H.SUCCESS and gp2 is not None and gp2.shadow_lpid == 2


def test_enter_nested_accepts_lpid_0(cluster: InProcessCluster) -> None:
    l1 = cluster.l1s["a"]
    dw0 = f.make_pate_dw0(0x200_0000)
    l1.mem.write_u64(l1.partition_table, dw0)  # PATE 0, written by hand
    rc, gp = enter(cluster, 0)
    assert rc == H.SUCCESS
    assert gp is not None and gp.l1_lpid == 0
    assert cluster.vms["a"].nested[0] is gp
    assert gp.l1_gr_to_hr == dw0
    assert gp.shadow_lpid != 0


def test_second_entry_reuses_the_guest_and_takes_a_reference(cluster: InProcessCluster) -> None:
    lpid = cluster.create_guest("a")
    rc1, gp1 = enter(cluster, lpid, vcpu_token=0)
    assert rc1 == H.SUCCESS and gp1 is not None
    assert gp1.refcnt == 2  # registry + this vCPU
    lpids = set(cluster.l0.lpids_in_use)
    rc2, gp2 = enter(cluster, lpid, vcpu_token=1)
    assert rc2 == H.SUCCESS and gp2 is gp1
    assert gp1.refcnt == 3
    assert cluster.l0.lpids_in_use == lpids
    assert cluster.l0.stats["nested_guests_created"] == 1


def test_new_guest_caches_its_pate_and_writes_the_shadow_pate(cluster: InProcessCluster) -> None:
    lpid = cluster.create_guest("a")
    guest = cluster.l1s["a"].guests[lpid]
    rc, gp = enter(cluster, lpid)
    assert rc == H.SUCCESS and gp is not None and gp.shadow_pgtable is not None
    assert gp.l1_gr_to_hr == guest.pate_dw0()
    assert gp.process_table == f.make_pate_dw1()
    dw0, dw1 = cluster.l0.read_ptbl_entry(gp.shadow_lpid)
    assert dw0 == f.PATE_HR | f.make_rts_field(21) | gp.shadow_pgtable.root | 13
    assert dw1 == gp.process_table  # L1's dw1 verbatim (§5)


def test_shadow_pate_dw1_is_l1_dw1_verbatim(cluster: InProcessCluster) -> None:
    """kvmhv_set_nested_ptbl writes gp->process_table as dw1, adding nothing (not even GR)."""
    l1 = cluster.l1s["a"]
    rc, gp = enter(cluster, 7)  # PATE 7 is still zero: process_table 0
    assert rc == H.SUCCESS and gp is not None
    assert cluster.l0.read_ptbl_entry(gp.shadow_lpid)[1] == 0
    dw1 = f.make_pate_dw1(0x400_0000, 2, gr=False)
    l1.mem.write_u64(l1.partition_table + 7 * 16, f.make_pate_dw0(0x300_0000))
    l1.mem.write_u64(l1.partition_table + 7 * 16 + 8, dw1)
    enter(cluster, 7)
    assert cluster.l0.read_ptbl_entry(gp.shadow_lpid)[1] == dw1


def test_enter_nested_rereads_pate_when_cached_dw0_is_zero(cluster: InProcessCluster) -> None:
    l1 = cluster.l1s["a"]
    rc, gp = enter(cluster, 7)  # L1 has not written PATE 7 yet
    assert rc == H.SUCCESS and gp is not None
    assert gp.l1_gr_to_hr == 0
    dw0, dw1 = f.make_pate_dw0(0x300_0000), f.make_pate_dw1(0x400_0000, 2)
    l1.mem.write_u64(l1.partition_table + 7 * 16, dw0)
    l1.mem.write_u64(l1.partition_table + 7 * 16 + 8, dw1)
    rc, again = enter(cluster, 7)
    assert rc == H.SUCCESS and again is gp
    assert gp.l1_gr_to_hr == dw0
    assert gp.process_table == dw1
    assert cluster.l0.read_ptbl_entry(gp.shadow_lpid)[1] == dw1


def test_enter_nested_does_not_reread_a_cached_pate(cluster: InProcessCluster) -> None:
    lpid = cluster.create_guest("a")
    l1 = cluster.l1s["a"]
    _, gp = enter(cluster, lpid)
    assert gp is not None
    cached = gp.l1_gr_to_hr
    assert cached != 0
    l1.mem.write_u64(l1.partition_table + lpid * 16, f.make_pate_dw0(0x500_0000))  # no flush
    _, again = enter(cluster, lpid)
    assert again is gp and gp.l1_gr_to_hr == cached


def _finish(c: InProcessCluster, gen: Generator[Any, Any, Any], eff: Any) -> Any:
    try:
        while True:
            eff = gen.send(c.answer(eff))
    except StopIteration as stop:
        return stop.value


@pytest.mark.parametrize("first_to_finish", ["a", "b"])
def test_concurrent_first_entry_loser_gets_parameter(cluster: InProcessCluster, first_to_finish: str) -> None:
    lpid = cluster.create_guest("a", lpid=9)
    vm, l0 = cluster.vms["a"], cluster.l0
    gens = {
        "a": l0.h_enter_nested(vm, HvGuestState(2, lpid, 0)),
        "b": l0.h_enter_nested(vm, HvGuestState(2, lpid, 1)),
    }
    # Both vCPUs get as far as reading the PATE: each has allocated a candidate guest.
    effs = {k: next(g) for k, g in gens.items()}
    assert all(isinstance(e, ReadL1Memory) for e in effs.values())
    assert len(l0.live_guests) == 2
    second = "b" if first_to_finish == "a" else "a"
    rc_w, gp_w = _finish(cluster, gens[first_to_finish], effs[first_to_finish])
    rc_l, gp_l = _finish(cluster, gens[second], effs[second])
    assert rc_w == H.SUCCESS and gp_w is not None
    assert (rc_l, gp_l) == (H.PARAMETER, None)
    assert vm.nested == {lpid: gp_w}
    assert l0.live_guests == {gp_w}
    assert l0.lpids_in_use == {vm.lpid, gp_w.shadow_lpid}
    assert l0.stats["nested_create_lost_race"] == 1
    assert cluster.audit().ok


# =========================================================================== H_TLB_INVALIDATE
@pytest.fixture
def mapped(rig: GuestRig) -> GuestRig:
    """The rig with four L2 pages faulted in: 0, 64K, 2M and 32M."""
    for n_gpa in (0, PAGE, 2 << 20, 32 << 20):
        fault_in(rig, n_gpa, Access.STORE)
    assert shadow_pages(rig) == [0, PAGE, 2 << 20, 32 << 20]
    return rig


@pytest.mark.parametrize(
    ("ric", "prs", "r", "is_", "ap"),
    [
        pytest.param(0, 0, 0, 2, 0, id="R=0"),
        pytest.param(0, 0, 0, 0, 0, id="R=0-by-address"),
        pytest.param(0, 1, 1, 2, 0, id="PRS=1"),
        pytest.param(2, 1, 1, 3, 0, id="PRS=1-all"),
        pytest.param(3, 0, 1, 2, 0, id="RIC=3-by-lpid"),
        pytest.param(3, 0, 1, 3, 0, id="RIC=3-all"),
        pytest.param(0, 0, 1, 1, 0, id="IS=1-RIC0"),
        pytest.param(2, 0, 1, 1, 0, id="IS=1-RIC2"),
        pytest.param(1, 0, 1, 0, 0, id="IS=0-RIC1"),
        pytest.param(2, 0, 1, 0, 0, id="IS=0-RIC2"),
        pytest.param(0, 0, 1, 0, 3, id="AP=3"),
        pytest.param(0, 0, 1, 0, 4, id="AP=4"),
        pytest.param(0, 0, 1, 0, 6, id="AP=6"),
        pytest.param(0, 0, 1, 0, 7, id="AP=7"),
    ],
)
def test_tlb_invalidate_invalid_combination_is_parameter(mapped: GuestRig, ric: int, prs: int, r: int, is_: int, ap: int) -> None:
    assert tlbie(mapped, ric=ric, prs=prs, r=r, is_=is_, ap=ap) == H.PARAMETER
    assert shadow_pages(mapped) == [0, PAGE, 2 << 20, 32 << 20]
    assert mapped.vm.nested[mapped.lpid] is mapped.session.gp


@pytest.mark.parametrize(
    ("ap", "epn", "survivors"),
    [
        pytest.param(0b000, PAGE + 0x3000, [0, 2 << 20, 32 << 20], id="4K"),
        pytest.param(0b101, PAGE, [0, 2 << 20, 32 << 20], id="64K"),
        pytest.param(0b001, 0x1_0000, [2 << 20, 32 << 20], id="2M"),
        pytest.param(0b010, 0, [], id="1G"),
    ],
)
def test_tlb_invalidate_by_address_each_ap(mapped: GuestRig, ap: int, epn: int, survivors: list[int]) -> None:
    assert tlbie(mapped, ric=0, is_=0, epn=epn, ap=ap) == H.SUCCESS
    assert shadow_pages(mapped) == survivors
    assert mapped.vm.nested[mapped.lpid] is mapped.session.gp


def test_tlb_invalidate_by_address_drops_the_vcpu_tlb_entry(mapped: GuestRig) -> None:
    tlb = mapped.session.vcpu.tlb
    lpid = mapped.session.vcpu.lpid
    assert tlb.lookup(lpid, PAGE) is not None
    assert tlbie(mapped, ric=0, is_=0, epn=PAGE, ap=0b101) == H.SUCCESS
    assert tlb.lookup(lpid, PAGE) is None
    assert tlb.lookup(lpid, 0) is not None


@pytest.mark.parametrize("is_", [2, 3])
def test_tlb_invalidate_lpid_or_all_ric0_frees_the_shadow_tree(mapped: GuestRig, is_: int) -> None:
    gp = mapped.session.gp
    assert tlbie(mapped, ric=0, is_=is_) == H.SUCCESS
    assert shadow_pages(mapped) == []
    assert gp.shadow_pgtable is not None and gp.shadow_pgtable.table_pages == 1
    assert mapped.vm.nested[mapped.lpid] is gp
    assert len(mapped.session.vcpu.tlb) == 0


@pytest.mark.parametrize("is_", [2, 3])
def test_tlb_invalidate_lpid_or_all_ric1_is_a_no_op(mapped: GuestRig, is_: int) -> None:
    assert tlbie(mapped, ric=1, is_=is_) == H.SUCCESS
    assert shadow_pages(mapped) == [0, PAGE, 2 << 20, 32 << 20]
    assert len(mapped.session.vcpu.tlb) == 4


@pytest.mark.parametrize("is_", [2, 3])
def test_tlb_invalidate_lpid_or_all_ric2_frees_and_keeps_a_live_pate(mapped: GuestRig, is_: int) -> None:
    gp = mapped.session.gp
    assert tlbie(mapped, ric=2, is_=is_) == H.SUCCESS
    assert shadow_pages(mapped) == []
    assert mapped.vm.nested[mapped.lpid] is gp
    assert gp.l1_gr_to_hr == mapped.l1.guests[mapped.lpid].pate_dw0()


@pytest.mark.parametrize("is_", [2, 3])
def test_tlb_invalidate_ric2_with_cleared_pate_removes_the_guest(mapped: GuestRig, is_: int) -> None:
    gp = mapped.session.gp
    clear_pate(mapped)
    assert tlbie(mapped, ric=2, is_=is_) == H.SUCCESS
    assert mapped.lpid not in mapped.vm.nested
    assert gp.refcnt == 1  # the attached vCPU still holds its reference
    assert not gp.freed


@pytest.mark.parametrize(("ric", "is_"), [(0, 0), (0, 2), (1, 2), (2, 2)])
def test_tlb_invalidate_unknown_nested_lpid_is_a_successful_no_op(mapped: GuestRig, ric: int, is_: int) -> None:
    other = mapped.lpid + 1
    assert other not in mapped.vm.nested
    assert tlbie(mapped, ric=ric, is_=is_, lpid=other, epn=0, ap=0b010) == H.SUCCESS
    assert shadow_pages(mapped) == [0, PAGE, 2 << 20, 32 << 20]
    assert other not in mapped.vm.nested  # no guest was created by the lookup


def test_tlb_invalidate_lpid_beyond_table_is_a_successful_no_op(mapped: GuestRig) -> None:
    assert tlbie(mapped, ric=0, is_=0, lpid=1 << 20, epn=0, ap=0b010) == H.SUCCESS
    assert len(shadow_pages(mapped)) == 4


# =========================================================================== H_RPT_INVALIDATE
@pytest.mark.parametrize("type_", [0, NESTED_TLB, f.H_RPTI_TYPE_TLB])
def test_rpt_end_before_start_is_p5(mapped: GuestRig, type_: int) -> None:
    assert rpt(mapped, type_, start=0x20000, end=0x10000) == H.P5
    assert len(shadow_pages(mapped)) == 4


@pytest.mark.parametrize("target", [0, f.H_RPTI_TARGET_CMMU_LOCAL, f.H_RPTI_TARGET_NMMU, 3])
def test_rpt_nested_with_target_other_than_cmmu_is_p2(mapped: GuestRig, target: int) -> None:
    assert rpt(mapped, NESTED_TLB, start=0, end=PAGE, target=target) == H.P2
    assert len(shadow_pages(mapped)) == 4


def test_rpt_unknown_lpid_succeeds_before_any_other_check(mapped: GuestRig) -> None:
    stats = mapped.cluster.l0.stats
    before = stats["rpt.unknown_lpid"]
    # A mask matching no size would be H_P4 for a known guest.
    assert rpt(mapped, NESTED_TLB, pg_sizes=0x10, start=0, end=PAGE, lpid=mapped.lpid + 5) == H.SUCCESS
    assert len(shadow_pages(mapped)) == 4
    assert stats["rpt.unknown_lpid"] == before + 1


@pytest.mark.parametrize("pg_sizes", [0x10, 0x0, 0xF0])
def test_rpt_page_size_mask_matching_nothing_is_p4(mapped: GuestRig, pg_sizes: int) -> None:
    assert rpt(mapped, NESTED_TLB, pg_sizes=pg_sizes, start=0, end=PAGE) == H.P4
    assert len(shadow_pages(mapped)) == 4


def test_rpt_pwc_only_ranged_is_a_no_op(mapped: GuestRig) -> None:
    assert rpt(mapped, NESTED_PWC, pg_sizes=f.H_RPTI_PAGE_64K, start=0, end=64 << 20) == H.SUCCESS
    assert shadow_pages(mapped) == [0, PAGE, 2 << 20, 32 << 20]


def test_rpt_pwc_only_full_range_frees_the_whole_shadow_tree(mapped: GuestRig) -> None:
    """§9.9: start 0, end -1 is a by-LPID RIC=0 flush even for a PWC-only request."""
    gp = mapped.session.gp
    assert rpt(mapped, NESTED_PWC, pg_sizes=f.H_RPTI_PAGE_ALL, start=0, end=f.U64) == H.SUCCESS
    assert shadow_pages(mapped) == []
    assert gp.shadow_pgtable is not None and gp.shadow_pgtable.table_pages == 1
    assert mapped.vm.nested[mapped.lpid] is gp
    assert len(mapped.session.vcpu.tlb) == 0


def test_rpt_nested_all_is_ric2_and_removes_a_guest_whose_pate_is_zero(mapped: GuestRig) -> None:
    gp = mapped.session.gp
    clear_pate(mapped)
    rc = rpt(mapped, f.H_RPTI_TYPE_NESTED | f.H_RPTI_TYPE_NESTED_ALL, start=0, end=PAGE)
    assert rc == H.SUCCESS
    assert mapped.lpid not in mapped.vm.nested
    assert gp.l1_gr_to_hr == 0
    assert shadow_pages(mapped) == []


def test_rpt_nested_all_keeps_a_guest_with_a_live_pate(mapped: GuestRig) -> None:
    gp = mapped.session.gp
    rc = rpt(mapped, f.H_RPTI_TYPE_NESTED | f.H_RPTI_TYPE_NESTED_ALL, start=0, end=PAGE)
    assert rc == H.SUCCESS
    assert mapped.vm.nested[mapped.lpid] is gp
    assert shadow_pages(mapped) == []  # the ranged request still flushed everything


@pytest.fixture
def forty_pages(rig: GuestRig) -> GuestRig:
    for i in range(40):
        fault_in(rig, i * PAGE)
    assert shadow_pages(rig) == [i * PAGE for i in range(40)]
    return rig


def test_rpt_more_than_33_pages_escalates_to_a_full_flush(forty_pages: GuestRig) -> None:
    rc = rpt(forty_pages, NESTED_TLB, pg_sizes=f.H_RPTI_PAGE_64K, start=0, end=34 * PAGE)
    assert rc == H.SUCCESS
    assert shadow_pages(forty_pages) == []  # pages 34..39 outside the range went too
    assert forty_pages.cluster.l0.stats["rpt.ceiling_escalations"] == 1


def test_rpt_33_pages_removes_exactly_those_pages(forty_pages: GuestRig) -> None:
    rc = rpt(forty_pages, NESTED_TLB, pg_sizes=f.H_RPTI_PAGE_64K, start=PAGE, end=34 * PAGE)
    assert rc == H.SUCCESS
    assert shadow_pages(forty_pages) == [0] + [i * PAGE for i in range(34, 40)]
    assert forty_pages.cluster.l0.stats["rpt.ceiling_escalations"] == 0


def test_rpt_single_page(forty_pages: GuestRig) -> None:
    assert rpt(forty_pages, NESTED_TLB, pg_sizes=f.H_RPTI_PAGE_64K, start=5 * PAGE, end=6 * PAGE) == H.SUCCESS
    assert shadow_pages(forty_pages) == [i * PAGE for i in range(40) if i != 5]


def test_rpt_smaller_size_bit_counts_toward_the_ceiling(forty_pages: GuestRig) -> None:
    # Two 64K pages are 32 4K pages (no escalation) but four are 64 (escalation).
    both = f.H_RPTI_PAGE_4K | f.H_RPTI_PAGE_64K
    assert rpt(forty_pages, NESTED_TLB, pg_sizes=both, start=0, end=2 * PAGE) == H.SUCCESS
    assert shadow_pages(forty_pages) == [i * PAGE for i in range(2, 40)]
    assert rpt(forty_pages, NESTED_TLB, pg_sizes=both, start=2 * PAGE, end=6 * PAGE) == H.SUCCESS
    assert shadow_pages(forty_pages) == []


@pytest.mark.parametrize("high", [1 << 32, 0xFFFF_FFFF_0000_0000, 0x7FFF_0000_0000_0000])
def test_rpt_id_is_truncated_to_an_int_lpid(forty_pages: GuestRig, high: int) -> None:
    """kvmppc_h_rpt_invalidate passes the unsigned long id to do_h_rpt_invalidate_pat, which
    hands it to __find_nested / kvmhv_get_nested / kvmhv_emulate_tlbie_tlb_addr as an int:
    the high 32 bits are dropped, so the flush reaches the guest with the low 32 bits."""
    rig = forty_pages
    unknown = rig.cluster.l0.stats["rpt.unknown_lpid"]
    rc = rpt(rig, NESTED_TLB, pg_sizes=f.H_RPTI_PAGE_64K, start=5 * PAGE, end=6 * PAGE, lpid=high | rig.lpid)
    assert rc == H.SUCCESS
    assert shadow_pages(rig) == [i * PAGE for i in range(40) if i != 5]
    assert rig.cluster.l0.stats["rpt.unknown_lpid"] == unknown


def test_rpt_id_with_bit_31_is_a_negative_lpid_and_a_successful_no_op(forty_pages: GuestRig) -> None:
    """kernel_int(id) < 0: __find_nested finds nothing, so the request succeeds untouched."""
    rig = forty_pages
    unknown = rig.cluster.l0.stats["rpt.unknown_lpid"]
    for id_ in (0x8000_0000 | rig.lpid, f.U64):
        assert rpt(rig, NESTED_TLB | f.H_RPTI_TYPE_PWC | f.H_RPTI_TYPE_PAT, lpid=id_) == H.SUCCESS
    assert len(shadow_pages(rig)) == 40
    assert rig.cluster.l0.stats["rpt.unknown_lpid"] == unknown + 2


@pytest.mark.parametrize("buggy", [False, True])
def test_rpt_range_reaching_the_top_of_the_address_space(buggy: bool) -> None:
    """do_tlb_invalidate_nested_tlb steps ``addr += page_size`` as a u64: a range whose
    pages reach 2^64 wraps addr to 0, and as every address of that page class is below
    ``end`` the loop never ends (the hcall never returns; its sweep invalidates the whole
    guest again and again).  Correct by default: stop at the top of the address space;
    KernelBugs.rpt_range_addr_wraps gives the kernel's endless loop (HCALL_NEVER_RETURNS)."""
    c = InProcessCluster(L0Config(bugs=KernelBugs(rpt_range_addr_wraps=buggy)))
    c.add_l1("a")
    lpid = c.create_guest("a", page_shift=16)
    s = c.attach_vcpu("a", lpid, 0)
    for i in range(4):
        assert c.access(s, i * PAGE, Access.LOAD).outcome is Outcome.FILL
    vm = c.vms["a"]
    start, end = f.U64 + 1 - 2 * PAGE, f.U64  # two 64K pages: nr_pages = 1 < 33
    rc = c.drive(c.l0.h_rpt_invalidate(vm, lpid, f.H_RPTI_TARGET_CMMU, NESTED_TLB, f.H_RPTI_PAGE_64K, start, end))
    c.deliver(c.l0.take_invalidations())
    leaves = [sl.gpa for sl in c.l0.shadow_leaves(s.gp)]
    if buggy:
        assert rc == HCALL_NEVER_RETURNS
        assert leaves == [] and len(s.vcpu.tlb) == 0
        assert c.l0.stats["rpt.addr_wrap_never_returns"] == 1
    else:
        assert rc == H.SUCCESS
        assert leaves == [i * PAGE for i in range(4)]  # nothing of the guest lies up there
        assert c.l0.stats["rpt.addr_wrap_never_returns"] == 0
    assert c.audit().ok


@pytest.mark.parametrize("target", [f.H_RPTI_TARGET_CMMU, f.H_RPTI_TARGET_NMMU])
def test_rpt_without_nested_is_process_scoped_success(mapped: GuestRig, target: int) -> None:
    rc = rpt(mapped, f.H_RPTI_TYPE_TLB | f.H_RPTI_TYPE_PWC, start=0, end=f.U64, target=target)
    assert rc == H.SUCCESS
    assert len(shadow_pages(mapped)) == 4
    assert mapped.cluster.l0.stats["rpt.process_scoped"] == 1


# =========================================================================== H_COPY_TOFROM_GUEST
SCRATCH = 0x10_0000  # an L1 RAM address below the L1 allocator's range


def copy(rig: GuestRig, eaddr: int, to_gpa: int, from_gpa: int, n: int, lpid: int | None = None) -> int:
    lpid = rig.lpid if lpid is None else lpid
    rc: int = rig.cluster.drive(rig.cluster.l0.h_copy_tofrom_guest(rig.vm, lpid, 0, eaddr, to_gpa, from_gpa, n))
    return rc


def host_write(rig: GuestRig, l1_gpa: int, data: bytes) -> None:
    """Write L2 data where it lives: the host frame behind the L1 page backing the L2 page."""
    hpa = rig.cluster.l0.l1_frame(rig.vm, l1_gpa, writing=True)
    assert hpa is not None
    rig.cluster.l0.mem.write(hpa, data)


def host_read(rig: GuestRig, l1_gpa: int, n: int) -> bytes:
    hpa = rig.cluster.l0.l1_frame(rig.vm, l1_gpa, writing=False)
    assert hpa is not None
    return rig.cluster.l0.mem.read(hpa, n)


def test_copy_both_directions_is_parameter(rig: GuestRig) -> None:
    assert copy(rig, 0, SCRATCH, SCRATCH + 0x1000, 8) == H.PARAMETER


@pytest.mark.parametrize("eaddr", [1 << 52, 1 << 63, 0xFFF0_0000_0000_0000])
def test_copy_eaddr_top_bits_is_parameter(rig: GuestRig, eaddr: int) -> None:
    assert copy(rig, eaddr, SCRATCH, 0, 8) == H.PARAMETER


@pytest.mark.parametrize("page_shift", [16, 12])
def test_copy_above_kmalloc_max_size_is_no_mem(page_shift: int) -> None:
    """kvmhv_copy_tofrom_guest_nested: kzalloc(n) fails above KMALLOC_MAX_SIZE =
    1 << (MAX_PAGE_ORDER + PAGE_SHIFT) (include/linux/slab.h), with ppc64's
    ARCH_FORCE_MAX_ORDER 8 for 64K pages and 12 for 4K pages: 16 MiB either way (the
    model used to cap at 4 MiB)."""
    assert kmalloc_max_size(page_shift) == 16 << 20
    c = InProcessCluster(L0Config(page_shift=page_shift))
    c.add_l1("a")
    lpid = c.create_guest("a", page_shift=16)
    c.attach_vcpu("a", lpid, 0)
    vm = c.vms["a"]

    def copy_n(n: int, to_gpa: int = SCRATCH, from_gpa: int = 0) -> int:
        rc: int = c.drive(c.l0.h_copy_tofrom_guest(vm, lpid, 0, 0, to_gpa, from_gpa, n))
        return rc

    assert copy_n((16 << 20) + 1) == H.NO_MEM
    assert copy_n((16 << 20) + 1, 0, SCRATCH) == H.NO_MEM
    # Up to 16 MiB the allocation succeeds; the copy fails later (nothing faulted in).
    assert copy_n(16 << 20) == H.NOT_FOUND
    assert copy_n((4 << 20) + 1) == H.NOT_FOUND


def test_copy_from_guest_marks_the_l1_buffer_dirty(rig: GuestRig) -> None:
    """kvmhv_copy_tofrom_guest_nested writes L1's buffer with kvm_vcpu_write_guest, which
    marks every page it writes in the dirty log (mark_page_dirty_in_slot)."""
    c, vm = rig.cluster, rig.vm
    c.l0.set_dirty_logging(vm, 0, True)
    c.deliver(c.l0.take_invalidations())
    fault_in(rig, 3 * PAGE, Access.STORE)
    c.l0.harvest_dirty(vm, 0)
    c.deliver(c.l0.take_invalidations())
    assert c.l0.harvest_dirty(vm, 0) == []
    # A copy straddling two L1 pages of the buffer dirties both.
    buf = SCRATCH + PAGE - 8
    assert copy(rig, 3 * PAGE, buf, 0, 16) == H.SUCCESS
    assert c.l0.harvest_dirty(vm, 0) == [SCRATCH, SCRATCH + PAGE]
    # Copying *to* the L2 only reads L1's buffer (kvm_vcpu_read_guest): L0 dirties nothing
    # of it (the L2's page is written through the shadow leaf, which needs C: the harvest
    # cleared it, so store once more first -- faults are disabled in the copy).
    fault_in(rig, 3 * PAGE, Access.STORE)
    assert copy(rig, 3 * PAGE, 0, buf, 16) == H.SUCCESS
    assert not {SCRATCH, SCRATCH + PAGE} & set(c.l0.harvest_dirty(vm, 0))
    # A failed copy writes nothing and dirties nothing.
    assert copy(rig, 9 * PAGE, SCRATCH, 0, 8) == H.NOT_FOUND
    assert c.l0.harvest_dirty(vm, 0) == []


def test_copy_unknown_guest_is_parameter(rig: GuestRig) -> None:
    assert copy(rig, 0, SCRATCH, 0, 8, lpid=rig.lpid + 1) == H.PARAMETER


def test_copy_unfaulted_page_is_not_found(rig: GuestRig) -> None:
    assert copy(rig, 5 * PAGE, SCRATCH, 0, 8) == H.NOT_FOUND
    assert copy(rig, 5 * PAGE, 0, SCRATCH, 8) == H.NOT_FOUND
    # The copy did not fault the page in.
    assert shadow_pages(rig) == []


def test_copy_from_guest_moves_bytes(rig: GuestRig) -> None:
    fault_in(rig, 3 * PAGE + 0x100, Access.STORE)
    backing = rig.l1.guests[rig.lpid].backing[3]
    payload = b"nested radix!\x00\xff"
    host_write(rig, backing + 0x100, payload)
    gp = rig.session.gp
    ref = gp.refcnt
    assert copy(rig, 3 * PAGE + 0x100, SCRATCH, 0, len(payload)) == H.SUCCESS
    assert rig.l1.read_memory(SCRATCH, len(payload)) == payload
    assert gp.refcnt == ref


def test_copy_to_guest_moves_bytes(rig: GuestRig) -> None:
    fault_in(rig, 3 * PAGE, Access.STORE)
    backing = rig.l1.guests[rig.lpid].backing[3]
    payload = bytes(range(1, 33))
    assert rig.l1.write_memory(SCRATCH, payload)
    assert copy(rig, 3 * PAGE + 0x2000, 0, SCRATCH, len(payload)) == H.SUCCESS
    assert host_read(rig, backing + 0x2000, len(payload)) == payload
    # L1's own copy of that page (its memory in the L1 process) is not where L2 data lives.
    assert rig.l1.read_memory(backing + 0x2000, len(payload)) == bytes(len(payload))


def test_copy_across_two_l2_pages(rig: GuestRig) -> None:
    fault_in(rig, 1 * PAGE, Access.STORE)
    fault_in(rig, 2 * PAGE, Access.STORE)
    backing = rig.l1.guests[rig.lpid].backing
    host_write(rig, backing[1] + PAGE - 8, b"AAAAAAAA")
    host_write(rig, backing[2], b"BBBBBBBB")
    assert copy(rig, 2 * PAGE - 8, SCRATCH, 0, 16) == H.SUCCESS
    assert rig.l1.read_memory(SCRATCH, 16) == b"AAAAAAAABBBBBBBB"


def test_copy_into_second_unfaulted_page_is_not_found(rig: GuestRig) -> None:
    fault_in(rig, 1 * PAGE, Access.STORE)
    assert copy(rig, 2 * PAGE - 8, SCRATCH, 0, 16) == H.NOT_FOUND


def test_copy_to_guest_page_without_c_is_not_found(rig: GuestRig) -> None:
    """Faults are disabled: a store that would need SET_RC fails the copy."""
    fault_in(rig, 4 * PAGE, Access.LOAD)
    assert copy(rig, 4 * PAGE, 0, SCRATCH, 8) == H.NOT_FOUND
    assert copy(rig, 4 * PAGE, SCRATCH, 0, 8) == H.SUCCESS


def test_failed_copy_from_guest_leaves_l1_buffer_untouched(rig: GuestRig) -> None:
    """kvmhv_copy_tofrom_guest_nested copies L2 into a buffer and writes L1 only on success:
    a copy whose second page is not faulted in must not have written its first page's bytes."""
    fault_in(rig, 1 * PAGE, Access.STORE)
    backing = rig.l1.guests[rig.lpid].backing
    host_write(rig, backing[1] + PAGE - 8, b"AAAAAAAA")
    rig.l1.write_memory(SCRATCH, b"untouch!")
    assert copy(rig, 2 * PAGE - 8, SCRATCH, 0, 16) == H.NOT_FOUND
    assert rig.l1.read_memory(SCRATCH, 8) == b"untouch!"

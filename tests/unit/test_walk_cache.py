"""The L0 service's walks fetched ahead (services/l0/walks.py): what a batch's coming faults
are, and that a fetched walk lives only within the epoch it was fetched in."""

from __future__ import annotations

from nestmmu.core import formats as f
from nestmmu.core.formats import Access
from nestmmu.core.radix import WalkResult
from nestmmu.core.sim import InProcessCluster, VcpuSession
from nestmmu.services.l0.walks import LOOK_AHEAD, WalkCache, coming_faults

PAGE = 64 << 10


def _rig(mapped: int, pages: int = 16) -> tuple[InProcessCluster, VcpuSession]:
    c = InProcessCluster()
    c.add_l1("l1")
    lpid = c.create_guest("l1", page_shift=16, memory=pages * PAGE)
    s = c.attach_vcpu("l1", lpid, 0)
    c.l1s["l1"].map_pages(lpid, 0, pages * PAGE)
    for p in range(mapped):
        c.access(s, p * PAGE, Access.LOAD)
    return c, s


def test_coming_faults_are_the_first_access_of_each_kind_to_each_l0_page_that_misses_the_shadow() -> None:
    c, s = _rig(mapped=2)  # pages 0 and 1 are in the shadow table (loads: R, no C)
    addrs = [PAGE + 8, 2 * PAGE + 0x18, 2 * PAGE + 0x1018, 3 * PAGE, 0x20, 0x10]
    kinds = bytes([Access.LOAD, Access.LOAD, Access.LOAD, Access.LOAD, Access.STORE, Access.LOAD])
    # Page 2 once (its second 4K is covered by the 64K leaf the first fault inserts), page 3,
    # and the store to page 0 (no C in the shadow leaf: a SET_RC fault).
    assert coming_faults(c.l0, s.gp, addrs, kinds, 0) == [2 * PAGE + 0x18, 3 * PAGE, 0x20]
    assert coming_faults(c.l0, s.gp, addrs, kinds, 3) == [3 * PAGE, 0x20]
    # The first access of each kind to a page decides: a load that hits does not hide a
    # store that faults; a second store to the page is the first store's business.
    assert coming_faults(c.l0, s.gp, [0x10, 0x20, 0x28], bytes([Access.LOAD, Access.STORE, Access.STORE]), 0) == [0x20]


def test_coming_faults_use_the_kernels_n_gpa() -> None:
    # Real mode: the exit's ASDR and HDAR are both the access's address.
    c, s = _rig(mapped=0)
    a = 5 * PAGE + 0x1238
    assert coming_faults(c.l0, s.gp, [a], bytes([Access.LOAD]), 0) == [f.nested_fault_n_gpa(a, a, f.DSISR_NOHPTE)] == [a]


def test_coming_faults_look_only_so_far_ahead() -> None:
    n = LOOK_AHEAD + 10
    c, s = _rig(mapped=0, pages=n)
    addrs = [p * PAGE + 8 for p in range(n)]
    got = coming_faults(c.l0, s.gp, addrs, bytes([Access.LOAD]) * n, 0)
    assert got == addrs[:LOOK_AHEAD]


def _walk(raddr: int) -> WalkResult:
    return WalkResult(0, f.make_pte(raddr, f.PTE_EAA_READ), raddr, 16, 0, 0, 4)


def test_a_walk_is_taken_only_for_its_key_as_often_as_faults_come_within_its_epoch() -> None:
    c, _ = _rig(mapped=0)
    vm = c.vms["l1"]
    w = WalkCache()
    assert w.keep(vm, 1, 0xABC, {PAGE: _walk(PAGE)}, w.epoch(vm)) == 1
    assert w.take(vm, 2, 0xABC, PAGE) is None  # another guest
    assert w.take(vm, 1, 0xDEF, PAGE) is None  # another PATE (the guest's tree root changed)
    assert w.take(vm, 1, 0xABC, PAGE) == _walk(PAGE)
    assert w.take(vm, 1, 0xABC, PAGE) == _walk(PAGE)  # another vCPU faulting there


def test_a_new_epoch_drops_fetched_walks_and_refuses_fetches_started_before_it() -> None:
    c, _ = _rig(mapped=0)
    vm = c.vms["l1"]
    w = WalkCache()
    e0 = w.epoch(vm)
    w.keep(vm, 1, 0xABC, {PAGE: _walk(PAGE)}, e0)
    w.new_epoch(vm)  # an hcall or exit from this L1
    assert w.take(vm, 1, 0xABC, PAGE) is None
    # A fetch sent in epoch e0 and answered after the new epoch began is not kept.
    assert w.keep(vm, 1, 0xABC, {2 * PAGE: _walk(2 * PAGE)}, e0) == 0
    assert w.kept(vm) == 0
    assert w.keep(vm, 1, 0xABC, {2 * PAGE: _walk(2 * PAGE)}, w.epoch(vm)) == 1

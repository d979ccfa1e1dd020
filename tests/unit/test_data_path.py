"""Data mode: values live in L0's host frames and survive every move the real system makes.

Each test stores through the vCPU data path (TLB hit or fault, then a memory operation at the
host address translated), moves the page the way L0 or L1 would, and loads it back; the
checker tests break the system on purpose and must see the loss.
"""

from __future__ import annotations

import struct

import pytest
from conftest import GuestRig

from nestmmu.core import formats as f
from nestmmu.core.data import DataChecker, encode, private_word
from nestmmu.core.effects import ExitAction, NestedExit, Outcome, WaitHostPage, run_sync
from nestmmu.core.formats import Access, H
from nestmmu.core.l0 import L0Hypervisor
from nestmmu.core.l1 import CopyL1Pages, L1Step
from nestmmu.core.sim import InProcessCluster, VcpuSession, data_churn_cluster

PAGE = 1 << 16
LOAD, STORE = int(Access.LOAD), int(Access.STORE)


@pytest.fixture
def data_rig(cluster: InProcessCluster) -> GuestRig:
    """One L1 with one 64K-page data guest and one vCPU (slot 0)."""
    lpid = cluster.create_guest("a", page_shift=16, data=True)
    session = cluster.attach_vcpu("a", lpid, 0)
    return GuestRig(cluster, cluster.l1s["a"], cluster.vms["a"], lpid, session)


def run(rig: GuestRig, accesses: list[tuple[int, int]], s: VcpuSession | None = None) -> None:
    rig.cluster.run_data_batch(s or rig.session, [a for a, _ in accesses], [k for _, k in accesses])


def counters(rig: GuestRig) -> dict[str, int]:
    return rig.cluster.data_counters()


def host_of(rig: GuestRig, n_gpa: int) -> int:
    """Where the L2 word lives now: L1's backing page, then L0's frame behind it."""
    g = rig.l1.guests[rig.lpid]
    hpa = rig.cluster.l0.l1_frame(rig.vm, g.backing[n_gpa >> 16] + (n_gpa & (PAGE - 1)), writing=False)
    assert hpa is not None
    return hpa


def test_store_then_load_round_trips_through_a_fault(data_rig: GuestRig) -> None:
    run(data_rig, [(3 * PAGE + 0x40, STORE), (3 * PAGE + 0x40, LOAD)])
    c = counters(data_rig)
    assert (c["data_stores"], c["data_loads_checked"], c["lost_writes"]) == (1, 1, 0)
    # The value is in the host frame behind the L2 page, at the vCPU's private word.
    v = data_rig.cluster.l0.mem.read_u64(host_of(data_rig, 3 * PAGE + 0x40))
    assert v == encode(0, 1, 3 * PAGE + 0x40)
    # The first access faulted (no TLB entry), the second hit.
    assert data_rig.session.vcpu.stats["tlb_hits"] == 1


def test_vcpus_use_private_words_of_a_line(data_rig: GuestRig) -> None:
    s1 = data_rig.cluster.attach_vcpu("a", data_rig.lpid, 1)
    data_rig.cluster.data_vcpu(s1, 1)
    run(data_rig, [(PAGE, STORE)])
    run(data_rig, [(PAGE, STORE), (PAGE, LOAD)], s1)
    run(data_rig, [(PAGE, LOAD)])
    assert counters(data_rig)["lost_writes"] == 0
    assert private_word(PAGE + 0x13, 1) == PAGE + 8
    mem = data_rig.cluster.l0.mem
    assert mem.read_u64(host_of(data_rig, PAGE)) != 0 and mem.read_u64(host_of(data_rig, PAGE + 8)) != 0


def test_host_migration_copies_the_frame_after_the_tlbsync(data_rig: GuestRig) -> None:
    run(data_rig, [(2 * PAGE, STORE)])
    l1_gpa = data_rig.l1.guests[data_rig.lpid].backing[2]
    old_host = host_of(data_rig, 2 * PAGE)
    _, old, new = data_rig.cluster.host_migrate("a", l1_gpa)
    assert new and new != old
    assert host_of(data_rig, 2 * PAGE) != old_host
    run(data_rig, [(2 * PAGE, LOAD), (2 * PAGE, STORE), (2 * PAGE, LOAD)])
    c = counters(data_rig)
    assert (c["data_loads_checked"], c["lost_writes"]) == (2, 0)
    assert data_rig.cluster.l0.stats["host_frames_copied"] == 1
    # The old frame was freed and cleared.
    assert data_rig.cluster.l0.mem.read_u64(old_host) == 0


def test_host_swap_out_keeps_the_contents_for_the_next_fault_in(data_rig: GuestRig) -> None:
    run(data_rig, [(5 * PAGE + 0x100, STORE)])
    l1_gpa = data_rig.l1.guests[data_rig.lpid].backing[5]
    data_rig.cluster.host_unmap("a", l1_gpa)
    assert data_rig.cluster.l0.stats["host_pages_swapped_out"] == 1
    assert data_rig.vm.backing.get(l1_gpa & ~((1 << 21) - 1)) is None
    run(data_rig, [(5 * PAGE + 0x100, LOAD)])
    assert data_rig.cluster.l0.stats["host_pages_swapped_in"] == 1
    assert counters(data_rig)["lost_writes"] == 0 and counters(data_rig)["data_loads_checked"] == 1


def test_l1_remap_copies_the_page_before_the_new_leaf(data_rig: GuestRig) -> None:
    run(data_rig, [(7 * PAGE + 0x80, STORE)])
    g = data_rig.l1.guests[data_rig.lpid]
    old = g.backing[7]
    n, hcalls = data_rig.l1.remap_pages(data_rig.lpid, 7 * PAGE, PAGE)
    assert n == 1
    # Linux-as-L1's order: leaf cleared + flush, then the copy, then the new leaf.
    assert [type(h).__name__ for h in hcalls] == ["RptInvalidate", "CopyL1Pages", "L1Step"]
    assert data_rig.l1.guests[data_rig.lpid].tree.lookup_leaf(7 * PAGE) is None
    copy = hcalls[1]
    assert isinstance(copy, CopyL1Pages) and copy.src == old and copy.dst == g.backing[7] != old
    data_rig.cluster.issue_all("a", hcalls)
    run(data_rig, [(7 * PAGE + 0x80, LOAD)])
    assert counters(data_rig)["lost_writes"] == 0 and counters(data_rig)["data_loads_checked"] == 1


def test_l1_unmap_swaps_out_and_the_next_fault_swaps_in(data_rig: GuestRig) -> None:
    run(data_rig, [(9 * PAGE, STORE)])
    data_rig.cluster.issue_all("a", data_rig.l1.unmap_pages(data_rig.lpid, 9 * PAGE, PAGE)[1])
    g = data_rig.l1.guests[data_rig.lpid]
    assert 9 in g.swap and 9 not in g.backing and not g.busy
    run(data_rig, [(9 * PAGE, LOAD)])
    assert 9 not in g.swap and 9 in g.backing
    assert data_rig.l1.stats["pages_swapped_in"] == 1
    assert counters(data_rig)["lost_writes"] == 0 and counters(data_rig)["data_loads_checked"] == 1


def test_translation_guest_unmap_discards_as_before(rig: GuestRig) -> None:
    """A guest that is not a data guest keeps the old behaviour: no copies, no swap slots."""
    rig.cluster.issue_all("a", rig.l1.map_pages(rig.lpid, 0, PAGE)[1])
    n, hcalls = rig.l1.remap_pages(rig.lpid, 0, PAGE)
    assert n == 1 and rig.l1.guests[rig.lpid].tree.lookup_leaf(0) is not None
    assert not any(isinstance(h, (CopyL1Pages, L1Step)) for h in hcalls)


def test_h_copy_tofrom_guest_moves_the_bytes_l2_stored(data_rig: GuestRig) -> None:
    scratch = 0x10_0000
    addr = 4 * PAGE + 0x200
    run(data_rig, [(addr, STORE)])
    stored = encode(0, 1, addr)
    rc = data_rig.cluster.drive(data_rig.cluster.l0.h_copy_tofrom_guest(data_rig.vm, data_rig.lpid, 0, addr, scratch, 0, 8))
    assert rc == H.SUCCESS
    assert data_rig.l1.read_memory(scratch, 8) == struct.pack(">Q", stored)
    # And the other way: L1 writes a value into L2, which L2 then loads.
    data_rig.l1.write_memory(scratch, struct.pack(">Q", 0x1234_5678))
    rc = data_rig.cluster.drive(data_rig.cluster.l0.h_copy_tofrom_guest(data_rig.vm, data_rig.lpid, 0, addr, 0, scratch, 8))
    assert rc == H.SUCCESS
    assert data_rig.cluster.l0.data_load(host_of(data_rig, addr)) == 0x1234_5678


def test_checker_catches_a_migration_that_skips_the_copy(data_rig: GuestRig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(L0Hypervisor, "copy_frame", lambda self, dst, src, shift: None)
    run(data_rig, [(2 * PAGE, LOAD), (2 * PAGE + 0x40, STORE)])
    data_rig.cluster.host_migrate("a", data_rig.l1.guests[data_rig.lpid].backing[2])
    run(data_rig, [(2 * PAGE + 0x40, LOAD)])
    c = counters(data_rig)
    assert c["lost_writes"] == 1
    [d] = data_rig.cluster.lost_write_details()
    assert d["index"] == 2 and d["address"] == f"{2 * PAGE + 0x40:#x}" and d["got"] == "0x0" and d["store_index"] == 1
    assert "lost" in str(d["why"])


def test_checker_catches_a_vcpu_that_ignores_a_tlbie(data_rig: GuestRig) -> None:
    """A vCPU that keeps its translation after the migration's tlbie writes the old frame,
    which no longer backs the page: the write is lost and the next load says so."""
    run(data_rig, [(6 * PAGE, STORE)])
    data_rig.session.vcpu.invalidate = lambda inv: None  # type: ignore[method-assign]
    data_rig.cluster.host_migrate("a", data_rig.l1.guests[data_rig.lpid].backing[6])
    run(data_rig, [(6 * PAGE, STORE), (6 * PAGE, LOAD)])
    assert counters(data_rig)["lost_writes"] == 1
    assert data_rig.cluster.l0.stats["data_stray_stores"] == 1


def test_checker_names_a_misplaced_write() -> None:
    ck = DataChecker(slot=0)
    a, b = 0x1000, 0x2000
    va = ck.value_for(a)
    ck.stored(0, a, va)
    ck.stored(1, b, ck.value_for(b))
    ck.loaded(2, b, va)  # b returned a's value: a's store landed on b's page
    assert ck.counters()["misplaced_writes"] == 1 and ck.counters()["lost_writes"] == 0
    assert ck.details[0].misplaced and "misplaced" in ck.details[0].why


def test_checker_names_an_older_value_as_a_lost_later_store() -> None:
    ck = DataChecker(slot=2)
    a = 0x3000
    first = ck.value_for(a)
    ck.stored(0, a, first)
    ck.stored(1, a, ck.value_for(a))
    ck.loaded(2, a, first)
    assert ck.counters()["lost_writes"] == 1
    assert "store at access 1 was lost" in ck.details[0].why


def test_unwritten_word_baseline_is_checked_on_later_loads() -> None:
    ck = DataChecker(slot=0)
    ck.loaded(0, 0x40, 7)
    ck.loaded(1, 0x40, 7)
    ck.loaded(2, 0x40, 8)
    assert ck.counters()["data_loads_baseline"] == 1 and ck.counters()["data_loads_checked"] == 2 and ck.counters()["lost_writes"] == 1


def test_churn_loses_no_write_in_process() -> None:
    c = data_churn_cluster(seed=5, accesses=4_000)
    d = c.data_counters()
    assert d["lost_writes"] == 0 and d["misplaced_writes"] == 0, c.lost_write_details()
    assert d["data_loads_checked"] > 300 and d["data_stores"] > 1000
    k = c.counters()
    assert k["l0.host_frames_copied"] > 0 and k["l1.pages_migrated"] > 0 and k["l1.pages_swapped_in"] > 0 and k["l0.host_pages_swapped_in"] > 0
    assert c.audit().ok


@pytest.mark.parametrize("broken", ["copy_frame", "l1_copy_memory"])
def test_churn_checker_sees_losses_when_a_copy_is_skipped(broken: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if broken == "copy_frame":
        monkeypatch.setattr(L0Hypervisor, "copy_frame", lambda self, dst, src, shift: None)
    else:
        monkeypatch.setattr(L0Hypervisor, "l1_copy_memory", lambda self, vm, dst, src, n: H.SUCCESS)
    c = data_churn_cluster(seed=5, accesses=4_000)
    assert c.data_counters()["lost_writes"] > 0


@pytest.mark.parametrize("clear", [True, False])
def test_a_reused_l1_page_is_cleared_for_a_data_guest(clear: bool, cluster: InProcessCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """L1 frees page A's backing (swap-out) and hands the same L1 page to page B: B must read
    zeros (clear_page), or the checker names A's store misplaced onto B."""
    if not clear:
        monkeypatch.setattr(L0Hypervisor, "l1_zero_memory", lambda self, vm, dst, n: H.SUCCESS)
    lpid = cluster.create_guest("a", page_shift=16, data=True)
    rig = GuestRig(cluster, cluster.l1s["a"], cluster.vms["a"], lpid, cluster.attach_vcpu("a", lpid, 0))
    cluster.data_vcpu(rig.session, 0, fresh=True)
    run(rig, [(2 * PAGE + 0x40, STORE)])
    a_backing = rig.l1.guests[lpid].backing[2]
    cluster.issue_all("a", rig.l1.unmap_pages(lpid, 2 * PAGE, PAGE)[1])
    run(rig, [(5 * PAGE + 0x40, LOAD)])
    assert rig.l1.guests[lpid].backing[5] == a_backing  # the allocator reused A's page
    d = counters(rig)
    if clear:
        assert d["misplaced_writes"] == 0 and d["data_loads_checked"] == 1
    else:
        assert d["misplaced_writes"] == 1
        assert "misplaced" in str(cluster.lost_write_details()[0]["why"])


def test_same_seed_same_data_counters() -> None:
    a, b = data_churn_cluster(seed=9, accesses=2_000), data_churn_cluster(seed=9, accesses=2_000)
    assert a.data_counters() == b.data_counters() and a.counters() == b.counters()
    assert a.data_counters() != data_churn_cluster(seed=10, accesses=2_000).data_counters()


def test_frames_are_cleared_when_freed(data_rig: GuestRig) -> None:
    """A freed frame can become a page table: it must not carry an old guest's bytes."""
    run(data_rig, [(PAGE, STORE)])
    hpa = host_of(data_rig, PAGE)
    data_rig.cluster.remove_l1("a")
    assert data_rig.cluster.l0.mem.read_u64(hpa) == 0


def test_copying_before_the_tlbsync_would_lose_a_write(data_rig: GuestRig) -> None:
    """Why the copy waits for the tlbsync: run both phases before the tlbies reach the TLB
    (the core's one-shot host_migrate, outbox not yet delivered) and a store through the
    still-present TLB entry lands in the freed frame."""
    run(data_rig, [(8 * PAGE, STORE)])
    data_rig.cluster.l0.host_migrate(data_rig.vm, data_rig.l1.guests[data_rig.lpid].backing[8])
    run(data_rig, [(8 * PAGE, STORE)])  # a TLB hit: the tlbie has not been delivered yet
    data_rig.cluster.deliver(data_rig.cluster.l0.take_invalidations())
    run(data_rig, [(8 * PAGE, LOAD)])
    assert counters(data_rig)["lost_writes"] == 1


def test_a_fault_on_a_page_being_moved_waits_for_the_move(data_rig: GuestRig) -> None:
    """Between the two phases of a host migration the page has a migration entry: a nested
    fault on it yields WaitHostPage; once the move finished the retry maps the new frame."""
    c = data_rig.cluster
    run(data_rig, [(PAGE, STORE)])
    l1_gpa = data_rig.l1.guests[data_rig.lpid].backing[1]
    _, old, new, chunk = c.l0.host_invalidate_start(data_rig.vm, l1_gpa, migrate=True)
    c.deliver(c.l0.take_invalidations())
    waited: list[int] = []

    def answer(eff: object) -> object:
        if isinstance(eff, WaitHostPage):
            waited.append(eff.chunk)
            c.l0.host_invalidate_finish(data_rig.vm, eff.chunk)  # the move completes meanwhile
            return None
        return c.answer(eff)  # type: ignore[arg-type]

    res = run_sync(c.l0.run_access(data_rig.session.gp, 0, PAGE, Access.LOAD), answer)
    assert waited == [chunk]
    assert res.outcome is Outcome.FILL and res.translation is not None
    assert res.translation.host & ~((1 << 21) - 1) == new != old
    assert c.l0.stats["host_page_moving_retry"] == 1


def test_l1_fault_on_a_page_it_is_copying_waits(data_rig: GuestRig) -> None:
    """While L1 copies a page (remap), the leaf is a migration entry: an exit on it re-enters
    without instantiating anything (the service waits for the copy first)."""
    run(data_rig, [(3 * PAGE, STORE)])
    _, hcalls = data_rig.l1.remap_pages(data_rig.lpid, 3 * PAGE, PAGE)
    assert data_rig.l1.page_busy(data_rig.lpid, 3 * PAGE + 0x10)
    ex = NestedExit(f.BOOK3S_INTERRUPT_H_DATA_STORAGE, 3 * PAGE, f.DSISR_NOHPTE, 3 * PAGE, Access.LOAD)
    reply, more = data_rig.l1.handle_exit(data_rig.lpid, 0, ex)
    assert reply.action is ExitAction.REENTER and more == []
    assert data_rig.l1.guests[data_rig.lpid].tree.lookup_leaf(3 * PAGE) is None
    assert data_rig.l1.stats["exit.page_busy"] == 1
    data_rig.cluster.issue_all("a", hcalls)
    assert not data_rig.l1.page_busy(data_rig.lpid, 3 * PAGE)
    run(data_rig, [(3 * PAGE, LOAD)])
    assert counters(data_rig)["lost_writes"] == 0 and counters(data_rig)["data_loads_checked"] == 1


def test_l1_steps_run_once_so_a_failed_hcall_list_can_still_finish(data_rig: GuestRig) -> None:
    """When L0 goes away mid-list, the L1 service still runs the L1Steps (no page left busy);
    running one twice (retry after an error) must not free a page twice."""
    run(data_rig, [(4 * PAGE, STORE)])
    _, hcalls = data_rig.l1.remap_pages(data_rig.lpid, 4 * PAGE, PAGE)
    step = hcalls[-1]
    assert isinstance(step, L1Step)
    step.run()
    step.run()
    assert not data_rig.l1.page_busy(data_rig.lpid, 4 * PAGE)
    assert data_rig.l1.guests[data_rig.lpid].tree.lookup_leaf(4 * PAGE) is not None


def test_audit_counts_the_frames_of_a_page_mid_move(data_rig: GuestRig) -> None:
    run(data_rig, [(PAGE, STORE)])
    c = data_rig.cluster
    _, _, _, chunk = c.l0.host_invalidate_start(data_rig.vm, data_rig.l1.guests[data_rig.lpid].backing[1], migrate=True)
    c.deliver(c.l0.take_invalidations())
    assert c.audit().ok, c.audit().violations
    c.l0.host_invalidate_finish(data_rig.vm, chunk)
    assert c.audit().ok


def test_l1_copies_dirty_the_destination_while_dirty_logging(data_rig: GuestRig) -> None:
    run(data_rig, [(PAGE, STORE)])
    c = data_rig.cluster
    c.l0.set_dirty_logging(data_rig.vm, 0, True)
    c.deliver(c.l0.take_invalidations())
    _, hcalls = data_rig.l1.remap_pages(data_rig.lpid, PAGE, PAGE)
    c.issue_all("a", hcalls)
    new = data_rig.l1.guests[data_rig.lpid].backing[1]
    assert new in c.l0.harvest_dirty(data_rig.vm, 0)

"""Nested rmap lifetime as book3s_hv_nested.c has it, and the live/stale count L0 reports.

Inserted by kvmppc_create_pte -> kvmhv_insert_nest_rmap (dedup on lpid + n_gpa); never removed
one by one: a whole gfn list goes in kvmhv_remove_nest_rmap_range/_list (host invalidation of
that L0 page), and every list of every memslot in kvmhv_release_all_nested ->
kvmhv_free_memslot_nest_rmap.  Shadow frees (RIC=0/2, guest removal) leave entries stale.
"""

from __future__ import annotations

from _helpers_fault import Env, base_page_memslots, make_env

from nestmmu.core import formats as f
from nestmmu.core.effects import Outcome
from nestmmu.core.formats import Access
from nestmmu.core.l0 import NestRmapCount, count_nest_rmap


def fill(e: Env, pages: list[int]) -> None:
    for p in pages:
        assert e.access(p, Access.LOAD).outcome is Outcome.FILL


def entries(e: Env) -> int:
    return sum(len(v) for s in e.vm.memslots for v in s.rmap.values())


def test_kvmhv_insert_nest_rmap_dedups_on_lpid_and_n_gpa() -> None:
    e = make_env(memslots=base_page_memslots())
    fill(e, [0x10000])
    e.tlbie(f.RIC_TLB, f.IS_LPID)  # shadow tree freed, entry left behind
    assert count_nest_rmap(e.l0) == NestRmapCount(1, 0, 1)
    fill(e, [0x10000])  # the same (lpid, n_gpa) onto the same L1 page: no second entry
    assert count_nest_rmap(e.l0) == NestRmapCount(1, 1, 0)
    assert e.l0.stats["rmap_inserted"] == 1


def test_kvmhv_flush_nested_leaves_rmap_entries_stale_until_the_host_invalidates_the_page() -> None:
    e = make_env(memslots=base_page_memslots())
    pages = [0x10000, 0x20000, 0x30000]
    fill(e, pages)
    assert count_nest_rmap(e.l0) == NestRmapCount(3, 3, 0)
    e.c.detach_vcpu(e.s.name)
    l1_gpas = [e.l1_gpa(p) for p in pages]
    e.c.destroy_guest("a", e.lpid)  # PATE := 0, RIC=2: kvmhv_flush_nested removes the guest
    assert e.gp.freed
    assert count_nest_rmap(e.l0) == NestRmapCount(3, 0, 3)
    assert e.c.audit().ok  # stale entries are allowed (I6 forbids only missing ones)
    # kvmhv_remove_nest_rmap_range: the host unmaps one L1 page; its whole list goes.
    e.host(e.l0.host_unmap, e.vm, l1_gpas[0])
    assert count_nest_rmap(e.l0) == NestRmapCount(2, 0, 2)


def test_kvmhv_release_all_nested_frees_every_memslot_rmap() -> None:
    e = make_env(memslots=base_page_memslots())
    fill(e, [0x10000, 0x20000])
    e.tlbie(f.RIC_TLB, f.IS_LPID)
    fill(e, [0x40000])
    vm = e.vm
    assert entries(e) == 3
    e.c.remove_l1("a")  # destroy_l1 -> kvmhv_release_all_nested -> kvmhv_free_memslot_nest_rmap
    assert all(not s.rmap for s in vm.memslots)
    assert count_nest_rmap(e.l0) == NestRmapCount(0, 0, 0)


def test_an_entry_whose_leaf_moved_to_another_l1_page_counts_stale() -> None:
    e = make_env(memslots=base_page_memslots())
    p = 0x50000
    fill(e, [p])
    e.tlbie(f.RIC_TLB, f.IS_LPID)
    _, hcalls = e.l1.remap_pages(e.lpid, p, 0x10000)
    e.issue(hcalls)
    fill(e, [p])  # same (lpid, n_gpa), now filed under the new L1 page too
    assert count_nest_rmap(e.l0) == NestRmapCount(2, 1, 1)


def test_identical_guest_lifecycles_stop_growing_the_rmap() -> None:
    """The growth bound: at most one entry per (L1 page, l1_lpid, n_gpa).  Identical guests
    reuse lpid 1 and, through L1's LIFO allocator, the same L1 pages: after the first cycles
    the count is flat although every entry is stale."""
    e = make_env(memslots=base_page_memslots())
    pages = [0x10000, 0x20000, 0x30000, 0x40000]
    c = e.c
    c.detach_vcpu(e.s.name)
    c.destroy_guest("a", e.lpid)
    seen = []
    for _ in range(12):
        lpid = c.create_guest("a")
        s = c.attach_vcpu("a", lpid, 0)
        for p in pages:
            assert c.access(s, p, Access.STORE).outcome is Outcome.FILL
        c.detach_vcpu(s.name)
        c.destroy_guest("a", lpid)
        assert lpid == 1
        seen.append(count_nest_rmap(c.l0))
    assert all(n.live == 0 for n in seen)
    # <= 4 pages x 4 n_gpa per L1 page with one lpid; flat once every pairing was seen.
    assert max(n.entries for n in seen) <= len(pages) ** 2
    assert seen[-1] == seen[-2] == seen[-5]

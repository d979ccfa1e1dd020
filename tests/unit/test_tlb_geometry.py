"""The set-associative vCPU TLB: capacity, LRU within a congruence class, evictions, and the
fast path forgetting evicted entries (POWER9: 1,024 entries, 4-way)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nestmmu.core import formats as f
from nestmmu.core.effects import AccessResult, Invalidation, Outcome, Scope, Translation
from nestmmu.core.formats import Access
from nestmmu.core.sim import InProcessCluster
from nestmmu.core.vcpu import POWER9_TLB_ENTRIES, POWER9_TLB_WAYS, Tlb, Vcpu, tlb_geometry_error
from nestmmu.core.workload import WorkloadSpec

LOAD, STORE = int(Access.LOAD), int(Access.STORE)
ALL = f.PTE_R | f.PTE_C | f.PTE_EAA_READ | f.PTE_EAA_RW | f.PTE_EAA_EXEC
K64 = 16


def tr(lpid: int, pn: int, shift: int = K64, pid: int = -1) -> Translation:
    page = pn << shift
    host = 0x10_0000_0000 + page
    return Translation(lpid, page, host, shift, f.PTE_V | f.PTE_L | host | ALL, pid=pid, real_page=page if pid >= 0 else -1)


def test_default_is_power9() -> None:
    assert (POWER9_TLB_ENTRIES, POWER9_TLB_WAYS) == (1024, 4)
    assert Tlb().geometry == (1024, 4) and Vcpu(0).tlb.geometry == (1024, 4)
    assert WorkloadSpec().tlb_entries == 1024 and WorkloadSpec().tlb_ways == 4


def test_capacity_is_never_exceeded() -> None:
    t = Tlb(16, 4)  # 4 classes of 4
    evicted = sum(t.fill(tr(5, pn)) for pn in range(100))
    assert len(t) == 16 and evicted == 100 - 16
    assert max(t.class_sizes()) == 4
    # The survivors are the last four of each class.
    assert {e.page >> K64 for e in t.entries()} == set(range(84, 100))


def test_the_class_is_the_page_number_at_its_own_size() -> None:
    t = Tlb(8, 2)  # 4 classes
    t.fill(tr(5, 1, K64))  # class 1
    t.fill(tr(5, 1, 21))  # 2M page number 1: class 1 as well (one array for all sizes)
    t.fill(tr(6, 5, K64))  # another LPID, page 5: class 1 too; full now, evicts the LRU
    assert t.lookup(5, 1 << K64) is None  # the 64K entry (LRU) went; the 2M one still covers 0x200000..
    assert t.lookup(5, 1 << 21) is not None and t.lookup(6, 5 << K64) is not None
    t.fill(tr(5, 2, K64))  # class 2: nobody evicted
    assert len(t) == 3


def test_lru_victim_is_the_least_recently_used_and_a_hit_refreshes() -> None:
    t = Tlb(4, 4)  # one class
    for pn in range(4):
        t.fill(tr(5, pn))
    assert t.mask(5, 0)  # page 0 used: now the most recent
    assert t.fill(tr(5, 4)) == 1
    assert t.lookup(5, 0) is not None  # refreshed by the hit
    assert t.lookup(5, 1 << K64) is None  # page 1 was the least recently used
    # lookup is an inspection: it does not refresh page 2, which goes next.
    assert t.lookup(5, 2 << K64) is not None
    t.fill(tr(5, 5))
    assert t.lookup(5, 2 << K64) is None and t.lookup(5, 3 << K64) is not None


def test_a_refill_of_the_same_page_replaces_and_refreshes_without_evicting() -> None:
    t = Tlb(2, 2)
    t.fill(tr(5, 0))
    t.fill(tr(5, 1))
    assert t.fill(tr(5, 0)) == 0 and len(t) == 2
    t.fill(tr(5, 2))  # page 1 is now the LRU
    assert t.lookup(5, 0) is not None and t.lookup(5, 1 << K64) is None


def test_scan_hits_refresh_lru_and_evictions_are_counted() -> None:
    v = Vcpu(0, lpid=5, tlb_entries=2, tlb_ways=2)
    v.apply(AccessResult(Outcome.FILL, tr(5, 0)))
    v.apply(AccessResult(Outcome.FILL, tr(5, 1)))
    assert v.run_hits([0x100], [LOAD]) == [] and v.stats["tlb_hits"] == 1  # page 0 used
    v.next_round()
    v.apply(AccessResult(Outcome.FILL, tr(5, 2)))
    assert v.stats["tlb_evictions"] == 1 and v.stats["fills"] == 3
    assert v.run_hits([0x100, 2 << K64], [LOAD, LOAD]) == []  # 0 and 2 are in; 1 went
    v.next_round()
    assert v.run_hits([1 << K64], [LOAD]) == [(1 << K64, LOAD)]


def test_an_evicted_entry_leaves_the_fast_path() -> None:
    v = Vcpu(0, lpid=5, tlb_entries=1, tlb_ways=1)
    v.apply(AccessResult(Outcome.FILL, tr(5, 0)))
    assert v.run_hits([0x1000], [LOAD]) == []  # cached in the per-4K fast path now
    v.next_round()
    assert 0x1000 >> 12 in v.tlb.fast_cache()
    v.apply(AccessResult(Outcome.FILL, tr(5, 1)))  # same (only) class: evicts page 0
    assert 0x1000 >> 12 not in v.tlb.fast_cache()
    assert v.run_hits([0x1000], [LOAD]) == [(0x1000, LOAD)]  # a later access misses
    assert v.tlb.mask(5, 0x1000) == 0


def test_an_evicted_large_page_leaves_the_fast_path() -> None:
    t = Tlb(1, 1)
    t.fill(tr(5, 1, 21))
    assert t.mask(5, (1 << 21) + 0x5000)
    t.fill(tr(5, 0, K64))
    assert t.mask(5, (1 << 21) + 0x5000) == 0


def test_unbounded_never_evicts() -> None:
    v = Vcpu(0, lpid=5, tlb_entries=0)
    for pn in range(5000):
        v.apply(AccessResult(Outcome.FILL, tr(5, pn)))
    assert len(v.tlb) == 5000 and v.stats["tlb_evictions"] == 0
    assert v.tlb.geometry == (0, 4)


@pytest.mark.parametrize(
    ("entries", "ways", "why"),
    [(1024, 0, "ways must be >= 1"), (-1, 4, "0..4294967295"), (12, 8, "multiple of the ways"), (1000, 4, "power of two"), (1 << 32, 1, "0..")],
)
def test_invalid_geometry_is_rejected(entries: int, ways: int, why: str) -> None:
    err = tlb_geometry_error(entries, ways)
    assert err is not None and why in err and "\n" not in err
    with pytest.raises(ValueError, match=why.replace(".", r"\.")):
        Tlb(entries, ways)
    with pytest.raises(ValueError, match=why.replace(".", r"\.")):
        WorkloadSpec(tlb_entries=entries, tlb_ways=ways).validate()


@pytest.mark.parametrize(("entries", "ways"), [(0, 1), (0, 7), (1, 1), (1024, 4), (1024, 1024), (48, 3), (2048, 8)])
def test_valid_geometries(entries: int, ways: int) -> None:
    assert tlb_geometry_error(entries, ways) is None
    Tlb(entries, ways)


def _full_class() -> Tlb:
    t = Tlb(8, 4)  # 2 classes; fill class 0 with 64K pages 0, 2, 4, 6 of LPID 5 and one of LPID 6
    for pn in (0, 2, 4):
        t.fill(tr(5, pn))
    t.fill(tr(6, 8))
    assert t.class_sizes() == [4]
    return t


def test_tlbie_by_address_on_a_full_class_removes_exactly_what_it_did() -> None:
    t = _full_class()
    assert t.invalidate(Invalidation(5, Scope.ADDRESS, 2 << K64, 1 << K64)) == 1
    assert {(e.lpid, e.page >> K64) for e in t.entries()} == {(5, 0), (5, 4), (6, 8)}
    assert t.fill(tr(5, 10)) == 0  # the freed way is reused: no eviction


def test_tlbie_by_lpid_and_all_on_a_full_class() -> None:
    t = _full_class()
    assert t.invalidate(Invalidation(5, Scope.LPID)) == 3
    assert [(e.lpid, e.page >> K64) for e in t.entries()] == [(6, 8)] and t.class_sizes() == [1]
    assert t.invalidate(Invalidation(0, Scope.ALL)) == 1 and len(t) == 0 and t.class_sizes() == []


def test_process_scoped_tlbie_on_a_full_class() -> None:
    t = Tlb(4, 4)
    t.fill(tr(5, 0, pid=1))
    t.fill(tr(5, 1, pid=2))
    t.fill(tr(5, 2, pid=1))
    t.fill(tr(5, 3))
    assert t.invalidate(Invalidation(5, Scope.PID, prs=True, pid=1)) == 2
    assert sorted((e.pid, e.page >> K64) for e in t.entries()) == [(-1, 3), (2, 1)]
    # Partition scoped by address reaches the EA entry through its real page.
    assert t.invalidate(Invalidation(5, Scope.ADDRESS, 1 << K64, 1 << K64)) == 1
    assert [(e.pid, e.page >> K64) for e in t.entries()] == [(-1, 3)]


def test_resize_keeps_the_most_recently_used() -> None:
    v = Vcpu(0, lpid=5, tlb_entries=0)
    for pn in range(8):
        v.apply(AccessResult(Outcome.FILL, tr(5, pn)))
    assert v.tlb.mask(5, 0)  # page 0 is now the most recent
    v.set_tlb_geometry(4, 4)
    assert v.stats["tlb_evictions"] == 4
    assert {e.page >> K64 for e in v.tlb.entries()} == {0, 5, 6, 7}
    v.set_tlb_geometry(4, 4)  # unchanged: nothing happens
    assert v.stats["tlb_evictions"] == 4


def test_a_workload_over_capacity_evicts_and_stays_audit_clean() -> None:
    """The geometry reaches the vCPU through WorkloadSpec; evictions only remove entries."""
    runs = {}
    for entries in (0, 64):
        c = InProcessCluster()
        c.add_l1("l1a")
        lpid = c.create_guest("l1a", page_shift=16, memory=64 << 20)
        s = c.attach_vcpu("l1a", lpid, 0)
        spec = WorkloadSpec(pattern="uniform", accesses=4000, seed=3, footprint=32 << 20, tlb_entries=entries, tlb_ways=4)
        stats = c.run_workload(s, spec)
        assert c.audit().ok
        runs[entries] = dict(stats)
        runs[entries]["held"] = len(s.vcpu.tlb)
    assert runs[0].get("tlb_evictions", 0) == 0
    assert runs[64]["tlb_evictions"] > 0
    assert runs[64]["tlb_hits"] < runs[0]["tlb_hits"] and runs[64]["fills"] > runs[0]["fills"]
    assert runs[64]["held"] == 64 < runs[0]["held"]  # every way ends up full; no more


# --------------------------------------------------------------------------- reference model
class RefTlb:
    """Dict of classes, each an explicit LRU list of tags (oldest first)."""

    def __init__(self, entries: int, ways: int) -> None:
        self.sets_n = entries // ways if entries else 1
        self.ways = ways if entries else 1 << 30
        self.sets: dict[int, list[tuple[int, int, int, int]]] = {}
        self.evictions = 0

    def _touch(self, tag: tuple[int, int, int, int]) -> None:
        lru = self.sets.setdefault(tag[3] % self.sets_n, [])
        if tag in lru:
            lru.remove(tag)
        elif len(lru) >= self.ways:
            lru.pop(0)
            self.evictions += 1
        lru.append(tag)

    def fill(self, lpid: int, pn: int, shift: int) -> None:
        self._touch((lpid, -1, shift, pn))

    def find(self, lpid: int, addr: int) -> tuple[int, int, int, int] | None:
        tags = [t for lru in self.sets.values() for t in lru if t[0] == lpid and t[3] == addr >> t[2]]
        return min(tags, key=lambda t: t[2]) if tags else None

    def access(self, lpid: int, addr: int) -> bool:
        tag = self.find(lpid, addr)
        if tag is not None:
            self._touch(tag)
        return tag is not None

    def drop(self, keep: object) -> None:
        for lru in self.sets.values():
            lru[:] = [t for t in lru if keep(t)]  # type: ignore[operator]

    def contents(self) -> set[tuple[int, int, int, int]]:
        return {t for lru in self.sets.values() for t in lru}


op = st.one_of(
    st.tuples(st.just("fill"), st.integers(1, 2), st.integers(0, 40), st.sampled_from([12, 16, 21])),
    st.tuples(st.just("scan"), st.integers(1, 2), st.lists(st.integers(0, (40 << 16) - 1), min_size=1, max_size=6), st.just(0)),
    st.tuples(st.just("tlbie"), st.integers(1, 2), st.integers(0, (40 << 16) - 1), st.sampled_from([0, 12, 16, 21])),
)


@settings(max_examples=300, deadline=None)
@given(geometry=st.sampled_from([(0, 4), (4, 1), (4, 2), (8, 4), (16, 4), (2, 2)]), ops=st.lists(op, max_size=60))
def test_matches_a_reference_lru_model(geometry: tuple[int, int], ops: list[tuple[str, int, object, int]]) -> None:
    """Fills, scans (through the real-mode fast path) and tlbies against explicit LRU lists."""
    entries, ways = geometry
    vcpus = {lpid: Vcpu(0, lpid=lpid, tlb_entries=entries, tlb_ways=ways) for lpid in (1, 2)}
    tlb = Tlb(entries, ways)
    for v in vcpus.values():
        v.tlb = tlb  # one TLB, two LPIDs running on it in turn
    ref = RefTlb(entries, ways)
    evictions = 0
    for name, lpid, arg, size in ops:
        if name == "fill":
            assert isinstance(arg, int)
            evictions += tlb.fill(tr(lpid, arg >> (size - 12) if size > 12 else arg, size))
            ref.fill(lpid, arg >> (size - 12) if size > 12 else arg, size)
        elif name == "scan":
            assert isinstance(arg, list)
            v = vcpus[lpid]
            missed = {a for a, _ in v.run_hits(arg, [LOAD] * len(arg))}
            v.take_deferred()
            want = {a for a in arg if not ref.access(lpid, a)}
            assert {a >> 12 for a in missed} == {a >> 12 for a in want}
        else:
            assert isinstance(arg, int)
            if size:
                start, end = arg, arg + (1 << size)
                got = tlb.invalidate(Invalidation(lpid, Scope.ADDRESS, start, 1 << size))
                before = len(ref.contents())
                ref.drop(lambda t, lp=lpid, s=start, e=end: not (t[0] == lp and t[3] << t[2] < e and s < (t[3] + 1) << t[2]))
            else:
                got = tlb.invalidate(Invalidation(lpid, Scope.LPID))
                before = len(ref.contents())
                ref.drop(lambda t, lp=lpid: t[0] != lp)
            assert got == before - len(ref.contents())
        assert {(e.lpid, e.pid, e.shift, e.page >> e.shift) for e in tlb.entries()} == ref.contents()
        assert evictions == ref.evictions
        if entries:
            assert len(tlb) <= entries and all(n <= ways for n in tlb.class_sizes())

"""The vCPU TLB (LPID-tagged, R/C aware) and the batch protocol of misses."""

from __future__ import annotations

import pytest

from nestmmu.core import formats as f
from nestmmu.core.effects import AccessResult, Invalidation, Outcome, Scope, Translation
from nestmmu.core.formats import Access
from nestmmu.core.vcpu import Tlb, Vcpu, allowed_mask

LOAD = 1 << Access.LOAD
STORE = 1 << Access.STORE
IFETCH = 1 << Access.IFETCH
R, C = f.PTE_R, f.PTE_C
READ, RW, X = f.PTE_EAA_READ, f.PTE_EAA_RW, f.PTE_EAA_EXEC


def pte(host: int, bits: int) -> int:
    return f.PTE_V | f.PTE_L | host | bits


def tr(lpid: int, page: int, shift: int, bits: int = R | C | READ | RW | X, host: int | None = None) -> Translation:
    host = 0x10_0000_0000 + page if host is None else host
    return Translation(lpid, page, host, shift, pte(host, bits))


# --------------------------------------------------------------------------- allowed_mask
@pytest.mark.parametrize(
    ("bits", "expected"),
    [
        pytest.param(READ | RW | X | C, 0, id="no-R-nothing"),
        pytest.param(R | READ, LOAD, id="R+read-load"),
        pytest.param(R | RW, LOAD, id="RW-without-C-load-only"),
        pytest.param(R | RW | C, LOAD | STORE, id="RW+C-store"),
        pytest.param(R | READ | C, LOAD, id="C-without-RW-no-store"),
        pytest.param(R | X, IFETCH, id="X-only-ifetch"),
        pytest.param(R | C, 0, id="no-EAA-nothing"),
        pytest.param(R | C | READ | RW | X, LOAD | STORE | IFETCH, id="all"),
        pytest.param(R | READ | f.PTE_EAA_PRIV, LOAD, id="priv-ignored"),
    ],
)
def test_allowed_mask(bits: int, expected: int) -> None:
    assert allowed_mask(pte(0x1000, bits)) == expected


# --------------------------------------------------------------------------- fill / lookup
@pytest.mark.parametrize("shift", [16, 21, 30])
def test_fill_and_lookup_at_each_size(shift: int) -> None:
    t = Tlb()
    page = 3 << shift
    t.fill(tr(5, page, shift))
    size = 1 << shift
    for addr in (page, page + 0x1234, page + size - 1):
        e = t.lookup(5, addr)
        assert e is not None and e.page == page and e.shift == shift and e.host == 0x10_0000_0000 + page
    assert t.lookup(5, page - 1) is None
    assert t.lookup(5, page + size) is None
    assert t.lookup(6, page) is None  # other LPID
    assert len(t) == 1


def test_mask_uses_the_entry_permissions() -> None:
    t = Tlb()
    t.fill(tr(5, 0x20_0000, 21, R | READ))
    assert t.mask(5, 0x20_0008) == LOAD
    assert t.mask(5, 0x40_0000) == 0
    assert t.mask(4, 0x20_0008) == 0


def test_refill_of_same_page_replaces_the_entry() -> None:
    t = Tlb()
    t.fill(tr(5, 0x1_0000, 16, R | READ, host=0xA_0000))
    t.fill(tr(5, 0x1_0000, 16, R | READ | RW | C, host=0xB_0000))
    assert len(t) == 1
    e = t.lookup(5, 0x1_0000)
    assert e is not None and e.host == 0xB_0000 and e.mask == LOAD | STORE


# --------------------------------------------------------------------------- invalidation
@pytest.fixture
def loaded() -> Tlb:
    t = Tlb()
    t.fill(tr(5, 0x1_0000, 16))  # 64K at 64K
    t.fill(tr(5, 0x20_0000, 21))  # 2M at 2M
    t.fill(tr(5, 0x4000_0000, 30))  # 1G at 1G
    t.fill(tr(6, 0x1_0000, 16))  # another LPID
    return t


def test_invalidate_by_address_drops_overlapping_entries_only(loaded: Tlb) -> None:
    # A 64K tlbie inside the 2M page drops the 2M entry.
    assert loaded.invalidate(Invalidation(5, Scope.ADDRESS, 0x21_0000, 1 << 16)) == 1
    assert loaded.lookup(5, 0x20_0000) is None
    assert loaded.lookup(5, 0x1_0000) is not None
    assert loaded.lookup(5, 0x4000_0000) is not None
    assert loaded.lookup(6, 0x1_0000) is not None


def test_invalidate_by_address_large_range_drops_small_entries(loaded: Tlb) -> None:
    assert loaded.invalidate(Invalidation(5, Scope.ADDRESS, 0, 1 << 30)) == 2
    assert loaded.lookup(5, 0x1_0000) is None and loaded.lookup(5, 0x20_0000) is None
    assert loaded.lookup(5, 0x4000_0000) is not None


def test_invalidate_by_address_adjacent_ranges_do_not_overlap(loaded: Tlb) -> None:
    assert loaded.invalidate(Invalidation(5, Scope.ADDRESS, 0x1F_0000, 1 << 16)) == 0  # ends at 2M
    assert loaded.invalidate(Invalidation(5, Scope.ADDRESS, 0x40_0000, 1 << 21)) == 0  # starts at 4M
    assert loaded.invalidate(Invalidation(5, Scope.ADDRESS, 0x0, 1 << 16)) == 0  # ends at 64K
    assert len(loaded) == 4


def test_invalidate_by_address_size_zero_is_one_byte(loaded: Tlb) -> None:
    assert loaded.invalidate(Invalidation(5, Scope.ADDRESS, 0x1_FFFF, 0)) == 1
    assert loaded.lookup(5, 0x1_0000) is None


def test_invalidate_by_lpid_leaves_other_lpids(loaded: Tlb) -> None:
    assert loaded.invalidate(Invalidation(5, Scope.LPID)) == 3
    assert loaded.lookup(5, 0x20_0000) is None
    assert loaded.lookup(6, 0x1_0000) is not None
    assert len(loaded) == 1
    assert loaded.invalidate(Invalidation(7, Scope.LPID)) == 0


def test_invalidate_address_of_other_lpid_does_nothing(loaded: Tlb) -> None:
    assert loaded.invalidate(Invalidation(7, Scope.ADDRESS, 0, 1 << 40)) == 0
    assert len(loaded) == 4


def test_invalidate_all(loaded: Tlb) -> None:
    assert loaded.invalidate(Invalidation(0, Scope.ALL)) == 4
    assert len(loaded) == 0
    assert loaded.entries() == []
    assert loaded.mask(6, 0x1_0000) == 0


def test_clear() -> None:
    t = Tlb()
    t.fill(tr(1, 0, 16))
    t.clear()
    assert len(t) == 0 and t.lookup(1, 0) is None


# --------------------------------------------------------------------------- the fast cache
@pytest.mark.parametrize("shift", [16, 21, 30])
def test_fast_cache_sees_an_upgrade_fill(shift: int) -> None:
    t = Tlb()
    page = 1 << shift
    t.fill(tr(5, page, shift, R | READ | RW))  # no C: a store misses
    assert t.mask(5, page + 0x3000) == LOAD  # cached in the fast path now
    t.fill(tr(5, page, shift, R | READ | RW | C))  # SET_RC fault resolved: refill with C
    assert t.mask(5, page + 0x3000) == LOAD | STORE


def test_fast_cache_sees_a_smaller_fill_under_a_cached_miss() -> None:
    t = Tlb()
    assert t.mask(5, 0x1_2000) == 0
    t.fill(tr(5, 0x1_0000, 16, R | READ))
    assert t.mask(5, 0x1_2000) == LOAD


@pytest.mark.parametrize("scope", [Scope.ADDRESS, Scope.LPID, Scope.ALL])
def test_fast_cache_is_dropped_by_invalidation(scope: Scope) -> None:
    t = Tlb()
    t.fill(tr(5, 0x20_0000, 21))
    assert t.mask(5, 0x20_1000) == LOAD | STORE | IFETCH
    t.invalidate(Invalidation(5, scope, 0x20_0000, 1 << 21))
    assert t.mask(5, 0x20_1000) == 0


def test_fast_cache_is_per_lpid() -> None:
    t = Tlb()
    t.fill(tr(5, 0x1_0000, 16, R | READ))
    t.fill(tr(6, 0x1_0000, 16, R | X))
    assert t.mask(5, 0x1_0000) == LOAD
    assert t.mask(6, 0x1_0000) == IFETCH
    assert t.mask(5, 0x1_0000) == LOAD
    # An invalidation of LPID 6 while 5 is cached leaves 5 intact.
    t.invalidate(Invalidation(6, Scope.LPID))
    assert t.mask(5, 0x1_0000) == LOAD
    assert t.mask(6, 0x1_0000) == 0


def test_fast_cache_after_address_invalidation_of_a_neighbour() -> None:
    t = Tlb()
    t.fill(tr(5, 0x1_0000, 16))
    t.fill(tr(5, 0x2_0000, 16))
    assert t.mask(5, 0x1_0000) and t.mask(5, 0x2_0000)
    t.invalidate(Invalidation(5, Scope.ADDRESS, 0x2_0000, 1 << 16))
    assert t.mask(5, 0x2_0000) == 0
    assert t.mask(5, 0x1_0000) == LOAD | STORE | IFETCH


# --------------------------------------------------------------------------- Vcpu batching
def fill_result(lpid: int, page: int, shift: int, bits: int) -> AccessResult:
    return AccessResult(Outcome.FILL, tr(lpid, page, shift, bits))


def test_run_hits_counts_tlb_hits_locally() -> None:
    v = Vcpu(0, lpid=5)
    v.tlb.fill(tr(5, 0, 16, R | READ | RW | C))
    send = v.run_hits([0x10, 0x20, 0x1_0000], [Access.LOAD, Access.STORE, Access.LOAD])
    assert send == [(0x1_0000, Access.LOAD)]
    assert v.stats["accesses"] == 3
    assert v.stats["tlb_hits"] == 2
    assert v.stats["misses_sent"] == 1


def test_run_hits_dedups_misses_per_4k_page_and_kind() -> None:
    v = Vcpu(0, lpid=5)
    addrs = [0x1000, 0x1008, 0x1FF8, 0x1010, 0x2000, 0x1000]
    kinds: list[int] = [Access.LOAD, Access.LOAD, Access.LOAD, Access.STORE, Access.LOAD, Access.IFETCH]
    send = v.run_hits(addrs, kinds)
    # One per (4K page, kind): 0x1000 load, 0x1010 store, 0x2000 load (another 4K page), 0x1000 fetch.
    assert send == [(0x1000, Access.LOAD), (0x1010, Access.STORE), (0x2000, Access.LOAD), (0x1000, Access.IFETCH)]
    assert v.stats["misses_sent"] == 4
    assert v.stats["tlb_hits"] == 0


def test_next_round_rechecks_deferred_accesses_against_the_new_fill() -> None:
    v = Vcpu(0, lpid=5)
    send = v.run_hits([0x1000, 0x1008, 0x1010], [Access.LOAD, Access.LOAD, Access.LOAD])
    assert send == [(0x1000, Access.LOAD)]
    nxt = v.complete([fill_result(5, 0, 16, R | READ)])
    assert nxt == []
    assert v.stats["tlb_hits"] == 2
    assert v.stats["fills"] == 1
    assert v.stats["accesses"] == 3


def test_next_round_resends_deferred_accesses_that_still_miss() -> None:
    v = Vcpu(0, lpid=5)
    send = v.run_hits([0x1000, 0x1008, 0x1010, 0x1018], [Access.STORE] * 4)
    assert send == [(0x1000, Access.STORE)]
    # The store faulted into a storage interrupt: nothing was installed.
    nxt = v.complete([AccessResult(Outcome.STORAGE_INTERRUPT, dsisr=f.DSISR_PROTFAULT)])
    assert nxt == [(0x1008, Access.STORE)]  # deduplicated again
    assert v.stats["storage_interrupts"] == 1
    nxt = v.complete([AccessResult(Outcome.STORAGE_INTERRUPT)])
    assert nxt == [(0x1010, Access.STORE)]
    nxt = v.complete([fill_result(5, 0, 16, R | RW | C)])
    assert nxt == []
    assert v.stats["tlb_hits"] == 1
    assert v.stats["accesses"] == 4


def test_next_round_after_a_fill_without_c_resends_the_store() -> None:
    v = Vcpu(0, lpid=5)
    send = v.run_hits([0x1000, 0x1000], [Access.LOAD, Access.STORE])
    assert send == [(0x1000, Access.LOAD), (0x1000, Access.STORE)]
    # Both get the same read-faulted entry without C: the store is not a hit in later batches.
    assert v.complete([fill_result(5, 0, 16, R | RW), fill_result(5, 0, 16, R | RW)]) == []
    assert v.run_hits([0x1000], [Access.STORE]) == [(0x1000, Access.STORE)]


def test_complete_with_wrong_result_count_raises() -> None:
    v = Vcpu(0, lpid=5)
    v.run_hits([0x1000, 0x2000], [Access.LOAD, Access.LOAD])
    with pytest.raises(ValueError, match="1 results for 2"):
        v.complete([AccessResult(Outcome.ERROR)])
    with pytest.raises(ValueError, match="3 results for 2"):
        v.complete([AccessResult(Outcome.ERROR)] * 3)


def test_complete_with_nothing_sent_accepts_no_results() -> None:
    v = Vcpu(0, lpid=5)
    assert v.complete([]) == []
    with pytest.raises(ValueError):
        v.complete([AccessResult(Outcome.ERROR)])


def test_apply_counts_each_outcome() -> None:
    v = Vcpu(0, lpid=5)
    for outcome in (Outcome.STORAGE_INTERRUPT, Outcome.MMIO_EMULATED, Outcome.L1_EMULATED, Outcome.ERROR):
        v.apply(AccessResult(outcome))
    v.apply(fill_result(5, 0, 16, R | READ))
    assert (v.stats["storage_interrupts"], v.stats["mmio_emulated"], v.stats["l1_emulated"], v.stats["errors"], v.stats["fills"]) == (1, 1, 1, 1, 1)
    assert len(v.tlb) == 1


def test_vcpu_invalidate_counts_dropped_entries() -> None:
    v = Vcpu(0, lpid=5)
    v.tlb.fill(tr(5, 0, 16))
    v.tlb.fill(tr(5, 1 << 16, 16))
    v.invalidate(Invalidation(5, Scope.LPID))
    assert v.stats["invalidations_applied"] == 1
    assert v.stats["tlb_entries_dropped"] == 2


def test_run_hits_requires_equal_lengths() -> None:
    with pytest.raises(ValueError):
        Vcpu(0, 5).run_hits([0, 8], [Access.LOAD])

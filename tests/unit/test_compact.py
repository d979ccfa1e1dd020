"""The compact structures behave exactly as the dicts/lists/checks they replace.

Each is driven through random operations side by side with the plain-Python structure it
replaced (Hypothesis), and every result -- values, KeyErrors, lengths, iteration order --
must agree.  The allocator is compared with a copy of its dict-based predecessor: the same
requests must hand out the same addresses, since table and frame addresses are observable.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nestmmu.core.compact import PageMap, RmapList
from nestmmu.core.l1 import L1Hypervisor, MemslotSpec
from nestmmu.core.memory import Allocator, BlockMap, MemoryFault, OutOfMemory, SimMemory

# --------------------------------------------------------------------------- PageMap
_ops = st.lists(
    st.tuples(st.sampled_from(["set", "pop", "del", "get", "in", "iter"]), st.integers(0, 3000), st.integers(0, (1 << 64) - 2)),
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(_ops)
def test_pagemap_is_a_dict(ops: list[tuple[str, int, int]]) -> None:
    pm = PageMap()
    d: dict[int, int] = {}
    for op, k, v in ops:
        if op == "set":
            pm[k] = v
            d[k] = v
        elif op == "pop":
            assert pm.pop(k, None) == d.pop(k, None)
        elif op == "del":
            if k in d:
                del d[k]
                del pm[k]
            else:
                with pytest.raises(KeyError):
                    del pm[k]
        elif op == "get":
            assert pm.get(k) == d.get(k)
        elif op == "in":
            assert (k in pm) == (k in d)
        else:
            assert list(pm) == list(d)  # insertion order, re-insertion moves to the end
        assert len(pm) == len(d) and bool(pm) == bool(d)
    assert list(pm.items()) == list(d.items())
    assert pm == d and PageMap(d) == pm


def test_pagemap_order_after_many_pops_and_reinserts() -> None:
    pm = PageMap()
    d: dict[int, int] = {}
    for i in range(5000):  # enough stale log entries to force squeezes on delete
        k = (i * 7919) % 600
        if k in d:
            del d[k]
            del pm[k]
        else:
            d[k] = pm[k] = i
    assert list(pm.items()) == list(d.items())


def test_pagemap_rejects_what_it_cannot_hold() -> None:
    pm = PageMap()
    with pytest.raises(ValueError):
        pm[-1] = 0
    with pytest.raises(ValueError):
        pm[0] = (1 << 64) - 1
    with pytest.raises(KeyError):
        pm[5]
    assert -1 not in pm and "x" not in pm


# --------------------------------------------------------------------------- RmapList
def test_rmaplist_is_the_list_it_replaces() -> None:
    r = RmapList([3, 0, (1 << 64) - 1])
    assert r == [3, 0, (1 << 64) - 1] and r != [3, 0]
    assert list(r) == [3, 0, (1 << 64) - 1] and r[1:] == RmapList([0, (1 << 64) - 1])
    assert 0 in r[1:] and 5 not in r
    r.append(9)
    r.remove(0)
    assert r == [3, (1 << 64) - 1, 9] and len(r) == 3
    assert r.itemsize == 8  # packed u64, not a list of int objects
    with pytest.raises(OverflowError):
        r.append(1 << 64)


# --------------------------------------------------------------------------- allocator
class _DictAllocator:
    """The allocator before BlockMap (in_use a dict), kept as the reference."""

    def __init__(self, base: int, limit: int) -> None:
        self.base, self.limit, self._bump = base, limit, base
        self._free: dict[int, list[int]] = {}
        self.in_use: dict[int, int] = {}

    def alloc(self, size: int) -> int:
        lst = self._free.get(size)
        if lst:
            addr = lst.pop()
        else:
            bigger = sorted(s for s, lst2 in self._free.items() if s > size and lst2)
            if bigger:
                addr = self._free[bigger[0]].pop()
                half = bigger[0] >> 1
                while half >= size:
                    self._free.setdefault(half, []).append(addr + half)
                    half >>= 1
            else:
                addr = (self._bump + size - 1) & ~(size - 1)
                if addr + size > self.limit:
                    raise OutOfMemory
                gap = self._bump
                while gap < addr:
                    step = gap & -gap if gap else addr
                    while gap + step > addr:
                        step >>= 1
                    self._free.setdefault(step, []).append(gap)
                    gap += step
                self._bump = addr + size
        self.in_use[addr] = size
        return addr

    def free(self, addr: int) -> None:
        actual = self.in_use.pop(addr, None)
        if actual is None:
            raise ValueError
        self._free.setdefault(actual, []).append(addr)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([0x100, 0x1000, 0x10000, 0x200000]), st.integers(0, 1 << 30)), max_size=200))
def test_allocator_hands_out_what_the_dict_allocator_did(ops: list[tuple[bool, int, int]]) -> None:
    new, old = Allocator(0x1000_0100, 0x1400_0000), _DictAllocator(0x1000_0100, 0x1400_0000)
    for is_alloc, size, pick in ops:
        if is_alloc or not old.in_use:
            try:
                want = old.alloc(size)
            except OutOfMemory:
                with pytest.raises(OutOfMemory):
                    new.alloc(size)
                continue
            assert new.alloc(size) == want
        else:
            addr = sorted(old.in_use)[pick % len(old.in_use)]
            old.free(addr)
            new.free(addr)
            with pytest.raises(ValueError, match="double free"):
                new.free(addr)
        assert dict(new.in_use) == old.in_use  # same blocks, same sizes
        assert len(new.in_use) == len(old.in_use)
        assert new.bytes_in_use() == sum(old.in_use.values())


def test_blockmap_refuses_a_block_twice_and_drops_empty_regions() -> None:
    b = BlockMap()
    b.add(0x10000, 0x10000)
    with pytest.raises(ValueError, match="already in use"):
        b.add(0x10000, 0x10000)
    assert b[0x10000] == 0x10000 and 0x10000 in b and 0x20000 not in b
    assert b.pop(0x10000) == 0x10000 and b.pop(0x10000) is None
    assert len(b) == 0 and not b._classes[16]


# --------------------------------------------------------------------------- checked reads
def test_invalid_reads_still_fault_around_cached_chunks() -> None:
    """A chunk found wholly valid skips the per-read check; every other address still
    checks: a read outside a memslot -- in the same chunk as valid bytes, after the valid
    chunk was cached, beyond the size, negative -- raises MemoryFault as before."""
    m = SimMemory(0x10000, valid=lambda a: 0x1000 <= a < 0x2800, valid_span=lambda lo, hi: lo >= 0x1000 and hi <= 0x2800)
    m.write_u64(0x1008, 7)
    for _ in range(2):  # the second round runs on the cached chunk
        assert m.read_u64(0x1008) == 7
        assert m.read_u64(0x2000) == 0  # chunk 2 is only partly valid: checked, not cached
        for bad in (0x2800, 0x2FF8, 0x0FF8, 0x3000, 0x10000, -8):
            with pytest.raises(MemoryFault):
                m.read_u64(bad)
    assert m._ok_chunks == {1}


def test_invalid_reads_fault_without_a_span_callback() -> None:
    m = SimMemory(1 << 20, valid=lambda a: 0x1000 <= a < 0x2000)
    assert m.read_u64(0x1000) == 0
    assert m.read_u64(0x1000) == 0
    with pytest.raises(MemoryFault):
        m.read_u64(0x2000)
    assert not m._ok_chunks  # no span callback: nothing is trusted


def test_l1_memory_faults_in_holes_between_memslots() -> None:
    """L1's memory: RAM, a hole (MMIO), ROM.  Reads in the hole fault, however often RAM and
    ROM chunks next to it were read; a 4 KiB chunk straddling two slots is never trusted."""
    slots = [MemslotSpec(0, 0, 0x4000_0000), MemslotSpec(1, 0x4000_0800 + 0x1000, 0x10_0000, read_only=True)]
    l1 = L1Hypervisor("l1", memslots=slots)
    mem = l1.mem
    for _ in range(2):
        assert mem.read_u64(0x3FFF_FFF8) == 0
        assert mem.read_u64(0x4000_1800) == 0  # ROM starts mid-chunk: checked each time
        for bad in (0x4000_0000, 0x4000_0FF8, 0x4000_17F8, 0x4010_1800):
            with pytest.raises(MemoryFault):
                mem.read_u64(bad)
    assert (0x4000_1800 >> 12) not in mem._ok_chunks and (0x3FFF_FFF8 >> 12) in mem._ok_chunks

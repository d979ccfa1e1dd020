"""Simulated memory (big-endian doublewords, faults) and the deterministic block allocator."""

from __future__ import annotations

import pytest

from nestmmu.core.memory import Allocator, MemoryFault, OutOfMemory, SimMemory


# --------------------------------------------------------------------------- SimMemory
def test_u64_is_stored_big_endian() -> None:
    m = SimMemory(1 << 20)
    m.write_u64(0x1000, 0x0102_0304_0506_0708)
    assert m.read(0x1000, 8) == bytes([1, 2, 3, 4, 5, 6, 7, 8])
    assert m.read_u64(0x1000) == 0x0102_0304_0506_0708


def test_u64_read_of_bytes_written() -> None:
    m = SimMemory(1 << 20)
    m.write(0x2008, bytes([0x80, 0, 0, 0, 0, 0, 0, 0x01]))
    assert m.read_u64(0x2008) == 0x8000_0000_0000_0001


def test_untouched_memory_reads_zero_and_stays_sparse() -> None:
    m = SimMemory(1 << 40)
    assert m.read_u64(0xFF_FFFF_F000) == 0
    assert m.read(0x1234, 16) == bytes(16)
    m.write_u64(0x5000, 0)  # writing zero to an absent chunk materialises nothing
    assert m.resident_bytes() == 0
    m.write_u64(0x5000, 1)
    assert m.resident_bytes() == 4096


@pytest.mark.parametrize("addr", [1, 4, 7, 0x1003])
def test_unaligned_doubleword_access_is_an_error(addr: int) -> None:
    m = SimMemory(1 << 20)
    with pytest.raises(ValueError, match="unaligned"):
        m.read_u64(addr)
    with pytest.raises(ValueError, match="unaligned"):
        m.write_u64(addr, 1)


@pytest.mark.parametrize("addr", [0x1000, 0x1000 - 4, 0x2000, -8])
def test_access_outside_size_faults(addr: int) -> None:
    m = SimMemory(0x1000)
    with pytest.raises(MemoryFault) as e:
        m.read(addr, 8)
    assert e.value.addr == addr
    with pytest.raises(MemoryFault):
        m.write(addr, b"12345678")


def test_doubleword_outside_size_faults() -> None:
    m = SimMemory(0x1000)
    m.write_u64(0xFF8, 7)  # last doubleword is fine
    assert m.read_u64(0xFF8) == 7
    with pytest.raises(MemoryFault):
        m.read_u64(0x1000)
    with pytest.raises(MemoryFault):
        m.write_u64(0x1000, 1)


def test_access_outside_valid_faults() -> None:
    m = SimMemory(1 << 20, valid=lambda a: 0x1000 <= a < 0x3000)
    m.write_u64(0x1000, 5)
    assert m.read_u64(0x1000) == 5
    with pytest.raises(MemoryFault):
        m.read_u64(0x3000)
    with pytest.raises(MemoryFault):
        m.write_u64(0x0FF8, 1)
    # A range that starts inside and ends outside faults too.
    with pytest.raises(MemoryFault):
        m.read(0x2FF8, 16)
    with pytest.raises(MemoryFault):
        m.write(0x2FFC, b"abcdefgh")
    # Nothing was written by the failed accesses.
    assert m.read(0x2FF8, 8) == bytes(8)


def test_byte_ranges_cross_chunks() -> None:
    m = SimMemory(1 << 20)
    data = bytes(range(256)) * 40  # 10 KiB, spans three 4 KiB chunks
    m.write(0xF80, data)
    assert m.read(0xF80, len(data)) == data
    assert m.read_u64(0x1000) == int.from_bytes(data[0x80:0x88], "big")


def test_zero_clears_partial_and_whole_chunks() -> None:
    m = SimMemory(1 << 20)
    m.write(0x0, b"\xff" * 0x3000)
    m.zero(0x800, 0x2000)  # second half of chunk 0, all of chunk 1, first half of chunk 2
    assert m.read(0x0, 0x800) == b"\xff" * 0x800
    assert m.read(0x800, 0x2000) == bytes(0x2000)
    assert m.read(0x2800, 0x800) == b"\xff" * 0x800
    assert m.resident_bytes() == 2 * 4096  # the whole chunk was dropped


# --------------------------------------------------------------------------- Allocator
@pytest.mark.parametrize("size", [0, -4096, 3, 0x1800])
def test_alloc_size_must_be_a_power_of_two(size: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        Allocator(0, 1 << 20).alloc(size)


def test_blocks_are_naturally_aligned() -> None:
    a = Allocator(0x3000, 1 << 24)
    for size in (0x1000, 0x10000, 0x100, 0x200000, 0x4000):
        addr = a.alloc(size)
        assert addr % size == 0
        assert addr >= 0x3000
        assert a.in_use[addr] == size


def test_alignment_gap_is_reused_not_leaked() -> None:
    a = Allocator(0x3000, 1 << 20)
    big = a.alloc(0x10000)
    assert big == 0x10000
    # The gap 0x3000..0x10000 went back as 4K@0x3000, 16K@0x4000, 32K@0x8000.
    assert a.alloc(0x4000) == 0x4000
    assert a.alloc(0x8000) == 0x8000
    assert a.alloc(0x1000) == 0x3000
    # The gap is exhausted: the next block comes from the bump pointer.
    assert a.alloc(0x1000) == 0x20000


def test_free_lists_are_lifo() -> None:
    a = Allocator(0, 1 << 20)
    x, y, z = (a.alloc(0x1000) for _ in range(3))
    a.free(x)
    a.free(z)
    assert a.alloc(0x1000) == z
    assert a.alloc(0x1000) == x
    assert a.alloc(0x1000) not in (x, y, z)


def test_larger_free_block_is_split() -> None:
    a = Allocator(0, 1 << 20)
    big = a.alloc(0x10000)
    a.free(big)
    first = a.alloc(0x1000)
    assert first == big  # the low part of the split block
    # The halves went to their size classes: 4K, 8K, 16K, 32K above it.
    assert a.alloc(0x1000) == big + 0x1000
    assert a.alloc(0x2000) == big + 0x2000
    assert a.alloc(0x4000) == big + 0x4000
    assert a.alloc(0x8000) == big + 0x8000
    assert a.bytes_in_use() == 0x10000


def test_split_prefers_the_smallest_larger_block() -> None:
    a = Allocator(0, 1 << 24)
    b64 = a.alloc(0x10000)
    b1m = a.alloc(0x100000)
    a.free(b1m)
    a.free(b64)
    assert a.alloc(0x1000) == b64


def test_double_free_is_an_error() -> None:
    a = Allocator(0, 1 << 20)
    x = a.alloc(0x1000)
    a.free(x)
    with pytest.raises(ValueError, match="double free"):
        a.free(x)


def test_free_of_a_foreign_block_is_an_error() -> None:
    a = Allocator(0, 1 << 20)
    a.alloc(0x2000)
    with pytest.raises(ValueError, match="double free or foreign"):
        a.free(0x1000)


def test_free_with_the_wrong_size_is_an_error() -> None:
    a = Allocator(0, 1 << 20)
    x = a.alloc(0x2000)
    with pytest.raises(ValueError, match="allocated"):
        a.free(x, 0x1000)


def test_out_of_memory() -> None:
    a = Allocator(0x1000, 0x4000)
    got = [a.alloc(0x1000) for _ in range(3)]
    assert got == [0x1000, 0x2000, 0x3000]
    with pytest.raises(OutOfMemory):
        a.alloc(0x1000)
    with pytest.raises(OutOfMemory):
        Allocator(0, 0x8000).alloc(0x10000)
    # After a free, the block is available again.
    a.free(0x2000)
    assert a.alloc(0x1000) == 0x2000


def test_out_of_memory_leaves_state_unchanged() -> None:
    a = Allocator(0, 0x10000)
    a.alloc(0x1000)
    with pytest.raises(OutOfMemory):
        a.alloc(0x10000)
    assert a.bytes_in_use() == 0x1000
    assert a.alloc(0x1000) == 0x1000


def test_bytes_in_use_tracks_alloc_and_free() -> None:
    a = Allocator(0, 1 << 20)
    x = a.alloc(0x1000)
    y = a.alloc(0x4000)
    assert a.bytes_in_use() == 0x5000
    a.free(x, 0x1000)
    assert a.bytes_in_use() == 0x4000
    a.free(y)
    assert a.bytes_in_use() == 0

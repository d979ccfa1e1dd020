"""Simulated physical memory: sparse 4 KiB chunks of bytes holding big-endian 8-byte entries.

Page tables live *inside* this memory as real table pages (as on hardware), so a walk is a
sequence of 8-byte loads that can fail or be counted.  Data frames hold bytes only where
something stored them (data mode, see :mod:`.data`): a never-written chunk reads as zero and
takes no room, so translation-only runs cost nothing here.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

_CHUNK_SHIFT = 12
_CHUNK = 1 << _CHUNK_SHIFT
_U64 = struct.Struct(">Q")


class MemoryFault(Exception):
    """An access to an address that no memory (or memslot) backs."""

    def __init__(self, addr: int) -> None:
        super().__init__(f"no memory at {addr:#x}")
        self.addr = addr


class OutOfMemory(Exception):
    """The allocator has no room left for a request."""


class SimMemory:
    """Byte-addressed sparse memory.  ``valid(addr)`` decides which addresses exist."""

    __slots__ = ("_chunks", "_valid", "size")

    def __init__(self, size: int, valid: Callable[[int], bool] | None = None) -> None:
        self.size = size
        self._chunks: dict[int, bytearray] = {}
        self._valid = valid

    def _check(self, addr: int, length: int) -> None:
        if addr < 0 or addr + length > self.size:
            raise MemoryFault(addr)
        if self._valid is not None and not (self._valid(addr) and self._valid(addr + length - 1)):
            raise MemoryFault(addr)

    def read_u64(self, addr: int) -> int:
        """Load one big-endian doubleword (an 8-byte aligned table entry)."""
        if addr & 7:
            raise ValueError(f"unaligned doubleword access at {addr:#x}")
        self._check(addr, 8)
        chunk = self._chunks.get(addr >> _CHUNK_SHIFT)
        if chunk is None:
            return 0
        return int(_U64.unpack_from(chunk, addr & (_CHUNK - 1))[0])

    def write_u64(self, addr: int, value: int) -> None:
        if addr & 7:
            raise ValueError(f"unaligned doubleword access at {addr:#x}")
        self._check(addr, 8)
        idx = addr >> _CHUNK_SHIFT
        chunk = self._chunks.get(idx)
        if chunk is None:
            if value == 0:
                return
            chunk = self._chunks[idx] = bytearray(_CHUNK)
        _U64.pack_into(chunk, addr & (_CHUNK - 1), value)

    def read(self, addr: int, length: int) -> bytes:
        self._check(addr, max(length, 1))
        out = bytearray()
        while length > 0:
            off = addr & (_CHUNK - 1)
            n = min(length, _CHUNK - off)
            chunk = self._chunks.get(addr >> _CHUNK_SHIFT)
            out += chunk[off : off + n] if chunk is not None else bytes(n)
            addr += n
            length -= n
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        self._check(addr, max(len(data), 1))
        pos = 0
        while pos < len(data):
            off = addr & (_CHUNK - 1)
            n = min(len(data) - pos, _CHUNK - off)
            idx = addr >> _CHUNK_SHIFT
            chunk = self._chunks.get(idx)
            if chunk is None:
                chunk = self._chunks[idx] = bytearray(_CHUNK)
            chunk[off : off + n] = data[pos : pos + n]
            addr += n
            pos += n

    def zero(self, addr: int, length: int) -> None:
        """Clear a range (a freed table page); drops whole chunks to keep memory sparse."""
        end = addr + length
        while addr < end:
            idx = addr >> _CHUNK_SHIFT
            off = addr & (_CHUNK - 1)
            n = min(end - addr, _CHUNK - off)
            chunk = self._chunks.get(idx)
            if chunk is not None:
                if n == _CHUNK:
                    del self._chunks[idx]
                else:
                    chunk[off : off + n] = bytes(n)
            addr += n

    def copy(self, dst: int, src: int, length: int) -> None:
        """Copy a range chunk by chunk (a page migration's copy); absent chunks stay sparse.

        Both ranges must start on a chunk boundary and length be a multiple of the chunk."""
        if (dst | src | length) & (_CHUNK - 1):
            raise ValueError(f"copy of {length:#x} bytes {src:#x} -> {dst:#x} is not chunk aligned")
        self._check(src, max(length, 1))
        self._check(dst, max(length, 1))
        for off in range(0, length, _CHUNK):
            chunk = self._chunks.get((src + off) >> _CHUNK_SHIFT)
            if chunk is None:
                self._chunks.pop((dst + off) >> _CHUNK_SHIFT, None)
            else:
                self._chunks[(dst + off) >> _CHUNK_SHIFT] = bytearray(chunk)

    def snapshot(self, addr: int, length: int) -> dict[int, bytes]:
        """The written chunks of a chunk-aligned range, keyed by offset (a page swapped out)."""
        return {off: bytes(c) for off in range(0, length, _CHUNK) if (c := self._chunks.get((addr + off) >> _CHUNK_SHIFT)) is not None}

    def restore(self, addr: int, snap: dict[int, bytes]) -> None:
        """Put a snapshot back at addr (the page swapped in, maybe into another frame)."""
        for off, data in snap.items():
            self._chunks[(addr + off) >> _CHUNK_SHIFT] = bytearray(data)

    def resident_bytes(self) -> int:
        return len(self._chunks) * _CHUNK


class Allocator:
    """Size-class allocator of naturally aligned blocks in [base, limit).

    Deterministic: LIFO free lists per size and a bump pointer; a larger free block is split
    when a size class is empty.  Used for table pages and data frames alike.
    """

    __slots__ = ("_bump", "_free", "base", "in_use", "limit")

    def __init__(self, base: int, limit: int) -> None:
        self.base = base
        self.limit = limit
        self._bump = base
        self._free: dict[int, list[int]] = {}
        self.in_use: dict[int, int] = {}  # addr -> size

    def alloc(self, size: int) -> int:
        if size <= 0 or size & (size - 1):
            raise ValueError(f"allocation size {size} is not a power of two")
        lst = self._free.get(size)
        if lst:
            addr = lst.pop()
        else:
            split = self._split_larger(size)
            if split is not None:
                addr = split
            else:
                addr = (self._bump + size - 1) & ~(size - 1)
                if addr + size > self.limit:
                    raise OutOfMemory(f"no room for {size:#x} bytes below {self.limit:#x}")
                # Hand the alignment gap back as smaller blocks so nothing leaks.
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

    def _split_larger(self, size: int) -> int | None:
        bigger = sorted(s for s, lst in self._free.items() if s > size and lst)
        if not bigger:
            return None
        big = bigger[0]
        addr = self._free[big].pop()
        half = big >> 1
        while half >= size:
            self._free.setdefault(half, []).append(addr + half)
            half >>= 1
        return addr

    def free(self, addr: int, size: int | None = None) -> None:
        actual = self.in_use.pop(addr, None)
        if actual is None:
            raise ValueError(f"double free or foreign block at {addr:#x}")
        if size is not None and size != actual:
            raise ValueError(f"free of {addr:#x} with size {size:#x}, allocated {actual:#x}")
        self._free.setdefault(actual, []).append(addr)

    def bytes_in_use(self) -> int:
        return sum(self.in_use.values())

"""Simulated physical memory: sparse 4 KiB chunks of bytes holding big-endian 8-byte entries.

Page tables live *inside* this memory as real table pages (as on hardware), so a walk is a
sequence of 8-byte loads that can fail or be counted.  Data frames hold bytes only where
something stored them (data mode, see :mod:`.data`): a never-written chunk reads as zero and
takes no room, so translation-only runs cost nothing here.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping

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
    """Byte-addressed sparse memory.  ``valid(addr)`` decides which addresses exist.

    ``valid_span(lo, hi)``, when given, says that every address in [lo, hi) is valid (it may
    say False for a span that is valid piecewise, e.g. across two adjacent memslots: that only
    costs the fast path).  A doubleword is 8-aligned and so never crosses a 4 KiB chunk, and
    memslots do not change under a running memory, so a chunk found wholly valid once stays
    valid: ``read_u64`` then skips the per-read check, as a real MMU trusts a table page its
    hypervisor placed in a memslot.  Reads elsewhere check every time, so a read that faulted
    before still faults."""

    __slots__ = ("_chunks", "_ok_chunks", "_valid", "_valid_span", "size")

    def __init__(self, size: int, valid: Callable[[int], bool] | None = None, valid_span: Callable[[int, int], bool] | None = None) -> None:
        self.size = size
        self._chunks: dict[int, bytearray] = {}
        self._valid = valid
        self._valid_span = valid_span
        # Chunk indices known wholly valid (inside the size and, with ``valid``, one span).
        self._ok_chunks: set[int] = set()

    def _check(self, addr: int, length: int) -> None:
        if addr < 0 or addr + length > self.size:
            raise MemoryFault(addr)
        if self._valid is not None and not (self._valid(addr) and self._valid(addr + length - 1)):
            raise MemoryFault(addr)

    def _chunk_ok(self, idx: int) -> bool:
        """Is every address of chunk ``idx`` valid?  (Decides whether reads may skip checks.)"""
        lo = idx << _CHUNK_SHIFT
        hi = lo + _CHUNK
        if lo < 0 or hi > self.size:
            return False
        if self._valid is None:
            return True
        return self._valid_span is not None and self._valid_span(lo, hi)

    def read_u64(self, addr: int) -> int:
        """Load one big-endian doubleword (an 8-byte aligned table entry)."""
        if addr & 7:
            raise ValueError(f"unaligned doubleword access at {addr:#x}")
        idx = addr >> _CHUNK_SHIFT
        if self._valid is None:  # bounds only: as cheap as the cache, and takes no room
            if addr < 0 or addr + 8 > self.size:
                raise MemoryFault(addr)
        elif idx not in self._ok_chunks:
            self._check(addr, 8)
            if self._chunk_ok(idx):
                self._ok_chunks.add(idx)
        chunk = self._chunks.get(idx)
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


_REGION_SHIFT = 15  # blocks per bitmap region: 32768 bits = one 4 KiB bytearray


class BlockMap(Mapping[int, int]):
    """The allocator's in-use blocks (address -> size), as one sparse bitmap per size class.

    A dict of ``addr: size`` costs ~100 bytes per block (two int objects and a slot); a table
    page or data frame here costs one bit of a 4 KiB region that covers 32768 blocks of its
    size.  Blocks are naturally aligned and never overlap, so an address starts at most one
    in-use block: a lookup tries each size class present.  Iteration is in address order (no
    caller depends on the order; a dict gave allocation order)."""

    __slots__ = ("_bytes", "_classes", "_len")

    def __init__(self) -> None:
        self._classes: dict[int, dict[int, bytearray]] = {}  # size shift -> region -> bits
        self._len = 0
        self._bytes = 0

    def add(self, addr: int, size: int) -> None:
        shift = size.bit_length() - 1
        block = addr >> shift
        regions = self._classes.get(shift)
        if regions is None:
            regions = self._classes[shift] = {}
        bits = regions.get(block >> _REGION_SHIFT)
        if bits is None:
            bits = regions[block >> _REGION_SHIFT] = bytearray(1 << (_REGION_SHIFT - 3))
        i = block & ((1 << _REGION_SHIFT) - 1)
        if bits[i >> 3] & (1 << (i & 7)):
            raise ValueError(f"block at {addr:#x} is already in use")
        bits[i >> 3] |= 1 << (i & 7)
        self._len += 1
        self._bytes += size

    def _find(self, addr: int) -> tuple[int, bytearray, int] | None:
        for shift, regions in self._classes.items():
            if addr & ((1 << shift) - 1):
                continue
            block = addr >> shift
            bits = regions.get(block >> _REGION_SHIFT)
            if bits is None:
                continue
            i = block & ((1 << _REGION_SHIFT) - 1)
            if bits[i >> 3] & (1 << (i & 7)):
                return shift, bits, i
        return None

    def pop(self, addr: int) -> int | None:
        """Remove the block starting at addr; its size, or None if none starts there."""
        found = self._find(addr)
        if found is None:
            return None
        shift, bits, i = found
        bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF
        if bits.count(0) == len(bits):  # region empty: drop it (memory stays sparse)
            del self._classes[shift][(addr >> shift) >> _REGION_SHIFT]
        self._len -= 1
        self._bytes -= 1 << shift
        return 1 << shift

    def __getitem__(self, addr: int) -> int:
        found = self._find(addr)
        if found is None:
            raise KeyError(addr)
        return 1 << found[0]

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, int) and self._find(addr) is not None

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        addrs: list[int] = []
        for shift, regions in self._classes.items():
            for region, bits in regions.items():
                for byte_i, byte in enumerate(bits):
                    if byte:
                        addrs += [((region << _REGION_SHIFT) + byte_i * 8 + b) << shift for b in range(8) if byte >> b & 1]
        return iter(sorted(addrs))

    def total_bytes(self) -> int:
        return self._bytes


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
        self.in_use = BlockMap()  # addr -> size

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
        self.in_use.add(addr, size)
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
        actual = self.in_use.pop(addr)
        if actual is None:
            raise ValueError(f"double free or foreign block at {addr:#x}")
        if size is not None and size != actual:
            raise ValueError(f"free of {addr:#x} with size {size:#x}, allocated {actual:#x}")
        self._free.setdefault(actual, []).append(addr)

    def bytes_in_use(self) -> int:
        return self.in_use.total_bytes()

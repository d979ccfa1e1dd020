"""Compact per-page bookkeeping: the model's own maps, kept beside the tables in raw arrays.

A dict of int -> int costs ~100 bytes per entry (a slot plus two int objects); a model of a
guest with millions of 64K pages spends most of its memory there, not in its page tables.
These structures keep the same observable behaviour (values, iteration order) in ``array``
storage: 8-16 bytes per entry.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Mapping, MutableMapping

_BLOCK_SHIFT = 7  # pages per value block: 128 doublewords = one 1 KiB array
_BLOCK = 1 << _BLOCK_SHIFT
_U64_MAX = (1 << 64) - 1


class PageMap(MutableMapping[int, int]):
    """page number -> u64 value, with a dict's insertion order.

    Values live in sparse blocks of 128 doublewords (value + 1; 0 = absent); the order is an
    append-only log of pages, one entry per insertion of a key that was absent.  A pop leaves
    its log entry stale; an entry is live iff its page is present and it is that page's last
    entry in the log (a dict moves a re-inserted key to the end, the log appends it again).
    Stale entries are squeezed out when iterating or when they outnumber the live ones.
    """

    __slots__ = ("_blocks", "_len", "_log")

    def __init__(self, items: Mapping[int, int] | Iterable[tuple[int, int]] = ()) -> None:
        self._blocks: dict[int, array[int]] = {}
        self._log: array[int] = array("Q")
        self._len = 0
        pairs = items.items() if isinstance(items, Mapping) else items
        for k, v in pairs:
            self[k] = v

    def _get(self, page: int) -> int:
        """Stored value + 1, 0 when absent."""
        if page < 0:
            return 0
        blk = self._blocks.get(page >> _BLOCK_SHIFT)
        return 0 if blk is None else blk[page & (_BLOCK - 1)]

    def __getitem__(self, page: int) -> int:
        v = self._get(page)
        if not v:
            raise KeyError(page)
        return v - 1

    def __contains__(self, page: object) -> bool:
        return isinstance(page, int) and self._get(page) != 0

    def __setitem__(self, page: int, value: int) -> None:
        if page < 0 or not 0 <= value < _U64_MAX:
            raise ValueError(f"PageMap holds pages >= 0 and values below 2**64-1, not {page:#x} -> {value:#x}")
        blk = self._blocks.get(page >> _BLOCK_SHIFT)
        if blk is None:
            blk = self._blocks[page >> _BLOCK_SHIFT] = array("Q", bytes(8 * _BLOCK))
        i = page & (_BLOCK - 1)
        if not blk[i]:
            self._log.append(page)
            self._len += 1
        blk[i] = value + 1

    def __delitem__(self, page: int) -> None:
        v = self._get(page)
        if not v:
            raise KeyError(page)
        blk = self._blocks[page >> _BLOCK_SHIFT]
        blk[page & (_BLOCK - 1)] = 0
        self._len -= 1
        if not self._len:
            self._blocks.clear()
            self._log = array("Q")
        elif len(self._log) > 2 * self._len + 1024:
            self._squeeze()

    def _squeeze(self) -> None:
        """Drop stale log entries, keeping each present page's last entry in order."""
        if len(self._log) == self._len:
            return
        seen: set[int] = set()
        keep: list[int] = []
        for page in reversed(self._log):
            if page not in seen and self._get(page):
                seen.add(page)
                keep.append(page)
        keep.reverse()
        self._log = array("Q", keep)

    def __iter__(self) -> Iterator[int]:
        self._squeeze()
        return iter(self._log.tolist())

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"PageMap({dict(self.items())!r})"


class RmapList(array):  # type: ignore[type-arg]
    """One gfn's nested rmap entries (the kernel's llist of ``struct rmap_nested`` values),
    oldest first, as packed u64s: 8 bytes an entry instead of a list slot and an int object.

    Compares equal to a list of the same entries, as the list it replaces did."""

    __slots__ = ()

    def __new__(cls, entries: Iterable[int] = ()) -> RmapList:
        return super().__new__(cls, "Q", entries)  # type: ignore[return-value]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, list):
            return self.tolist() == other
        return bool(super().__eq__(other))

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None

    def __repr__(self) -> str:
        return f"RmapList({self.tolist()!r})"


__all__ = ["PageMap", "RmapList"]

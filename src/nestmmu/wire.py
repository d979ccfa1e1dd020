"""Core values <-> protobuf wire encodings shared by the services (one place for each mapping)."""

from __future__ import annotations

from nestmmu.core import formats as f
from nestmmu.protos import l0_pb2

# FillFlag bit <-> shadow PTE bit, for AccessResults.flags.
_FILL_BITS = (
    (l0_pb2.FILL_FLAG_READ, f.PTE_EAA_READ),
    (l0_pb2.FILL_FLAG_WRITE, f.PTE_EAA_RW),
    (l0_pb2.FILL_FLAG_EXECUTE, f.PTE_EAA_EXEC),
    (l0_pb2.FILL_FLAG_REFERENCED, f.PTE_R),
    (l0_pb2.FILL_FLAG_CHANGED, f.PTE_C),
)


def fill_flags(pte: int, shift: int) -> int:
    """AccessResults.flags: page shift in the low byte, shadow PTE permissions and R/C above."""
    fl = shift & l0_pb2.FILL_FLAG_PAGE_SHIFT_MASK
    for flag, bit in _FILL_BITS:
        if pte & bit:
            fl |= flag
    return fl


def pte_from_flags(host: int, flags: int) -> int:
    """Rebuild the shadow PTE of a fill from AccessResults.flags (inverse of fill_flags)."""
    pte = f.PTE_V | f.PTE_L | (host & f.PTE_RPN_MASK)
    for flag, bit in _FILL_BITS:
        if flags & flag:
            pte |= bit
    return pte

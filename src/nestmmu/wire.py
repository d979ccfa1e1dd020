"""Core values <-> protobuf wire encodings shared by the services (one place for each mapping)."""

from __future__ import annotations

from nestmmu.core import formats as f
from nestmmu.core.effects import ExitAction, Outcome, Scope
from nestmmu.core.formats import Access
from nestmmu.protos import common_pb2, l0_pb2

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


# Enum mappings, each written once with its inverse derived from it.
SCOPE_TO_PB = {
    Scope.ADDRESS: common_pb2.INVALIDATION_SCOPE_ADDRESS,
    Scope.LPID: common_pb2.INVALIDATION_SCOPE_LPID,
    Scope.ALL: common_pb2.INVALIDATION_SCOPE_ALL,
    Scope.PID: common_pb2.INVALIDATION_SCOPE_PID,
}
SCOPE_FROM_PB = {v: k for k, v in SCOPE_TO_PB.items()}
OUTCOME_TO_PB = {
    Outcome.FILL: l0_pb2.ACCESS_OUTCOME_FILL,
    Outcome.STORAGE_INTERRUPT: l0_pb2.ACCESS_OUTCOME_STORAGE_INTERRUPT,
    Outcome.MMIO_EMULATED: l0_pb2.ACCESS_OUTCOME_MMIO_EMULATED,
    Outcome.L1_EMULATED: l0_pb2.ACCESS_OUTCOME_L1_EMULATED,
    Outcome.ERROR: l0_pb2.ACCESS_OUTCOME_ERROR,
    Outcome.GUEST_FAULT: l0_pb2.ACCESS_OUTCOME_GUEST_FAULT,
}
OUTCOME_FROM_PB = {v: k for k, v in OUTCOME_TO_PB.items()}
EXIT_TO_PB = {
    ExitAction.REENTER: l0_pb2.EXIT_ACTION_REENTER,
    ExitAction.INJECT_STORAGE_INTERRUPT: l0_pb2.EXIT_ACTION_INJECT_STORAGE_INTERRUPT,
    ExitAction.L1_EMULATED: l0_pb2.EXIT_ACTION_EMULATED_MMIO,
    ExitAction.FAILED: l0_pb2.EXIT_ACTION_FAILED,
}
EXIT_FROM_PB = {v: k for k, v in EXIT_TO_PB.items()}
ACCESS_TO_PB = {Access.LOAD: common_pb2.ACCESS_KIND_LOAD, Access.STORE: common_pb2.ACCESS_KIND_STORE, Access.IFETCH: common_pb2.ACCESS_KIND_IFETCH}

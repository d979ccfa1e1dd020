"""The data that crosses the pure core's boundary.

Theory of operation (sans-IO, after h11): an L0 operation that needs something only another
privilege level has (L1's memory, a walk of L1's tree, L1 handling a reflected exit) or a lock
the caller owns is a *generator*.  It yields an **effect** object and is resumed with the
effect's answer.  The in-process driver (:mod:`nestmmu.core.sim`) answers effects by calling
the L1 core directly; the L0 gRPC service answers them with RPCs on the L1's session stream and
asyncio locks.  The algorithm is the same code in both.

Every removal or downgrade of a translation appends an :class:`Invalidation` (an LPID-tagged
tlbie) to ``L0Hypervisor.outbox``.  A driver must drain the outbox right after each resume of a
generator (or call of a plain method), before it awaits anything, and deliver those
invalidations to the TLBs (waiting for tlbsync) before it reports the operation complete.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar

from .formats import Access

if TYPE_CHECKING:
    from .l0 import KvmNestedGuest, L1Vm


class Scope(Enum):
    """What a tlbie covers (hardware IS field, as delivered to TLBs)."""

    ADDRESS = "address"
    PID = "pid"  # process scoped (PRS=1, IS=1): every EA translation of one PID of one LPID
    LPID = "lpid"
    ALL = "all"


@dataclass(frozen=True, slots=True)
class Invalidation:
    """An LPID-tagged invalidation that TLBs must apply (tlbie ... ; tlbsync).

    ``prs`` False (partition scoped): ADDRESS drops the real-mode entries of
    [address, address+size) *and* every EA entry whose real page overlaps it (the hardware
    combined the two dimensions into one entry, so a partition-scoped tlbie must reach it).
    ``prs`` True (process scoped, what an L2 OS issues for its own trees): ADDRESS drops the EA
    entries of ``pid`` covering [address, address+size); Scope.PID drops every EA entry of
    ``pid``.  LPID / ALL drop everything of the LPID / everything.
    """

    lpid: int
    scope: Scope
    address: int = 0
    size: int = 0
    reason: str = ""
    prs: bool = False
    pid: int = -1


# --- effects L0 yields ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WalkL1Tree:
    """Walk L1's partition-scoped tree for an L2 (root from L0's cached PATE dw0)."""

    l1: L1Vm
    l1_lpid: int
    pate_dw0: int
    n_gpa: int


@dataclass(frozen=True, slots=True)
class ReadL1Memory:
    """kvm_read_guest on the L1: answer bytes, or None when no memslot backs the range."""

    l1: L1Vm
    gpa: int
    length: int


@dataclass(frozen=True, slots=True)
class WriteL1Memory:
    """kvm_write_guest on the L1: answer True on success."""

    l1: L1Vm
    gpa: int
    data: bytes


@dataclass(frozen=True, slots=True)
class NestedExit:
    """An exit of L2 that L0 reflects to L1 (H_ENTER_NESTED returns with it)."""

    trap: int
    hdar: int
    hdsisr: int
    asdr: int
    access: Access
    #: GPR3 of L2 at the exit: the hcall number for a BOOK3S_INTERRUPT_SYSCALL exit (L1 reads
    #: it from the L2 registers H_ENTER_NESTED wrote back); 0 for other traps.
    gpr3: int = 0


class ExitAction(Enum):
    """What L1 decided after handling a reflected exit."""

    REENTER = "reenter"  # L1 fixed its tree (or nothing to do): H_ENTER_NESTED again
    INJECT_STORAGE_INTERRUPT = "inject"  # L1 gives L2 a DSI/ISI
    L1_EMULATED = "l1_emulated"  # L1 emulated the access (MMIO in L2's space)
    FAILED = "failed"  # L1 cannot handle it (unsupported MMU config, ...)


@dataclass(frozen=True, slots=True)
class ExitReply:
    action: ExitAction
    dsisr: int = 0
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ReflectExit:
    """Hand an exit to L1's handler; answer an :class:`ExitReply`."""

    l1: L1Vm
    l1_lpid: int
    vcpu_id: int
    exit: NestedExit


@dataclass(frozen=True, slots=True)
class AcquireTlbLock:
    """mutex_lock(&gp->tlb_lock): drivers serialise faults and invalidations per nested guest."""

    gp: KvmNestedGuest


@dataclass(frozen=True, slots=True)
class ReleaseTlbLock:
    gp: KvmNestedGuest


@dataclass(frozen=True, slots=True)
class Preempt:
    """A point where another CPU may run (race tests inject host events here)."""

    where: str


@dataclass(frozen=True, slots=True)
class WaitHostPage:
    """The host page backing an L1 chunk is being migrated or swapped out (its PTE is a
    migration entry): wait until the move completes (migration_entry_wait), then retry."""

    l1: L1Vm
    chunk: int


Effect = WalkL1Tree | ReadL1Memory | WriteL1Memory | ReflectExit | AcquireTlbLock | ReleaseTlbLock | Preempt | WaitHostPage

T = TypeVar("T")
Op = Generator[Effect, Any, T]


def run_sync(op: Op[T], answer: Callable[[Effect], Any]) -> T:
    """Drive a generator operation to completion, answering each effect synchronously."""
    try:
        eff = next(op)
        while True:
            eff = op.send(answer(eff))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


# --- access outcomes -------------------------------------------------------------------------
class Outcome(Enum):
    FILL = 1  # translation installed in the vCPU TLB
    STORAGE_INTERRUPT = 2  # L2 receives a DSI/ISI
    MMIO_EMULATED = 3  # L0 emulated MMIO on L2's behalf (H_ENTER_NESTED returned H_TOO_HARD)
    L1_EMULATED = 4  # L1 emulated the access
    ERROR = 5  # unsupported configuration or livelock: the access cannot complete
    # A process-scoped fault (invalid entry, protection, R/C missing in L2's own tree)
    # delivered to the L2 OS itself as a DSI/ISI: no hypervisor exit.  ``dsisr`` is what the
    # hardware puts in DSISR (NOHPTE / PROTFAULT / SET_RC | ISSTORE).
    GUEST_FAULT = 6


@dataclass(frozen=True, slots=True)
class Translation:
    """A TLB fill tagged with the shadow LPID.

    Real mode (``pid`` -1): L2 real page -> host real page.  EA translation (``pid`` >= 0):
    ``page`` is the effective page, ``real_page`` the L2 real page it maps to; ``shift`` is the
    smaller of the process-scoped and the shadow leaf; ``pte`` combines both leaves'
    permissions and R/C (the shadow PTE's RPN).
    """

    lpid: int
    page: int
    host: int
    shift: int
    pte: int  # the shadow PTE (permissions and R/C), combined with L2's leaf for EAs
    pid: int = -1
    real_page: int = -1


@dataclass(frozen=True, slots=True)
class AccessResult:
    outcome: Outcome
    translation: Translation | None = None
    dsisr: int = 0
    detail: str = ""
    refs: int = 0  # memory references the hardware walks for this access made

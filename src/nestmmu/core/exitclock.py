"""The logical clock of an L2 vCPU: when its HDEC expires and when its program makes an hcall.

Real time does not exist in the model (the core is deterministic), so both are counted in
accesses the vCPU runs (TLB hits included).  L1 programs the HDEC (``hdec_expiry`` in the
``hv_guest_state`` of every H_ENTER_NESTED): it expires every ``hdec_every`` accesses.  The L2
program issues H_PUT_TERM_CHAR every ``hcall_every`` accesses.  Each event is an exit to L1
(via L0's ``kvmppc_handle_nested_exit``), taken after the access that reaches it; an HDEC and
an hcall due after the same access come in that order (the timer interrupt is taken first).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from . import formats as f
from .effects import NestedExit
from .formats import Access
from .l0 import ConfigError


@dataclass
class ExitClock:
    hdec_every: int = 0  # 0: the HDEC never expires
    hcall_every: int = 0  # 0: the L2 makes no hcall
    now: int = 0  # accesses run so far

    def __post_init__(self) -> None:
        if self.hdec_every < 0 or self.hcall_every < 0:
            raise ConfigError(f"clock periods must be >= 0 (0 = off), not hdec {self.hdec_every}, hcall {self.hcall_every}")

    @property
    def active(self) -> bool:
        return bool(self.hdec_every or self.hcall_every)

    def until_next(self) -> int:
        """Accesses until the next event (at least 1); a large number when none is due."""
        nxt = [p - self.now % p for p in (self.hdec_every, self.hcall_every) if p]
        return min(nxt) if nxt else 1 << 62

    def advance(self, n: int) -> list[NestedExit]:
        """Run ``n`` more accesses; the exits due in them, in order."""
        before, self.now = self.now, self.now + n
        out: list[NestedExit] = []
        for t in self._due(before, self.now):
            if self.hdec_every and t % self.hdec_every == 0:
                out.append(NestedExit(f.BOOK3S_INTERRUPT_HV_DECREMENTER, 0, 0, 0, Access.LOAD))
            if self.hcall_every and t % self.hcall_every == 0:
                out.append(NestedExit(f.BOOK3S_INTERRUPT_SYSCALL, 0, 0, 0, Access.LOAD, gpr3=f.H_PUT_TERM_CHAR))
        return out

    def _due(self, before: int, now: int) -> list[int]:
        """The access counts in (before, now] at which some event falls, in order."""
        ts: set[int] = set()
        for p in (self.hdec_every, self.hcall_every):
            if p:
                ts.update(range((before // p + 1) * p, now + 1, p))
        return sorted(ts)


Batch = tuple[list[int], list[int]]


def clocked(batches: Iterable[Batch], clock: ExitClock) -> Iterator[Batch | NestedExit]:
    """``batches`` cut at the clock's events, each piece followed by the exits due after it.

    A driver runs each piece to completion before asking for the next item, so an exit comes
    after every access before it and before every access after it (deterministic)."""
    for addrs, kinds in batches:
        if not clock.active:
            yield addrs, kinds
            continue
        i = 0
        while i < len(addrs):
            n = min(clock.until_next(), len(addrs) - i)
            yield addrs[i : i + n], kinds[i : i + n]
            i += n
            yield from clock.advance(n)

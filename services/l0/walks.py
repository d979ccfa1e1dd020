"""Walks of L1's tree fetched ahead: a batch of nested faults costs one round trip to L1.

Step 3 of ``__kvmhv_nested_page_fault`` walks L1's partition-scoped tree for the guest.  The
kernel reads L1's memory directly; here L1's tree lives in the L1 process, so each walk is a
call on L1's Connect stream, and a batch of N faults used to cost N sequential round trips
(each, in the kernel's manner, holding the guest's ``tlb_lock``).

When the first fault of a batch needs a walk, L0 looks ahead in the batch: every later access
of it that also misses the shadow table (``hw_translate``, a pure read) will fault with a
known L2 real address, so L0 asks L1 for all those walks in the same message
(``WalkBatchCall``).  The walk the current fault needs is answered as before; the others wait
here until their fault comes and takes them (or another vCPU's fault at the same address does).

A walk is a pure function of L1's tree, and L1 changes its tree only in ways L0 hears about
before it could matter: a removal or downgrade is followed by an invalidation hcall (an L1
that skips it, ``--forget-flush``, is already wrong), and L1 changes things while handling a
reflected exit.  So every hcall from the L1 and every reflected exit or L1-memory write starts
a new *epoch* for that L1 and drops what was fetched before it; a fetch answered after a new
epoch began is not kept.  An addition without an hcall (L1 maps a page) can make a fetched
"not mapped" walk out of date: the fault is then reflected to L1, which finds the page mapped
and re-enters, as when a real walk races the map -- one exit more, never a wrong translation.
"""

from __future__ import annotations

import contextvars
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nestmmu.core import formats as f
from nestmmu.core.effects import WalkL1Tree
from nestmmu.core.formats import Access
from nestmmu.core.l0 import KvmNestedGuest, L0Hypervisor, L1Vm
from nestmmu.core.radix import WalkResult
from nestmmu.limits import MAX_WALK_BATCH
from nestmmu.protos import common_pb2, l0_pb2

from .state import L1Gone

if TYPE_CHECKING:
    from .server import L0Servicer

#: How far ahead in a batch L0 looks for faults to fetch walks for (each look at a new page is
#: one shadow walk of a few microseconds, on the event loop).
LOOK_AHEAD = 1024
#: Fetched walks kept per L1 at most (a batch whose faults were absorbed some other way can
#: leave walks nobody takes; they go with the next epoch, or all at once above this).
MAX_KEPT = 1 << 16


@dataclass(eq=False)
class BatchCursor:
    """A real-mode batch as the Run worker goes through it: ``next`` is the index of the
    access after the one running (set per access: one store, no allocation)."""

    core: L0Hypervisor
    gp: KvmNestedGuest
    addrs: Sequence[int]
    kinds: bytes | Sequence[int]
    next: int = 0

    def coming_faults(self) -> list[int]:
        return coming_faults(self.core, self.gp, self.addrs, self.kinds, self.next)


#: Set by the Run worker for a real-mode batch while it runs it (None otherwise).
ahead_var: contextvars.ContextVar[BatchCursor | None] = contextvars.ContextVar("walks_ahead", default=None)


def coming_faults(core: L0Hypervisor, gp: KvmNestedGuest, addrs: Sequence[int], kinds: bytes | Sequence[int], start: int) -> list[int]:
    """The L2 real addresses at which accesses ``start``.. of a real-mode batch will take a
    nested fault as the shadow table is now: the first access of each kind to each L0 base
    page among the next LOOK_AHEAD accesses, if it misses the shadow table."""
    out: list[int] = []
    seen: set[int] = set()
    shift = core.page_shift
    end = min(len(addrs), start + LOOK_AHEAD)
    for j in range(start, end):
        a = addrs[j]
        # One per L0 base page and access kind: the first fault in it inserts a shadow leaf
        # that covers the rest of it whenever L1's page is at least as large (else they walk
        # on their own), but a store or fetch may still fault on a leaf a load made.
        key = (a >> shift) * 4 + kinds[j]
        if key in seen:
            continue
        seen.add(key)
        _, dsisr, _ = core.hw_translate(gp, a, Access(kinds[j]))
        if dsisr:
            out.append(f.nested_fault_n_gpa(a, a, dsisr))
            if len(out) >= MAX_WALK_BATCH - 1:
                break
    return out


class WalkCache:
    """Fetched walks per L1, by (l1_lpid, PATE dw0, n_gpa), valid within one epoch."""

    def __init__(self) -> None:
        self._epoch: weakref.WeakKeyDictionary[L1Vm, int] = weakref.WeakKeyDictionary()
        self._walks: weakref.WeakKeyDictionary[L1Vm, dict[tuple[int, int, int], WalkResult]] = weakref.WeakKeyDictionary()

    def epoch(self, vm: L1Vm) -> int:
        return self._epoch.get(vm, 0)

    def new_epoch(self, vm: L1Vm) -> None:
        """L1 may have changed its tree: forget what was fetched from it."""
        self._epoch[vm] = self._epoch.get(vm, 0) + 1
        self._walks.pop(vm, None)

    def take(self, vm: L1Vm, l1_lpid: int, pate_dw0: int, n_gpa: int) -> WalkResult | None:
        """The walk fetched for n_gpa in this epoch, if any.  It stays: within an epoch L1's
        tree is what it was, so every vCPU of the guest that faults there may use it (vCPUs
        replaying the same pages would otherwise each fetch the rest of their batch again)."""
        d = self._walks.get(vm)
        return d.get((l1_lpid, pate_dw0, n_gpa)) if d else None

    def keep(self, vm: L1Vm, l1_lpid: int, pate_dw0: int, walks: dict[int, WalkResult], epoch: int) -> int:
        """Keep walks fetched in ``epoch`` (none if a new epoch began meanwhile); how many."""
        if self.epoch(vm) != epoch or not walks:
            return 0
        d = self._walks.setdefault(vm, {})
        if len(d) + len(walks) > MAX_KEPT:
            d.clear()
        for n_gpa, w in walks.items():
            d[(l1_lpid, pate_dw0, n_gpa)] = w
        return len(walks)

    def kept(self, vm: L1Vm) -> int:
        return len(self._walks.get(vm, ()))


def walk_from_proto(w: common_pb2.WalkResult) -> WalkResult:
    if w.ok:
        return WalkResult(0, w.leaf_pte, w.l1_gpa, w.page_shift, 0, w.leaf_address, w.memory_references)
    return WalkResult(w.dsisr_code or f.DSISR_NOHPTE, fault_gpa=w.fault_gpa, refs=w.memory_references)


async def answer_walk(svc: L0Servicer, eff: WalkL1Tree) -> WalkResult:
    """Step 3's walk for one fault: a walk fetched ahead in this epoch, else a call to L1 --
    carrying the walks of the batch's coming faults too when the Run worker says what they
    are (and walk batching is on)."""
    vm, lpid, pate = eff.l1, eff.l1_lpid, eff.pate_dw0
    cache = svc.walks
    got = cache.take(vm, lpid, pate, eff.n_gpa)
    if got is not None:
        svc.stats["walks_fetched_ahead_used"] += 1
        return got
    ahead = ahead_var.get() if svc.walk_batching else None
    more = [g for g in ahead.coming_faults() if g != eff.n_gpa and cache.take(vm, lpid, pate, g) is None] if ahead is not None else []
    if not more:
        r = await svc.call_l1(vm, l0_pb2.L0Call(walk=l0_pb2.WalkCall(pate_dw0=pate, l1_lpid=lpid, n_gpa=eff.n_gpa)))
        return walk_from_proto(r.walk)
    more = more[: MAX_WALK_BATCH - 1]
    epoch = cache.epoch(vm)
    r = await svc.call_l1(vm, l0_pb2.L0Call(walk_batch=l0_pb2.WalkBatchCall(pate_dw0=pate, l1_lpid=lpid, n_gpas=[eff.n_gpa, *more])))
    walks = [walk_from_proto(w) for w in r.walk_batch.walks]
    if len(walks) != 1 + len(more):
        raise L1Gone(f"L1 {vm.name!r} answered a batch of {1 + len(more)} walks with {len(walks)}")
    svc.stats["walks_fetched_ahead"] += cache.keep(vm, lpid, pate, dict(zip(more, walks[1:], strict=True)), epoch)
    return walks[0]


__all__ = ["LOOK_AHEAD", "BatchCursor", "WalkCache", "ahead_var", "answer_walk", "coming_faults", "walk_from_proto"]

"""Bounded L2-tree changes in the L1 service: slices, yields and range reservations.

A MapPages/UnmapPages/ProtectPages/RemapPages call names at most ``MAX_TREE_OP_PAGES`` pages
(refused above that).  It runs the core op in slices of ``TREE_OP_SLICE_PAGES`` pages: each
slice changes its pages under the core lock, then -- without the lock -- issues that slice's
invalidation hcalls to L0 in order (tree write, then hcall, as Linux-as-L1 does page by page),
then yields to the event loop.  So health checks, GetStats, walks and faults L0 reflects to
this L1 are answered within a slice (a few milliseconds of core work), however large the op.

What concurrent callers see:

* Tree ops on *overlapping* page ranges of one guest never interleave: an op reserves its page
  range for its whole run (slices and hcalls) and a later overlapping op waits for it.  So an
  Unmap of a range a Map is half-way through runs after the Map, never between its slices.
* Ops on disjoint ranges, other guests, faults (``handle_exit``), walks and inspection RPCs run
  between slices.  They may see a range op half done: the slices done are changed and their
  invalidations issued (or in flight), the rest untouched.  Every page is either unchanged or
  changed-then-invalidated, as with Linux's own mmu_lock dropping in long unmaps.
* DestroyGuest does not wait: a guest destroyed between slices ends the op (its tree is gone).
* The op runs to the end even if its caller goes away (deadline, cancel): a tree change whose
  invalidation is never issued would leave stale shadow entries in L0.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from nestmmu.core.l1 import Hcall, L1Hypervisor
from nestmmu.limits import TREE_OP_SLICE_PAGES

from .session import issue_in_order

Chunks = Iterator[tuple[int, list[Hcall]]]
#: Builds the chunked core op: (core, pages per chunk) -> chunks; validates at once.
MakeChunks = Callable[[L1Hypervisor, int], Chunks]
#: (begin, end) of a tree change for the audit (L0Session.tree_change_marks): begin in the same
#: locked section as the tree write, end once that slice's invalidation hcalls returned.
TreeChangeMarks = tuple[Callable[[list[Hcall]], None], Callable[[list[Hcall]], None]]


class GuestGone(Exception):
    """The guest was destroyed before the op started."""


class RangeReservations:
    """Page ranges of each guest held by in-flight tree ops; overlapping ops run one at a time."""

    def __init__(self) -> None:
        self._held: dict[int, list[tuple[int, int, asyncio.Event]]] = {}

    def busy(self) -> int:
        return sum(len(v) for v in self._held.values())

    @contextlib.asynccontextmanager
    async def hold(self, lpid: int, first: int, last: int) -> AsyncIterator[None]:
        while True:
            clash = next((ev for a, b, ev in self._held.get(lpid, ()) if a <= last and first <= b), None)
            if clash is None:
                break
            await clash.wait()
        entry = (first, last, asyncio.Event())
        self._held.setdefault(lpid, []).append(entry)
        try:
            yield
        finally:
            held = self._held[lpid]
            held.remove(entry)
            if not held:
                del self._held[lpid]
            entry[2].set()


async def run_tree_op(
    core: L1Hypervisor,
    lock: asyncio.Lock,
    reservations: RangeReservations,
    hcall: Callable[[Hcall], Awaitable[int]],
    lpid: int,
    first_page: int,
    last_page: int,
    make: MakeChunks,
    marks: TreeChangeMarks | None = None,
    slice_pages: int = TREE_OP_SLICE_PAGES,
) -> tuple[int, int]:
    """Run one tree op in slices; returns (first non-zero hcall rc or 0, pages changed).

    Raises GuestGone, the core's ConfigError (bad request) or the hcall's L0Unavailable."""
    async with reservations.hold(lpid, first_page, last_page):
        async with lock:
            if lpid not in core.guests:
                raise GuestGone(lpid)
            chunks = make(core, slice_pages)  # validates now: nothing changed on error
        first_rc = 0
        total = 0
        while True:
            async with lock:  # the core change only; never held across an hcall or a yield
                step = next(chunks, None)
                if step is not None and marks is not None:
                    marks[0](step[1])  # the audit: leaves of this guest may be stale until end
            if step is None:
                break
            n, hcalls = step
            total += n
            try:
                rc = await issue_in_order(hcalls, hcall)
                first_rc = first_rc or rc
            finally:
                if marks is not None:
                    marks[1](hcalls)
            await asyncio.sleep(0)  # health, stats, walks and faults run between slices
        return first_rc, total


class TreeOps:
    """The L1 service's in-flight tree ops: their range reservations and tasks."""

    def __init__(self) -> None:
        self.reservations = RangeReservations()
        self.tasks: set[asyncio.Task[tuple[int, int]]] = set()

    async def run(
        self,
        core: L1Hypervisor,
        lock: asyncio.Lock,
        hcall: Callable[[Hcall], Awaitable[int]],
        lpid: int,
        first_page: int,
        last_page: int,
        make: MakeChunks,
        marks: TreeChangeMarks | None = None,
    ) -> tuple[int, int]:
        """run_tree_op in a task of its own that finishes even if the caller is cancelled."""
        task = asyncio.create_task(run_tree_op(core, lock, self.reservations, hcall, lpid, first_page, last_page, make, marks))
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return await asyncio.shield(task)

    def _done(self, task: asyncio.Task[tuple[int, int]]) -> None:
        self.tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller that went away has no one to tell


__all__ = ["GuestGone", "MakeChunks", "RangeReservations", "TreeOps", "run_tree_op"]

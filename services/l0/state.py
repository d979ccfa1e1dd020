"""What L0's service keeps per L1 session and per vCPU run stream (no RPC logic here)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from nestmmu.core.effects import AccessResult, Invalidation, Outcome
from nestmmu.core.l0 import KvmNestedGuest, L1Vm
from nestmmu.core.vcpu import TlbEntry
from nestmmu.protos import l0_pb2
from nestmmu.wire import OUTCOME_TO_PB, SCOPE_TO_PB, fill_flags


class L1Gone(Exception):
    """The L1 a call was for has left; the operation cannot complete."""


@dataclass(eq=False)
class L1Session:
    token: str
    name: str
    vm: L1Vm
    out: asyncio.Queue[l0_pb2.L0Call | None] = field(default_factory=asyncio.Queue)
    pending: dict[int, asyncio.Future[l0_pb2.L1Reply]] = field(default_factory=dict)
    next_call: int = 1
    released: bool = False
    streams: set[RunStream] = field(default_factory=set)
    tokens: set[str] = field(default_factory=set)


@dataclass(eq=False)
class RunStream:
    """One vCPU's run stream: an ordered outgoing queue, buffered results, pending acks."""

    session: L1Session
    gp: KvmNestedGuest
    vcpu_id: int
    out: asyncio.Queue[l0_pb2.RunResponse | str | None] = field(default_factory=asyncio.Queue)
    alive: bool = True
    ref_held: bool = True
    batch_id: int = 0
    first_index: int = 0
    res: l0_pb2.AccessResults | None = None
    acks: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    dumps: dict[int, asyncio.Future[list[TlbEntry]]] = field(default_factory=dict)

    @property
    def lpid(self) -> int:
        return self.gp.shadow_lpid

    def add_result(self, index: int, r: AccessResult) -> None:
        if self.res is None:
            self.res = l0_pb2.AccessResults(batch_id=self.batch_id, first_index=index)
        res = self.res
        res.outcomes.append(OUTCOME_TO_PB[r.outcome])
        t = r.translation
        if t is not None:
            res.page_addresses.append(t.page)
            res.host_addresses.append(t.host)
            res.flags.append(fill_flags(t.pte, t.shift))
            if t.pid >= 0:
                # EA fills only: the lists stay empty for real-mode results (a reader takes a
                # missing entry as -1), so real-mode batches cost no more to build and send.
                pad = len(res.outcomes) - 1 - len(res.pids)
                if pad:
                    res.pids.extend([-1] * pad)
                    res.real_page_addresses.extend([0] * pad)
                res.pids.append(t.pid)
                res.real_page_addresses.append(max(t.real_page, 0))
        else:
            res.page_addresses.append(0)
            res.host_addresses.append(0)
            res.flags.append(0)
        res.dsisrs.append(r.dsisr)
        if r.outcome is Outcome.ERROR:
            res.error_reasons[index] = r.detail or "the access failed in L0 (no detail)"

    def flush_results(self, done: bool = False, next_index: int = 0) -> None:
        if self.res is None and not done:
            return
        res = self.res or l0_pb2.AccessResults(batch_id=self.batch_id, first_index=next_index)
        res.batch_done = done
        self.res = None
        self.out.put_nowait(l0_pb2.RunResponse(results=res))

    def send_invalidations(self, items: list[tuple[int, Invalidation]]) -> list[asyncio.Future[None]]:
        """Queue tlbies behind every result computed so far; futures resolve on ack."""
        self.flush_results()
        loop = asyncio.get_running_loop()
        msg = l0_pb2.InvalidationBroadcast()
        futs = []
        for inv_id, inv in items:
            msg.invalidations.add(
                id=inv_id,
                lpid=inv.lpid,
                scope=SCOPE_TO_PB[inv.scope],
                address=inv.address,
                size_bytes=inv.size,
                reason=inv.reason,
                prs=inv.prs,
                pid=inv.pid if inv.prs else -1,
            )
            fut = self.acks[inv_id] = loop.create_future()
            futs.append(fut)
        self.out.put_nowait(l0_pb2.RunResponse(invalidate=msg))
        return futs

    def ack(self, ids: list[int]) -> None:
        for i in ids:
            fut = self.acks.pop(i, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    def close(self, reason: str | None = None) -> None:
        """The stream is gone (or being cut): its TLB is gone, so pending acks count as done."""
        if not self.alive:
            return
        self.alive = False
        for fut in self.acks.values():
            if not fut.done():
                fut.set_result(None)
        self.acks.clear()
        for d in self.dumps.values():
            if not d.done():
                d.set_result([])
        self.out.put_nowait(reason if reason else None)

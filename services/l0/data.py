"""Data mode in L0's service: data batches, host page moves in two phases, L1 memory copies.

* **Data batches** (``AccessBatch.data``): a run of TLB hits, each with the host address the
  vCPU translated, ended by at most one miss.  The hits are performed in order in one step
  (no await), so a tlbie the vCPU acknowledged after sending the batch is processed after
  them: as a tlbsync waits for accesses in flight.  The miss is resolved as any access and
  performed, in the same step as its result, at the host address of the translation found.
* **Host page moves** (HostMigrate, HostUnmap): phase one unmaps and sends the tlbies; the copy
  (or swap-out) runs only once every vCPU acknowledged them.  Meanwhile the page carries a
  migration entry: a nested fault on it waits here (``WaitHostPage``) until the move is done.
* **CopyL1Memory**: an L1 copying its own pages (remap / swap of a data guest) through L0.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import grpc

from nestmmu.core.effects import AccessResult, Outcome
from nestmmu.core.formats import Access
from nestmmu.core.l0 import L0Hypervisor, L1Vm
from nestmmu.protos import l0_pb2

from .state import L1Gone, RunStream

if TYPE_CHECKING:
    from .server import L0Servicer

#: How long a nested fault waits for a host page move before it retries anyway (seconds).
MOVE_WAIT = 5.0


class HostMoves:
    """Host pages between the two phases of a move, and the faults waiting on them."""

    def __init__(self, core: L0Hypervisor) -> None:
        self.core = core
        self.events: dict[tuple[str, int], asyncio.Event] = {}

    def start(self, vm: L1Vm, gpa: int, migrate: bool) -> tuple[int, int, int, int]:
        """Phase one (synchronous: the caller drains the outbox right after)."""
        got = self.core.host_invalidate_start(vm, gpa, migrate)
        chunk = got[3]
        if chunk in vm.moving:
            self.events.setdefault((vm.name, chunk), asyncio.Event())
        return got

    def finish(self, vm: L1Vm, chunk: int) -> None:
        """Phase two, after the tlbsync: copy or swap out, free the old frame, wake faults."""
        if not vm.released:
            self.core.host_invalidate_finish(vm, chunk)
        ev = self.events.pop((vm.name, chunk), None)
        if ev is not None:
            ev.set()

    async def move(self, srv: L0Servicer, context: grpc.aio.ServicerContext, vm: L1Vm, gpa: int, migrate: bool) -> tuple[tuple[int, int, int, int], int]:
        """HostMigrate / HostUnmap: phase one, the tlbsync, phase two.  Shielded: a client
        that gives up does not leave the page with a migration entry (the wait for acks is
        bounded by the ack timeout)."""
        started: list[tuple[int, int, int, int]] = []

        def phase_one() -> tuple[int, int, int, int]:
            got = self.start(vm, gpa, migrate)
            started.append(got)
            return got

        async def whole() -> tuple[tuple[int, int, int, int], int]:
            try:
                got: tuple[tuple[int, int, int, int], int] = await srv._host_op(context, phase_one, "gpa")
                return got
            finally:
                # Only the call that put the migration entry there completes the move.
                if started and started[0][1]:
                    self.finish(vm, started[0][3])

        return await asyncio.shield(asyncio.ensure_future(whole()))

    async def wait(self, vm: L1Vm, chunk: int) -> None:
        ev = self.events.get((vm.name, chunk))
        if ev is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), MOVE_WAIT)


def check_data_batch(b: l0_pb2.AccessBatch) -> str | None:
    n = len(b.addresses)
    if len(b.values) != n:
        return f"invalid:batch.values:has {len(b.values)} values for {n} addresses (data mode: one per access)"
    if len(b.host_addresses) != n:
        return f"invalid:batch.host_addresses:has {len(b.host_addresses)} entries for {n} addresses (data mode: one per access)"
    if any(h == 0 for h in b.host_addresses[:-1]):
        return "invalid:batch.host_addresses:only the last access of a data batch may be a miss (host address 0)"
    return None


async def run_data_batch(srv: L0Servicer, st: RunStream, b: l0_pb2.AccessBatch) -> int:
    """Perform one data batch; returns the number of accesses run."""

    core = srv.core
    gp = st.gp
    n = len(b.addresses)
    loaded = [0] * n
    done = bytearray(n)
    # The hits: memory operations at the vCPU's host addresses, in order, in one step.
    for i in range(n):
        host = b.host_addresses[i]
        if not host:
            break
        loaded[i] = core.data_access(host, b.kinds[i], b.values[i])
        done[i] = 1
    last = n - 1
    if n and not b.host_addresses[last] and st.alive:
        addr, kind, value = b.addresses[last], b.kinds[last], b.values[last]

        def on_result(r: AccessResult) -> None:
            st.add_result(last, r)
            t = r.translation
            if r.outcome is Outcome.FILL and t is not None:
                # Same step as the translation: nothing can move the page in between.
                loaded[last] = core.data_access(t.host + (addr - t.page), kind, value)
                done[last] = 1

        if gp.freed:
            st.add_result(last, AccessResult(Outcome.ERROR, detail="nested guest released"))
        else:
            try:
                await srv.drive(core.run_access(gp, st.vcpu_id, addr, Access(kind)), on_result)
            except (L1Gone, TimeoutError) as e:
                st.add_result(last, AccessResult(Outcome.ERROR, detail=str(e)))
                srv.stats["access_errors_l1_unavailable"] += 1
    if st.alive:
        res = st.res or l0_pb2.AccessResults(batch_id=st.batch_id, first_index=n)
        res.data_loaded.extend(loaded)
        res.data_done = bytes(done)
        st.res = res
        st.flush_results(done=True, next_index=n)
    srv.stats["data_batches"] += 1
    return n

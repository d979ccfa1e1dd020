"""L0's vCPU run streams: the Run RPC, its reader and its worker.

One Run stream per vCPU (see server.py's theory of operation): the reader takes batches,
acks (tlbsync) and TLB dumps off the stream as they arrive, so an ack is never queued behind
a batch; the worker runs each batch's accesses through the core, yielding within a batch
(``RUN_WORKER_SLICE_S``) so that shadow hits never hold the event loop; results, tlbies and
dump requests leave through the stream's one ordered queue.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import structlog

from nestmmu.core import formats as f
from nestmmu.core.effects import AccessResult, Invalidation, NestedExit, Outcome
from nestmmu.core.formats import Access, H
from nestmmu.core.vcpu import TlbEntry, allowed_mask
from nestmmu.limits import MAX_BATCH, RUN_WORKER_SLICE_S
from nestmmu.protos import common_pb2, l0_pb2
from nestmmu.wire import SCOPE_FROM_PB

from ..common import abort_invalid, new_request_id, request_id_var
from . import data as data_mode
from . import walks
from .state import L1Gone, RunStream

if TYPE_CHECKING:
    from .server import L0Servicer

log = structlog.get_logger("l0")

#: What a Run stream's worker takes, in the vCPU's program order (None: the stream ended).
Work = l0_pb2.AccessBatch | l0_pb2.NestedExitRequest | l0_pb2.ProcessTlbie | l0_pb2.L2RptInvalidate | None


async def serve_run(
    svc: L0Servicer, request_iterator: AsyncIterator[l0_pb2.RunRequest], context: grpc.aio.ServicerContext
) -> AsyncIterator[l0_pb2.RunResponse]:
    """Run: bind the stream to the vCPU of its run token, then move batches up and results,
    tlbies and TLB-dump requests down, in one ordered queue (RunStream.out)."""
    it = request_iterator.__aiter__()
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        return
    if not first.HasField("attach"):
        await abort_invalid(context, "attach", "the first message of Run must be RunAttach")
    got = svc.run_tokens.pop(first.attach.run_token, None)
    if got is None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "unknown or already used run token (get one from L1's AttachVcpu / H_ENTER_NESTED)")
        return
    s, gp, vcpu_id = got
    s.tokens.discard(first.attach.run_token)
    st = RunStream(s, gp, vcpu_id)
    s.streams.add(st)
    svc.streams.setdefault(gp.shadow_lpid, set()).add(st)
    svc.stats["run_streams_opened"] += 1
    structlog.contextvars.bind_contextvars(l1=s.name, shadow_lpid=gp.shadow_lpid, vcpu=vcpu_id)
    log.info("vcpu_attached", l1_lpid=gp.l1_lpid)
    batches: asyncio.Queue[Work] = asyncio.Queue()
    reader = asyncio.create_task(read_run(st, it, batches))
    worker = asyncio.create_task(run_worker(svc, st, batches))
    try:
        yield l0_pb2.RunResponse(attached=l0_pb2.RunAttached(shadow_lpid=gp.shadow_lpid, l1_lpid=gp.l1_lpid, page_shift=svc.core.page_shift))
        while True:
            msg = await st.out.get()
            if msg is None:
                break
            if isinstance(msg, str):
                if msg.startswith("invalid:"):
                    _, fld, desc = msg.split(":", 2)
                    yield l0_pb2.RunResponse(ended=l0_pb2.RunEnded(reason=f"INVALID_ARGUMENT: {fld}: {desc}"))
                    await abort_invalid(context, fld, desc)
                yield l0_pb2.RunResponse(ended=l0_pb2.RunEnded(reason=msg))
                await context.abort(grpc.StatusCode.ABORTED, msg)
            yield msg
    finally:
        reader.cancel()
        worker.cancel()
        drop_stream(svc, st, None)
        # unbind, not reset(token): a cancelled stream's generator may be finalised in
        # another Context, where resetting this Context's tokens raises ValueError.
        structlog.contextvars.unbind_contextvars("l1", "shadow_lpid", "vcpu")


#: The non-fault exits a vCPU may report (core/exitclock.py).
NESTED_EXIT_TRAPS = (f.BOOK3S_INTERRUPT_HV_DECREMENTER, f.BOOK3S_INTERRUPT_SYSCALL)


async def read_run(st: RunStream, it: AsyncIterator[l0_pb2.RunRequest], batches: asyncio.Queue[Work]) -> None:
    try:
        async for req in it:
            kind = req.WhichOneof("message")
            if kind == "batch":
                batches.put_nowait(req.batch)
            elif kind == "nested_exit":  # in order with the batches: the worker takes it
                batches.put_nowait(req.nested_exit)
            elif kind == "process_tlbie":  # in program order with the batches (worker)
                batches.put_nowait(req.process_tlbie)
            elif kind == "l2_rpt_invalidate":
                batches.put_nowait(req.l2_rpt_invalidate)
            elif kind == "ack":
                st.ack(list(req.ack.invalidation_ids))
            elif kind == "tlb_dump":
                fut = st.dumps.pop(req.tlb_dump.id, None)
                if fut is not None and not fut.done():
                    fut.set_result([tlb_entry_of(e) for e in req.tlb_dump.entries])
    except (grpc.aio.AioRpcError, asyncio.CancelledError):
        pass
    finally:
        batches.put_nowait(None)


async def run_l2_rpt_invalidate(svc: L0Servicer, st: RunStream, m: l0_pb2.L2RptInvalidate) -> None:
    """The L2's H_RPT_INVALIDATE exits to L0, which handles a process-scoped one itself
    (kvmppc_nested_h_rpt_invalidate): tlbies of (shadow LPID, PID) to every vCPU of the LPID,
    then the hcall returns to L2.  A NESTED-type one would be reflected to L1, which this
    path does not model (H_FUNCTION; the L2 kernel never issues one)."""
    rc = svc.core.kvmppc_nested_h_rpt_invalidate(st.gp, m.pid, m.type, m.page_sizes, m.start, m.end)
    waiters = svc.broadcast(svc.core.take_invalidations())
    if waiters:
        await svc.wait_acks(waiters)
    if rc is None:
        svc.stats["l2_hcalls_not_modelled"] += 1
        rc = H.FUNCTION
    if st.alive:
        st.flush_results()
        st.out.put_nowait(l0_pb2.RunResponse(l2_hcall_done=l0_pb2.L2HcallDone(id=m.id, hcall_rc=rc)))


def tlb_entry_of(e: l0_pb2.TlbDumpEntry) -> TlbEntry:
    """A dumped TLB entry; one without a PID (or PID -1) is a real-mode entry."""
    pid = e.pid if e.HasField("pid") and e.pid >= 0 else -1
    return TlbEntry(e.lpid, e.page_address, e.host_address, e.page_shift, e.pte, allowed_mask(e.pte), pid, e.real_page_address if pid >= 0 else -1)


def check_batch(b: l0_pb2.AccessBatch) -> str | None:
    n = len(b.addresses)
    if len(b.kinds) != n:
        return f"invalid:batch.kinds:has {len(b.kinds)} bytes for {n} addresses"
    if n > MAX_BATCH:
        return f"invalid:batch.addresses:{n} accesses; at most {MAX_BATCH} (MAX_BATCH) per batch"
    if any(k not in (1, 2, 3) for k in b.kinds):
        return "invalid:batch.kinds:each kind must be 1 (load), 2 (store) or 3 (ifetch)"
    if b.virtual_mode and b.data:
        return "invalid:batch.virtual_mode:data batches run in real mode (they are the L2 kernel's stores)"
    # Effective addresses (virtual mode) are any 64-bit value: the walk itself judges them.
    if n and not b.virtual_mode and max(b.addresses) >= 1 << 52:
        return "invalid:batch.addresses:L2 real addresses must be below 2^52"
    return None


async def run_nested_exit(svc: L0Servicer, st: RunStream, e: l0_pb2.NestedExitRequest) -> bool:
    """kvmppc_handle_nested_exit for an HDEC or L2-hcall exit the vCPU reported; False if the
    request is invalid (the stream is then closed)."""
    if e.trap not in NESTED_EXIT_TRAPS:
        st.close(f"invalid:nested_exit.trap:must be {f.BOOK3S_INTERRUPT_HV_DECREMENTER:#x} (HDEC) or {f.BOOK3S_INTERRUPT_SYSCALL:#x} (hcall), not {e.trap:#x}")
        return False
    if st.gp.freed:
        return True
    ex = NestedExit(e.trap, 0, 0, 0, Access.LOAD, gpr3=e.gpr3)
    try:
        await svc.drive(svc.core.kvmppc_handle_nested_exit(st.gp, st.vcpu_id, ex))
    except (L1Gone, TimeoutError):
        svc.stats["nested_exits_l1_unavailable"] += 1
    svc.stats["nested_exits"] += 1
    return True


_TLBIE_SCOPES = (common_pb2.INVALIDATION_SCOPE_ADDRESS, common_pb2.INVALIDATION_SCOPE_PID)


def check_process_tlbie(m: l0_pb2.ProcessTlbie) -> str | None:
    for i, inv in enumerate(m.invalidations):
        if not inv.prs:
            return f"invalid:process_tlbie.invalidations[{i}].prs:an L2 guest issues only process-scoped tlbies (PRS=1); partition scope is its hypervisor's"
        if inv.scope not in _TLBIE_SCOPES:
            return f"invalid:process_tlbie.invalidations[{i}].scope:must be ADDRESS or PID"
        if inv.pid < 0:
            return f"invalid:process_tlbie.invalidations[{i}].pid:must be a PID (>= 0)"
    return None


async def run_process_tlbie(svc: L0Servicer, st: RunStream, m: l0_pb2.ProcessTlbie) -> None:
    """An L2 OS's tlbie PRS=1 ...; tlbsync: the hardware tags it with the issuing vCPU's
    LPIDR (the shadow LPID) and broadcasts it to every vCPU running that LPID; no hypervisor
    is involved and no shadow PTE changes (shadow tables are partition scoped).  Done once
    every live vCPU of the LPID acknowledged it, the issuer included."""
    invs = [
        Invalidation(st.lpid, SCOPE_FROM_PB[inv.scope], inv.address, inv.size_bytes, inv.reason or "l2_tlbie", prs=True, pid=inv.pid) for inv in m.invalidations
    ]
    waiters = svc.broadcast(invs)
    if waiters:
        await svc.wait_acks(waiters)
    svc.stats["process_tlbies"] += len(invs)
    if st.alive:
        st.flush_results()
        st.out.put_nowait(l0_pb2.RunResponse(process_tlbie_done=l0_pb2.ProcessTlbieDone(id=m.id, vcpus=len({w[0] for w in waiters}))))


async def run_worker(svc: L0Servicer, st: RunStream, batches: asyncio.Queue[Work]) -> None:
    core = svc.core
    try:
        while True:
            b = await batches.get()
            if b is None or not st.alive:
                break
            if isinstance(b, l0_pb2.NestedExitRequest):
                if not await run_nested_exit(svc, st, b):
                    break
                continue
            if isinstance(b, l0_pb2.ProcessTlbie):
                err = check_process_tlbie(b)
                if err:
                    st.close(err)
                    break
                await run_process_tlbie(svc, st, b)
                continue
            if isinstance(b, l0_pb2.L2RptInvalidate):
                await run_l2_rpt_invalidate(svc, st, b)
                continue
            err = check_batch(b)
            if err:
                st.close(err)
                break
            rid = b.request_id or new_request_id()
            request_id_var.set(rid)
            structlog.contextvars.bind_contextvars(request_id=rid)
            st.batch_id = b.batch_id
            if b.data:
                err = data_mode.check_data_batch(b)
                if err:
                    st.close(err)
                    break
                svc.stats["accesses"] += await data_mode.run_data_batch(svc, st, b)
                svc.stats["batches"] += 1
                structlog.contextvars.unbind_contextvars("request_id")
                continue
            gp = st.gp
            vcpu_id = st.vcpu_id
            pid = b.pid if b.virtual_mode else -1  # PIDR in virtual mode; real mode: -1
            if pid >= 0:
                svc.stats["virtual_batches"] += 1
            n = 0
            slice_end = time.perf_counter() + RUN_WORKER_SLICE_S
            # Real mode: a fault that needs a walk of L1's tree fetches the walks of the
            # batch's coming faults with it (walks.py); the 2-D walk fetches its own.
            cursor = walks.BatchCursor(core, gp, b.addresses, b.kinds) if pid < 0 and svc.walk_batching else None
            walks.ahead_var.set(cursor)
            for i, (addr, kind) in enumerate(zip(b.addresses, b.kinds, strict=True)):
                if time.perf_counter() > slice_end:
                    # Shadow hits never suspend: give acks, other vCPUs and RPCs a turn.
                    await asyncio.sleep(0)
                    slice_end = time.perf_counter() + RUN_WORKER_SLICE_S
                if not st.alive:
                    break
                if gp.freed:
                    st.add_result(i, AccessResult(Outcome.ERROR, detail="nested guest released"))
                    continue
                if cursor is not None:
                    cursor.next = i + 1
                try:
                    await svc.drive(core.run_access(gp, vcpu_id, addr, Access(kind), pid), functools.partial(st.add_result, i))
                except (L1Gone, TimeoutError) as e:
                    st.add_result(i, AccessResult(Outcome.ERROR, detail=str(e)))
                    svc.stats["access_errors_l1_unavailable"] += 1
                n += 1
            walks.ahead_var.set(None)
            if st.alive:
                st.flush_results(done=True, next_index=len(b.addresses))
            svc.stats["batches"] += 1
            svc.stats["accesses"] += n
            structlog.contextvars.unbind_contextvars("request_id")
    except asyncio.CancelledError:
        pass
    except Exception:  # pragma: no cover - a bug: cut this vCPU, keep the server
        log.exception("run_worker_failed")
        st.close("internal error in L0 while running accesses")
    else:
        # The vCPU half-closed (or the stream was cut): end the stream now, so a departed
        # vCPU counts as flushed at once instead of holding broadcasts until the timeout.
        st.close(None)


def drop_stream(svc: L0Servicer, st: RunStream, reason: str | None) -> None:
    """The stream ended or is cut: it counts as flushed, and its reference on the guest goes."""
    st.close(reason)
    st.session.streams.discard(st)
    ss = svc.streams.get(st.lpid)
    if ss is not None:
        ss.discard(st)
        if not ss:
            del svc.streams[st.lpid]
    if st.ref_held:
        st.ref_held = False
        if not st.gp.freed:
            svc.core.kvmhv_put_nested(st.gp)
            svc.broadcast(svc.core.take_invalidations())
        svc.stats["run_streams_closed"] += 1
        log.info("vcpu_detached", shadow_lpid=st.lpid, vcpu=st.vcpu_id)

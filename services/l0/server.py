"""L0Service: the host hypervisor as a grpc.aio server over :class:`nestmmu.core.l0.L0Hypervisor`.

Theory of operation
-------------------
* **L1 sessions.** An L1 opens ``Connect`` (a bidi stream) and registers; L0 answers with a
  secret session token.  Everything L0 keeps for that L1 (core ``L1Vm``, nested guests, run
  tokens, run streams) hangs off that session; hcall RPCs name their L1 only through the token
  in metadata, so no request field can reach another L1's state.  When the stream ends (the L1
  left or died) L0 closes the L1's run streams and releases everything
  (``kvmhv_release_all_nested``, then the L1 VM itself).
* **Effects.** Core operations are generators (see ``nestmmu.core.effects``).  :meth:`drive`
  answers their effects: walks, memory and exits go to the L1 as calls on its session stream;
  ``tlb_lock`` is one asyncio.Lock per nested guest, held across the L1 walk exactly as the
  kernel holds ``gp->tlb_lock`` (so an invalidation hcall from the L1 waits for an in-flight
  fault and then removes what it inserted).  The L1 answers walks from its stream reader, never
  behind its own pending hcall, so no cycle of waits exists.
* **Ordering.** Right after every resume of a core generator (before any await) the outbox of
  invalidations is drained and queued on the run streams of their LPID, and an access result
  is queued on its stream as soon as the core returns it.  Each run stream has one ordered
  outgoing queue and results are flushed before any tlbie is queued behind them, so a fill
  never reaches a TLB after the tlbie that removed it.
* **tlbsync.** An operation returns only after every live vCPU of the LPID acknowledged its
  invalidations.  A vCPU whose stream ends counts as flushed; one that does not acknowledge
  within ``BROADCAST_ACK_TIMEOUT`` seconds is disconnected, not waited for.

Beside this module: ``run`` (the vCPU Run streams), ``inspect`` (GetStats, DumpShadowTree and
the audit), ``data`` (data mode: data batches, two-phase host page moves, L1 memory copies) and
``state`` (what is kept per L1 session and per run stream).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any

import grpc
import structlog

from nestmmu.core import formats as f
from nestmmu.core.effects import (
    AcquireTlbLock,
    Effect,
    ExitAction,
    ExitReply,
    Invalidation,
    Preempt,
    ReadL1Memory,
    ReflectExit,
    ReleaseTlbLock,
    Scope,
    WaitHostPage,
    WalkL1Tree,
    WriteL1Memory,
)
from nestmmu.core.l0 import ConfigError, HvGuestState, KvmNestedGuest, L0Config, L0Hypervisor, L1Vm, Memslot
from nestmmu.core.radix import WalkResult
from nestmmu.limits import MAX_MEMSLOTS
from nestmmu.protos import L0_SERVICE_NAME, SESSION_METADATA_KEY, common_pb2, l0_pb2, l0_pb2_grpc
from nestmmu.wire import ACCESS_TO_PB, EXIT_FROM_PB

from ..common import BROADCAST_ACK_TIMEOUT, L1_CALL_TIMEOUT, abort_invalid, bad_request, request_id_var, serve_forever, start_metrics
from . import data as data_mode
from . import inspect as inspection
from . import run as run_rpc
from . import walks
from .state import L1Gone, L1Session, RunStream

log = structlog.get_logger("l0")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
RUN_TOKEN_TTL = 60.0


class L0Servicer(l0_pb2_grpc.L0ServiceServicer):
    """Adapter: protobuf in, core call, protobuf out."""

    def __init__(self, core: L0Hypervisor, ack_timeout: float = BROADCAST_ACK_TIMEOUT, l1_timeout: float = L1_CALL_TIMEOUT, walk_batching: bool = True) -> None:
        self.core = core
        self.ack_timeout = ack_timeout
        self.l1_timeout = l1_timeout
        self.sessions: dict[str, L1Session] = {}  # token -> session
        self.by_name: dict[str, L1Session] = {}
        self.run_tokens: dict[str, tuple[L1Session, KvmNestedGuest, int]] = {}
        self.streams: dict[int, set[RunStream]] = {}  # shadow LPID -> live run streams
        self.locks: weakref.WeakKeyDictionary[KvmNestedGuest, asyncio.Lock] = weakref.WeakKeyDictionary()
        self.next_inv = 1
        self.stats: Counter[str] = Counter()
        self.latencies_us: list[float] = []
        self.moves = data_mode.HostMoves(core)
        #: Walks of L1 trees fetched ahead for a batch's coming faults (walks.py).
        self.walks = walks.WalkCache()
        self.walk_batching = walk_batching

    # ================================================================ effects
    def _lock(self, gp: KvmNestedGuest) -> asyncio.Lock:
        lock = self.locks.get(gp)
        if lock is None:
            lock = self.locks[gp] = asyncio.Lock()
        return lock

    async def drive(self, op: Generator[Effect, Any, Any], on_result: Callable[[Any], None] | None = None) -> Any:
        """Run a core operation: answer its effects, broadcast its tlbies, wait for tlbsync."""
        held: list[asyncio.Lock] = []
        waiters: list[tuple[RunStream, asyncio.Future[None], float]] = []
        try:
            eff = op.send(None)
            while True:
                waiters += self.broadcast(self.core.take_invalidations())
                ans = await self.answer(eff, held)
                eff = op.send(ans)
        except StopIteration as stop:
            result = stop.value
            waiters += self.broadcast(self.core.take_invalidations())
            if on_result is not None:
                on_result(result)  # queued before any later tlbie can be
        finally:
            for lock in held:
                lock.release()
            waiters += self.broadcast(self.core.take_invalidations())
        if waiters:
            await self.wait_acks(waiters)
        return result

    async def answer(self, eff: Effect, held: list[asyncio.Lock]) -> Any:
        """Answer one effect.  An L1 that cannot answer (gone, timed out) gets the
        architectural outcome of unreadable L1 memory, never an exception through the core:
        a failed read is kvm_read_guest failing, a failed walk is PRTABLE_FAULT, a failed
        exit is FAILED.  So no core operation is ever left half done."""
        if isinstance(eff, (WalkL1Tree, ReadL1Memory, WriteL1Memory, ReflectExit)):
            try:
                return await self._answer_l1(eff)
            except (L1Gone, TimeoutError) as e:
                self.stats["l1_call_failures"] += 1
                log.warning("l1_call_failed", effect=type(eff).__name__, error=str(e))
                if isinstance(eff, WalkL1Tree):
                    return WalkResult(f.DSISR_PRTABLE_FAULT, fault_gpa=f.pate_root(eff.pate_dw0))
                if isinstance(eff, ReadL1Memory):
                    return None
                if isinstance(eff, WriteL1Memory):
                    return False
                return ExitReply(ExitAction.FAILED, detail=f"L1 unavailable: {e}")
        if isinstance(eff, AcquireTlbLock):
            lock = self._lock(eff.gp)
            await lock.acquire()
            held.append(lock)
            return None
        if isinstance(eff, ReleaseTlbLock):
            lock = self._lock(eff.gp)
            lock.release()
            held.remove(lock)
            return None
        if isinstance(eff, Preempt):
            return None
        if isinstance(eff, WaitHostPage):
            await self.moves.wait(eff.l1, eff.chunk)
            return None
        raise TypeError(f"unknown effect {eff!r}")

    async def _answer_l1(self, eff: WalkL1Tree | ReadL1Memory | WriteL1Memory | ReflectExit) -> Any:
        if isinstance(eff, WalkL1Tree):
            return await walks.answer_walk(self, eff)
        if isinstance(eff, ReadL1Memory):
            r = await self.call_l1(eff.l1, l0_pb2.L0Call(read_memory=l0_pb2.ReadMemoryCall(gpa=eff.gpa, length=eff.length)))
            return r.read_memory.data if r.read_memory.ok else None
        if isinstance(eff, WriteL1Memory):
            r = await self.call_l1(eff.l1, l0_pb2.L0Call(write_memory=l0_pb2.WriteMemoryCall(gpa=eff.gpa, data=eff.data)))
            self.walks.new_epoch(eff.l1)  # L1 memory changed: walks fetched before may be stale
            return r.write_memory.ok
        ex = eff.exit
        self.stats["exits_reflected"] += 1
        # request_id (bound by the run worker from the L2 batch) travels on in the L0Call.
        log.debug("exit_reflected", l1=eff.l1.name, l1_lpid=eff.l1_lpid, vcpu=eff.vcpu_id, trap=hex(ex.trap), hdsisr=hex(ex.hdsisr), n_gpa=hex(ex.asdr))
        call = l0_pb2.HandleExitCall(
            l1_lpid=eff.l1_lpid,
            vcpu_id=eff.vcpu_id,
            trap=ex.trap,
            hdar=ex.hdar,
            hdsisr=ex.hdsisr,
            asdr=ex.asdr,
            access=ACCESS_TO_PB[ex.access],
            gpr3=ex.gpr3,
        )
        r = await self.call_l1(eff.l1, l0_pb2.L0Call(handle_exit=call))
        self.walks.new_epoch(eff.l1)  # L1 may have changed its tree handling the exit
        h = r.handle_exit
        return ExitReply(EXIT_FROM_PB.get(h.action, ExitAction.FAILED), h.dsisr, h.detail)

    async def call_l1(self, vm: L1Vm, call: l0_pb2.L0Call) -> l0_pb2.L1Reply:
        s = self.by_name.get(vm.name)
        if s is None or s.released or s.vm is not vm:
            raise L1Gone(f"L1 {vm.name!r} is gone")
        call.call_id = s.next_call
        call.request_id = request_id_var.get()
        self.stats[f"l1_calls.{call.WhichOneof('call')}"] += 1
        s.next_call += 1
        fut: asyncio.Future[l0_pb2.L1Reply] = asyncio.get_running_loop().create_future()
        s.pending[call.call_id] = fut
        s.out.put_nowait(call)
        try:
            reply = await asyncio.wait_for(fut, self.l1_timeout)
        finally:
            s.pending.pop(call.call_id, None)
        if reply.error:
            raise L1Gone(f"L1 {vm.name!r} failed the call: {reply.error}")
        return reply

    # ================================================================ broadcasts
    def broadcast(self, invs: list[Invalidation]) -> list[tuple[RunStream, asyncio.Future[None], float]]:
        if not invs:
            return []
        now = time.perf_counter()
        per_stream: dict[RunStream, list[tuple[int, Invalidation]]] = {}
        for inv in invs:
            self.stats[f"invalidations.{inv.reason or inv.scope.value}"] += 1
            inv_id = self.next_inv
            self.next_inv += 1
            targets = [s for ss in self.streams.values() for s in ss] if inv.scope is Scope.ALL else self.streams.get(inv.lpid, ())
            for st in targets:
                if st.alive:
                    per_stream.setdefault(st, []).append((inv_id, inv))
        waiters = []
        for st, items in per_stream.items():
            for fut in st.send_invalidations(items):
                waiters.append((st, fut, now))
        self.stats["broadcast_messages"] += len(per_stream)
        return waiters

    async def wait_acks(self, waiters: list[tuple[RunStream, asyncio.Future[None], float]]) -> None:
        futs = {w[1] for w in waiters}
        t0 = min(w[2] for w in waiters)
        done, pending = await asyncio.wait(futs, timeout=self.ack_timeout)
        for st, fut, _ in waiters:
            if fut in pending and st.alive:
                self.stats["vcpus_disconnected_no_ack"] += 1
                log.warning("vcpu_disconnected", reason="no tlbsync ack", timeout_s=self.ack_timeout, shadow_lpid=st.lpid, vcpu=st.vcpu_id)
                st.close(f"no acknowledgement of an invalidation within {self.ack_timeout}s")
        self.stats["broadcast_acks"] += len(done)
        self.latencies_us.append((time.perf_counter() - t0) * 1e6)
        # The longest tlbsync wait since L0 started (chaos checks it against the ack timeout).
        self.stats["broadcast_latency_us_max"] = max(self.stats["broadcast_latency_us_max"], int(self.latencies_us[-1]))
        if len(self.latencies_us) > 100_000:
            del self.latencies_us[: len(self.latencies_us) // 2]

    # ================================================================ sessions
    def session_of(self, context: grpc.aio.ServicerContext) -> L1Session | None:
        md = dict(context.invocation_metadata() or ())
        tok = md.get(SESSION_METADATA_KEY)
        if not isinstance(tok, str) or not tok:
            return None
        s = self.sessions.get(tok)
        return None if s is None or s.released else s

    async def _session(self, context: grpc.aio.ServicerContext) -> L1Session:
        s = self.session_of(context)
        if s is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"hcalls need a live L1 session token in metadata {SESSION_METADATA_KEY!r} (from Connect)")
        assert s is not None
        self.walks.new_epoch(s.vm)  # an hcall may follow a change of L1's tree (see walks.py)
        return s

    async def Connect(self, request_iterator: AsyncIterator[l0_pb2.ConnectRequest], context: grpc.aio.ServicerContext) -> AsyncIterator[l0_pb2.ConnectResponse]:
        it = request_iterator.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            return
        if not first.HasField("register"):
            await abort_invalid(context, "register", "the first message of Connect must be a Register")
        reg = first.register
        if not _NAME_RE.match(reg.name):
            await abort_invalid(context, "register.name", "must be 1-63 characters of letters, digits, '_', '.', '-', starting with a letter or digit")
        if reg.name in self.by_name:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"an L1 named {reg.name!r} is already connected")
        if len(reg.memslots) > MAX_MEMSLOTS:
            await abort_invalid(context, "register.memslots", f"{len(reg.memslots)} memslots; at most {MAX_MEMSLOTS} (MAX_MEMSLOTS)")
        slots: list[Memslot] = []
        for i, m in enumerate(reg.memslots):
            if m.kind == common_pb2.MEMSLOT_KIND_MMIO_HOLE:
                continue  # holes are where no memslot is
            if m.kind not in (common_pb2.MEMSLOT_KIND_NORMAL, common_pb2.MEMSLOT_KIND_READ_ONLY):
                await abort_invalid(context, f"register.memslots[{i}].kind", "must be NORMAL, READ_ONLY or MMIO_HOLE")
            slots.append(Memslot(i, m.base_gfn_addr, m.size_bytes, m.kind == common_pb2.MEMSLOT_KIND_READ_ONLY, m.backing_shift, m.dirty_logging))
        try:
            vm = self.core.create_l1(reg.name, slots)
        except ConfigError as e:
            await context.abort_with_status(bad_request(str(e), [("register.memslots", str(e))]))
            return
        s = L1Session(secrets.token_urlsafe(24), reg.name, vm)
        self.sessions[s.token] = s
        self.by_name[s.name] = s
        structlog.contextvars.bind_contextvars(l1=s.name)
        log.info("l1_connected", l1_lpid_host=vm.lpid, memslots=len(slots))
        reader = asyncio.create_task(self._read_replies(s, it))
        try:
            yield l0_pb2.ConnectResponse(registered=l0_pb2.Registered(session_token=s.token, l1_lpid_host=vm.lpid, page_shift=self.core.page_shift))
            while True:
                call = await s.out.get()
                if call is None:
                    break
                msg = l0_pb2.ConnectResponse(calls=[call])
                while not s.out.empty():
                    nxt = s.out.get_nowait()
                    if nxt is None:
                        s.out.put_nowait(None)
                        break
                    msg.calls.append(nxt)
                yield msg
        finally:
            reader.cancel()
            self.release_l1(s)

    async def _read_replies(self, s: L1Session, it: AsyncIterator[l0_pb2.ConnectRequest]) -> None:
        try:
            async for req in it:
                for r in req.replies:
                    fut = s.pending.get(r.call_id)
                    if fut is not None and not fut.done():
                        fut.set_result(r)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            s.out.put_nowait(None)

    def release_l1(self, s: L1Session) -> None:
        """The L1 left or died: close its vCPUs' streams and release everything it had (I7)."""
        if s.released:
            return
        s.released = True
        self.sessions.pop(s.token, None)
        if self.by_name.get(s.name) is s:
            del self.by_name[s.name]
        for fut in s.pending.values():
            if not fut.done():
                fut.set_exception(L1Gone(f"L1 {s.name!r} disconnected"))
        for tok in list(s.tokens):
            got = self.run_tokens.pop(tok, None)
            if got is not None:
                self.core.kvmhv_put_nested(got[1])
        for st in list(s.streams):
            self._drop_stream(st, "the L1 running this vCPU is gone")
        self.core.destroy_l1(s.vm)
        self.broadcast(self.core.take_invalidations())
        self.stats["l1_released"] += 1
        log.info("l1_released", l1=s.name)

    # ================================================================ hcalls
    async def SetPartitionTable(self, request: l0_pb2.SetPartitionTableRequest, context: grpc.aio.ServicerContext) -> l0_pb2.SetPartitionTableResponse:
        s = await self._session(context)
        return l0_pb2.SetPartitionTableResponse(hcall_rc=self.core.h_set_partition_table(s.vm, request.ptcr))

    async def EnterNested(self, request: l0_pb2.EnterNestedRequest, context: grpc.aio.ServicerContext) -> l0_pb2.EnterNestedResponse:
        s = await self._session(context)
        if not request.HasField("state"):
            await abort_invalid(context, "state", "H_ENTER_NESTED needs an hv_guest_state")
        st = request.state
        rc, gp = await self._hcall(context, self.core.h_enter_nested(s.vm, HvGuestState(st.version, st.lpid, st.vcpu_token, st.transactional)))
        if rc != f.H.SUCCESS or gp is None:
            return l0_pb2.EnterNestedResponse(hcall_rc=rc)
        token = secrets.token_urlsafe(18)
        self.run_tokens[token] = (s, gp, st.vcpu_token)
        s.tokens.add(token)
        asyncio.get_running_loop().call_later(RUN_TOKEN_TTL, self._expire_token, token)
        return l0_pb2.EnterNestedResponse(hcall_rc=rc, run_token=token, shadow_lpid=gp.shadow_lpid)

    def _expire_token(self, token: str) -> None:
        got = self.run_tokens.pop(token, None)
        if got is not None:
            got[0].tokens.discard(token)
            self.core.kvmhv_put_nested(got[1])
            self.broadcast(self.core.take_invalidations())
            self.stats["run_tokens_expired"] += 1

    async def _hcall(self, context: grpc.aio.ServicerContext, op: Generator[Effect, Any, Any]) -> Any:
        try:
            return await self.drive(op)
        except (L1Gone, TimeoutError) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the L1 did not answer a call this hcall needs: {e}")

    def _reap_removed_guests(self, s: L1Session) -> None:
        """A RIC=2 flush of a cleared PATE removed a nested guest: the L1 destroyed it, and its
        vCPUs go with it (Linux-as-L1 stops a guest's vCPUs before freeing it).  Without this
        a vCPU still attached would re-read the PATE of a *new* guest that reuses the lpid."""
        for st in list(s.streams):
            if s.vm.nested.get(st.gp.l1_lpid) is not st.gp:
                self.stats["run_streams_closed_guest_destroyed"] += 1
                self._drop_stream(st, f"nested guest lpid {st.gp.l1_lpid} was destroyed by its L1")
        # The same for an entry not yet run (AttachVcpu done, no Run yet, e.g. its L2 died):
        # its token would pin the destroyed guest and its shadow LPID until RUN_TOKEN_TTL.
        for tok in list(s.tokens):
            got = self.run_tokens.get(tok)
            if got is not None and s.vm.nested.get(got[1].l1_lpid) is not got[1]:
                del self.run_tokens[tok]
                s.tokens.discard(tok)
                self.core.kvmhv_put_nested(got[1])
                self.broadcast(self.core.take_invalidations())
                self.stats["run_tokens_dropped_guest_destroyed"] += 1

    async def TlbInvalidate(self, request: l0_pb2.TlbInvalidateRequest, context: grpc.aio.ServicerContext) -> l0_pb2.TlbInvalidateResponse:
        s = await self._session(context)
        rc = await self._hcall(context, self.core.h_tlb_invalidate(s.vm, request.instr, request.rs, request.rb))
        self._reap_removed_guests(s)
        return l0_pb2.TlbInvalidateResponse(hcall_rc=rc)

    async def RptInvalidate(self, request: l0_pb2.RptInvalidateRequest, context: grpc.aio.ServicerContext) -> l0_pb2.RptInvalidateResponse:
        s = await self._session(context)
        r = request
        rc = await self._hcall(context, self.core.h_rpt_invalidate(s.vm, r.id, r.target, r.type, r.page_sizes, r.start, r.end))
        self._reap_removed_guests(s)
        return l0_pb2.RptInvalidateResponse(hcall_rc=rc)

    async def CopyToFromGuest(self, request: l0_pb2.CopyToFromGuestRequest, context: grpc.aio.ServicerContext) -> l0_pb2.CopyToFromGuestResponse:
        s = await self._session(context)
        r = request
        rc = await self._hcall(context, self.core.h_copy_tofrom_guest(s.vm, r.lpid, r.pid, r.eaddr, r.to_gpa, r.from_gpa, r.length))
        return l0_pb2.CopyToFromGuestResponse(hcall_rc=rc)

    async def CopyL1Memory(self, request: l0_pb2.CopyL1MemoryRequest, context: grpc.aio.ServicerContext) -> l0_pb2.CopyL1MemoryResponse:
        s = await self._session(context)
        r, core = request, self.core
        rc = core.l1_zero_memory(s.vm, r.dst_gpa, r.length) if r.zero else core.l1_copy_memory(s.vm, r.dst_gpa, r.src_gpa, r.length)
        return l0_pb2.CopyL1MemoryResponse(hcall_rc=rc)

    # ================================================================ vCPU run streams (run.py)
    def Run(self, request_iterator: AsyncIterator[l0_pb2.RunRequest], context: grpc.aio.ServicerContext) -> AsyncIterator[l0_pb2.RunResponse]:
        return run_rpc.serve_run(self, request_iterator, context)

    def _drop_stream(self, st: RunStream, reason: str | None) -> None:
        run_rpc.drop_stream(self, st, reason)

    # ================================================================ host operations
    async def _vm(self, context: grpc.aio.ServicerContext, name: str) -> L1Vm:
        s = self.by_name.get(name)
        if s is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no L1 named {name!r} is connected")
        assert s is not None
        return s.vm

    async def _host_op(self, context: grpc.aio.ServicerContext, fn: Callable[[], Any], fld: str) -> tuple[Any, int]:
        try:
            result = fn()
        except ConfigError as e:
            await abort_invalid(context, fld, str(e))
        invs = self.core.take_invalidations()
        waiters = self.broadcast(invs)
        if waiters:
            await self.wait_acks(waiters)
        return result, len(invs)

    async def HostUnmap(self, request: l0_pb2.HostUnmapRequest, context: grpc.aio.ServicerContext) -> l0_pb2.HostUnmapResponse:
        vm = await self._vm(context, request.l1_name)
        _, n = await self.moves.move(self, context, vm, request.gpa, migrate=False)  # swap-out after the tlbsync
        return l0_pb2.HostUnmapResponse(invalidations=n)

    async def HostMigrate(self, request: l0_pb2.HostMigrateRequest, context: grpc.aio.ServicerContext) -> l0_pb2.HostMigrateResponse:
        vm = await self._vm(context, request.l1_name)
        (_, old, new, _), n = await self.moves.move(self, context, vm, request.gpa, migrate=True)  # copy after the tlbsync
        return l0_pb2.HostMigrateResponse(old_host_address=old, new_host_address=new, invalidations=n)

    async def SetDirtyLogging(self, request: l0_pb2.SetDirtyLoggingRequest, context: grpc.aio.ServicerContext) -> l0_pb2.SetDirtyLoggingResponse:
        vm = await self._vm(context, request.l1_name)
        await self._host_op(context, lambda: self.core.set_dirty_logging(vm, request.slot_index, request.enabled), "slot_index")
        return l0_pb2.SetDirtyLoggingResponse()

    async def HarvestDirty(self, request: l0_pb2.HarvestDirtyRequest, context: grpc.aio.ServicerContext) -> l0_pb2.HarvestDirtyResponse:
        vm = await self._vm(context, request.l1_name)
        dirty, n = await self._host_op(context, lambda: self.core.harvest_dirty(vm, request.slot_index), "slot_index")
        return l0_pb2.HarvestDirtyResponse(dirty_gpas=dirty, invalidations=n)

    # ================================================================ inspection (inspect.py)
    def counters(self) -> dict[str, int]:
        return inspection.counters(self)

    async def GetStats(self, request: l0_pb2.GetStatsRequest, context: grpc.aio.ServicerContext) -> l0_pb2.GetStatsResponse:
        return await inspection.get_stats(self)

    async def DumpShadowTree(self, request: l0_pb2.DumpShadowTreeRequest, context: grpc.aio.ServicerContext) -> l0_pb2.DumpShadowTreeResponse:
        return await inspection.dump_shadow_tree(self, request, context)

    async def Audit(self, request: l0_pb2.AuditRequest, context: grpc.aio.ServicerContext) -> l0_pb2.AuditResponse:
        """I1-I7 across the services, right or inconclusive (services/l0/inspect.py)."""
        return await inspection.audit(self)


def create_servicer(page_shift: int = 16, ack_timeout: float = BROADCAST_ACK_TIMEOUT, walk_batching: bool = True) -> L0Servicer:
    return L0Servicer(L0Hypervisor(L0Config(page_shift=page_shift)), ack_timeout=ack_timeout, walk_batching=walk_batching)


async def serve(
    port: int,
    host: str = "0.0.0.0",
    page_shift: int = 16,
    ack_timeout: float = BROADCAST_ACK_TIMEOUT,
    ready: asyncio.Event | None = None,
    metrics_port: int = 0,
    walk_batching: bool = True,
) -> None:
    servicer = create_servicer(page_shift, ack_timeout, walk_batching)
    if metrics_port:
        bound = start_metrics(metrics_port, "l0", servicer.counters, host)
        log.info("metrics", port=bound, path="/metrics")

    def register(server: grpc.aio.Server) -> list[str]:
        l0_pb2_grpc.add_L0ServiceServicer_to_server(servicer, server)
        return [L0_SERVICE_NAME]

    async def on_stop() -> None:
        for s in list(servicer.by_name.values()):
            s.out.put_nowait(None)

    await serve_forever("l0", port, register, on_stop, host=host, ready=ready)

"""L1's session with L0: the Connect stream, the hcall RPCs, reconnection.

Theory of operation. One long-lived task (:meth:`L0Session.run`) keeps the L1 registered
with L0: it opens ``L0Service.Connect``, registers the L1's name and memslots, builds the
core :class:`~nestmmu.core.l1.L1Hypervisor` on the first registration (it needs L0's page
shift), issues the boot hcalls (H_SET_PARTITION_TABLE), then reads L0's calls until the
stream ends, and starts over with a backoff. The core state survives a reconnect: guests and
their trees live in L1's memory, which is this process.

Deadlock freedom (architecture.md, "Walk vs. invalidate"): L0 may hold a nested guest's
tlb_lock while it waits for L1 to walk a tree, and an L1 hcall (H_RPT_INVALIDATE) may be
waiting for that lock. So walks and memory reads/writes are answered synchronously by the
reader, never queued behind anything; a reflected exit (which may issue hcalls) is handled
in its own task and answered when it is done.

Writes to the stream all go through one queue feeding the request iterator, so replies from
the reader and from exit tasks never interleave on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import structlog

from nestmmu.core import formats as f
from nestmmu.core.effects import NestedExit
from nestmmu.core.formats import Access
from nestmmu.core.l1 import CopyL1Pages, CopyToFromGuest, Hcall, L1Hypervisor, L1Step, MemslotSpec, RptInvalidate, SetPartitionTable, TlbInvalidate
from nestmmu.core.radix import WalkResult
from nestmmu.limits import MAX_WALK_BATCH
from nestmmu.protos import SESSION_METADATA_KEY, common_pb2, l0_pb2, l0_pb2_grpc
from nestmmu.wire import EXIT_TO_PB

from ..common import REQUEST_ID_KEY, RPC_DEADLINE, new_request_id, request_id_var
from ..connection import insecure_channel

log = structlog.get_logger("l1.session")

#: Reconnect backoff: first delay, factor, ceiling (seconds).
BACKOFF_START = 0.1
BACKOFF_MAX = 2.0
#: A fault on a data guest's page that L1 is copying waits for the copy, polling (seconds).
BUSY_POLL = 0.002
BUSY_WAIT_MAX = 2.0


def run_remaining_steps(hcalls: list[Hcall], done: int) -> None:
    """The hcall list stopped at ``done`` (L0 gone, caller cancelled): still run L1's own steps
    after it, so no data-guest page is left busy without a leaf (its copy may be missing:
    the data checker reports that as lost, which it is)."""
    for h in hcalls[done:]:
        if isinstance(h, L1Step):
            h.run()


async def issue_in_order(hcalls: list[Hcall], call: Callable[[Hcall], Awaitable[int]]) -> int:
    """Issue hcalls one after another (Linux-as-L1's order); the first non-zero H_* code, else
    H_SUCCESS. If one fails (L0 gone, caller cancelled), L1's own steps after it still run."""
    first = 0
    done = 0
    try:
        for h in hcalls:
            rc = await call(h)
            done += 1
            if rc and not first:
                first = rc
    finally:
        run_remaining_steps(hcalls, done)
    return first


class L0Unavailable(Exception):
    """L1 has no live session with L0 (not yet registered, or L0 went away)."""


def memslot_to_proto(s: MemslotSpec) -> common_pb2.Memslot:
    kind = common_pb2.MEMSLOT_KIND_READ_ONLY if s.read_only else common_pb2.MEMSLOT_KIND_NORMAL
    return common_pb2.Memslot(base_gfn_addr=s.base, size_bytes=s.size, kind=kind, backing_shift=s.backing_shift)


def walk_to_proto(w: WalkResult) -> common_pb2.WalkResult:
    return common_pb2.WalkResult(
        ok=w.ok,
        leaf_pte=w.pte,
        l1_gpa=w.raddr,
        page_shift=w.page_shift,
        dsisr_code=0 if w.ok else w.code,
        fault_gpa=w.fault_gpa,
        leaf_address=w.leaf_addr,
        memory_references=w.refs,
    )


def _request_id_of(call: l0_pb2.L0Call) -> str:
    """The request id L0 tagged the call with (the L2 batch's), if the contract carries one."""
    rid = getattr(call, "request_id", "")
    return rid if isinstance(rid, str) and rid else new_request_id()


@dataclass
class _Stream:
    """One Connect stream (one registration)."""

    token: str
    l1_lpid_host: int
    page_shift: int
    out: asyncio.Queue[l0_pb2.ConnectRequest | None] = field(default_factory=asyncio.Queue)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def send(self, reply: l0_pb2.L1Reply) -> None:
        self.out.put_nowait(l0_pb2.ConnectRequest(replies=[reply]))


async def _drain(q: asyncio.Queue[l0_pb2.ConnectRequest | None]) -> AsyncIterator[l0_pb2.ConnectRequest]:
    while True:
        item = await q.get()
        if item is None:
            return
        yield item


class L0Session:
    """Keeps one L1 registered with L0 and issues its hcalls."""

    def __init__(
        self,
        name: str,
        l0_address: str,
        memslots: list[MemslotSpec],
        use_rpt_invalidate: bool = True,
        on_core: Callable[[L1Hypervisor], None] | None = None,
        forget_flush: bool = False,
        hdec_every: int = 0,
    ) -> None:
        self.name = name
        self.forget_flush = forget_flush  # the core L1's §9.17 teaching option
        self.hdec_every = hdec_every  # the core L1's HDEC on the logical clock
        self.l0_address = l0_address
        self.memslots = memslots
        self.use_rpt_invalidate = use_rpt_invalidate
        self.core: L1Hypervisor | None = None
        self.stats: Counter[str] = Counter()
        self.registered = asyncio.Event()  # set once the first registration completed
        #: L2 lpid -> tree changes made whose invalidation hcalls have not returned yet (told to
        #: L0 with every walk, so its audit does not judge a shadow leaf inside that window).
        self.tree_changes_in_flight: Counter[int] = Counter()
        #: Serialises mutations of the core (held around core calls only, never across an RPC).
        self.lock = asyncio.Lock()
        self._on_core = on_core
        self._stream: _Stream | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: l0_pb2_grpc.L0ServiceAsyncStub | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._call: grpc.aio.StreamStreamCall[l0_pb2.ConnectRequest, l0_pb2.ConnectResponse] | None = None
        #: Called with True when a session with L0 is up, False when it ends (health).
        self.on_connected: Callable[[bool], None] | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def connected(self) -> bool:
        return self._stream is not None

    def start(self) -> None:
        self._channel = insecure_channel(self.l0_address)  # keepalive agreed with L0's server (common.py)
        self._stub = l0_pb2_grpc.L0ServiceStub(self._channel)
        self._task = asyncio.create_task(self.run(), name=f"l1-session-{self.name}")

    async def stop(self) -> None:
        self._stopping = True
        if self._call is not None:
            self._call.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._channel is not None:
            await self._channel.close()

    async def run(self) -> None:
        delay = BACKOFF_START
        attempt = 0
        while not self._stopping:
            attempt += 1
            log.info("l0_connect_attempt", l0=self.l0_address, attempt=attempt, l1=self.name)
            try:
                registered = await self._session()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                log.warning("l0_session_failed", l0=self.l0_address, attempt=attempt, code=e.code().name, detail=e.details())
                registered = False
            except Exception as e:  # a bug or a protocol violation: log, back off, retry
                log.error("l0_session_error", l0=self.l0_address, attempt=attempt, error=repr(e))
                registered = False
            if self._stopping:
                return
            if registered:  # a session that worked resets the backoff
                delay, attempt = BACKOFF_START, 0
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _session(self) -> bool:
        """One Connect stream: register, boot, serve calls until it ends. True if registered."""
        assert self._stub is not None
        out: asyncio.Queue[l0_pb2.ConnectRequest | None] = asyncio.Queue()
        out.put_nowait(l0_pb2.ConnectRequest(register=l0_pb2.Register(name=self.name, memslots=[memslot_to_proto(s) for s in self.memslots])))
        rid = new_request_id()
        call = self._stub.Connect(_drain(out), metadata=((REQUEST_ID_KEY, rid),))  # long-lived: no deadline
        self._call = call
        stream: _Stream | None = None
        try:
            first = await asyncio.wait_for(call.read(), RPC_DEADLINE)
            if not isinstance(first, l0_pb2.ConnectResponse) or not first.HasField("registered"):
                raise RuntimeError(f"L0 answered Register with {first!r}")
            reg = first.registered
            stream = _Stream(reg.session_token, reg.l1_lpid_host, reg.page_shift, out)
            if self.core is None:
                self.core = L1Hypervisor(
                    self.name, self.memslots, reg.page_shift or 16, self.use_rpt_invalidate, forget_flush=self.forget_flush, hdec_every=self.hdec_every
                )
                if self._on_core is not None:
                    self._on_core(self.core)
            elif reg.page_shift and reg.page_shift != self.core.l0_page_shift:
                log.warning("l0_page_shift_changed", old=self.core.l0_page_shift, new=reg.page_shift)
            self.stats["registrations"] += 1
            log.info("l0_registered", l1=self.name, l1_lpid_host=reg.l1_lpid_host, page_shift=reg.page_shift, registrations=self.stats["registrations"])
            # Serve calls while booting: L0 may need to read L1 memory to check the table.
            reader = asyncio.create_task(self._read_calls(call, stream))
            try:
                for h in self.core.boot():
                    hrc = await self._hcall(stream, h, rid)
                    if hrc != f.H.SUCCESS:
                        log.error("boot_hcall_failed", hcall=type(h).__name__, hcall_rc=hrc)
                self._stream = stream
                self.registered.set()
                if self.on_connected is not None:
                    self.on_connected(True)
                await reader
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
            return True
        finally:
            if self._stream is not None and self.on_connected is not None:
                self.on_connected(False)
            self._stream = None
            self._call = None
            out.put_nowait(None)
            call.cancel()
            if stream is not None:
                for t in list(stream.tasks):
                    t.cancel()
                log.info("l0_session_closed", l1=self.name)

    # ------------------------------------------------------------------ calls from L0
    async def _read_calls(self, call: grpc.aio.StreamStreamCall[l0_pb2.ConnectRequest, l0_pb2.ConnectResponse], stream: _Stream) -> None:
        while True:
            msg = await call.read()
            if not isinstance(msg, l0_pb2.ConnectResponse):  # grpc.aio.EOF
                log.warning("l0_closed_session", l1=self.name)
                return
            replies: list[l0_pb2.L1Reply] = []
            for c in msg.calls:
                reply = self._answer_now(c, stream)
                if reply is not None:
                    replies.append(reply)
            if replies:
                stream.out.put_nowait(l0_pb2.ConnectRequest(replies=replies))

    def _answer_now(self, c: l0_pb2.L0Call, stream: _Stream) -> l0_pb2.L1Reply | None:
        """Answer a walk or memory call at once; start a task for an exit (None returned)."""
        core = self.core
        assert core is not None
        which = c.WhichOneof("call")
        if which == "walk":
            self.stats["walks"] += 1
            w = core.walk(c.walk.pate_dw0, c.walk.n_gpa)
            inflight = self.tree_changes_in_flight[c.walk.l1_lpid]
            return l0_pb2.L1Reply(call_id=c.call_id, walk=walk_to_proto(w), tree_changes_in_flight=inflight)
        if which == "walk_batch":
            wb = c.walk_batch
            if len(wb.n_gpas) > MAX_WALK_BATCH:
                return l0_pb2.L1Reply(call_id=c.call_id, error=f"walk_batch of {len(wb.n_gpas)} walks; at most {MAX_WALK_BATCH}")
            self.stats["walks"] += len(wb.n_gpas)
            self.stats["walk_batches"] += 1
            walks = [walk_to_proto(core.walk(wb.pate_dw0, n_gpa)) for n_gpa in wb.n_gpas]
            inflight = self.tree_changes_in_flight[wb.l1_lpid]
            return l0_pb2.L1Reply(call_id=c.call_id, walk_batch=l0_pb2.WalkBatchReply(walks=walks), tree_changes_in_flight=inflight)
        if which == "read_memory":
            self.stats["memory_reads"] += 1
            data = core.read_memory(c.read_memory.gpa, c.read_memory.length)
            return l0_pb2.L1Reply(call_id=c.call_id, read_memory=l0_pb2.ReadMemoryReply(ok=data is not None, data=data or b""))
        if which == "write_memory":
            self.stats["memory_writes"] += 1
            ok = core.write_memory(c.write_memory.gpa, c.write_memory.data)
            return l0_pb2.L1Reply(call_id=c.call_id, write_memory=l0_pb2.WriteMemoryReply(ok=ok))
        if which == "handle_exit":
            t = asyncio.create_task(self._handle_exit(c, stream))
            stream.tasks.add(t)
            t.add_done_callback(stream.tasks.discard)
            return None
        self.stats["unknown_calls"] += 1
        return l0_pb2.L1Reply(call_id=c.call_id, error=f"unknown call {which!r}")

    async def _handle_exit(self, c: l0_pb2.L0Call, stream: _Stream) -> None:
        rid = _request_id_of(c)
        request_id_var.set(rid)  # this task's own context: hcalls carry the L2 batch's id
        structlog.contextvars.bind_contextvars(request_id=rid)
        core = self.core
        assert core is not None
        e = c.handle_exit
        try:
            access = Access(e.access) if e.access in (1, 2, 3) else Access.LOAD
            ex = NestedExit(trap=e.trap, hdar=e.hdar, hdsisr=e.hdsisr, asdr=e.asdr, access=access, gpr3=e.gpr3)
            await self._wait_page_not_busy(core, e.l1_lpid, e.asdr)
            async with self.lock:
                reply, hcalls = core.handle_exit(e.l1_lpid, e.vcpu_id, ex)
                self.begin_tree_change(e.l1_lpid, hcalls)
            self.stats["exits_handled"] += 1
            log.debug(
                "exit_handled",
                l1_lpid=e.l1_lpid,
                vcpu_id=e.vcpu_id,
                trap=hex(e.trap),
                n_gpa=hex(e.asdr),
                hdsisr=f.dsisr_names(e.hdsisr),
                action=reply.action.value,
                hcalls=len(hcalls),
            )
            try:
                await issue_in_order(hcalls, functools.partial(self._hcall, stream, rid=rid))
            finally:
                self.end_tree_change(e.l1_lpid, hcalls)
            stream.send(
                l0_pb2.L1Reply(
                    call_id=c.call_id,
                    handle_exit=l0_pb2.HandleExitReply(action=EXIT_TO_PB[reply.action], dsisr=reply.dsisr, detail=reply.detail),
                )
            )
        except asyncio.CancelledError:
            raise
        except Exception as err:
            log.error("exit_failed", call_id=c.call_id, error=repr(err))
            stream.send(l0_pb2.L1Reply(call_id=c.call_id, error=f"L1 failed to handle the exit: {err!r}"))

    async def _wait_page_not_busy(self, core: L1Hypervisor, lpid: int, n_gpa: int) -> None:
        """migration_entry_wait: a data guest's page L1 is copying has no leaf until the
        copy is done; the fault waits for it instead of bouncing back to L0."""
        waited = 0.0
        while core.page_busy(lpid, n_gpa) and waited < BUSY_WAIT_MAX:
            await asyncio.sleep(BUSY_POLL)
            waited += BUSY_POLL
        if waited:
            self.stats["exit_waited_busy_page"] += 1

    # ------------------------------------------------------------------ hcalls
    def begin_tree_change(self, lpid: int, hcalls: list[Hcall]) -> None:
        """Call in the same synchronous section as the tree change (under ``lock``): from
        here until :meth:`end_tree_change`, L0 may still hold leaves built from the old tree."""
        if hcalls:
            self.tree_changes_in_flight[lpid] += 1

    def tree_change_marks(self, lpid: int) -> tuple[Callable[[list[Hcall]], None], Callable[[list[Hcall]], None]]:
        """(begin, end) of one guest's tree changes, for a tree op run slice by slice."""
        return functools.partial(self.begin_tree_change, lpid), functools.partial(self.end_tree_change, lpid)

    def end_tree_change(self, lpid: int, hcalls: list[Hcall]) -> None:
        """The change's invalidation hcalls returned (or failed: the session is then gone)."""
        if hcalls:
            self.tree_changes_in_flight[lpid] -= 1
            if self.tree_changes_in_flight[lpid] <= 0:
                del self.tree_changes_in_flight[lpid]

    async def hcall(self, h: Hcall) -> int:
        """Issue one hcall on the current session; L0Unavailable when there is none."""
        stream = self._stream
        if stream is None:
            raise L0Unavailable(f"L1 {self.name!r} is not connected to L0 at {self.l0_address}")
        return await self._hcall(stream, h, request_id_var.get() or new_request_id())

    async def enter_nested(self, lpid: int, vcpu_id: int) -> l0_pb2.EnterNestedResponse:
        stream = self._stream
        if stream is None or self._stub is None or self.core is None:
            raise L0Unavailable(f"L1 {self.name!r} is not connected to L0 at {self.l0_address}")
        st = self.core.hv_guest_state(lpid, vcpu_id)
        req = l0_pb2.EnterNestedRequest(state=l0_pb2.HvGuestState(version=st.version, lpid=st.lpid, vcpu_token=st.vcpu_token, transactional=st.transactional))
        self.stats["hcall.enter_nested"] += 1
        try:
            md = self._md(stream, request_id_var.get() or new_request_id())
            resp: l0_pb2.EnterNestedResponse = await self._stub.EnterNested(req, timeout=RPC_DEADLINE, metadata=md)
        except grpc.aio.AioRpcError as e:
            raise L0Unavailable(f"H_ENTER_NESTED failed: {e.code().name}: {e.details()}") from e
        return resp

    def _md(self, stream: _Stream, rid: str) -> tuple[tuple[str, str], ...]:
        return ((SESSION_METADATA_KEY, stream.token), (REQUEST_ID_KEY, rid))

    async def _hcall(self, stream: _Stream, h: Hcall, rid: str) -> int:
        stub = self._stub
        assert stub is not None
        md = self._md(stream, rid)
        try:
            if isinstance(h, SetPartitionTable):
                self.stats["hcall.set_partition_table"] += 1
                r1 = await stub.SetPartitionTable(l0_pb2.SetPartitionTableRequest(ptcr=h.ptcr), timeout=RPC_DEADLINE, metadata=md)
                rc = r1.hcall_rc
            elif isinstance(h, RptInvalidate):
                self.stats["hcall.rpt_invalidate"] += 1
                r2 = await stub.RptInvalidate(
                    l0_pb2.RptInvalidateRequest(id=h.id, target=h.target, type=h.type, page_sizes=h.pg_sizes, start=h.start, end=h.end),
                    timeout=RPC_DEADLINE,
                    metadata=md,
                )
                rc = r2.hcall_rc
            elif isinstance(h, CopyL1Pages):
                self.stats["hcall.copy_l1_memory"] += 1
                req = l0_pb2.CopyL1MemoryRequest(dst_gpa=h.dst, src_gpa=h.src, length=h.length, zero=h.zero)
                r4 = await stub.CopyL1Memory(req, timeout=RPC_DEADLINE, metadata=md)
                rc = r4.hcall_rc
            elif isinstance(h, CopyToFromGuest):
                self.stats["hcall.copy_tofrom_guest"] += 1
                r5 = await stub.CopyToFromGuest(
                    l0_pb2.CopyToFromGuestRequest(lpid=h.lpid, pid=h.pid, eaddr=h.eaddr, to_gpa=h.to_gpa, from_gpa=h.from_gpa, length=h.n),
                    timeout=RPC_DEADLINE,
                    metadata=md,
                )
                rc = r5.hcall_rc
                if h.done is not None:
                    h.done(int(rc))
            elif isinstance(h, L1Step):
                async with self.lock:  # L1's own work on its core (install a leaf, free a page)
                    h.run()
                rc = f.H.SUCCESS
            elif isinstance(h, TlbInvalidate):
                self.stats["hcall.tlb_invalidate"] += 1
                r3 = await stub.TlbInvalidate(l0_pb2.TlbInvalidateRequest(instr=h.instr, rs=h.rs, rb=h.rb), timeout=RPC_DEADLINE, metadata=md)
                rc = r3.hcall_rc
            else:  # pragma: no cover
                raise TypeError(f"unknown hcall {h!r}")
        except grpc.aio.AioRpcError as e:
            self.stats["hcall_errors"] += 1
            raise L0Unavailable(f"{type(h).__name__} to L0 failed: {e.code().name}: {e.details()}") from e
        if rc != f.H.SUCCESS:
            self.stats["hcall_failures"] += 1
            log.warning("hcall_rc", hcall=type(h).__name__, hcall_rc=rc)
        return int(rc)

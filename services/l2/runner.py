"""An L2 vCPU's Run stream with L0: batches up, results and tlbies down, acks that never wait (attach and the vCPU's life: vcpu.py).

The vCPU itself (TLB, hit scan, batching rounds, counters) is the core
:class:`~nestmmu.core.vcpu.Vcpu`; this module only moves its batches and results over gRPC.

Virtual mode (``WorkloadSpec.virtual``): the vCPU runs process ``pid`` of the guest's L2 kernel
(:mod:`.guestos`).  Its batches are effective addresses; an access that ends in GUEST_FAULT (a
process-scoped DSI/ISI, no hypervisor exit) is handed to the kernel after its round, whose
page-table stores this vCPU performs as real-mode data stores (``kernel_store``) and whose
tlbies it issues on the Run stream (``process_tlbie``), and is then retried; a segfault ends it.

Ordering (architecture.md, "Fill vs. broadcast on a run stream"): L0 interleaves a batch's
results with LPID-tagged invalidations in the order they happened under the guest's
tlb_lock. One reader is the only consumer of the stream and applies every message in
arrival order: results to the TLB, invalidations to the TLB followed at once by the ack
(tlbsync) -- also while the vCPU is waiting for the rest of a batch. The workload loop only
scans for hits (no awaits per access), sends a batch when there are misses and waits for
``batch_done``. All writes go through one queue, so they never interleave.

Acks never wait for the workload (hardware handles a tlbie without the CPU's help): the Run
stream is a synchronous gRPC call whose reader is a thread of its own, and whose writes are
taken from a thread-safe queue by gRPC's own thread, so neither depends on the event loop that
runs the workloads (and parses traces) of every vCPU in this process.  The TLB and counters are
guarded by ``RunStream.lock``: the reader holds it to apply one message, the workload loop to
scan one slice of a batch (``SCAN_SLICE`` accesses, about a millisecond).  The ack bound: an
invalidation is acknowledged within one scan slice plus a few GIL hand-offs (the L2 process sets
the switch interval to ``GIL_SWITCH_INTERVAL_S``) of CPU time after it arrives, however busy the
vCPUs and however large their batches.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
import time
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import structlog

from nestmmu.core import formats as f
from nestmmu.core.data import DataMessage, DataVcpu
from nestmmu.core.effects import AccessResult, Invalidation, NestedExit, Outcome, Scope, Translation
from nestmmu.core.exitclock import Batch, ExitClock, clocked
from nestmmu.core.formats import Access
from nestmmu.core.vcpu import POWER9_TLB_ENTRIES, POWER9_TLB_WAYS, Vcpu
from nestmmu.core.workload import WorkloadSpec, generate
from nestmmu.protos import l0_pb2, l0_pb2_grpc
from nestmmu.wire import OUTCOME_FROM_PB, SCOPE_FROM_PB, SCOPE_TO_PB, pte_from_flags

from ..common import RPC_DEADLINE, metadata_with_request_id, new_request_id
from ..connection import channel_options
from .guestos import Done, GuestOs, KernelFailed
from .turns import TURNS

log = structlog.get_logger("l2.vcpu")

#: A batch whose results make no progress for this long is abandoned (L0 itself bounds its
#: calls to L1 with L1_CALL_TIMEOUT, so this only fires when L0 is wedged).
BATCH_PROGRESS_TIMEOUT = 30.0
#: How long a detaching vCPU waits for L0 to end the Run stream after half-closing it before
#: cancelling it (either way L0 sees the vCPU go and counts it as flushed).
DETACH_TIMEOUT = 0.25
#: The L2 process's GIL switch interval: how long the workload thread may hold the interpreter
#: while a Run-stream thread waits to apply a tlbie and ack it.
GIL_SWITCH_INTERVAL_S = 0.001
#: Accesses the workload loop scans per hold of the TLB lock: a tlbie waits at most this long
#: (about a millisecond) for the scan to let it in.  Scanning a batch in slices gives the same
#: hits and misses as one scan, except that a tlbie may now land between slices, as on hardware.
SCAN_SLICE = 1024
#: Virtual mode: segfaults one vCPU describes in the report (the rest are only counted).
MAX_SEGFAULT_DETAILS = 4
#: Virtual mode: how many times one access may take a guest fault that its kernel handled
#: before the vCPU gives up on it (demand map, then R/C: two is the most a healthy run needs).
MAX_GUEST_FAULT_ROUNDS = 4

_FILL = l0_pb2.ACCESS_OUTCOME_FILL
_SI = l0_pb2.ACCESS_OUTCOME_STORAGE_INTERRUPT
_GUEST_FAULT = l0_pb2.ACCESS_OUTCOME_GUEST_FAULT
_OTHER_OUTCOMES = {
    l0_pb2.ACCESS_OUTCOME_MMIO_EMULATED: AccessResult(Outcome.MMIO_EMULATED),
    l0_pb2.ACCESS_OUTCOME_L1_EMULATED: AccessResult(Outcome.L1_EMULATED),
    l0_pb2.ACCESS_OUTCOME_ERROR: AccessResult(Outcome.ERROR),
}
_ERROR = AccessResult(Outcome.ERROR)
_HAS_BATCH_REQUEST_ID = "request_id" in l0_pb2.AccessBatch.DESCRIPTOR.fields_by_name

#: One thread generates (parses) the large batches of every vCPU, one batch at a time: the
#: event loop then shares the interpreter with one busy thread, not one per vCPU.
_GENERATOR = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="l2-generate")


def _next_packed(batches: Iterator[Batch | NestedExit]) -> tuple[Sequence[int], Sequence[int]] | NestedExit | None:
    """The next item, a batch packed into an array and bytes (on the generator thread).

    Packed batches hold no Python objects, so the cyclic garbage collector, which runs on the
    event loop's thread whenever allocations trigger it, never walks their 65536 elements:
    unpacked, a few vCPUs' batches made each full collection cost tens of milliseconds of the
    loop (measured: 40-60 ms pauses, issue 6's 100 ms probes failing)."""
    got = next(batches, None)
    if isinstance(got, tuple):
        addrs, kinds = got
        return array("Q", addrs), bytes(kinds)
    return got


class VcpuFailed(Exception):
    """The vCPU could not attach or its Run stream broke."""


@dataclass
class LiveVcpu:
    """A running vCPU, as DumpTlb sees it."""

    vcpu_id: int
    l1_lpid: int
    vcpu: Vcpu
    lock: threading.Lock = field(default_factory=threading.Lock)


def _drain(q: queue.Queue[l0_pb2.RunRequest | None]) -> Iterator[l0_pb2.RunRequest]:
    """The Run stream's requests, consumed by gRPC's own thread; None half-closes."""
    while True:
        item = q.get()
        if item is None:
            return
        yield item


class RunStream:
    """The Run stream of one attached vCPU and the reader that applies L0's messages."""

    def __init__(
        self,
        vcpu_id: int,
        l1_lpid: int,
        l0_address: str,
        run_token: str,
        guest: GuestOs | None = None,
        hdec_every: int = 0,
        tlb_entries: int = POWER9_TLB_ENTRIES,
        tlb_ways: int = POWER9_TLB_WAYS,
    ) -> None:
        self.vcpu_id = vcpu_id
        self.hdec_every = hdec_every  # the HDEC L1 programs (AttachVcpu), on the logical clock
        self.l1_lpid = l1_lpid
        self.l0_address = l0_address
        self.run_token = run_token
        self.vcpu = Vcpu(vcpu_id, tlb_entries=tlb_entries, tlb_ways=tlb_ways)  # geometry: the workload's
        #: The TLB and counters: held by the reader thread per message, by the workload per scan.
        self.lock = threading.Lock()
        self.out: queue.Queue[l0_pb2.RunRequest | None] = queue.Queue()
        self.failure: str | None = None
        #: Why L0 ended the stream (RunEnded), if it said so before ending it.
        self.ended: str | None = None
        #: Accesses that ended in ERROR, by L0's reason (reported once per reason).
        self.error_reasons: Counter[str] = Counter()
        self.closing = False
        self._batch_id = 0
        self._expected = 0
        self._received = 0
        self._done = asyncio.Event()
        self._batch_open = False  # the reader's view: results of the current batch may come
        self._attached = asyncio.Event()
        self._attached_seen = False  # set by the reader thread on RunAttached
        self._loop: asyncio.AbstractEventLoop | None = None
        self._progress = time.monotonic()
        self._log = log.bind(vcpu_id=vcpu_id, l1_lpid=l1_lpid)
        self.data: DataVcpu | None = None  # data mode (see _run_data)
        self._data_result: tuple[list[int], bytes] | None = None
        self._batch_data = False  # the open batch is a data batch (data mode, kernel stores)
        self._data_outcome = ""  # a kernel store's outcome when it did not reach memory
        # Virtual mode: the guest's OS, the PID this vCPU runs (-1: real mode), the accesses of
        # the open batch, and those of its results that were guest faults (addr, kind, dsisr).
        self.guest = guest
        self._pid = -1
        self._sent: list[tuple[int, int]] = []
        self._faults: list[tuple[int, int, int]] = []
        self._tlbie_id = 0  # the last ProcessTlbie / L2 hcall sent (one in flight)
        self._tlbie_done = asyncio.Event()
        self._hcall_rc: int | None = None
        self.segfault_details: list[str] = []

    @property
    def stats(self) -> Counter[str]:
        return self.vcpu.stats

    # ------------------------------------------------------------------ workload side
    async def run(self, spec: WorkloadSpec, vcpu_index: int) -> None:
        self._loop = asyncio.get_running_loop()
        channel = grpc.insecure_channel(self.l0_address, options=channel_options())  # the shared keepalive policy
        stub = l0_pb2_grpc.L0ServiceStub(channel)
        self.out.put_nowait(l0_pb2.RunRequest(attach=l0_pb2.RunAttach(run_token=self.run_token)))
        call = stub.Run(_drain(self.out), metadata=metadata_with_request_id())  # long-lived: no deadline
        # The reader takes every message from the first (RunAttached) on: a tlbie L0 sends right
        # after the attach is acked even while this loop is busy with other vCPUs.
        reader = threading.Thread(target=self._reader, args=(call,), name=f"run-{self.l1_lpid}-{self.vcpu_id}", daemon=True)
        reader.start()
        try:
            try:
                await asyncio.wait_for(self._attached.wait(), RPC_DEADLINE)
            except TimeoutError as e:
                raise VcpuFailed(f"L0 at {self.l0_address} did not answer RunAttach within {RPC_DEADLINE}s") from e
            if self.failure is not None:
                raise VcpuFailed(self.failure)
            self._log = self._log.bind(shadow_lpid=self.vcpu.lpid)
            self._log.info("vcpu_attached", l0=self.l0_address)
            vcpu = self.vcpu
            lock = self.lock
            if spec.virtual:
                await self._start_process(spec.pid)
            if spec.data:
                await self._run_data(spec, vcpu_index)
            clock = ExitClock(self.hdec_every, spec.hcall_every)
            batches = clocked(generate(spec, vcpu_index), clock) if not spec.data else iter(())
            nbatch = 0
            big = spec.batch_size > SCAN_SLICE  # generated off the loop, scanned in yielding slices
            loop = asyncio.get_running_loop()
            while (got := await loop.run_in_executor(_GENERATOR, _next_packed, batches) if big else next(batches, None)) is not None:
                if isinstance(got, NestedExit):  # due after every access before it
                    self._send_nested_exit(got)
                    continue
                addrs, kinds = got
                send: list[tuple[int, int]] = []
                for lo in range(0, len(addrs), SCAN_SLICE):  # the lock is held one slice at a time
                    await TURNS.take()  # one slice per loop iteration across all vCPUs
                    with lock:
                        send += vcpu.run_hits(addrs[lo : lo + SCAN_SLICE], kinds[lo : lo + SCAN_SLICE])
                while send:
                    await self._round(send)
                    if self._pid >= 0:
                        await self._settle_guest_faults()
                    with lock:
                        again = vcpu.take_deferred()  # next_round, rescanned in slices
                    send = []
                    for lo in range(0, len(again), SCAN_SLICE):
                        await TURNS.take()
                        with lock:
                            send += vcpu.rescan(again[lo : lo + SCAN_SLICE])
                nbatch += 1
                if self._pid >= 0 and spec.unmap_every and addrs and nbatch % spec.unmap_every == 0:
                    await self._munmap(addrs[0])
                await asyncio.sleep(0)  # other vCPUs and RPCs of this process (acks do not wait for this)
                if self.failure is not None:
                    raise VcpuFailed(self.failure)
            # Detach: half-close, let L0 end the stream; acks are no longer possible.
            self.closing = True
            self.out.put_nowait(None)
            await asyncio.to_thread(reader.join, DETACH_TIMEOUT)
            with self.lock:  # the reader thread may still be counting
                done = {k: v for k, v in self.stats.items() if k in ("accesses", "tlb_hits", "fills")}
            self._log.info("vcpu_detached", **done)
        finally:
            self.closing = True
            self.out.put_nowait(None)  # also ends gRPC's request thread
            call.cancel()
            await asyncio.to_thread(reader.join)
            channel.close()

    def _send_nested_exit(self, ex: NestedExit) -> None:
        """An HDEC or hcall exit: L0 takes it in order after the batches sent before it."""
        with self.lock:
            self.stats["nested_exits_sent"] += 1
        self.out.put_nowait(l0_pb2.RunRequest(nested_exit=l0_pb2.NestedExitRequest(trap=ex.trap, gpr3=ex.gpr3)))

    async def _round(self, send: list[tuple[int, int]]) -> None:
        """Send one AccessBatch and wait until its results (and any tlbies) were applied."""
        if self.failure is not None:
            raise VcpuFailed(self.failure)
        self._batch_id += 1
        rid = new_request_id()
        batch = l0_pb2.AccessBatch(batch_id=self._batch_id, addresses=[a for a, _ in send], kinds=bytes(k for _, k in send))
        if self._pid >= 0:
            batch.virtual_mode = True
            batch.pid = self._pid
        if _HAS_BATCH_REQUEST_ID:
            batch.request_id = rid  # type: ignore[attr-defined,unused-ignore]
        with self.lock:
            self._expected, self._received = len(send), 0
            self._sent = send
            self._batch_data = False
            self._batch_open = True
            self.stats["batches_sent"] += 1
        self._done.clear()
        self._progress = time.monotonic()
        self._log.debug("batch_sent", request_id=rid, batch_id=self._batch_id, accesses=len(send))
        self.out.put_nowait(l0_pb2.RunRequest(batch=batch))
        await self._wait_batch_done()
        if self.failure is not None:
            raise VcpuFailed(self.failure)

    async def _wait_batch_done(self) -> None:
        """Until the reader applied the batch's last results; a batch whose results make no
        progress for BATCH_PROGRESS_TIMEOUT fails the vCPU (L0 is wedged)."""
        while not self._done.is_set():
            try:
                await asyncio.wait_for(self._done.wait(), 1.0)
            except TimeoutError:
                if time.monotonic() - self._progress > BATCH_PROGRESS_TIMEOUT:
                    self.failure = f"no results for batch {self._batch_id} for {BATCH_PROGRESS_TIMEOUT}s"
                    return

    # ------------------------------------------------------------------ virtual mode
    async def _start_process(self, pid: int) -> None:
        """Boot the guest's kernel if needed and create process ``pid``; then run it (PIDR)."""
        if self.guest is None:
            raise VcpuFailed("virtual mode needs the guest's L2 kernel (internal error: none given)")
        try:
            done = await self.guest.start_process(self, pid)
        except KernelFailed as e:
            raise VcpuFailed(str(e)) from e
        with self.lock:
            self._count_kernel(done)
            self.vcpu.pid = pid
            self._pid = pid

    async def _settle_guest_faults(self) -> None:
        """Hand the last round's guest faults to the kernel, one at a time under its mm lock,
        and retry the accesses it fixed (as a new round, which may fault again), until none is
        left.  A segfault or a kernel failure ends its access (counted, with its reason)."""
        assert self.guest is not None
        tries: Counter[tuple[int, int]] = Counter()
        while True:
            with self.lock:
                faults, self._faults = self._faults, []
            if not faults:
                return
            retry: list[tuple[int, int]] = []
            for addr, kind, dsisr in faults:
                tries[(addr, kind)] += 1
                if tries[(addr, kind)] > MAX_GUEST_FAULT_ROUNDS:
                    self._access_error(f"guest fault at EA {addr:#x} still there after the L2 kernel handled it {MAX_GUEST_FAULT_ROUNDS} times")
                    continue
                try:
                    # Quadrant 3 (EA bits 0:1 = 0b11) translates with PID 0, the kernel's own.
                    pid = 0 if addr >> f.EA_QUADRANT_SHIFT == 3 else self._pid
                    got = await self.guest.handle_fault(self, pid, addr, Access(kind), dsisr)
                except KernelFailed as e:
                    self._access_error(str(e))
                    continue
                with self.lock:
                    if got is None:
                        self.stats["segfaults"] += 1  # SIGSEGV: the access ends here
                        self._log.debug("segfault", ea=hex(addr), kind=kind, dsisr=hex(dsisr))
                        if len(self.segfault_details) < MAX_SEGFAULT_DETAILS:
                            what = Access(kind).name.lower()
                            self.segfault_details.append(f"vCPU {self.vcpu_id}: SIGSEGV: {what} at EA {addr:#x} of PID {pid} (DSISR {dsisr:#x})")
                        continue
                    self.stats["guest_faults_handled"] += 1
                    self._count_kernel(got)
                retry.append((addr, kind))
            if retry:
                with self.lock:
                    self.stats["guest_fault_retries"] += len(retry)
                await self._round(retry)

    async def _munmap(self, ea: int) -> None:
        """The process drops the page holding ``ea`` (MADV_DONTNEED): the kernel clears its
        leaf and flushes it from every vCPU of the guest (ProcessTlbie through L0)."""
        assert self.guest is not None
        pid = 0 if ea >> f.EA_QUADRANT_SHIFT == 3 else self._pid
        try:
            done = await self.guest.unmap(self, pid, ea, 1)
        except KernelFailed as e:
            self._access_error(str(e))
            return
        with self.lock:
            self.stats["munmaps"] += 1
            self._count_kernel(done)

    def _count_kernel(self, done: Done) -> None:
        """What the kernel made this vCPU do (the caller holds the lock)."""
        self.stats["kernel_stores"] += done.stores
        self.stats["process_tlbies"] += done.tlbies
        self.stats["l2_rpt_invalidates"] += done.rpt_invalidates

    def _access_error(self, why: str) -> None:
        with self.lock:
            self.stats["errors"] += 1
            self.error_reasons[why] += 1

    async def kernel_store(self, addr: int, value: int) -> str | None:
        """One real-mode store of the L2 kernel, as a data batch of one miss: L0 resolves it
        (nested faults included) and performs it in host memory."""
        if self.failure is not None:
            raise VcpuFailed(self.failure)
        with self.lock:
            self._data_outcome = ""
            self._sent = [(addr, int(Access.STORE))]
            self._queue_data_batch([addr], bytes([Access.STORE]), [value], [0])
        _, done = await self._data_round()
        return None if done[:1] == b"\x01" else self._data_outcome or "the store did not reach memory"

    async def process_tlbie(self, invalidations: list[Invalidation]) -> None:
        """tlbie PRS=1 for each, then tlbsync: L0 delivers them to every vCPU of this vCPU's
        shadow LPID (this one included, through the reader) and answers once all acked."""
        if self.failure is not None:
            raise VcpuFailed(self.failure)
        self._tlbie_id += 1
        msg = l0_pb2.ProcessTlbie(id=self._tlbie_id)
        for inv in invalidations:
            msg.invalidations.add(scope=SCOPE_TO_PB[inv.scope], address=inv.address, size_bytes=inv.size, reason=inv.reason, prs=True, pid=inv.pid)
        self._tlbie_done.clear()
        self._progress = time.monotonic()
        self.out.put_nowait(l0_pb2.RunRequest(process_tlbie=msg))
        await self._wait_tlbie("a process-scoped tlbie (tlbsync)")

    async def l2_rpt_invalidate(self, pid: int, type_: int, pg_sizes: int, start: int, end: int) -> int:
        """H_RPT_INVALIDATE from this vCPU (an L2 without GTSE): it exits to L0, which performs
        a process-scoped one for the guest's shadow LPID and returns its code (L2HcallDone)."""
        if self.failure is not None:
            raise VcpuFailed(self.failure)
        self._tlbie_id += 1
        self._hcall_rc = None
        msg = l0_pb2.L2RptInvalidate(id=self._tlbie_id, pid=pid, type=type_, page_sizes=pg_sizes, start=start, end=end)
        self._tlbie_done.clear()
        self._progress = time.monotonic()
        self.out.put_nowait(l0_pb2.RunRequest(l2_rpt_invalidate=msg))
        await self._wait_tlbie("an H_RPT_INVALIDATE")
        return self._hcall_rc if self._hcall_rc is not None else f.H.FUNCTION

    async def _wait_tlbie(self, what: str) -> None:
        while not self._tlbie_done.is_set():
            try:
                await asyncio.wait_for(self._tlbie_done.wait(), 1.0)
            except TimeoutError:
                if self.failure is not None or time.monotonic() - self._progress > BATCH_PROGRESS_TIMEOUT:
                    raise VcpuFailed(self.failure or f"no answer to {what} for {BATCH_PROGRESS_TIMEOUT}s") from None
        if self.failure is not None:
            raise VcpuFailed(self.failure)

    # ------------------------------------------------------------------ data mode
    async def _run_data(self, spec: WorkloadSpec, vcpu_index: int) -> None:
        """Data mode: each message is a run of TLB hits (with the host address translated)
        ended by at most one miss; one message in flight (see nestmmu.core.data)."""
        dv = self.data = DataVcpu(self.vcpu, vcpu_index, initial_zero=spec.data_fresh)
        for addrs, kinds in generate(spec, vcpu_index):
            start = 0
            while start < len(addrs):
                if self.failure is not None:
                    raise VcpuFailed(self.failure)
                # Translate and enqueue under one hold of the lock: the reader thread applies
                # tlbies and queues their acks under it, so an ack can never reach L0 ahead of
                # a batch built from a translation that ack retired (L0 copies a moved frame
                # once the ack is in; a store that overtook it would land in the old frame).
                with self.lock:
                    msg = dv.message(addrs, kinds, start)
                    self._send_data_batch(msg)
                start += len(msg.addrs)
                loaded, done = await self._data_round()
                with self.lock:
                    dv.complete(msg, [bool(d) for d in done], loaded)
            await asyncio.sleep(0)  # let the reader apply and ack pending tlbies
            if self.failure is not None:
                raise VcpuFailed(self.failure)

    def _send_data_batch(self, msg: DataMessage) -> None:
        """Queue one data batch (the caller holds the vCPU lock, see _run_data)."""
        self._queue_data_batch(msg.addrs, bytes(msg.kinds), msg.values, msg.hosts)

    def _queue_data_batch(self, addrs: list[int], kinds: bytes, values: list[int], hosts: list[int]) -> None:
        """Send one data-mode AccessBatch on the Run stream (the caller holds the vCPU lock)."""
        self._batch_id += 1
        batch = l0_pb2.AccessBatch(batch_id=self._batch_id, addresses=addrs, kinds=kinds, data=True, values=values, host_addresses=hosts)
        self._data_result = None
        self._batch_data = True
        self._batch_open = True
        self.stats["batches_sent"] += 1
        self._done.clear()
        self._progress = time.monotonic()
        self.out.put_nowait(l0_pb2.RunRequest(batch=batch))

    async def _data_round(self) -> tuple[list[int], bytes]:
        """Wait for the results and loaded values of the batch _send_data_batch queued."""
        await self._wait_batch_done()
        if self.failure is not None or self._data_result is None:
            raise VcpuFailed(self.failure or "data batch ended without its values")
        return self._data_result

    def _apply_data_results(self, r: l0_pb2.AccessResults) -> None:
        """Fills of the batch's miss (applied in order with tlbies), then its loaded values."""
        if r.batch_id != self._batch_id or not self._batch_open:
            self.stats["stray_results"] += 1
            return
        self._apply_outcomes(r)
        if r.outcomes and r.outcomes[-1] != _FILL:
            o = r.outcomes[-1]
            name = OUTCOME_FROM_PB[o].name if o in OUTCOME_FROM_PB else str(o)
            dsisr = r.dsisrs[-1] if r.dsisrs else 0
            self._data_outcome = f"{name} (DSISR {dsisr:#x})" + (f": {next(iter(r.error_reasons.values()))}" if r.error_reasons else "")
        if r.batch_done:
            self._data_result = (list(r.data_loaded), bytes(r.data_done))
            self._batch_open = False
            self._wake(self._done)

    # ------------------------------------------------------------------ reader side
    def _reader(self, call: Iterator[l0_pb2.RunResponse]) -> None:
        """The stream's own thread: apply L0's messages in arrival order, each under the lock."""
        lock = self.lock
        try:
            for msg in call:
                which = msg.WhichOneof("message")
                if not self._attached_seen:
                    if which != "attached":
                        self.failure = f"L0 answered RunAttach with {msg!r}"
                        return
                    with lock:
                        self.vcpu.lpid = msg.attached.shadow_lpid
                    self._attached_seen = True
                    self._wake(self._attached)
                    continue
                with lock:
                    if which == "results" and self._batch_data:
                        self._apply_data_results(msg.results)
                    elif which == "results":
                        self._apply_results(msg.results)
                    elif which == "invalidate":
                        self._apply_invalidations(msg.invalidate)
                    elif which == "tlb_dump_request":
                        self._send_tlb_dump(msg.tlb_dump_request.id)
                    elif which == "process_tlbie_done":
                        if msg.process_tlbie_done.id == self._tlbie_id:
                            self._wake(self._tlbie_done)
                    elif which == "l2_hcall_done":
                        if msg.l2_hcall_done.id == self._tlbie_id:
                            self._hcall_rc = msg.l2_hcall_done.hcall_rc
                            self._wake(self._tlbie_done)
                    elif which == "ended":
                        # L0's own reason, before the status (which grpc may replace by
                        # INTERNAL when this vCPU wrote into the already-ended stream).
                        self.ended = msg.ended.reason
                    else:
                        self.stats["unexpected_messages"] += 1
            if not self.closing:
                self.failure = self._ended_failure() or "L0 ended the Run stream"
        except grpc.RpcError as e:
            if not self._attached_seen:
                self.failure = f"Run attach to L0 at {self.l0_address} failed: {e.code().name}: {e.details()}"
            elif not self.closing:
                self.failure = self._ended_failure() or f"Run stream broke: {e.code().name}: {e.details()}"
        except Exception as e:
            self.failure = f"Run stream protocol error: {e!r}"
        finally:
            if not self._attached_seen and self.failure is None:
                self.failure = f"L0 at {self.l0_address} ended the Run stream before RunAttached"
            self._wake(self._attached)
            self._wake(self._done)  # the workload loop checks self.failure
            self._wake(self._tlbie_done)

    def _ended_failure(self) -> str | None:
        return f"L0 ended the Run stream: {self.ended}" if self.ended else None

    def _wake(self, event: asyncio.Event) -> None:
        """Set an event of the workload's loop from the reader thread (asyncio.Event is not thread-safe)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is shutting down
                loop.call_soon_threadsafe(event.set)

    def _apply_outcomes(self, r: l0_pb2.AccessResults) -> None:
        """Apply one results message to the TLB and counters, in order (fills, storage
        interrupts, emulations, errors with their reasons)."""
        vcpu = self.vcpu
        lpid = vcpu.lpid
        pages, hosts, flags, dsisrs = r.page_addresses, r.host_addresses, r.flags, r.dsisrs
        pids, reals = r.pids, r.real_page_addresses
        for i, o in enumerate(r.outcomes):
            if o == _FILL:
                fl = flags[i]
                host = hosts[i]
                pid = pids[i] if i < len(pids) else -1
                real = reals[i] if pid >= 0 and i < len(reals) else -1
                t = Translation(lpid, pages[i], host, fl & l0_pb2.FILL_FLAG_PAGE_SHIFT_MASK, pte_from_flags(host, fl), pid, real)
                vcpu.apply(AccessResult(Outcome.FILL, t))
            elif o == _SI:
                vcpu.apply(AccessResult(Outcome.STORAGE_INTERRUPT, dsisr=dsisrs[i] if i < len(dsisrs) else 0))
            elif o == _GUEST_FAULT:
                dsisr = dsisrs[i] if i < len(dsisrs) else 0
                vcpu.apply(AccessResult(Outcome.GUEST_FAULT, dsisr=dsisr))
                j = r.first_index + i
                if j < len(self._sent):  # handed to the L2 kernel after the round
                    addr, kind = self._sent[j]
                    self._faults.append((addr, kind, dsisr))
            else:
                vcpu.apply(_OTHER_OUTCOMES.get(o, _ERROR))
        for why in r.error_reasons.values():  # the report names every reason (run_vcpu)
            self.error_reasons[why] += 1
        self._progress = time.monotonic()

    def _apply_results(self, r: l0_pb2.AccessResults) -> None:
        if r.batch_id != self._batch_id or not self._batch_open:
            self.stats["stray_results"] += 1
            return
        if r.first_index != self._received:
            raise ValueError(f"batch {r.batch_id}: results start at {r.first_index}, expected {self._received}")
        self._apply_outcomes(r)
        self._received += len(r.outcomes)
        if r.batch_done:
            if self._received != self._expected:
                raise ValueError(f"batch {r.batch_id}: {self._received} results for {self._expected} accesses")
            self._batch_open = False
            self._wake(self._done)

    def _apply_invalidations(self, b: l0_pb2.InvalidationBroadcast) -> None:
        ids = []
        for inv in b.invalidations:
            scope = SCOPE_FROM_PB.get(inv.scope, Scope.LPID)  # unspecified: drop the whole LPID (safe)
            self.vcpu.invalidate(Invalidation(inv.lpid, scope, inv.address, inv.size_bytes, inv.reason, inv.prs, inv.pid if inv.prs else -1))
            ids.append(inv.id)
        if self.closing:
            return  # half-closed: L0 counts a departing vCPU as flushed
        self.out.put_nowait(l0_pb2.RunRequest(ack=l0_pb2.InvalidationAck(invalidation_ids=ids)))
        self.stats["acks_sent"] += len(ids)
        self.stats["ack_messages"] += 1
        self._progress = time.monotonic()

    def _send_tlb_dump(self, dump_id: int) -> None:
        if self.closing:
            return
        entries = [
            l0_pb2.TlbDumpEntry(
                lpid=e.lpid, page_address=e.page, host_address=e.host, page_shift=e.shift, pte=e.pte, pid=e.pid, real_page_address=max(e.real_page, 0)
            )  # pid -1: real mode
            for e in self.vcpu.tlb.entries()
        ]
        self.out.put_nowait(l0_pb2.RunRequest(tlb_dump=l0_pb2.TlbDump(id=dump_id, entries=entries)))
        self.stats["tlb_dumps_sent"] += 1


__all__ = ["GIL_SWITCH_INTERVAL_S", "LiveVcpu", "RunStream", "VcpuFailed", "pte_from_flags"]

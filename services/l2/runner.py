"""One L2 vCPU across processes: attach through L1, run a workload on L0's Run stream.

The vCPU itself (TLB, hit scan, batching rounds, counters) is the core
:class:`~nestmmu.core.vcpu.Vcpu`; this module only moves its batches and results over gRPC.

Ordering (architecture.md, "Fill vs. broadcast on a run stream"): L0 interleaves a batch's
results with LPID-tagged invalidations in the order they happened under the guest's
tlb_lock. One reader task is the only consumer of the stream and applies every message in
arrival order: results to the TLB, invalidations to the TLB followed at once by the ack
(tlbsync) -- also while the vCPU is waiting for the rest of a batch. The workload loop only
scans for hits (no awaits per access), sends a batch when there are misses and waits for
``batch_done``; it yields to the reader between workload batches so acks are never held up by
a long stretch of TLB hits. All writes go through one queue, so they never interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import structlog

from nestmmu.core import formats as f
from nestmmu.core.effects import AccessResult, Invalidation, Outcome, Scope, Translation
from nestmmu.core.vcpu import Vcpu
from nestmmu.core.workload import WorkloadSpec, generate
from nestmmu.protos import l0_pb2, l0_pb2_grpc, l1_pb2, l1_pb2_grpc
from nestmmu.wire import SCOPE_FROM_PB, pte_from_flags

from ..common import RPC_DEADLINE, metadata_with_request_id, new_request_id
from ..connection import insecure_channel

log = structlog.get_logger("l2.vcpu")

#: A batch whose results make no progress for this long is abandoned (L0 itself bounds its
#: calls to L1 with L1_CALL_TIMEOUT, so this only fires when L0 is wedged).
BATCH_PROGRESS_TIMEOUT = 30.0
#: How long a detaching vCPU waits for L0 to end the Run stream after half-closing it before
#: cancelling it (either way L0 sees the vCPU go and counts it as flushed).
DETACH_TIMEOUT = 0.25

_FILL = l0_pb2.ACCESS_OUTCOME_FILL
_SI = l0_pb2.ACCESS_OUTCOME_STORAGE_INTERRUPT
_OTHER_OUTCOMES = {
    l0_pb2.ACCESS_OUTCOME_MMIO_EMULATED: AccessResult(Outcome.MMIO_EMULATED),
    l0_pb2.ACCESS_OUTCOME_L1_EMULATED: AccessResult(Outcome.L1_EMULATED),
    l0_pb2.ACCESS_OUTCOME_ERROR: AccessResult(Outcome.ERROR),
}
_ERROR = AccessResult(Outcome.ERROR)
_HAS_BATCH_REQUEST_ID = "request_id" in l0_pb2.AccessBatch.DESCRIPTOR.fields_by_name

_ids = itertools.count(1)


class VcpuFailed(Exception):
    """The vCPU could not attach or its Run stream broke."""


@dataclass
class LiveVcpu:
    """A running vCPU, as DumpTlb sees it."""

    vcpu_id: int
    l1_lpid: int
    vcpu: Vcpu


async def _drain(q: asyncio.Queue[l0_pb2.RunRequest | None]) -> AsyncIterator[l0_pb2.RunRequest]:
    while True:
        item = await q.get()
        if item is None:
            return
        yield item


class RunStream:
    """The Run stream of one attached vCPU and the reader that applies L0's messages."""

    def __init__(self, vcpu_id: int, l1_lpid: int, l0_address: str, run_token: str) -> None:
        self.vcpu_id = vcpu_id
        self.l1_lpid = l1_lpid
        self.l0_address = l0_address
        self.run_token = run_token
        self.vcpu = Vcpu(vcpu_id)
        self.out: asyncio.Queue[l0_pb2.RunRequest | None] = asyncio.Queue()
        self.failure: str | None = None
        self.closing = False
        self._batch_id = 0
        self._expected = 0
        self._received = 0
        self._done = asyncio.Event()
        self._progress = time.monotonic()
        self._log = log.bind(vcpu_id=vcpu_id, l1_lpid=l1_lpid)

    @property
    def stats(self) -> Counter[str]:
        return self.vcpu.stats

    # ------------------------------------------------------------------ workload side
    async def run(self, spec: WorkloadSpec, vcpu_index: int) -> None:
        async with insecure_channel(self.l0_address) as channel:
            stub = l0_pb2_grpc.L0ServiceStub(channel)
            self.out.put_nowait(l0_pb2.RunRequest(attach=l0_pb2.RunAttach(run_token=self.run_token)))
            call = stub.Run(_drain(self.out), metadata=metadata_with_request_id())  # long-lived: no deadline
            reader: asyncio.Task[None] | None = None
            try:
                try:
                    first = await asyncio.wait_for(call.read(), RPC_DEADLINE)
                except grpc.aio.AioRpcError as e:
                    raise VcpuFailed(f"Run attach to L0 at {self.l0_address} failed: {e.code().name}: {e.details()}") from e
                except TimeoutError as e:
                    raise VcpuFailed(f"L0 at {self.l0_address} did not answer RunAttach within {RPC_DEADLINE}s") from e
                if not isinstance(first, l0_pb2.RunResponse) or first.WhichOneof("message") != "attached":
                    raise VcpuFailed(f"L0 answered RunAttach with {first!r}")
                self.vcpu.lpid = first.attached.shadow_lpid
                self._log = self._log.bind(shadow_lpid=self.vcpu.lpid)
                self._log.info("vcpu_attached", l0=self.l0_address)
                reader = asyncio.create_task(self._reader(call))
                vcpu = self.vcpu
                for addrs, kinds in generate(spec, vcpu_index):
                    send = vcpu.run_hits(addrs, kinds)
                    while send:
                        await self._round(send)
                        send = vcpu.next_round()
                    await asyncio.sleep(0)  # let the reader apply and ack pending tlbies
                    if self.failure is not None:
                        raise VcpuFailed(self.failure)
                # Detach: half-close, let L0 end the stream; acks are no longer possible.
                self.closing = True
                self.out.put_nowait(None)
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(reader), DETACH_TIMEOUT)
                self._log.info("vcpu_detached", **{k: v for k, v in self.stats.items() if k in ("accesses", "tlb_hits", "fills")})
            finally:
                self.closing = True
                self.out.put_nowait(None)
                if reader is not None:
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await reader
                call.cancel()

    async def _round(self, send: list[tuple[int, int]]) -> None:
        """Send one AccessBatch and wait until its results (and any tlbies) were applied."""
        if self.failure is not None:
            raise VcpuFailed(self.failure)
        self._batch_id += 1
        rid = new_request_id()
        batch = l0_pb2.AccessBatch(batch_id=self._batch_id, addresses=[a for a, _ in send], kinds=bytes(k for _, k in send))
        if _HAS_BATCH_REQUEST_ID:
            batch.request_id = rid  # type: ignore[attr-defined,unused-ignore]
        self._expected, self._received = len(send), 0
        self._done.clear()
        self._progress = time.monotonic()
        self.stats["batches_sent"] += 1
        self._log.debug("batch_sent", request_id=rid, batch_id=self._batch_id, accesses=len(send))
        self.out.put_nowait(l0_pb2.RunRequest(batch=batch))
        while not self._done.is_set():
            try:
                await asyncio.wait_for(self._done.wait(), 1.0)
            except TimeoutError:
                if time.monotonic() - self._progress > BATCH_PROGRESS_TIMEOUT:
                    self.failure = f"no results for batch {self._batch_id} for {BATCH_PROGRESS_TIMEOUT}s"
                    break
        if self.failure is not None:
            raise VcpuFailed(self.failure)

    # ------------------------------------------------------------------ reader side
    async def _reader(self, call: grpc.aio.StreamStreamCall[l0_pb2.RunRequest, l0_pb2.RunResponse]) -> None:
        try:
            while True:
                msg = await call.read()
                if not isinstance(msg, l0_pb2.RunResponse):  # grpc.aio.EOF
                    if not self.closing:
                        self.failure = "L0 ended the Run stream"
                    return
                which = msg.WhichOneof("message")
                if which == "results":
                    self._apply_results(msg.results)
                elif which == "invalidate":
                    self._apply_invalidations(msg.invalidate)
                elif which == "tlb_dump_request":
                    self._send_tlb_dump(msg.tlb_dump_request.id)
                else:
                    self.stats["unexpected_messages"] += 1
        except grpc.aio.AioRpcError as e:
            if not self.closing:
                self.failure = f"Run stream broke: {e.code().name}: {e.details()}"
        except Exception as e:
            self.failure = f"Run stream protocol error: {e!r}"
        finally:
            self._done.set()  # wake the workload loop, which checks self.failure

    def _apply_results(self, r: l0_pb2.AccessResults) -> None:
        if r.batch_id != self._batch_id or self._done.is_set():
            self.stats["stray_results"] += 1
            return
        if r.first_index != self._received:
            raise ValueError(f"batch {r.batch_id}: results start at {r.first_index}, expected {self._received}")
        vcpu = self.vcpu
        lpid = vcpu.lpid
        outcomes = r.outcomes
        pages, hosts, flags, dsisrs = r.page_addresses, r.host_addresses, r.flags, r.dsisrs
        for i, o in enumerate(outcomes):
            if o == _FILL:
                fl = flags[i]
                host = hosts[i]
                vcpu.apply(AccessResult(Outcome.FILL, Translation(lpid, pages[i], host, fl & l0_pb2.FILL_FLAG_PAGE_SHIFT_MASK, pte_from_flags(host, fl))))
            elif o == _SI:
                vcpu.apply(AccessResult(Outcome.STORAGE_INTERRUPT, dsisr=dsisrs[i] if i < len(dsisrs) else 0))
            else:
                vcpu.apply(_OTHER_OUTCOMES.get(o, _ERROR))
        self._received += len(outcomes)
        self._progress = time.monotonic()
        if r.batch_done:
            if self._received != self._expected:
                raise ValueError(f"batch {r.batch_id}: {self._received} results for {self._expected} accesses")
            self._done.set()

    def _apply_invalidations(self, b: l0_pb2.InvalidationBroadcast) -> None:
        ids = []
        for inv in b.invalidations:
            scope = SCOPE_FROM_PB.get(inv.scope, Scope.LPID)  # unspecified: drop the whole LPID (safe)
            self.vcpu.invalidate(Invalidation(inv.lpid, scope, inv.address, inv.size_bytes, inv.reason))
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
        entries = [l0_pb2.TlbDumpEntry(lpid=e.lpid, page_address=e.page, host_address=e.host, page_shift=e.shift, pte=e.pte) for e in self.vcpu.tlb.entries()]
        self.out.put_nowait(l0_pb2.RunRequest(tlb_dump=l0_pb2.TlbDump(id=dump_id, entries=entries)))
        self.stats["tlb_dumps_sent"] += 1


async def attach(l1_address: str, lpid: int, vcpu_id: int) -> l1_pb2.AttachVcpuResponse:
    """AttachVcpu through L1 (H_ENTER_NESTED); VcpuFailed if L1 is unreachable or refuses."""
    async with insecure_channel(l1_address) as channel:
        try:
            resp: l1_pb2.AttachVcpuResponse = await l1_pb2_grpc.L1ServiceStub(channel).AttachVcpu(
                l1_pb2.AttachVcpuRequest(lpid=lpid, vcpu_id=vcpu_id), timeout=RPC_DEADLINE, metadata=metadata_with_request_id()
            )
        except grpc.aio.AioRpcError as e:
            raise VcpuFailed(f"AttachVcpu via L1 at {l1_address} failed: {e.code().name}: {e.details()}") from e
    if resp.hcall_rc != f.H.SUCCESS:
        name = f.H(resp.hcall_rc).name if resp.hcall_rc in f.H._value2member_map_ else str(resp.hcall_rc)
        raise VcpuFailed(f"H_ENTER_NESTED for lpid {lpid} vCPU {vcpu_id} returned H_{name} ({resp.hcall_rc})")
    return resp


async def run_vcpu(
    l1_address: str,
    lpid: int,
    vcpu_id: int,
    spec: WorkloadSpec,
    vcpu_index: int,
    *,
    live: dict[int, LiveVcpu] | None = None,
    details: list[str] | None = None,
    attach_lock: asyncio.Lock | None = None,
    on_l0: Callable[[str], None] | None = None,
) -> Counter[str]:
    """Attach vCPU ``vcpu_id`` of L1 guest ``lpid`` and run ``generate(spec, vcpu_index)`` on it.

    Returns the vCPU's counters plus ``"seconds"`` (wall clock, a float). A vCPU that cannot
    attach or whose Run stream breaks does not raise: it counts ``errors`` (and
    ``vcpu_failures``) and appends a one-line description to ``details``. ``live`` (if given)
    holds the vCPU while it runs, for TLB dumps. ``attach_lock`` (if given) serialises the
    attach step of the vCPUs sharing it: the first H_ENTER_NESTED of a guest creates the nested
    guest in L0, and a concurrent first entry loses that race with H_PARAMETER, as in KVM.
    """
    t0 = time.perf_counter()
    stats: Counter[str] = Counter()
    key = next(_ids)
    rid = new_request_id()
    vlog = log.bind(vcpu_id=vcpu_id, l1_lpid=lpid, request_id=rid)
    try:
        if attach_lock is not None:
            async with attach_lock:
                resp = await attach(l1_address, lpid, vcpu_id)
        else:
            resp = await attach(l1_address, lpid, vcpu_id)
        if on_l0 is not None:  # the L2's health watches the L0s its vCPUs run on
            on_l0(resp.l0_address)
        rs = RunStream(vcpu_id, lpid, resp.l0_address, resp.run_token)
        stats = rs.stats
        if live is not None:
            live[key] = LiveVcpu(vcpu_id, lpid, rs.vcpu)
        await rs.run(spec, vcpu_index)
    except VcpuFailed as e:
        stats["errors"] += 1
        stats["vcpu_failures"] += 1
        stats["accesses_not_run"] += max(0, spec.accesses - stats["accesses"])
        vlog.warning("vcpu_failed", error=str(e))
        if details is not None:
            details.append(f"lpid {lpid} vCPU {vcpu_id}: {e}")
    finally:
        if live is not None:
            live.pop(key, None)
    stats["seconds"] = time.perf_counter() - t0  # type: ignore[assignment]
    return stats


__all__ = ["LiveVcpu", "RunStream", "VcpuFailed", "attach", "pte_from_flags", "run_vcpu"]

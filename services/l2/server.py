"""The L2 service: runs seeded workloads on L2 vCPUs (see :mod:`.runner`) and reports.

RunWorkload attaches ``vcpus`` vCPUs of one guest through its L1 (creating the guest first
when the request names lpid 0), runs them concurrently as asyncio tasks in this process and
returns one WorkloadReport that sums their counters. A vCPU that fails (attach refused, Run
stream broken) is reported in the report (``errors`` and ``error_details``), not as a gRPC
error: only malformed requests and an unreachable L1 are.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from nestmmu.core import formats as f
from nestmmu.core.l1 import GUEST_PAGE_SHIFTS
from nestmmu.core.l2 import L2Error
from nestmmu.core.workload import WorkloadSpec
from nestmmu.limits import MAX_TOTAL_ACCESSES, MAX_TRACE_BYTES, MAX_VCPUS
from nestmmu.protos import L2_SERVICE_NAME, common_pb2, l1_pb2, l1_pb2_grpc, l2_pb2, l2_pb2_grpc

from ..common import RPC_DEADLINE, abort_invalid, metadata_with_request_id, serve_forever
from ..connection import Health, insecure_channel
from .guestos import KERNEL_RESERVED, GuestOs, kernel_memory
from .health import L0Watch
from .runner import GIL_SWITCH_INTERVAL_S, LiveVcpu
from .vcpu import run_vcpu

if TYPE_CHECKING:
    Ctx = grpc.aio.ServicerContext[Any, Any]

log = structlog.get_logger("l2")

DEFAULT_GUEST_PAGE_SHIFT = 16
#: Data mode: vCPUs per guest (one 8-byte word of each 64-byte line each), details reported.
DATA_SLOTS = 8
DATA_DETAILS_MAX = 16
#: Report fields filled from the vCPU counters of the same name.
_REPORT_FIELDS = (
    "accesses",
    "tlb_hits",
    "misses_sent",
    "fills",
    "storage_interrupts",
    "errors",
    "invalidations_applied",
    "acks_sent",
    "guest_faults",
    "guest_faults_handled",
    "segfaults",
    "kernel_stores",
    "process_tlbies",
)
#: Counters of virtual mode kept in the report's extra map only: munmaps, l2_rpt_invalidates.


def spec_from_proto(w: l2_pb2.Workload) -> WorkloadSpec:
    """Workload -> WorkloadSpec; empty/zero pattern, accesses, footprint_bytes, batch_size mean the
    defaults, as do unset tlb_entries/tlb_ways (set to 0, tlb_entries means unbounded)."""
    d = WorkloadSpec()
    return WorkloadSpec(
        pattern=w.pattern or d.pattern,
        accesses=w.accesses or d.accesses,
        seed=w.seed,
        footprint=w.footprint_bytes or d.footprint,
        store_fraction=w.store_fraction,
        ifetch_fraction=w.ifetch_fraction,
        batch_size=w.batch_size or d.batch_size,
        trace_path=w.trace_path,
        data=w.data,
        data_fresh=w.data_fresh,
        hcall_every=w.hcall_every,
        virtual=w.virtual_mode,
        pid=w.pid or d.pid,
        unmap_every=w.unmap_every,
        tlb_entries=w.tlb_entries if w.HasField("tlb_entries") else d.tlb_entries,
        tlb_ways=w.tlb_ways if w.HasField("tlb_ways") else d.tlb_ways,
    )


def fill_data_report(rep: l2_pb2.WorkloadReport, total: Counter[str], details: list[str]) -> None:
    """Data mode: the checker's counts and the first lost or misplaced writes."""
    rep.data_stores = int(total["data_stores"])
    rep.data_loads_checked = int(total["data_loads_checked"])
    rep.lost_writes = int(total["lost_writes"])
    rep.misplaced_writes = int(total["misplaced_writes"])
    rep.lost_write_details.extend(details[:DATA_DETAILS_MAX])


def field_of_spec_error(msg: str) -> str:
    """The Workload field a WorkloadSpec.validate() message is about."""
    if "trace_path" in msg:
        return "workload.trace_path"
    if msg.startswith("pid"):
        return "workload.pid"
    if msg.startswith("unmap_every"):
        return "workload.unmap_every"
    if msg.startswith("virtual mode"):
        return "workload.virtual_mode"
    if msg.startswith("TLB ways"):
        return "workload.tlb_ways"
    if msg.startswith("TLB"):
        return "workload.tlb_entries"
    for word, fld in (
        ("pattern", "pattern"),
        ("accesses", "accesses"),
        ("footprint", "footprint_bytes"),
        ("store_fraction", "store_fraction"),
        ("ifetch_fraction", "ifetch_fraction"),
        ("batch_size", "batch_size"),
    ):
        if msg.startswith(word):
            return f"workload.{fld}"
    return "workload"


def report_from_counters(total: Counter[str], seconds: float, lpid: int, vcpus: int, details: list[str]) -> l2_pb2.WorkloadReport:
    rep = l2_pb2.WorkloadReport(seconds=seconds, lpid=lpid, vcpus=vcpus, error_details=details)
    for name in _REPORT_FIELDS:
        setattr(rep, name, int(total[name]))
    rep.mmio = int(total["mmio_emulated"] + total["l1_emulated"])
    for k, v in sorted(total.items()):
        if k != "seconds":
            rep.extra[k] = int(v)
    return rep


def translation_of(page: int, host: int, shift: int, pte: int, pid: int = -1, real_page: int = -1) -> common_pb2.Translation:
    return common_pb2.Translation(
        pid=pid,
        real_page_address=max(real_page, 0),
        page_address=page,
        host_address=host,
        page_shift=shift,
        read=bool(pte & (f.PTE_EAA_READ | f.PTE_EAA_RW)),
        write=bool(pte & f.PTE_EAA_RW),
        execute=bool(pte & f.PTE_EAA_EXEC),
        referenced=bool(pte & f.PTE_R),
        changed=bool(pte & f.PTE_C),
    )


class L2Servicer(l2_pb2_grpc.L2ServiceServicer):
    """L2Service: workloads on vCPUs of nested guests, their reports and TLBs."""

    def __init__(self, l0_watch: L0Watch | None = None) -> None:
        self.l0_watch = l0_watch
        self.reports: list[l2_pb2.WorkloadReport] = []
        self.live: dict[int, LiveVcpu] = {}
        self._tasks: set[asyncio.Task[Counter[str]]] = set()
        self._attach_locks: dict[tuple[str, int], asyncio.Lock] = {}
        #: The L2 kernel of each guest that ran a virtual-mode workload, by (L1 address, lpid).
        self.guest_os: dict[tuple[str, int], GuestOs] = {}

    async def stop(self) -> None:
        if self.l0_watch is not None:
            await self.l0_watch.stop()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _create_guest(self, context: Ctx, l1_address: str, page_shift: int, memory: int, data: bool = False) -> tuple[int, int]:
        async with insecure_channel(l1_address) as channel:
            try:
                resp = await l1_pb2_grpc.L1ServiceStub(channel).CreateGuest(
                    l1_pb2.CreateGuestRequest(page_shift=page_shift, memory_bytes=memory, data=data), timeout=RPC_DEADLINE, metadata=metadata_with_request_id()
                )
            except grpc.aio.AioRpcError as e:
                code = e.code() if e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE) else grpc.StatusCode.UNAVAILABLE
                await context.abort(code, f"CreateGuest via L1 at {l1_address} failed: {e.code().name}: {e.details()}")
        return resp.lpid, resp.hcall_rc

    async def _guest_os(self, context: Ctx, l1_address: str, lpid: int, memory: int | None, use_rpt_invalidate: bool = False) -> GuestOs:
        """The guest's L2 kernel, created on its first virtual-mode workload.  ``memory``: the
        guest's size when RunWorkload just created it (plain RAM; an older kernel under the same
        lpid belonged to a destroyed guest); else L1 describes the guest, and a kernel this
        service booted is kept only while the guest's PATE still holds its process table (L1
        reuses the lpids of destroyed guests)."""
        key = (l1_address, lpid)
        if memory is None:
            async with insecure_channel(l1_address) as channel:
                try:
                    g = await l1_pb2_grpc.L1ServiceStub(channel).GetGuest(
                        l1_pb2.GetGuestRequest(lpid=lpid), timeout=RPC_DEADLINE, metadata=metadata_with_request_id()
                    )
                except grpc.aio.AioRpcError as e:
                    code = grpc.StatusCode.NOT_FOUND if e.code() == grpc.StatusCode.NOT_FOUND else grpc.StatusCode.UNAVAILABLE
                    await context.abort(code, f"GetGuest via L1 at {l1_address} failed: {e.code().name}: {e.details()}")
            if not g.guest.data:
                await abort_invalid(
                    context, "lpid", f"guest {lpid} is not a data guest: virtual mode keeps page tables in guest memory (create it with data, or use lpid 0)"
                )
            got = self.guest_os.get(key)
            if got is not None and (not got.registered or g.guest.pate_dw1 == got.kernel.proc_tbl_dw1() | f.PATE_GR):
                return got  # still this guest (or still booting)
            if f.pate_prtb(g.guest.pate_dw1):
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"guest {lpid} already has a process table that no L2 kernel of this service registered (the L2 service restarted?): "
                    "run virtual mode on a new guest (lpid 0)",
                )
            memory = kernel_memory(g.guest.memory_bytes, [r.n_gpa for r in g.guest.regions])
        try:
            gos = GuestOs(l1_address, lpid, memory, use_rpt_invalidate)
        except L2Error as e:
            await abort_invalid(context, "lpid", f"guest {lpid} cannot run the L2 kernel of virtual mode: {e}")
            raise AssertionError("unreachable") from e  # pragma: no cover
        self.guest_os[(l1_address, lpid)] = gos
        return gos

    async def RunWorkload(self, request: l2_pb2.RunWorkloadRequest, context: Ctx) -> l2_pb2.RunWorkloadResponse:
        if not request.l1_address:
            await abort_invalid(context, "l1_address", "the L1 service address (host:port) is required")
        if not 1 <= request.vcpus <= MAX_VCPUS:
            await abort_invalid(context, "vcpus", f"must be in 1..{MAX_VCPUS} (MAX_VCPUS), not {request.vcpus}")
        page_shift = request.page_shift or DEFAULT_GUEST_PAGE_SHIFT
        if page_shift not in GUEST_PAGE_SHIFTS:
            await abort_invalid(context, "page_shift", f"must be one of {GUEST_PAGE_SHIFTS} (0 = {DEFAULT_GUEST_PAGE_SHIFT})")
        spec = spec_from_proto(request.workload) if request.HasField("workload") else WorkloadSpec()
        try:
            spec.validate()
        except ValueError as e:
            await abort_invalid(context, field_of_spec_error(str(e)), str(e))
        if spec.data and request.vcpus > DATA_SLOTS:
            await abort_invalid(context, "vcpus", f"data mode runs at most {DATA_SLOTS} vCPUs per guest (each owns one 8-byte word of every 64-byte line)")
        if spec.pattern == "trace" and not os.path.isfile(spec.trace_path):
            await abort_invalid(context, "workload.trace_path", f"no such file in the L2 service: {spec.trace_path}")
        if spec.pattern == "trace" and os.path.getsize(spec.trace_path) > MAX_TRACE_BYTES:
            await abort_invalid(
                context, "workload.trace_path", f"the trace is {os.path.getsize(spec.trace_path)} bytes; at most {MAX_TRACE_BYTES} (MAX_TRACE_BYTES)"
            )
        if spec.accesses * request.vcpus > MAX_TOTAL_ACCESSES:
            await abort_invalid(
                context,
                "workload.accesses",
                f"{request.vcpus} vCPUs x {spec.accesses} accesses is above {MAX_TOTAL_ACCESSES} (MAX_TOTAL_ACCESSES) accesses per RunWorkload",
            )
        details: list[str] = []
        data_details: list[str] = []
        segv_details: list[str] = []
        lpid = request.lpid
        created: int | None = None
        if lpid == 0:
            page = 1 << page_shift
            if spec.virtual:
                # The kernel's table region, then footprint bytes of pages it demand-maps (a
                # data guest: its page tables are memory contents L1 must keep).
                unit = max(page, 1 << 16)
                memory = (KERNEL_RESERVED + (spec.footprint + unit - 1) // unit * unit + page - 1) // page * page
            else:
                memory = (spec.base + spec.footprint + page - 1) // page * page
            lpid, rc = await self._create_guest(context, request.l1_address, page_shift, memory, spec.data or spec.virtual)
            created = memory
            spec = dataclasses.replace(spec, data_fresh=spec.data)
            if rc != f.H.SUCCESS:
                details.append(f"CreateGuest: the flush hcall returned {rc}")
        guest = await self._guest_os(context, request.l1_address, lpid, created, request.workload.l2_rpt_invalidate) if spec.virtual else None
        log.info(
            "workload_started",
            l1=request.l1_address,
            lpid=lpid,
            vcpus=request.vcpus,
            pattern=spec.pattern,
            accesses=spec.accesses,
            seed=spec.seed,
            virtual=spec.virtual,
            pid=spec.pid if spec.virtual else -1,
        )
        t0 = time.perf_counter()
        # vCPUs of one guest attach one at a time (see run_vcpu), then run concurrently.
        attach_lock = self._attach_locks.setdefault((request.l1_address, lpid), asyncio.Lock())
        tasks = [
            asyncio.create_task(
                run_vcpu(
                    request.l1_address,
                    lpid,
                    i,
                    spec,
                    i,
                    live=self.live,
                    details=details,
                    attach_lock=attach_lock,
                    data_details=data_details,
                    on_l0=self.l0_watch.add if self.l0_watch is not None else None,
                    guest=guest,
                    segfault_details=segv_details,
                ),
                name=f"vcpu-{lpid}-{i}",
            )
            for i in range(request.vcpus)
        ]
        self._tasks.update(tasks)
        try:
            results = await asyncio.gather(*tasks)
        finally:
            self._tasks.difference_update(tasks)
            for t in tasks:
                t.cancel()
        total: Counter[str] = Counter()
        for c in results:
            total.update({k: v for k, v in c.items() if k != "seconds"})
        rep = report_from_counters(total, time.perf_counter() - t0, lpid, request.vcpus, details)
        if spec.data:
            fill_data_report(rep, total, data_details)
        rep.segfault_details.extend(segv_details[:DATA_DETAILS_MAX])
        self.reports.append(rep)
        log.info(
            "workload_done",
            lpid=lpid,
            seconds=round(rep.seconds, 3),
            accesses=rep.accesses,
            tlb_hits=rep.tlb_hits,
            fills=rep.fills,
            errors=rep.errors,
            invalidations=rep.invalidations_applied,
        )
        return l2_pb2.RunWorkloadResponse(report=rep)

    async def GetReport(self, request: l2_pb2.GetReportRequest, context: Ctx) -> l2_pb2.GetReportResponse:
        return l2_pb2.GetReportResponse(reports=self.reports)

    async def DumpTlb(self, request: l2_pb2.DumpTlbRequest, context: Ctx) -> l2_pb2.DumpTlbResponse:
        entries = [
            l2_pb2.TlbEntry(vcpu_id=lv.vcpu_id, lpid=e.lpid, translation=translation_of(e.page, e.host, e.shift, e.pte, e.pid, e.real_page))
            for lv in list(self.live.values())
            for e in _entries(lv)
        ]
        return l2_pb2.DumpTlbResponse(entries=entries)


def _entries(lv: LiveVcpu) -> list[Any]:
    with lv.lock:  # the vCPU's Run-stream thread may be changing its TLB
        return lv.vcpu.tlb.entries()


def add_to_server(server: grpc.aio.Server, servicer: L2Servicer) -> Iterable[str]:
    l2_pb2_grpc.add_L2ServiceServicer_to_server(servicer, server)
    return [L2_SERVICE_NAME]


async def serve(port: int, host: str = "0.0.0.0", ready: asyncio.Event | None = None, l0: str | None = None) -> None:
    """Serve L2Service on host:port until SIGTERM/SIGINT (``ready`` is set once listening).

    Health: with ``l0`` the L2 watches that L0's health (grpc.health.v1 Watch) and is
    NOT_SERVING while L0 is not SERVING; without it, it watches every L0 its vCPUs were sent
    to and is NOT_SERVING while none of them is SERVING (SERVING before any vCPU ran).
    """
    health_state = Health(serving=l0 is None)
    watch = L0Watch(health_state.set)
    servicer = L2Servicer(watch)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # Run-stream threads ack tlbies while workloads run
    if l0:
        watch.add(l0)
    await serve_forever("l2", port, lambda server: add_to_server(server, servicer), on_stop=servicer.stop, host=host, ready=ready, health_state=health_state)

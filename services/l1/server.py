"""The L1 guest hypervisor as a gRPC server: a thin adapter over :class:`nestmmu.core.l1.L1Hypervisor`.

Every mutating RPC runs the core operation under one asyncio lock (the core call only), then
issues the hcalls the core returned to L0, in order and without the lock, and answers with the
first non-zero H_* code (architectural failures are data, not gRPC errors). RPCs that need L0
answer UNAVAILABLE while L1 is not registered with it; see :mod:`.session` for the L0 side.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import structlog

from nestmmu.core import formats as f
from nestmmu.core.l0 import ConfigError
from nestmmu.core.l1 import GUEST_PAGE_SHIFTS, PERM_RWX, GuestRegion, Hcall, L1Hypervisor, L2Guest, default_memslots
from nestmmu.limits import MAX_GUEST_REGIONS, MAX_TREE_OP_PAGES
from nestmmu.protos import L1_SERVICE_NAME, common_pb2, l1_pb2, l1_pb2_grpc

from ..common import abort_invalid, serve_forever
from ..connection import Health
from .session import L0Session, L0Unavailable, issue_in_order, walk_to_proto
from .treeops import GuestGone, MakeChunks, TreeOps

if TYPE_CHECKING:
    Ctx = grpc.aio.ServicerContext[Any, Any]

log = structlog.get_logger("l1")

_KIND_TO_CORE = {
    l1_pb2.GUEST_REGION_KIND_READ_ONLY_L1_SLOT: "rom",
    l1_pb2.GUEST_REGION_KIND_MMIO_HOLE: "mmio",
    l1_pb2.GUEST_REGION_KIND_PROTECTED: "protect",
}
_KIND_TO_PROTO = {v: k for k, v in _KIND_TO_CORE.items()}
DEFAULT_GUEST_PAGE_SHIFT = 16


def perms_of(read: bool, write: bool, execute: bool) -> int:
    return (f.PTE_EAA_READ if read else 0) | (f.PTE_EAA_RW if write else 0) | (f.PTE_EAA_EXEC if execute else 0)


def region_to_proto(r: GuestRegion) -> l1_pb2.GuestRegion:
    return l1_pb2.GuestRegion(
        n_gpa=r.start,
        size_bytes=r.size,
        kind=_KIND_TO_PROTO.get(r.kind, l1_pb2.GUEST_REGION_KIND_UNSPECIFIED),
        read=bool(r.perms & (f.PTE_EAA_READ | f.PTE_EAA_RW)),
        write=bool(r.perms & f.PTE_EAA_RW),
        execute=bool(r.perms & f.PTE_EAA_EXEC),
    )


def guest_info(g: L2Guest, pate_dw1: int = 0) -> l1_pb2.GuestInfo:
    return l1_pb2.GuestInfo(
        pate_dw1=pate_dw1,
        data=g.data,
        lpid=g.lpid,
        page_shift=g.page_shift,
        memory_bytes=g.memory,
        mapped_pages=len(g.backing),  # one backing page per leaf: O(1), not a walk of up to millions of leaves
        pate_dw0=g.pate_dw0(),
        regions=[region_to_proto(r) for r in g.regions],
    )


def _field_of_config_error(msg: str) -> str:
    """Which CreateGuest field a core ConfigError message is about."""
    low = msg.lower()
    if "page_shift" in low or ("page size" in low and "region" not in low):
        return "page_shift"
    if "region" in low:
        return "regions"
    if "lpid" in low:
        return "lpid"
    if "memory" in low:
        return "memory_bytes"
    return "lpid"


def _pate_dw1(core: L1Hypervisor, lpid: int) -> int:
    """PATE dw1 of guest ``lpid`` as it stands in L1's partition table (in L1 memory)."""
    return core.mem.read_u64(core.partition_table + lpid * f.PATE_SIZE + 8)


class L1Servicer(l1_pb2_grpc.L1ServiceServicer):
    """L1Service over one core L1Hypervisor and its session with L0."""

    def __init__(
        self,
        name: str,
        l0_address: str,
        advertise_l0: str | None = None,
        use_rpt_invalidate: bool = True,
        forget_flush: bool = False,
        hdec_every: int = 0,
    ) -> None:
        self.name = name
        self.l0_address = l0_address
        self.advertise_l0 = advertise_l0 or l0_address
        self.session = L0Session(name, l0_address, default_memslots(), use_rpt_invalidate, forget_flush=forget_flush, hdec_every=hdec_every)
        self.tree_ops = TreeOps()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.session.start()

    async def stop(self) -> None:
        await self.session.stop()

    @property
    def lock(self) -> asyncio.Lock:
        return self.session.lock

    # ------------------------------------------------------------------ helpers
    async def _core(self, context: Ctx, need_l0: bool = True) -> L1Hypervisor:
        core = self.session.core
        if core is None or (need_l0 and not self.session.connected):
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"L1 {self.name!r} is not connected to L0 at {self.l0_address}")
        assert core is not None
        return core

    async def _guest(self, context: Ctx, core: L1Hypervisor, lpid: int) -> L2Guest:
        g = core.guests.get(lpid)
        if g is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"L1 {self.name!r} has no L2 guest with lpid {lpid}")
        assert g is not None
        return g

    async def _unavailable(self, context: Ctx, e: Exception) -> NoReturn:
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _issue(self, context: Ctx, hcalls: list[Hcall]) -> int:
        """Issue hcalls in order; the first non-zero H_* code, else H_SUCCESS."""
        try:
            return await issue_in_order(hcalls, self.session.hcall)
        except L0Unavailable as e:
            await self._unavailable(context, e)

    async def _check_range(self, context: Ctx, g: L2Guest, n_gpa: int, length: int) -> None:
        if length == 0:
            await abort_invalid(context, "length", "must be positive")
        if n_gpa >= g.memory:
            await abort_invalid(context, "n_gpa", f"{n_gpa:#x} is outside the guest's {g.memory:#x} bytes")
        if n_gpa + length > g.memory:
            await abort_invalid(context, "length", f"{n_gpa:#x}+{length:#x} ends beyond the guest's {g.memory:#x} bytes")
        pages = ((n_gpa + length - 1) >> g.page_shift) - (n_gpa >> g.page_shift) + 1
        if pages > MAX_TREE_OP_PAGES:
            await abort_invalid(
                context,
                "length",
                f"{length:#x} bytes at {n_gpa:#x} is {pages} pages of {g.page_size:#x}; at most {MAX_TREE_OP_PAGES} (MAX_TREE_OP_PAGES) per call",
            )

    # ------------------------------------------------------------------ guests
    async def CreateGuest(self, request: l1_pb2.CreateGuestRequest, context: Ctx) -> l1_pb2.CreateGuestResponse:
        core = await self._core(context)
        page_shift = request.page_shift or DEFAULT_GUEST_PAGE_SHIFT
        if page_shift not in GUEST_PAGE_SHIFTS:
            await abort_invalid(context, "page_shift", f"must be one of {GUEST_PAGE_SHIFTS} (0 = {DEFAULT_GUEST_PAGE_SHIFT}), not {page_shift}")
        page = 1 << page_shift
        if request.memory_bytes == 0 or request.memory_bytes % page:
            await abort_invalid(context, "memory_bytes", f"must be a positive multiple of the page size {page:#x}")
        if len(request.regions) > MAX_GUEST_REGIONS:
            await abort_invalid(context, "regions", f"{len(request.regions)} regions; at most {MAX_GUEST_REGIONS} (MAX_GUEST_REGIONS)")
        regions: list[GuestRegion] = []
        for i, r in enumerate(request.regions):
            kind = _KIND_TO_CORE.get(r.kind)
            if kind is None:
                await abort_invalid(context, f"regions[{i}].kind", "must be READ_ONLY_L1_SLOT, MMIO_HOLE or PROTECTED")
                raise AssertionError("unreachable")  # pragma: no cover
            if r.size_bytes == 0 or r.n_gpa % page or r.size_bytes % page:
                await abort_invalid(context, f"regions[{i}]", f"n_gpa and size_bytes must be positive multiples of the page size {page:#x}")
            if r.n_gpa + r.size_bytes > request.memory_bytes:
                await abort_invalid(context, f"regions[{i}].size_bytes", "the region ends beyond memory_bytes")
            perms = perms_of(r.read, r.write, r.execute)
            if kind != "protect" and not perms:
                perms = PERM_RWX  # ROM / MMIO without explicit permissions: map RWX (L0 decides)
            regions.append(GuestRegion(kind, r.n_gpa, r.size_bytes, perms))
        try:
            async with self.lock:
                guest, hcalls = core.create_guest(request.lpid, page_shift, request.memory_bytes, regions, data=request.data)
                self.session.begin_tree_change(guest.lpid, hcalls)
        except ConfigError as e:
            await abort_invalid(context, _field_of_config_error(str(e)), str(e))
            raise AssertionError("unreachable") from e  # pragma: no cover
        try:
            rc = await self._issue(context, hcalls)
        finally:
            self.session.end_tree_change(guest.lpid, hcalls)
        log.info("guest_created", lpid=guest.lpid, page_shift=page_shift, memory_bytes=request.memory_bytes, regions=len(regions), hcall_rc=rc)
        return l1_pb2.CreateGuestResponse(lpid=guest.lpid, hcall_rc=rc)

    async def AttachVcpu(self, request: l1_pb2.AttachVcpuRequest, context: Ctx) -> l1_pb2.AttachVcpuResponse:
        core = await self._core(context)
        await self._guest(context, core, request.lpid)
        try:
            resp = await self.session.enter_nested(request.lpid, request.vcpu_id)
        except L0Unavailable as e:
            await self._unavailable(context, e)
        log.info("vcpu_entered", lpid=request.lpid, vcpu_id=request.vcpu_id, hcall_rc=resp.hcall_rc, shadow_lpid=resp.shadow_lpid)
        return l1_pb2.AttachVcpuResponse(
            hcall_rc=resp.hcall_rc, run_token=resp.run_token, l0_address=self.advertise_l0, shadow_lpid=resp.shadow_lpid, hdec_every=core.hdec_every
        )

    async def _tree_op(self, context: Ctx, lpid: int, n_gpa: int, length: int, make: MakeChunks) -> tuple[int, int]:
        """One L2-tree change: validate (limits included), then change the tree in L1 memory
        and issue the invalidation hcalls it needs, slice by slice (see :mod:`.treeops`).
        Returns (first non-zero hcall rc, pages changed)."""
        core = await self._core(context)
        g = await self._guest(context, core, lpid)
        await self._check_range(context, g, n_gpa, length)
        first, last = n_gpa >> g.page_shift, (n_gpa + length - 1) >> g.page_shift
        try:
            return await self.tree_ops.run(core, self.lock, self.session.hcall, lpid, first, last, make, self.session.tree_change_marks(lpid))
        except L0Unavailable as e:
            await self._unavailable(context, e)
        except GuestGone:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"L1 {self.name!r} has no L2 guest with lpid {lpid}")
        except ConfigError as e:
            await abort_invalid(context, "length", str(e))
        raise AssertionError("unreachable")  # pragma: no cover

    async def MapPages(self, request: l1_pb2.MapPagesRequest, context: Ctx) -> l1_pb2.MapPagesResponse:
        r = request
        perms = perms_of(r.read, r.write, r.execute)
        rc, n = await self._tree_op(context, r.lpid, r.n_gpa, r.length, lambda core, k: core.map_pages_chunks(r.lpid, r.n_gpa, r.length, perms, k))
        return l1_pb2.MapPagesResponse(hcall_rc=rc, pages_changed=n)

    async def UnmapPages(self, request: l1_pb2.UnmapPagesRequest, context: Ctx) -> l1_pb2.UnmapPagesResponse:
        r = request
        rc, n = await self._tree_op(context, r.lpid, r.n_gpa, r.length, lambda core, k: core.unmap_pages_chunks(r.lpid, r.n_gpa, r.length, k))
        return l1_pb2.UnmapPagesResponse(hcall_rc=rc, pages_changed=n)

    async def ProtectPages(self, request: l1_pb2.ProtectPagesRequest, context: Ctx) -> l1_pb2.ProtectPagesResponse:
        r = request
        perms = perms_of(r.read, r.write, r.execute)
        rc, n = await self._tree_op(context, r.lpid, r.n_gpa, r.length, lambda core, k: core.protect_pages_chunks(r.lpid, r.n_gpa, r.length, perms, k))
        return l1_pb2.ProtectPagesResponse(hcall_rc=rc, pages_changed=n)

    async def RemapPages(self, request: l1_pb2.RemapPagesRequest, context: Ctx) -> l1_pb2.RemapPagesResponse:
        r = request
        rc, n = await self._tree_op(context, r.lpid, r.n_gpa, r.length, lambda core, k: core.remap_pages_chunks(r.lpid, r.n_gpa, r.length, k))
        return l1_pb2.RemapPagesResponse(hcall_rc=rc, pages_changed=n)

    async def DestroyGuest(self, request: l1_pb2.DestroyGuestRequest, context: Ctx) -> l1_pb2.DestroyGuestResponse:
        core = await self._core(context)
        g = await self._guest(context, core, request.lpid)
        async with self.lock:
            pages = len(g.backing)
            hcalls = core.destroy_guest(request.lpid)
            self.session.begin_tree_change(request.lpid, hcalls)
        try:
            rc = await self._issue(context, hcalls)
        finally:
            self.session.end_tree_change(request.lpid, hcalls)
        log.info("guest_destroyed", lpid=request.lpid, pages=pages, hcall_rc=rc)
        return l1_pb2.DestroyGuestResponse(hcall_rc=rc, pages_changed=pages)

    async def RegisterProcTbl(self, request: l1_pb2.RegisterProcTblRequest, context: Ctx) -> l1_pb2.RegisterProcTblResponse:
        """H_REGISTER_PROC_TBL from the L2 kernel of guest ``lpid``: the core writes PATE dw1
        and returns the LPID flush Linux-as-L1 issues after a PATE change; issued like any
        other tree change (the audit does not judge the guest while it is in flight)."""
        core = await self._core(context)
        await self._guest(context, core, request.lpid)
        try:
            async with self.lock:
                hcalls = core.h_register_proc_tbl(request.lpid, request.proc_tbl_dw1)
                self.session.begin_tree_change(request.lpid, hcalls)
        except ConfigError as e:  # a process table the hypervisor refuses: the hcall fails
            log.info("register_proc_tbl_refused", lpid=request.lpid, dw1=hex(request.proc_tbl_dw1), reason=str(e))
            return l1_pb2.RegisterProcTblResponse(hcall_rc=f.H.PARAMETER)
        try:
            rc = await self._issue(context, hcalls)
        finally:
            self.session.end_tree_change(request.lpid, hcalls)
        log.info("proc_tbl_registered", lpid=request.lpid, dw1=hex(request.proc_tbl_dw1), hcall_rc=rc)
        return l1_pb2.RegisterProcTblResponse(hcall_rc=rc)

    # ------------------------------------------------------------------ inspection
    async def GetGuest(self, request: l1_pb2.GetGuestRequest, context: Ctx) -> l1_pb2.GetGuestResponse:
        core = await self._core(context, need_l0=False)
        g = await self._guest(context, core, request.lpid)
        return l1_pb2.GetGuestResponse(guest=guest_info(g, _pate_dw1(core, g.lpid)))

    async def ListGuests(self, request: l1_pb2.ListGuestsRequest, context: Ctx) -> l1_pb2.ListGuestsResponse:
        core = await self._core(context, need_l0=False)
        return l1_pb2.ListGuestsResponse(guests=[guest_info(core.guests[k], _pate_dw1(core, k)) for k in sorted(core.guests)])

    async def WalkTree(self, request: l1_pb2.WalkTreeRequest, context: Ctx) -> l1_pb2.WalkTreeResponse:
        core = await self._core(context, need_l0=False)
        g = await self._guest(context, core, request.lpid)
        if request.n_gpa >= g.memory:
            await abort_invalid(context, "n_gpa", f"{request.n_gpa:#x} is outside the guest's {g.memory:#x} bytes")
        return l1_pb2.WalkTreeResponse(result=walk_to_proto(core.walk(g.pate_dw0(), request.n_gpa)))

    async def GetStats(self, request: l1_pb2.GetStatsRequest, context: Ctx) -> l1_pb2.GetStatsResponse:
        values: dict[str, int] = {f"session.{k}": v for k, v in self.session.stats.items()}
        values["connected"] = int(self.session.connected)
        core = self.session.core
        if core is not None:
            values.update({f"l1.{k}": v for k, v in core.stats.items()})
            values["guests"] = len(core.guests)
            values["exits_handled"] = core.exits_handled
        return l1_pb2.GetStatsResponse(counters=common_pb2.Counters(values=values))


def add_to_server(server: grpc.aio.Server, servicer: L1Servicer) -> Iterable[str]:
    l1_pb2_grpc.add_L1ServiceServicer_to_server(servicer, server)
    return [L1_SERVICE_NAME]


async def serve(
    port: int,
    name: str,
    l0_address: str,
    host: str = "0.0.0.0",
    advertise_l0: str | None = None,
    use_rpt_invalidate: bool = True,
    ready: asyncio.Event | None = None,
    forget_flush: bool = False,
    hdec_every: int = 0,
) -> None:
    """Serve L1Service on host:port until SIGTERM/SIGINT, registered with L0 at l0_address.

    ``ready`` is set once the server listens *and* the L1 has registered with L0 for the first
    time (it keeps reconnecting with backoff until L0 is up). ``advertise_l0`` is the L0
    address handed to L2 vCPUs in AttachVcpu (default: l0_address).  ``forget_flush``: the
    L1 skips the invalidation after changing a leaf (teaching failure mode §9.17);
    ``hdec_every``: the HDEC it programs, in accesses of each L2 vCPU (0 = never).
    """
    servicer = L1Servicer(name, l0_address, advertise_l0, use_rpt_invalidate, forget_flush, hdec_every)
    serving = asyncio.Event()
    # NOT_SERVING whenever there is no session with L0 (every CreateGuest would fail).
    health_state = Health(serving=False)
    servicer.session.on_connected = health_state.set
    servicer.start()

    async def signal_ready() -> None:
        await serving.wait()
        await servicer.session.registered.wait()
        if ready is not None:
            ready.set()

    waiter = asyncio.create_task(signal_ready())
    try:
        await serve_forever(
            "l1",
            port,
            lambda server: add_to_server(server, servicer),
            on_stop=servicer.stop,
            host=host,
            ready=serving,
            gate=servicer.session.registered.wait,
            health_state=health_state,
        )
    finally:
        waiter.cancel()
        await servicer.stop()

"""L1 and L2 services against a fake L0 (in this process, on loopback).

The fake implements just enough of L0Service to exercise the adapters: Connect (register,
then calls the test injects), the hcalls (recorded, with configurable return codes),
EnterNested, and a Run stream that answers FILL for every access and interleaves an
invalidation in the middle of every batch (then checks, with a TLB dump, that the vCPU applied
the messages in arrival order). The real L0 is tested with the full cluster elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from nestmmu.core import formats as f
from nestmmu.core.l1 import L1Hypervisor, default_memslots
from nestmmu.protos import SESSION_METADATA_KEY, common_pb2, l0_pb2, l0_pb2_grpc, l1_pb2, l1_pb2_grpc, l2_pb2, l2_pb2_grpc
from nestmmu.services.l1.server import L1Servicer
from nestmmu.services.l1.server import add_to_server as add_l1
from nestmmu.services.l2.server import L2Servicer
from nestmmu.services.l2.server import add_to_server as add_l2

SHADOW_LPID = 7
PAGE_SHIFT = 16
HOST_BASE = 0x40_0000_0000
ALL_FLAGS = PAGE_SHIFT | l0_pb2.FILL_FLAG_READ | l0_pb2.FILL_FLAG_WRITE | l0_pb2.FILL_FLAG_EXECUTE | l0_pb2.FILL_FLAG_REFERENCED | l0_pb2.FILL_FLAG_CHANGED


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class FakeSession:
    token: str
    out: asyncio.Queue[l0_pb2.L0Call | None] = field(default_factory=asyncio.Queue)
    pending: dict[int, asyncio.Future[l0_pb2.L1Reply]] = field(default_factory=dict)


class FakeL0(l0_pb2_grpc.L0ServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.registers: list[l0_pb2.Register] = []
        self.session: FakeSession | None = None
        self.registered = asyncio.Condition()
        self.ptcrs: list[tuple[str, int]] = []
        self.rpts: list[l0_pb2.RptInvalidateRequest] = []
        self.tlbies: list[l0_pb2.TlbInvalidateRequest] = []
        self.enters: list[l0_pb2.HvGuestState] = []
        self.rpt_rc = 0
        self.call_ids = itertools.count(1)
        self.inv_ids = itertools.count(1000)
        self.invalidations_sent: list[int] = []
        self.acks: list[int] = []
        self.dump_mismatches: list[str] = []
        self.dumps = 0
        self.batches = 0
        self.abort_run_after_batches: int | None = None

    # ------------------------------------------------------------- session
    async def Connect(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        first = await context.read()
        self.registers.append(first.register)
        session = FakeSession(token=f"tok-{len(self.registers)}")
        await context.write(l0_pb2.ConnectResponse(registered=l0_pb2.Registered(session_token=session.token, l1_lpid_host=1, page_shift=PAGE_SHIFT)))
        self.session = session
        async with self.registered:
            self.registered.notify_all()

        async def reader() -> None:
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    return
                for r in msg.replies:
                    fut = session.pending.pop(r.call_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(r)

        rt = asyncio.create_task(reader())
        try:
            while True:
                call = await session.out.get()
                if call is None:  # drop the L1 (as if L0 restarted)
                    return
                await context.write(l0_pb2.ConnectResponse(calls=[call]))
        finally:
            rt.cancel()
            if self.session is session:
                self.session = None

    async def wait_registered(self, count: int, timeout: float = 10.0) -> None:
        async def cond() -> None:
            async with self.registered:
                await self.registered.wait_for(lambda: len(self.registers) >= count and self.session is not None)

        await asyncio.wait_for(cond(), timeout)

    async def call(self, **kw: Any) -> l0_pb2.L1Reply:
        session = self.session
        assert session is not None
        cid = next(self.call_ids)
        fut: asyncio.Future[l0_pb2.L1Reply] = asyncio.get_running_loop().create_future()
        session.pending[cid] = fut
        session.out.put_nowait(l0_pb2.L0Call(call_id=cid, **kw))
        return await asyncio.wait_for(fut, 5.0)

    def drop_session(self) -> None:
        assert self.session is not None
        self.session.out.put_nowait(None)

    async def _check_token(self, context: grpc.aio.ServicerContext) -> str:
        token = dict(context.invocation_metadata() or ()).get(SESSION_METADATA_KEY, "")
        if self.session is None or token != self.session.token:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad session token")
        return str(token)

    # ------------------------------------------------------------- hcalls
    async def SetPartitionTable(self, request: l0_pb2.SetPartitionTableRequest, context: grpc.aio.ServicerContext) -> l0_pb2.SetPartitionTableResponse:
        token = await self._check_token(context)
        self.ptcrs.append((token, request.ptcr))
        return l0_pb2.SetPartitionTableResponse(hcall_rc=0)

    async def RptInvalidate(self, request: l0_pb2.RptInvalidateRequest, context: grpc.aio.ServicerContext) -> l0_pb2.RptInvalidateResponse:
        await self._check_token(context)
        self.rpts.append(request)
        return l0_pb2.RptInvalidateResponse(hcall_rc=self.rpt_rc)

    async def TlbInvalidate(self, request: l0_pb2.TlbInvalidateRequest, context: grpc.aio.ServicerContext) -> l0_pb2.TlbInvalidateResponse:
        await self._check_token(context)
        self.tlbies.append(request)
        return l0_pb2.TlbInvalidateResponse(hcall_rc=0)

    async def EnterNested(self, request: l0_pb2.EnterNestedRequest, context: grpc.aio.ServicerContext) -> l0_pb2.EnterNestedResponse:
        await self._check_token(context)
        self.enters.append(request.state)
        return l0_pb2.EnterNestedResponse(hcall_rc=0, run_token=f"run-{request.state.lpid}-{request.state.vcpu_token}", shadow_lpid=SHADOW_LPID)

    # ------------------------------------------------------------- Run
    async def Run(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        first = await context.read()
        assert first.WhichOneof("message") == "attach" and first.attach.run_token.startswith("run-")
        await context.write(l0_pb2.RunResponse(attached=l0_pb2.RunAttached(shadow_lpid=SHADOW_LPID, l1_lpid=1, page_shift=PAGE_SHIFT)))
        model: set[int] = set()  # pages the vCPU's TLB must hold (fills minus invalidations)
        while True:
            req = await context.read()
            if req is grpc.aio.EOF:
                return
            which = req.WhichOneof("message")
            if which != "batch":
                self.dump_mismatches.append(f"unexpected {which} between batches")
                continue
            self.batches += 1
            if self.abort_run_after_batches is not None and self.batches > self.abort_run_after_batches:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "fake L0 went away")
            b = req.batch
            addrs = list(b.addresses)
            assert len(b.kinds) == len(addrs) and set(b.kinds) <= {1, 2, 3}
            half = len(addrs) // 2
            await context.write(self._results(b.batch_id, 0, addrs[:half], done=False, model=model))
            # An invalidation in the middle of the batch: the page of the first access.
            victim = addrs[0] >> PAGE_SHIFT << PAGE_SHIFT
            inv_id = next(self.inv_ids)
            self.invalidations_sent.append(inv_id)
            model.discard(victim)
            inv = common_pb2.Invalidation(
                id=inv_id, lpid=SHADOW_LPID, scope=common_pb2.INVALIDATION_SCOPE_ADDRESS, address=victim, size_bytes=1 << PAGE_SHIFT, reason="test"
            )
            await context.write(l0_pb2.RunResponse(invalidate=l0_pb2.InvalidationBroadcast(invalidations=[inv])))
            ack = await asyncio.wait_for(context.read(), 2.0)  # the vCPU must ack before its batch completes
            assert ack.WhichOneof("message") == "ack", ack
            self.acks.extend(ack.ack.invalidation_ids)
            dump_id = 500 + self.batches
            await context.write(l0_pb2.RunResponse(tlb_dump_request=l0_pb2.TlbDumpRequest(id=dump_id)))
            dump = await asyncio.wait_for(context.read(), 2.0)
            assert dump.WhichOneof("message") == "tlb_dump" and dump.tlb_dump.id == dump_id
            self.dumps += 1
            got = {e.page_address for e in dump.tlb_dump.entries}
            if got != model:
                self.dump_mismatches.append(f"batch {b.batch_id}: TLB {sorted(got)} != expected {sorted(model)}")
            if any(e.lpid != SHADOW_LPID or e.host_address != HOST_BASE + e.page_address for e in dump.tlb_dump.entries):
                self.dump_mismatches.append("bad entry")
            await context.write(self._results(b.batch_id, half, addrs[half:], done=True, model=model))

    @staticmethod
    def _results(batch_id: int, first: int, addrs: list[int], done: bool, model: set[int]) -> l0_pb2.RunResponse:
        pages = [a >> PAGE_SHIFT << PAGE_SHIFT for a in addrs]
        model.update(pages)
        return l0_pb2.RunResponse(
            results=l0_pb2.AccessResults(
                batch_id=batch_id,
                first_index=first,
                outcomes=[l0_pb2.ACCESS_OUTCOME_FILL] * len(addrs),
                page_addresses=pages,
                host_addresses=[HOST_BASE + p for p in pages],
                flags=[ALL_FLAGS] * len(addrs),
                dsisrs=[0] * len(addrs),
                batch_done=done,
            )
        )


@dataclass
class Cluster:
    fake: FakeL0
    l0_address: str
    l1_address: str
    l2_address: str
    l1: Any  # l1_pb2_grpc.L1ServiceStub
    l2: Any  # l2_pb2_grpc.L2ServiceStub
    l1_servicer: L1Servicer


async def start_fake_l0(port: int = 0) -> tuple[grpc.aio.Server, FakeL0, int]:
    fake = FakeL0()
    server = grpc.aio.server()
    l0_pb2_grpc.add_L0ServiceServicer_to_server(fake, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, fake, bound


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[Cluster]:
    l0_server, fake, l0_port = await start_fake_l0()
    l0_address = f"127.0.0.1:{l0_port}"
    l1_servicer = L1Servicer("l1t", l0_address)
    l1_server = grpc.aio.server()
    add_l1(l1_server, l1_servicer)
    l1_port = l1_server.add_insecure_port("127.0.0.1:0")
    await l1_server.start()
    l1_servicer.start()
    l2_servicer = L2Servicer()
    l2_server = grpc.aio.server()
    add_l2(l2_server, l2_servicer)
    l2_port = l2_server.add_insecure_port("127.0.0.1:0")
    await l2_server.start()
    await asyncio.wait_for(l1_servicer.session.registered.wait(), 10)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{l1_port}") as c1, grpc.aio.insecure_channel(f"127.0.0.1:{l2_port}") as c2:
        yield Cluster(
            fake, l0_address, f"127.0.0.1:{l1_port}", f"127.0.0.1:{l2_port}", l1_pb2_grpc.L1ServiceStub(c1), l2_pb2_grpc.L2ServiceStub(c2), l1_servicer
        )
    await l2_servicer.stop()
    await l1_servicer.stop()
    for s in (l2_server, l1_server, l0_server):
        await s.stop(grace=None)


def violations(err: grpc.aio.AioRpcError) -> list[str]:
    st = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert st is not None, "INVALID_ARGUMENT without a google.rpc.Status"
    out = []
    for d in st.details:
        br = error_details_pb2.BadRequest()
        if d.Unpack(br):
            out.extend(v.field for v in br.field_violations)
    return out


async def create_guest(c: Cluster, memory: int = 64 << 20, page_shift: int = 16) -> int:
    resp = await c.l1.CreateGuest(l1_pb2.CreateGuestRequest(page_shift=page_shift, memory_bytes=memory), timeout=5)
    assert resp.hcall_rc == 0
    return int(resp.lpid)


# ---------------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_l1_registers_memslots_and_sets_partition_table(cluster: Cluster) -> None:
    fake = cluster.fake
    reg = fake.registers[0]
    assert reg.name == "l1t"
    specs = default_memslots()
    assert [(m.base_gfn_addr, m.size_bytes, m.backing_shift) for m in reg.memslots] == [(s.base, s.size, s.backing_shift) for s in specs]
    assert [m.kind for m in reg.memslots] == [common_pb2.MEMSLOT_KIND_READ_ONLY if s.read_only else common_pb2.MEMSLOT_KIND_NORMAL for s in specs]
    expected_ptcr = L1Hypervisor("ref", specs, PAGE_SHIFT).ptcr
    assert fake.ptcrs == [("tok-1", expected_ptcr)]
    stats = (await cluster.l1.GetStats(l1_pb2.GetStatsRequest(), timeout=5)).counters.values
    assert stats["connected"] == 1 and stats["session.hcall.set_partition_table"] == 1


@pytest.mark.asyncio
async def test_l1_answers_walk_and_exit_calls(cluster: Cluster) -> None:
    fake = cluster.fake
    lpid = await create_guest(cluster)
    # CreateGuest flushed the whole LPID (RIC=2) with H_RPT_INVALIDATE.
    assert fake.rpts[-1].id == lpid and fake.rpts[-1].type & f.H_RPTI_TYPE_NESTED
    mapped = await cluster.l1.MapPages(l1_pb2.MapPagesRequest(lpid=lpid, n_gpa=0x30000, length=0x20000), timeout=5)
    assert (mapped.hcall_rc, mapped.pages_changed) == (0, 2)
    info = (await cluster.l1.GetGuest(l1_pb2.GetGuestRequest(lpid=lpid), timeout=5)).guest
    assert info.mapped_pages == 2 and info.pate_dw0

    reply = await fake.call(walk=l0_pb2.WalkCall(pate_dw0=info.pate_dw0, l1_lpid=lpid, n_gpa=0x31234))
    w = reply.walk
    assert w.ok and w.dsisr_code == 0 and w.page_shift == 16
    assert w.leaf_pte & f.PTE_V and w.leaf_pte & f.PTE_L and w.leaf_pte & f.PTE_R
    # l1_gpa = the leaf's RPN plus n_gpa's offset in the page (core WalkResult.raddr).
    assert f.pte_rpn(w.leaf_pte) % (1 << 16) == 0 and w.l1_gpa == f.pte_rpn(w.leaf_pte) + 0x1234
    assert w.leaf_address and w.memory_references >= 4
    inspected = (await cluster.l1.WalkTree(l1_pb2.WalkTreeRequest(lpid=lpid, n_gpa=0x31234), timeout=5)).result
    assert inspected == w

    miss = (await fake.call(walk=l0_pb2.WalkCall(pate_dw0=info.pate_dw0, l1_lpid=lpid, n_gpa=0x500000))).walk
    assert not miss.ok and miss.dsisr_code == f.DSISR_NOHPTE

    # A reflected NOHPTE exit: L1 instantiates the page and re-enters; the walk then succeeds.
    ex = await fake.call(
        handle_exit=l0_pb2.HandleExitCall(
            l1_lpid=lpid, vcpu_id=0, trap=0xE00, hdar=0x500008, hdsisr=f.DSISR_NOHPTE | f.DSISR_ISSTORE, asdr=0x500008, access=common_pb2.ACCESS_KIND_STORE
        )
    )
    assert ex.handle_exit.action == l0_pb2.EXIT_ACTION_REENTER
    again = (await fake.call(walk=l0_pb2.WalkCall(pate_dw0=info.pate_dw0, l1_lpid=lpid, n_gpa=0x500000))).walk
    assert again.ok and again.leaf_pte & f.PTE_C
    # An exit for a guest L1 does not have fails (architecturally, as data).
    bad = await fake.call(handle_exit=l0_pb2.HandleExitCall(l1_lpid=99, trap=0xE00, hdsisr=f.DSISR_NOHPTE, asdr=0, access=common_pb2.ACCESS_KIND_LOAD))
    assert bad.handle_exit.action == l0_pb2.EXIT_ACTION_FAILED
    # Memory calls: L0 reads L1's PATE for the guest.
    pate = await fake.call(read_memory=l0_pb2.ReadMemoryCall(gpa=f.ptcr_patb(fake.ptcrs[0][1]) + lpid * 16, length=8))
    assert pate.read_memory.ok and int.from_bytes(pate.read_memory.data, "big") == info.pate_dw0
    rom = await fake.call(write_memory=l0_pb2.WriteMemoryCall(gpa=default_memslots()[1].base, data=b"x" * 8))
    assert not rom.write_memory.ok


@pytest.mark.asyncio
async def test_unmap_issues_one_rpt_invalidate_per_page(cluster: Cluster) -> None:
    fake = cluster.fake
    lpid = await create_guest(cluster)
    await cluster.l1.MapPages(l1_pb2.MapPagesRequest(lpid=lpid, n_gpa=0x100000, length=4 << 16), timeout=5)
    before = len(fake.rpts)
    resp = await cluster.l1.UnmapPages(l1_pb2.UnmapPagesRequest(lpid=lpid, n_gpa=0x100000, length=4 << 16), timeout=5)
    assert (resp.hcall_rc, resp.pages_changed) == (0, 4)
    new = fake.rpts[before:]
    assert [(r.id, r.start, r.end) for r in new] == [(lpid, 0x100000 + i * 0x10000, 0x110000 + i * 0x10000) for i in range(4)]
    assert all(r.type == f.H_RPTI_TYPE_NESTED | f.H_RPTI_TYPE_TLB and r.page_sizes == f.H_RPTI_PAGE_64K for r in new)
    # A failing hcall is data: the first non-zero H_* code comes back, not a gRPC error.
    await cluster.l1.MapPages(l1_pb2.MapPagesRequest(lpid=lpid, n_gpa=0, length=2 << 16), timeout=5)
    fake.rpt_rc = int(f.H.PARAMETER)
    resp = await cluster.l1.UnmapPages(l1_pb2.UnmapPagesRequest(lpid=lpid, n_gpa=0, length=2 << 16), timeout=5)
    assert (resp.hcall_rc, resp.pages_changed) == (f.H.PARAMETER, 2)
    fake.rpt_rc = 0
    destroyed = await cluster.l1.DestroyGuest(l1_pb2.DestroyGuestRequest(lpid=lpid), timeout=5)
    assert destroyed.hcall_rc == 0 and fake.rpts[-1].page_sizes == f.H_RPTI_PAGE_ALL
    assert (await cluster.l1.ListGuests(l1_pb2.ListGuestsRequest(), timeout=5)).guests == []


@pytest.mark.asyncio
async def test_l2_workload_applies_interleaved_invalidations_and_acks(cluster: Cluster) -> None:
    fake = cluster.fake
    wl = l2_pb2.Workload(pattern="hot", accesses=3000, seed=3, footprint_bytes=4 << 20, store_fraction=0.3, ifetch_fraction=0.05, batch_size=512)
    resp = await cluster.l2.RunWorkload(l2_pb2.RunWorkloadRequest(l1_address=cluster.l1_address, lpid=0, vcpus=2, workload=wl), timeout=60)
    rep = resp.report
    assert rep.error_details == [] and rep.errors == 0
    assert rep.lpid != 0 and rep.vcpus == 2
    assert [s.vcpu_token for s in fake.enters] == [0, 1] or sorted(s.vcpu_token for s in fake.enters) == [0, 1]
    assert rep.accesses == 2 * 3000
    assert rep.tlb_hits > 0 and rep.tlb_hits + rep.misses_sent >= rep.accesses  # rescans of deferred accesses count twice
    assert rep.fills == rep.misses_sent  # the fake fills every access
    assert fake.batches > 0 and fake.dumps == fake.batches
    assert rep.invalidations_applied == len(fake.invalidations_sent) == fake.batches
    assert rep.acks_sent == len(fake.acks) and sorted(fake.acks) == sorted(fake.invalidations_sent)
    assert fake.dump_mismatches == []
    assert rep.extra["batches_sent"] == fake.batches and rep.seconds > 0
    reports = (await cluster.l2.GetReport(l2_pb2.GetReportRequest(), timeout=5)).reports
    assert list(reports) == [rep]
    assert (await cluster.l2.DumpTlb(l2_pb2.DumpTlbRequest(), timeout=5)).entries == []  # detached


@pytest.mark.asyncio
async def test_broken_run_stream_is_reported_not_raised(cluster: Cluster) -> None:
    cluster.fake.abort_run_after_batches = 1
    wl = l2_pb2.Workload(pattern="uniform", accesses=4000, seed=1, footprint_bytes=16 << 20, batch_size=256)
    rep = (await cluster.l2.RunWorkload(l2_pb2.RunWorkloadRequest(l1_address=cluster.l1_address, vcpus=1, workload=wl), timeout=60)).report
    assert rep.errors >= 1 and rep.extra["vcpu_failures"] == 1
    assert len(rep.error_details) == 1 and "UNAVAILABLE" in rep.error_details[0]
    # The server is still fine.
    assert len((await cluster.l2.GetReport(l2_pb2.GetReportRequest(), timeout=5)).reports) == 1


@pytest.mark.asyncio
async def test_bad_inputs_are_invalid_argument_with_field_violations(cluster: Cluster) -> None:
    async def invalid(coro: Any) -> list[str]:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await coro
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value
        return violations(ei.value)

    l1, l2 = cluster.l1, cluster.l2
    assert await invalid(l1.CreateGuest(l1_pb2.CreateGuestRequest(page_shift=13, memory_bytes=1 << 20), timeout=5)) == ["page_shift"]
    assert await invalid(l1.CreateGuest(l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=1000), timeout=5)) == ["memory_bytes"]
    region = l1_pb2.GuestRegion(n_gpa=0x1000, size_bytes=0x10000, kind=l1_pb2.GUEST_REGION_KIND_PROTECTED, read=True)
    assert await invalid(l1.CreateGuest(l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=1 << 20, regions=[region]), timeout=5)) == ["regions[0]"]
    assert await invalid(l1.CreateGuest(l1_pb2.CreateGuestRequest(lpid=5000, page_shift=16, memory_bytes=1 << 20), timeout=5)) == ["lpid"]
    lpid = await create_guest(cluster, memory=1 << 20)
    assert await invalid(l1.MapPages(l1_pb2.MapPagesRequest(lpid=lpid, n_gpa=0, length=0), timeout=5)) == ["length"]
    assert await invalid(l1.UnmapPages(l1_pb2.UnmapPagesRequest(lpid=lpid, n_gpa=2 << 20, length=1), timeout=5)) == ["n_gpa"]
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await l1.MapPages(l1_pb2.MapPagesRequest(lpid=lpid + 1, n_gpa=0, length=1), timeout=5)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await l1.AttachVcpu(l1_pb2.AttachVcpuRequest(lpid=lpid + 1), timeout=5)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND

    addr = cluster.l1_address
    assert await invalid(l2.RunWorkload(l2_pb2.RunWorkloadRequest(l1_address=addr, vcpus=1, workload=l2_pb2.Workload(pattern="zipf")), timeout=5)) == [
        "workload.pattern"
    ]
    assert await invalid(l2.RunWorkload(l2_pb2.RunWorkloadRequest(l1_address=addr, vcpus=1, workload=l2_pb2.Workload(footprint_bytes=5000)), timeout=5)) == [
        "workload.footprint_bytes"
    ]
    wl = l2_pb2.Workload(store_fraction=0.8, ifetch_fraction=0.5)
    assert await invalid(l2.RunWorkload(l2_pb2.RunWorkloadRequest(l1_address=addr, vcpus=1, workload=wl), timeout=5)) == ["workload.store_fraction"]
    wl = l2_pb2.Workload(pattern="trace", trace_path="/nonexistent/trace")
    assert await invalid(l2.RunWorkload(l2_pb2.RunWorkloadRequest(l1_address=addr, vcpus=1, workload=wl), timeout=5)) == ["workload.trace_path"]
    assert await invalid(l2.RunWorkload(l2_pb2.RunWorkloadRequest(l1_address=addr, vcpus=0), timeout=5)) == ["vcpus"]
    assert await invalid(l2.RunWorkload(l2_pb2.RunWorkloadRequest(vcpus=1), timeout=5)) == ["l1_address"]
    assert await invalid(l2.RunWorkload(l2_pb2.RunWorkloadRequest(l1_address=addr, vcpus=1, page_shift=14), timeout=5)) == ["page_shift"]


@pytest.mark.asyncio
async def test_l1_reconnects_and_keeps_its_guests(cluster: Cluster) -> None:
    fake = cluster.fake
    lpid = await create_guest(cluster)
    fake.drop_session()
    await fake.wait_registered(2)
    await asyncio.wait_for(_until(lambda: len(fake.ptcrs) == 2 and cluster.l1_servicer.session.connected), 10)
    assert [r.name for r in fake.registers] == ["l1t", "l1t"]
    assert fake.ptcrs[1] == ("tok-2", fake.ptcrs[0][1])  # same table, new session token
    assert [g.lpid for g in (await cluster.l1.ListGuests(l1_pb2.ListGuestsRequest(), timeout=5)).guests] == [lpid]
    att = await cluster.l1.AttachVcpu(l1_pb2.AttachVcpuRequest(lpid=lpid, vcpu_id=3), timeout=5)
    assert att.hcall_rc == 0 and att.l0_address == cluster.l0_address and att.shadow_lpid == SHADOW_LPID


@pytest.mark.asyncio
async def test_l1_is_unavailable_until_l0_comes_up() -> None:
    port = free_port()
    servicer = L1Servicer("late", f"127.0.0.1:{port}", advertise_l0="l0.example:7000")
    server = grpc.aio.server()
    add_l1(server, servicer)
    l1_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    servicer.start()
    l0_server = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{l1_port}") as ch:
            stub = l1_pb2_grpc.L1ServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.CreateGuest(l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=1 << 20), timeout=5)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            await asyncio.sleep(0.3)  # a few failed attempts
            l0_server, fake, _ = await start_fake_l0(port)
            await asyncio.wait_for(servicer.session.registered.wait(), 10)
            lpid = (await stub.CreateGuest(l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=1 << 20), timeout=5)).lpid
            att = await stub.AttachVcpu(l1_pb2.AttachVcpuRequest(lpid=lpid, vcpu_id=0), timeout=5)
            assert att.l0_address == "l0.example:7000" and att.run_token
            assert len(fake.ptcrs) == 1
    finally:
        await servicer.stop()
        await server.stop(grace=None)
        if l0_server is not None:
            await l0_server.stop(grace=None)


async def _until(pred: Any) -> None:
    while not pred():
        await asyncio.sleep(0.02)


with contextlib.suppress(Exception):  # keep structlog quiet-ish and JSON in test output
    from nestmmu.services.common import configure_logging

    configure_logging("debug", json=True)

"""The three services as real processes on loopback, driven through their gRPC surface only.

Each test ends with the online audit (I1-I7 across the services) and asserts it is clean.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from nestmmu import cluster
from nestmmu.cluster import RawVcpu
from nestmmu.core import formats as f
from nestmmu.protos import SESSION_METADATA_KEY, common_pb2, l0_pb2, l0_pb2_grpc, l1_pb2, l1_pb2_grpc, l2_pb2, l2_pb2_grpc

pytestmark = [pytest.mark.integration]

FILL = l0_pb2.ACCESS_OUTCOME_FILL
LOAD, STORE = 1, 2


@pytest.fixture(scope="module")
def lc() -> Iterator[cluster.LocalCluster]:
    with cluster.local_cluster(("l1a", "l1b")) as c:
        yield c


class Client:
    def __init__(self, c: cluster.LocalCluster) -> None:
        self.c = c
        self.ch0 = grpc.aio.insecure_channel(c.l0)
        self.l0 = l0_pb2_grpc.L0ServiceStub(self.ch0)
        self.ch1 = {n: grpc.aio.insecure_channel(a) for n, a in c.l1s.items()}
        self.l1 = {n: l1_pb2_grpc.L1ServiceStub(ch) for n, ch in self.ch1.items()}
        self.vcpus: list[RawVcpu] = []

    async def guest(self, l1: str, page_shift: int = 16, memory: int = 64 << 20, **kw: object) -> int:
        r = await self.l1[l1].CreateGuest(l1_pb2.CreateGuestRequest(page_shift=page_shift, memory_bytes=memory, **kw), timeout=30)  # type: ignore[arg-type]
        return int(r.lpid)

    async def vcpu(self, l1: str, lpid: int, vcpu_id: int, ack: bool = True) -> tuple[RawVcpu, int]:
        a = await self.l1[l1].AttachVcpu(l1_pb2.AttachVcpuRequest(lpid=lpid, vcpu_id=vcpu_id), timeout=30)
        assert a.hcall_rc == 0, a
        v = RawVcpu(self.l0, a.run_token, ack=ack)
        att = await asyncio.wait_for(v.attached, 10)
        assert att.shadow_lpid == a.shadow_lpid
        self.vcpus.append(v)
        return v, int(a.shadow_lpid)

    async def shadow(self, l1: str, lpid: int) -> l0_pb2.DumpShadowTreeResponse:
        return await self.l0.DumpShadowTree(l0_pb2.DumpShadowTreeRequest(l1_name=l1, l1_lpid=lpid), timeout=10)

    async def stats(self) -> dict[str, int]:
        return dict((await self.l0.GetStats(l0_pb2.GetStatsRequest(), timeout=10)).counters.values)

    async def audit_clean(self) -> None:
        r = await self.l0.Audit(l0_pb2.AuditRequest(), timeout=30)
        assert r.ok, [f"{v.invariant}: {v.detail}" for v in r.violations]

    async def close(self) -> None:
        for v in self.vcpus:
            await v.close()
        await self.ch0.close()
        for ch in self.ch1.values():
            await ch.close()


@pytest_asyncio.fixture
async def cl(lc: cluster.LocalCluster) -> AsyncIterator[Client]:
    c = Client(lc)
    yield c
    await c.close()


def violations(e: grpc.aio.AioRpcError) -> list[str]:
    st = rpc_status.from_call(e)  # type: ignore[arg-type]
    out = []
    if st is not None:
        for d in st.details:
            br = error_details_pb2.BadRequest()
            if d.Unpack(br):
                out += [v.field for v in br.field_violations]
    return out


@pytest.mark.asyncio
async def test_nested_fault_end_to_end(cl: Client) -> None:
    lpid = await cl.guest("l1a")
    v, shadow = await cl.vcpu("l1a", lpid, 0)
    before = await cl.stats()
    [(outcome, page, host, flags, _)] = await v.run([0x123458], [LOAD])
    after = await cl.stats()
    assert outcome == FILL
    assert page == 0x120000 and flags & 0xFF == 16  # a 64K shadow leaf
    assert flags & l0_pb2.FILL_FLAG_REFERENCED and not flags & l0_pb2.FILL_FLAG_CHANGED
    # L2 -> L0 HDSI, reflected NOHPTE to L1, L1 instantiated, re-entry, L0 filled the shadow.
    assert after["l0.reflected.NOHPTE"] - before.get("l0.reflected.NOHPTE", 0) == 1
    assert after["l0.nested_faults"] - before.get("l0.nested_faults", 0) == 2
    assert after["l0.shadow_inserted"] - before.get("l0.shadow_inserted", 0) == 1
    walk = await cl.l1["l1a"].WalkTree(l1_pb2.WalkTreeRequest(lpid=lpid, n_gpa=0x123458), timeout=10)
    assert walk.result.ok and walk.result.page_shift == 16
    tree = await cl.shadow("l1a", lpid)
    assert tree.shadow_lpid == shadow
    assert [(lf.n_gpa, lf.host_address) for lf in tree.leaves] == [(0x120000, host)]
    # A second access to the page is a shadow hit: no new fault.
    [(o2, _, h2, _, _)] = await v.run([0x120000], [LOAD])
    assert (o2, h2) == (FILL, host)
    assert (await cl.stats())["l0.nested_faults"] == after["l0.nested_faults"]
    await cl.audit_clean()


@pytest.mark.asyncio
async def test_rc_fault_on_first_store(cl: Client) -> None:
    lpid = await cl.guest("l1a")
    v, _ = await cl.vcpu("l1a", lpid, 0)
    [(o, _, _, flags, _)] = await v.run([0x200000], [LOAD])
    assert o == FILL and not flags & l0_pb2.FILL_FLAG_CHANGED
    before = await cl.stats()
    [(o, _, _, flags, _)] = await v.run([0x200008], [STORE])
    after = await cl.stats()
    assert o == FILL and flags & l0_pb2.FILL_FLAG_CHANGED
    # The store took SET_RC.  The load's instantiation already gave L1's leaf and L0's PTE C
    # (kvmppc_book3s_instantiate_page: writable => C), so L0 set C in the shadow leaf itself
    # (kvmhv_handle_nested_set_rc) without reflecting anything to L1.
    assert after["l0.rc_faults"] - before.get("l0.rc_faults", 0) == 1
    assert after.get("l0.reflected.SET_RC", 0) - before.get("l0.reflected.SET_RC", 0) == 0
    assert after["l0.rc_set_in_l0"] - before.get("l0.rc_set_in_l0", 0) == 1
    tree = await cl.shadow("l1a", lpid)
    (leaf,) = [lf for lf in tree.leaves if lf.n_gpa == 0x200000]
    assert leaf.pte & f.PTE_C and leaf.pte & f.PTE_R
    await cl.audit_clean()


@pytest.mark.asyncio
async def test_unmap_broadcast_reaches_every_vcpu_before_hcall_returns(cl: Client) -> None:
    lpid = await cl.guest("l1b")
    vs = [(await cl.vcpu("l1b", lpid, i))[0] for i in range(3)]
    shadow = (await cl.shadow("l1b", lpid)).shadow_lpid
    for v in vs:
        [(o, *_)] = await v.run([0x300000], [LOAD])
        assert o == FILL
    r = await cl.l1["l1b"].UnmapPages(l1_pb2.UnmapPagesRequest(lpid=lpid, n_gpa=0x300000, length=1 << 16), timeout=30)
    assert r.hcall_rc == 0 and r.pages_changed == 1
    # UnmapPages returned after L1's H_RPT_INVALIDATE returned, which waited for every ack.
    for v in vs:
        hits = [
            i
            for i in v.invalidations
            if i.lpid == shadow and i.scope == common_pb2.INVALIDATION_SCOPE_ADDRESS and i.address <= 0x300000 < i.address + i.size_bytes
        ]
        assert hits, f"vCPU did not receive the tlbie: {v.invalidations}"
    assert not [lf for lf in (await cl.shadow("l1b", lpid)).leaves if lf.n_gpa == 0x300000]
    await cl.audit_clean()


@pytest.mark.asyncio
async def test_host_migration_under_load(cl: Client) -> None:
    lpid = await cl.guest("l1a", page_shift=16, memory=8 << 20)
    async with grpc.aio.insecure_channel(cl.c.l2) as ch:
        l2 = l2_pb2_grpc.L2ServiceStub(ch)
        wl = l2_pb2.Workload(pattern="uniform", accesses=60_000, seed=3, footprint_bytes=8 << 20, store_fraction=0.3, batch_size=512)
        job = asyncio.ensure_future(l2.RunWorkload(l2_pb2.RunWorkloadRequest(l1_address=cl.c.l1s["l1a"], lpid=lpid, vcpus=2, workload=wl), timeout=300))
        migrated = 0
        t_end = time.monotonic() + 30
        while not job.done() and time.monotonic() < t_end:
            # Which L1 pages back this guest? Migrate the host pages of the shadow leaves.
            try:
                tree = await cl.shadow("l1a", lpid)
            except grpc.aio.AioRpcError as e:  # no vCPU has entered the guest yet
                assert e.code() == grpc.StatusCode.NOT_FOUND
                await asyncio.sleep(0.05)
                continue
            for leaf in list(tree.leaves)[:4]:
                walk = await cl.l1["l1a"].WalkTree(l1_pb2.WalkTreeRequest(lpid=lpid, n_gpa=leaf.n_gpa), timeout=10)
                if walk.result.ok:
                    m = await cl.l0.HostMigrate(l0_pb2.HostMigrateRequest(l1_name="l1a", gpa=walk.result.l1_gpa), timeout=30)
                    migrated += m.old_host_address != m.new_host_address
            await asyncio.sleep(0.05)
        rep = (await job).report
    assert migrated > 0
    assert rep.accesses == 120_000 and rep.errors == 0, rep
    assert rep.invalidations_applied > 0  # migrations reached the running vCPUs
    await cl.audit_clean()


@pytest.mark.asyncio
async def test_other_l1s_guests_cannot_be_reached(cl: Client) -> None:
    lpid = await cl.guest("l1a")
    v, _ = await cl.vcpu("l1a", lpid, 0)
    await v.run([0x400000], [LOAD])
    n_before = len((await cl.shadow("l1a", lpid)).leaves)
    assert n_before >= 1
    # No session token, or a made-up one: refused.
    for md in ((), ((SESSION_METADATA_KEY, "not-a-token"),)):
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await cl.l0.TlbInvalidate(l0_pb2.TlbInvalidateRequest(instr=0, rs=0, rb=0), metadata=md, timeout=10)
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A rogue L1 with its own session flushes "every LPID" and lpid numbers of l1a's guests:
    # it only ever names its own (empty) registry.
    q: asyncio.Queue[l0_pb2.ConnectRequest | None] = asyncio.Queue()
    q.put_nowait(
        l0_pb2.ConnectRequest(
            register=l0_pb2.Register(name="rogue", memslots=[common_pb2.Memslot(base_gfn_addr=0, size_bytes=1 << 30, kind=common_pb2.MEMSLOT_KIND_NORMAL)])
        )
    )

    async def reqs() -> AsyncIterator[l0_pb2.ConnectRequest]:
        while (m := await q.get()) is not None:
            yield m

    call = cl.l0.Connect(reqs())
    first = await call.read()
    md = ((SESSION_METADATA_KEY, first.registered.session_token),)
    instr, rs, rb = f.encode_tlbie(f.RIC_ALL, 0, 1, 0, f.IS_ALL)
    assert (await cl.l0.TlbInvalidate(l0_pb2.TlbInvalidateRequest(instr=instr, rs=rs, rb=rb), metadata=md, timeout=10)).hcall_rc == 0
    instr, rs, rb = f.encode_tlbie(f.RIC_TLB, 0, 1, lpid, f.IS_LPID)
    assert (await cl.l0.TlbInvalidate(l0_pb2.TlbInvalidateRequest(instr=instr, rs=rs, rb=rb), metadata=md, timeout=10)).hcall_rc == 0
    r = await cl.l0.RptInvalidate(l0_pb2.RptInvalidateRequest(id=lpid, target=1, type=0xF, page_sizes=f.U64, start=0, end=f.U64), metadata=md, timeout=10)
    assert r.hcall_rc == 0
    assert len((await cl.shadow("l1a", lpid)).leaves) == n_before
    # A run token is bound to the session that entered the guest; a guessed one is refused.
    bad = RawVcpu(cl.l0, "guessed-token")
    await asyncio.sleep(0.5)
    assert bad.error is not None and bad.error.code() == grpc.StatusCode.PERMISSION_DENIED
    await bad.close()
    q.put_nowait(None)
    call.cancel()
    await cl.audit_clean()


@pytest.mark.asyncio
async def test_malformed_and_out_of_range_requests_rejected(cl: Client) -> None:
    # L1: impossible page size, region outside guest memory, unknown guest.
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await cl.l1["l1a"].CreateGuest(l1_pb2.CreateGuestRequest(page_shift=13, memory_bytes=1 << 20), timeout=10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(ei.value)
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await cl.l1["l1a"].UnmapPages(l1_pb2.UnmapPagesRequest(lpid=4000, n_gpa=0, length=4096), timeout=10)
    assert ei.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    # L0 host operations: unknown L1, address outside its memslots.
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await cl.l0.HostUnmap(l0_pb2.HostUnmapRequest(l1_name="nobody", gpa=0), timeout=10)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await cl.l0.HostUnmap(l0_pb2.HostUnmapRequest(l1_name="l1a", gpa=1 << 50), timeout=10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(ei.value) == ["gpa"]
    # Registration with a misaligned memslot.
    q: asyncio.Queue[l0_pb2.ConnectRequest | None] = asyncio.Queue()
    q.put_nowait(
        l0_pb2.ConnectRequest(
            register=l0_pb2.Register(name="bad", memslots=[common_pb2.Memslot(base_gfn_addr=123, size_bytes=4096, kind=common_pb2.MEMSLOT_KIND_NORMAL)])
        )
    )

    async def reqs() -> AsyncIterator[l0_pb2.ConnectRequest]:
        while (m := await q.get()) is not None:
            yield m

    call = cl.l0.Connect(reqs())
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await call.read()
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(ei.value) == ["register.memslots"]
    q.put_nowait(None)
    # A run-stream batch whose kinds do not match its addresses: the stream is cut, L0 lives.
    lpid = await cl.guest("l1b")
    v, _ = await cl.vcpu("l1b", lpid, 0)
    v.q.put_nowait(l0_pb2.RunRequest(batch=l0_pb2.AccessBatch(batch_id=9, addresses=[0, 4096], kinds=bytes([1]))))
    v.q.put_nowait(l0_pb2.RunRequest(batch=l0_pb2.AccessBatch(batch_id=10, addresses=[1 << 60], kinds=bytes([1]))))
    for _ in range(50):
        if v.error is not None:
            break
        await asyncio.sleep(0.1)
    assert v.error is not None and v.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    # L2: a workload with an unknown pattern.
    async with grpc.aio.insecure_channel(cl.c.l2) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await l2_pb2_grpc.L2ServiceStub(ch).RunWorkload(
                l2_pb2.RunWorkloadRequest(
                    l1_address=cl.c.l1s["l1a"],
                    lpid=lpid,
                    vcpus=1,
                    workload=l2_pb2.Workload(pattern="zigzag", accesses=10, footprint_bytes=1 << 20, batch_size=16),
                ),
                timeout=10,
            )
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Architectural errors are H_* codes, not gRPC errors.
    a = await cl.l1["l1b"].AttachVcpu(l1_pb2.AttachVcpuRequest(lpid=lpid, vcpu_id=f.NR_CPUS + 5), timeout=10)
    assert a.hcall_rc == f.H.PARAMETER
    await cl.audit_clean()


@pytest.mark.asyncio
async def test_vcpu_that_never_acks_is_disconnected_not_waited_for(cl: Client) -> None:
    lpid = await cl.guest("l1b")
    good, _ = await cl.vcpu("l1b", lpid, 0)
    mute, _ = await cl.vcpu("l1b", lpid, 1, ack=False)
    await good.run([0x500000], [LOAD])
    t = time.monotonic()
    r = await cl.l1["l1b"].UnmapPages(l1_pb2.UnmapPagesRequest(lpid=lpid, n_gpa=0x500000, length=1 << 16), timeout=30)
    took = time.monotonic() - t
    assert r.hcall_rc == 0
    assert 1.0 < took < 10.0  # bounded by L0's ack timeout (2 s), not forever
    await asyncio.sleep(0.2)
    assert mute.error is not None and mute.error.code() == grpc.StatusCode.ABORTED
    assert (await cl.stats())["svc.vcpus_disconnected_no_ack"] >= 1
    await cl.audit_clean()


@pytest.mark.asyncio
async def test_killed_l1_has_all_guests_released() -> None:
    with cluster.local_cluster(("l1a", "l1b")) as c:
        cli = Client(c)
        try:
            for i in range(2):
                lpid = await cli.guest("l1b")
                v, _ = await cli.vcpu("l1b", lpid, i)
                await v.run([0x10000 * (i + 1)], [STORE])
            keep = await cli.guest("l1a")
            va, _ = await cli.vcpu("l1a", keep, 0)
            await va.run([0x10000], [LOAD])
            before = await cli.stats()
            assert before["svc.lpids_in_use"] == 2 + 3  # two L1s + three nested guests
            c.kill_l1("l1b")
            for _ in range(100):
                st = await cli.l0.GetStats(l0_pb2.GetStatsRequest(), timeout=10)
                if [s.name for s in st.l1_summaries] == ["l1a"]:
                    break
                await asyncio.sleep(0.1)
            stats = dict(st.counters.values)
            assert [s.name for s in st.l1_summaries] == ["l1a"]
            assert stats["svc.lpids_in_use"] == 1 + 1  # only l1a and its guest remain
            assert stats["svc.run_streams"] == 1
            assert len((await cli.shadow("l1a", keep)).leaves) == 1
            await cli.audit_clean()
        finally:
            await cli.close()


@pytest.mark.asyncio
async def test_destroying_a_guest_stops_its_vcpus_and_its_lpid_can_be_reused(cl: Client) -> None:
    lpid = await cl.guest("l1b")
    v, _ = await cl.vcpu("l1b", lpid, 0)
    [(o, *_)] = await v.run([0x10000], [STORE])
    assert o == FILL
    r = await cl.l1["l1b"].DestroyGuest(l1_pb2.DestroyGuestRequest(lpid=lpid), timeout=30)
    assert r.hcall_rc == 0
    for _ in range(50):
        if v.error is not None:
            break
        await asyncio.sleep(0.1)
    # The vCPU of the destroyed guest was stopped, not left to read a later guest's PATE.
    assert v.error is not None and v.error.code() == grpc.StatusCode.ABORTED
    again = await cl.guest("l1b", page_shift=21)
    assert again == lpid  # L1 reuses the lowest free lpid
    v2, _ = await cl.vcpu("l1b", again, 0)
    [(o, page, _, flags, _)] = await v2.run([0x10000], [LOAD])
    assert o == FILL and flags & 0xFF == 21 and page == 0  # the new guest's 2M page, on 2M L0 backing
    assert [lf.n_gpa for lf in (await cl.shadow("l1b", again)).leaves] == [0]  # nothing of the old guest
    await cl.audit_clean()

"""An L2 vCPU's life: attach through L1 (H_ENTER_NESTED), run a workload on its Run stream
(:class:`.runner.RunStream`), and report what happened, failures included, as counters and
one-line details for the workload report."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable

import grpc
import structlog

from nestmmu.core import formats as f
from nestmmu.core.workload import WorkloadSpec
from nestmmu.protos import l1_pb2, l1_pb2_grpc

from ..common import RPC_DEADLINE, metadata_with_request_id, new_request_id
from ..connection import insecure_channel
from .guestos import GuestOs
from .runner import LiveVcpu, RunStream, VcpuFailed

log = structlog.get_logger("l2.vcpu")

#: Distinct ERROR reasons one vCPU reports in the workload's error_details.
MAX_ERROR_REASONS = 4

_ids = itertools.count(1)


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
    data_details: list[str] | None = None,
    on_l0: Callable[[str], None] | None = None,
    guest: GuestOs | None = None,
    segfault_details: list[str] | None = None,
) -> Counter[str]:
    """Attach vCPU ``vcpu_id`` of L1 guest ``lpid`` and run ``generate(spec, vcpu_index)`` on it.

    Returns the vCPU's counters plus ``"seconds"`` (wall clock, a float). A vCPU that cannot
    attach or whose Run stream breaks does not raise: it counts ``errors`` (and
    ``vcpu_failures``) and appends a one-line description to ``details``. ``live`` (if given)
    holds the vCPU while it runs, for TLB dumps. ``attach_lock`` (if given) serialises the
    attach step of the vCPUs sharing it: the first H_ENTER_NESTED of a guest creates the nested
    guest in L0, and a concurrent first entry loses that race with H_PARAMETER, as in KVM.
    ``guest`` is the guest's L2 kernel, for a virtual-mode ``spec``.
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
        rs = RunStream(vcpu_id, lpid, resp.l0_address, resp.run_token, guest, hdec_every=resp.hdec_every, tlb_entries=spec.tlb_entries, tlb_ways=spec.tlb_ways)
        stats = rs.stats
        if live is not None:
            live[key] = LiveVcpu(vcpu_id, lpid, rs.vcpu, rs.lock)
        try:
            await rs.run(spec, vcpu_index)
        finally:
            if details is not None:  # accesses that ended in ERROR, with L0's reason
                with rs.lock:
                    reasons = rs.error_reasons.most_common(MAX_ERROR_REASONS)
                details += [f"lpid {lpid} vCPU {vcpu_id}: {n} access(es) ended in ERROR: {why}" for why, n in reasons]
            if segfault_details is not None:  # virtual mode: what the program would have died of
                segfault_details += [f"lpid {lpid} {d}" for d in rs.segfault_details]
            if rs.data is not None:  # data mode: the checker's counts and first losses
                with rs.lock:
                    stats.update(rs.data.checker.counters())
                    lost = list(rs.data.checker.details)
                if data_details is not None:
                    data_details += [
                        f"lpid {lpid} vCPU {vcpu_id}: access {d.index} at L2 {d.address:#x}: expected {d.expected:#x}, got {d.got:#x}: {d.why}" for d in lost
                    ]
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


__all__ = ["attach", "run_vcpu"]

"""The OS of one L2 guest, run by the L2 service: a core :class:`~nestmmu.core.l2.L2Kernel`
(process table and per-PID radix trees in L2 real memory) driven by the guest's vCPUs.

The kernel is pure: each of its operations returns a :class:`~nestmmu.core.l2.KernelOps`, the
real-mode stores its CPU makes and then the process-scoped tlbies it issues.  The vCPU that
needs the operation performs them (:class:`KernelCpu`, implemented by the Run stream): each
store as a real-mode data store through L0 (so it takes nested faults like any L2 store), the
tlbies as one ``ProcessTlbie`` that L0 broadcasts to every vCPU of the guest's shadow LPID.

One kernel per guest, created on the first virtual-mode workload for it; the first vCPU that
gets here boots it: the process table (``setup``), ``H_REGISTER_PROC_TBL`` through the guest's
L1 (L1 writes PATE dw1 and flushes the LPID), then each process a workload runs in
(``create_process``).  ``lock`` is the kernel's mm lock (Linux serialises page-table changes of
an mm under its page-table lock): a fault is handled, its stores performed and its tlbies
completed before another vCPU's fault is looked at, so a second fault on the same page finds
the first one's leaf (spurious fault: retry).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

import grpc
import structlog

from nestmmu.core import formats as f
from nestmmu.core.effects import Invalidation
from nestmmu.core.formats import Access
from nestmmu.core.l2 import KernelOps, L2Error, L2Kernel
from nestmmu.protos import l1_pb2, l1_pb2_grpc

from ..common import RPC_DEADLINE, metadata_with_request_id
from ..connection import insecure_channel

log = structlog.get_logger("l2.os")

#: The L2 kernel's base page (its process trees): 64K, as ppc64 Linux.
KERNEL_PAGE_SHIFT = 16
#: Where the kernel's page-table region starts and how large it is (L2 real addresses); the
#: anonymous pages it hands out follow it.
TABLE_BASE = 1 << 20
TABLE_SIZE = 7 << 20
#: L2 real memory a virtual-mode guest needs besides its data pages (RunWorkload adds it).
KERNEL_RESERVED = TABLE_BASE + TABLE_SIZE


@dataclass(frozen=True)
class Done:
    """What a kernel operation made its vCPU do."""

    stores: int = 0
    tlbies: int = 0  # process-scoped tlbies (ProcessTlbie)
    rpt_invalidates: int = 0  # process-scoped H_RPT_INVALIDATE hcalls (without GTSE)

    def __add__(self, other: Done) -> Done:
        return Done(self.stores + other.stores, self.tlbies + other.tlbies, self.rpt_invalidates + other.rpt_invalidates)


class KernelFailed(Exception):
    """The L2 kernel could not do what it needed (a store that did not reach memory, an hcall
    its L1 refused, out of memory); the message is one line."""


class KernelCpu(Protocol):
    """What a vCPU does for its kernel (the Run stream implements it)."""

    async def kernel_store(self, addr: int, value: int) -> str | None:
        """One real-mode doubleword store; None when it reached memory, else why not."""
        ...

    async def process_tlbie(self, invalidations: list[Invalidation]) -> None:
        """tlbie PRS=1 ...; tlbsync, over every vCPU of the guest."""
        ...

    async def l2_rpt_invalidate(self, pid: int, type_: int, pg_sizes: int, start: int, end: int) -> int:
        """H_RPT_INVALIDATE, process scoped (handled by L0); its H_* return code."""
        ...


def kernel_memory(memory: int, region_starts: list[int]) -> int:
    """The L2 real memory the kernel uses: plain RAM from 0 up to the first special region
    (ROM, MMIO, protected), which L2 Linux would not hand out as anonymous memory."""
    return min([memory, *region_starts])


class GuestOs:
    """One guest's L2 kernel and the mm lock its vCPUs take to change its page tables."""

    def __init__(self, l1_address: str, lpid: int, memory: int, use_rpt_invalidate: bool = False) -> None:
        self.l1_address = l1_address
        self.lpid = lpid
        # use_rpt_invalidate: a pseries L2 without GTSE (flushes with H_RPT_INVALIDATE, not tlbie).
        self.kernel = L2Kernel(memory, KERNEL_PAGE_SHIFT, table_base=TABLE_BASE, table_size=TABLE_SIZE, use_rpt_invalidate=use_rpt_invalidate)
        self.lock = asyncio.Lock()
        self.registered = False
        self._log = log.bind(l1=l1_address, l1_lpid=lpid)

    async def _perform(self, cpu: KernelCpu, ops: KernelOps) -> Done:
        """The stores in order, then the flushes (tlbies, or H_RPT_INVALIDATE hcalls).
        KernelFailed when a store did not reach memory (the tree would be half built: the
        access cannot go on) or an hcall failed."""
        for addr, value in ops.stores:
            why = await cpu.kernel_store(addr, value)
            if why is not None:
                raise KernelFailed(f"the L2 kernel's page-table store at L2 real {addr:#x} failed: {why}")
        if ops.invalidations:
            await cpu.process_tlbie(ops.invalidations)
        for pid, type_, pg_sizes, start, end in ops.rpt_invalidates:
            rc = await cpu.l2_rpt_invalidate(pid, type_, pg_sizes, start, end)
            if rc != f.H.SUCCESS:
                raise KernelFailed(f"the L2 kernel's H_RPT_INVALIDATE for PID {pid} returned {rc}")
        return Done(len(ops.stores), len(ops.invalidations), len(ops.rpt_invalidates))

    async def start_process(self, cpu: KernelCpu, pid: int) -> Done:
        """Boot the kernel if nobody did yet (process table, H_REGISTER_PROC_TBL), then create
        process ``pid`` if it does not exist; what it took."""
        async with self.lock:
            done = Done()
            try:
                if not self.registered:
                    if not self.kernel.process_table:
                        done += await self._perform(cpu, self.kernel.setup())
                    await self._register()
                    self.registered = True
                if pid not in self.kernel.procs:
                    done += await self._perform(cpu, self.kernel.create_process(pid))
                    self._log.info("process_created", pid=pid)
            except L2Error as e:
                raise KernelFailed(f"L2 kernel: {e}") from e
            return done

    async def _register(self) -> None:
        """H_REGISTER_PROC_TBL through L1 (which issues its flush to L0 before answering)."""
        dw1 = self.kernel.proc_tbl_dw1()
        async with insecure_channel(self.l1_address) as channel:
            try:
                resp = await l1_pb2_grpc.L1ServiceStub(channel).RegisterProcTbl(
                    l1_pb2.RegisterProcTblRequest(lpid=self.lpid, proc_tbl_dw1=dw1), timeout=RPC_DEADLINE, metadata=metadata_with_request_id()
                )
            except grpc.aio.AioRpcError as e:
                raise KernelFailed(f"H_REGISTER_PROC_TBL via L1 at {self.l1_address} failed: {e.code().name}: {e.details()}") from e
        if resp.hcall_rc != f.H.SUCCESS:
            raise KernelFailed(f"H_REGISTER_PROC_TBL for lpid {self.lpid} returned {resp.hcall_rc}")
        self._log.info("proc_tbl_registered", dw1=hex(dw1))

    async def unmap(self, cpu: KernelCpu, pid: int, ea: int, length: int) -> Done:
        """munmap / MADV_DONTNEED of [ea, ea + length): leaves cleared, then the process-scoped
        tlbies (radix__flush_tlb_range) to every vCPU of the guest."""
        async with self.lock:
            try:
                ops = self.kernel.unmap(pid, ea, length)
            except L2Error as e:
                raise KernelFailed(f"L2 kernel: {e}") from e
            return await self._perform(cpu, ops)

    async def handle_fault(self, cpu: KernelCpu, pid: int, ea: int, access: Access, dsisr: int) -> Done | None:
        """do_page_fault: demand-map or set R/C, performed; None = segfault (SIGSEGV)."""
        async with self.lock:
            try:
                ops = self.kernel.handle_fault(pid, ea, access, dsisr)
            except L2Error as e:  # out of memory: the process cannot go on here
                raise KernelFailed(f"L2 kernel: {e}") from e
            if ops is None:
                return None
            return await self._perform(cpu, ops)


__all__ = ["KERNEL_RESERVED", "Done", "GuestOs", "KernelCpu", "KernelFailed", "kernel_memory"]

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


def kernel_memory(memory: int, region_starts: list[int]) -> int:
    """The L2 real memory the kernel uses: plain RAM from 0 up to the first special region
    (ROM, MMIO, protected), which L2 Linux would not hand out as anonymous memory."""
    return min([memory, *region_starts])


class GuestOs:
    """One guest's L2 kernel and the mm lock its vCPUs take to change its page tables."""

    def __init__(self, l1_address: str, lpid: int, memory: int) -> None:
        self.l1_address = l1_address
        self.lpid = lpid
        self.kernel = L2Kernel(memory, KERNEL_PAGE_SHIFT, table_base=TABLE_BASE, table_size=TABLE_SIZE)
        self.lock = asyncio.Lock()
        self.registered = False
        self._log = log.bind(l1=l1_address, l1_lpid=lpid)

    async def _perform(self, cpu: KernelCpu, ops: KernelOps) -> tuple[int, int]:
        """The stores in order, then the tlbies; (stores, tlbies) done.  KernelFailed when a
        store did not reach memory (the tree would be half built: the access cannot go on)."""
        for addr, value in ops.stores:
            why = await cpu.kernel_store(addr, value)
            if why is not None:
                raise KernelFailed(f"the L2 kernel's page-table store at L2 real {addr:#x} failed: {why}")
        if ops.invalidations:
            await cpu.process_tlbie(ops.invalidations)
        return len(ops.stores), len(ops.invalidations)

    async def start_process(self, cpu: KernelCpu, pid: int) -> tuple[int, int]:
        """Boot the kernel if nobody did yet (process table, H_REGISTER_PROC_TBL), then create
        process ``pid`` if it does not exist.  (stores, tlbies) performed."""
        async with self.lock:
            done = (0, 0)
            try:
                if not self.registered:
                    if not self.kernel.process_table:
                        s, t = await self._perform(cpu, self.kernel.setup())
                        done = (done[0] + s, done[1] + t)
                    await self._register()
                    self.registered = True
                if pid not in self.kernel.procs:
                    s, t = await self._perform(cpu, self.kernel.create_process(pid))
                    done = (done[0] + s, done[1] + t)
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

    async def unmap(self, cpu: KernelCpu, pid: int, ea: int, length: int) -> tuple[int, int]:
        """munmap / MADV_DONTNEED of [ea, ea + length): leaves cleared, then the process-scoped
        tlbies (radix__flush_tlb_range) to every vCPU of the guest.  (stores, tlbies)."""
        async with self.lock:
            try:
                ops = self.kernel.unmap(pid, ea, length)
            except L2Error as e:
                raise KernelFailed(f"L2 kernel: {e}") from e
            return await self._perform(cpu, ops)

    async def handle_fault(self, cpu: KernelCpu, pid: int, ea: int, access: Access, dsisr: int) -> tuple[int, int] | None:
        """do_page_fault: demand-map or set R/C, performed; None = segfault (SIGSEGV)."""
        async with self.lock:
            try:
                ops = self.kernel.handle_fault(pid, ea, access, dsisr)
            except L2Error as e:  # out of memory: the process cannot go on here
                raise KernelFailed(f"L2 kernel: {e}") from e
            if ops is None:
                return None
            return await self._perform(cpu, ops)


__all__ = ["KERNEL_RESERVED", "GuestOs", "KernelCpu", "KernelFailed", "kernel_memory"]

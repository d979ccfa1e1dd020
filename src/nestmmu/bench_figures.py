"""The figures of issue 8 for ``nestmmu bench``: nested faults, broadcasts, memory and trace
replay, each measured on real processes (or in process where it says so).

Every function returns its figure(s) plus what was measured to get them, so the JSON says how
a number came about.  Ratios to the baselines are computed by :mod:`nestmmu.bench`.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

from nestmmu.cluster import RawVcpu, insecure_channel
from nestmmu.core.formats import Access
from nestmmu.protos import l0_pb2_grpc, l1_pb2, l1_pb2_grpc, l2_pb2, l2_pb2_grpc

PAGE = 64 << 10
LOAD = int(Access.LOAD)


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * p))] if s else 0.0


async def create_guest(l1: str, memory: int, page_shift: int = 16) -> int:
    async with insecure_channel(l1) as ch:
        r = await l1_pb2_grpc.L1ServiceStub(ch).CreateGuest(l1_pb2.CreateGuestRequest(page_shift=page_shift, memory_bytes=memory), timeout=60)
    return int(r.lpid)


async def map_all(l1: str, lpid: int, memory: int) -> None:
    async with insecure_channel(l1) as ch:
        await l1_pb2_grpc.L1ServiceStub(ch).MapPages(
            l1_pb2.MapPagesRequest(lpid=lpid, n_gpa=0, length=memory, read=True, write=True, execute=True), timeout=600
        )


async def l0_counter(l0: str, key: str) -> int:
    from nestmmu.protos import l0_pb2

    async with insecure_channel(l0) as ch:
        r = await l0_pb2_grpc.L0ServiceStub(ch).GetStats(l0_pb2.GetStatsRequest(), timeout=30)
    return int(r.counters.values.get(key, 0))


async def fault_latency(l0: str, l1: str, n: int) -> dict[str, Any]:
    """One vCPU, one access at a time, each to a fresh page L1 has already mapped: the time
    from sending the batch of one to its result (a nested fault with one L1 walk)."""
    memory = (n + 16) * PAGE
    lpid = await create_guest(l1, memory)
    await map_all(l1, lpid, memory)
    async with insecure_channel(l1) as ch1, insecure_channel(l0) as ch0:
        a = await l1_pb2_grpc.L1ServiceStub(ch1).AttachVcpu(l1_pb2.AttachVcpuRequest(lpid=lpid, vcpu_id=0), timeout=30)
        v = RawVcpu(l0_pb2_grpc.L0ServiceStub(ch0), a.run_token)
        await asyncio.wait_for(v.attached, 30)
        before = await l0_counter(l0, "l0.nested_faults")
        xs: list[float] = []
        for p in range(n):
            t = time.perf_counter()
            await v.run([p * PAGE], [LOAD])
            xs.append((time.perf_counter() - t) * 1e6)
        faults = await l0_counter(l0, "l0.nested_faults") - before
        await v.close()
    if faults != n:
        raise RuntimeError(f"fault latency: expected {n} nested faults, L0 counted {faults}")
    return {"p50_us": round(pct(xs, 0.5), 1), "p99_us": round(pct(xs, 0.99), 1), "faults": faults}


async def faults_per_s(l0: str, l1: str, l2: str, guests: int, vcpus: int, per_vcpu: int) -> dict[str, Any]:
    """``guests`` guests of one L1 with ``vcpus`` vCPUs each, run concurrently by the L2
    service; every guest's L1 tree is populated first (MapPages), so a TLB miss on a fresh
    page is one nested fault with one L1 walk.  Faults are L0's count over the wall time."""
    memory = 1 << 30
    lpids = [await create_guest(l1, memory) for _ in range(guests)]
    for lpid in lpids:
        await map_all(l1, lpid, memory)
    before = await l0_counter(l0, "l0.nested_faults")
    t = time.perf_counter()
    async with insecure_channel(l2) as ch:
        stub = l2_pb2_grpc.L2ServiceStub(ch)
        wl = l2_pb2.Workload(pattern="uniform", accesses=per_vcpu, seed=11, footprint_bytes=memory, batch_size=1024)
        reps = await asyncio.gather(
            *(stub.RunWorkload(l2_pb2.RunWorkloadRequest(l1_address=l1, lpid=lpid, vcpus=vcpus, workload=wl), timeout=1800) for lpid in lpids)
        )
    dt = time.perf_counter() - t
    faults = await l0_counter(l0, "l0.nested_faults") - before
    errors = sum(r.report.errors for r in reps)
    if errors:
        raise RuntimeError(f"faults_per_s: {errors} access errors: {[d for r in reps for d in r.report.error_details][:3]}")
    return {"guests": guests, "vcpus_per_guest": vcpus, "nested_faults": faults, "seconds": round(dt, 3), "per_s": round(faults / dt, 1)}


async def broadcast(l0: str, l1: str, vcpus: int, rounds: int) -> dict[str, Any]:
    """L1 unmaps a page of a guest with ``vcpus`` attached vCPUs (each on its own Run stream):
    L0's time from sending the LPID-tagged tlbie to the last ack (its own p50/p99, on an L0
    that has done nothing else), and the UnmapPages RPC end to end."""
    lpid = await create_guest(l1, 64 << 20)
    async with insecure_channel(l1) as ch1, insecure_channel(l0) as ch0:
        l1s = l1_pb2_grpc.L1ServiceStub(ch1)
        l0s = l0_pb2_grpc.L0ServiceStub(ch0)
        cpus = []
        for v in range(vcpus):
            a = await l1s.AttachVcpu(l1_pb2.AttachVcpuRequest(lpid=lpid, vcpu_id=v), timeout=30)
            cpus.append(RawVcpu(l0s, a.run_token))
        for c in cpus:
            await asyncio.wait_for(c.attached, 30)
        page = 1 << 20
        unmap_us: list[float] = []
        acks_before = await l0_counter(l0, "svc.broadcast_acks")
        for _ in range(rounds):
            await l1s.MapPages(l1_pb2.MapPagesRequest(lpid=lpid, n_gpa=page, length=PAGE, read=True, write=True, execute=True), timeout=30)
            await cpus[0].run([page], [LOAD])  # fault it into the shadow table
            t = time.perf_counter()
            await l1s.UnmapPages(l1_pb2.UnmapPagesRequest(lpid=lpid, n_gpa=page, length=PAGE), timeout=30)
            unmap_us.append((time.perf_counter() - t) * 1e6)
        acks = await l0_counter(l0, "svc.broadcast_acks") - acks_before
        p50 = await l0_counter(l0, "svc.broadcast_latency_us_p50")
        p99 = await l0_counter(l0, "svc.broadcast_latency_us_p99")
        for c in cpus:
            await c.close()
    return {
        "vcpus": vcpus,
        "rounds": rounds,
        "acks": acks,
        "l0_broadcast_us_p50": p50,
        "l0_broadcast_us_p99": p99,
        "unmap_rpc_us_p50": round(pct(unmap_us, 0.5), 1),
        "unmap_rpc_us_p99": round(pct(unmap_us, 0.99), 1),
    }


def _rss_bytes(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def rss_mib(pids: list[int]) -> float:
    """Resident set size of these processes together, MiB (from /proc)."""
    return round(sum(_rss_bytes(p) for p in pids) / (1 << 20), 1)


def _bytes_per_mapped_page_here(pages: int, method: str) -> dict[str, Any]:
    """In this process: the memory growth of mapping ``pages`` 64K pages in one L1 guest (the
    L1 tree) and faulting each once through L0 (L0's partition-scoped PTE, the shadow leaf,
    the nest rmap), per page.  No vCPU TLB: L0's walk is driven directly.  ``method``
    "tracemalloc": the Python allocations made (exact; slows the faults several times);
    "rss": resident set growth (what the OS sees, but memory freed during set-up is reused
    first, so it understates, and grows unevenly with ``pages``)."""
    import tracemalloc

    from nestmmu.core.sim import InProcessCluster

    def now() -> int:
        return tracemalloc.get_traced_memory()[0] if method == "tracemalloc" else _rss_bytes()

    c = InProcessCluster()
    c.add_l1("l1")
    lpid = c.create_guest("l1", page_shift=16, memory=pages * PAGE)
    s = c.attach_vcpu("l1", lpid, 0)
    gc.collect()
    if method == "tracemalloc":
        tracemalloc.start()
    b0 = now()
    _, hcalls = c.l1s["l1"].map_pages(lpid, 0, pages * PAGE)
    c.issue_all("l1", hcalls)
    gc.collect()
    b1 = now()
    l0, gp, vid = c.l0, s.gp, s.vcpu.vcpu_id
    load = Access.LOAD
    for p in range(pages):
        c.drive(l0.run_access(gp, vid, p * PAGE + 8, load))
    gc.collect()
    b2 = now()
    if l0.stats["nested_faults"] != pages:
        raise RuntimeError(f"bytes_per_mapped_page: {l0.stats['nested_faults']} nested faults for {pages} pages")
    return {
        "pages": pages,
        "method": method,
        "l1_tree_bytes_per_page": round((b1 - b0) / pages, 1),
        "l0_and_shadow_bytes_per_page": round((b2 - b1) / pages, 1),
        "bytes_per_page": round((b2 - b0) / pages, 1),
    }


def bytes_per_mapped_page(pages: int, method: str = "tracemalloc") -> dict[str, Any]:
    """:func:`_bytes_per_mapped_page_here` in a fresh Python process, so the growth is not
    hidden by memory an earlier measurement freed."""
    import json
    import sys

    out = subprocess.run(
        [sys.executable, "-P", "-m", "nestmmu.bench_figures", "bytes-per-page", str(pages), method], capture_output=True, text=True, check=False, timeout=3600
    )
    if out.returncode != 0:
        raise RuntimeError(f"bytes_per_mapped_page: the measuring process failed: {out.stderr.strip().splitlines()[-1:]}")
    got: dict[str, Any] = json.loads(out.stdout)
    return got


def record_lackey_trace(min_records: int, out_dir: str) -> tuple[str, int, str]:
    """Record a real program's memory trace with valgrind's lackey (``ls`` over system
    directories, repeated over more of them until the trace holds ``min_records`` records);
    (path, records, what ran).  RuntimeError when valgrind is not installed."""
    if shutil.which("valgrind") is None:
        raise RuntimeError("valgrind is not installed (apt-get install valgrind)")
    path = os.path.join(out_dir, "lackey.trace")
    records = 0
    ran: list[str] = []
    dirs = ["/etc", "/usr/bin", "/usr/lib", "/usr/share"]
    with open(path, "w", encoding="ascii") as out:
        for d in dirs:
            if records >= min_records:
                break
            log = os.path.join(out_dir, "one.trace")
            cmd = ["valgrind", "--tool=lackey", "--trace-mem=yes", f"--log-file={log}", "/bin/ls", d]
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            with open(log, encoding="ascii", errors="replace") as fh:
                for line in fh:
                    if line[:1] in (" ", "I") and "," in line:
                        out.write(line)
                        records += 1
            os.unlink(log)
            ran.append(f"ls {d}")
    return path, records, "; ".join(ran)


def trace_accesses(path: str) -> int:
    """Accesses a lackey trace replays to (an M record is a load and a store)."""
    from nestmmu.core.workload import read_lackey

    return sum(1 for _ in read_lackey(path))


async def trace_replay(l1: str, l2: str, path: str, records: int) -> dict[str, Any]:
    """The whole trace on one vCPU through the cluster (L2 parses it as it goes): ``records``
    is its number of accesses (:func:`trace_accesses`), so it runs once, end to end."""
    lpid = await create_guest(l1, 1 << 30)
    async with insecure_channel(l2) as ch:
        wl = l2_pb2.Workload(pattern="trace", trace_path=path, accesses=records, footprint_bytes=1 << 30, batch_size=4096)
        t = time.perf_counter()
        r = await l2_pb2_grpc.L2ServiceStub(ch).RunWorkload(l2_pb2.RunWorkloadRequest(l1_address=l1, lpid=lpid, vcpus=1, workload=wl), timeout=3600)
        dt = time.perf_counter() - t
    rep = r.report
    if rep.accesses != records or rep.errors:
        raise RuntimeError(f"trace replay: {rep.accesses} of {records} accesses ran, {rep.errors} errors")
    return {
        "records": records,
        "seconds": round(dt, 2),
        "tlb_hits": rep.tlb_hits,
        "fills": rep.fills,
        "accesses_per_s": round(records / dt),
    }


def temp_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="nestmmu-bench-")


def write_page_trace(path: str, pages: int) -> None:
    """A lackey-format trace with one load per 64K page of ``pages`` pages, in order."""
    with open(path, "w", encoding="ascii") as fh:
        for p in range(pages):
            fh.write(f" L {p * PAGE + 8:x},8\n")


async def rss_after_touching(l1: str, l2: str, pids: list[int], pages: int, vcpus: int, trace_dir: str) -> dict[str, Any]:
    """Every one of ``vcpus`` vCPUs of one guest loads one word of each of ``pages`` 64K pages
    (a shared working set): the resident memory of all service processes together, before
    and after.  Covers L0 (shadow, rmap, its own tables), L1 (its tree) and L2 (the TLBs)."""
    memory = pages * PAGE
    path = os.path.join(trace_dir, "pages.trace")
    write_page_trace(path, pages)
    before = rss_mib(pids)
    lpid = await create_guest(l1, memory)
    await map_all(l1, lpid, memory)
    async with insecure_channel(l2) as ch:
        # Small batches: each miss here is a nested fault, and L2 gives up on a batch whose
        # results make no progress for 30 s (L0 answers a batch's faults one by one).
        wl = l2_pb2.Workload(pattern="trace", trace_path=path, accesses=pages, footprint_bytes=memory, batch_size=256)
        t = time.perf_counter()
        r = await l2_pb2_grpc.L2ServiceStub(ch).RunWorkload(l2_pb2.RunWorkloadRequest(l1_address=l1, lpid=lpid, vcpus=vcpus, workload=wl), timeout=7200)
        dt = time.perf_counter() - t
    after = rss_mib(pids)
    if r.report.errors:
        raise RuntimeError(f"rss: {r.report.errors} access errors: {list(r.report.error_details)[:3]}")
    return {"pages": pages, "vcpus": vcpus, "rss_mib_before": before, "rss_mib": after, "seconds": round(dt, 1), "fills": r.report.fills}


if __name__ == "__main__":  # python -m nestmmu.bench_figures bytes-per-page PAGES rss|tracemalloc
    import json
    import sys

    if len(sys.argv) != 4 or sys.argv[1] != "bytes-per-page" or sys.argv[3] not in ("rss", "tracemalloc"):
        print("usage: python -m nestmmu.bench_figures bytes-per-page PAGES rss|tracemalloc", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(_bytes_per_mapped_page_here(int(sys.argv[2]), sys.argv[3])))

"""``nestmmu bench``: figures for the hot paths and the cluster, each with a same-run baseline.

The report (``--json``) is one object: ``baselines`` (a plain gRPC unary and bidi-stream echo
between two processes, a plain ``dict.get``; see :mod:`nestmmu.bench_baselines`), ``figures``
(issue 8's list, see :mod:`nestmmu.bench_figures`), ``ratios`` (each figure over its
baseline), ``targets`` (issue 8's targets, met or not), ``details`` (how each figure was
measured), and the earlier ``core`` and ``cluster`` sections, kept as they were.

Core figures (in-process) come from :mod:`nestmmu.bench_core` with their ratio to a plain dict
lookup.  Cluster figures run real processes on loopback and are reported with their ratio to
the raw gRPC unary round trip (a health Check) measured in the same run:

* ``tlb_hit_accesses_per_s``: one vCPU in the L2 process on a footprint that fits its TLB.
* ``nested_faults_per_s``: 4 vCPUs touching fresh pages of a guest whose L1 tree is already
  populated (MapPages), so every miss is a full nested fault with one L1 walk.
* ``broadcast_rtt_us``: L1 unmaps a page that 8 attached vCPUs of one guest may cache; L0's
  broadcast-to-all-acks time (p50/p99) and the end-to-end UnmapPages RPC time.

Timings on shared 2-core machines are noisy: read ratios, not absolutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import io
import statistics
import subprocess
import sys
import time
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from nestmmu.cluster import insecure_channel
from nestmmu.protos import l0_pb2, l0_pb2_grpc, l1_pb2, l1_pb2_grpc, l2_pb2, l2_pb2_grpc


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] if xs else 0.0


async def raw_rtt_us(addr: str, n: int) -> dict[str, float]:
    async with insecure_channel(addr) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(20):
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        xs = []
        for _ in range(n):
            t = time.perf_counter()
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            xs.append((time.perf_counter() - t) * 1e6)
    return {"p50": round(_pct(xs, 0.5), 1), "p99": round(_pct(xs, 0.99), 1), "mean": round(statistics.fmean(xs), 1)}


async def _create_guest(l1: str, page_shift: int, memory: int) -> int:
    async with insecure_channel(l1) as ch:
        r = await l1_pb2_grpc.L1ServiceStub(ch).CreateGuest(l1_pb2.CreateGuestRequest(page_shift=page_shift, memory_bytes=memory), timeout=30)
    return int(r.lpid)


async def tlb_hits(l1: str, l2: str, accesses: int) -> dict[str, float]:
    lpid = await _create_guest(l1, 16, 16 << 20)
    async with insecure_channel(l2) as ch:
        wl = l2_pb2.Workload(pattern="uniform", accesses=accesses, seed=7, footprint_bytes=4 << 16, store_fraction=0.3, ifetch_fraction=0.0, batch_size=4096)
        r = await l2_pb2_grpc.L2ServiceStub(ch).RunWorkload(l2_pb2.RunWorkloadRequest(l1_address=l1, lpid=lpid, vcpus=1, workload=wl), timeout=600)
    rep = r.report
    return {
        "accesses": rep.accesses,
        "tlb_hits": rep.tlb_hits,
        "seconds": round(rep.seconds, 4),
        "tlb_hit_accesses_per_s": round(rep.accesses / rep.seconds) if rep.seconds else 0,
    }


async def _l0_stat(l0: str, key: str) -> int:
    async with insecure_channel(l0) as ch:
        r = await l0_pb2_grpc.L0ServiceStub(ch).GetStats(l0_pb2.GetStatsRequest(), timeout=10)
    return int(r.counters.values.get(key, 0))


async def nested_faults(l0: str, l1: str, l2: str, per_vcpu: int, vcpus: int = 4) -> dict[str, float]:
    memory = 1 << 30
    lpid = await _create_guest(l1, 16, memory)
    async with insecure_channel(l1) as ch:
        await l1_pb2_grpc.L1ServiceStub(ch).MapPages(
            l1_pb2.MapPagesRequest(lpid=lpid, n_gpa=0, length=memory, read=True, write=True, execute=True), timeout=120
        )
    before = await _l0_stat(l0, "l0.nested_faults")
    t = time.perf_counter()
    async with insecure_channel(l2) as ch:
        wl = l2_pb2.Workload(pattern="uniform", accesses=per_vcpu, seed=11, footprint_bytes=memory, store_fraction=0.0, ifetch_fraction=0.0, batch_size=1024)
        await l2_pb2_grpc.L2ServiceStub(ch).RunWorkload(l2_pb2.RunWorkloadRequest(l1_address=l1, lpid=lpid, vcpus=vcpus, workload=wl), timeout=600)
    dt = time.perf_counter() - t
    faults = await _l0_stat(l0, "l0.nested_faults") - before
    return {"vcpus": vcpus, "nested_faults": faults, "seconds": round(dt, 3), "nested_faults_per_s": round(faults / dt, 1)}


async def broadcast(l0: str, l1: str, rounds: int, vcpus: int = 8) -> dict[str, Any]:
    from nestmmu.bench_figures import broadcast as measure

    return await measure(l0, l1, vcpus, rounds)


def _cluster(quick: bool, progress: bool) -> dict[str, Any]:
    from nestmmu.cluster import local_cluster

    def say(msg: str) -> None:
        if progress:
            print(f"bench: {msg}", file=sys.stderr, flush=True)

    say("starting L0, two L1s and L2 on loopback")
    with local_cluster(("l1a", "l1b")) as c:

        async def go() -> dict[str, Any]:
            out: dict[str, Any] = {}
            say("raw gRPC round trip")
            out["raw_grpc_rtt_us"] = rtt = await raw_rtt_us(c.l0, 100 if quick else 500)
            say("TLB-hit accesses per second (1 vCPU)")
            out["tlb_hits"] = th = await tlb_hits(c.l1s["l1a"], c.l2, 100_000 if quick else 1_000_000)
            th["accesses_per_rtt"] = round(th["tlb_hit_accesses_per_s"] * rtt["p50"] / 1e6, 1)
            say("nested faults per second (4 vCPUs)")
            out["nested_faults"] = nf = await nested_faults(c.l0, c.l1s["l1a"], c.l2, 250 if quick else 1500)
            nf["faults_per_rtt"] = round(nf["nested_faults_per_s"] * rtt["p50"] / 1e6, 3)
            say("invalidation broadcast round trip (8 vCPUs)")
            out["broadcast"] = bc = await broadcast(c.l0, c.l1s["l1b"], 30 if quick else 200)
            bc["p50_ratio_to_rtt"] = round(bc["l0_broadcast_us_p50"] / rtt["p50"], 2) if rtt["p50"] else 0.0
            out["targets"] = {
                "nested_faults_per_s>=1000": nf["nested_faults_per_s"] >= 1000,
                "broadcast_p50<=3x_rtt": bc["p50_ratio_to_rtt"] <= 3.0,
                "tlb_hits_per_s>=1M": th["tlb_hit_accesses_per_s"] >= 1_000_000,
            }
            return out

        return asyncio.run(go())


def _issue8(quick: bool, say: Any, core: dict[str, Any], rss_pages: int) -> dict[str, Any]:
    """Baselines and figures of issue 8 (fresh local clusters where a figure needs an L0 that
    has done nothing else)."""
    from nestmmu import bench_baselines as bb
    from nestmmu import bench_figures as bf
    from nestmmu.cluster import local_cluster

    details: dict[str, Any] = {}
    say("baselines: gRPC unary and bidi-stream echo between two processes")
    with bb.echo_server() as addr:
        echo = asyncio.run(bb.echo_rtts_us(addr, 200 if quick else 1000))
    details["echo"] = echo
    baselines = {
        "grpc_unary_rtt_p50_us": echo["unary_us"]["p50"],
        "grpc_bidi_rtt_p50_us": echo["bidi_us"]["p50"],
        "dict_get_ns": round(core["dict_lookup"]["ns_per_op"], 2),
    }
    figures: dict[str, Any] = {
        "tlb_hit_per_s": round(core["tlb_hit"]["ops_per_s"]),
        "core_nested_fault_per_s": round(core["nested_fault"]["ops_per_s"]),
    }
    per_vcpu = 300 if quick else 1500
    with local_cluster(("l1a", "l1b")) as c:

        async def faults() -> None:
            say("fault latency (1 vCPU, one fault at a time, L1 mapped)")
            details["fault_latency"] = fl = await bf.fault_latency(c.l0, c.l1s["l1a"], 200 if quick else 1000)
            figures["fault_latency_p50_us"] = fl["p50_us"]
            for key, guests, vcpus in (("faults_per_s_1vcpu", 1, 1), ("faults_per_s_8vcpu", 1, 8), ("faults_per_s_8guests", 8, 1)):
                say(f"nested faults per second ({guests} guest(s) x {vcpus} vCPU(s))")
                details[key] = r = await bf.faults_per_s(c.l0, c.l1s["l1b"], c.l2, guests, vcpus, per_vcpu * (8 if vcpus == 1 and guests == 1 else 1))
                figures[key] = r["per_s"]

        asyncio.run(faults())
    for n in (1, 16):
        say(f"invalidation broadcast ({n} vCPU(s), an L0 that did nothing else)")
        with local_cluster(("l1a",)) as c:
            details[f"broadcast_{n}vcpu"] = b = asyncio.run(bf.broadcast(c.l0, c.l1s["l1a"], n, 50 if quick else 300))
        figures[f"broadcast_p50_us_{n}vcpu"] = b["l0_broadcast_us_p50"]
        if n == 16:
            figures["broadcast_p99_us_16vcpu"] = b["l0_broadcast_us_p99"]
    pages = 20_000 if quick else 100_000
    say(f"bytes per mapped page (Python allocations, tracemalloc, {pages} pages, a fresh process)")
    details["bytes_per_mapped_page"] = m = bf.bytes_per_mapped_page(pages, "tracemalloc")
    figures["bytes_per_mapped_page"] = m["bytes_per_page"]
    say(f"bytes per mapped page (resident growth, {pages} pages, a fresh process)")
    details["bytes_per_mapped_page_rss"] = bf.bytes_per_mapped_page(pages, "rss")
    with bf.temp_dir() as tmp, local_cluster(("l1a",)) as c:
        say(f"resident memory of all services after 8 vCPUs touch {rss_pages} pages")
        details["rss"] = r = asyncio.run(bf.rss_after_touching(c.l1s["l1a"], c.l2, [p.pid for p in c.procs], rss_pages, 8, tmp))
        if rss_pages >= 1 << 20:
            figures["rss_mib_1m_pages_8vcpu"] = r["rss_mib"]
        else:
            figures["rss_mib_1m_pages_8vcpu"] = None
            figures[f"rss_mib_{rss_pages}_pages_8vcpu"] = r["rss_mib"]
            growth = (r["rss_mib"] - r["rss_mib_before"]) / rss_pages
            details["rss"]["note"] = f"measured at {rss_pages} pages, not 1M (--rss-pages 1048576 measures it; it takes long until faults are batched)"
            details["rss"]["rss_mib_1m_pages_8vcpu_extrapolated"] = round(r["rss_mib_before"] + growth * (1 << 20), 1)
    with bf.temp_dir() as tmp:
        want = 1_000_000
        try:
            say(f"recording a lackey trace of >= {want} records (valgrind, ls)")
            path, records, ran = bf.record_lackey_trace(want, tmp)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            figures["trace_replay_accesses_per_s"] = None
            details["trace_replay"] = {"error": f"no trace: {e}"}
        else:
            accesses = bf.trace_accesses(path)
            with local_cluster(("l1a",)) as c:
                say(f"replaying the whole trace ({records} records, {accesses} accesses) on one vCPU")
                details["trace_replay"] = t = asyncio.run(bf.trace_replay(c.l1s["l1a"], c.l2, path, accesses))
            t["program"] = ran
            t["lackey_records"] = records
            figures["trace_replay_accesses_per_s"] = t["accesses_per_s"]
    unary, bidi, dict_ns = baselines["grpc_unary_rtt_p50_us"], baselines["grpc_bidi_rtt_p50_us"], baselines["dict_get_ns"]
    ratios = {
        "tlb_hit_per_s_x_dict_get_rate": round(figures["tlb_hit_per_s"] * dict_ns / 1e9, 3),
        "fault_latency_p50_x_unary_rtt": round(figures["fault_latency_p50_us"] / unary, 2),
        "faults_per_unary_rtt_8vcpu": round(figures["faults_per_s_8vcpu"] * unary / 1e6, 2),
        "faults_8vcpu_x_1vcpu": round(figures["faults_per_s_8vcpu"] / figures["faults_per_s_1vcpu"], 2),
        "broadcast_p50_16vcpu_x_unary_rtt": round(figures["broadcast_p50_us_16vcpu"] / unary, 2),
        "broadcast_p99_16vcpu_x_unary_rtt": round(figures["broadcast_p99_us_16vcpu"] / unary, 2),
        "broadcast_p50_16vcpu_x_1vcpu": round(figures["broadcast_p50_us_16vcpu"] / max(figures["broadcast_p50_us_1vcpu"], 1), 2),
        "unary_rtt_x_bidi_rtt": round(unary / bidi, 2),
    }
    rss = figures["rss_mib_1m_pages_8vcpu"]
    replay = figures["trace_replay_accesses_per_s"]
    targets = {
        "faults_per_s_8vcpu>=5000": figures["faults_per_s_8vcpu"] >= 5000,
        "faults_per_s_8vcpu>=2x_1vcpu": ratios["faults_8vcpu_x_1vcpu"] >= 2,
        "faults_per_s_8guests>=8000": figures["faults_per_s_8guests"] >= 8000,
        "fault_latency_p50<=2.5x_unary_rtt": ratios["fault_latency_p50_x_unary_rtt"] <= 2.5,
        "broadcast_p99_16vcpu<=3x_unary_rtt": ratios["broadcast_p99_16vcpu_x_unary_rtt"] <= 3,
        "broadcast_p50_16vcpu<=1.5x_1vcpu": ratios["broadcast_p50_16vcpu_x_1vcpu"] <= 1.5,
        "tlb_hit_per_s>=0.25x_dict_get_rate": ratios["tlb_hit_per_s_x_dict_get_rate"] >= 0.25,
        "trace_replay_accesses_per_s>=500000": None if replay is None else replay >= 500_000,
        "bytes_per_mapped_page<=48": figures["bytes_per_mapped_page"] <= 48,
        "rss_mib_1m_pages_8vcpu<=512": None if rss is None else rss <= 512,
    }
    return {"baselines": baselines, "figures": figures, "ratios": ratios, "targets": targets, "details": details}


def run(quick: bool = False, cluster: bool = True, progress: bool = True, rss_pages: int = 0) -> dict[str, Any]:
    """Every figure.  ``cluster`` False: the in-process core figures only.  ``rss_pages``: the
    shared working set for the resident-memory figure (0: 16384, or 32768 without ``quick``)."""
    out: dict[str, Any] = {}
    try:
        bench_core: Any = importlib.import_module("nestmmu.bench_core")
    except ImportError:  # pragma: no cover
        bench_core = None
    if bench_core is not None:
        if progress:
            print("bench: core hot paths (in-process)", file=sys.stderr, flush=True)
        # bench_core prints its own table; keep stdout for our report (the --json object).
        with contextlib.redirect_stdout(sys.stderr if progress else io.StringIO()):
            out["core"] = bench_core.run(quick=quick)
    if cluster:
        out["cluster"] = _cluster(quick, progress)

        def say(msg: str) -> None:
            if progress:
                print(f"bench: {msg}", file=sys.stderr, flush=True)

        out.update(_issue8(quick, say, out["core"], rss_pages or (16_384 if quick else 32_768)))
    return out

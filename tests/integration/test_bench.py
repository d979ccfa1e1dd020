"""The bench's baselines and issue-8 figures, each on a small scale (a benchmark is never a
timed test: these check that every figure measures what it says, not how fast it is)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from lackey_synth import write_synthetic_trace
from test_cli import one_line, run

from nestmmu import bench_baselines as bb
from nestmmu import bench_figures as bf
from nestmmu import cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lc() -> Iterator[cluster.LocalCluster]:
    with cluster.local_cluster(("l1a",)) as c:
        yield c


def test_echo_baselines_are_round_trips_to_another_process() -> None:
    with bb.echo_server() as addr:
        got = asyncio.run(bb.echo_rtts_us(addr, 30))
    for kind in ("unary_us", "bidi_us"):
        s = got[kind]
        assert s["n"] == 30 and 0 < s["p50"] <= s["p99"], got


def test_fault_latency_times_one_nested_fault_per_access(lc: cluster.LocalCluster) -> None:
    got = asyncio.run(bf.fault_latency(lc.l0, lc.l1s["l1a"], 20))
    assert got["faults"] == 20 and 0 < got["p50_us"] <= got["p99_us"]


def test_faults_per_s_counts_l0_nested_faults(lc: cluster.LocalCluster) -> None:
    got = asyncio.run(bf.faults_per_s(lc.l0, lc.l1s["l1a"], lc.l2, guests=2, vcpus=2, per_vcpu=50))
    # 4 vCPUs x 50 uniform accesses over 16384 pages: nearly every access is a first touch.
    assert 150 <= got["nested_faults"] <= 200 and got["per_s"] > 0, got


def test_broadcast_is_acked_by_every_vcpu_every_round(lc: cluster.LocalCluster) -> None:
    got = asyncio.run(bf.broadcast(lc.l0, lc.l1s["l1a"], vcpus=3, rounds=4))
    assert got["acks"] == 3 * 4, got
    assert 0 < got["l0_broadcast_us_p50"] <= got["l0_broadcast_us_p99"]


def test_bytes_per_mapped_page_splits_l1_tree_and_l0() -> None:
    got = bf.bytes_per_mapped_page(3000)
    assert got["method"] == "tracemalloc"
    assert got["l1_tree_bytes_per_page"] > 0 and got["l0_and_shadow_bytes_per_page"] > 0, got
    assert got["bytes_per_page"] == pytest.approx(got["l1_tree_bytes_per_page"] + got["l0_and_shadow_bytes_per_page"], abs=0.2)


def test_trace_replay_runs_every_record_once(lc: cluster.LocalCluster, tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    write_synthetic_trace(str(path), 5000, seed=3)
    n = bf.trace_accesses(str(path))
    assert n >= 5000
    got = asyncio.run(bf.trace_replay(lc.l1s["l1a"], lc.l2, str(path), n))
    assert got["records"] == n and got["fills"] > 0 and got["tlb_hits"] > 0, got  # trace_replay raises unless all n ran


def test_rss_covers_every_service_process(lc: cluster.LocalCluster, tmp_path: Path) -> None:
    got = asyncio.run(bf.rss_after_touching(lc.l1s["l1a"], lc.l2, [p.pid for p in lc.procs], 256, 2, str(tmp_path)))
    # Each of 2 vCPUs fills each page once (no TLB shares entries across vCPUs).
    assert got["fills"] == 2 * 256 and got["rss_mib"] > 0, got


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_recorded_lackey_trace_holds_what_was_asked(tmp_path: Path) -> None:
    path, records, ran = bf.record_lackey_trace(10_000, str(tmp_path))
    assert records >= 10_000 and ran.startswith("ls ")
    with open(path, encoding="ascii") as fh:
        assert sum(1 for _ in fh) == records


def test_bench_refuses_a_bad_rss_pages(tmp_path: Path) -> None:
    r = run("bench", "--rss-pages", "-3", tmp=tmp_path)
    assert r.returncode == 2 and "--rss-pages" in one_line(r), r.stderr

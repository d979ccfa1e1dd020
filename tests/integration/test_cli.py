"""What a user meets at the terminal: one line on stderr naming the problem, and the exit codes
of cli.py (0 ok, 1 found a problem, 2 usage, 3 could not run, 4 inconclusive).

The CLI runs as a subprocess (as a user runs it), with TMPDIR pointed at the test's own folder
so what the demo leaves behind can be counted.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from nestmmu import cli, cluster
from nestmmu.protos import l0_pb2, l0_pb2_grpc, l1_pb2, l1_pb2_grpc

pytestmark = [pytest.mark.integration]

NESTMMU = os.path.join(os.path.dirname(sys.executable), "nestmmu")


def run(*args: str, cwd: str | Path | None = None, tmp: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    return subprocess.run([NESTMMU, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_exit_code_constants() -> None:
    assert (cli.EXIT_OK, cli.EXIT_PROBLEM, cli.EXIT_USAGE, cli.EXIT_CANNOT_RUN, cli.EXIT_INCONCLUSIVE) == (0, 1, 2, 3, 4)


@pytest.mark.parametrize("command", ["audit", "stats"])
def test_unreachable_l0_is_one_line_exit_3(command: str) -> None:
    r = run(command, "--l0", "127.0.0.1:1")
    assert r.returncode == cli.EXIT_CANNOT_RUN
    assert one_line(r) == f"nestmmu {command}: L0 at 127.0.0.1:1 is unreachable (connection refused)"
    assert r.stdout == ""


def test_unresolvable_host_is_one_line_exit_3() -> None:
    r = run("audit", "--l0", "nonsense.invalid:50051")
    assert r.returncode == cli.EXIT_CANNOT_RUN
    assert one_line(r) == "nestmmu audit: L0 at nonsense.invalid:50051 cannot be resolved (unknown host name)"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["stats", "--l0", "127.0.0.1"], "nestmmu stats: argument --l0: '127.0.0.1' is not HOST:PORT (the port is required)"),
        (["audit", "--l0", "nonsense"], "nestmmu audit: argument --l0: 'nonsense' is not HOST:PORT (the port is required)"),
        (["audit", "--l0", "127.0.0.1:70000"], "nestmmu audit: argument --l0: '127.0.0.1:70000': port 70000 is not in 1..65535"),
        (["serve", "l0", "--port", "99999"], "nestmmu serve: argument --port: 99999 is not in 1..65535"),
        (["demo", "--accesses", "-5"], "nestmmu demo: argument --accesses: -5 is not allowed (must be at least 1)"),
        (["workload", "--l1", "l1a=127.0.0.1", "--l2", "127.0.0.1:2"], "nestmmu workload: argument --l1: '127.0.0.1' is not HOST:PORT (the port is required)"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(args: list[str], message: str) -> None:
    r = run(*args)
    assert r.returncode == cli.EXIT_USAGE
    assert one_line(r) == f"{message} (see {' '.join(['nestmmu', *args[:1]])} --help)"


def test_trace_of_a_missing_program_is_one_line_exit_2(tmp_path: Path) -> None:
    r = run("trace", "--out", str(tmp_path / "t.txt"), "--", "/nonexistent")
    assert r.returncode == cli.EXIT_USAGE
    assert one_line(r) in (
        "nestmmu trace: /nonexistent: no such program (or not executable)",
        "nestmmu trace: valgrind is not installed (apt-get install valgrind)",
    )


def test_demo_checks_the_trace_file_before_starting_anything(tmp_path: Path) -> None:
    r = run("demo", "--trace", "/nonexistent/trace.txt", tmp=tmp_path, timeout=20)
    assert r.returncode == cli.EXIT_USAGE
    assert one_line(r) == "nestmmu demo: --trace /nonexistent/trace.txt: no such file"
    assert list(tmp_path.iterdir()) == []  # no cluster was started (no log folder)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--mode", "virtual", "--data"), "nestmmu demo: --data runs in real mode only (it checks L2 real addresses): add --mode real"),
        (("--pid", "3"), "nestmmu demo: --pid needs virtual mode (--mode virtual, or --trace)"),
        (("--mode", "real", "--pid", "3"), "nestmmu demo: --pid needs virtual mode (--mode virtual, or --trace)"),
        (("--no-gtse",), "nestmmu demo: --no-gtse needs virtual mode (--mode virtual, or --trace)"),
    ],
)
def test_demo_checks_the_translation_mode_before_starting_anything(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    r = run("demo", *args, tmp=tmp_path, timeout=20)
    assert r.returncode == cli.EXIT_USAGE
    assert one_line(r) == message
    assert list(tmp_path.iterdir()) == []  # no cluster was started (no log folder)


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("demo", ("--tlb-entries", "1000"), "nestmmu demo: --tlb-entries 1000 --tlb-ways 4: TLB entries / ways must be a power of two"),
        (
            "demo",
            ("--tlb-entries", "12", "--tlb-ways", "8"),
            "nestmmu demo: --tlb-entries 12 --tlb-ways 8: TLB entries (12) must be a multiple of the ways (8)",
        ),
        ("workload", ("--l1", "127.0.0.1:1", "--l2", "127.0.0.1:2", "--tlb-entries", "6", "--tlb-ways", "2"), "nestmmu workload: --tlb-entries 6 --tlb-ways 2"),
        ("demo", ("--tlb-ways", "0"), "nestmmu demo: argument --tlb-ways: 0 is not in 1..4294967295"),
        ("demo", ("--tlb-entries", "-1"), "nestmmu demo: argument --tlb-entries: -1 is not in 0..4294967295"),
    ],
)
def test_a_bad_tlb_geometry_is_one_line_exit_2_before_starting_anything(tmp_path: Path, command: str, args: tuple[str, ...], message: str) -> None:
    r = run(command, *args, tmp=tmp_path, timeout=20)
    assert r.returncode == cli.EXIT_USAGE
    assert one_line(r).startswith(message)
    assert list(tmp_path.iterdir()) == []  # no cluster was started (no log folder)


def test_tlb_geometry_options_default_to_power9_and_take_unbounded() -> None:
    p = cli.build_parser()
    a = p.parse_args(["demo"])
    assert (a.tlb_entries, a.tlb_ways) == (1024, 4)
    a = p.parse_args(["workload", "--l1", "127.0.0.1:1", "--l2", "127.0.0.1:2", "--tlb-entries", "0"])
    assert (a.tlb_entries, a.tlb_ways) == (0, 4)
    cli._check_mode(a)  # unbounded is a geometry


def test_a_trace_replays_in_virtual_mode_unless_real_mode_is_asked_for(tmp_path: Path) -> None:
    """--trace defaults to virtual mode (a trace is a program's effective addresses); folding
    into L2 real memory only with --mode real, which then also takes --data."""
    trace = tmp_path / "t.txt"
    trace.write_text(" L 10000000,8\n", encoding="utf-8")
    p = cli.build_parser()
    assert cli._virtual(p.parse_args(["demo", "--trace", str(trace)]))
    assert not cli._virtual(p.parse_args(["demo", "--trace", str(trace), "--mode", "real"]))
    assert not cli._virtual(p.parse_args(["demo"]))
    assert cli._virtual(p.parse_args(["workload", "--l1", "127.0.0.1:1", "--l2", "127.0.0.1:2", "--mode", "virtual"]))
    r = run("demo", "--trace", str(trace), "--data", tmp=tmp_path, timeout=20)
    assert r.returncode == cli.EXIT_USAGE
    assert one_line(r).endswith("add --mode real to fold the trace")


@pytest.fixture(scope="module")
def l2_only() -> Iterator[str]:
    """A lone L2 service: the wrong service for commands that want L0 or L1."""
    with tempfile.TemporaryDirectory(prefix="nestmmu-test-") as d:
        port = cluster.free_port()
        p = cluster._spawn(["serve", "l2", "--host", "127.0.0.1", "--port", str(port)], f"{d}/l2.log")
        try:
            asyncio.run(cluster.wait_healthy([f"127.0.0.1:{port}"], 30))
            yield f"127.0.0.1:{port}"
        finally:
            p.terminate()
            p.wait(10)


def test_wrong_service_is_named(l2_only: str) -> None:
    r = run("audit", "--l0", l2_only)
    assert r.returncode == cli.EXIT_CANNOT_RUN
    assert one_line(r) == f"nestmmu audit: L0 at {l2_only} does not serve nestmmu.l0.v1.L0Service (another service listens there?)"
    r = run("workload", "--l1", f"l1a={l2_only}", "--l2", l2_only)
    assert r.returncode == cli.EXIT_CANNOT_RUN
    assert one_line(r) == f"nestmmu workload: L1 l1a at {l2_only} does not serve nestmmu.l1.v1.L1Service (another service listens there?)"


def _verdict_of(rep: dict[str, object]) -> int:
    audits = [rep[k] for k in ("audit", "audit_attached") if k in rep]
    return 0 if rep["errors"] == 0 and all(a["ok"] for a in audits) else 1  # type: ignore[index]


def test_demo_replays_a_trace_in_virtual_mode(tmp_path: Path) -> None:
    """demo --trace: the trace's effective addresses run through the L2 kernels' page tables
    (2-D walks, guest faults handled, L2 munmaps under churn) and the audit is clean."""
    trace = tmp_path / "t.txt"
    lines = [f" L {0x1000_0000 + i * 0x1_0000:x},8\n S {0x7FFF_0000_0000 - i * 0x1_0000:x},8\n" for i in range(8)]
    trace.write_text("".join(lines), encoding="utf-8")
    # 5 batches: L2 munmaps too; without GTSE, flushed with H_RPT_INVALIDATE through L0.
    r = run("demo", "--trace", str(trace), "--accesses", "5000", "--no-gtse", "--json", tmp=tmp_path, timeout=180)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["accesses"] == 8 * 5000 and rep["errors"] == 0, rep
    v = rep["virtual"]
    assert v["guest_faults"] > 0 and v["guest_faults_handled"] == v["guest_faults"] and v["segfaults"] == 0, v
    assert v["walks_2d"] > 0 and v["walk_refs_2d"] == v["walk_refs_process"] + v["walk_refs_shadow"] > 0, v
    assert v["munmaps"] > 0 and v["l2_rpt_invalidates"] > 0 and v["process_tlbies"] == 0, v
    assert rep["audit"]["outcome"] == "CLEAN", rep["audit"]


def test_demo_from_a_folder_holding_a_clone_named_nestmmu(tmp_path: Path) -> None:
    # A clone of the repository next to where the user runs the demo: python -m would import
    # it (its protos/ folder as nestmmu.protos) instead of the installed package.
    (tmp_path / "nestmmu" / "protos").mkdir(parents=True)
    (tmp_path / "nestmmu" / "README.md").write_text("a clone\n")
    r = run("demo", "--accesses", "300", "--json", cwd=tmp_path, tmp=tmp_path, timeout=180)
    assert r.returncode in (0, 1), r.stderr
    rep = json.loads(r.stdout)
    assert rep["accesses"] == 8 * 300 and rep["errors"] == 0, rep
    # The churn never asks L0 to migrate an MMIO hole (it used to get INVALID_ARGUMENT).
    assert "churn_errors" not in rep["churn"], rep["churn"]
    # One audit ran while the vCPUs were attached: their TLBs were dumped, I5 checked.
    assert rep["audit_attached"]["checked"]["tlb_dumps"] > 0, rep["audit_attached"]
    # Exit status follows the report, and the log folder stays only when something failed.
    assert r.returncode == _verdict_of(rep)
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith("nestmmu-")]
    if r.returncode == 0:
        assert left == [], left
    else:
        assert len(left) == 1 and f"service logs kept in {tmp_path / left[0]}" in r.stderr


def test_workload_with_failed_vcpus_exits_1_and_says_why(tmp_path: Path) -> None:
    """An L1 that hands vCPUs an L0 address where nothing listens: every vCPU fails to run,
    the audit is clean, and the workload must still fail (exit 1) and print each failure."""
    dead = cluster.free_port()
    p0, p1, p2 = cluster.free_port(), cluster.free_port(), cluster.free_port()
    l0, l1, l2 = (f"127.0.0.1:{p}" for p in (p0, p1, p2))
    procs = [
        cluster._spawn(["serve", "l0", "--host", "127.0.0.1", "--port", str(p0)], f"{tmp_path}/l0.log"),
        cluster._spawn(
            ["serve", "l1", "--name", "l1a", "--l0", l0, "--advertise-l0", f"127.0.0.1:{dead}", "--host", "127.0.0.1", "--port", str(p1)],
            f"{tmp_path}/l1a.log",
        ),
        cluster._spawn(["serve", "l2", "--host", "127.0.0.1", "--port", str(p2)], f"{tmp_path}/l2.log"),
    ]
    try:
        asyncio.run(cluster.wait_healthy([l0, l1, l2], 30))
        r = run("workload", "--l1", f"l1a={l1}", "--l2", l2, "--l0", l0, "--accesses", "200", "--json", "--no-churn")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
    assert r.returncode == cli.EXIT_PROBLEM, r.stderr
    rep = json.loads(r.stdout)
    assert rep["audit"]["ok"] and rep["errors"] == 4 and rep["accesses"] == 0, rep
    failed = [line for line in r.stderr.splitlines() if line.startswith("vCPU failed: ")]
    assert len(failed) == 4, r.stderr
    assert all(f"Run attach to L0 at 127.0.0.1:{dead} failed: UNAVAILABLE" in line for line in failed), failed


def test_loopback_l1_unreachable_from_the_l2_is_explained(capsys: pytest.CaptureFixture[str]) -> None:
    rep = {"error_details": ["lpid 1 vCPU 0: AttachVcpu via L1 at 127.0.0.1:50052 failed: UNAVAILABLE: failed to connect to all addresses"]}
    cli._report_failures(rep, {"l1a": "127.0.0.1:50052"}, "127.0.0.1:50053")
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "vCPU failed: lpid 1 vCPU 0: AttachVcpu via L1 at 127.0.0.1:50052 failed: UNAVAILABLE: failed to connect to all addresses"
    assert err[1].startswith("nestmmu: the L2 at 127.0.0.1:50053 could not reach L1 at 127.0.0.1:50052, which this machine reaches")
    assert "a loopback address is its own when it runs elsewhere (a container)" in err[1]
    cli._report_failures({"error_details": []}, {"l1a": "127.0.0.1:50052"}, "127.0.0.1:50053")
    assert capsys.readouterr().err == ""


def test_local_cluster_that_does_not_start_names_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(cluster.ClusterStartError) as e, cluster.local_cluster(("l1a",), l0_args=("--page-shift", "99"), timeout=3):
        pass
    (log_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("nestmmu-")]  # kept
    msg = str(e.value)
    assert f"last lines of {log_dir}/l0.log:" in msg and "l0 (exited with 2)" in msg
    assert "argument --page-shift: invalid choice: 99" in msg  # the end of L0's own log


def test_local_cluster_removes_its_log_folder_after_a_clean_exit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with cluster.local_cluster(("l1a",)) as c:
        assert os.path.isdir(c.log_dir)
    assert list(tmp_path.iterdir()) == []
    with cluster.local_cluster(("l1a",)) as c:
        c.keep_logs = True  # a caller that found a problem keeps them
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(c.log_dir)]


def test_churn_migrates_only_host_backed_pages(tmp_path: Path) -> None:
    """HostMigrate of the L1 address behind an MMIO-hole page is refused by L0 (there is no host
    page to move): the check is right, the churn's request was wrong."""
    mmio = l1_pb2.GUEST_REGION_KIND_MMIO_HOLE
    plan = cluster.GuestPlan(16, 4 << 20, 1, ((mmio, 0, 2 << 20, True, True, False),))
    assert not cluster.host_backed(plan, 0x10000) and cluster.host_backed(plan, 2 << 20)

    async def scenario(c: cluster.LocalCluster) -> dict[str, int]:
        async with cluster.insecure_channel(c.l1s["l1a"]) as ch1, cluster.insecure_channel(c.l0) as ch0:
            l1, l0 = l1_pb2_grpc.L1ServiceStub(ch1), l0_pb2_grpc.L0ServiceStub(ch0)
            req = l1_pb2.CreateGuestRequest(page_shift=16, memory_bytes=4 << 20)
            req.regions.add(n_gpa=0, size_bytes=2 << 20, kind=mmio, read=True, write=True)
            lpid = (await l1.CreateGuest(req, timeout=10)).lpid
            await l1.MapPages(l1_pb2.MapPagesRequest(lpid=lpid, n_gpa=0, length=4 << 20, read=True, write=True), timeout=10)
            w = await l1.WalkTree(l1_pb2.WalkTreeRequest(lpid=lpid, n_gpa=0x10000), timeout=10)
            assert w.result.ok
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await l0.HostMigrate(l0_pb2.HostMigrateRequest(l1_name="l1a", gpa=w.result.l1_gpa), timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no memslot" in (e.value.details() or "")
            # Fault the RAM half in through a vCPU, so L0 backs it and migrations move pages.
            a = await l1.AttachVcpu(l1_pb2.AttachVcpuRequest(lpid=lpid, vcpu_id=0), timeout=10)
            v = cluster.RawVcpu(l0, a.run_token)
            await asyncio.wait_for(v.attached, 10)
            await v.run([(2 << 20) + (k << 16) for k in range(32)], [1] * 32)
            counts: dict[str, int] = {}
            stop = asyncio.Event()
            task = asyncio.create_task(cluster.churn([("l1a", c.l1s["l1a"], lpid, plan)], c.l0, 4 << 20, 3, stop, counts))
            await asyncio.sleep(3.0)
            stop.set()
            await task
            await v.close()
            return counts

    with cluster.local_cluster(("l1a",), log_dir=str(tmp_path)) as c:
        counts = asyncio.run(scenario(c))
    assert "churn_errors" not in counts, counts
    assert counts.get("host_migrations", 0) > 0 and counts.get("migrations_skipped_mmio", 0) > 0, counts


def test_method_not_found_is_one_line_exit_3() -> None:
    """A server that says it serves L0Service in health but does not implement Audit (grpc's
    "Method not found!"): one line naming the address, not a traceback."""
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(2))
    hs = health.HealthServicer()
    hs.set("nestmmu.l0.v1.L0Service", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        r = run("audit", "--l0", f"127.0.0.1:{port}")
        s = run("stats", "--l0", f"127.0.0.1:{port}")
    finally:
        server.stop(None)
    assert r.returncode == s.returncode == cli.EXIT_CANNOT_RUN
    assert one_line(r) == f"nestmmu audit: L0 at 127.0.0.1:{port} does not implement this call (another kind of service listens there?)"
    assert one_line(s) == f"nestmmu stats: L0 at 127.0.0.1:{port} does not implement this call (another kind of service listens there?)"

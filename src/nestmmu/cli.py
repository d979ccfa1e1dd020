"""``nestmmu``: run, drive, audit and measure the nested radix MMU model.

Start here:

    nestmmu demo                 # L0 + two L1s + L2 as local processes, a seeded workload, the audit
    nestmmu demo --json          # the same, one JSON object for machines
    nestmmu serve l0 --port 50051                                  # one service (what containers run)
    nestmmu serve l1 --name l1a --l0 127.0.0.1:50051 --port 50052
    nestmmu serve l2 --port 50053
    nestmmu workload --l1 127.0.0.1:50052 --l2 127.0.0.1:50053 --l0 127.0.0.1:50051
    nestmmu audit --l0 127.0.0.1:50051                              # I1-I7 across running services
    nestmmu bench                                                   # figures and ratios to baselines
    nestmmu trace --out t.txt -- ls /   &&   nestmmu demo --trace t.txt   # a real program's accesses (virtual mode)
    nestmmu demo --data                                             # stores carry values; every load checked
    nestmmu chaos --episodes 12 --seed 1                            # kill/pause services under load, check recovery

Exit codes: 0 ok, 1 ran but found a problem, 2 usage, 3 could not run, 4 audit inconclusive.

Translation modes (--mode): real (the default without --trace) runs L2 *real* addresses,
partition scope only; virtual (the default with --trace) runs effective addresses of one L2
process through the page tables its L2 kernel builds: the 2-D walk, guest faults, walk costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any, NoReturn

#: Exit codes, one convention for every subcommand.
EXIT_OK = 0  # success
EXIT_PROBLEM = 1  # the run completed but found a problem (violations, failed accesses, lost writes, leaks)
EXIT_USAGE = 2  # bad arguments, a missing file
EXIT_CANNOT_RUN = 3  # a service unreachable, a cluster that did not start, a port in use
EXIT_INCONCLUSIVE = 4  # the audit could not look at something


class CliError(Exception):
    """A one-line error for stderr (``nestmmu CMD: message``) and the exit code to end with."""

    def __init__(self, message: str, code: int = EXIT_CANNOT_RUN) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``nestmmu demo: argument --accesses: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def host_port(value: str) -> str:
    """argparse type of every address argument: HOST:PORT with a port in 1..65535 (no default port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT (the port is required)")
    if not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r}: port {port} is not in 1..65535")
    if host.startswith("[") != host.endswith("]"):
        raise argparse.ArgumentTypeError(f"{value!r}: an IPv6 host goes in brackets, [::1]:50051")
    return value


def named_host_port(value: str) -> str:
    """NAME=HOST:PORT or HOST:PORT (the --l1 of workload)."""
    host_port(value.rpartition("=")[2])
    return value


def _int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if hi is None and n < lo:
            raise argparse.ArgumentTypeError(f"{n} is not allowed (must be at least {lo})")
        if n < lo or (hi is not None and n > hi):
            raise argparse.ArgumentTypeError(f"{n} is not in {lo}..{hi}")
        return n

    return parse


port_number = _int_range(1, 65535)


EPILOG = """examples:
  nestmmu demo --json | jq .audit
  nestmmu serve l0 --port 50051 --page-shift 16
  nestmmu audit --l0 127.0.0.1:50051 --json
exit codes: 0 ok, 1 ran but found a problem, 2 usage, 3 could not run, 4 inconclusive.
See README.md for the gRPC surface (grpcurl works: every server has reflection)."""


def _addr_list(values: list[str]) -> dict[str, str]:
    """--l1 NAME=HOST:PORT or HOST:PORT (named l1a, l1b, ...)."""
    out: dict[str, str] = {}
    for i, v in enumerate(values):
        name, _, addr = v.rpartition("=")
        out[name or f"l1{chr(ord('a') + i)}"] = addr
    return out


def _print(obj: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, sort_keys=True))
        return
    for k, v in obj.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for k2, v2 in v.items():
                print(f"  {k2}: {v2}")
        else:
            print(f"{k}: {v}")


def cmd_serve(args: argparse.Namespace) -> int:
    from nestmmu.services.connection import ListenError

    try:
        return _serve(args)
    except ListenError as e:
        raise CliError(str(e), EXIT_CANNOT_RUN) from None


def _serve(args: argparse.Namespace) -> int:
    from nestmmu.services.common import configure_logging

    configure_logging(args.log_level, json=args.log_json or None)
    if (args.forget_flush or args.hdec_every) and args.level != "l1":
        raise CliError("--forget-flush and --hdec-every are options of `serve l1` only", EXIT_USAGE)
    if args.no_walk_batching and args.level != "l0":
        raise CliError("--no-walk-batching is an option of `serve l0` only", EXIT_USAGE)
    if args.level == "l0":
        from nestmmu.services.l0.server import serve as serve_l0

        asyncio.run(
            serve_l0(
                args.port or 50051,
                host=args.host,
                page_shift=args.page_shift,
                ack_timeout=args.ack_timeout,
                metrics_port=args.metrics_port,
                walk_batching=not args.no_walk_batching,
            )
        )
    elif args.level == "l1":
        if not args.name or not args.l0:
            raise CliError("--name and --l0 are required for l1", EXIT_USAGE)
        from nestmmu.services.l1.server import serve as serve_l1

        asyncio.run(
            serve_l1(
                args.port or 50052,
                args.name,
                args.l0,
                host=args.host,
                advertise_l0=args.advertise_l0,
                use_rpt_invalidate=not args.tlb_invalidate,
                forget_flush=args.forget_flush,
                hdec_every=args.hdec_every,
            )
        )
    else:
        from nestmmu.services.l2.server import serve as serve_l2

        asyncio.run(serve_l2(args.port or 50053, host=args.host, l0=args.l0))
    return EXIT_OK


async def _workload(args: argparse.Namespace, l1s: dict[str, str], l2: str, l0: str | None) -> dict[str, Any]:
    from nestmmu import cluster

    churned: dict[str, int] = {}
    attached_audit: dict[str, Any] = {}
    reports = await cluster.run_default_workload(
        l1s,
        l2,
        accesses=args.accesses,
        seed=args.seed,
        pattern=args.pattern,
        l0=l0,
        with_churn=not args.no_churn,
        churn_counts=churned,
        trace_path=os.path.abspath(args.trace) if args.trace else "",
        data=args.data,
        attached_audit=attached_audit if l0 else None,
        hcall_every=args.hcall_every,
        virtual=_virtual(args),
        pid=args.pid,
        no_gtse=args.no_gtse,
        tlb_entries=args.tlb_entries,
        tlb_ways=args.tlb_ways,
    )
    counters = await cluster.l0_counters(l0) if l0 else {}
    aud = await cluster.audit(l0) if l0 else None
    rep = cluster.summarize(reports, counters, aud, churned)
    if attached_audit:
        rep["audit_attached"] = attached_audit  # the audit taken while vCPUs were attached (I5 checked)
    return rep


async def _preflight(l1s: dict[str, str], l2: str, l0: str | None) -> None:
    from nestmmu import cluster
    from nestmmu.protos import L0_SERVICE_NAME, L1_SERVICE_NAME, L2_SERVICE_NAME

    targets = [(f"L1 {name}", addr, L1_SERVICE_NAME) for name, addr in l1s.items()] + [("L2", l2, L2_SERVICE_NAME)]
    if l0:
        targets.append(("L0", l0, L0_SERVICE_NAME))
    await cluster.check_services(targets)


def _is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _report_failures(rep: dict[str, Any], l1s: dict[str, str], l2: str) -> None:
    """Every vCPU failure on stderr, and what a loopback L1 address means to a remote L2."""
    details = list(rep.get("error_details", []))
    for d in details:
        print(f"vCPU failed: {d}", file=sys.stderr)
    unreached = [a for a in l1s.values() if _is_loopback(a) and any(f"L1 at {a} failed: UNAVAILABLE" in d for d in details)]
    if unreached:
        print(
            f"nestmmu: the L2 at {l2} could not reach L1 at {', '.join(unreached)}, which this machine reaches: the L2 dials the --l1 "
            "address itself, and a loopback address is its own when it runs elsewhere (a container). Give --l1 addresses the L2 can "
            "reach too, or run workload where the L2 runs (docker compose run --rm workload).",
            file=sys.stderr,
        )


def _verdict(rep: dict[str, Any]) -> int:
    """EXIT_OK, or EXIT_PROBLEM when accesses failed, an audit found violations or data mode lost writes."""
    audits = [rep[k] for k in ("audit", "audit_attached") if k in rep]
    return EXIT_OK if not rep["errors"] and all(a["ok"] for a in audits) and not _data_lost(rep) else EXIT_PROBLEM


def _check_trace(args: argparse.Namespace) -> None:
    if args.trace and not os.path.isfile(args.trace):
        raise CliError(f"--trace {args.trace}: no such file", EXIT_USAGE)


def _virtual(args: argparse.Namespace) -> bool:
    """--mode, or its default: virtual with --trace (a trace is a program's effective
    addresses), real otherwise."""
    return bool(args.mode == "virtual" or (args.mode is None and args.trace))


def _check_mode(args: argparse.Namespace) -> None:
    if _virtual(args) and args.data:
        raise CliError(
            "--data runs in real mode only (it checks L2 real addresses): add --mode real" + (" to fold the trace" if args.trace else ""), EXIT_USAGE
        )
    if args.pid is not None and not _virtual(args):
        raise CliError("--pid needs virtual mode (--mode virtual, or --trace)", EXIT_USAGE)
    if args.no_gtse and not _virtual(args):
        raise CliError("--no-gtse needs virtual mode (--mode virtual, or --trace)", EXIT_USAGE)
    if args.pid is None:
        args.pid = 1
    from nestmmu.core.vcpu import tlb_geometry_error

    tlb_error = tlb_geometry_error(args.tlb_entries, args.tlb_ways)
    if tlb_error is not None:
        raise CliError(f"--tlb-entries {args.tlb_entries} --tlb-ways {args.tlb_ways}: {tlb_error}", EXIT_USAGE)


def cmd_workload(args: argparse.Namespace) -> int:
    _check_mode(args)
    l1s = _addr_list(args.l1)
    asyncio.run(_preflight(l1s, args.l2, args.l0))
    rep = asyncio.run(_workload(args, l1s, args.l2, args.l0))
    _print(rep, args.json)
    _report_failures(rep, l1s, args.l2)
    return _verdict(rep)


def _data_lost(rep: dict[str, Any]) -> int:
    """Data mode: lost + misplaced writes (a failed run, exit 1)."""
    d = rep.get("data", {})
    return int(d.get("lost_writes", 0)) + int(d.get("misplaced_writes", 0))


def cmd_demo(args: argparse.Namespace) -> int:
    from nestmmu import cluster

    _check_trace(args)
    _check_mode(args)
    if not args.json:
        print("starting L0, two L1s and L2 on loopback ...", file=sys.stderr)
    try:
        with cluster.local_cluster(("l1a", "l1b")) as c:
            if not args.json:
                print(f"running {args.accesses} accesses per vCPU (seed {args.seed}); logs in {c.log_dir}", file=sys.stderr)
            rep = asyncio.run(_workload(args, c.l1s, c.l2, c.l0))
            code = _verdict(rep)
            c.keep_logs = code != EXIT_OK
    except cluster.ClusterStartError as e:
        raise CliError(str(e), EXIT_CANNOT_RUN) from None
    _print(rep, args.json)
    _report_failures(rep, c.l1s, c.l2)
    if not args.json:
        audit_ok = all(rep[k]["ok"] for k in ("audit", "audit_attached") if k in rep)
        print(
            ("audit clean" if audit_ok else "AUDIT FAILED") + ("" if not rep["errors"] else f"; {rep['errors']} vCPU/access errors: FAILED"),
            file=sys.stderr,
        )
        if _data_lost(rep):
            print(f"LOST WRITES: {_data_lost(rep)} (see data.details)", file=sys.stderr)
    return code


def cmd_audit(args: argparse.Namespace) -> int:
    from nestmmu import cluster
    from nestmmu.protos import L0_SERVICE_NAME

    asyncio.run(cluster.check_services([("L0", args.l0, L0_SERVICE_NAME)]))
    r = asyncio.run(cluster.audit(args.l0))
    found = [f"{v.invariant}: {v.detail}" for v in r.violations]
    # CLEAN / VIOLATIONS / INCONCLUSIVE; an old L0 that sends no outcome: judge by ok.
    outcome = cluster.audit_outcome(r)
    reasons = list(r.inconclusive_reasons)
    out = {"ok": r.ok, "outcome": outcome, "violations": found, "inconclusive_reasons": reasons, "checked": dict(r.checked.values)}
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        for line in found:
            print(line)
        for why in reasons:
            print(f"inconclusive: {why}")
        word = {"CLEAN": "clean", "VIOLATIONS": "FAILED", "INCONCLUSIVE": "INCONCLUSIVE"}[outcome]
        print(f"audit {word}: checked {out['checked']}")
    return {"CLEAN": EXIT_OK, "VIOLATIONS": EXIT_PROBLEM, "INCONCLUSIVE": EXIT_INCONCLUSIVE}[outcome]


def cmd_stats(args: argparse.Namespace) -> int:
    from nestmmu import cluster
    from nestmmu.protos import L0_SERVICE_NAME

    asyncio.run(cluster.check_services([("L0", args.l0, L0_SERVICE_NAME)]))
    _print(asyncio.run(cluster.l0_counters(args.l0)), args.json)
    return EXIT_OK


def cmd_trace(args: argparse.Namespace) -> int:
    """Record a real program's memory trace with valgrind's lackey tool."""
    import shutil
    import subprocess

    from nestmmu.core.workload import read_lackey

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("nestmmu trace: give the program to trace after --, e.g. nestmmu trace -- ls /", file=sys.stderr)
        return 2
    if shutil.which("valgrind") is None:
        print("nestmmu trace: valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    if shutil.which(cmd[0]) is None:
        raise CliError(f"{cmd[0]}: no such program (or not executable)", EXIT_USAGE)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise CliError(f"--out {args.out}: no such directory {out_dir}", EXIT_USAGE)
    r = subprocess.run(["valgrind", "--tool=lackey", "--trace-mem=yes", f"--log-file={args.out}", *cmd], stdout=subprocess.DEVNULL, check=False)
    kinds = {1: 0, 2: 0, 3: 0}
    pages = set()
    for addr, kind in read_lackey(args.out):
        kinds[int(kind)] += 1
        pages.add(addr >> 12)
    if sum(kinds.values()) == 0:
        print(f"nestmmu trace: no accesses recorded in {args.out} (program exit {r.returncode})", file=sys.stderr)
        return 1
    summary = {"trace": args.out, "program_exit": r.returncode, "loads": kinds[1], "stores": kinds[2], "ifetches": kinds[3], "distinct_4k_pages": len(pages)}
    _print(summary, args.json)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from nestmmu import bench

    if args.rss_pages < 0 or args.rss_pages > 1 << 22:
        print(f"nestmmu bench: --rss-pages must be in 1..{1 << 22} (0 = the default), not {args.rss_pages}", file=sys.stderr)
        return EXIT_USAGE
    rep = bench.run(quick=args.quick, cluster=not args.core_only, progress=not args.json, rss_pages=args.rss_pages)
    _print(rep, args.json)
    return 0


def cmd_chaos(args: argparse.Namespace) -> int:
    """A seeded fault-injection campaign; exit 0 all episodes survived, 1 failures found,
    3 the cluster could not be started or reached, 4 an audit after a heal was inconclusive."""
    from nestmmu import chaos, cluster

    faults = tuple(args.faults.split(",")) if args.faults else (chaos.COMPOSE_FAULTS if args.compose else chaos.LOCAL_FAULTS)
    cfg = chaos.Config(accesses=args.accesses, ack_timeout=args.ack_timeout)
    try:
        if args.episodes < 1 or args.accesses < 1:
            raise ValueError("--episodes and --accesses must be positive")
        if not args.compose and any(f.split(":")[0] not in ("kill", "stop") for f in faults):
            raise ValueError("network faults (partition, netem) need the container cluster: add --compose")
        episodes = chaos.schedule(args.seed, args.episodes, faults, max_hold=args.max_hold)
    except ValueError as e:
        print(f"nestmmu chaos: {e}", file=sys.stderr)
        return EXIT_USAGE

    def progress(r: chaos.EpisodeReport) -> None:
        print(chaos.progress_line(r, len(episodes)), file=sys.stderr, flush=True)

    def finish(rep: dict[str, Any]) -> int:
        if args.json:
            print(json.dumps(rep, sort_keys=True))
        else:
            _print({k: v for k, v in rep.items() if k != "episode_reports"}, False)
        return chaos.exit_code(rep)

    if args.compose:
        try:
            t: chaos.ComposeTargets = chaos.ComposeTargets(args.project)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            print(f"nestmmu chaos: {e}", file=sys.stderr)
            return EXIT_CANNOT_RUN
        if any(f.startswith("netem:") for f in faults):
            why = t.netem_unavailable()
            if why and args.faults:
                print(f"nestmmu chaos: {why}", file=sys.stderr)
                return EXIT_CANNOT_RUN
            if why:  # the default set: run the other faults, and say so
                print(f"[chaos] {why}; netem faults left out", file=sys.stderr)
                faults = tuple(f for f in faults if not f.startswith("netem:"))
                episodes = chaos.schedule(args.seed, args.episodes, faults, max_hold=args.max_hold)
        print(f"[chaos] {len(episodes)} episodes (seed {args.seed}) on compose project {args.project!r}", file=sys.stderr)
        return finish(asyncio.run(chaos.run_campaign(t, episodes, cfg, args.seed, progress)))
    print(f"[chaos] starting L0, two L1s and L2 on loopback for {len(episodes)} episodes (seed {args.seed}) ...", file=sys.stderr)
    try:
        ctx = cluster.local_cluster(("l1a", "l1b"), l0_args=("--ack-timeout", str(args.ack_timeout)))
        c = ctx.__enter__()
    except (cluster.ClusterStartError, TimeoutError, OSError) as e:
        print(f"nestmmu chaos: the local cluster did not start: {e}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    try:
        print(f"[chaos] logs in {c.log_dir} (kept if anything failed)", file=sys.stderr)
        rep = asyncio.run(chaos.run_campaign(chaos.LocalTargets(c), episodes, cfg, args.seed, progress))
        c.keep_logs = chaos.exit_code(rep) != EXIT_OK
        if not c.keep_logs:
            rep.pop("logs", None)  # removed with the cluster when all went well
        return finish(rep)
    finally:
        ctx.__exit__(None, None, None)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nestmmu", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run one service: l0 (host hypervisor), l1 (guest hypervisor) or l2 (vCPUs)")
    s.add_argument("level", choices=["l0", "l1", "l2"])
    s.add_argument("--port", type=port_number, default=0, help="listen port, 1..65535 (default 50051/50052/50053)")
    s.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    s.add_argument("--name", help="l1: this L1's name (its identity is the session it opens with L0)")
    s.add_argument("--l0", type=host_port, help="l1: address of L0, HOST:PORT; l2: watch this L0's health (NOT_SERVING while it is not)")
    s.add_argument("--advertise-l0", type=host_port, help="l1: L0 address to hand to vCPUs if different from --l0")
    s.add_argument("--tlb-invalidate", action="store_true", help="l1: flush with H_TLB_INVALIDATE instead of H_RPT_INVALIDATE")
    s.add_argument(
        "--forget-flush",
        action="store_true",
        help="l1: teaching failure mode (semantics §9.17): skip the invalidation hcall after changing a leaf, so the audit reports the stale shadow leaf",
    )
    s.add_argument(
        "--hdec-every",
        type=_int_range(0),
        default=0,
        metavar="N",
        help="l1: the HDEC this L1 programs expires every N accesses of each L2 vCPU (an exit to L1; 0 = never)",
    )
    s.add_argument("--page-shift", type=int, default=16, choices=[12, 16], help="l0: base page shift (16 = 64K, POWER9 Linux default)")
    s.add_argument("--ack-timeout", type=float, default=2.0, help="l0: seconds a vCPU has to acknowledge a tlbie before it is disconnected")
    s.add_argument("--metrics-port", type=_int_range(0, 65535), default=0, help="l0: serve Prometheus metrics on this port (/metrics); 0 = off")
    s.add_argument(
        "--no-walk-batching",
        action="store_true",
        help="l0: one L1 round trip per nested fault's walk, as before walks were fetched ahead for a batch's coming faults (to compare)",
    )
    s.add_argument("--vcpus", type=int, default=0, help=argparse.SUPPRESS)
    s.add_argument("--log-level", default="info")
    s.add_argument("--log-json", action="store_true", help="JSON logs even on a TTY (always JSON otherwise)")
    s.set_defaults(fn=cmd_serve)

    def workload_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--accesses", type=_int_range(1), default=20_000, help="accesses per vCPU (default 20000)")
        q.add_argument("--seed", type=int, default=1)
        q.add_argument("--pattern", default="hot", choices=["hot", "uniform", "sequential"])
        q.add_argument("--json", action="store_true", help="one JSON object on stdout")
        q.add_argument(
            "--no-churn", action="store_true", help="no L1 unmaps/remaps or host migrations (nor, in virtual mode, L2 kernel munmaps) while the vCPUs run"
        )
        q.add_argument("--data", action="store_true", help="data mode: stores carry values, every load is checked (lost_writes in the report)")
        q.add_argument(
            "--hcall-every",
            type=_int_range(0),
            default=0,
            metavar="N",
            help="each vCPU's program calls H_PUT_TERM_CHAR every N accesses: an exit to its L1 (0 = never)",
        )
        q.add_argument(
            "--trace",
            help="replay a valgrind lackey trace (see `nestmmu trace`) instead of --pattern; the L2 service reads this path. "
            "Replayed in virtual mode unless --mode real",
        )
        q.add_argument(
            "--mode",
            choices=["real", "virtual"],
            help="real: accesses are L2 real addresses, partition scope only (a trace is folded into the footprint, so distant pages "
            "may alias); virtual: effective addresses of one L2 process, translated by the 2-D walk through the page tables its "
            "L2 kernel builds and demand-maps on guest faults (a trace replays unfolded; the report gains a virtual section: guest "
            "faults, 2-D and shadow walk references). Default: virtual with --trace, real otherwise",
        )
        q.add_argument("--pid", type=_int_range(1, (1 << 20) - 1), help="virtual mode: the L2 process id (PIDR) the vCPUs run (default 1)")
        q.add_argument(
            "--no-gtse",
            action="store_true",
            help="virtual mode: the L2 kernels run without GTSE and flush with process-scoped H_RPT_INVALIDATE (performed by L0) instead of tlbie",
        )
        q.add_argument(
            "--tlb-entries",
            type=_int_range(0, (1 << 32) - 1),
            default=1024,
            metavar="N",
            help="entries of each vCPU's TLB (default 1024, POWER9's per core; 0 = unbounded); evictions are counted (tlb_evictions)",
        )
        q.add_argument(
            "--tlb-ways",
            type=_int_range(1, (1 << 32) - 1),
            default=4,
            metavar="W",
            help="associativity of each vCPU's TLB: LRU within classes of W entries; N / W must be a power of two (default 4, POWER9's)",
        )

    w = sub.add_parser("workload", help="create guests on running L1s and run the default seeded workload through an L2")
    w.add_argument("--l1", action="append", required=True, type=named_host_port, help="L1 address, NAME=HOST:PORT or HOST:PORT (repeat)")
    w.add_argument("--l2", required=True, type=host_port, help="L2 address, HOST:PORT")
    w.add_argument("--l0", type=host_port, help="L0 address, HOST:PORT: adds L0 counters and the audit to the report")
    workload_args(w)
    w.set_defaults(fn=cmd_workload)

    d = sub.add_parser("demo", help="start L0, two L1s and L2 locally, run a seeded workload and the audit (exit 0 iff clean)")
    workload_args(d)
    d.set_defaults(fn=cmd_demo)

    a = sub.add_parser("audit", help="check invariants I1-I7 across running services (exit 1 on violations, 4 when inconclusive)")
    a.add_argument("--l0", required=True, type=host_port, help="L0 address, HOST:PORT")
    a.add_argument("--json", action="store_true")
    a.set_defaults(fn=cmd_audit)

    st = sub.add_parser("stats", help="L0's counters")
    st.add_argument("--l0", required=True, type=host_port, help="L0 address, HOST:PORT")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_stats)

    t = sub.add_parser("trace", help="record a real program's memory trace (valgrind lackey) to replay with --trace")
    t.add_argument("--out", default="nestmmu-trace.txt", help="trace file to write (default nestmmu-trace.txt)")
    t.add_argument("--json", action="store_true")
    t.add_argument("cmd", nargs=argparse.REMAINDER, help="-- PROGRAM [ARGS...]")
    t.set_defaults(fn=cmd_trace)

    b = sub.add_parser("bench", help="hot-path and cluster figures, each with its ratio to a baseline measured in the same run")
    b.add_argument("--json", action="store_true")
    b.add_argument("--quick", action="store_true", help="short runs (noisier)")
    b.add_argument("--core-only", action="store_true", help="skip the cluster figures (no processes started)")
    b.add_argument(
        "--rss-pages",
        type=int,
        default=0,
        metavar="N",
        help="64K pages 8 vCPUs touch for the resident-memory figure (default 32768, 16384 with --quick; 1048576 gives rss_mib_1m_pages_8vcpu, slowly)",
    )
    b.set_defaults(fn=cmd_bench)

    ch = sub.add_parser("chaos", help="seeded fault injection: kill/stop services (--compose: also cut/slow links) while workloads run; checks after each heal")
    ch.add_argument("--episodes", type=int, default=12, help="number of faults, one per episode (default 12)")
    ch.add_argument("--seed", type=int, default=1, help="the schedule of faults is a function of this seed")
    ch.add_argument("--json", action="store_true", help="one JSON object on stdout (progress stays on stderr)")
    ch.add_argument("--compose", action="store_true", help="target the running container cluster (deploy/up.sh) instead of local processes")
    ch.add_argument("--project", default="nestmmu", help="--compose: the compose project name (default nestmmu)")
    ch.add_argument("--faults", help="comma-separated subset of fault kinds, e.g. kill:l1,stop:l2 (default: all of the mode)")
    ch.add_argument("--accesses", type=int, default=3000, help="accesses per vCPU of each episode's workloads (default 3000)")
    ch.add_argument("--max-hold", type=float, default=6.0, help="longest a fault lasts, seconds (default 6: past the 2 s ack and 5 s L1-call timeouts)")
    ch.add_argument("--ack-timeout", type=float, default=2.0, help="L0's tlbsync ack timeout (s): the bound every invalidation wait is checked against")
    ch.set_defaults(fn=cmd_chaos)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = f"nestmmu {args.command}"
    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        return 130
    except CliError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.code
    except Exception as e:  # service problems: one line naming the address, never a traceback
        import grpc

        from nestmmu import cluster

        if isinstance(e, cluster.ServiceProblem | cluster.ClusterStartError):
            print(f"{prog}: {e}", file=sys.stderr)
            return EXIT_CANNOT_RUN
        if isinstance(e, grpc.RpcError):
            who = f"L0 at {args.l0}" if args.command in ("audit", "stats") else "a service"  # the only address they use
            print(f"{prog}: {who} {cluster.describe_rpc_error(e)}", file=sys.stderr)
            return EXIT_CANNOT_RUN
        raise


if __name__ == "__main__":
    sys.exit(main())

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
    nestmmu trace --out t.txt -- ls /   &&   nestmmu demo --trace t.txt   # a real program's accesses

L2 addresses are L2 *real* addresses (partition scope); L2 process tables are not modelled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

EPILOG = """examples:
  nestmmu demo --json | jq .audit
  nestmmu serve l0 --port 50051 --page-shift 16
  nestmmu audit --l0 127.0.0.1:50051 --json
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
    from nestmmu.services.common import configure_logging

    configure_logging(args.log_level, json=args.log_json or None)
    if args.level == "l0":
        from nestmmu.services.l0.server import serve as serve_l0

        asyncio.run(serve_l0(args.port or 50051, host=args.host, page_shift=args.page_shift, ack_timeout=args.ack_timeout, metrics_port=args.metrics_port))
    elif args.level == "l1":
        if not args.name or not args.l0:
            print("nestmmu serve l1: --name and --l0 are required", file=sys.stderr)
            return 2
        from nestmmu.services.l1.server import serve as serve_l1

        asyncio.run(
            serve_l1(args.port or 50052, args.name, args.l0, host=args.host, advertise_l0=args.advertise_l0, use_rpt_invalidate=not args.tlb_invalidate)
        )
    else:
        from nestmmu.services.l2.server import serve as serve_l2

        asyncio.run(serve_l2(args.port or 50053, host=args.host))
    return 0


async def _workload(args: argparse.Namespace, l1s: dict[str, str], l2: str, l0: str | None) -> dict[str, Any]:
    from nestmmu import cluster

    churned: dict[str, int] = {}
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
    )
    counters = await cluster.l0_counters(l0) if l0 else {}
    aud = await cluster.audit(l0) if l0 else None
    return cluster.summarize(reports, counters, aud, churned)


def cmd_workload(args: argparse.Namespace) -> int:
    l1s = _addr_list(args.l1)
    rep = asyncio.run(_workload(args, l1s, args.l2, args.l0))
    _print(rep, args.json)
    audit_ok = bool(rep["audit"]["ok"]) if "audit" in rep else True
    return 0 if audit_ok and not rep["errors"] else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from nestmmu import cluster

    if not args.json:
        print("starting L0, two L1s and L2 on loopback ...", file=sys.stderr)
    with cluster.local_cluster(("l1a", "l1b")) as c:
        if not args.json:
            print(f"running {args.accesses} accesses per vCPU (seed {args.seed}); logs in {c.log_dir}", file=sys.stderr)
        rep = asyncio.run(_workload(args, c.l1s, c.l2, c.l0))
    _print(rep, args.json)
    ok = bool(rep["audit"]["ok"])
    if not args.json:
        print("audit clean" if ok else "AUDIT FAILED", file=sys.stderr)
    return 0 if ok else 1


def cmd_audit(args: argparse.Namespace) -> int:
    from nestmmu import cluster

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
    # Exit codes (the CLI's convention): 0 clean, 1 violations found, 4 inconclusive.
    return {"CLEAN": 0, "VIOLATIONS": 1, "INCONCLUSIVE": 4}[outcome]


def cmd_stats(args: argparse.Namespace) -> int:
    from nestmmu import cluster

    _print(asyncio.run(cluster.l0_counters(args.l0)), args.json)
    return 0


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

    rep = bench.run(quick=args.quick, cluster=not args.core_only, progress=not args.json)
    _print(rep, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nestmmu", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run one service: l0 (host hypervisor), l1 (guest hypervisor) or l2 (vCPUs)")
    s.add_argument("level", choices=["l0", "l1", "l2"])
    s.add_argument("--port", type=int, default=0, help="listen port (default 50051/50052/50053)")
    s.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    s.add_argument("--name", help="l1: this L1's name (its identity is the session it opens with L0)")
    s.add_argument("--l0", help="l1: address of L0, host:port")
    s.add_argument("--advertise-l0", help="l1: L0 address to hand to vCPUs if different from --l0")
    s.add_argument("--tlb-invalidate", action="store_true", help="l1: flush with H_TLB_INVALIDATE instead of H_RPT_INVALIDATE")
    s.add_argument("--page-shift", type=int, default=16, choices=[12, 16], help="l0: base page shift (16 = 64K, POWER9 Linux default)")
    s.add_argument("--ack-timeout", type=float, default=2.0, help="l0: seconds a vCPU has to acknowledge a tlbie before it is disconnected")
    s.add_argument("--metrics-port", type=int, default=0, help="l0: serve Prometheus metrics on this port (/metrics); 0 = off")
    s.add_argument("--vcpus", type=int, default=0, help=argparse.SUPPRESS)
    s.add_argument("--log-level", default="info")
    s.add_argument("--log-json", action="store_true", help="JSON logs even on a TTY (always JSON otherwise)")
    s.set_defaults(fn=cmd_serve)

    def workload_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--accesses", type=int, default=20_000, help="accesses per vCPU (default 20000)")
        q.add_argument("--seed", type=int, default=1)
        q.add_argument("--pattern", default="hot", choices=["hot", "uniform", "sequential"])
        q.add_argument("--json", action="store_true", help="one JSON object on stdout")
        q.add_argument("--no-churn", action="store_true", help="no L1 unmaps/remaps or host migrations while the vCPUs run")
        q.add_argument("--trace", help="replay a valgrind lackey trace (see `nestmmu trace`) instead of --pattern; the L2 service reads this path")

    w = sub.add_parser("workload", help="create guests on running L1s and run the default seeded workload through an L2")
    w.add_argument("--l1", action="append", required=True, help="L1 address, NAME=HOST:PORT or HOST:PORT (repeat)")
    w.add_argument("--l2", required=True, help="L2 address")
    w.add_argument("--l0", help="L0 address: adds L0 counters and the audit to the report")
    workload_args(w)
    w.set_defaults(fn=cmd_workload)

    d = sub.add_parser("demo", help="start L0, two L1s and L2 locally, run a seeded workload and the audit (exit 0 iff clean)")
    workload_args(d)
    d.set_defaults(fn=cmd_demo)

    a = sub.add_parser("audit", help="check invariants I1-I7 across running services (exit 1 on any violation)")
    a.add_argument("--l0", required=True, help="L0 address")
    a.add_argument("--json", action="store_true")
    a.set_defaults(fn=cmd_audit)

    st = sub.add_parser("stats", help="L0's counters")
    st.add_argument("--l0", required=True)
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
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

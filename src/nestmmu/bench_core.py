"""Benchmark of the pure core's hot paths (not a test): operations per second, in process.

Figures, each measured for ~1.5 s (``quick``: ~0.2 s) with ``time.perf_counter``:

* ``dict_lookup``      -- a plain ``dict.get`` in a Python loop: the yardstick.  Every other
                          figure also reports ``dict_lookups_per_op``, its cost in dict lookups
                          measured in the same run, so numbers compare across machines.
* ``tlb_hit``          -- ``Vcpu.run_hits`` on a batch that hits the vCPU TLB entirely (per access).
* ``shadow_walk_hit``  -- ``L0Hypervisor.run_access`` on a page already in the shadow table (the
                          hardware walk + fill, no fault), driven by ``run_sync`` with a trivial
                          answer function (a hit yields no effect).
* ``nested_fault``     -- a full nested page fault with L1's leaf and L0's PTE present and the
                          shadow leaf absent: walk of L1's tree, combination, shadow insert, refill.
                          An RIC=0 by-LPID flush between rounds empties the shadow table; only the
                          faults are timed.
* ``demo_workload``    -- ``nestmmu.core.sim.demo_cluster`` end to end (setup included), in L2
                          accesses per second (four vCPUs, mostly TLB hits).

``run()`` returns the figures as a dict; ``python -m nestmmu.bench_core [--json] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

from .core import formats as f
from .core.effects import run_sync
from .core.formats import Access
from .core.l1 import TlbInvalidate
from .core.sim import InProcessCluster, demo_cluster

PAGE = 64 << 10
PAGES = 256  # pages touched by the TLB-hit, shadow-hit and fault figures


def _measure(step: Callable[[], int], seconds: float) -> tuple[float, int, float]:
    """Call ``step`` (returns (ops done)) until ``seconds`` pass: (ops/s, ops, elapsed)."""
    step()  # warm up
    ops = 0
    t0 = time.perf_counter()
    elapsed = 0.0
    while elapsed < seconds:
        ops += step()
        elapsed = time.perf_counter() - t0
    return ops / elapsed, ops, elapsed


def _bench_dict(seconds: float) -> tuple[float, int, float]:
    d = {i << 4: i for i in range(4096)}
    keys = [(i * 7 % 4096) << 4 for i in range(4096)]

    def step() -> int:
        get = d.get
        for k in keys:
            get(k)
        return len(keys)

    return _measure(step, seconds)


def _rig() -> tuple[InProcessCluster, Any, int]:
    """One L1, one 64K-page guest with PAGES pages faulted in (L1 leaf, L0 PTE, shadow leaf)."""
    c = InProcessCluster()
    c.add_l1("l1")
    lpid = c.create_guest("l1", page_shift=16, memory=64 << 20)
    s = c.attach_vcpu("l1", lpid, 0)
    c.l1s["l1"].map_pages(lpid, 0, PAGES * PAGE)
    for p in range(PAGES):
        c.access(s, p * PAGE, Access.LOAD)
    return c, s, lpid


def _bench_tlb_hit(seconds: float) -> tuple[float, int, float]:
    _, s, _ = _rig()
    vcpu = s.vcpu
    addrs = [(i % PAGES) * PAGE + (i * 64 % PAGE) for i in range(4096)]
    kinds = [int(Access.LOAD)] * len(addrs)
    assert not vcpu.run_hits(addrs, kinds), "TLB-hit batch missed"
    vcpu.next_round()

    def step() -> int:
        vcpu.run_hits(addrs, kinds)
        vcpu.next_round()
        return len(addrs)

    return _measure(step, seconds)


def _bench_shadow_hit(seconds: float) -> tuple[float, int, float]:
    c, s, _ = _rig()
    l0, gp, vid = c.l0, s.gp, s.vcpu.vcpu_id
    addrs = [p * PAGE + 8 for p in range(PAGES)]
    load = Access.LOAD

    def nothing(eff: Any) -> None:
        raise AssertionError(f"a shadow hit yielded {eff!r}")

    def step() -> int:
        for a in addrs:
            run_sync(l0.run_access(gp, vid, a, load), nothing)
        return len(addrs)

    return _measure(step, seconds)


def _bench_nested_fault(seconds: float) -> tuple[float, int, float]:
    c, s, lpid = _rig()
    l0, gp, vid = c.l0, s.gp, s.vcpu.vcpu_id
    addrs = [p * PAGE + 8 for p in range(PAGES)]
    instr, rs, rb = f.encode_tlbie(f.RIC_TLB, 0, 1, lpid, f.IS_LPID)
    flush = TlbInvalidate(instr, rs, rb)
    load = Access.LOAD
    before = l0.stats["nested_faults"]
    timed = 0.0

    def one_round() -> float:
        c.issue("l1", flush)  # not timed: empties the shadow table
        t0 = time.perf_counter()
        for a in addrs:
            c.drive(l0.run_access(gp, vid, a, load))
        return time.perf_counter() - t0

    one_round()  # warm up
    before = l0.stats["nested_faults"]
    ops = 0
    while timed < seconds:
        timed += one_round()
        ops += len(addrs)
    faults = l0.stats["nested_faults"] - before
    assert faults == ops, f"expected one nested fault per access, got {faults} for {ops}"
    return ops / timed, ops, timed


def _bench_demo(seconds: float) -> tuple[float, int, float]:
    accesses = 5_000 if seconds < 1 else 20_000
    ops = 0
    t0 = time.perf_counter()
    elapsed = 0.0
    seed = 1
    while elapsed < seconds:
        c = demo_cluster(seed=seed, accesses=accesses)
        ops += sum(s.vcpu.stats["accesses"] for s in c.sessions.values())
        seed += 1
        elapsed = time.perf_counter() - t0
    return ops / elapsed, ops, elapsed


BENCHES: dict[str, Callable[[float], tuple[float, int, float]]] = {
    "tlb_hit": _bench_tlb_hit,
    "shadow_walk_hit": _bench_shadow_hit,
    "nested_fault": _bench_nested_fault,
    "demo_workload": _bench_demo,
}


def run(json_out: bool = False, quick: bool = False) -> dict[str, Any]:
    """Measure every figure, print them (a table, or JSON with ``json_out``), return them."""
    seconds = 0.2 if quick else 1.5
    dict_rate, dict_ops, dict_t = _bench_dict(seconds)
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "quick": quick,
        "dict_lookup": {"ops_per_s": dict_rate, "ns_per_op": 1e9 / dict_rate, "ops": dict_ops, "seconds": dict_t},
    }
    for name, bench in BENCHES.items():
        rate, ops, t = bench(seconds)
        out[name] = {"ops_per_s": rate, "ns_per_op": 1e9 / rate, "dict_lookups_per_op": dict_rate / rate, "ops": ops, "seconds": t}
    if json_out:
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print(f"nestmmu core benchmark (Python {out['python']}{', quick' if quick else ''})")
        print(f"{'figure':<18}{'ops/s':>14}{'ns/op':>12}{'x dict lookup':>16}")
        print(f"{'dict_lookup':<18}{dict_rate:>14,.0f}{1e9 / dict_rate:>12,.1f}{1:>16,.1f}")
        for name in BENCHES:
            r = out[name]
            print(f"{name:<18}{r['ops_per_s']:>14,.0f}{r['ns_per_op']:>12,.1f}{r['dict_lookups_per_op']:>16,.1f}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nestmmu.bench_core", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--quick", action="store_true", help="~0.2 s per figure instead of ~1.5 s (noisier)")
    args = p.parse_args(argv)
    run(json_out=args.json, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())

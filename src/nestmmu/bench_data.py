"""Cost of data mode against translation-only, measured in the same run.

    python -m nestmmu.bench_data [--accesses N] [--no-cluster]

In-process (the sim: one vCPU without churn; four vCPUs with churn, ``data_churn_cluster``) and
on a local cluster of processes (the default demo scenario, with and without churn).  Prints
one JSON object: accesses/s for each mode, and lost writes / errors of every cluster run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from nestmmu.core.sim import InProcessCluster, data_churn_cluster
from nestmmu.core.workload import WorkloadSpec


def in_process(accesses: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for data in (False, True):
        c = InProcessCluster()
        c.add_l1("a")
        lpid = c.create_guest("a", page_shift=16, data=data)
        s = c.attach_vcpu("a", lpid, 0)
        spec = WorkloadSpec(pattern="hot", accesses=accesses, seed=1, footprint=16 << 20)
        t = time.perf_counter()
        c.run_workload(s, spec, 0, data=data)
        out[f"inproc_{'data' if data else 'translation'}_acc_per_s"] = round(accesses / (time.perf_counter() - t))
        t = time.perf_counter()
        data_churn_cluster(seed=3, accesses=accesses // 4, data=data)
        out[f"inproc_churn_{'data' if data else 'translation'}_acc_per_s"] = round(accesses / (time.perf_counter() - t))
    return out


def on_cluster(accesses: int) -> dict[str, Any]:
    from nestmmu import cluster

    out: dict[str, Any] = {}

    async def one(lc: cluster.LocalCluster, data: bool, churn: bool) -> None:
        t = time.perf_counter()
        reps = await cluster.run_default_workload(lc.l1s, lc.l2, accesses=accesses, seed=5, l0=lc.l0, with_churn=churn, data=data)
        dt = time.perf_counter() - t
        key = f"cluster_{'churn_' if churn else ''}{'data' if data else 'translation'}"
        out[key + "_acc_per_s"] = round(sum(r.accesses for r in reps) / dt)
        out[key + "_lost_writes"] = sum(r.lost_writes + r.misplaced_writes for r in reps)
        out[key + "_errors"] = sum(r.errors for r in reps)

    with cluster.local_cluster(("l1a", "l1b")) as lc:
        for churn in (False, True):
            for data in (False, True):
                asyncio.run(one(lc, data, churn))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accesses", type=int, default=20_000, help="accesses per vCPU on the cluster; in-process runs use 2.5x that")
    p.add_argument("--no-cluster", action="store_true", help="in-process figures only")
    a = p.parse_args()
    out: dict[str, Any] = in_process(a.accesses * 5 // 2)
    if not a.no_cluster:
        out.update(on_cluster(a.accesses))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

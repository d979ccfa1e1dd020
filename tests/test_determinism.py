"""Determinism (architecture.md, "Constraints"): a seeded scenario gives the same counters every time."""

from __future__ import annotations

from nestmmu.core import formats as f
from nestmmu.core.l1 import GuestRegion, TlbInvalidate
from nestmmu.core.sim import InProcessCluster, demo_cluster
from nestmmu.core.workload import WorkloadSpec, generate

ACCESSES = 5_000


def test_same_seed_same_counters() -> None:
    a = demo_cluster(seed=7, accesses=ACCESSES).counters()
    b = demo_cluster(seed=7, accesses=ACCESSES).counters()
    assert a == b
    assert a["vcpu.accesses"] == 4 * ACCESSES


def test_different_seeds_different_counters() -> None:
    runs = [demo_cluster(seed=s, accesses=ACCESSES).counters() for s in (1, 2, 3)]
    assert runs[0] != runs[1] and runs[1] != runs[2] and runs[0] != runs[2]


def _interleaved(seed: int) -> dict[str, int]:
    """Two L1s (one per invalidation hcall) whose workloads are cut by L1 tree edits, raw
    invalidations of every kind, host events and dirty-log harvests between batches."""
    c = InProcessCluster()
    c.add_l1("l1a", use_rpt_invalidate=False)
    c.add_l1("l1b", use_rpt_invalidate=True)
    regions = [GuestRegion("rom", 32 << 20, 2 << 20), GuestRegion("mmio", 34 << 20, 2 << 20), GuestRegion("protect", 36 << 20, 2 << 20, f.PTE_EAA_READ)]
    la = c.create_guest("l1a", page_shift=16, regions=regions)
    lb = c.create_guest("l1b", page_shift=21)
    sa, sb = c.attach_vcpu("l1a", la, 0), c.attach_vcpu("l1b", lb, 0)
    c.l0.set_dirty_logging(c.vms["l1b"], 0, True)
    spec = WorkloadSpec(pattern="hot", accesses=ACCESSES, seed=seed, footprint=40 << 20, batch_size=256)
    for i, ((aa, ka), (ab, kb)) in enumerate(zip(generate(spec, 0), generate(spec, 1), strict=True)):
        c.run_batch(sa, aa, ka)
        c.run_batch(sb, ab, kb)
        step = i % 6
        if step == 0:
            c.issue_all("l1a", c.l1s["l1a"].unmap_pages(la, (i * 3 % 600) << 16, 4 << 16)[1])
            c.issue_all("l1b", c.l1s["l1b"].protect_pages(lb, (i % 20) << 21, 2 << 21, f.PTE_EAA_READ)[1])
        elif step == 1:
            instr, rs, rb = f.encode_tlbie(f.RIC_TLB, 0, 1, la, f.IS_LPID)
            c.issue("l1a", TlbInvalidate(instr, rs, rb))
            c.issue_all("l1b", c.l1s["l1b"].remap_pages(lb, (i % 20) << 21, 1 << 21)[1])
        elif step == 2:
            c.l0.host_migrate(c.vms["l1a"], c.l1s["l1a"].guests[la].backing.get(i % 50, 16 << 20))
            c.l0.host_unmap(c.vms["l1b"], 32 << 20)
            c.deliver(c.l0.take_invalidations())
        elif step == 3:
            c.l0.harvest_dirty(c.vms["l1b"], 0)
            c.deliver(c.l0.take_invalidations())
        elif step == 4:
            c.issue_all("l1b", c.l1s["l1b"].protect_pages(lb, 0, 40 << 20, 7)[1])
            instr, rs, rb = f.encode_tlbie(f.RIC_ALL, 0, 1, 0, f.IS_ALL)
            c.issue("l1a", TlbInvalidate(instr, rs, rb))
    assert c.audit().ok
    return c.counters()


def test_seeded_run_with_interleaved_invalidations_is_deterministic() -> None:
    a = _interleaved(11)
    assert a == _interleaved(11)
    assert a["sim.tlbie.lpid"] > 0 and a["sim.tlbie.address"] > 0 and a["l0.dirty_harvests"] > 0
    assert a != _interleaved(12)

"""A fault L1 handles after another vCPU already faulted the page in must not drop R/C.

Two vCPUs of one L2 guest touch a page L1 has not mapped yet.  Both miss in L0's shadow tree,
L0 walks L1's tree, finds no leaf and reflects a NOHPTE exit to L1 for each.  L1 handles the
first (a store: the leaf gets R and C), the storing vCPU re-enters and L0 builds a shadow leaf
with C (L1 C and L0 C).  Then L1 handles the second, now stale, exit: the leaf is there.
Linux-as-L1 instantiates again and ``kvmppc_create_pte`` finds a valid leaf of the same size:
identical, nothing to do; otherwise it ORs the new PTE's bits into it ("Valid 2MB page here
already, add our extra bits").  It never clears C, and it issues no tlbie, so the shadow leaf
with C stays: clearing L1's C there breaks I3 (shadow C => L1 C) and loses the dirty bit.

This used to happen under the integration churn test (data guests make the window wide: the
first fault-in copies a page before its leaf appears) and in the chaos campaign's audit:
``I3: ... shadow C but no L1 C``.
"""

from __future__ import annotations

from typing import Any

import pytest

from nestmmu.core import formats as f
from nestmmu.core.effects import Outcome, ReflectExit
from nestmmu.core.formats import Access
from nestmmu.core.sim import InProcessCluster

PAGE = 1 << 16
ADDR = 5 * PAGE + 0x40


def _until_reflect(c: InProcessCluster, op: Any) -> ReflectExit:
    """Drive an access until L0 reflects its exit to L1; return that (unanswered) effect."""
    eff = next(op)
    while not isinstance(eff, ReflectExit):
        eff = op.send(c.answer(eff))
    return eff


def _finish(c: InProcessCluster, op: Any, eff: Any) -> Any:
    try:
        while True:
            eff = op.send(c.answer(eff))
    except StopIteration as stop:
        c.deliver(c.l0.take_invalidations())
        return stop.value


@pytest.mark.parametrize("data", [False, True], ids=["plain", "data"])
def test_stale_nohpte_exit_keeps_c_in_l1_leaf(data: bool) -> None:
    c = InProcessCluster()
    c.add_l1("a")
    lpid = c.create_guest("a", page_shift=16, data=data)
    loader = c.attach_vcpu("a", lpid, 0)
    storer = c.attach_vcpu("a", lpid, 1)
    l1 = c.l1s["a"]
    guest = l1.guests[lpid]

    # vCPU 0 loads: no shadow leaf, no L1 leaf -> its NOHPTE exit is on its way to L1.
    late = c.l0.run_access(loader.gp, 0, ADDR, Access.LOAD)
    exit0 = _until_reflect(c, late)
    assert exit0.exit.hdsisr & f.DSISR_NOHPTE and l1.walk(guest.pate_dw0(), ADDR).code

    # vCPU 1 stores meanwhile: L1 faults the page in with C, L0 builds a shadow leaf with C.
    res = c.access(storer, ADDR, Access.STORE)
    assert res.outcome is Outcome.FILL and res.translation is not None
    assert res.translation.pte & f.PTE_C
    assert l1.walk(guest.pate_dw0(), ADDR).pte & f.PTE_C

    # Now L1 handles vCPU 0's stale exit: the leaf is there, a load must not take C away.
    before = l1.stats.get("exit.nohpte", 0)
    res0 = _finish(c, late, exit0)
    assert l1.stats.get("exit.nohpte", 0) == before + 1  # the stale exit really reached L1
    assert res0.outcome is Outcome.FILL
    rep = c.audit()  # without the fix: "I3: ... shadow C but no L1 C ..."
    assert rep.ok, [str(v) for v in rep.violations]
    assert rep.checked.get("shadow_leaves", 0) == 1
    leaf = l1.walk(guest.pate_dw0(), ADDR)
    assert leaf.ok and leaf.pte & f.PTE_C and leaf.pte & f.PTE_R
    # kvmppc_book3s_instantiate_page gives the load's leaf C too (it is writable): the stale
    # exit builds exactly the leaf that is there, and kvmppc_create_pte leaves it alone.
    assert l1.stats.get("create_pte.identical", 0) == 1
    assert l1.stats.get("create_pte.or_bits", 0) == 0


def test_create_leaf_ors_bits_in_and_never_clears_c() -> None:
    """kvmppc_create_pte on a valid leaf of the same size ORs the new PTE's bits in ("add our
    extra bits"): a late PTE without C (built before L1 changed the page's permissions, say)
    must not take C away from the leaf a shadow leaf with C may depend on."""
    c = InProcessCluster()
    c.add_l1("a")
    lpid = c.create_guest("a", page_shift=16)
    l1 = c.l1s["a"]
    guest = l1.guests[lpid]
    l1.instantiate(guest, ADDR, writing=True)
    leaf = l1.walk(guest.pate_dw0(), ADDR)
    assert leaf.pte & f.PTE_C
    late = leaf.pte & ~f.PTE_C & ~f.PTE_EAA_RW
    assert l1._create_leaf(leaf.leaf_addr, late) == leaf.pte
    assert l1.walk(guest.pate_dw0(), ADDR).pte == leaf.pte
    assert l1.stats.get("create_pte.or_bits", 0) == 1


def test_stale_store_exit_finds_the_leaf_a_load_built_with_c() -> None:
    """The other way round: the leaf was faulted in by a load, the stale exit is a store's.
    kvmppc_book3s_instantiate_page gave the load's leaf C already (writable), so the store's
    leaf is identical and the store need not fault again for C."""
    c = InProcessCluster()
    c.add_l1("a")
    lpid = c.create_guest("a", page_shift=16)
    storer = c.attach_vcpu("a", lpid, 0)
    loader = c.attach_vcpu("a", lpid, 1)
    l1 = c.l1s["a"]
    guest = l1.guests[lpid]

    late = c.l0.run_access(storer.gp, 0, ADDR, Access.STORE)
    exit0 = _until_reflect(c, late)
    assert c.access(loader, ADDR, Access.LOAD).outcome is Outcome.FILL
    assert l1.walk(guest.pate_dw0(), ADDR).pte & f.PTE_C
    res = _finish(c, late, exit0)
    assert res.outcome is Outcome.FILL
    assert l1.walk(guest.pate_dw0(), ADDR).pte & f.PTE_C
    assert l1.stats.get("create_pte.identical", 0) == 1
    rep = c.audit()
    assert rep.ok, [str(v) for v in rep.violations]


def test_i3_names_the_missing_side_and_keeps_its_identity() -> None:
    """The audit says which PTE lacks the bit (and shows all three); a second look that sees
    the same violation with other PTE values (here L0 lost C too) confirms it by its key."""
    c = InProcessCluster()
    c.add_l1("a")
    lpid = c.create_guest("a", page_shift=16)
    s = c.attach_vcpu("a", lpid, 0)
    assert c.access(s, ADDR, Access.STORE).outcome is Outcome.FILL
    l1 = c.l1s["a"]
    leaf = l1.walk(l1.guests[lpid].pate_dw0(), ADDR)
    l1.mem.write_u64(leaf.leaf_addr, leaf.pte & ~f.PTE_C)  # an L1 bug: C cleared, no tlbie
    first = c.audit().violations
    assert [v.invariant for v in first] == ["I3"]
    assert "shadow C without both L1 C and L0 C: L1 C missing (shadow PTE" in first[0].detail
    vm = c.vms["a"]
    l0leaf = vm.pgtable.lookup_leaf(leaf.raddr)
    assert l0leaf is not None
    vm.pgtable.mem.write_u64(l0leaf.addr, l0leaf.pte & ~f.PTE_C)
    second = c.audit().violations
    assert ": L1 C and L0 C missing (" in second[0].detail
    assert second[0].key == first[0].key and str(second[0]) != str(first[0])

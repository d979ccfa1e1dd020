"""The audit is right or says it cannot be: what it could not look at, or what was legitimately
in transition, is never reported as an I1-I7 violation (services/l0/inspect.py drives these)."""

from __future__ import annotations

from test_audit import env_with_pages, poke_shadow

from nestmmu.core import formats as f
from nestmmu.core.audit import CLEAN, INCONCLUSIVE, VIOLATIONS, NotLooked, audit, snapshot_shadow
from nestmmu.core.effects import ReadL1Memory
from nestmmu.core.l0 import HvGuestState
from nestmmu.core.radix import WalkResult


def test_an_l1_that_did_not_answer_is_inconclusive_not_i1() -> None:
    e = env_with_pages()
    # What main did: a timed-out walk became PRTABLE_FAULT, then one I1 per leaf.
    as_before = audit(e.l0, lambda *_: WalkResult(f.DSISR_PRTABLE_FAULT))
    assert {v.invariant for v in as_before.violations} == {"I1"} and len(as_before.violations) == 3
    why = NotLooked("L1 'a' did not answer a walk within 5.0s")
    rep = audit(e.l0, lambda *_: why)
    assert rep.ok and rep.outcome == INCONCLUSIVE
    assert rep.inconclusive == [why.reason]  # one reason, not one per leaf
    assert rep.checked["shadow_leaves_not_judged"] == 3
    assert rep.transient == 0


def test_not_looked_hides_only_the_leaves_it_covers_a_real_violation_elsewhere_is_reported() -> None:
    e = env_with_pages()
    a, b = e.shadow(0x10000), e.shadow(0x20000)
    assert a is not None and b is not None
    poke_shadow(e, 0x10000, (a.pte & ~f.PTE_RPN_MASK) | (b.pte & f.PTE_RPN_MASK))  # I1 at 0x10000
    e.s.vcpu.tlb.clear()

    def walk(name: str, pate: int, n_gpa: int) -> WalkResult | NotLooked:
        if n_gpa == 0x20000:
            return NotLooked("L1 'a' lpid 1: a tree change was in flight", transient=True)
        return e.c.walk(name, pate, n_gpa)

    rep = audit(e.l0, walk)
    assert {v.invariant for v in rep.violations} == {"I1"} and rep.outcome == VIOLATIONS
    assert rep.transient == 1 and rep.inconclusive == ["L1 'a' lpid 1: a tree change was in flight"]


def test_i4_on_a_not_looked_leaf_is_still_checked() -> None:
    """Ownership needs no L1: a leaf into foreign memory is reported even if L1 is silent."""
    e = env_with_pages()
    sh = e.shadow(0x10000)
    assert sh is not None
    poke_shadow(e, 0x10000, (sh.pte & ~f.PTE_RPN_MASK) | (1 << 40))  # nobody's host memory
    e.s.vcpu.tlb.clear()
    rep = audit(e.l0, lambda *_: NotLooked("L1 'a' did not answer"))
    assert {v.invariant for v in rep.violations} == {"I4"}


def test_enter_nested_in_flight_is_not_i7() -> None:
    """H_ENTER_NESTED for a new lpid allocates the nested guest, then reads L1's PATE before
    registering it: in that window the guest is neither registered nor referenced by a count,
    which main's audit reported as I7.  Its creator holds it; the audit counts it instead."""
    e = env_with_pages()
    lpid = e.c.create_guest("a")
    op = e.l0.h_enter_nested(e.vm, HvGuestState(2, lpid, 0))
    eff = op.send(None)
    assert isinstance(eff, ReadL1Memory)  # kvmhv_alloc_nested -> kvmhv_update_ptbl_cache
    [creating] = [gp for gp in e.l0.live_guests if gp.creating]
    assert e.vm.nested.get(lpid) is None and creating.refcnt == 0
    rep = e.c.audit()
    assert rep.ok and rep.outcome == CLEAN, rep.violations
    assert rep.checked["nested_guests_being_created"] == 1
    # The hcall completes: the guest is registered and referenced (registry + caller).
    try:
        op.send(e.c.answer(eff))
        raise AssertionError("h_enter_nested should have finished")
    except StopIteration as stop:
        rc, gp = stop.value
    assert rc == f.H.SUCCESS and gp is creating and not gp.creating and gp.refcnt == 2
    e.l0.kvmhv_put_nested(gp)
    assert e.c.audit().outcome == CLEAN


def test_an_abandoned_enter_nested_frees_its_half_made_guest() -> None:
    """The caller went away (the gRPC call was cancelled) while L1 was being read: nothing will
    register the guest, so closing the operation frees it; a leak would be a real I7."""
    e = env_with_pages()
    lpid = e.c.create_guest("a")
    lpids = set(e.l0.lpids_in_use)
    op = e.l0.h_enter_nested(e.vm, HvGuestState(2, lpid, 0))
    op.send(None)
    [gp] = [g for g in e.l0.live_guests if g.creating]
    op.close()
    assert gp.freed and gp not in e.l0.live_guests and e.l0.lpids_in_use == lpids - {gp.shadow_lpid}
    assert e.c.audit().outcome == CLEAN


def test_a_leaked_half_made_guest_is_still_i7() -> None:
    """The in-creation allowance covers only a guest whose creator still holds it."""
    e = env_with_pages()
    lpid = e.c.create_guest("a")
    op = e.l0.h_enter_nested(e.vm, HvGuestState(2, lpid, 0))
    op.send(None)
    [gp] = [g for g in e.l0.live_guests if g.creating]
    gp.creating = False  # as if the creator forgot it
    assert {v.invariant for v in e.c.audit().violations} == {"I7"}
    op.close()


def test_tlb_dumps_are_judged_against_the_shadow_when_they_were_requested() -> None:
    """A host migration after the dump request (its tlbie queued behind the dump) removes the
    shadow leaf the dumped TLB entry came from: not stale, the vCPU had not seen that tlbie."""
    e = env_with_pages()
    tlbs = [("v", t) for t in e.s.vcpu.tlb.entries()]
    at_request = snapshot_shadow(e.l0)
    l1_gpa = e.l1_gpa(0x20000)
    e.l0.host_migrate(e.vm, l1_gpa)  # tlbie not delivered: it is queued after the dump
    assert e.shadow(0x20000) is None
    assert {v.invariant for v in audit(e.l0, e.c.walk, tlbs).violations} == {"I5"}  # judged now: wrong
    rep = audit(e.l0, e.c.walk, tlbs, tlb_reference=at_request)
    assert rep.outcome == CLEAN, rep.violations
    e.l0.take_invalidations()


def test_a_real_stale_tlb_entry_is_still_i5_against_the_snapshot() -> None:
    e = env_with_pages()
    poke_shadow(e, 0x20000, 0)  # cleared without a tlbie, before the dump
    tlbs = [("v", t) for t in e.s.vcpu.tlb.entries()]
    rep = audit(e.l0, e.c.walk, tlbs, tlb_reference=snapshot_shadow(e.l0))
    assert {v.invariant for v in rep.violations} == {"I5"}

"""Linux-as-L1: what its exit handling does for an L2 (issue 7, items 4, 8, 9, 10, 11).

Each test names the kernel function whose behaviour it pins down; each would fail on the
model's behaviour before issue 7.
"""

from __future__ import annotations

import pytest
from _helpers_fault import MiB, make_env

from nestmmu.core import formats as f
from nestmmu.core.effects import ExitAction, NestedExit, Outcome
from nestmmu.core.formats import Access
from nestmmu.core.l0 import ConfigError, L0Config
from nestmmu.core.l1 import CopyToFromGuest, GuestRegion
from nestmmu.core.sim import InProcessCluster

HDSI = f.BOOK3S_INTERRUPT_H_DATA_STORAGE
ROM = 40 * MiB
PERM_RX = f.PTE_EAA_READ | f.PTE_EAA_EXEC


# ---------------------------------------------------------------- item 4: read-only memslot
def test_store_to_rom_page_l1_queues_dsi_without_instantiating() -> None:
    """kvmppc_book3s_radix_page_fault: a store to a KVM_MEM_READONLY memslot queues a DSI
    (ISSTORE | PROTFAULT) for the guest and returns RESUME_GUEST before instantiating: one
    exit, and no leaf in L1's tree (the model used to map the page first)."""
    for perms in (f.PTE_EAA_READ | f.PTE_EAA_RW | f.PTE_EAA_EXEC, PERM_RX):
        e = make_env(regions=[GuestRegion("rom", ROM, 2 * MiB, perms)])
        r = e.access(ROM + 0x18, Access.STORE)
        assert r.outcome is Outcome.STORAGE_INTERRUPT
        assert r.dsisr == f.DSISR_ISSTORE | f.DSISR_PROTFAULT
        assert e.exits == [NestedExit(HDSI, ROM + 0x18, f.DSISR_NOHPTE | f.DSISR_ISSTORE, ROM + 0x18, Access.STORE)]
        assert not e.l1_leaf(ROM).ok  # nothing instantiated
        assert ROM >> 16 not in e.guest.backing
        assert e.l1.stats["exit.rom_store"] == 1
        assert e.shadow_leaves() == []
        # A load maps it (read-only slot: kvm_ro) as before.
        assert e.access(ROM, Access.LOAD).outcome is Outcome.FILL
        assert e.l1_leaf(ROM).ok
        assert e.c.audit().ok


# ---------------------------------------------------------------- item 9: PRTABLE_FAULT
def test_prtable_fault_exit_maps_the_table_entry_page_like_an_ordinary_fault() -> None:
    """kvmppc_book3s_radix_page_fault: with PRTABLE_FAULT the address is ASDR (the table
    entry's, without the EA's low bits); it has a memslot, so L1 instantiates that page and
    resumes the guest (the model's L1 used to answer FAILED)."""
    e = make_env()
    entry = 0x5_0008  # an L2 real address holding a process-table entry
    ex = NestedExit(HDSI, 0x7_0123, f.DSISR_PRTABLE_FAULT, entry, Access.LOAD)
    reply, hcalls = e.l1.handle_exit(e.lpid, 0, ex)
    e.issue(hcalls)
    assert reply.action is ExitAction.REENTER
    g = e.l1_leaf(entry)
    assert g.ok and g.raddr & ~0xFFFF == e.guest.backing[entry >> 16]
    assert not e.l1_leaf(0x7_0123).ok  # not the EA's page
    assert e.l1.stats["exit.prtable_fault"] == 1
    # A PRTABLE_FAULT at an address without memslot is a bad tree: DSI with that DSISR.
    reply, _ = e.l1.handle_exit(e.lpid, 0, NestedExit(HDSI, 0x10, f.DSISR_PRTABLE_FAULT | f.DSISR_ISSTORE, 1 << 40, Access.STORE))
    assert (reply.action, reply.dsisr) == (ExitAction.INJECT_STORAGE_INTERRUPT, f.DSISR_PRTABLE_FAULT | f.DSISR_ISSTORE)


# ---------------------------------------------------------------- item 10: MMIO in L1
def test_l1_mmio_fetches_the_instruction_with_h_copy_tofrom_guest_and_counts_the_fallback() -> None:
    """kvmppc_hv_emulate_mmio -> kvmppc_ld -> kvmhv_load_from_eaddr: Linux-as-L1 fetches the
    L2's instruction with H_COPY_TOFROM_GUEST (L1 buffer: vcpu->arch.last_inst); when the
    hcall fails, kvmppc_ld falls back to its software walk (counted)."""
    e = make_env()
    beyond = e.guest.memory + 0x100
    r = e.access(beyond, Access.LOAD)
    assert r.outcome is Outcome.L1_EMULATED
    copies = [(h, rc) for _, h, rc in e.c.hcall_log if isinstance(h, CopyToFromGuest)]
    assert len(copies) == 1
    h, rc = copies[0]
    assert (h.lpid, h.pid, h.eaddr, h.to_gpa, h.from_gpa, h.n) == (e.lpid, 0, e.guest.text, e.l1.last_inst_addr(0), 0, 4)
    assert rc == f.H.NOT_FOUND  # the text page is not in the shadow table yet
    assert e.l1.stats["mmio.insn_fallback"] == 1
    assert e.l0.stats["hcall.H_COPY_TOFROM_GUEST"] == 1
    # Once L2 ran its text page, the copy succeeds: no fallback.
    assert e.access(e.guest.text, Access.IFETCH).outcome is Outcome.FILL
    assert e.access(beyond, Access.STORE).outcome is Outcome.L1_EMULATED
    assert e.c.hcall_log[-1][2] == f.H.SUCCESS
    assert (e.l1.stats["mmio.insn_copied"], e.l1.stats["mmio.insn_fallback"]) == (1, 1)


# ---------------------------------------------------------------- item 11: L1's view of its L2
def test_every_entry_is_an_h_enter_nested_and_hdec_and_hcall_exits_follow_the_logical_clock() -> None:
    """kvmhv_enter_nested_guest / kvmppc_handle_nested_exit: L0 hands an L2 hcall (SYSCALL)
    and the expiry of L1's HDEC (NESTED_HV_DECREMENTER -> HV_DECREMENTER) back to L1
    (RESUME_HOST); Linux-as-L1 (kvmppc_handle_exit_hv) handles each and enters again.  Every
    entry is one H_ENTER_NESTED, counted by L1 and by L0."""
    c = InProcessCluster()
    l1 = c.add_l1("a", hdec_every=10)
    lpid = c.create_guest("a")
    s = c.attach_vcpu("a", lpid, 0, hcall_every=25)
    seen: list[NestedExit] = []
    orig = l1.handle_exit
    l1.handle_exit = lambda lp, v, ex: (seen.append(ex), orig(lp, v, ex))[1]  # type: ignore[method-assign]
    c.run_batch(s, [0x10000 + 8 * i for i in range(100)], [int(Access.LOAD)] * 100)
    traps = [x.trap for x in seen]
    assert traps.count(f.BOOK3S_INTERRUPT_HV_DECREMENTER) == 10
    assert [x.gpr3 for x in seen if x.trap == f.BOOK3S_INTERRUPT_SYSCALL] == [f.H_PUT_TERM_CHAR] * 4
    # The first access faults (one HDSI); at access 50 the HDEC comes before the hcall.
    assert traps[0] == HDSI and traps.count(HDSI) == 1
    i50 = [i for i, x in enumerate(seen) if x.trap != HDSI][5:7]
    assert [seen[i].trap for i in i50] == [f.BOOK3S_INTERRUPT_HV_DECREMENTER, f.BOOK3S_INTERRUPT_SYSCALL]
    assert (l1.stats["exit.hdec"], l1.stats["exit.hcall.H_PUT_TERM_CHAR"]) == (10, 4)
    # 1 entry at attach + 15 re-entries after handled exits, seen alike by L1 and L0.
    assert l1.stats["hcall.H_ENTER_NESTED"] == 16
    assert c.l0.stats["hcall.H_ENTER_NESTED"] == 16
    assert (c.l0.stats["nested_exit.hdec"], c.l0.stats["nested_exit.hcall"]) == (10, 4)
    counters = c.counters()
    assert counters["l1.hcall.H_ENTER_NESTED"] == counters["l0.hcall.H_ENTER_NESTED"] == 16
    assert s.vcpu.stats["accesses"] == 100


def test_clock_is_off_by_default_and_rejects_negative_periods() -> None:
    """Without clock settings the run is as before: no HDEC or hcall exits."""
    e = make_env()
    e.run(0x10000, Access.LOAD)
    assert e.l0.stats["nested_exit.hdec"] == e.l0.stats["nested_exit.hcall"] == 0
    c = InProcessCluster()
    try:
        c.add_l1("a", hdec_every=-1)
    except ConfigError as err:
        assert "hdec_every" in str(err)
    else:  # pragma: no cover
        raise AssertionError("negative hdec_every accepted")


# ---------------------------------------------------------------- item 8: §9.17, forgotten flush
def _forgetful(forget: bool) -> tuple[InProcessCluster, int]:
    c = InProcessCluster(L0Config(host_write_upgrade=False))
    l1 = c.add_l1("a", forget_flush=forget)
    lpid = c.create_guest("a")
    s = c.attach_vcpu("a", lpid, 0)
    assert c.access(s, 0x50000, Access.LOAD).outcome is Outcome.FILL  # read-only shadow leaf
    _, hcalls = l1.remap_pages(lpid, 0x50000, 0x10000)  # a new RPN in L1's leaf
    c.issue_all("a", hcalls)
    assert c.access(s, 0x50000, Access.STORE).outcome is Outcome.FILL
    return c, len(hcalls)


def test_forget_flush_reaches_create_pte_rpn_mismatch_warn_and_the_audit_reports_it() -> None:
    """kvmppc_create_pte (semantics §9.17): an L1 that changes a leaf without the tlbie leaves
    L0's shadow leaf in place; the next fault on it ORs a different RPN into it (WARN_ON_ONCE,
    PTE_BITS_MUST_MATCH) and the audit reports the leaf.  With the flush, neither happens."""
    c, n = _forgetful(True)
    assert n == 0 and c.l1s["a"].stats["flush_forgotten"] == 1
    assert c.l0.stats["warn.pte_bits_must_match"] == 1
    assert c.l0.stats["create_pte.or_bits"] >= 1
    assert {v.invariant for v in c.audit().violations} & {"I1", "I4"}
    c, n = _forgetful(False)
    assert n == 1
    assert c.l0.stats["warn.pte_bits_must_match"] == 0
    assert c.audit().ok


def test_mmio_l0_emulates_returns_trap_0_to_l1_which_enters_again() -> None:
    """kvmhv_enter_nested_guest / kvmhv_nested_mmio_needed: L0 emulates MMIO at an L1 address
    without memslot; H_ENTER_NESTED returns to L1 with trap 0 (H_TOO_HARD in L0), L1 has
    nothing to handle and enters again: one more H_ENTER_NESTED on both sides."""
    e = make_env(regions=[GuestRegion("mmio", 34 * MiB, 2 * MiB)])
    before = (e.l1.stats["hcall.H_ENTER_NESTED"], e.l0.stats["hcall.H_ENTER_NESTED"])
    assert e.access(34 * MiB + 0x100, Access.LOAD).outcome is Outcome.MMIO_EMULATED
    # NOHPTE reflected (L1 maps the MMIO page), then L0 emulates and L1 sees trap 0.
    assert [x.trap for x in e.exits] == [HDSI, 0]
    assert e.l1.stats["exit.trap0_l0_mmio"] == 1
    assert (e.l1.stats["hcall.H_ENTER_NESTED"], e.l0.stats["hcall.H_ENTER_NESTED"]) == (before[0] + 2, before[1] + 2)


def test_l1_options_on_other_levels_are_a_one_line_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """`nestmmu serve l0 --forget-flush` / `--hdec-every` name the level they belong to."""
    from nestmmu import cli

    for extra in (["--forget-flush"], ["--hdec-every", "5"]):
        assert cli.main(["serve", "l0", *extra]) == cli.EXIT_USAGE
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["nestmmu serve: --forget-flush and --hdec-every are options of `serve l1` only"]


def test_clocked_cuts_batches_at_events_and_orders_hdec_before_hcall() -> None:
    """The logical clock the drivers share (core/exitclock.py): every exit right after the
    access that reaches it; HDEC before an hcall due at the same access."""
    from nestmmu.core.exitclock import ExitClock, clocked

    out = list(clocked([([1, 2, 3, 4, 5], [1] * 5), ([6, 7], [1] * 2)], ExitClock(hdec_every=2, hcall_every=4)))
    shape = [x.trap if isinstance(x, NestedExit) else x[0] for x in out]
    hdec, sc = f.BOOK3S_INTERRUPT_HV_DECREMENTER, f.BOOK3S_INTERRUPT_SYSCALL
    assert shape == [[1, 2], hdec, [3, 4], hdec, sc, [5], [6], hdec, [7]]

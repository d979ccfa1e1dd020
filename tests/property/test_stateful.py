"""Stateful property test: random programs over an in-process cluster, checked step by step.

One Hypothesis ``RuleBasedStateMachine`` drives the real core (``InProcessCluster``: L0, two
L1s, L2 vCPUs with TLBs) and the plain-dict :mod:`.reference` model with the same random program.
Rules are what the parts of the system do to each other:

* L2: loads / stores / instruction fetches, one at a time without the TLB (``cluster.access``,
  the outcome compared with the reference's prediction, fills checked against the composition
  of L1's mapping and L0's backing) and in batches through the vCPU TLB (``run_batch``, outcome
  counts compared);
* L1: map / unmap / protect / remap page ranges (with the invalidations L1 itself issues), raw
  H_TLB_INVALIDATE (by address with every AP, by LPID RIC 0/1/2, IS=3, malformed) and
  H_RPT_INVALIDATE (ranges below and above the 33-page ceiling, full-range PWC-only, NESTED_ALL,
  malformed), destroying and re-creating guests, attaching / detaching vCPUs;
* L0 host events: unmap, migrate and THP-collapse an L1 page, dirty logging on / off and
  harvests (compared exactly with the pages the reference saw dirtied);
* an L1 dying and coming back.

After every step the online audit (I1-I4, I6, I7 over L0, the L1 trees and every TLB) must be
clean, and the reference checks: every TLB entry and shadow leaf maps the host address the
reference composes, shadow C => L1 C and L0 C, L1's trees hold what L1 intends, and L0 holds
exactly one LPID per L1 and per entered guest.  Invalidation hcalls are also checked for their
return code and their effect (what they must have removed; other L1s' guests untouched).

Two machines: L0 with 64K base pages (guests of 64K, 2M, rarely 1G; rarely 4K, which L0 cannot
back and must answer with ERROR) and L0 with 4K base pages (guests of 4K, 64K, 2M).
The fast variants run in the default suite; the ``slow`` ones run many more programs.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from nestmmu.core import formats as f
from nestmmu.core.effects import AccessResult, Outcome
from nestmmu.core.formats import Access
from nestmmu.core.l0 import L0Config
from nestmmu.core.l1 import GuestRegion, Hcall, RptInvalidate, TlbInvalidate, default_memslots
from nestmmu.core.sim import InProcessCluster, VcpuSession
from nestmmu.core.vcpu import allowed_mask

from .reference import EXEC, LOAD, READ, RW, STORE, U64, Reference, RefMemslot, RefRegion, RefTwoD

settings.register_profile(
    "nestmmu-stateful",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=60,
    stateful_step_count=50,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=False,
)
settings.register_profile(
    "nestmmu-stateful-slow",
    parent=settings.get_profile("nestmmu-stateful"),
    max_examples=300,
    stateful_step_count=80,
)

L1_NAMES = ("l1a", "l1b")
TWO_D_L1 = "l1c"  # runs the guest whose L2 OS has its own process-scoped trees
TWO_D_MEMORY = 8 << 20
TWO_D_EA = 0x1000_0000
USE_RPT = {"l1a": False, "l1b": True}  # l1a flushes with H_TLB_INVALIDATE, l1b with H_RPT_INVALIDATE
AP_BY_SHIFT = {12: 0b000, 16: 0b101, 21: 0b001, 30: 0b010}
RPT_BIT_BY_SHIFT = {12: f.H_RPTI_PAGE_4K, 16: f.H_RPTI_PAGE_64K, 21: f.H_RPTI_PAGE_2M, 30: f.H_RPTI_PAGE_1G}


def guest_layout(shift: int) -> tuple[int, list[RefRegion]]:
    """(memory, regions) of a small guest with the given page size."""
    if shift == 30:
        return 1 << 30, []
    unit = max(1 << shift, 64 << 10) if shift < 21 else 2 << 20
    memory = 16 * unit
    return memory, [
        RefRegion("rom", 8 * unit, unit),
        RefRegion("mmio", 10 * unit, unit),
        RefRegion("protect", 12 * unit, unit, READ | EXEC),
    ]


class NestedMmuMachine(RuleBasedStateMachine):
    L0_PAGE_SHIFT = 16
    # Guest page shifts to draw from (repeats weight the draw).
    GUEST_SHIFTS: tuple[int, ...] = (16, 16, 21, 21, 12, 30)

    def __init__(self) -> None:
        super().__init__()
        self.c = InProcessCluster(L0Config(page_shift=self.L0_PAGE_SHIFT))
        self.ref = Reference(self.L0_PAGE_SHIFT)
        self.rcs: Counter[str] = Counter()
        self.two_d = RefTwoD()

    # ================================================================ helpers
    def _add_l1(self, name: str) -> None:
        specs = default_memslots()
        self.c.add_l1(name, specs, use_rpt_invalidate=USE_RPT[name])
        self.ref.add_l1(name, [RefMemslot(s.base, s.size, s.read_only, s.backing_shift) for s in specs])

    def _create_guest(self, l1: str, shift: int) -> int:
        memory, regions = guest_layout(shift)
        lpid = self.c.create_guest(l1, page_shift=shift, memory=memory, regions=[GuestRegion(r.kind, r.start, r.size, r.perms) for r in regions])
        self.ref.create_guest(l1, lpid, shift, memory, regions)
        return lpid

    def _attach(self, l1: str, lpid: int, vcpu_id: int) -> VcpuSession:
        s = self.c.attach_vcpu(l1, lpid, vcpu_id)
        self.ref.entered(l1, lpid)
        return s

    def _learn(self, l1: str, lpid: int) -> Any:
        backing = self.c.l1s[l1].guests[lpid].backing
        return lambda page: backing[page]

    def _issue(self, l1: str, hcalls: list[Hcall]) -> None:
        rcs = self.c.issue_all(l1, hcalls)
        assert all(rc == f.H.SUCCESS for rc in rcs), f"L1's own invalidations failed: {rcs}"

    def _guests(self) -> list[tuple[str, int]]:
        return [(n, lp) for n, r in sorted(self.ref.l1s.items()) for lp in sorted(r.guests)]

    def _draw_guest(self, data: st.DataObject) -> tuple[str, int]:
        return data.draw(st.sampled_from(self._guests()), label="guest")

    def _sessions(self) -> list[str]:
        """vCPUs of the reference's L1s (the 2-D L1 has its own rules and invariants)."""
        return sorted(n for n, s in self.c.sessions.items() if s.l1 in self.ref.l1s)

    def _draw_session(self, data: st.DataObject) -> VcpuSession:
        name = data.draw(st.sampled_from(self._sessions()), label="vcpu")
        return self.c.sessions[name]

    def _draw_page(self, data: st.DataObject, l1: str, lpid: int, beyond: bool = True) -> int:
        g = self.ref.l1s[l1].guests[lpid]
        n = g.npages
        cands = list(range(min(n, 6)))
        for r in g.regions:
            p = r.start >> g.page_shift
            cands += [p, min(p + 1, n - 1)]
        if beyond:
            cands += [n, n + 3]
        return data.draw(st.sampled_from(sorted(set(cands))), label="page")

    def _draw_addr(self, data: st.DataObject, l1: str, lpid: int) -> int:
        g = self.ref.l1s[l1].guests[lpid]
        page = self._draw_page(data, l1, lpid)
        off = data.draw(st.integers(0, 15), label="slice") * (g.page_size >> 4) + 8 * data.draw(st.integers(0, 3), label="word")
        return (page << g.page_shift) + off

    def _draw_range(self, data: st.DataObject, l1: str, lpid: int) -> tuple[int, int]:
        g = self.ref.l1s[l1].guests[lpid]
        page = self._draw_page(data, l1, lpid, beyond=False)
        count = data.draw(st.integers(1, 4), label="pages")
        count = min(count, g.npages - page)
        return page << g.page_shift, count << g.page_shift

    def _leaf_counts(self) -> dict[tuple[str, int], int]:
        out = {}
        for name, vm in self.c.l0.l1s.items():
            for lpid, gp in vm.nested.items():
                out[(name, lpid)] = len(self.c.l0.shadow_leaves(gp))
        return out

    def _leaves_in(self, l1: str, lpid: int, start: int, end: int) -> list[Any]:
        gp = self.c.l0.l1s[l1].nested.get(lpid)
        if gp is None or gp.shadow_pgtable is None:
            return []
        return list(gp.shadow_pgtable.leaves(start, end))

    def _tlb_entries_of(self, l1: str, lpid: int) -> int:
        return sum(len(s.vcpu.tlb) for s in self.c.sessions.values() if s.l1 == l1 and s.l1_lpid == lpid)

    def _check_fill(self, s: VcpuSession, addr: int, kind: int, res: AccessResult) -> None:
        t = res.translation
        assert t is not None
        g = self.ref.l1s[s.l1].guests[s.l1_lpid]
        assert t.lpid == s.vcpu.lpid, f"fill tagged with LPID {t.lpid}, vCPU runs {s.vcpu.lpid}"
        assert t.page <= addr < t.page + (1 << t.shift), f"fill {t.page:#x}/2^{t.shift} does not cover {addr:#x}"
        assert t.shift <= g.page_shift, f"fill of 2^{t.shift} exceeds L1's 2^{g.page_shift} page"
        assert allowed_mask(t.pte) & (1 << kind), f"fill {t.pte:#x} does not allow access kind {kind}"
        want = self.ref.expected_host(s.l1, s.l1_lpid, addr, self.c.vms[s.l1].backing)
        got = t.host + (addr - t.page)
        assert want == got, f"fill for {addr:#x}: host {got:#x}, reference composes {want}"

    # ================================================================ setup
    def _draw_shift(self, data: st.DataObject) -> int:
        return data.draw(st.sampled_from(self.GUEST_SHIFTS), label="page_shift")

    @initialize(data=st.data())
    def boot(self, data: st.DataObject) -> None:
        shifts = [self._draw_shift(data) for _ in range(3)]
        for name in L1_NAMES:
            self._add_l1(name)
        specs = [("l1a", shifts[0]), ("l1a", shifts[1]), ("l1b", shifts[2])]
        for i, (l1, shift) in enumerate(specs):
            lpid = self._create_guest(l1, shift)
            self._attach(l1, lpid, i % 2)
        self._boot_two_d(data)

    # ================================================================ L2 accesses
    def _mmio_copies(self, l1: str) -> int:
        return self.c.l1s[l1].stats.get("mmio.insn_copied", 0)

    def _note_mmio_copies(self, s: VcpuSession, before: int) -> None:
        """L1-emulated MMIO fetched its instruction with H_COPY_TOFROM_GUEST (whether the copy
        found the L2 page is unit-tested in test_l1_linux); each successful copy wrote the
        vCPU's last_inst word in L1 memory, which the dirty log must record."""
        if self._mmio_copies(s.l1) > before:
            self.ref.l0_wrote(s.l1, self.c.l1s[s.l1].last_inst_addr(s.vcpu.vcpu_id))

    @precondition(lambda self: self._sessions())
    @rule(data=st.data(), kind=st.sampled_from([LOAD, LOAD, STORE, STORE, 3]))
    def access(self, data: st.DataObject, kind: int) -> None:
        s = self._draw_session(data)
        addr = self._draw_addr(data, s.l1, s.l1_lpid)
        want = self.ref.classify(s.l1, s.l1_lpid, addr, kind)
        copies = self._mmio_copies(s.l1)
        res = self.c.access(s, addr, Access(kind))
        self._note_mmio_copies(s, copies)
        self.rcs[f"access.{res.outcome.name}"] += 1
        assert res.outcome is want, f"{s.name} {Access(kind).name} {addr:#x}: got {res.outcome.name} ({res.detail}), reference says {want.name}"
        self.ref.note_access(s.l1, s.l1_lpid, addr, kind, want, self._learn(s.l1, s.l1_lpid))
        if want is Outcome.FILL:
            self._check_fill(s, addr, kind, res)

    @precondition(lambda self: self._sessions())
    @rule(data=st.data())
    def batch(self, data: st.DataObject) -> None:
        s = self._draw_session(data)
        n = data.draw(st.integers(1, 24), label="n")
        addrs = [self._draw_addr(data, s.l1, s.l1_lpid) for _ in range(n)]
        kinds = data.draw(st.lists(st.sampled_from([LOAD, STORE, 3]), min_size=n, max_size=n), label="kinds")
        want = Counter(self.ref.classify(s.l1, s.l1_lpid, a, k) for a, k in zip(addrs, kinds, strict=True))
        before = Counter(s.vcpu.stats)
        copies = self._mmio_copies(s.l1)
        self.c.run_batch(s, addrs, kinds)
        self._note_mmio_copies(s, copies)
        d = Counter(s.vcpu.stats)
        d.subtract(before)
        got = {
            Outcome.STORAGE_INTERRUPT: d["storage_interrupts"],
            Outcome.MMIO_EMULATED: d["mmio_emulated"],
            Outcome.L1_EMULATED: d["l1_emulated"],
            Outcome.ERROR: d["errors"],
            Outcome.FILL: d["fills"] + d["tlb_hits"],
        }
        assert d["accesses"] == n
        assert got == {o: want[o] for o in got}, f"batch outcome counts {got} != reference {dict(want)}"
        self.rcs["batch"] += 1
        learn = self._learn(s.l1, s.l1_lpid)
        for a, k in zip(addrs, kinds, strict=True):
            self.ref.note_access(s.l1, s.l1_lpid, a, k, self.ref.classify(s.l1, s.l1_lpid, a, k), learn)

    # ================================================================ L1 edits of its L2 trees
    @rule(data=st.data(), op=st.sampled_from(["map", "unmap", "protect", "remap"]))
    def l1_edit(self, data: st.DataObject, op: str) -> None:
        l1, lpid = self._draw_guest(data)
        start, length = self._draw_range(data, l1, lpid)
        h = self.c.l1s[l1]
        if op == "map":
            _, hc = h.map_pages(lpid, start, length)
            self._issue(l1, hc)
            self.ref.map_pages(l1, lpid, start, length, self._learn(l1, lpid))
        elif op == "unmap":
            _, hc = h.unmap_pages(lpid, start, length)
            self._issue(l1, hc)
            self.ref.unmap_pages(l1, lpid, start, length)
            assert not self._leaves_in(l1, lpid, start, start + length), "shadow leaves survive L1's unmap"
        elif op == "protect":
            perms = data.draw(st.integers(0, 7), label="perms")
            _, hc = h.protect_pages(lpid, start, length, perms)
            self._issue(l1, hc)
            self.ref.protect_pages(l1, lpid, start, length, perms)
        else:
            _, hc = h.remap_pages(lpid, start, length)
            self._issue(l1, hc)
            self.ref.remap_pages(l1, lpid, start, length, self._learn(l1, lpid))
        self.rcs[f"l1.{op}"] += 1

    # ================================================================ raw invalidation hcalls
    def _draw_lpid(self, data: st.DataObject, l1: str) -> int:
        return data.draw(st.sampled_from([*sorted(self.ref.l1s[l1].guests), 77]), label="lpid")

    def _after_flush(self, l1: str, before: dict[tuple[str, int], int], emptied: list[int], untouched: list[int]) -> None:
        after = self._leaf_counts()
        for key, n in before.items():
            if key[0] != l1:
                assert after.get(key, 0) == n, f"{l1}'s invalidation changed {key[0]}'s guest {key[1]} ({n} -> {after.get(key)} leaves)"
        for lpid in emptied:
            assert after.get((l1, lpid), 0) == 0, f"{l1} lpid {lpid}: shadow leaves survive a full flush"
            assert self._tlb_entries_of(l1, lpid) == 0, f"{l1} lpid {lpid}: TLB entries survive a full flush"
        for lpid in untouched:
            assert after.get((l1, lpid), 0) == before.get((l1, lpid), 0), f"{l1} lpid {lpid}: a no-op flush removed leaves"

    @rule(data=st.data(), l1=st.sampled_from(L1_NAMES), form=st.sampled_from(["addr", "lpid", "all", "bad"]))
    def h_tlb_invalidate(self, data: st.DataObject, l1: str, form: str) -> None:
        lpid = self._draw_lpid(data, l1)
        g = self.ref.l1s[l1].guests.get(lpid)
        ric, prs, r, is_, ap, epn = 0, 0, 1, f.IS_VA, 0, 0
        if form == "addr":
            ap = data.draw(st.sampled_from(sorted(AP_BY_SHIFT.values())), label="ap")
            epn = self._draw_addr(data, l1, lpid) if g is not None else 0
        elif form in ("lpid", "all"):
            ric = data.draw(st.integers(0, 2), label="ric")
            is_ = f.IS_LPID if form == "lpid" else f.IS_ALL
        else:
            ric, prs, r, is_, ap = data.draw(
                st.sampled_from([(0, 0, 1, 1, 0), (3, 0, 1, 2, 0), (2, 0, 1, 0, 0), (1, 0, 1, 0, 0), (0, 1, 1, 2, 0), (0, 0, 0, 2, 0), (0, 0, 1, 0, 0b011)]),
                label="malformed",
            )
        instr, rs, rb = f.encode_tlbie(ric, prs, r, lpid, is_, epn, ap)
        before = self._leaf_counts()
        rc = self.c.issue(l1, TlbInvalidate(instr, rs, rb))
        want = Reference.tlb_invalidate_rc(ric, prs, r, is_, ap)
        assert rc == want, f"H_TLB_INVALIDATE ric={ric} prs={prs} r={r} is={is_} ap={ap:#b}: rc {rc}, expected {want}"
        self.rcs[f"tlbie.{form}.{rc}"] += 1
        if rc != f.H.SUCCESS:
            self._after_flush(l1, before, [], [lp for (n, lp) in before if n == l1])
            return
        mine = [lp for (n, lp) in before if n == l1]
        if is_ == f.IS_VA:
            shift = f.AP_TO_SHIFT[ap]
            size = max(1 << shift, 1 << self.L0_PAGE_SHIFT)
            start = epn & ~(size - 1)
            assert not self._leaves_in(l1, lpid, start, start + size), f"shadow leaves survive tlbie of {start:#x}+{size:#x}"
            self._after_flush(l1, before, [], [])
        elif ric == f.RIC_PWC:
            self._after_flush(l1, before, [], mine)
        else:
            emptied = mine if is_ == f.IS_ALL else [lpid]
            self._after_flush(l1, before, [lp for lp in emptied if (l1, lp) in before], [])

    @rule(data=st.data(), l1=st.sampled_from(L1_NAMES), form=st.sampled_from(["range", "range", "full_pwc", "nested_all", "bad"]))
    def h_rpt_invalidate(self, data: st.DataObject, l1: str, form: str) -> None:
        lpid = self._draw_lpid(data, l1)
        g = self.ref.l1s[l1].guests.get(lpid)
        target, type_ = f.H_RPTI_TARGET_CMMU, f.H_RPTI_TYPE_NESTED
        pg_sizes, start, end = f.H_RPTI_PAGE_ALL, 0, U64
        if form == "range":
            unit = data.draw(st.sampled_from([12, 16, 21, 30]), label="unit")
            sizes = [RPT_BIT_BY_SHIFT[unit], RPT_BIT_BY_SHIFT[unit] | f.H_RPTI_PAGE_2M, f.H_RPTI_PAGE_ALL, 0x10]
            pg_sizes = data.draw(st.sampled_from(sizes), label="pg_sizes")
            nr = data.draw(st.sampled_from([1, 2, 33, 34, 40]), label="nr")
            base = self._draw_addr(data, l1, lpid) if g is not None else 0
            start = base & ~((1 << unit) - 1)
            end = start + (nr << unit)
            type_ |= data.draw(st.sampled_from([f.H_RPTI_TYPE_TLB, f.H_RPTI_TYPE_TLB | f.H_RPTI_TYPE_PWC, f.H_RPTI_TYPE_PWC]), label="type")
        elif form == "full_pwc":
            type_ |= f.H_RPTI_TYPE_PWC
        elif form == "nested_all":
            type_ |= f.H_RPTI_TYPE_NESTED_ALL
        else:
            # end < start (H_P5), a target other than CMMU (H_P2), no NESTED (process scope)
            bad = [(f.H_RPTI_TARGET_CMMU, 0x3, 0x20000, 0x10000), (f.H_RPTI_TARGET_NMMU, 0x3, 0, 0x10000), (f.H_RPTI_TARGET_CMMU, 0x2, 0, 0x10000)]
            target, type_, start, end = data.draw(st.sampled_from(bad), label="malformed")
        before = self._leaf_counts()
        rc = self.c.issue(l1, RptInvalidate(lpid, target, type_, pg_sizes, start, end))
        want = self.ref.rpt_invalidate_rc(l1, lpid, target, type_, pg_sizes, start, end)
        assert rc == want, f"H_RPT_INVALIDATE type={type_:#x} sizes={pg_sizes:#x} [{start:#x},{end:#x}): rc {rc}, expected {want}"
        self.rcs[f"rpt.{form}.{rc}"] += 1
        mine = [lp for (n, lp) in before if n == l1]
        others = [lp for lp in mine if lp != lpid]
        if rc != f.H.SUCCESS or form == "bad" or (l1, lpid) not in before:
            self._after_flush(l1, before, [], mine)
            return
        if form in ("full_pwc", "nested_all"):
            self._after_flush(l1, before, [lpid], others)
            return
        if not type_ & f.H_RPTI_TYPE_TLB:
            self._after_flush(l1, before, [], mine)  # ranged PWC-only: no-op
            return
        sizes = [s for s, bit in RPT_BIT_BY_SHIFT.items() if pg_sizes & bit]
        if any((end - start) >> s > f.TLB_RANGE_FLUSH_PAGE_CEILING for s in sizes):
            self._after_flush(l1, before, [lpid], others)  # above the ceiling: full flush
        else:
            assert not self._leaves_in(l1, lpid, start, end), f"shadow leaves survive H_RPT_INVALIDATE [{start:#x},{end:#x})"
            self._after_flush(l1, before, [], others)

    # ================================================================ L0 host events
    def _draw_l1_page(self, data: st.DataObject, l1: str) -> int:
        r = self.ref.l1s[l1]
        addrs = sorted(m.l1_gpa for g in r.guests.values() for m in g.pages.values() if r.memslot_for(m.l1_gpa) is not None)
        addrs.append(r.memslots[1].base)  # the ROM slot
        a = data.draw(st.sampled_from(addrs), label="l1_gpa")
        return a + data.draw(st.sampled_from([0, 64 << 10, 1 << 20]), label="offset")

    @rule(data=st.data(), l1=st.sampled_from(L1_NAMES), migrate=st.booleans())
    def host_event(self, data: st.DataObject, l1: str, migrate: bool) -> None:
        gpa = self._draw_l1_page(data, l1)
        vm = self.c.vms[l1]
        if vm.memslot_for(gpa) is None:
            return
        if migrate:
            _, old, new = self.c.l0.host_migrate(vm, gpa)
            if old:
                assert new and new != old, f"host_migrate of {gpa:#x} 'moved' the page from {old:#x} to {new:#x}"
        else:
            self.c.l0.host_unmap(vm, gpa)
        self.c.deliver(self.c.l0.take_invalidations())
        self.ref.host_unmap(l1, gpa)
        self.rcs["host.migrate" if migrate else "host.unmap"] += 1

    @rule(data=st.data(), l1=st.sampled_from(L1_NAMES))
    def thp_collapse(self, data: st.DataObject, l1: str) -> None:
        """khugepaged collapses the host page behind an L1 page: L0's leaf and every shadow
        leaf on it are invalidated (mmu notifier), and the host PTE is absent for a while."""
        gpa = self._draw_l1_page(data, l1)
        vm = self.c.vms[l1]
        if vm.memslot_for(gpa) is None:
            return
        self.c.l0.host_thp_collapse(vm, gpa)
        self.c.deliver(self.c.l0.take_invalidations())
        self.ref.host_unmap(l1, gpa)
        chunk = gpa & ~((1 << 21) - 1) if vm.memslot_for(gpa) is vm.memslots[0] else None
        if chunk is not None:
            assert not list(vm.pgtable.leaves(chunk, chunk + (1 << 21))), "L0 leaves survive a THP collapse"
        self.rcs["host.thp_collapse"] += 1

    @precondition(lambda self: self._sessions())
    @rule(data=st.data(), kind=st.sampled_from([LOAD, STORE, STORE]), event=st.sampled_from(["harvest", "unmap", "migrate"]))
    def access_racing_host_event(self, data: st.DataObject, kind: int, event: str) -> None:
        """A host event runs on another CPU while a nested fault sits between reading L0's PTE
        and inserting the shadow PTE (the window the mmu_seq check closes, §3 step 12, §6)."""
        s = self._draw_session(data)
        addr = self._draw_addr(data, s.l1, s.l1_lpid)
        vm = self.c.vms[s.l1]
        r1 = self.ref.l1s[s.l1]
        fired: list[str] = []

        def hook(where: str) -> None:
            if fired or where != "nested_fault:after_l0_pte_read":
                return
            fired.append(where)
            # L1 may have instantiated the page during this very access: learn its backing.
            g = self.ref.l1s[s.l1].guests[s.l1_lpid]
            page = self.c.l1s[s.l1].guests[s.l1_lpid].backing.get(addr >> g.page_shift)
            assert page is not None, "a fault reached L0's PTE for a page L1 does not back"
            l1_addr = page + (addr & (g.page_size - 1))
            # This fault has just read (or instantiated, with C) L0's PTE for the L1 page.
            self.ref.l0_fault(s.l1, l1_addr)
            if event == "harvest":
                if not r1.dirty_logging:
                    return
                got = set(self.c.l0.harvest_dirty(vm, 0))
                want = self.ref.harvest(s.l1)
                ps = self.L0_PAGE_SHIFT
                # The in-flight store may already have set C in L0's PTE (instantiate).
                assert want <= got <= want | {l1_addr >> ps << ps}, f"racing harvest: got {sorted(map(hex, got))}, reference {sorted(map(hex, want))}"
            elif event == "unmap":
                self.c.l0.host_unmap(vm, l1_addr)
                self.ref.host_unmap(s.l1, l1_addr)
            else:
                self.c.l0.host_migrate(vm, l1_addr)
                self.ref.host_unmap(s.l1, l1_addr)

        want = self.ref.classify(s.l1, s.l1_lpid, addr, kind)
        self.c.preempt_hook = hook
        copies = self._mmio_copies(s.l1)
        try:
            res = self.c.access(s, addr, Access(kind))
        finally:
            self.c.preempt_hook = None
        self._note_mmio_copies(s, copies)
        self.rcs[f"race.{event}.{'fired' if fired else 'idle'}"] += 1
        assert res.outcome is want, f"{s.name} {Access(kind).name} {addr:#x} racing {event}: got {res.outcome.name} ({res.detail}), reference says {want.name}"
        self.ref.note_access(s.l1, s.l1_lpid, addr, kind, want, self._learn(s.l1, s.l1_lpid))
        if want is Outcome.FILL:
            self._check_fill(s, addr, kind, res)

    @rule(l1=st.sampled_from(L1_NAMES), on=st.booleans())
    def dirty_logging(self, l1: str, on: bool) -> None:
        self.c.l0.set_dirty_logging(self.c.vms[l1], 0, on)
        self.c.deliver(self.c.l0.take_invalidations())
        self.ref.set_dirty_logging(l1, on)
        self.rcs[f"dirty.{on}"] += 1

    @precondition(lambda self: any(r.dirty_logging for r in self.ref.l1s.values()))
    @rule(data=st.data())
    def harvest(self, data: st.DataObject) -> None:
        l1 = data.draw(st.sampled_from([n for n, r in sorted(self.ref.l1s.items()) if r.dirty_logging]), label="l1")
        got = set(self.c.l0.harvest_dirty(self.c.vms[l1], 0))
        self.c.deliver(self.c.l0.take_invalidations())
        want = self.ref.harvest(l1)
        assert got == want, f"{l1} dirty log: missing {sorted(map(hex, want - got))}, unexpected {sorted(map(hex, got - want))}"
        self.rcs["dirty.harvest"] += 1

    # ================================================================ lifecycles
    @rule(data=st.data())
    def recreate_guest(self, data: st.DataObject) -> None:
        if data.draw(st.integers(0, 3), label="rare") != 0:
            return  # keep state long-lived: only one draw in four destroys a guest
        l1, lpid = self._draw_guest(data)
        shift = self._draw_shift(data)
        for name in [n for n, s in self.c.sessions.items() if s.l1 == l1 and s.l1_lpid == lpid]:
            self.c.detach_vcpu(name)
        self._issue(l1, self.c.l1s[l1].destroy_guest(lpid))
        self.ref.destroy_guest(l1, lpid)
        assert lpid not in self.c.vms[l1].nested, "destroyed guest still registered in L0"
        new = self._create_guest(l1, shift)
        self._attach(l1, new, 0)
        self.rcs["guest.recreate"] += 1

    @rule(data=st.data(), vcpu_id=st.integers(0, 2))
    def attach(self, data: st.DataObject, vcpu_id: int) -> None:
        l1, lpid = self._draw_guest(data)
        if f"{l1}/{lpid}/{vcpu_id}" in self.c.sessions:
            return
        self._attach(l1, lpid, vcpu_id)
        self.rcs["vcpu.attach"] += 1

    @precondition(lambda self: self._sessions())
    @rule(data=st.data())
    def detach(self, data: st.DataObject) -> None:
        s = self._draw_session(data)
        self.c.detach_vcpu(s.name)
        self.rcs["vcpu.detach"] += 1

    @rule(data=st.data(), l1=st.sampled_from(L1_NAMES))
    def l1_restart(self, data: st.DataObject, l1: str) -> None:
        if data.draw(st.integers(0, 5), label="rare") != 0:
            return  # keep state long-lived: only one draw in six restarts an L1
        shift = self._draw_shift(data)
        self.c.remove_l1(l1)
        self.ref.remove_l1(l1)
        assert len(self.c.l0.lpids_in_use) == self.ref.expected_lpids() + self.two_d.expected_lpids(), "LPIDs leaked by a departed L1"
        self._add_l1(l1)
        lpid = self._create_guest(l1, shift)
        self._attach(l1, lpid, 0)
        self.rcs["l1.restart"] += 1

    # ================================================================ the 2-D walk (L1 "l1c")
    # A third L1 runs one data guest whose L2 OS (L2Kernel) has its own process table and
    # trees; its vCPUs run effective addresses of PIDs 1 and 2.  Its rules: (PID, EA) accesses
    # one at a time and in batches, the L2 OS's map / unmap / protect (with the process-scoped
    # tlbies it issues), L1 unmapping / moving the guest's real pages, host events on them,
    # H_COPY_TOFROM_GUEST by (PID, EA).  Invariant: every TLB entry of those vCPUs is the
    # composition of L2's process tree, L1's tree and L0's table (and allows no more than all
    # three); L2's tables in memory hold what the L2 OS stored.
    def _boot_two_d(self, data: st.DataObject) -> None:
        c = self.c
        shift = data.draw(st.sampled_from([16, 21]), label="2d_page_shift")
        c.add_l1(TWO_D_L1, default_memslots(), use_rpt_invalidate=True)
        lpid = c.create_guest(TWO_D_L1, page_shift=shift, memory=TWO_D_MEMORY, data=True)
        s = c.attach_vcpu(TWO_D_L1, lpid, 0, pid=1)
        l2_shift = data.draw(st.sampled_from([12, 16]), label="l2_page_shift")
        rpt = data.draw(st.booleans(), label="l2_uses_h_rpt_invalidate")  # pseries L2 without GTSE
        c.boot_l2_kernel(s, page_shift=l2_shift, pids=(0, 1, 2), prts=0, table_base=1 << 20, table_size=1 << 20, use_rpt_invalidate=rpt)
        c.attach_vcpu(TWO_D_L1, lpid, 1, pid=2)
        self.two_d = RefTwoD(lpid=lpid, page_size=1 << l2_shift, live=True)

    def _two_d_sessions(self) -> list[VcpuSession]:
        return [s for s in self.c.sessions.values() if s.l1 == TWO_D_L1]

    def _draw_ea(self, data: st.DataObject) -> tuple[int, int]:
        """(pid, EA): user pages of PID 1 or 2, or a kernel (quadrant 3) page of PID 0."""
        ps = self.two_d.page_size
        page = data.draw(st.integers(0, 5), label="ea_page")
        off = 8 * data.draw(st.integers(0, 7), label="ea_word")
        pid = data.draw(st.sampled_from([1, 1, 2, 0]), label="pid")
        ea = TWO_D_EA + page * ps + off
        return pid, ((3 << 62) | ea) if pid == 0 else ea

    def _two_d_session(self, data: st.DataObject, pid: int) -> VcpuSession:
        s = data.draw(st.sampled_from(sorted(self._two_d_sessions(), key=lambda x: x.name)), label="2d_vcpu")
        if pid > 0:
            s.vcpu.pid = pid  # the L2 OS switched to that process (mtspr PIDR)
        return s

    @precondition(lambda self: self.two_d.live)
    @rule(data=st.data(), kind=st.sampled_from([LOAD, LOAD, STORE, STORE, 3]))
    def ea_access(self, data: st.DataObject, kind: int) -> None:
        pid, ea = self._draw_ea(data)
        s = self._two_d_session(data, pid)
        want = self.two_d.classify(pid, ea, kind)
        res = self.c.access_ea(s, ea, Access(kind))
        self.rcs[f"ea.{res.outcome.name}"] += 1
        assert res.outcome is want, f"{s.name} PID {pid} {Access(kind).name} {ea:#x}: got {res.outcome.name} ({res.detail}), reference says {want.name}"
        if want is Outcome.FILL:
            t = res.translation
            assert t is not None and t.pid == pid and t.page <= ea < t.page + (1 << t.shift)
            assert allowed_mask(t.pte) & (1 << kind), f"EA fill {t.pte:#x} does not allow kind {kind}"
            # At least one full 2-D walk: (4 + 1)(q + 1) + q references, q >= 3.
            assert res.refs >= 23, f"a 2-D walk made only {res.refs} references"
            self._check_ea_entry(s, t.pid, t.page, t.host, t.shift, t.real_page, allowed_mask(t.pte))

    @precondition(lambda self: self.two_d.live)
    @rule(data=st.data())
    def ea_batch(self, data: st.DataObject) -> None:
        pid = data.draw(st.sampled_from([1, 2]), label="pid")
        s = self._two_d_session(data, pid)
        n = data.draw(st.integers(1, 16), label="n")
        eas = []
        for _ in range(n):
            p, ea = self._draw_ea(data)
            eas.append(ea if p == 0 else (ea & ~(3 << 62)))
        kinds = data.draw(st.lists(st.sampled_from([LOAD, STORE, 3]), min_size=n, max_size=n), label="kinds")
        want = Counter(self.two_d.classify(0 if ea >> 62 == 3 else pid, ea, k) for ea, k in zip(eas, kinds, strict=True))
        before = Counter(s.vcpu.stats)
        segv = self.c.stats["l2_segv"]
        self.c.run_batch(s, eas, kinds)
        d = Counter(s.vcpu.stats)
        d.subtract(before)
        assert d["accesses"] == n and d["tlb_hits"] + d["misses_sent"] == n
        # Each access hits, or its miss ends in a fill, or the L2 OS refuses it (SIGSEGV).
        assert self.c.stats["l2_segv"] - segv == want[Outcome.GUEST_FAULT], f"batch: {dict(d)} vs reference {dict(want)}"
        assert d["errors"] == d["storage_interrupts"] == 0
        self.rcs["ea.batch"] += 1

    @precondition(lambda self: self.two_d.live)
    @rule(data=st.data(), op=st.sampled_from(["map", "unmap", "protect"]))
    def l2_edit(self, data: st.DataObject, op: str) -> None:
        pid = data.draw(st.sampled_from([1, 2, 0]), label="pid")
        ps = self.two_d.page_size
        first = data.draw(st.integers(0, 5), label="first")
        count = data.draw(st.integers(1, 3), label="count")
        ea, length = TWO_D_EA + first * ps, count * ps
        k = self.c.kernels[(TWO_D_L1, self.two_d.lpid)]
        s = self._two_d_sessions()[0]
        if op == "map":
            perms = data.draw(st.sampled_from([READ, READ | RW, READ | RW | EXEC, READ | EXEC]), label="perms")
            ops = k.map(pid, ea, length, perms)
            self.two_d.set_perms(pid, ea, length, perms)
        elif op == "unmap":
            ops = k.unmap(pid, ea, length)
            self.two_d.forget(pid, ea, length)
        else:
            perms = data.draw(st.sampled_from([0, READ, READ | RW, READ | EXEC]), label="perms")
            ops = k.protect(pid, ea, length, perms)
            self.two_d.set_perms(pid, ea, length, perms)
        self.c.apply_kernel_ops(s, ops)
        if op != "map":
            # The process-scoped tlbies reached every vCPU: nothing of that range survives
            # that allows more than the tree now does.
            for v in self._two_d_sessions():
                for e in v.vcpu.tlb.entries():
                    if e.pid == pid and ea <= (e.page & f.EA_VALID_MASK) < ea + length:
                        assert op == "protect" and e.mask & ~self.two_d.allowed_mask(pid, e.page) == 0, f"{v.name}: PID {pid} EA {e.page:#x} survives L2's {op}"
        self.rcs[f"l2.{op}"] += 1

    @precondition(lambda self: self.two_d.live)
    @rule(data=st.data(), op=st.sampled_from(["unmap", "remap", "host_unmap", "host_migrate"]))
    def two_d_l1_or_host_event(self, data: st.DataObject, op: str) -> None:
        """L1 or the host moves a page of the 2-D guest: a table page or a data page."""
        g = self.c.l1s[TWO_D_L1].guests[self.two_d.lpid]
        pages = sorted(g.backing)
        if not pages:
            return
        page = data.draw(st.sampled_from(pages), label="l2_page")
        l1 = self.c.l1s[TWO_D_L1]
        if op == "unmap":
            self.c.issue_all(TWO_D_L1, l1.unmap_pages(self.two_d.lpid, page << g.page_shift, g.page_size)[1])
        elif op == "remap":
            self.c.issue_all(TWO_D_L1, l1.remap_pages(self.two_d.lpid, page << g.page_shift, g.page_size)[1])
        else:
            vm = self.c.vms[TWO_D_L1]
            if op == "host_unmap":
                self.c.host_unmap(TWO_D_L1, g.backing[page])
            else:
                self.c.host_migrate(TWO_D_L1, g.backing[page])
            assert vm.lpid in self.c.l0.lpids_in_use
        self.rcs[f"2d.{op}"] += 1

    @precondition(lambda self: self.two_d.live)
    @rule(data=st.data())
    def ea_h_copy(self, data: st.DataObject) -> None:
        pid, ea = self._draw_ea(data)
        vm = self.c.vms[TWO_D_L1]
        scratch = 0x10_0000
        rc = self.c.drive(self.c.l0.h_copy_tofrom_guest(vm, self.two_d.lpid, pid, ea & f.EA_VALID_MASK, scratch, 0, 8))
        k = self.c.kernels[(TWO_D_L1, self.two_d.lpid)]
        if k.lookup(pid, ea) is None:
            assert rc == f.H.NOT_FOUND, f"H_COPY_TOFROM_GUEST of unmapped PID {pid} EA {ea:#x}: rc {rc}"
        if rc == f.H.SUCCESS:
            host = self._compose_ea(pid, ea)
            assert host is not None, f"H_COPY_TOFROM_GUEST read PID {pid} EA {ea:#x} that does not compose"
            got = self.c.l1s[TWO_D_L1].read_memory(scratch, 8)
            assert got == self.c.l0.mem.read(host, 8), f"H_COPY_TOFROM_GUEST of PID {pid} EA {ea:#x} copied other bytes"
        self.rcs[f"2d.h_copy.{rc}"] += 1

    def _compose_real(self, real: int) -> tuple[int, int, int] | None:
        """L2 real address -> (host address, L1 leaf pte, L0 leaf pte) via L1's tree and L0's
        table, or None when either has no leaf."""
        l1 = self.c.l1s[TWO_D_L1]
        w = l1.walk(l1.guests[self.two_d.lpid].pate_dw0(), real)
        if not w.ok:
            return None
        leaf = self.c.vms[TWO_D_L1].pgtable.lookup_leaf(w.raddr)
        if leaf is None:
            return None
        return (leaf.pte & f.PTE_RPN_MASK) + (w.raddr - leaf.gpa), w.pte, leaf.pte

    def _compose_ea(self, pid: int, ea: int) -> int | None:
        k = self.c.kernels[(TWO_D_L1, self.two_d.lpid)]
        slot = k.lookup(pid, ea)
        if slot is None:
            return None
        got = self._compose_real(f.pte_rpn(slot.pte) + ((ea & f.EA_VALID_MASK) - slot.gpa))
        return None if got is None else got[0]

    def _check_ea_entry(self, s: VcpuSession, pid: int, page: int, host: int, shift: int, real_page: int, mask: int) -> None:
        k = self.c.kernels[(TWO_D_L1, self.two_d.lpid)]
        where = f"{s.name} TLB PID {pid} EA {page:#x}/2^{shift}"
        slot = k.lookup(pid, page)
        assert slot is not None, f"{where}: L2's process tree maps no such page"
        assert shift <= slot.shift and real_page == f.pte_rpn(slot.pte) + ((page & f.EA_VALID_MASK) - slot.gpa), f"{where}: real page {real_page:#x} not L2's"
        got = self._compose_real(real_page)
        assert got is not None, f"{where}: L1's tree or L0's table no longer maps real page {real_page:#x}"
        want, l1pte, l0pte = got
        assert host == want, f"{where}: host {host:#x}, L2 o L1 o L0 composes {want:#x}"
        for kind in (LOAD, STORE, 3):
            if mask & (1 << kind):
                for what, pte in (("L2", slot.pte), ("L1", l1pte), ("L0", l0pte)):
                    assert allowed_mask(pte | (f.PTE_C if what == "L0" else 0)) & (1 << kind), f"{where}: allows kind {kind}, {what}'s leaf {pte:#x} does not"

    @invariant()
    def ea_tlbs_compose(self) -> None:
        if not self.two_d.live:
            return
        for s in self._two_d_sessions():
            for e in s.vcpu.tlb.entries():
                assert e.lpid == s.vcpu.lpid
                if e.pid < 0:
                    got = self._compose_real(e.page)
                    assert got is not None and got[0] == e.host, f"{s.name} real-mode TLB {e.page:#x}: host {e.host:#x}, composes {got}"
                else:
                    self._check_ea_entry(s, e.pid, e.page, e.host, e.shift, e.real_page, e.mask)

    @invariant()
    def l2_tables_in_memory(self) -> None:
        """What the L2 OS stored is in memory where its real addresses lead (L1 o L0)."""
        if not self.two_d.live:
            return
        k = self.c.kernels[(TWO_D_L1, self.two_d.lpid)]
        for pid, proc in k.procs.items():
            tree = proc.tree
            for page in proc.pages:
                # Every entry on the path: process-table entry, root, PUD and PMD PDEs, leaf.
                words = [(k.prte_addr(pid), k.mem.read_u64(k.prte_addr(pid)))]
                table = tree.root
                for level in (3, 2, 1, 0):
                    addr = tree.entry_addr(table, level, page)
                    words.append((addr, k.mem.read_u64(addr)))
                    table = words[-1][1] & f.PDE_NLB_MASK
                assert words[-1][1] & f.PTE_L, f"PID {pid} page {page:#x}: the L2 OS's own view has no leaf"
                for addr, value in words:
                    got = self._compose_real(addr)
                    if got is None:
                        continue  # swapped out by L1 or the host: the bytes are in a swap slot
                    assert self.c.l0.mem.read_u64(got[0]) == value, f"L2 table word at real {addr:#x} differs from what the L2 OS stored"

    # ================================================================ invariants
    @invariant()
    def audit_clean(self) -> None:
        rep = self.c.audit()
        assert rep.ok, "audit violations:\n" + "\n".join(str(v) for v in rep.violations[:20])

    @invariant()
    def lpids_accounted(self) -> None:
        want_lpids = self.ref.expected_lpids() + self.two_d.expected_lpids()
        assert len(self.c.l0.lpids_in_use) == want_lpids, f"L0 holds {len(self.c.l0.lpids_in_use)} LPIDs, reference expects {want_lpids}"
        for name, r in self.ref.l1s.items():
            want = {lp for lp, g in r.guests.items() if g.entered}
            assert set(self.c.vms[name].nested) == want, f"{name}: L0 registry {sorted(self.c.vms[name].nested)} != {sorted(want)}"

    @invariant()
    def l1_trees_match_intent(self) -> None:
        for name, r in self.ref.l1s.items():
            h = self.c.l1s[name]
            for lpid, g in r.guests.items():
                real = h.guests[lpid]
                assert set(real.backing) == set(g.pages), f"{name}/{lpid}: L1 backs pages {sorted(real.backing)}, reference maps {sorted(g.pages)}"
                pate = real.pate_dw0()
                for page, m in g.pages.items():
                    w = h.walk(pate, page << g.page_shift)
                    where = f"{name}/{lpid} page {page:#x}"
                    assert w.ok, f"{where}: L1 walk fails with {w.code:#x}"
                    assert w.raddr == m.l1_gpa, f"{where}: L1 leaf -> {w.raddr:#x}, reference {m.l1_gpa:#x}"
                    assert w.pte & 7 == m.perms, f"{where}: L1 perms {w.pte & 7:#x}, reference {m.perms:#x}"
                    assert w.pte & f.PTE_R, f"{where}: mapped leaf without R"
                    assert bool(w.pte & f.PTE_C) == m.c, f"{where}: L1 C={bool(w.pte & f.PTE_C)}, reference C={m.c}"

    @invariant()
    def shadow_leaves_compose(self) -> None:
        for name, r in self.ref.l1s.items():
            vm = self.c.vms[name]
            for lpid, gp in vm.nested.items():
                g = r.guests[lpid]
                for slot in self.c.l0.shadow_leaves(gp):
                    where = f"{name}/{lpid} shadow leaf {slot.gpa:#x}/2^{slot.shift}"
                    m = g.pages.get(slot.gpa >> g.page_shift)
                    assert m is not None, f"{where}: L1 does not map this page"
                    want = self.ref.expected_host(name, lpid, slot.gpa, vm.backing)
                    assert want == slot.pte & f.PTE_RPN_MASK, f"{where}: maps {slot.pte & f.PTE_RPN_MASK:#x}, reference composes {want}"
                    assert not slot.pte & 7 & ~m.perms, f"{where}: perms {slot.pte & 7:#x} exceed L1's {m.perms:#x}"
                    if slot.pte & f.PTE_C:
                        assert m.c, f"{where}: shadow C but L1's leaf has no C"
                        a = self.ref.l1_address(name, lpid, slot.gpa)
                        assert a is not None
                        l0 = vm.pgtable.lookup_leaf(a)
                        assert l0 is not None and l0.pte & f.PTE_C, f"{where}: shadow C but L0's PTE has no C"

    @invariant()
    def tlbs_compose(self) -> None:
        for name in self._sessions():
            s = self.c.sessions[name]
            g = self.ref.l1s[s.l1].guests[s.l1_lpid]
            for e in s.vcpu.tlb.entries():
                where = f"{s.name} TLB {e.page:#x}/2^{e.shift}"
                assert e.lpid == s.vcpu.lpid, f"{where}: tagged {e.lpid}, vCPU runs {s.vcpu.lpid}"
                assert e.shift <= g.page_shift, f"{where}: larger than L1's page"
                want = self.ref.expected_host(s.l1, s.l1_lpid, e.page, self.c.vms[s.l1].backing)
                assert want == e.host, f"{where}: host {e.host:#x}, reference composes {want}"
                for kind in (LOAD, STORE, 3):
                    if e.mask & (1 << kind):
                        o = self.ref.classify(s.l1, s.l1_lpid, e.page, kind)
                        assert o is Outcome.FILL, f"{where}: allows kind {kind} that must give {o.name}"
                if e.mask & (1 << STORE):
                    m = g.pages[e.page >> g.page_shift]
                    assert m.c and m.perms & RW, f"{where}: allows stores but L1's leaf has no C"


class Machine64K(NestedMmuMachine):
    L0_PAGE_SHIFT = 16
    GUEST_SHIFTS = (16, 16, 21, 21, 12, 30)


class Machine4K(NestedMmuMachine):
    L0_PAGE_SHIFT = 12
    GUEST_SHIFTS = (12, 12, 16, 16, 21)


MACHINES = [pytest.param(Machine64K, id="l0-64k"), pytest.param(Machine4K, id="l0-4k")]


@pytest.mark.parametrize("machine", MACHINES)
def test_nested_mmu_stateful(machine: type[NestedMmuMachine]) -> None:
    run_state_machine_as_test(machine, settings=settings.get_profile("nestmmu-stateful"))


@pytest.mark.slow
@pytest.mark.parametrize("machine", MACHINES)
def test_nested_mmu_stateful_slow(machine: type[NestedMmuMachine]) -> None:
    run_state_machine_as_test(machine, settings=settings.get_profile("nestmmu-stateful-slow"))

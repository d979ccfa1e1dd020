"""The audit can fail: each test corrupts one piece of state and expects exactly that invariant."""

from __future__ import annotations

from _helpers_fault import Env, MiB, base_page_memslots, make_env

from nestmmu.core import formats as f
from nestmmu.core.effects import Outcome
from nestmmu.core.formats import Access
from nestmmu.core.l1 import GuestRegion

PROTECT = 32 * MiB


def env_with_pages(**kw: object) -> Env:
    e = make_env(regions=[GuestRegion("protect", PROTECT, 2 * MiB, f.PTE_EAA_READ)], **kw)  # type: ignore[arg-type]
    for addr, kind in ((0x10000, Access.LOAD), (0x20000, Access.STORE), (PROTECT, Access.LOAD)):
        assert e.access(addr, kind).outcome is Outcome.FILL
    rep = e.c.audit()
    assert rep.ok, rep.violations
    assert rep.checked["shadow_leaves"] == 3 and rep.checked["tlb_entries"] == 3
    return e


def poke_shadow(e: Env, n_gpa: int, pte: int) -> None:
    slot = e.shadow(n_gpa)
    assert slot is not None
    assert e.gp.shadow_pgtable is not None
    e.gp.shadow_pgtable.mem.write_u64(slot.addr, pte)


def test_clean_state_passes() -> None:
    assert env_with_pages().c.audit().ok


def test_i1_wrong_rpn_in_a_shadow_leaf() -> None:
    e = env_with_pages()
    a, b = e.shadow(0x10000), e.shadow(0x20000)
    assert a is not None and b is not None
    # Point 0x10000 at 0x20000's host page: still this L1's memory, but the wrong one.
    poke_shadow(e, 0x10000, (a.pte & ~f.PTE_RPN_MASK) | (b.pte & f.PTE_RPN_MASK))
    e.s.vcpu.tlb.clear()
    assert e.violations() == {"I1"}


def test_i1_shadow_leaf_whose_l1_mapping_is_gone() -> None:
    e = env_with_pages()
    g = e.l1_leaf(0x10000)
    e.l1.mem.write_u64(g.leaf_addr, 0)  # L1 unmaps without a flush
    assert e.violations() == {"I1"}


def test_i2_shadow_leaf_with_more_permissions_than_l1_grants() -> None:
    e = env_with_pages()
    sh = e.shadow(PROTECT)
    assert sh is not None and not sh.pte & f.PTE_EAA_RW
    poke_shadow(e, PROTECT, sh.pte | f.PTE_EAA_RW)
    assert e.violations() == {"I2"}


def test_i3_c_set_in_the_shadow_leaf_only() -> None:
    e = env_with_pages(memslots=base_page_memslots())  # 0x20000's L0 PTE (with C) is its own
    sh = e.shadow(0x10000)
    assert sh is not None and not sh.pte & f.PTE_C
    # The load instantiated L1's leaf and L0's PTE writable, hence with C (the kernel's
    # kvmppc_book3s_instantiate_page); clear both so that only the shadow leaf has C.
    g = e.l1_leaf(0x10000)
    l0 = e.l0_pte(g.raddr)
    assert l0 is not None and g.pte & f.PTE_C and l0.pte & f.PTE_C
    e.l1.mem.write_u64(g.leaf_addr, g.pte & ~f.PTE_C)
    e.vm.pgtable.mem.write_u64(l0.addr, l0.pte & ~f.PTE_C)
    assert e.violations() == set()
    poke_shadow(e, 0x10000, sh.pte | f.PTE_C)
    assert e.violations() == {"I3"}


def test_i3_r_in_shadow_without_l0_r() -> None:
    e = env_with_pages()
    l0 = e.l0_pte(e.l1_gpa(0x10000))
    assert l0 is not None
    e.vm.pgtable.mem.write_u64(l0.addr, l0.pte & ~f.PTE_R)  # aged in L0 only
    assert "I3" in e.violations()
    assert e.violations() == {"I3"}


def test_i4_shadow_leaf_into_another_l1s_memory() -> None:
    e = env_with_pages()
    c = e.c
    c.add_l1("b")
    lp = c.create_guest("b")
    sb = c.attach_vcpu("b", lp, 0)
    assert c.access(sb, 0x10000, Access.LOAD).outcome is Outcome.FILL
    assert c.audit().ok
    foreign = c.l0.shadow_leaves(sb.gp)[0].pte & f.PTE_RPN_MASK
    # Make a's L0 PTE *and* its shadow leaves agree on b's host page: composition holds,
    # isolation does not.
    l0 = e.l0_pte(e.l1_gpa(0x10000))
    assert l0 is not None
    l0_base = foreign & ~0x1F_FFFF
    e.vm.pgtable.mem.write_u64(l0.addr, (l0.pte & ~f.PTE_RPN_MASK) | l0_base)
    moved = 0
    for sh in e.shadow_leaves():
        l1_gpa = e.l1_gpa(sh.gpa)
        if l1_gpa & ~0x1F_FFFF == l0.gpa:
            poke_shadow(e, sh.gpa, (sh.pte & ~f.PTE_RPN_MASK) | (l0_base + (l1_gpa & 0x1F_0000)))
            moved += 1
    assert moved >= 1
    e.s.vcpu.tlb.clear()
    rep = e.c.audit()
    assert {v.invariant for v in rep.violations} == {"I4"}
    assert len(rep.violations) == moved


def test_i5_tlb_entry_left_after_shadow_leaf_cleared_without_tlbie() -> None:
    e = env_with_pages()
    sh = e.shadow(0x20000)
    assert sh is not None
    poke_shadow(e, 0x20000, 0)
    assert e.violations() == {"I5"}


def test_i5_tlb_entry_allowing_more_than_the_shadow_leaf() -> None:
    e = env_with_pages()
    sh = e.shadow(0x20000)
    assert sh is not None and sh.pte & f.PTE_C
    poke_shadow(e, 0x20000, sh.pte & ~f.PTE_C)  # cleaned without a tlbie
    assert e.violations() == {"I5"}


def test_i5_tlb_entry_of_a_freed_guest() -> None:
    e = env_with_pages()
    e.c.detach_vcpu(e.s.name)
    stale = list(e.s.vcpu.tlb.entries())
    e.c.destroy_guest("a", e.lpid)
    assert e.gp.freed
    rep = e.c.audit()
    assert rep.ok
    from nestmmu.core.audit import audit

    rep = audit(e.l0, e.c.walk, (("dead", t) for t in stale))
    assert {v.invariant for v in rep.violations} == {"I5"}


def test_i6_missing_rmap_entry() -> None:
    e = env_with_pages()
    rmap = e.memslot().rmap
    key = next(k for k, v in rmap.items() if e.rmap_entry(0x20000) in v)
    rmap[key].remove(e.rmap_entry(0x20000))
    assert e.violations() == {"I6"}


def test_i7_leaked_lpid() -> None:
    e = env_with_pages()
    leaked = e.l0.kvmppc_alloc_lpid()
    assert leaked is not None
    rep = e.c.audit()
    assert {v.invariant for v in rep.violations} == {"I7"}
    assert str(leaked) in str(rep.violations[0])


def test_i7_leaked_host_block() -> None:
    e = env_with_pages()
    e.l0.alloc.alloc(0x10000)
    assert e.violations() == {"I7"}


def test_i7_unreferenced_unregistered_guest() -> None:
    e = env_with_pages()
    gp = e.gp
    del e.vm.nested[gp.l1_lpid]  # dropped from the registry without release
    gp.refcnt = 0
    e.c.sessions.clear()
    assert e.violations() == {"I7"}

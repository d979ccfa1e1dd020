"""Chunked L1 tree ops (what the L1 service runs in slices) change the same pages, issue the
same hcalls in the same order and leave the same tree as the one-shot ops."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from nestmmu.core import formats as f
from nestmmu.core.l0 import ConfigError
from nestmmu.core.l1 import PERM_RWX, GuestRegion, Hcall, L1Hypervisor, L2Guest

R = f.PTE_EAA_READ

Step = tuple[str, int, int]  # (op, first page, pages)
SCRIPT: list[Step] = [("map", 0, 40), ("protect", 5, 20), ("remap", 0, 37), ("unmap", 8, 9), ("map", 3, 30), ("unmap", 0, 64), ("map", 60, 4)]


def _fresh(page_shift: int) -> tuple[L1Hypervisor, L2Guest]:
    l1 = L1Hypervisor("l1")
    g, _ = l1.create_guest(0, page_shift, 64 << page_shift, [GuestRegion("protect", 48 << page_shift, 4 << page_shift, R)])
    return l1, g


def _op(l1: L1Hypervisor, g: L2Guest, op: str, first: int, pages: int, chunk: int | None) -> tuple[int, list[Hcall]]:
    a, n = first << g.page_shift, pages << g.page_shift
    oneshot: dict[str, Callable[[], tuple[int, list[Hcall]]]] = {
        "map": lambda: l1.map_pages(g.lpid, a, n, PERM_RWX),
        "unmap": lambda: l1.unmap_pages(g.lpid, a, n),
        "protect": lambda: l1.protect_pages(g.lpid, a, n, R),
        "remap": lambda: l1.remap_pages(g.lpid, a, n),
    }
    if chunk is None:
        return oneshot[op]()
    chunked: dict[str, Callable[[], Iterator[tuple[int, list[Hcall]]]]] = {
        "map": lambda: l1.map_pages_chunks(g.lpid, a, n, PERM_RWX, chunk),
        "unmap": lambda: l1.unmap_pages_chunks(g.lpid, a, n, chunk),
        "protect": lambda: l1.protect_pages_chunks(g.lpid, a, n, R, chunk),
        "remap": lambda: l1.remap_pages_chunks(g.lpid, a, n, chunk),
    }
    total, hcalls, steps = 0, [], 0
    for k, hs in chunked[op]():
        steps += 1
        assert len(hs) <= chunk
        total += k
        hcalls += hs
    assert steps == -(-pages // chunk)
    return total, hcalls


@pytest.mark.parametrize("page_shift", [12, 16])
@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_chunked_ops_equal_oneshot(page_shift: int, chunk: int) -> None:
    a, ga = _fresh(page_shift)
    b, gb = _fresh(page_shift)
    for op, first, pages in SCRIPT:
        ra = _op(a, ga, op, first, pages, None)
        rb = _op(b, gb, op, first, pages, chunk)
        assert ra == rb, (op, first, pages)
        assert [(s.gpa, s.pte) for s in ga.tree.leaves()] == [(s.gpa, s.pte) for s in gb.tree.leaves()]
        assert ga.backing == gb.backing and ga.perms == gb.perms
        # GetGuest reports mapped_pages as len(backing): one backing page per leaf.
        assert len(ga.backing) == sum(1 for _ in ga.tree.leaves())
    assert a.stats == b.stats


def test_chunked_op_validates_before_changing_anything() -> None:
    l1, g = _fresh(16)
    with pytest.raises(ConfigError):
        l1.protect_pages_chunks(g.lpid, 0, 4 << 16, 0x10, 2)
    with pytest.raises(ConfigError):
        l1.unmap_pages_chunks(g.lpid, 0, 65 << 16, 2)
    assert l1.stats.get("pages_unmapped", 0) == 0 and not any(True for _ in g.tree.leaves())


def test_guest_destroyed_between_chunks_ends_the_op() -> None:
    l1, g = _fresh(16)
    chunks = l1.map_pages_chunks(g.lpid, 0, 16 << 16, 0, 4)
    assert next(chunks)[0] == 4
    l1.destroy_guest(g.lpid)
    assert list(chunks) == []

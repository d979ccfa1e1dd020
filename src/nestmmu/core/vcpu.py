"""An L2 vCPU: a TLB tagged by LPID and the batching of TLB misses.

The TLB caches translations the hardware walk produced (shadow LPID, page, size, permissions,
R/C).  A hit needs no help from anyone; a load needs R, a store needs RW *and* C (POWER9 never
sets C itself, so a store on an entry without C is a miss that faults with SET_RC).

Batching: a vCPU hands its accesses over in batches.  ``begin`` scans a batch, counts hits and
returns the misses to send to L0, one per (4K page, kind); other misses on the same page and
kind wait for that one's result.  ``complete`` installs results and re-checks the waiting
accesses, returning the next round (usually empty).  A batch is thus an out-of-order window:
the outcome of each access is the same as if it ran alone, after the ones before it on its page.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import formats as f
from .effects import AccessResult, Invalidation, Outcome, Scope, Translation
from .formats import Access

_LOAD_OK = 1 << Access.LOAD
_STORE_OK = 1 << Access.STORE
_IFETCH_OK = 1 << Access.IFETCH


def allowed_mask(pte: int) -> int:
    """Which access kinds a TLB entry built from ``pte`` satisfies without a fault."""
    if not pte & f.PTE_R:
        return 0
    m = 0
    if pte & (f.PTE_EAA_READ | f.PTE_EAA_RW):
        m |= _LOAD_OK
    if pte & f.PTE_EAA_RW and pte & f.PTE_C:
        m |= _STORE_OK
    if pte & f.PTE_EAA_EXEC:
        m |= _IFETCH_OK
    return m


@dataclass(frozen=True, slots=True)
class TlbEntry:
    lpid: int
    page: int
    host: int
    shift: int
    pte: int
    mask: int
    pid: int = -1  # -1: real mode (partition scoped only); else the PID of an EA translation
    real_page: int = -1  # EA entries: the L2 real address of the page (partition-scoped input)


Ctx = tuple[int, int]  # (LPID, PID context); real mode is PID -1
#: A TLB way's tag: (LPID, PID, page shift, page number at that shift).
Tag = tuple[int, int, int, int]

#: POWER9: 1,024 TLB entries per core, 4-way set associative (256 congruence classes).
POWER9_TLB_ENTRIES = 1024
POWER9_TLB_WAYS = 4
#: The largest geometry a workload may ask for (the proto fields are uint32); sets are made on
#: demand, so memory follows the entries filled, never the geometry asked for.
MAX_TLB_ENTRIES = (1 << 32) - 1


def tlb_geometry_error(entries: int, ways: int) -> str | None:
    """Why (entries, ways) is not a TLB geometry, or None if it is one.

    ``entries`` 0 is an unbounded TLB (``ways`` is then ignored but must still be >= 1).
    Otherwise ``entries / ways`` congruence classes, a power of two: the hardware selects the
    class with the low bits of the page number, so a class count that is not a power of two
    would have no hardware counterpart."""
    if ways < 1:
        return f"TLB ways must be >= 1, not {ways}"
    if not 0 <= entries <= MAX_TLB_ENTRIES:
        return f"TLB entries must be in 0..{MAX_TLB_ENTRIES} (0 = unbounded), not {entries}"
    if entries == 0:
        return None
    if entries % ways:
        return f"TLB entries ({entries}) must be a multiple of the ways ({ways})"
    sets = entries // ways
    if sets & (sets - 1):
        return f"TLB entries / ways must be a power of two (the set is selected by page-number bits), not {entries} / {ways} = {sets}"
    return None


class Tlb:
    """Translation cache of one vCPU, tagged by LPID and PID context.

    Real-mode entries live in context (lpid, -1) and are keyed by L2 real page; EA entries
    (the 2-D walk's result) in (lpid, pid), keyed by effective page, and remember the L2 real
    page so a partition-scoped tlbie of that real range reaches them (POWER9 caches the
    combined EA -> host real translation: the ISA requires a partition-scoped tlbie to remove
    every entry derived from the partition-scoped translation it names).

    Geometry: ``entries`` in ``entries / ways`` congruence classes of ``ways`` entries each
    (default POWER9's 1,024 entries, 4-way); ``entries`` 0 is unbounded (one class, no limit).
    The class of an entry is its page number *at its own page size* (``page >> shift``, the
    EPN for an EA entry, the real page number for a real-mode one) modulo the number of
    classes, and all page sizes and all (LPID, PID) contexts share the one array of classes:
    POWER9's TLB is one structure per core indexed by the page-size-specific EPN, with LPID,
    PID and page size in the tag, so a 64K and a 2M page (or two LPIDs) can compete for the
    same class.  Replacement is exact LRU within the class: every lookup that finds an entry
    (a hit, or a permission miss that found it) and every fill stamps it with a running use
    count, and a fill into a full class evicts the entry with the oldest stamp.  An eviction
    only ever removes an entry (from the class, the context's dict and the fast cache), so a
    later access misses and refills from the shadow table; it can never bring back a stale one.
    """

    def __init__(self, entries: int = POWER9_TLB_ENTRIES, ways: int = POWER9_TLB_WAYS) -> None:
        self.by_ctx: dict[Ctx, dict[tuple[int, int], TlbEntry]] = {}
        self._shifts: dict[Ctx, set[int]] = {}
        self._pids: dict[int, set[int]] = {}  # lpid -> PID contexts holding entries
        # addr >> 12 -> the way [mask, last use] of the entry translating that 4K page, for the
        # running context only; a hit reads the mask and stamps the use in one object.
        self._fast: dict[int, list[int]] = {}
        self._fast_lpid = -1  # the running context (LPID, PID) the fast cache is for
        self._fast_pid = -1
        #: Running use count: the LRU stamp of the next lookup that finds an entry, or fill.
        self.tick = 0
        self.capacity = 0
        self.ways = 1
        self._limit = 0  # ways per class, 0 = no limit (unbounded)
        self._set_mask = 0  # classes - 1
        self._sets: dict[int, dict[Tag, list[int]]] = {}  # class -> tag -> [mask, last use]
        self._configure(entries, ways)

    def _configure(self, entries: int, ways: int) -> None:
        err = tlb_geometry_error(entries, ways)
        if err is not None:
            raise ValueError(err)
        self.capacity = entries
        self.ways = ways
        self._limit = ways if entries else 0
        self._set_mask = entries // ways - 1 if entries else 0
        self._sets = {}

    @property
    def geometry(self) -> tuple[int, int]:
        """(entries, ways); entries 0 = unbounded."""
        return self.capacity, self.ways

    def resize(self, entries: int, ways: int) -> int:
        """Change the geometry, keeping the most recently used entries that fit (the others are
        evicted, oldest first, as if refilled in their order of use); returns the evictions."""
        if (entries, ways) == self.geometry:
            return 0
        old = sorted((way[1], tag, way) for ways_ in self._sets.values() for tag, way in ways_.items())
        self._configure(entries, ways)
        evicted = 0
        for _, tag, way in old:
            s = self._class(tag[3])
            if self._limit and len(s) >= self._limit:
                self._evict(s)
                evicted += 1
            s[tag] = way
        return evicted

    def _class(self, page_number: int) -> dict[Tag, list[int]]:
        idx = page_number & self._set_mask
        s = self._sets.get(idx)
        if s is None:
            s = self._sets[idx] = {}
        return s

    def __len__(self) -> int:
        return sum(len(d) for d in self.by_ctx.values())

    def entries(self) -> list[TlbEntry]:
        return [e for d in self.by_ctx.values() for e in d.values()]

    def class_sizes(self) -> list[int]:
        """Entries held in each congruence class that holds any (for checks and tests)."""
        return [len(s) for s in self._sets.values() if s]

    def lookup(self, lpid: int, addr: int, pid: int = -1) -> TlbEntry | None:
        """The entry translating ``addr`` (smallest page size first); an inspection: it does
        not count as a use for LRU (``mask`` and the scan do)."""
        ctx = (lpid, pid)
        d = self.by_ctx.get(ctx)
        if not d:
            return None
        for shift in sorted(self._shifts[ctx]):
            e = d.get((shift, addr >> shift))
            if e is not None:
                return e
        return None

    def fast_cache(self) -> dict[int, list[int]]:
        """The per-4K-page cache of the running context (cleared in place, never replaced):
        4K page -> the way [allowed mask, last use] of the entry translating it."""
        return self._fast

    def select(self, lpid: int, pid: int = -1) -> None:
        """Make (lpid, pid) the running context of the fast cache."""
        if lpid != self._fast_lpid or pid != self._fast_pid:
            self._fast.clear()
            self._fast_lpid = lpid
            self._fast_pid = pid

    def find(self, lpid: int, addr: int, pid: int = -1) -> list[int] | None:
        """The way [mask, last use] translating ``addr`` in the running context (``select``),
        entered in the fast cache; None on a miss.  The caller stamps the use."""
        key = addr >> 12
        way = self._fast.get(key)
        if way is None:
            e = self.lookup(lpid, addr, pid)
            if e is None:
                return None
            pn = e.page >> e.shift
            way = self._fast[key] = self._sets[pn & self._set_mask][(lpid, pid, e.shift, pn)]
        return way

    def mask(self, lpid: int, addr: int, pid: int = -1) -> int:
        """Allowed-access mask for addr (0 = miss); finding the entry counts as its use (LRU)."""
        if lpid != self._fast_lpid or pid != self._fast_pid:
            self.select(lpid, pid)
        way = self._fast.get(addr >> 12)
        if way is None:
            way = self.find(lpid, addr, pid)
            if way is None:
                return 0
        way[1] = self.tick
        self.tick += 1
        return way[0]

    def fill(self, t: Translation) -> int:
        """Install a translation (replacing the entry of the same page and size); returns the
        number of entries evicted to make room for it (0 or 1)."""
        ctx = (t.lpid, t.pid)
        pn = t.page >> t.shift
        tag = (t.lpid, t.pid, t.shift, pn)
        s = self._class(pn)
        evicted = 0
        if tag not in s and self._limit and len(s) >= self._limit:
            self._evict(s)
            evicted = 1
        d = self.by_ctx.setdefault(ctx, {})
        self._shifts.setdefault(ctx, set()).add(t.shift)
        self._pids.setdefault(t.lpid, set()).add(t.pid)
        e = TlbEntry(t.lpid, t.page, t.host, t.shift, t.pte, allowed_mask(t.pte), t.pid, t.real_page)
        d[(t.shift, pn)] = e
        s[tag] = [e.mask, self.tick]  # a new way object: the fast cache never sees the old one
        self.tick += 1
        self._unfast(t.lpid, t.pid, t.page, t.shift)
        return evicted

    def _unfast(self, lpid: int, pid: int, page: int, shift: int) -> None:
        """Drop the fast cache's 4K pages of [page, page + 2^shift) in context (lpid, pid)."""
        if lpid == self._fast_lpid and pid == self._fast_pid:
            if shift <= 16:
                for k in range(page >> 12, (page + (1 << shift)) >> 12):
                    self._fast.pop(k, None)
            else:
                self._fast.clear()

    def _evict(self, s: dict[Tag, list[int]]) -> None:
        """Remove the least recently used entry of class ``s`` (full, so not empty)."""
        tag = min(s, key=lambda k: s[k][1])
        lpid, pid, shift, pn = tag
        del s[tag]
        ctx = (lpid, pid)
        d = self.by_ctx[ctx]
        del d[(shift, pn)]
        if not d:
            self._drop_ctx(ctx)
        self._unfast(lpid, pid, pn << shift, shift)

    def _drop_ctx(self, ctx: Ctx) -> int:
        d = self.by_ctx.pop(ctx, None)
        self._shifts.pop(ctx, None)
        pids = self._pids.get(ctx[0])
        if pids is not None:
            pids.discard(ctx[1])
            if not pids:
                del self._pids[ctx[0]]
        if not d:
            return 0
        sets, set_mask = self._sets, self._set_mask
        for shift, pn in d:
            del sets[pn & set_mask][(ctx[0], ctx[1], shift, pn)]
        return len(d)

    def invalidate(self, inv: Invalidation) -> int:
        """Apply one tlbie; returns the number of entries dropped."""
        if inv.scope is Scope.ALL:
            n = len(self)
            self.by_ctx.clear()
            self._shifts.clear()
            self._pids.clear()
            self._fast.clear()
            self._sets.clear()
            return n
        if inv.lpid == self._fast_lpid:
            self._fast.clear()
        pids = self._pids.get(inv.lpid)
        if not pids:
            return 0
        if inv.scope is Scope.LPID:
            return sum(self._drop_ctx((inv.lpid, pid)) for pid in list(pids))
        if inv.prs:
            # Process scoped: only EA entries of that PID.
            if inv.pid < 0 or inv.pid not in pids:
                return 0
            ctx = (inv.lpid, inv.pid)
            if inv.scope is Scope.PID:
                return self._drop_ctx(ctx)
            return self._drop_range(ctx, inv.address, inv.address + max(inv.size, 1), False)
        if inv.scope is Scope.PID:
            return 0
        # Partition scoped by address: real-mode entries by page, EA entries by real page.
        start, end = inv.address, inv.address + max(inv.size, 1)
        return sum(self._drop_range((inv.lpid, pid), start, end, pid >= 0) for pid in list(pids))

    def _drop_range(self, ctx: Ctx, start: int, end: int, by_real: bool) -> int:
        d = self.by_ctx.get(ctx)
        if not d:
            return 0
        if by_real:
            doomed = [k for k, e in d.items() if e.real_page < end and start < e.real_page + (1 << e.shift)]
        else:
            doomed = [k for k, e in d.items() if e.page < end and start < e.page + (1 << e.shift)]
        sets, set_mask = self._sets, self._set_mask
        for k in doomed:
            del d[k]
            shift, pn = k
            del sets[pn & set_mask][(ctx[0], ctx[1], shift, pn)]
        if not d:
            self._drop_ctx(ctx)
        return len(doomed)

    def clear(self) -> None:
        self.invalidate(Invalidation(0, Scope.ALL))


class Vcpu:
    """One L2 vCPU running with a shadow LPID: its TLB, counters and the batch protocol."""

    def __init__(self, vcpu_id: int, lpid: int = 0, pid: int = -1, tlb_entries: int = POWER9_TLB_ENTRIES, tlb_ways: int = POWER9_TLB_WAYS) -> None:
        self.vcpu_id = vcpu_id
        self.lpid = lpid  # the shadow LPID the hardware runs this vCPU with
        # PIDR: -1 runs in real mode (accesses are L2 real addresses); >= 0 translates
        # effective addresses through that process's tree (quadrant 0; quadrant 3 is PID 0).
        self.pid = pid
        self.tlb = Tlb(tlb_entries, tlb_ways)
        self.stats: Counter[str] = Counter()
        self._pending: dict[tuple[int, int], int] = {}
        self._deferred: list[tuple[int, int]] = []
        self._sent: list[tuple[int, int]] = []

    def run_hits(self, addrs: Sequence[int], kinds: Sequence[int]) -> list[tuple[int, int]]:
        """Scan a batch: count TLB hits; return the misses to send (one per page and kind)."""
        if len(addrs) != len(kinds):
            raise ValueError(f"run_hits: {len(addrs)} addresses but {len(kinds)} kinds")
        self.stats["accesses"] += len(addrs)
        return self._scan(zip(addrs, kinds, strict=True))  # lengths checked above

    def _scan(self, accesses: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        tlb = self.tlb
        lpid = self.lpid
        pid = self.pid
        hits = 0
        pending = self._pending
        deferred = self._deferred
        send: list[tuple[int, int]] = []
        if pid < 0:
            # Real mode, the hot path: one context for the whole scan, so look the 4K page up
            # in the TLB's per-page cache directly and take the method call only on a miss
            # there (the cache dict is cleared in place, never replaced, so it stays valid).
            # A hit stamps the entry's way with the running use count (exact LRU in its class;
            # no fill or eviction happens during a scan, so the count stays local until the
            # end), and hits are the stamps taken minus the permission misses that took one.
            tlb.select(lpid)  # the (LPID, real mode) context of the cache
            get = tlb.fast_cache().get
            find = tlb.find
            tick = tick0 = tlb.tick
            denied = 0
            for addr, kind in accesses:
                way = get(addr >> 12)
                if way is not None or (way := find(lpid, addr)) is not None:
                    way[1] = tick
                    tick += 1
                    if way[0] >> kind & 1:
                        continue
                    denied += 1  # found, but not for this kind (a store without C): a miss
                _miss(addr, kind, pending, deferred, send)
            tlb.tick = tick
            hits = tick - tick0 - denied
        else:
            tlb_mask = tlb.mask
            for addr, kind in accesses:
                if tlb_mask(lpid, addr, _ctx_pid(pid, addr)) & (1 << kind):
                    hits += 1
                    continue
                _miss(addr, kind, pending, deferred, send)
        self.stats["tlb_hits"] += hits
        self.stats["misses_sent"] += len(send)
        self._sent = send
        return send

    def complete(self, results: list[AccessResult]) -> list[tuple[int, int]]:
        """Install the results of the last batch sent; return the next round to send."""
        if len(results) != len(self._sent):
            raise ValueError(f"got {len(results)} results for {len(self._sent)} accesses")
        for r in results:
            self.apply(r)
        return self.next_round()

    def next_round(self) -> list[tuple[int, int]]:
        """After every result of the last round was applied (with any tlbies in between)."""
        self._pending = {}
        again, self._deferred = self._deferred, []
        if not again:
            self._sent = []
            return []
        # Deferred accesses were already counted as accesses; rescan them.
        return self._scan(again)

    def take_deferred(self) -> list[tuple[int, int]]:
        """``next_round`` in pieces: end the round and hand back the deferred accesses, for the
        caller to ``rescan`` (in slices, as long as nothing else scans in between)."""
        self._pending = {}
        again, self._deferred = self._deferred, []
        self._sent = []
        return again

    def rescan(self, accesses: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Scan deferred accesses again (already counted as accesses)."""
        return self._scan(accesses)

    def apply(self, r: AccessResult) -> None:
        stats = self.stats
        if r.outcome is Outcome.FILL:
            assert r.translation is not None
            if self.tlb.fill(r.translation):
                stats["tlb_evictions"] += 1
            stats["fills"] += 1
        elif r.outcome is Outcome.STORAGE_INTERRUPT:
            stats["storage_interrupts"] += 1
        elif r.outcome is Outcome.MMIO_EMULATED:
            stats["mmio_emulated"] += 1
        elif r.outcome is Outcome.L1_EMULATED:
            stats["l1_emulated"] += 1
        elif r.outcome is Outcome.GUEST_FAULT:
            stats["guest_faults"] += 1
        else:
            stats["errors"] += 1

    def set_tlb_geometry(self, entries: int, ways: int) -> None:
        """Give the TLB another geometry (entries 0 = unbounded); entries that no longer fit
        are evicted, least recently used first, and counted."""
        n = self.tlb.resize(entries, ways)
        if n:
            self.stats["tlb_evictions"] += n

    def invalidate(self, inv: Invalidation) -> None:
        self.stats["invalidations_applied"] += 1
        self.stats["tlb_entries_dropped"] += self.tlb.invalidate(inv)


def _miss(addr: int, kind: int, pending: dict[tuple[int, int], int], deferred: list[tuple[int, int]], send: list[tuple[int, int]]) -> None:
    """A TLB miss in a scan: the first per (4K page, kind) is sent, the rest wait for it."""
    key = (addr >> 12, kind)
    if key in pending:
        deferred.append((addr, kind))
    else:
        pending[key] = len(send)
        send.append((addr, kind))


def _ctx_pid(pidr: int, ea: int) -> int:
    """The PID an EA translates with: quadrant 3 (EA bits 0:1 = 0b11) is PID 0 (the kernel),
    any other quadrant PIDR (quadrants 1/2 fault; they never fill, so they always miss)."""
    return 0 if ea >> 62 == 3 else pidr

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


class Tlb:
    """Translation cache of one vCPU, tagged by LPID and PID context.

    Real-mode entries live in context (lpid, -1) and are keyed by L2 real page; EA entries
    (the 2-D walk's result) in (lpid, pid), keyed by effective page, and remember the L2 real
    page so a partition-scoped tlbie of that real range reaches them (POWER9 caches the
    combined EA -> host real translation: the ISA requires a partition-scoped tlbie to remove
    every entry derived from the partition-scoped translation it names).
    """

    def __init__(self) -> None:
        self.by_ctx: dict[Ctx, dict[tuple[int, int], TlbEntry]] = {}
        self._shifts: dict[Ctx, set[int]] = {}
        self._pids: dict[int, set[int]] = {}  # lpid -> PID contexts holding entries
        self._fast: dict[int, int] = {}  # addr >> 12 -> mask, for the running context only
        self._fast_lpid = -1  # the running context (LPID, PID) the fast cache is for
        self._fast_pid = -1

    def __len__(self) -> int:
        return sum(len(d) for d in self.by_ctx.values())

    def entries(self) -> list[TlbEntry]:
        return [e for d in self.by_ctx.values() for e in d.values()]

    def lookup(self, lpid: int, addr: int, pid: int = -1) -> TlbEntry | None:
        ctx = (lpid, pid)
        d = self.by_ctx.get(ctx)
        if not d:
            return None
        for shift in sorted(self._shifts[ctx]):
            e = d.get((shift, addr >> shift))
            if e is not None:
                return e
        return None

    def fast_cache(self) -> dict[int, int]:
        """The per-4K-page mask cache of the context ``mask`` last ran in (cleared in place)."""
        return self._fast

    def mask(self, lpid: int, addr: int, pid: int = -1) -> int:
        """Allowed-access mask for addr (0 = miss); cached per 4K page for speed."""
        if lpid != self._fast_lpid or pid != self._fast_pid:
            self._fast.clear()
            self._fast_lpid = lpid
            self._fast_pid = pid
        key = addr >> 12
        m = self._fast.get(key)
        if m is None:
            e = self.lookup(lpid, addr, pid)
            if e is None:
                return 0
            m = self._fast[key] = e.mask
        return m

    def fill(self, t: Translation) -> None:
        ctx = (t.lpid, t.pid)
        d = self.by_ctx.setdefault(ctx, {})
        self._shifts.setdefault(ctx, set()).add(t.shift)
        self._pids.setdefault(t.lpid, set()).add(t.pid)
        page = t.page >> t.shift
        d[(t.shift, page)] = TlbEntry(t.lpid, t.page, t.host, t.shift, t.pte, allowed_mask(t.pte), t.pid, t.real_page)
        if t.lpid == self._fast_lpid and t.pid == self._fast_pid:
            if t.shift <= 16:
                for k in range(t.page >> 12, (t.page + (1 << t.shift)) >> 12):
                    self._fast.pop(k, None)
            else:
                self._fast.clear()

    def _drop_ctx(self, ctx: Ctx) -> int:
        d = self.by_ctx.pop(ctx, None)
        self._shifts.pop(ctx, None)
        pids = self._pids.get(ctx[0])
        if pids is not None:
            pids.discard(ctx[1])
            if not pids:
                del self._pids[ctx[0]]
        return len(d) if d else 0

    def invalidate(self, inv: Invalidation) -> int:
        """Apply one tlbie; returns the number of entries dropped."""
        if inv.scope is Scope.ALL:
            n = len(self)
            self.by_ctx.clear()
            self._shifts.clear()
            self._pids.clear()
            self._fast.clear()
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
        for k in doomed:
            del d[k]
        if not d:
            self._drop_ctx(ctx)
        return len(doomed)

    def clear(self) -> None:
        self.invalidate(Invalidation(0, Scope.ALL))


class Vcpu:
    """One L2 vCPU running with a shadow LPID: its TLB, counters and the batch protocol."""

    def __init__(self, vcpu_id: int, lpid: int = 0, pid: int = -1) -> None:
        self.vcpu_id = vcpu_id
        self.lpid = lpid  # the shadow LPID the hardware runs this vCPU with
        # PIDR: -1 runs in real mode (accesses are L2 real addresses); >= 0 translates
        # effective addresses through that process's tree (quadrant 0; quadrant 3 is PID 0).
        self.pid = pid
        self.tlb = Tlb()
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
            tlb.mask(lpid, 0)  # select the (LPID, real mode) context of the cache
            get = tlb.fast_cache().get
            slow = tlb.mask
            for addr, kind in accesses:
                m = get(addr >> 12)
                if m is None:
                    m = slow(lpid, addr)
                if m >> kind & 1:
                    hits += 1
                    continue
                key = (addr >> 12, kind)
                if key in pending:
                    deferred.append((addr, kind))
                else:
                    pending[key] = len(send)
                    send.append((addr, kind))
        else:
            tlb_mask = tlb.mask
            for addr, kind in accesses:
                if tlb_mask(lpid, addr, _ctx_pid(pid, addr)) & (1 << kind):
                    hits += 1
                    continue
                key = (addr >> 12, kind)
                if key in pending:
                    deferred.append((addr, kind))
                else:
                    pending[key] = len(send)
                    send.append((addr, kind))
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
            self.tlb.fill(r.translation)
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

    def invalidate(self, inv: Invalidation) -> None:
        self.stats["invalidations_applied"] += 1
        self.stats["tlb_entries_dropped"] += self.tlb.invalidate(inv)


def _ctx_pid(pidr: int, ea: int) -> int:
    """The PID an EA translates with: quadrant 3 (EA bits 0:1 = 0b11) is PID 0 (the kernel),
    any other quadrant PIDR (quadrants 1/2 fault; they never fill, so they always miss)."""
    return 0 if ea >> 62 == 3 else pidr

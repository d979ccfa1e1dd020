"""Data mode: L2 stores carry values, loads return them, and a checker proves none is lost.

Where the bytes are: in host frames, in L0's :class:`~nestmmu.core.memory.SimMemory` (the same
memory that holds L0's tables; frames handed out by ``host_faultin`` are blocks of it).  A vCPU
that hits its TLB already has the host address (that is what the TLB is for); the memory is
still L0's, so every data access is a memory operation *at the host address the vCPU
translated*: its TLB entry, or the fill L0 just returned.  A translation kept past its tlbie
therefore writes a frame that no longer backs the page, and the checker sees the write lost.

The wire protocol (and :meth:`nestmmu.core.sim.InProcessCluster.run_data_batch`) sends a vCPU's
accesses as *messages*: a run of TLB hits (each with its host address) ended by at most one
miss.  L0 performs the hits in order without yielding, then resolves the miss and performs it
at the translation it found.  One message is in flight per vCPU, so a tlbie the vCPU
acknowledges after sending a message reaches L0 after that message's hits were performed, as
a tlbsync waits for the accesses in flight (see docs/design-notes.md, "Data mode").

The checker: each vCPU uses its own 8-byte word in every 64-byte line (``slot`` = its index
modulo 8), so "the last value stored at that L2 address" is well defined however vCPUs
interleave.  Each store writes a value unique to (slot, sequence number, line); each load must
return the last value this vCPU stored there, or, for a word it has not stored yet in this
run, zero on a fresh guest (``initial_zero``), else the same value as its first load (the
word's contents before the run).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .formats import Access
from .vcpu import Vcpu

LINE = 64
SLOTS = LINE // 8
_SEQ_BITS = 28
_LINE_BITS = 28
_SEQ_MASK = (1 << _SEQ_BITS) - 1
_LINE_MASK = (1 << _LINE_BITS) - 1


def private_word(addr: int, slot: int) -> int:
    """The vCPU's own doubleword in the 64-byte line holding addr."""
    return (addr & ~(LINE - 1)) | ((slot % SLOTS) << 3)


def encode(slot: int, seq: int, addr: int) -> int:
    """A store's value: unique to (slot, sequence number), and naming the line it belongs to."""
    return (((slot % SLOTS) + 1) << 56) | ((seq & _SEQ_MASK) << _LINE_BITS) | ((addr >> 6) & _LINE_MASK)


def decode(value: int) -> tuple[int, int, int]:
    """(slot, sequence number, line bits) of a value written by :func:`encode`."""
    return (value >> 56) - 1, (value >> _LINE_BITS) & _SEQ_MASK, value & _LINE_MASK


@dataclass(frozen=True, slots=True)
class LostWrite:
    """A load that did not return the last value stored at its L2 address."""

    index: int  # the load's index in this vCPU's access stream
    address: int  # L2 real address of the word
    expected: int
    got: int
    store_index: int  # the access that stored the expected value (-1: the word's baseline)
    misplaced: bool
    why: str

    def as_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "address": f"{self.address:#x}",
            "expected": f"{self.expected:#x}",
            "got": f"{self.got:#x}",
            "store_index": self.store_index,
            "misplaced": self.misplaced,
            "why": self.why,
        }


@dataclass
class DataChecker:
    """Per-vCPU expectations: the last value stored at each word, checked on every load."""

    slot: int
    max_details: int = 8
    initial_zero: bool = False  # a fresh guest: a word never stored reads zero
    expected: dict[int, tuple[int, int]] = field(default_factory=dict)  # addr -> (value, index)
    stats: Counter[str] = field(default_factory=Counter)
    details: list[LostWrite] = field(default_factory=list)
    _seq: int = 0

    def value_for(self, addr: int) -> int:
        self._seq += 1
        return encode(self.slot, self._seq, addr)

    def stored(self, index: int, addr: int, value: int) -> None:
        self.expected[addr] = (value, index)
        self.stats["data_stores"] += 1

    def loaded(self, index: int, addr: int, got: int) -> None:
        exp = self.expected.get(addr)
        if exp is None and self.initial_zero:
            exp = (0, -1)
        if exp is None:
            # Never stored in this run: whatever was there before is the baseline.
            self.expected[addr] = (got, -1)
            self.stats["data_loads_baseline"] += 1
            return
        self.stats["data_loads_checked"] += 1
        value, store_index = exp
        if got == value:
            return
        misplaced, why = self.diagnose(addr, value, got, store_index)
        self.stats["misplaced_writes" if misplaced else "lost_writes"] += 1
        if len(self.details) < self.max_details:
            self.details.append(LostWrite(index, addr, value, got, store_index, misplaced, why))
        # Re-arm on what memory now holds, so one loss is reported once.
        self.expected[addr] = (got, -1)

    def diagnose(self, addr: int, value: int, got: int, store_index: int) -> tuple[bool, str]:
        if got == 0:
            return False, "read zero: the page's contents were lost (a page move that did not copy them, or a store to a freed frame)"
        slot, seq, line = decode(got)
        if 0 <= slot < SLOTS and slot != self.slot:
            return True, f"value written by vCPU slot {slot}: another vCPU's store landed on this word"
        if 0 <= slot < SLOTS and line != (addr >> 6) & _LINE_MASK:
            return True, f"value of store #{seq} to another line: that write was misplaced onto this page (a translation to the wrong frame)"
        if store_index < 0 and value == 0 and self.initial_zero:
            return True, "a word this vCPU never stored is not zero: a write landed on the wrong page"
        if store_index < 0:
            return False, "the word changed though this vCPU never stored to it: its earlier contents were lost"
        if seq < decode(value)[1]:
            return False, f"older value (store #{seq}): the store at access {store_index} was lost (stale translation, or a page copy missed it)"
        return False, "unexpected value for this word"

    def counters(self) -> dict[str, int]:
        out = {k: self.stats.get(k, 0) for k in ("data_stores", "data_loads_checked", "data_loads_baseline", "lost_writes", "misplaced_writes")}
        return out


@dataclass(slots=True)
class DataMessage:
    """A run of TLB hits ended by at most one miss (``hosts[i] == 0`` for the miss)."""

    first: int  # index of the first access in the vCPU's stream
    addrs: list[int]
    kinds: list[int]
    values: list[int]
    hosts: list[int]


class DataVcpu:
    """The data path of one vCPU: builds messages from its TLB and checks what comes back."""

    def __init__(self, vcpu: Vcpu, slot: int, max_details: int = 8, initial_zero: bool = False) -> None:
        self.vcpu = vcpu
        self.slot = slot % SLOTS
        self.checker = DataChecker(self.slot, max_details, initial_zero)
        self.index = 0  # accesses consumed so far (the stream index of the next one)

    def message(self, addrs: list[int], kinds: list[int], start: int) -> DataMessage:
        """Scan accesses from ``start``: hits carry their host address; stop after a miss."""
        vcpu = self.vcpu
        tlb = vcpu.tlb
        lpid = vcpu.lpid
        msg = DataMessage(self.index, [], [], [], [])
        for i in range(start, len(addrs)):
            addr = private_word(addrs[i], self.slot)
            kind = kinds[i]
            host = 0
            if tlb.mask(lpid, addr) & (1 << kind):
                e = tlb.lookup(lpid, addr)
                assert e is not None
                host = e.host + (addr - e.page)
            msg.addrs.append(addr)
            msg.kinds.append(kind)
            msg.values.append(self.checker.value_for(addr) if kind == Access.STORE else 0)
            msg.hosts.append(host)
            if not host:
                break
        self.index += len(msg.addrs)
        vcpu.stats["accesses"] += len(msg.addrs)
        hits = sum(1 for h in msg.hosts if h)
        vcpu.stats["tlb_hits"] += hits
        vcpu.stats["misses_sent"] += len(msg.addrs) - hits
        return msg

    def complete(self, msg: DataMessage, done: list[bool], loaded: list[int]) -> None:
        """``done[i]``: the access reached memory; ``loaded[i]``: what a load returned."""
        checker = self.checker
        for i, addr in enumerate(msg.addrs):
            if not done[i]:
                continue
            kind = msg.kinds[i]
            if kind == Access.STORE:
                checker.stored(msg.first + i, addr, msg.values[i])
            elif kind == Access.LOAD:
                checker.loaded(msg.first + i, addr, loaded[i])

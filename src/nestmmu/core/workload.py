"""Seeded L2 workloads: the same spec and seed always give the same access sequence.

Two translation modes, as an L2 CPU runs with MSR[DR]/MSR[IR] off or on:

* **Real mode** (``virtual`` False, the default of the spec): addresses are L2 *real*
  addresses (partition scope only).  A trace of effective addresses (``valgrind
  --tool=lackey``) is then folded into ``[base, base + footprint)``; distinct pages of the
  program may alias.
* **Virtual mode** (``virtual`` True): addresses are effective addresses of process ``pid``,
  translated by the 2-D walk through the page tables the L2 kernel builds.  A trace is replayed
  as it was recorded (no folding); the synthetic patterns draw from
  ``[VIRTUAL_BASE + base, VIRTUAL_BASE + base + footprint)``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from ..limits import MAX_ACCESSES_PER_VCPU, MAX_BATCH
from .formats import Access
from .vcpu import POWER9_TLB_ENTRIES, POWER9_TLB_WAYS, tlb_geometry_error

PATTERNS = ("uniform", "hot", "sequential", "trace")
#: Virtual mode: effective address where the synthetic patterns start (where a ppc64 Linux
#: executable's text starts, 0x10000000), so that EA 0 (NULL) is never one of them.
VIRTUAL_BASE = 0x1000_0000
#: PIDR holds 20 bits on POWER9; PID 0 is the L2 kernel's own (quadrant 3).
MAX_PID = (1 << 20) - 1


@dataclass(frozen=True)
class WorkloadSpec:
    pattern: str = "hot"
    accesses: int = 20_000
    seed: int = 1
    footprint: int = 16 << 20
    base: int = 0
    store_fraction: float = 0.3
    ifetch_fraction: float = 0.05
    batch_size: int = 1024
    trace_path: str = ""
    data: bool = False  # data mode: stores carry values, loads are checked (see .data)
    data_fresh: bool = False  # data mode on a new guest: words never stored must read zero
    hcall_every: int = 0  # the L2 program calls H_PUT_TERM_CHAR every that many accesses (0 = never)
    virtual: bool = False  # virtual mode: effective addresses of process ``pid`` (see above)
    pid: int = 1
    unmap_every: int = 0  # virtual mode: the process munmaps a page after every Nth batch (0 never)
    # The vCPU TLB's geometry (POWER9: 1,024 entries per core, 4-way); entries 0 = unbounded.
    tlb_entries: int = POWER9_TLB_ENTRIES
    tlb_ways: int = POWER9_TLB_WAYS

    def validate(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, not {self.pattern!r}")
        if not 0 <= self.accesses <= MAX_ACCESSES_PER_VCPU:
            raise ValueError(f"accesses must be in 0..{MAX_ACCESSES_PER_VCPU} (MAX_ACCESSES_PER_VCPU), not {self.accesses}")
        if self.footprint < 4096 or self.footprint % 4096:
            raise ValueError("footprint must be a positive multiple of 4096 bytes")
        if not 0 <= self.store_fraction <= 1 or not 0 <= self.ifetch_fraction <= 1 or self.store_fraction + self.ifetch_fraction > 1:
            raise ValueError("store_fraction and ifetch_fraction must be in [0, 1] and sum to at most 1")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be in 1..{MAX_BATCH} (MAX_BATCH), not {self.batch_size}")
        if self.hcall_every < 0:
            raise ValueError(f"hcall_every must be >= 0 (0 = never), not {self.hcall_every}")
        if self.pattern == "trace" and not self.trace_path:
            raise ValueError("pattern 'trace' needs trace_path")
        if self.virtual and not 1 <= self.pid <= MAX_PID:
            raise ValueError(f"pid must be in 1..{MAX_PID} in virtual mode (PID 0 is the L2 kernel's), not {self.pid}")
        if self.unmap_every < 0:
            raise ValueError(f"unmap_every must be 0 (never) or a number of batches, not {self.unmap_every}")
        tlb_error = tlb_geometry_error(self.tlb_entries, self.tlb_ways)
        if tlb_error is not None:
            raise ValueError(tlb_error)
        if self.virtual and self.data:
            raise ValueError("virtual mode does not run in data mode (data mode checks L2 real addresses); use one or the other")


_LACKEY = re.compile(r"^\s*([ILSM])\s+([0-9a-fA-F]+),(\d+)")
#: _LACKEY for a block of whole lines (MULTILINE): the same per line, never across lines
#: (whitespace other than a newline where _LACKEY has \s).
_LACKEY_LINES = re.compile(r"^[^\S\n]*([ILSM])[^\S\n]+([0-9a-fA-F]+),\d+", re.MULTILINE)
_LACKEY_KIND = {"I": (int(Access.IFETCH),), "L": (int(Access.LOAD),), "S": (int(Access.STORE),), "M": (int(Access.LOAD), int(Access.STORE))}
#: Bytes of whole lines parsed at a time (the regex runs over the block in C).
_LACKEY_BLOCK = 1 << 20


def read_lackey(path: str | Path) -> Iterator[tuple[int, int]]:
    """(address, kind) from ``valgrind --tool=lackey --trace-mem=yes`` output; M = load+store.

    Lines that are not records (valgrind's own messages, junk) are skipped.  Parsed a block
    of lines at a time, read as a stream: a trace is never loaded whole."""
    kind_of = _LACKEY_KIND
    with open(path, encoding="utf-8", errors="replace") as fh:
        while lines := fh.readlines(_LACKEY_BLOCK):
            for op, addr in _LACKEY_LINES.findall("".join(lines)):
                a = int(addr, 16)
                for k in kind_of[op]:
                    yield a, k


def generate(spec: WorkloadSpec, vcpu_index: int = 0) -> Iterator[tuple[list[int], list[int]]]:
    """Batches of (addresses, kinds) for one vCPU; deterministic in (spec, vcpu_index)."""
    spec.validate()
    rng = random.Random(spec.seed * 1_000_003 + vcpu_index)
    total = spec.accesses
    fp = spec.footprint
    base = spec.base + (VIRTUAL_BASE if spec.virtual else 0)
    fold = not spec.virtual  # real mode folds a trace's effective addresses into the footprint
    pages = fp >> 12
    st, ifr = spec.store_fraction, spec.ifetch_fraction
    trace = iter(read_lackey(spec.trace_path)) if spec.pattern == "trace" else None
    hot_pages = max(1, pages // 10)
    seq = rng.randrange(pages) << 12
    done = 0
    while done < total:
        n = min(spec.batch_size, total - done)
        addrs: list[int] = []
        kinds: list[int] = []
        if trace is not None:
            while len(addrs) < n:
                chunk = list(islice(trace, n - len(addrs)))
                if not chunk:  # the end: replay from the start (an empty trace: loads at base)
                    trace = iter(read_lackey(spec.trace_path))
                    chunk = list(islice(trace, n - len(addrs))) or [(0 if fold else base, int(Access.LOAD))] * (n - len(addrs))
                addrs += [base + a % fp for a, _ in chunk] if fold else [a for a, _ in chunk]
                kinds += [k for _, k in chunk]
            done += n
            yield addrs, kinds
            continue
        for _ in range(n):
            if spec.pattern == "uniform":
                a = (rng.randrange(pages) << 12) | (rng.randrange(512) << 3)
            elif spec.pattern == "hot":
                # 90% of accesses go to the hot tenth of the pages.
                span = hot_pages if rng.random() < 0.9 else pages
                a = (rng.randrange(span) << 12) | (rng.randrange(512) << 3)
            else:
                seq = (seq + 64) % fp
                a = seq
            r = rng.random()
            kinds.append(Access.STORE if r < st else Access.IFETCH if r < st + ifr else Access.LOAD)
            addrs.append(base + a)
        done += n
        yield addrs, kinds

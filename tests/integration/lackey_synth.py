"""A synthetic ``valgrind --tool=lackey --trace-mem=yes`` trace, for long-replay tests and benches.

Real program shape, seeded: instruction fetches walk a small code region with loops and calls,
data accesses mostly hit a hot stack/heap working set and now and then stream through a large
buffer (so TLB misses and fills keep coming while most accesses are hits).

    python tests/integration/lackey_synth.py OUT RECORDS [SEED] [hot]
"""

from __future__ import annotations

import random
import sys

CODE = 0x0400_0000
STACK = 0x1FFE_FF0000
HEAP = 0x0500_0000
BUFFER = 0x0600_0000


def write_synthetic_trace(
    path: str, records: int, seed: int = 1, buffer_bytes: int = 24 << 20, code_bytes: int = 256 << 10, heap_bytes: int = 2 << 20, stream_fraction: float = 0.15
) -> int:
    """Write ``records`` lackey lines to ``path``; returns the number of lines written.

    The defaults give a few thousand distinct 4K pages; a small buffer, heap and code (as
    ``gzip``'s own trace: ~200 pages, nearly every access a TLB hit) keep vCPUs in their hit
    loop, the case that starved tlbie acks."""
    rng = random.Random(seed)
    pc = CODE
    stream = 0
    out: list[str] = ["==1== Lackey, an example Valgrind tool\n"]
    written = 0
    with open(path, "w", encoding="ascii") as fh:
        fh.write(out.pop())
        while written < records:
            r = rng.random()
            if r < 0.55:
                pc = CODE + ((pc - CODE + rng.choice((2, 3, 4, 5, 7))) % code_bytes) if rng.random() < 0.97 else CODE + rng.randrange(code_bytes)
                out.append(f"I  {pc:08x},{rng.choice((2, 3, 4, 5))}\n")
            elif r < 1 - stream_fraction:
                base = STACK - rng.randrange(64 << 10) if rng.random() < 0.6 else HEAP + rng.randrange(heap_bytes)
                op = "L" if rng.random() < 0.6 else "S" if rng.random() < 0.8 else "M"
                out.append(f" {op} {base & ~7:08x},8\n")
            else:
                stream = (stream + 64) % buffer_bytes
                out.append(f" {'L' if rng.random() < 0.7 else 'S'} {BUFFER + stream:08x},8\n")
            written += 1
            if len(out) >= 8192:
                fh.write("".join(out))
                out.clear()
        fh.write("".join(out))
    return written


if __name__ == "__main__":
    hot = len(sys.argv) > 4 and sys.argv[4] == "hot"
    kw = {"buffer_bytes": 1 << 20, "code_bytes": 64 << 10, "heap_bytes": 256 << 10, "stream_fraction": 0.02} if hot else {}
    n = write_synthetic_trace(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1, **kw)  # type: ignore[arg-type]
    print(f"{n} records in {sys.argv[1]}")

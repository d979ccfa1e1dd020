"""A synthetic ``valgrind --tool=lackey --trace-mem=yes`` trace, for long-replay tests and benches.

Real program shape, seeded: instruction fetches walk a small code region with loops and calls,
data accesses mostly hit a hot stack/heap working set and now and then stream through a large
buffer (so TLB misses and fills keep coming while most accesses are hits).

    python tests/integration/lackey_synth.py OUT RECORDS [SEED]
"""

from __future__ import annotations

import random
import sys

CODE = 0x0400_0000
STACK = 0x1FFE_FF0000
HEAP = 0x0500_0000
BUFFER = 0x0600_0000


def write_synthetic_trace(path: str, records: int, seed: int = 1, buffer_bytes: int = 24 << 20) -> int:
    """Write ``records`` lackey lines to ``path``; returns the number of lines written."""
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
                pc = CODE + ((pc - CODE + rng.choice((2, 3, 4, 5, 7))) % (256 << 10)) if rng.random() < 0.97 else CODE + rng.randrange(256 << 10)
                out.append(f"I  {pc:08x},{rng.choice((2, 3, 4, 5))}\n")
            elif r < 0.85:
                base = STACK - rng.randrange(64 << 10) if rng.random() < 0.6 else HEAP + rng.randrange(2 << 20)
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
    n = write_synthetic_trace(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1)
    print(f"{n} records in {sys.argv[1]}")

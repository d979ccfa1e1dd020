"""Seeded workloads: determinism, validation, batching, and lackey trace parsing."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nestmmu.core.formats import Access
from nestmmu.core.workload import MAX_PID, PATTERNS, VIRTUAL_BASE, WorkloadSpec, generate, read_lackey


def flatten(spec: WorkloadSpec, vcpu_index: int = 0) -> tuple[list[int], list[int]]:
    addrs: list[int] = []
    kinds: list[int] = []
    for a, k in generate(spec, vcpu_index):
        addrs += a
        kinds += k
    return addrs, kinds


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("pattern", ["uniform", "hot", "sequential"])
def test_same_spec_and_seed_give_identical_batches(pattern: str) -> None:
    spec = WorkloadSpec(pattern=pattern, accesses=3000, seed=42, batch_size=700)
    assert list(generate(spec, 1)) == list(generate(spec, 1))


@pytest.mark.parametrize("pattern", ["uniform", "hot", "sequential"])
def test_different_vcpu_index_gives_a_different_stream(pattern: str) -> None:
    spec = WorkloadSpec(pattern=pattern, accesses=2000, seed=42)
    assert flatten(spec, 0) != flatten(spec, 1)


def test_different_seed_gives_a_different_stream() -> None:
    assert flatten(WorkloadSpec(accesses=1000, seed=1)) != flatten(WorkloadSpec(accesses=1000, seed=2))


def test_a_known_seed_gives_pinned_values() -> None:
    """Counters of a seeded run must not change between releases: pin the generator's output."""
    addrs, kinds = flatten(WorkloadSpec(pattern="uniform", accesses=4, seed=7))
    assert addrs == [0x621760, 0x7A6E98, 0x549C00, 0xD41E28]
    assert kinds == [Access.LOAD, Access.LOAD, Access.LOAD, Access.STORE]


# --------------------------------------------------------------------------- shape of the stream
@pytest.mark.parametrize("pattern", ["uniform", "hot"])
def test_addresses_stay_in_the_footprint_and_are_aligned(pattern: str) -> None:
    spec = WorkloadSpec(pattern=pattern, accesses=5000, footprint=1 << 20, base=0x4000_0000, seed=3)
    addrs, kinds = flatten(spec)
    assert all(0x4000_0000 <= a < 0x4000_0000 + (1 << 20) for a in addrs)
    assert all(a % 8 == 0 for a in addrs)
    assert set(kinds) <= {Access.LOAD, Access.STORE, Access.IFETCH}


def test_hot_pattern_concentrates_on_a_tenth_of_the_pages() -> None:
    spec = WorkloadSpec(pattern="hot", accesses=10_000, footprint=4 << 20, seed=5)
    addrs, _ = flatten(spec)
    hot = sum(1 for a in addrs if a < (4 << 20) // 10 // 4096 * 4096)
    assert hot / len(addrs) > 0.85


def test_sequential_pattern_steps_by_64_bytes_and_wraps() -> None:
    fp = 8192
    addrs, _ = flatten(WorkloadSpec(pattern="sequential", accesses=300, footprint=fp, base=0x10000, seed=9))
    offs = [a - 0x10000 for a in addrs]
    assert all(0 <= o < fp for o in offs)
    assert all((b - a) % fp == 64 for a, b in itertools.pairwise(offs))


@pytest.mark.parametrize(
    ("store", "ifetch", "only"),
    [(1.0, 0.0, Access.STORE), (0.0, 1.0, Access.IFETCH), (0.0, 0.0, Access.LOAD)],
)
def test_kind_fractions_at_the_extremes(store: float, ifetch: float, only: Access) -> None:
    _, kinds = flatten(WorkloadSpec(accesses=500, store_fraction=store, ifetch_fraction=ifetch))
    assert set(kinds) == {only}


def test_kind_fractions_roughly_respected() -> None:
    _, kinds = flatten(WorkloadSpec(accesses=20_000, store_fraction=0.3, ifetch_fraction=0.1, seed=11))
    n = len(kinds)
    assert abs(kinds.count(Access.STORE) / n - 0.3) < 0.02
    assert abs(kinds.count(Access.IFETCH) / n - 0.1) < 0.02


# --------------------------------------------------------------------------- batches
@pytest.mark.parametrize(
    ("accesses", "batch", "sizes"),
    [(2500, 1024, [1024, 1024, 452]), (1024, 1024, [1024]), (5, 2, [2, 2, 1]), (0, 16, []), (3, 65536, [3])],
)
def test_batch_sizes(accesses: int, batch: int, sizes: list[int]) -> None:
    batches = list(generate(WorkloadSpec(accesses=accesses, batch_size=batch)))
    assert [len(a) for a, _ in batches] == sizes
    assert all(len(a) == len(k) for a, k in batches)


def test_batching_does_not_change_the_stream() -> None:
    big = flatten(WorkloadSpec(pattern="uniform", accesses=999, batch_size=999, seed=4))
    small = flatten(WorkloadSpec(pattern="uniform", accesses=999, batch_size=10, seed=4))
    assert big == small


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"pattern": "zipf"}, "pattern"),
        ({"accesses": -1}, "accesses"),
        ({"footprint": 0}, "footprint"),
        ({"footprint": 4095}, "footprint"),
        ({"footprint": 4096 + 8}, "footprint"),
        ({"store_fraction": -0.1}, "store_fraction"),
        ({"store_fraction": 1.5}, "store_fraction"),
        ({"ifetch_fraction": 2.0}, "ifetch_fraction"),
        ({"store_fraction": 0.6, "ifetch_fraction": 0.6}, "ifetch_fraction"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 65537}, "batch_size"),
        ({"pattern": "trace"}, "trace_path"),
    ],
)
def test_validation_error_names_the_bad_field(kwargs: dict[str, object], field: str) -> None:
    spec = WorkloadSpec(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=field):
        spec.validate()
    with pytest.raises(ValueError, match=field):
        next(generate(spec))


def test_valid_edges_pass_validation() -> None:
    for spec in (
        WorkloadSpec(accesses=0),
        WorkloadSpec(footprint=4096),
        WorkloadSpec(store_fraction=0.5, ifetch_fraction=0.5),
        WorkloadSpec(batch_size=1),
        WorkloadSpec(batch_size=65536),
    ):
        spec.validate()
    assert set(PATTERNS) == {"uniform", "hot", "sequential", "trace"}


# --------------------------------------------------------------------------- lackey traces
TRACE = """\
==12345== Lackey, an example Valgrind tool
==12345== Command: ./a.out
I  0400a2e0,3
 L 1ffefffd48,8
 S 04222cac,4
 M 0421c7f0,4
garbage line
 X 1234,4
 L nothex,8
I  04001000,2
"""


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    p = tmp_path / "lackey.out"
    p.write_text(TRACE, encoding="utf-8")
    return p


def test_read_lackey_parses_each_kind_and_skips_junk(trace_file: Path) -> None:
    assert list(read_lackey(trace_file)) == [
        (0x0400A2E0, Access.IFETCH),
        (0x1FFEFFFD48, Access.LOAD),
        (0x04222CAC, Access.STORE),
        (0x0421C7F0, Access.LOAD),  # M = load then store
        (0x0421C7F0, Access.STORE),
        (0x04001000, Access.IFETCH),
    ]


def test_read_lackey_accepts_a_str_path(trace_file: Path) -> None:
    assert len(list(read_lackey(str(trace_file)))) == 6


def test_trace_pattern_folds_addresses_into_the_footprint(trace_file: Path) -> None:
    fp = 1 << 20
    spec = WorkloadSpec(pattern="trace", trace_path=str(trace_file), accesses=6, footprint=fp, base=0x100_0000)
    addrs, kinds = flatten(spec)
    raw = [a for a, _ in read_lackey(trace_file)]
    assert addrs == [0x100_0000 + (a % fp) for a in raw]
    assert kinds == [int(k) for _, k in read_lackey(trace_file)]


def test_trace_pattern_replays_from_the_start(trace_file: Path) -> None:
    spec = WorkloadSpec(pattern="trace", trace_path=str(trace_file), accesses=15, footprint=1 << 20, batch_size=4)
    addrs, kinds = flatten(spec)
    assert len(addrs) == 15
    assert addrs[6:12] == addrs[0:6]
    assert kinds[6:12] == kinds[0:6]
    assert addrs[12:15] == addrs[0:3]


def test_trace_without_any_record_gives_loads_at_base(tmp_path: Path) -> None:
    p = tmp_path / "empty.out"
    p.write_text("==1== nothing here\n", encoding="utf-8")
    spec = WorkloadSpec(pattern="trace", trace_path=str(p), accesses=3, base=0x2000)
    assert flatten(spec) == ([0x2000] * 3, [int(Access.LOAD)] * 3)


# --------------------------------------------------------------------------- virtual mode
def test_virtual_mode_replays_a_trace_as_effective_addresses_without_folding(trace_file: Path) -> None:
    """Virtual mode: the trace's effective addresses reach the 2-D walk as recorded, where real
    mode folds them (0x1ffefffd48 and 0x0400a2e0 differ; folded into 1 MiB they would not
    keep their distance)."""
    spec = WorkloadSpec(pattern="trace", trace_path=str(trace_file), accesses=6, footprint=1 << 20, virtual=True)
    addrs, kinds = flatten(spec)
    assert addrs == [a for a, _ in read_lackey(trace_file)]
    assert kinds == [int(k) for _, k in read_lackey(trace_file)]
    real, _ = flatten(WorkloadSpec(pattern="trace", trace_path=str(trace_file), accesses=6, footprint=1 << 20))
    assert real != addrs


def test_virtual_mode_aliasing_pages_stay_distinct(tmp_path: Path) -> None:
    """Two EA pages a whole footprint apart alias in real mode (folded) and stay apart in virtual mode."""
    p = tmp_path / "two.out"
    p.write_text(" L 10000000,8\n L 7fff00000000,8\n", encoding="utf-8")
    fp = 1 << 20
    real, _ = flatten(WorkloadSpec(pattern="trace", trace_path=str(p), accesses=2, footprint=fp))
    virt, _ = flatten(WorkloadSpec(pattern="trace", trace_path=str(p), accesses=2, footprint=fp, virtual=True))
    assert real[0] >> 12 == real[1] >> 12  # folding aliased them
    assert virt == [0x1000_0000, 0x7FFF_0000_0000]


def test_virtual_mode_synthetic_patterns_start_at_virtual_base() -> None:
    spec = WorkloadSpec(pattern="uniform", accesses=2000, footprint=1 << 20, seed=3, virtual=True)
    addrs, _ = flatten(spec)
    assert all(VIRTUAL_BASE <= a < VIRTUAL_BASE + (1 << 20) for a in addrs)
    # The same stream as real mode, shifted: only the translation mode differs.
    real, _ = flatten(WorkloadSpec(pattern="uniform", accesses=2000, footprint=1 << 20, seed=3))
    assert addrs == [VIRTUAL_BASE + a for a in real]


@pytest.mark.parametrize(("kwargs", "field"), [({"pid": 0}, "pid"), ({"pid": MAX_PID + 1}, "pid"), ({"data": True}, "data mode")])
def test_virtual_mode_validation(kwargs: dict[str, object], field: str) -> None:
    spec = WorkloadSpec(virtual=True, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=field):
        spec.validate()
    WorkloadSpec(**kwargs).validate()  # the same fields are fine in real mode (pid unused)


def _read_lackey_by_line(path: Path) -> list[tuple[int, int]]:
    """The per-line parser read_lackey replaced (a block at a time): the reference."""
    out: list[tuple[int, int]] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            m = re.match(r"^\s*([ILSM])\s+([0-9a-fA-F]+),(\d+)", line)
            if m:
                a = int(m.group(2), 16)
                op = m.group(1)
                kinds = {"I": [Access.IFETCH], "L": [Access.LOAD], "S": [Access.STORE], "M": [Access.LOAD, Access.STORE]}[op]
                out += [(a, int(k)) for k in kinds]
    return out


_RECORD = st.builds(
    lambda op, a, n, pre, mid: f"{pre}{op}{mid}{a:x},{n}",
    st.sampled_from("ILSMX"),
    st.integers(0, 2**48),
    st.integers(0, 64),
    st.sampled_from(["", " ", "  ", "\t", "\n", "\r"]),
    st.sampled_from([" ", "  ", "\t", "\n", ""]),
)
_LINE = st.one_of(_RECORD, st.text(alphabet=" \t\r\nILSM0123456789abcdefg,=", max_size=20))


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(_LINE, max_size=40), ending=st.sampled_from(["\n", "\r\n", "\r"]))
def test_read_lackey_by_blocks_parses_exactly_what_the_line_parser_did(tmp_path_factory: pytest.TempPathFactory, lines: list[str], ending: str) -> None:
    path = tmp_path_factory.mktemp("lk") / "t.trace"
    path.write_bytes(ending.join(lines).encode())
    assert list(read_lackey(path)) == _read_lackey_by_line(path)

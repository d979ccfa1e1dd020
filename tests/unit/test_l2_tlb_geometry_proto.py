"""The L2 service's Workload -> WorkloadSpec for the TLB geometry: unset means POWER9, 0 entries
means unbounded (so the fields are proto3 `optional`), and a bad geometry names its field."""

from __future__ import annotations

from nestmmu.protos import l2_pb2
from nestmmu.services.l2.server import field_of_spec_error, spec_from_proto


def test_unset_geometry_is_power9() -> None:
    s = spec_from_proto(l2_pb2.Workload())
    assert (s.tlb_entries, s.tlb_ways) == (1024, 4)


def test_zero_entries_is_unbounded_not_the_default() -> None:
    s = spec_from_proto(l2_pb2.Workload(tlb_entries=0))
    assert (s.tlb_entries, s.tlb_ways) == (0, 4)
    s.validate()
    s = spec_from_proto(l2_pb2.Workload(tlb_entries=64, tlb_ways=8))
    assert (s.tlb_entries, s.tlb_ways) == (64, 8)


def test_a_bad_geometry_names_its_field() -> None:
    for w, fld in ((l2_pb2.Workload(tlb_entries=1000), "workload.tlb_entries"), (l2_pb2.Workload(tlb_ways=0), "workload.tlb_ways")):
        try:
            spec_from_proto(w).validate()
        except ValueError as e:
            assert field_of_spec_error(str(e)) == fld
        else:
            raise AssertionError(f"{w} validated")

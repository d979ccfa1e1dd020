"""The generated protobuf/gRPC code exists, imports, and matches the contract in protos/."""

from __future__ import annotations

import importlib

import pytest

from nestmmu import protos
from nestmmu.protos import common_pb2, l0_pb2, l0_pb2_grpc, l1_pb2, l1_pb2_grpc, l2_pb2, l2_pb2_grpc

GENERATED_MODULES = [f"nestmmu.gen.{level}.v1.{level}_{suffix}" for level in ("common", "l0", "l1", "l2") for suffix in ("pb2", "pb2_grpc")]


@pytest.mark.parametrize("name", GENERATED_MODULES)
def test_every_generated_module_imports(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__name__ == name


def test_aliases_are_the_generated_modules() -> None:
    assert protos.l0_pb2 is importlib.import_module("nestmmu.gen.l0.v1.l0_pb2")
    assert protos.common_pb2 is importlib.import_module("nestmmu.gen.common.v1.common_pb2")
    # Message classes report the real module they live in (pickling, reprs).
    assert l0_pb2.ConnectRequest.__module__ == "nestmmu.gen.l0.v1.l0_pb2"


def test_proto_packages_follow_buf_standard_layout() -> None:
    for module, package in [
        (common_pb2, "nestmmu.common.v1"),
        (l0_pb2, "nestmmu.l0.v1"),
        (l1_pb2, "nestmmu.l1.v1"),
        (l2_pb2, "nestmmu.l2.v1"),
    ]:
        assert module.DESCRIPTOR.package == package
        assert module.DESCRIPTOR.name == package.replace(".", "/") + "/" + package.split(".")[1] + ".proto"


def _rpc_names(module: object, service: str) -> set[str]:
    return {m.name for m in module.DESCRIPTOR.services_by_name[service].methods}  # type: ignore[attr-defined]


def test_service_descriptors_have_the_rpcs() -> None:
    assert _rpc_names(l0_pb2, "L0Service") == {
        "Connect",
        "SetPartitionTable",
        "EnterNested",
        "TlbInvalidate",
        "RptInvalidate",
        "CopyToFromGuest",
        "CopyL1Memory",
        "Run",
        "HostUnmap",
        "HostMigrate",
        "SetDirtyLogging",
        "HarvestDirty",
        "GetStats",
        "DumpShadowTree",
        "Audit",
    }
    assert _rpc_names(l1_pb2, "L1Service") == {
        "CreateGuest",
        "AttachVcpu",
        "MapPages",
        "UnmapPages",
        "ProtectPages",
        "RemapPages",
        "DestroyGuest",
        "GetGuest",
        "ListGuests",
        "WalkTree",
        "GetStats",
        "RegisterProcTbl",
    }
    assert _rpc_names(l2_pb2, "L2Service") == {"RunWorkload", "GetReport", "DumpTlb"}
    assert protos.L0_SERVICE_NAME == "nestmmu.l0.v1.L0Service"
    assert protos.L1_SERVICE_NAME == "nestmmu.l1.v1.L1Service"
    assert protos.L2_SERVICE_NAME == "nestmmu.l2.v1.L2Service"


def test_buf_standard_request_response_and_streaming_shape() -> None:
    for module, service in [(l0_pb2, "L0Service"), (l1_pb2, "L1Service"), (l2_pb2, "L2Service")]:
        for method in module.DESCRIPTOR.services_by_name[service].methods:
            assert method.input_type.name == f"{method.name}Request"
            assert method.output_type.name == f"{method.name}Response"
    l0_methods = l0_pb2.DESCRIPTOR.services_by_name["L0Service"].methods_by_name
    for bidi in ("Connect", "Run"):
        assert l0_methods[bidi].client_streaming and l0_methods[bidi].server_streaming
    assert not l0_methods["EnterNested"].client_streaming


def test_grpc_stubs_and_servicers_exist() -> None:
    for module, service in [(l0_pb2_grpc, "L0Service"), (l1_pb2_grpc, "L1Service"), (l2_pb2_grpc, "L2Service")]:
        assert hasattr(module, f"{service}Stub")
        assert hasattr(module, f"{service}Servicer")
        assert callable(getattr(module, f"add_{service}Servicer_to_server"))


def test_enum_zero_values_are_unspecified() -> None:
    for module in (common_pb2, l0_pb2, l1_pb2, l2_pb2):
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            assert enum.values_by_number[0].name.endswith("_UNSPECIFIED"), enum.full_name


def test_common_round_trip() -> None:
    walk = common_pb2.WalkResult(
        ok=False,
        dsisr_code=0x00020000,  # PRTABLE_FAULT
        fault_gpa=0x1_0000_0008,
        leaf_pte=0xC000_0000_0123_4187,
        page_shift=21,
        memory_references=3,
    )
    back = common_pb2.WalkResult.FromString(walk.SerializeToString())
    assert back == walk
    assert back.dsisr_code == 0x00020000 and back.fault_gpa == 0x1_0000_0008 and not back.ok
    counters = common_pb2.Counters(values={"nested_faults": 7})
    assert common_pb2.Counters.FromString(counters.SerializeToString()).values["nested_faults"] == 7


def test_l0_round_trip_connect_and_run() -> None:
    first = l0_pb2.ConnectRequest(
        register=l0_pb2.Register(
            name="l1-a",
            memslots=[
                common_pb2.Memslot(
                    base_gfn_addr=0,
                    size_bytes=1 << 30,
                    kind=common_pb2.MEMSLOT_KIND_NORMAL,
                    backing_shift=21,
                )
            ],
        )
    )
    back = l0_pb2.ConnectRequest.FromString(first.SerializeToString())
    assert back.HasField("register") and back.register.memslots[0].backing_shift == 21
    assert list(back.replies) == []

    calls = l0_pb2.ConnectResponse(
        calls=[
            l0_pb2.L0Call(call_id=1, walk=l0_pb2.WalkCall(pate_dw0=0xC000_0000_0001_000D, l1_lpid=3, n_gpa=0x2000)),
            l0_pb2.L0Call(
                call_id=2,
                handle_exit=l0_pb2.HandleExitCall(l1_lpid=3, trap=0xE00, hdsisr=0x40000000, asdr=0x2000, access=common_pb2.ACCESS_KIND_STORE),
            ),
        ]
    )
    back_calls = l0_pb2.ConnectResponse.FromString(calls.SerializeToString())
    assert [c.WhichOneof("call") for c in back_calls.calls] == ["walk", "handle_exit"]
    assert back_calls.calls[1].handle_exit.access == common_pb2.ACCESS_KIND_STORE

    reply = l0_pb2.ConnectRequest(replies=[l0_pb2.L1Reply(call_id=1, walk=common_pb2.WalkResult(ok=True, l1_gpa=0x20_0000, page_shift=21))])
    assert l0_pb2.ConnectRequest.FromString(reply.SerializeToString()).replies[0].walk.l1_gpa == 0x20_0000

    results = l0_pb2.RunResponse(
        results=l0_pb2.AccessResults(
            batch_id=9,
            first_index=4,
            outcomes=[l0_pb2.ACCESS_OUTCOME_FILL, l0_pb2.ACCESS_OUTCOME_STORAGE_INTERRUPT],
            page_addresses=[0x1000, 0],
            host_addresses=[0x7_0000_1000, 0],
            flags=[12 | l0_pb2.FILL_FLAG_READ | l0_pb2.FILL_FLAG_REFERENCED, 0],
            dsisrs=[0, 0x42000000],
            batch_done=True,
        )
    )
    back_results = l0_pb2.RunResponse.FromString(results.SerializeToString())
    assert back_results.WhichOneof("message") == "results"
    assert back_results.results.flags[0] & l0_pb2.FILL_FLAG_PAGE_SHIFT_MASK == 12
    assert list(back_results.results.outcomes) == [1, 2]

    batch = l0_pb2.RunRequest(batch=l0_pb2.AccessBatch(batch_id=9, addresses=[0x1000, 0x2000], kinds=bytes([1, 2])))
    assert l0_pb2.RunRequest.FromString(batch.SerializeToString()).batch.kinds == b"\x01\x02"


def test_l0_hcall_return_codes_are_data() -> None:
    resp = l0_pb2.EnterNestedResponse(hcall_rc=-4, shadow_lpid=0)  # H_PARAMETER
    assert l0_pb2.EnterNestedResponse.FromString(resp.SerializeToString()).hcall_rc == -4
    inv = l0_pb2.RunResponse(
        invalidate=l0_pb2.InvalidationBroadcast(
            invalidations=[common_pb2.Invalidation(id=5, lpid=17, scope=common_pb2.INVALIDATION_SCOPE_ADDRESS, address=0x20_0000, size_bytes=1 << 21)]
        )
    )
    assert l0_pb2.RunResponse.FromString(inv.SerializeToString()).invalidate.invalidations[0].lpid == 17


def test_l1_round_trip() -> None:
    req = l1_pb2.CreateGuestRequest(
        page_shift=16,
        memory_bytes=1 << 28,
        regions=[l1_pb2.GuestRegion(n_gpa=0x100_0000, size_bytes=0x1_0000, kind=l1_pb2.GUEST_REGION_KIND_MMIO_HOLE, read=True)],
    )
    back = l1_pb2.CreateGuestRequest.FromString(req.SerializeToString())
    assert back == req and back.regions[0].kind == l1_pb2.GUEST_REGION_KIND_MMIO_HOLE
    walk = l1_pb2.WalkTreeResponse(result=common_pb2.WalkResult(ok=False, dsisr_code=0x40000000))
    assert l1_pb2.WalkTreeResponse.FromString(walk.SerializeToString()).result.dsisr_code == 0x40000000


def test_l2_round_trip() -> None:
    req = l2_pb2.RunWorkloadRequest(
        l1_address="127.0.0.1:50052",
        lpid=1,
        vcpus=2,
        workload=l2_pb2.Workload(pattern="hot", accesses=10_000, seed=42, store_fraction=0.25, batch_size=256),
    )
    back = l2_pb2.RunWorkloadRequest.FromString(req.SerializeToString())
    assert back == req and back.workload.store_fraction == 0.25
    tlb = l2_pb2.DumpTlbResponse(
        entries=[
            l2_pb2.TlbEntry(
                vcpu_id=0,
                lpid=17,
                translation=common_pb2.Translation(page_address=0x1000, host_address=0x9000, page_shift=12, read=True),
            )
        ]
    )
    assert l2_pb2.DumpTlbResponse.FromString(tlb.SerializeToString()).entries[0].translation.host_address == 0x9000

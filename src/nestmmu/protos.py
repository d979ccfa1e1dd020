"""The generated protobuf/gRPC modules of nestmmu under short names.

    from nestmmu.protos import common_pb2, l0_pb2, l0_pb2_grpc

Proto package ``nestmmu.<level>.v1`` (protos/nestmmu/<level>/v1/<level>.proto) is generated
into the Python package ``nestmmu.gen.<level>.v1``; the full paths work too:

    from nestmmu.gen.l0.v1 import l0_pb2, l0_pb2_grpc

The code is generated at build time (setup.py's build_py hook, for both ``pip install -e .``
and wheel builds) and never committed. ``python -m nestmmu.protos`` or ``make gen``
regenerates it by hand in a source checkout, e.g. after editing a .proto in an editable
install. Why the tree is ``nestmmu.gen.*`` and how protoc's imports are made to fit: see
nestmmu._codegen.
"""

from __future__ import annotations

import sys

#: gRPC metadata key that carries an L1's session token on every hcall RPC to L0.
SESSION_METADATA_KEY = "nestmmu-session"

if __name__ == "__main__":  # python -m nestmmu.protos: must work before anything exists
    from nestmmu._codegen import main

    sys.exit(main())

try:
    from nestmmu.gen.common.v1 import common_pb2, common_pb2_grpc
    from nestmmu.gen.l0.v1 import l0_pb2, l0_pb2_grpc
    from nestmmu.gen.l1.v1 import l1_pb2, l1_pb2_grpc
    from nestmmu.gen.l2.v1 import l2_pb2, l2_pb2_grpc
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
    if exc.name and exc.name.startswith("nestmmu.gen"):
        raise ImportError(
            "nestmmu's generated gRPC code is missing (src/nestmmu/gen). It is built by "
            "`pip install -e .` / `pip wheel .`; in a source checkout run `make gen` or "
            "`python -m nestmmu.protos`."
        ) from exc
    raise

#: Fully-qualified gRPC service names, for health checking and server reflection.
L0_SERVICE_NAME: str = l0_pb2.DESCRIPTOR.services_by_name["L0Service"].full_name
L1_SERVICE_NAME: str = l1_pb2.DESCRIPTOR.services_by_name["L1Service"].full_name
L2_SERVICE_NAME: str = l2_pb2.DESCRIPTOR.services_by_name["L2Service"].full_name

__all__ = [
    "L0_SERVICE_NAME",
    "L1_SERVICE_NAME",
    "L2_SERVICE_NAME",
    "SESSION_METADATA_KEY",
    "common_pb2",
    "common_pb2_grpc",
    "l0_pb2",
    "l0_pb2_grpc",
    "l1_pb2",
    "l1_pb2_grpc",
    "l2_pb2",
    "l2_pb2_grpc",
]

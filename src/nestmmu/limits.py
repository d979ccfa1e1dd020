"""Every limit on how much work one request may name, in one place (services, CLI and docs).

A request above a limit is refused before any work starts: INVALID_ARGUMENT with a
google.rpc.BadRequest field violation naming the field and the limit (the message names the
constant too, so a user can find it here and in docs/design-notes.md, "Limits").  Work below a
limit runs in slices that yield to the event loop (see the ``*_SLICE`` constants), so health
checks and other RPCs of the same service answer while it runs.
"""

from __future__ import annotations

# ---------------------------------------------------------------- L1: L2-tree changes
#: Pages one MapPages/UnmapPages/ProtectPages/RemapPages call may name (in the guest's page
#: size: 4 GiB of 64K pages, 256 MiB of 4K pages, 128 GiB of 2M pages).  Core cost is ~20 us
#: per page to map; an unmap/protect/remap also issues one invalidation hcall to L0 per page
#: changed (as Linux-as-L1 does), so a call at the limit is bounded in time as well as CPU.
MAX_TREE_OP_PAGES = 1 << 16
#: Pages an L1 tree op changes per slice under the core lock before it yields to the event
#: loop (and issues that slice's invalidation hcalls): well under a millisecond of core work.
TREE_OP_SLICE_PAGES = 32
#: Special regions (ROM, MMIO, protected) one CreateGuest may name: each access's region
#: lookup is linear in them.
MAX_GUEST_REGIONS = 64

# ---------------------------------------------------------------- L0
#: Accesses in one AccessBatch of a Run stream.
MAX_BATCH = 65536
#: The L0 Run worker yields to the event loop after this much work (seconds) on one batch:
#: a batch of shadow-tree hits never suspends otherwise.
RUN_WORKER_SLICE_S = 0.0005
#: Memslots one L1 may register at Connect (KVM_USER_MEM_SLOTS on powerpc is 512).
MAX_MEMSLOTS = 512

# ---------------------------------------------------------------- L2: RunWorkload
#: vCPUs one RunWorkload may run.
MAX_VCPUS = 256
#: Accesses one vCPU of a RunWorkload may run (a 2^31-access run is hours of L2 time).
MAX_ACCESSES_PER_VCPU = 1 << 31
#: Accesses one RunWorkload may run in total (vcpus x accesses).
MAX_TOTAL_ACCESSES = 1 << 32
#: Size of a trace file the L2 service will replay (a lackey line is ~14 bytes: 4 GiB is
#: about 300 M records, enough to replay a whole real program's trace).
MAX_TRACE_BYTES = 4 << 30
#: L1 tree walks L0 asks for in one WalkBatchCall (the misses of a batch it fetches ahead).
MAX_WALK_BATCH = 4096

__all__ = [
    "MAX_ACCESSES_PER_VCPU",
    "MAX_BATCH",
    "MAX_GUEST_REGIONS",
    "MAX_MEMSLOTS",
    "MAX_TOTAL_ACCESSES",
    "MAX_TRACE_BYTES",
    "MAX_TREE_OP_PAGES",
    "MAX_VCPUS",
    "MAX_WALK_BATCH",
    "RUN_WORKER_SLICE_S",
    "TREE_OP_SLICE_PAGES",
]

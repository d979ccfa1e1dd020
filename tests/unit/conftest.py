"""Shared fixtures for the pure-core unit tests: an in-process cluster with one booted L1."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from nestmmu.core.l0 import L1Vm
from nestmmu.core.l1 import L1Hypervisor
from nestmmu.core.sim import InProcessCluster, VcpuSession


@dataclass
class GuestRig:
    """One L1 ("a") with one 64K-page L2 guest and one attached vCPU."""

    cluster: InProcessCluster
    l1: L1Hypervisor
    vm: L1Vm
    lpid: int
    session: VcpuSession


@pytest.fixture
def cluster() -> InProcessCluster:
    """L0 (64K pages) with one L1 named "a" that has registered its partition table."""
    c = InProcessCluster()
    c.add_l1("a")
    return c


@pytest.fixture
def rig(cluster: InProcessCluster) -> GuestRig:
    lpid = cluster.create_guest("a", page_shift=16)
    session = cluster.attach_vcpu("a", lpid, 0)
    return GuestRig(cluster, cluster.l1s["a"], cluster.vms["a"], lpid, session)

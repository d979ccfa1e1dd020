"""`nestmmu chaos --compose` on the container cluster: network faults and a kill, checks after each heal."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator

import pytest

from nestmmu import chaos, cluster

from .helpers import NestmmuCompose

SERVICES = ["l0", "l1a", "l1b", "l2"]


@pytest.fixture
def up(nestmmu_image: str) -> Iterator[NestmmuCompose]:
    c = NestmmuCompose(services=SERVICES, wait=True)
    with c:
        yield c


def test_tc_netem_works_in_the_containers(up: NestmmuCompose) -> None:
    """The image has iproute2 and the services NET_ADMIN: what the netem faults need."""
    cid = up.compose("ps", "-q", "l1a").stdout.decode().strip()
    add = ["docker", "exec", "-u", "0", cid, "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "20ms"]
    subprocess.run(add, check=True, capture_output=True)
    shown = subprocess.run(["docker", "exec", cid, "tc", "qdisc", "show", "dev", "eth0"], check=True, capture_output=True, text=True).stdout
    assert "netem" in shown and "delay 20" in shown
    subprocess.run(["docker", "exec", "-u", "0", cid, "tc", "qdisc", "del", "dev", "eth0", "root"], check=True, capture_output=True)


def test_compose_campaign_survives_netem_partition_and_kill(up: NestmmuCompose) -> None:
    t = chaos.ComposeTargets(up.project_name)
    asyncio.run(cluster.wait_l1s_registered(t.l0, 2, 60))
    episodes = chaos.schedule(3, 3, ("netem:l1", "partition:l2", "kill:l1"), max_hold=2.0)
    rep = asyncio.run(chaos.run_campaign(t, episodes, chaos.Config(accesses=2000), 3))
    assert rep["mode"] == "compose" and rep["episodes_run"] == 3
    assert rep["faults_by_kind"] == {"kill:l1": 1, "netem:l1": 1, "partition:l2": 1}
    assert rep["failures"] == [], rep["failures"]
    assert rep["violations"] == 0 and rep["leaks"] == 0
    assert rep["longest_invalidation_wait_ms"] <= rep["invalidation_wait_bound_ms"]

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


def test_tc_works_in_the_containers(up: NestmmuCompose) -> None:
    """The image has iproute2 and the services NET_ADMIN: what the netem faults need (netem
    itself also needs the Docker host's sch_netem kernel module, checked by the campaign)."""
    cid = up.compose("ps", "-q", "l1a").stdout.decode().strip()
    tc = ["docker", "exec", "-u", "0", cid, "tc", "qdisc"]
    subprocess.run([*tc, "add", "dev", "eth0", "root", "pfifo", "limit", "1000"], check=True, capture_output=True)
    shown = subprocess.run([*tc, "show", "dev", "eth0"], check=True, capture_output=True, text=True).stdout
    assert "pfifo" in shown and "limit 1000p" in shown
    subprocess.run([*tc, "del", "dev", "eth0", "root"], check=True, capture_output=True)
    # Not as the services' own (unprivileged) user: the capability is root's in the container.
    user = subprocess.run(["docker", "exec", cid, "tc", "qdisc", "add", "dev", "eth0", "root", "pfifo"], capture_output=True, text=True)
    assert user.returncode != 0 and "not permitted" in user.stderr


def test_compose_campaign_survives_partitions_and_a_kill(up: NestmmuCompose) -> None:
    """Network cuts of an L1 and of L2 and a kill -9 of an L1 (netem too where the host kernel has it), about 10 s."""
    t = chaos.ComposeTargets(up.project_name)
    asyncio.run(cluster.wait_l1s_registered(t.l0, 2, 60))
    faults = ("partition:l1", "partition:l2", "kill:l1")
    if not t.netem_unavailable():
        faults = (*faults, "netem:l1")
    episodes = chaos.schedule(3, len(faults), faults, max_hold=2.0)
    rep = asyncio.run(chaos.run_campaign(t, episodes, chaos.Config(accesses=2000), 3))
    assert rep["mode"] == "compose" and rep["episodes_run"] == len(faults)
    assert rep["faults_by_kind"] == dict.fromkeys(sorted(faults), 1)
    assert rep["failures"] == [], rep["failures"]
    assert rep["violations"] == 0 and rep["leaks"] == 0
    assert rep["longest_invalidation_wait_ms"] <= rep["invalidation_wait_bound_ms"]
    # The cuts struck while work ran. A cut shorter than the ack timeout (2 s) and the keepalive
    # timeout (20 s) may be survived without a single failure: TCP delivers after the heal, and
    # that is the behaviour wanted; any failure it did cause was counted above with a clear error.
    cut = [e for e in rep["episode_reports"] if e["fault"].startswith("partition:")]
    assert all(e["workloads"] > 0 and e["accesses"] + e["accesses_not_run"] > 0 for e in cut), cut

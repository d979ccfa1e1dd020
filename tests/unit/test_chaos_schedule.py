"""The chaos campaign's fault schedule is a pure function of its seed (nestmmu.chaos.schedule)."""

from __future__ import annotations

import pytest

from nestmmu import chaos
from nestmmu.chaos import COMPOSE_FAULTS, LOCAL_FAULTS, schedule


def test_same_seed_same_schedule() -> None:
    assert schedule(7, 40) == schedule(7, 40)
    assert schedule(7, 40, COMPOSE_FAULTS, max_hold=6.0) == schedule(7, 40, COMPOSE_FAULTS, max_hold=6.0)


def test_different_seeds_differ() -> None:
    runs = {tuple(schedule(seed, 12)) for seed in range(20)}
    assert len(runs) == 20
    # not only the timings: the order of the faults differs too
    assert len({tuple(e.fault for e in schedule(seed, 12)) for seed in range(20)}) > 1


def test_a_prefix_is_the_shorter_campaign() -> None:
    """Episode i does not depend on how many episodes follow it (a long run extends a short one)."""
    assert schedule(3, 200)[:25] == schedule(3, 25)


@pytest.mark.parametrize("faults", [LOCAL_FAULTS, COMPOSE_FAULTS])
def test_every_fault_kind_reachable_in_one_round(faults: tuple[str, ...]) -> None:
    for seed in range(10):
        eps = schedule(seed, len(faults), faults)
        assert sorted(e.fault for e in eps) == sorted(faults), seed


def test_targets_and_parameters() -> None:
    eps = schedule(11, 120, COMPOSE_FAULTS, l1_names=("l1a", "l1b"), max_hold=3.0)
    assert [e.index for e in eps] == list(range(1, 121))
    for e in eps:
        level = e.fault.split(":")[1]
        assert e.target in (("l1a", "l1b") if level == "l1" else (level,))
        assert 0.2 <= e.onset <= 1.0
        assert 0.5 <= e.hold <= 3.0
        assert e.seed > 0
        if e.kind == "netem":
            assert e.delay_ms in (20, 50, 100, 200) and e.loss_pct in (0.0, 1.0, 5.0, 10.0)
        else:
            assert e.delay_ms == 0 and e.loss_pct == 0.0
    # both L1s get hurt, and delays/losses vary
    assert {e.target for e in eps if e.fault.endswith(":l1")} == {"l1a", "l1b"}
    assert len({(e.delay_ms, e.loss_pct) for e in eps if e.kind == "netem"}) > 3


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        schedule(1, 3, ("kill:l3",))
    with pytest.raises(ValueError, match="episodes"):
        schedule(1, -1)
    with pytest.raises(ValueError, match="max_hold"):
        schedule(1, 3, max_hold=0.1)


def test_summary_keys_and_exit_code() -> None:
    r1 = chaos.EpisodeReport(1, "kill:l1", "l1a", 0.5, 1.0, 9, recovered_s=1.0, audit="clean", l0_longest_wait_ms=12.0)
    r2 = chaos.EpisodeReport(2, "stop:l2", "l2", 0.5, 2.5, 10, recovered_s=0.2, audit="violations", violations=["I1: x"])
    r2.failures.append("audit after the heal: 1 violations")
    rep = chaos.summary([r1, r2], 2, chaos.Config(), 5, "local", "/tmp/x", 3.0, 2040.0)
    for key in ("episodes", "episodes_survived", "faults_by_kind", "violations", "leaks", "lost_writes", "longest_invalidation_wait_ms"):
        assert key in rep
    assert rep["episodes_survived"] == 1 and rep["violations"] == 1 and rep["faults_by_kind"] == {"kill:l1": 1, "stop:l2": 1}
    assert rep["longest_invalidation_wait_ms"] == 2040.0 and rep["invalidation_wait_bound_ms"] == 2500.0
    assert chaos.exit_code(rep) == 1
    rep_ok = chaos.summary([r1], 1, chaos.Config(), 5, "local", "", 1.0, 1.0)
    assert chaos.exit_code(rep_ok) == 0
    r3 = chaos.EpisodeReport(3, "stop:l1", "l1b", 0.5, 1.0, 11, recovered_s=0.1, audit="inconclusive: l1b did not answer", inconclusive=True)
    assert chaos.exit_code(chaos.summary([r1, r3], 2, chaos.Config(), 5, "local", "", 1.0, 1.0)) == 4
    # a campaign cut short (the cluster did not recover) is a failure even without other findings
    assert chaos.exit_code(chaos.summary([r1], 3, chaos.Config(), 5, "local", "", 1.0, 1.0)) == 1


def test_opaque_errors_are_not_clear() -> None:
    assert chaos.is_clear("lpid 1 vCPU 0: Run stream broke: ABORTED: no acknowledgement of an invalidation within 2.0s")
    assert not chaos.is_clear("lpid 1 vCPU 0: Run stream broke: INTERNAL: Internal error from Core")
    assert not chaos.is_clear("  ")


def test_compose_targets_touch_only_their_project(monkeypatch: pytest.MonkeyPatch) -> None:
    """The docker commands each fault and heal runs, without a Docker engine."""
    calls: list[tuple[str, ...]] = []

    def fake_docker(*args: str, check: bool = True) -> str:
        calls.append(args)
        if args[0] == "ps":
            svc = args[-1].split("=")[-1]
            assert "label=com.docker.compose.project=proj" in args  # only this project's containers
            return f"id-{svc}"
        if args[0] == "port":
            return {"id-l0": "127.0.0.1:4000", "id-l1a": "127.0.0.1:4001", "id-l1b": "127.0.0.1:4002", "id-l2": "0.0.0.0:4003"}[args[1]]
        if args[0] == "inspect":
            return '{"proj_mmu": {}}'
        return ""

    monkeypatch.setattr(chaos.targets, "_docker", fake_docker)
    t = chaos.ComposeTargets("proj")
    assert (t.l0, t.l1s, t.l2) == ("127.0.0.1:4000", {"l1a": "127.0.0.1:4001", "l1b": "127.0.0.1:4002"}, "127.0.0.1:4003")
    assert t.l1_for_l2 == {"l1a": "l1a:50052", "l1b": "l1b:50054"}
    calls.clear()
    for fault, target in (("kill:l1", "l1b"), ("stop:l0", "l0"), ("partition:l2", "l2"), ("netem:l1", "l1a")):
        ep = chaos.Episode(1, fault, target, 0.1, 1.0, 5, 50 if fault.startswith("netem") else 0, 5.0 if fault.startswith("netem") else 0.0)
        t.inject(ep)
        t.heal(ep)
    assert calls == [
        ("kill", "-s", "KILL", "id-l1b"),
        ("start", "id-l1b"),
        ("pause", "id-l0"),
        ("unpause", "id-l0"),
        ("inspect", "-f", "{{json .NetworkSettings.Networks}}", "id-l2"),
        ("network", "disconnect", "proj_mmu", "id-l2"),
        ("network", "connect", "--alias", "l2", "proj_mmu", "id-l2"),  # the service's DNS name back
        ("exec", "-u", "0", "id-l1a", "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "50ms", "loss", "5.0%"),
        ("exec", "-u", "0", "id-l1a", "tc", "qdisc", "del", "dev", "eth0", "root"),
    ]
    # a fault left in place (an interrupted campaign) is healed by cleanup
    calls.clear()
    t.inject(chaos.Episode(2, "stop:l2", "l2", 0.1, 1.0, 6))
    t.cleanup()
    assert calls == [("pause", "id-l2"), ("unpause", "id-l2")]

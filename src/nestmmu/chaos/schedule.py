"""The campaign's fault schedule: a pure function of the seed (no I/O, no clock)."""

from __future__ import annotations

import random
from dataclasses import dataclass

#: Faults of a local cluster of processes: SIGKILL then restart, SIGSTOP then SIGCONT.
LOCAL_FAULTS = ("kill:l0", "kill:l1", "kill:l2", "stop:l0", "stop:l1", "stop:l2")
#: Faults of the container cluster add network cuts and tc netem delay/loss.
COMPOSE_FAULTS = (*LOCAL_FAULTS, "partition:l0", "partition:l1", "partition:l2", "netem:l0", "netem:l1", "netem:l2")


@dataclass(frozen=True)
class Episode:
    """One fault: what, on which service, when and for how long."""

    index: int
    fault: str  # "kind:level", e.g. "kill:l1"
    target: str  # service name: "l0", an L1 name, "l2"
    onset: float  # seconds after the workloads started
    hold: float  # seconds the fault lasts (kill: how long the service stays dead)
    seed: int  # workload and churn seed of this episode
    delay_ms: int = 0  # netem only
    loss_pct: float = 0.0  # netem only

    @property
    def kind(self) -> str:
        return self.fault.split(":")[0]


def schedule(
    seed: int, episodes: int, faults: tuple[str, ...] = LOCAL_FAULTS, l1_names: tuple[str, ...] = ("l1a", "l1b"), max_hold: float = 6.0
) -> list[Episode]:
    """The campaign's episodes, a pure function of its arguments.

    Faults come in shuffled rounds (every fault once per round of ``len(faults)`` episodes), so
    a campaign of at least ``len(faults)`` episodes reaches every fault kind."""
    if episodes < 0:
        raise ValueError("episodes must be >= 0")
    if not faults:
        raise ValueError("at least one fault kind is needed")
    for fk in faults:
        if fk not in COMPOSE_FAULTS:
            raise ValueError(f"unknown fault {fk!r} (known: {', '.join(COMPOSE_FAULTS)})")
    if max_hold < 0.5:
        raise ValueError("max_hold must be at least 0.5 s")
    rng = random.Random(seed)
    out: list[Episode] = []
    round_: list[str] = []
    for i in range(episodes):
        if not round_:
            round_ = list(faults)
            rng.shuffle(round_)
        fault = round_.pop()
        level = fault.split(":")[1]
        target = rng.choice(l1_names) if level == "l1" else level
        onset = round(rng.uniform(0.2, 1.0), 3)
        hold = round(rng.uniform(0.5, max_hold), 3)
        delay, loss = rng.choice((20, 50, 100, 200)), rng.choice((0.0, 1.0, 5.0, 10.0))
        wseed = rng.randrange(1, 1 << 31)
        netem = fault.startswith("netem:")
        out.append(Episode(i + 1, fault, target, onset, hold, wseed, delay if netem else 0, loss if netem else 0.0))
    return out

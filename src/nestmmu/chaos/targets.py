"""Where the services are and how to hurt and heal them: local processes or compose containers."""

from __future__ import annotations

import contextlib
import json
import subprocess
from typing import Protocol

from nestmmu import cluster

from .schedule import Episode


class Targets(Protocol):
    """Where the services are and how to hurt and heal them."""

    mode: str
    l0: str  # addresses this client dials
    l1s: dict[str, str]
    l2: str
    l1_for_l2: dict[str, str]  # L1 addresses as the L2 service dials them
    log_hint: str

    def inject(self, ep: Episode) -> None: ...
    def heal(self, ep: Episode) -> None: ...
    def refresh(self) -> None: ...
    def cleanup(self) -> None: ...


class LocalTargets:
    """A :class:`nestmmu.cluster.LocalCluster`: kill -9 / restart, SIGSTOP / SIGCONT."""

    mode = "local"

    def __init__(self, c: cluster.LocalCluster) -> None:
        self.c = c
        self.l0, self.l1s, self.l2 = c.l0, dict(c.l1s), c.l2
        self.l1_for_l2 = dict(c.l1s)
        self.log_hint = c.log_dir
        self._stopped: set[str] = set()

    def inject(self, ep: Episode) -> None:
        if ep.kind == "kill":
            self.c.kill(ep.target)
        elif ep.kind == "stop":
            self.c.pause(ep.target)
            self._stopped.add(ep.target)
        else:
            raise ValueError(f"fault {ep.fault} needs the container cluster (--compose)")

    def heal(self, ep: Episode) -> None:
        if ep.kind == "kill":
            self.c.restart(ep.target)
        elif ep.kind == "stop":
            self.c.resume(ep.target)
            self._stopped.discard(ep.target)

    def refresh(self) -> None:
        pass

    def cleanup(self) -> None:
        for name in list(self._stopped):
            self.c.resume(name)
        self._stopped.clear()


def _docker(*args: str, check: bool = True) -> str:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60, check=False)
    if check and r.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip()


#: Container ports of the services in docker-compose.yml.
COMPOSE_PORTS = {"l0": 50051, "l1a": 50052, "l1b": 50054, "l2": 50053}


class ComposeTargets:
    """The containers of one compose project (docker-compose.yml, started by deploy/up.sh).

    Only containers carrying that project's compose label are ever touched: kill -9 and
    ``docker start``; ``docker pause``/``unpause``; ``docker network disconnect``/``connect``
    (with the service's DNS alias back); ``tc qdisc ... netem`` in the container's eth0
    (the image has iproute2; the services have NET_ADMIN)."""

    mode = "compose"

    def __init__(self, project: str = "nestmmu") -> None:
        self.project = project
        self.ids: dict[str, str] = {}
        for svc in COMPOSE_PORTS:
            cid = _docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={project}", "--filter", f"label=com.docker.compose.service={svc}")
            if not cid:
                raise RuntimeError(f"compose project {project!r} has no {svc} container (start it with deploy/up.sh)")
            self.ids[svc] = cid.splitlines()[0]
        self.l1_for_l2 = {n: f"{n}:{COMPOSE_PORTS[n]}" for n in ("l1a", "l1b")}
        self.log_hint = f"docker compose -p {project} logs"
        self._nets: dict[str, list[str]] = {}
        self._hurt: dict[str, Episode] = {}
        self.l0, self.l2 = "", ""
        self.l1s: dict[str, str] = {}
        self.refresh()

    def netem_unavailable(self) -> str:
        """Why tc netem cannot run in the containers ("" if it can): the qdisc is a kernel
        module of the Docker host (sch_netem), which a container cannot load."""
        cid = self.ids["l0"]
        r = subprocess.run(
            ["docker", "exec", "-u", "0", cid, "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "1ms"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if r.returncode == 0:
            _docker("exec", "-u", "0", cid, "tc", "qdisc", "del", "dev", "eth0", "root")
            return ""
        why = r.stderr.strip() or r.stdout.strip()
        if "unknown" in why.lower():
            why += " (the Docker host's kernel has no sch_netem: `modprobe sch_netem` on the host)"
        return f"tc netem does not work in the containers: {why}"

    def _host_addr(self, svc: str) -> str:
        out = _docker("port", self.ids[svc], f"{COMPOSE_PORTS[svc]}/tcp").splitlines()
        v4 = [a for a in out if a.startswith("127.0.0.1:") or a.startswith("0.0.0.0:")]
        if not v4:
            raise RuntimeError(f"{svc} publishes no 127.0.0.1 port (docker port: {out})")
        return v4[0].replace("0.0.0.0:", "127.0.0.1:")

    def refresh(self) -> None:
        """Host-side addresses (a restarted container may get a new random host port)."""
        self.l0 = self._host_addr("l0")
        self.l1s = {n: self._host_addr(n) for n in ("l1a", "l1b")}
        self.l2 = self._host_addr("l2")

    def inject(self, ep: Episode) -> None:
        cid = self.ids[ep.target]
        self._hurt[ep.target] = ep
        if ep.kind == "kill":
            _docker("kill", "-s", "KILL", cid)
        elif ep.kind == "stop":
            _docker("pause", cid)
        elif ep.kind == "partition":
            nets = json.loads(_docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", cid))
            self._nets[ep.target] = sorted(nets)
            for net in self._nets[ep.target]:
                _docker("network", "disconnect", net, cid)
        elif ep.kind == "netem":
            _docker("exec", "-u", "0", cid, "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", f"{ep.delay_ms}ms", "loss", f"{ep.loss_pct}%")

    def heal(self, ep: Episode) -> None:
        cid = self.ids[ep.target]
        if ep.kind == "kill":
            _docker("start", cid)
        elif ep.kind == "stop":
            _docker("unpause", cid)
        elif ep.kind == "partition":
            for net in self._nets.pop(ep.target, []):
                _docker("network", "connect", "--alias", ep.target, net, cid)
        elif ep.kind == "netem":
            _docker("exec", "-u", "0", cid, "tc", "qdisc", "del", "dev", "eth0", "root")
        self._hurt.pop(ep.target, None)

    def cleanup(self) -> None:
        for ep in list(self._hurt.values()):
            with contextlib.suppress(RuntimeError):
                self.heal(ep)

"""Helpers for the container tests (tests/containers).

Everything here talks only to this machine: the Docker engine over its local
socket, published ports on 127.0.0.1, and the project's own compose networks.

- ``ensure_images()`` runs deploy/images.sh once (Compose v2, base image,
  wheelhouse, service image) and returns the image tag.
- ``NestmmuCompose`` is testcontainers' ``DockerCompose`` for our
  docker-compose.yml under a per-test project name, with every published port
  random (127.0.0.1 only), so tests never collide with each other or with a
  cluster a developer has running via ``make up``.
- ``cleanup_session()`` removes whatever this pytest session left behind.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import CalledProcessError, CompletedProcess
from typing import Any

from testcontainers.compose import DockerCompose

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
IMAGES_SCRIPT = REPO_ROOT / "deploy" / "images.sh"

# Compose projects started by tests are named PROJECT_PREFIX + something, so
# the session cleanup can find them (containers and networks carry the
# com.docker.compose.project label).
IMAGE_LABEL = "org.opencontainers.image.title=nestmmu"  # deploy/Dockerfile LABEL
PROJECT_PREFIX = f"nestmmu-test-{os.getpid()}-"

# Environment that makes docker-compose.yml publish every port on a random
# free 127.0.0.1 port (see the ${X_HOST_PORT-default} entries there).
RANDOM_PORTS_ENV = {
    "L0_HOST_PORT": "",
    "L1A_HOST_PORT": "",
    "L1B_HOST_PORT": "",
    "L2_HOST_PORT": "",
}

# Container ports of the services, as in docker-compose.yml.
SERVICE_PORTS = {"l0": 50051, "l1a": 50052, "l1b": 50054, "l2": 50053}

_image_tag: str | None = None


def ensure_images() -> str:
    """Build (or confirm, cached) everything the container tests need; return the image tag.

    Set NESTMMU_SKIP_IMAGE_BUILD=1 to use the existing image as it is.
    """
    global _image_tag
    if _image_tag is None:
        tag = os.environ.get("NESTMMU_IMAGE", "nestmmu/nestmmu:dev")
        if os.environ.get("NESTMMU_SKIP_IMAGE_BUILD") != "1":
            out = subprocess.run(
                ["bash", str(IMAGES_SCRIPT)],
                cwd=REPO_ROOT,
                check=True,
                stdout=subprocess.PIPE,
                text=True,
                timeout=20 * 60,
            )
            tag = out.stdout.strip().splitlines()[-1]
        _image_tag = tag
    return _image_tag


def new_project_name(label: str = "") -> str:
    suffix = uuid.uuid4().hex[:8]
    return f"{PROJECT_PREFIX}{label + '-' if label else ''}{suffix}"


@dataclass
class NestmmuCompose(DockerCompose):
    """DockerCompose on the repo's docker-compose.yml, isolated per test.

    Usage::

        with NestmmuCompose(services=["l0", "l1a"]) as cluster:
            host, port = cluster.endpoint("l1a")
    """

    context: str | os.PathLike[str] = str(REPO_ROOT)
    compose_file_name: str | list[str] | None = str(COMPOSE_FILE)
    project_name: str = field(default_factory=new_project_name)
    extra_env: dict[str, str] = field(default_factory=dict)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(RANDOM_PORTS_ENV)
        env["COMPOSE_PROJECT_NAME"] = self.project_name
        env.update(self.extra_env)
        return env

    # testcontainers (pinned <4.16) funnels every compose call through here;
    # we add the project's environment (project name, random ports).
    def _run_command(self, cmd: Any, context: str | None = None) -> CompletedProcess[bytes]:
        try:
            return subprocess.run(
                cmd,
                capture_output=True,
                check=True,
                cwd=context or str(self.context),
                env=self._env(),
                timeout=10 * 60,
            )
        except CalledProcessError as e:
            raise RuntimeError(
                f"{' '.join(map(str, e.cmd))} failed ({e.returncode}):\n{e.stdout.decode(errors='replace')}\n{e.stderr.decode(errors='replace')}"
            ) from e

    def stop(self, down: bool = True) -> None:
        """Tear the whole project down (all services, network, volumes), not only ``services``."""
        if down:
            self.compose("down", "--volumes", "--remove-orphans", "--timeout", "10")
        else:
            self.compose("stop")

    def endpoint(self, service: str) -> tuple[str, int]:
        """127.0.0.1 and the published host port of a service's gRPC port."""
        port = self.get_service_port(service, SERVICE_PORTS[service])
        assert port, f"{service} publishes no port"
        return "127.0.0.1", int(port)

    def compose(self, *args: str) -> CompletedProcess[bytes]:
        """Run any other `docker compose` subcommand in this project."""
        return self._run_command([*self.compose_command_property, *args])


def cleanup_session() -> list[str]:
    """Remove containers and networks this pytest session created; return what was removed.

    Covers testcontainers' own containers (label org.testcontainers.session-id;
    Ryuk, which would do this, cannot be pulled here) and compose projects named
    PROJECT_PREFIX*.
    """
    import docker
    from testcontainers.core.labels import LABEL_SESSION_ID, SESSION_ID

    removed: list[str] = []
    client = docker.from_env()
    try:
        mine = client.containers.list(all=True, filters={"label": f"{LABEL_SESSION_ID}={SESSION_ID}"})
        projects = [
            c
            for c in client.containers.list(all=True, filters={"label": "com.docker.compose.project"})
            if c.labels.get("com.docker.compose.project", "").startswith(PROJECT_PREFIX)
        ]
        for c in {c.id: c for c in mine + projects}.values():
            c.remove(force=True, v=True)
            removed.append(f"container {c.name}")
        for n in client.networks.list(filters={"label": "com.docker.compose.project"}):
            if n.attrs.get("Labels", {}).get("com.docker.compose.project", "").startswith(PROJECT_PREFIX):
                n.remove()
                removed.append(f"network {n.name}")
        for v in client.volumes.list(filters={"label": "com.docker.compose.project"}):
            if (v.attrs.get("Labels") or {}).get("com.docker.compose.project", "").startswith(PROJECT_PREFIX):
                v.remove(force=True)
                removed.append(f"volume {v.name}")
        # `compose up` rebuilds l0's image (pull_policy: build) and compose labels it with the
        # project name, so every test project gets its own image id and leaves the previous
        # one untagged (~200 MB each): drop the dangling images of ours, never anybody else's.
        pruned = client.images.prune(filters={"dangling": True, "label": IMAGE_LABEL})
        removed += [f"image {d.get('Deleted', d.get('Untagged', ''))}" for d in pruned.get("ImagesDeleted") or [] if "Deleted" in d]
    finally:
        client.close()
    return removed

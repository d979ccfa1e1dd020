"""Smoke tests of the service image and the compose file (no services needed)."""

from __future__ import annotations

import json
import subprocess

from testcontainers.core.container import DockerContainer

from .helpers import COMPOSE_FILE, REPO_ROOT


def _run_to_exit(container: DockerContainer, timeout: float = 120) -> tuple[int, str, str]:
    """Start a one-shot container, wait for it to exit; return (exit code, stdout, stderr)."""
    with container:
        wrapped = container.get_wrapped_container()
        status = wrapped.wait(timeout=timeout)["StatusCode"]
        out, err = container.get_logs()
    return status, out.decode(errors="replace"), err.decode(errors="replace")


def test_image_runs_the_cli(nestmmu_image: str) -> None:
    code, out, err = _run_to_exit(DockerContainer(nestmmu_image).with_command("--help"))
    assert code == 0, err
    assert "usage: nestmmu" in out
    assert "serve" in out


def test_image_is_cp311_venv_with_project_installed(nestmmu_image: str) -> None:
    script = (
        "import sys, json, nestmmu, grpc, grpc_health.v1.health;"
        "print(json.dumps({'v': list(sys.version_info[:2]), 'prefix': sys.prefix,"
        " 'pkg': nestmmu.__file__}))"
    )
    container = DockerContainer(nestmmu_image).with_kwargs(entrypoint=["python", "-c", script])
    code, out, err = _run_to_exit(container)
    assert code == 0, err
    info = json.loads(out.strip().splitlines()[-1])
    assert info["v"] == [3, 11]
    assert info["prefix"] == "/opt/venv"
    assert info["pkg"].startswith("/opt/venv/lib/python3.11/site-packages/nestmmu/")


def test_image_runs_unprivileged(nestmmu_image: str) -> None:
    container = DockerContainer(nestmmu_image).with_kwargs(entrypoint=["python", "-c", "import os; print(os.getuid())"])
    code, out, err = _run_to_exit(container)
    assert code == 0, err
    assert out.strip() == "10001"


def test_healthcheck_probe_fails_when_nothing_serves(nestmmu_image: str) -> None:
    # The image's HEALTHCHECK must report unhealthy, quickly, when no server listens.
    container = DockerContainer(nestmmu_image).with_kwargs(entrypoint=["python", "-m", "nestmmu.healthcheck", "--port", "59999", "--timeout", "2"])
    code, _out, err = _run_to_exit(container, timeout=60)
    assert code == 1
    assert "127.0.0.1:59999" in err


def test_compose_file_is_valid_and_local_only(nestmmu_image: str) -> None:
    out = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), "config", "--format", "json"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    services = json.loads(out)["services"]
    assert {"l0", "l1a", "l1b", "l2", "workload"} <= set(services)
    for name, svc in services.items():
        # Never pull: there is no registry on our machines.
        assert svc.get("pull_policy") in {"build", "never"}, name
        assert svc.get("image") == nestmmu_image, name
        assert svc.get("init") is True, name
        for port in svc.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", (name, port)
    assert "build" in services["l0"]
    for name in ("l0", "l1a", "l1b", "l2"):
        assert services[name]["healthcheck"]["test"][:4] == ["CMD", "python", "-m", "nestmmu.healthcheck"], name

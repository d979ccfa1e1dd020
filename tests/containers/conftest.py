"""Fixtures for the container tests: images built once, testcontainers set up
for a machine with no registry, and everything removed at the end.

Every test in this directory is marked ``containers`` and ``slow``
automatically (pytest_collection_modifyitems below).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

# testcontainers reads these when it is imported, so set them first.
# - Ryuk (its reaper container) cannot be pulled here: disabled, we clean up
#   ourselves (session fixture below).
# - This machine may have /.dockerenv, which makes testcontainers hand out the
#   bridge gateway address; we only ever talk to 127.0.0.1 and publish ports
#   on 127.0.0.1.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
os.environ.setdefault("TESTCONTAINERS_HOST_OVERRIDE", "127.0.0.1")
os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")

from testcontainers.core.config import testcontainers_config

from .helpers import cleanup_session, ensure_images

testcontainers_config.ryuk_disabled = True


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "containers: needs the Docker engine and the nestmmu image")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.containers)
            item.add_marker(pytest.mark.slow)


def _docker_ok() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


@pytest.fixture(scope="session")
def docker_available() -> None:
    """Fail (not skip) without a Docker engine: the container tests are part of CI.

    NESTMMU_SKIP_CONTAINERS=1 skips them instead, for machines without Docker.
    """
    if os.environ.get("NESTMMU_SKIP_CONTAINERS") == "1":
        pytest.skip("NESTMMU_SKIP_CONTAINERS=1")
    if not _docker_ok():
        pytest.fail("no usable Docker engine (`docker info` failed); set NESTMMU_SKIP_CONTAINERS=1 to skip")


@pytest.fixture(scope="session")
def nestmmu_image(docker_available: None) -> Iterator[str]:
    """Tag of the service image, built (cached) by deploy/images.sh; cleanup at session end."""
    try:
        yield ensure_images()
    finally:
        removed = cleanup_session()
        if removed:
            print("\n[containers] cleaned up: " + ", ".join(removed))

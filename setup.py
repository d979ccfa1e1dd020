"""Build hooks that pyproject.toml cannot express declaratively.

1. The service packages live in the top-level services/ directory (repo layout rule) but
   are installed as ``nestmmu.services`` (``services/l0`` -> ``nestmmu.services.l0``), via
   package_dir. Works for regular wheels and for ``pip install -e .`` (setuptools' editable
   finder maps ``nestmmu.services`` to services/).
2. gRPC code is generated from protos/ into src/nestmmu/gen by a build_py hook, which runs
   for both ``pip wheel .`` and ``pip install -e .``. Generated code is never committed.
   The generator is src/nestmmu/_codegen.py, loaded by path (nestmmu is not installed yet).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _codegen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_nestmmu_codegen", ROOT / "src/nestmmu/_codegen.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses/typing look modules up by name
    spec.loader.exec_module(module)
    return module


class BuildPyWithProtos(build_py):  # type: ignore[misc]
    """build_py that first generates src/nestmmu/gen from protos/ (with .pyi stubs)."""

    def run(self) -> None:
        _codegen().generate(ROOT / "protos", ROOT / "src/nestmmu/gen", stubs=True)
        # build_py computes package data lazily and caches it; drop any copy computed before
        # the generated .pyi files existed (fresh checkout).
        self.__dict__.pop("data_files", None)
        super().run()


# Declared up front (derived from the .proto paths, no protoc run needed) so that both the
# wheel and the editable install know every generated package even on a fresh checkout.
GEN_PACKAGES = _codegen().packages(ROOT / "protos")
# setuptools checks that every package directory exists before build_py runs (egg_info):
# create the empty directories; build_py fills them.
for _pkg in GEN_PACKAGES:
    (ROOT / "src" / Path(*_pkg.split("."))).mkdir(parents=True, exist_ok=True)
SERVICE_PACKAGES = ["nestmmu.services"] + [f"nestmmu.services.{p}" for p in find_packages(str(ROOT / "services"))]
SRC_PACKAGES = [p for p in find_packages(str(ROOT / "src")) if not p.startswith(("nestmmu.gen", "nestmmu.services"))]

setup(
    package_dir={"": "src", "nestmmu.services": "services"},
    packages=sorted(set(SRC_PACKAGES + GEN_PACKAGES + SERVICE_PACKAGES)),
    package_data={"": ["*.pyi", "py.typed"]},
    cmdclass={"build_py": BuildPyWithProtos},
)

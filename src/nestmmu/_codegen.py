"""Generate nestmmu's protobuf/gRPC Python code (and mypy stubs) from protos/.

Used by three callers, so it imports nothing from nestmmu and only the standard library at
module level: the setuptools build hook in setup.py (which loads this file by path, before
nestmmu is installed), ``python -m nestmmu.protos`` and ``make gen``.

Layout (why the generated package is ``nestmmu.gen.<level>.v1``):

buf's STANDARD style puts proto package ``nestmmu.l0.v1`` in ``protos/nestmmu/l0/v1/``, and
protoc derives Python imports from the proto *file path*: ``l0.proto`` importing
``nestmmu/common/v1/common.proto`` becomes ``from nestmmu.common.v1 import common_pb2``. That
name would collide with our real ``nestmmu`` package, and protoc has no option for a Python
import prefix. So we run protoc into a scratch directory and then move the tree one level
down, ``nestmmu/<x>`` -> ``src/nestmmu/gen/<x>``, rewriting every reference to a generated
module (``nestmmu.<...>_pb2`` / ``_pb2_grpc`` in imports, stubs and the module name passed to
the protobuf builder) to ``nestmmu.gen.<...>``. Only dotted names that end in a generated
module name are touched: proto full names (``nestmmu.l0.v1.L0Service``, used on the wire and
in descriptors) and file names (``nestmmu/l0/v1/l0.proto``) stay as they are. The result is
an ordinary package tree with ``__init__.py`` files, importable in every install mode and
understood by mypy without any sys.path tricks.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path

# nestmmu.<...>.name_pb2 (or _pb2_grpc) as a dotted module name, not preceded by an
# identifier character, a dot or a slash (so "nestmmu.gen." and file paths never match).
_MODULE_REF = re.compile(r"(?<![\w./])nestmmu\.(?!gen\.)((?:\w+\.)*\w+_pb2(?:_grpc)?)\b")
# "from nestmmu.<...> import name_pb2 as alias", the form protoc and mypy-protobuf emit.
_FROM_IMPORT = re.compile(r"^(\s*)from nestmmu\.(?!gen\.)([\w.]+) import (\w+_pb2(?:_grpc)?\b)", re.MULTILINE)

# Bump when the post-processing changes, so stale trees are regenerated.
_LAYOUT_VERSION = "2"
_STAMP = ".codegen-stamp"


def repo_root() -> Path:
    """The source checkout this file lives in (src/nestmmu/_codegen.py -> repo root)."""
    return Path(__file__).resolve().parents[2]


def default_proto_root() -> Path:
    return repo_root() / "protos"


def default_out_dir() -> Path:
    return Path(__file__).resolve().parent / "gen"


def proto_files(proto_root: Path) -> list[str]:
    """Every .proto under proto_root/nestmmu, as include-relative POSIX paths, sorted."""
    files = sorted(p.relative_to(proto_root).as_posix() for p in (proto_root / "nestmmu").rglob("*.proto"))
    if not files:
        raise FileNotFoundError(f"no .proto files under {proto_root / 'nestmmu'}")
    return files


def packages(proto_root: Path) -> list[str]:
    """The Python packages the generated tree will contain (nestmmu.gen, nestmmu.gen.l0, ...).

    Computable without running protoc, so setup.py can declare them up front.
    """
    pkgs = {"nestmmu.gen"}
    for rel in proto_files(proto_root):
        parts = rel.split("/")[1:-1]  # drop the leading "nestmmu" and the file name
        for i in range(1, len(parts) + 1):
            pkgs.add(".".join(["nestmmu", "gen", *parts[:i]]))
    return sorted(pkgs)


def _fingerprint(proto_root: Path, with_stubs: bool) -> str:
    import grpc_tools  # optional: only needed when generating

    h = hashlib.sha256()
    h.update(f"layout={_LAYOUT_VERSION} stubs={with_stubs}\n".encode())
    h.update(f"grpc_tools={getattr(grpc_tools, '__version__', '')}\n".encode())
    try:
        from importlib.metadata import version

        h.update(f"grpcio-tools={version('grpcio-tools')}\n".encode())
        if with_stubs:
            h.update(f"mypy-protobuf={version('mypy-protobuf')}\n".encode())
    except Exception:  # metadata is best effort
        pass
    for rel in proto_files(proto_root):
        h.update(rel.encode() + b"\0" + (proto_root / rel).read_bytes() + b"\0")
    return h.hexdigest()


def _have_mypy_protobuf() -> bool:
    try:
        import mypy_protobuf.main  # noqa: F401
    except ImportError:
        return False
    return True


def _write_plugin(bindir: Path, name: str, func: str) -> Path:
    """A protoc plugin executable that runs mypy_protobuf with *this* interpreter.

    Independent of PATH, so it works in pip's isolated build environment too.
    """
    path = bindir / name
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "import sys; from mypy_protobuf.main import {func}; sys.exit({func}())"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def rewrite(text: str) -> str:
    """Point references to generated modules at the nestmmu.gen package."""
    text = _FROM_IMPORT.sub(r"\1from nestmmu.gen.\2 import \3", text)
    return _MODULE_REF.sub(r"nestmmu.gen.\1", text)


def generate(
    proto_root: Path | None = None,
    out_dir: Path | None = None,
    *,
    force: bool = False,
    stubs: bool | None = None,
    quiet: bool = False,
) -> bool:
    """Generate into out_dir (default src/nestmmu/gen). Returns False if it was up to date.

    stubs=None: generate .pyi stubs when mypy-protobuf is importable; True: require it.
    """
    from grpc_tools import protoc

    proto_root = (proto_root or default_proto_root()).resolve()
    out_dir = (out_dir or default_out_dir()).resolve()
    if stubs is None:
        stubs = _have_mypy_protobuf()
    elif stubs and not _have_mypy_protobuf():
        raise RuntimeError("mypy-protobuf is not installed; cannot generate .pyi stubs")

    files = proto_files(proto_root)
    fingerprint = _fingerprint(proto_root, stubs)
    stamp = out_dir / _STAMP
    if not force and stamp.is_file() and stamp.read_text().strip() == fingerprint:
        if not quiet:
            print(f"nestmmu codegen: {out_dir} is up to date", file=sys.stderr)
        return False

    wkt_include = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nestmmu-codegen-") as tmp_s:
        tmp = Path(tmp_s)
        raw, staged, bindir = tmp / "raw", tmp / "staged", tmp / "bin"
        for d in (raw, staged, bindir):
            d.mkdir()
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{wkt_include}",
            f"--python_out={raw}",
            f"--grpc_python_out={raw}",
        ]
        if stubs:
            args += [
                f"--plugin=protoc-gen-mypy={_write_plugin(bindir, 'protoc-gen-mypy', 'main')}",
                f"--plugin=protoc-gen-mypy_grpc={_write_plugin(bindir, 'protoc-gen-mypy_grpc', 'grpc')}",
                f"--mypy_out=quiet:{raw}",
                f"--mypy_grpc_out=quiet:{raw}",
            ]
        rc = protoc.main([*args, *files])
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args)}")

        src_tree = raw / "nestmmu"
        for path in sorted(src_tree.rglob("*")):
            if path.is_dir():
                continue
            dest = staged / path.relative_to(src_tree)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(rewrite(path.read_text()))
        # Regular packages (not namespace packages) all the way down.
        for d in [staged, *(p for p in staged.rglob("*") if p.is_dir())]:
            (d / "__init__.py").write_text('"""Generated by nestmmu._codegen from protos/. Do not edit."""\n')
        (staged / "py.typed").write_text("")
        (staged / _STAMP).write_text(fingerprint + "\n")

        # Swap the whole tree so no stale module of a deleted .proto survives.
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            os.replace(out_dir, old)
        shutil.copytree(staged, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    if not quiet:
        print(f"nestmmu codegen: generated {len(files)} protos into {out_dir}", file=sys.stderr)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nestmmu.protos",
        description="Generate nestmmu's gRPC code from protos/ into src/nestmmu/gen "
        "(normally done by `pip install` / `pip wheel`; this is the manual fallback).",
    )
    parser.add_argument("--proto-root", type=Path, default=None, help="default: <checkout>/protos")
    parser.add_argument("--out", type=Path, default=None, help="default: src/nestmmu/gen")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    parser.add_argument("--no-stubs", action="store_true", help="skip mypy-protobuf .pyi stubs")
    ns = parser.parse_args(argv)
    proto_root = ns.proto_root or default_proto_root()
    if not (proto_root / "nestmmu").is_dir():
        parser.error(
            f"{proto_root} has no nestmmu/ protos (an installed wheel ships generated code only; run this from a source checkout or pass --proto-root)"
        )
    generate(proto_root, ns.out, force=ns.force, stubs=False if ns.no_stubs else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env bash
# Fill build/wheelhouse with every wheel the image needs, so the Dockerfile can
# install fully offline (`pip install --no-index --find-links`).
#
# Why: pip inside a container cannot reach PyPI on our machines (TLS
# interception; the host's CA bundle is not in the image and must never be
# committed), so wheels are downloaded on the host, for the image's platform
# (CPython 3.11, manylinux, the engine's CPU architecture).
#
# - third-party wheels: from the first of requirements-runtime.lock,
#   requirements.lock (repo root) that exists (REQUIREMENTS= to override); if
#   there is no lock file, the [project] dependencies of pyproject.toml.  Cached: skipped while the requirements
#   and platform are unchanged (stamp file), FORCE=1 to redo.
# - the project's own wheel: rebuilt every run (cheap), old ones removed, so
#   the image never gets a stale nestmmu wheel. SKIP_PROJECT_WHEEL=1 to skip.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELHOUSE="${WHEELHOUSE:-$ROOT/build/wheelhouse}"
PYTHON="${PYTHON:-python3}"
PY_VERSION="${PY_VERSION:-3.11}"
ABI="cp${PY_VERSION/./}"

log() { printf '[wheelhouse] %s\n' "$*" >&2; }

# The image's CPU architecture is the engine's, not necessarily the host
# Python's (e.g. a laptop with a remote or emulating engine).
ARCH="${ARCH:-}"
if [[ -z "$ARCH" ]]; then
    ARCH="$(docker info --format '{{.Architecture}}' 2>/dev/null || uname -m)"
fi
case "$ARCH" in
    x86_64|amd64) ARCH=x86_64 ;;
    aarch64|arm64) ARCH=aarch64 ;;
    *) log "unsupported architecture $ARCH"; exit 1 ;;
esac

# pip's --platform matches each tag exactly: list the common manylinux tags,
# or e.g. grpcio's/protobuf's binary wheel is missed.
PLATFORMS=()
for tag in manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34; do
    PLATFORMS+=(--platform "${tag}_${ARCH}")
done

mkdir -p "$WHEELHOUSE"

if [[ -z "${REQUIREMENTS:-}" ]]; then
    for f in "$ROOT/requirements-runtime.lock" "$ROOT/requirements.lock"; do
        if [[ -s "$f" ]]; then REQUIREMENTS="$f"; break; fi
    done
fi
REQUIREMENTS="${REQUIREMENTS:-$ROOT/requirements.lock}"
REQ_FILE="$REQUIREMENTS"
if [[ ! -s "$REQUIREMENTS" ]]; then
    if [[ ! -f "$ROOT/pyproject.toml" ]]; then
        log "neither $REQUIREMENTS nor pyproject.toml exists"
        exit 1
    fi
    log "no $(basename "$REQUIREMENTS"); using [project].dependencies of pyproject.toml"
    REQ_FILE="$WHEELHOUSE/.requirements-from-pyproject.txt"
    "$PYTHON" - "$ROOT/pyproject.toml" >"$REQ_FILE" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f).get("project", {}).get("dependencies", [])))
EOF
fi

STAMP="$WHEELHOUSE/.stamp"
want_stamp="$( { cat "$REQ_FILE"; echo "$ABI ${PLATFORMS[*]}"; } | sha256sum | cut -d' ' -f1)"
if [[ "${FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]]; then
    log "third-party wheels up to date ($WHEELHOUSE)"
else
    log "downloading $ABI/$ARCH wheels from $REQ_FILE"
    start=$(date +%s)
    # Start clean so wheels of versions no longer locked do not linger.
    rm -f "$STAMP" "$WHEELHOUSE"/*.whl
    "$PYTHON" -m pip download --quiet --disable-pip-version-check \
        -d "$WHEELHOUSE" --only-binary=:all: \
        --python-version "$PY_VERSION" --implementation cp --abi "$ABI" --abi abi3 --abi none \
        "${PLATFORMS[@]}" --platform any \
        -r "$REQ_FILE"
    echo "$want_stamp" >"$STAMP"
    log "downloaded in $(( $(date +%s) - start ))s"
fi

if [[ "${SKIP_PROJECT_WHEEL:-0}" != 1 ]]; then
    PROJECT_DIR="${PROJECT_DIR:-$ROOT}"
    rm -f "$WHEELHOUSE"/nestmmu-*.whl
    # setuptools builds in-tree: a stale build/lib would put deleted modules
    # back into the wheel.
    rm -rf "$PROJECT_DIR"/build/lib "$PROJECT_DIR"/build/bdist.*
    log "building the project wheel from $PROJECT_DIR"
    # Reproducible wheel (fixed zip timestamps): an unchanged tree gives the same
    # bytes, so the image build's COPY layer stays cached.
    if [[ -z "${SOURCE_DATE_EPOCH:-}" ]]; then
        SOURCE_DATE_EPOCH="$(git -C "$PROJECT_DIR" log -1 --format=%ct 2>/dev/null || echo 315532800)"
        export SOURCE_DATE_EPOCH
    fi
    "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps \
        -w "$WHEELHOUSE" "$PROJECT_DIR"
fi

log "$(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels in $WHEELHOUSE"

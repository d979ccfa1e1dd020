# Sourced by the deploy scripts: shared defaults. Not executable on its own.
# shellcheck shell=bash

# Which base image: the locally built Debian one where we can build it
# (mmdebstrap, i.e. a Debian/Ubuntu host), else a public Python image, which
# needs a registry (a user's laptop). Override with BASE_IMAGE=...
if [[ -z "${BASE_IMAGE:-}" ]]; then
    if command -v mmdebstrap >/dev/null 2>&1 || command -v apt-get >/dev/null 2>&1; then
        BASE_IMAGE=nestmmu/base:bookworm
    else
        BASE_IMAGE=python:3.11-slim
    fi
fi
export BASE_IMAGE
export NESTMMU_IMAGE="${NESTMMU_IMAGE:-nestmmu/nestmmu:dev}"

# Note: without buildx (Debian's docker.io has none), Compose 2.40 warns
# "configured to build using Bake, but buildx isn't installed" and uses its
# built-in BuildKit builder, which works. COMPOSE_BAKE=false only swaps that for
# a deprecation warning, so it is not set.

#!/usr/bin/env bash
# Build the local base image (default nestmmu/base:bookworm) from Debian packages.
#
# Why: the machines this project runs on have a Docker engine but no container
# registry, so no image (not even python:3.11-slim) can be pulled. We build a
# minimal Debian bookworm root filesystem with mmdebstrap (python3 is 3.11 = cp311
# there) and `docker import` it. See deploy/README.md.
#
# Idempotent: does nothing if the image already exists (FORCE=1 to rebuild).
#
# Env:
#   BASE_IMAGE     tag to produce            (default nestmmu/base:bookworm)
#   APT_SOURCES    apt sources file to use   (default: the host's debian.sources)
#   FORCE=1        rebuild even if present
set -euo pipefail

BASE_IMAGE="${BASE_IMAGE:-nestmmu/base:bookworm}"
SUITE="${SUITE:-bookworm}"

log() { printf '[build-base] %s\n' "$*" >&2; }

# Debian packages in the base: python3 (3.11) for the services, iproute2 for `tc` (the
# chaos campaign's netem faults run `tc qdisc` in the containers, which have NET_ADMIN).
PACKAGES="python3,python3-venv,ca-certificates,iproute2"

# An existing image is kept only if it was built with this package list (label below).
if [[ "${FORCE:-0}" != 1 ]] && have=$(docker image inspect -f '{{index .Config.Labels "org.nestmmu.base.packages"}}' "$BASE_IMAGE" 2>/dev/null); then
    if [[ "$have" == "$PACKAGES" ]]; then
        log "$BASE_IMAGE already exists; skipping (FORCE=1 to rebuild)"
        exit 0
    fi
    log "$BASE_IMAGE has packages '${have:-<unlabelled>}', want '$PACKAGES': rebuilding"
fi

# mmdebstrap does not read the host's apt configuration: hand it the host's
# sources file as the mirror, otherwise it goes to hosts we may not reach.
if [[ -z "${APT_SOURCES:-}" ]]; then
    for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
        if [[ -s "$f" ]]; then APT_SOURCES="$f"; break; fi
    done
fi
if [[ -z "${APT_SOURCES:-}" || ! -s "$APT_SOURCES" ]]; then
    log "no apt sources file found; set APT_SOURCES=/path/to/sources"
    exit 1
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then SUDO=(sudo); fi

if ! command -v mmdebstrap >/dev/null 2>&1; then
    log "installing mmdebstrap"
    "${SUDO[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq mmdebstrap >/dev/null
fi

HOOKS=/usr/share/mmdebstrap/hooks/merged-usr
if [[ ! -d "$HOOKS" ]]; then
    log "missing $HOOKS (mmdebstrap too old?)"
    exit 1
fi

log "building $BASE_IMAGE from $SUITE using $APT_SOURCES"
start=$(date +%s)
# Without the merged-usr hook apt pulls in usrmerge + perl (+50 MB).
# pipefail makes a failing mmdebstrap fail the whole pipeline.
"${SUDO[@]}" mmdebstrap --quiet --variant=apt \
    --hook-dir="$HOOKS" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --aptopt='APT::Install-Recommends "false"' \
    --include="$PACKAGES" \
    "$SUITE" - "$APT_SOURCES" \
  | docker import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' \
        --change "LABEL org.nestmmu.base.packages=$PACKAGES" \
        --message "nestmmu base: mmdebstrap $SUITE + python3" \
        - "$BASE_IMAGE" >/dev/null

# Sanity check: the interpreter must be CPython 3.11 (wheels are cp311).
docker run --rm "$BASE_IMAGE" python3 -c 'import sys, venv; assert sys.version_info[:2] == (3, 11), sys.version' 
log "built $BASE_IMAGE in $(( $(date +%s) - start ))s"

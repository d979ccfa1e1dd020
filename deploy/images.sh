#!/usr/bin/env bash
# One-time (and cached) step before anything runs containers:
#   1. Compose v2 available            (deploy/ensure-compose.sh)
#   2. base image                      (deploy/build-base.sh, skipped if present
#                                        or if BASE_IMAGE is a public image)
#   3. wheelhouse                      (deploy/build-wheelhouse.sh)
#   4. the service image               (`docker compose build l0`, i.e. with the
#                                        same builder and cache `up` uses)
# Prints the image tag on stdout; progress goes to stderr.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=deploy/env.sh
source deploy/env.sh
log() { printf '[images] %s\n' "$*" >&2; }

t0=$(date +%s)
bash deploy/ensure-compose.sh
if [[ "$BASE_IMAGE" == nestmmu/base:* ]]; then
    bash deploy/build-base.sh
else
    log "using BASE_IMAGE=$BASE_IMAGE (pulled by the build if not present)"
fi
t1=$(date +%s)
bash deploy/build-wheelhouse.sh
t2=$(date +%s)
log "building $NESTMMU_IMAGE on $BASE_IMAGE"
docker compose -f docker-compose.yml build --quiet l0 >&2
# A rebuild leaves the previous image untagged; drop such dangling images of
# ours only (label set in deploy/Dockerfile), never anybody else's.
docker image prune --force --filter label=org.opencontainers.image.title=nestmmu >/dev/null
t3=$(date +%s)
log "done: base $((t1 - t0))s, wheelhouse $((t2 - t1))s, image $((t3 - t2))s"
echo "$NESTMMU_IMAGE"

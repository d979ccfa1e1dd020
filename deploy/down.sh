#!/usr/bin/env bash
# Stop and remove the cluster's containers and network (images are kept).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=deploy/env.sh
source deploy/env.sh
docker compose down --remove-orphans --volumes --timeout 10

#!/usr/bin/env bash
# Start the cluster (l0, l1a, l1b, l2), wait until every server is healthy,
# then run the one-shot workload and show its report. The cluster keeps
# running; stop it with `make down` (deploy/down.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=deploy/env.sh
source deploy/env.sh

bash deploy/images.sh >/dev/null
docker compose up --detach --wait l0 l1a l1b l2
# Attached one-shot: its output is the workload report; exit code is its own.
docker compose up --no-log-prefix --exit-code-from workload workload
docker compose ps
cat <<MSG

The cluster is running (ports on 127.0.0.1: l0 ${L0_HOST_PORT-50051}, l1a ${L1A_HOST_PORT-50052}, l1b ${L1B_HOST_PORT-50054}, l2 ${L2_HOST_PORT-50053}).
  logs:     docker compose logs -f
  workload: docker compose up --no-log-prefix workload
  stop:     make down
MSG

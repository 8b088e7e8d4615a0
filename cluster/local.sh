#!/usr/bin/env bash
# Single-machine bring-up: the embedded S3 server and a Ray cluster with a job API, both on 127.0.0.1, so the
# cluster workflow (`pagoda launch ray`, `ray job submit`) runs unchanged on one machine.
#
#   eval "$(bash cluster/local.sh up)"         # start; exports RAY_ADDRESS, RAY_API_SERVER_ADDRESS, auth settings
#   pagoda launch ray configs/tiny.yaml         # submit to it (address from RAY_API_SERVER_ADDRESS)
#   bash cluster/local.sh status
#   bash cluster/local.sh down                 # stop both (by PID)
#
# Extra arguments after `up` go to the Ray cluster, e.g. `up --workers 2 --cpus 1 --head-cpus 1` for three
# 1-CPU nodes; `kill worker-1` then takes one node down with all its processes (a multi-node drill on one
# machine: the run resumes from its last committed checkpoint on the nodes left).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ACTION="${1:-up}"
shift || true
STATE="$ROOT/work/local-cluster.json"

# The project's environment (created on first use; quick when it is up to date). Its messages go to stderr so
# that stdout carries only the exports.
# shellcheck disable=SC1091
. "$ROOT/scripts/env.sh" >&2

case "$ACTION" in
  up)
    python -m pagoda_dist.cli s3 up >&2
    python -m pagoda_dist.launch.local_cluster up --state "$STATE" "$@"
    ;;
  down)
    python -m pagoda_dist.launch.local_cluster down --state "$STATE"
    python -m pagoda_dist.cli s3 down
    ;;
  status)
    python -m pagoda_dist.cli s3 status || true
    python -m pagoda_dist.launch.local_cluster status --state "$STATE"
    ;;
  kill)
    python -m pagoda_dist.launch.local_cluster kill --state "$STATE" "$@"
    ;;
  *)
    echo "usage: bash cluster/local.sh up [--workers K --cpus C --head-cpus H] | status | kill NODE | down" >&2
    exit 2
    ;;
esac

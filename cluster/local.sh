#!/usr/bin/env bash
# Single-machine bring-up: the embedded S3 server and a Ray cluster with a job API, both on 127.0.0.1, so the
# cluster workflow (`pagoda launch ray`, `ray job submit`) runs unchanged on one machine.
#
#   eval "$(bash cluster/local.sh up)"         # start; exports RAY_ADDRESS, RAY_API_SERVER_ADDRESS, auth settings,
#                                               # AWS_ENDPOINT_URL, AWS_REGION, AWS_SHARED_CREDENTIALS_FILE
#   pagoda launch ray configs/tiny.yaml         # submit to it (address from RAY_API_SERVER_ADDRESS)
#   bash cluster/local.sh status
#   bash cluster/local.sh down                 # stop both (by PID)
#
# The Ray nodes run with the S3 variables above (the key pair stays in its 0600 file; only its path is set), so a
# job's driver and workers reach the S3 server whether the job's config starts the embedded server
# (`storage.embedded_s3=true`: the driver joins this one) or not (`storage.embedded_s3=false`: the endpoint and
# credentials file come from the node's environment). `up --s3-port N` puts the S3 server on ports N..N+9 instead
# of the config default (8333); jobs then need `storage.embedded_s3_port=N` too. Other arguments after `up` go to
# the Ray cluster, e.g. `up --workers 2 --cpus 1 --head-cpus 1` for three 1-CPU nodes; `kill worker-1` then takes
# one node down with all its processes (a multi-node drill on one machine: the run resumes from its last
# committed checkpoint on the nodes left).
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
    s3_args=()
    ray_args=()
    while [ "$#" -gt 0 ]; do
      case "$1" in
        --s3-port) s3_args+=("storage.embedded_s3_port=${2:?--s3-port needs a port}"); shift 2 ;;
        --s3-port=*) s3_args+=("storage.embedded_s3_port=${1#*=}"); shift ;;
        *) ray_args+=("$1"); shift ;;
      esac
    done
    python -m pagoda_dist.cli s3 up "${s3_args[@]}" >&2
    # Where the server runs, as exports: endpoint, region and the path of its credentials file (never the keys).
    s3_exports="$(python - "${s3_args[@]}" <<'PY'
import shlex
import sys

from pagoda_dist.config import load_config
from pagoda_dist.storage.local_s3 import LocalS3Server

s = load_config(None, sys.argv[1:]).storage
server = LocalS3Server(s.embedded_s3_dir, s.embedded_s3_port)
env = {**server.env(include_secret=False), "AWS_ENDPOINT_URL": server.status().endpoint}  # the port it runs on
print("\n".join(f"export {name}={shlex.quote(value)}" for name, value in env.items()))
PY
)"
    # The Ray nodes inherit these; a key pair or profile in this shell would win over the credentials file there.
    unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_PROFILE AWS_ENDPOINT_URL_S3
    eval "$s3_exports"
    python -m pagoda_dist.launch.local_cluster up --state "$STATE" "${ray_args[@]}"
    echo "$s3_exports"
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
    echo "usage: bash cluster/local.sh up [--s3-port N] [--workers K --cpus C --head-cpus H] | status | kill NODE |" \
      "down" >&2
    exit 2
    ;;
esac

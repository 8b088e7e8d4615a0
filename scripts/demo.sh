#!/usr/bin/env bash
# Set up (idempotent) and run the whole PaGoDA chain on the embedded default: configs/tiny.yaml with a local Ray
# and the embedded S3 server. The same command resumes an interrupted run. Extra arguments are config overrides,
# e.g. `bash scripts/demo.sh run.name=second teacher.train.total_kimg=100`.
set -euo pipefail
. "$(dirname "$0")/env.sh"
cd "$ROOT"
pagoda run configs/tiny.yaml "$@"

#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. Extra arguments go to pytest, e.g. `bash scripts/test.sh -k config`.
set -euo pipefail
. "$(dirname "$0")/env.sh"
cd "$ROOT"
python -m pytest "$@"

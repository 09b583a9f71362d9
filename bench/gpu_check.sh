#!/usr/bin/env bash
# One prepared run on a lent GPU machine (torch and timm, no faiss/open_clip/Snakemake, no
# network): the GPU, then bench/gpu_check.py. Output goes to stdout and, when the device tool
# set $OUT, to $OUT/gpu_check.txt for the README.
#   bash bench/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}/gpu_check.txt"
# Wheels carried to the machine (it has no network): on a machine with one,
#   pip download --no-deps -d bench/wheels open_clip_torch ftfy wcwidth
# (a few MB; git-ignored; faiss's GPU wheel is far above the 64 MiB a run may carry), then run
# with carry: ["bench/wheels"]. Installed into a user site here, nothing else is touched.
if compgen -G "bench/wheels/*.whl" > /dev/null; then
  python -m pip install --quiet --user --no-index --no-deps bench/wheels/*.whl 2>&1 | tail -2
fi
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
  python -c "import sys; print('python', sys.version.split()[0])"
  timeout 290 python bench/gpu_check.py "$@"
  echo "exit status $?"
} 2>&1 | tee "$out"

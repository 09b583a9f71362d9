#!/usr/bin/env bash
# One prepared run on a lent GPU machine (torch and timm, no faiss/open_clip/Snakemake, no
# network): the GPU, then bench/gpu_check.py. Output goes to stdout and, when the device tool
# set $OUT, to $OUT/gpu_check.txt for docs/gpu-check.md.
#   bash bench/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}/gpu_check.txt"
# Wheels carried to the machine (it has no network): on a machine with one,
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_17_x86_64 -d bench/wheels open_clip_torch ftfy wcwidth \
#     jsonschema jsonschema-specifications referencing rpds-py webdataset braceexpand
# (a few MB; git-ignored; faiss's GPU wheel is far above the 64 MiB a run may carry), then run
# with carry: ["bench/wheels"]. jsonschema and webdataset are what the train stage needs; open_clip
# makes the embedding rate the embed stage's own model. Installed into a folder of their own on
# PYTHONPATH (the machine's python is a virtualenv, where pip refuses --user); nothing else moves.
python=$(command -v python || command -v python3)
if compgen -G "bench/wheels/*.whl" > /dev/null; then
  "$python" -m pip install --quiet --upgrade --no-index --no-deps --no-compile --target /tmp/gpu_check_site \
    bench/wheels/*.whl 2>&1 | tail -2
  export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
  "$python" -c "import sys; print('python', sys.version.split()[0])"
  timeout 420 "$python" bench/gpu_check.py "$@"
  echo "exit status $?"
} 2>&1 | tee "$out"

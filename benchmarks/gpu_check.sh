#!/usr/bin/env bash
# The GPU checks of the Triton kernel in one go, sized for a few minutes of a lent H100/H200:
# its timings against SDPA and the merged-state path, the exactness tests compiled in every dtype,
# and a short tile sweep. Results (JSON and logs) go to OUT_DIR; nothing is written elsewhere.
#
#   bash benchmarks/gpu_check.sh OUT_DIR        (from the repository root; needs torch, triton, peft, transformers)
#
# Each step has its own time limit, so one that hangs or fails leaves the others' results.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
timeout 150 python3 benchmarks/triton_kernel.py --out "$out/bench.json" --lengths 2048 8192 16384 2>&1 | tee "$out/bench.log"
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 16")
(cd tests/ops && timeout 150 python3 -m pytest test_triton.py -q -p no:cacheprovider $xdist -W ignore --tb=line -rf 2>&1) \
    | tee "$out/tests.log" | tail -25
timeout 120 python3 benchmarks/triton_kernel.py --out "$out/sweep.json" --dtypes bfloat16 --head-dims 64 128 \
    --lengths 8192 --sweep --sweep-seconds 100 2>&1 | tee "$out/sweep.log" | grep -v "^  sweep" | tail -8

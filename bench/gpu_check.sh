#!/usr/bin/env bash
# Everything the GPU path needs measured, in one call on a lent GPU machine (under 8 minutes on an
# H100-class GPU; issue 17). Run from the repository root:
#
#   bash bench/gpu_check.sh [OUT_DIR]        # default: $OUT, else bench/results
#
# 1. the kernel tests on the GPU (no interpreter): fused merge == C loop, TIES cuts, grouped launch,
#    no host synchronisation inside a launch (torch.cuda.set_sync_debug_mode("error"));
# 2. bench/test_triton_kernel.py: GB/s of the fused kernel per method with mergekit's default
#    options (dare_ties: l1 rescale; ties), K = 2..8, against the measured device copy bandwidth,
#    and a 3-source 7B-shaped merge in memory (grouped launch; target < 100 ms);
# 3. the launch-configuration sweep (BLOCK x num_warps per K and dtype) behind fused_ta.launch_config;
# 4. streaming merges of the 245M bf16 family: --device cuda against the machine's CPU cores.
# Results (CSV + PNG + logs) go to OUT_DIR/gpu_<gpu name>/. A missing Python package (the device
# image has torch, triton, transformers; not pydantic) is installed from wheels carried in .wheels/.
set -uo pipefail
cd "$(dirname "$0")/.."
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '_' | tr 'A-Z' 'a-z')
dest="${1:-${OUT:-bench/results}}/gpu_${gpu:-unknown}"
mkdir -p "$dest"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 FASTMERGE_BENCH_OUT="$dest"
unset TRITON_INTERPRET
if [ -d .wheels ]; then python3 -m pip install -q --no-index --find-links .wheels -r .wheels/requirements.txt; fi
{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  > "$dest/env.txt" 2>&1
status=0
step() { echo "== $1 ($(date -u +%T))"; shift; timeout "$@" || { echo "   failed: rc $?"; status=1; }; }
step "kernel tests" 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_kernels_grouped.py \
  tests/test_kernels_select.py tests/test_ties_exact.py 2>&1 | tail -n 30 > "$dest/tests.log"
step "kernel bandwidth + 7B in memory" 200 python3 -m pytest -q -s -p no:cacheprovider bench/test_triton_kernel.py \
  --benchmark-disable 2>&1 | tail -n 60 > "$dest/bench.log"
step "streaming merge, cuda vs cpu" 150 python3 bench/gpu_stream_merge.py --out "$dest" --reps 2 2>&1 | tail -n 30 \
  > "$dest/stream.log"
cat "$dest"/*.log
exit $status

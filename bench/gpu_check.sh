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
if [ -d .wheels ]; then
  # beside the image's packages, not into its environment (the device notes' way)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fastmerge-site .wheels/*.whl \
    && export PYTHONPATH="$PWD:/tmp/fastmerge-site"
fi
# fastmerge.kernels is the top-level kernels/ folder (pyproject's package-dir mapping), so a source tree
# without an install lacks it: a link in this copy of the tree makes PYTHONPATH=$PWD enough
if ! python3 -c "import fastmerge.kernels" 2>/dev/null; then
  ln -sn ../kernels fastmerge/kernels && trap 'rm -f fastmerge/kernels' EXIT
fi
python3 -c "import fastmerge.kernels, fastmerge.recipe" || { echo "gpu_check: fastmerge does not import"; exit 2; }
{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  > "$dest/env.txt" 2>&1
status=0
# step NAME LOG SECONDS CMD...: CMD's whole output to $dest/LOG, its tail to the terminal; a failure (or
# its timeout, rc 124) is reported and turns the script's exit status to 1, and the next step still runs
step() {
  local name=$1 log=$2; shift 2
  echo "== $name ($(date -u +%T))"
  timeout "$@" > "$dest/$log" 2>&1
  local rc=$?
  tail -n 40 "$dest/$log"
  if [ $rc -ne 0 ]; then echo "   $name failed: rc $rc (whole log: $log)"; status=1; fi
}
# Every kernel variant compiles on first use (a cold Triton cache: a few hundred compiles for the
# tests): with pytest-xdist (in the device image) 8 processes compile side by side, and the bench
# after them finds most of its kernels in the cache.
parallel=()
python3 -c "import xdist" 2>/dev/null && parallel=(-n 8)
step "kernel tests" tests.log 150 python3 -m pytest -q "${parallel[@]}" -p no:cacheprovider tests/test_kernels.py \
  tests/test_kernels_grouped.py tests/test_kernels_select.py tests/test_ties_exact.py
# rows reach the CSV as they are measured: the 7B merge first, then bandwidth, then the config sweep
step "kernel bandwidth + 7B in memory" bench.log 200 python3 -m pytest -q -s -p no:cacheprovider \
  bench/test_triton_kernel.py
step "streaming merge, cuda vs cpu" stream.log 150 python3 bench/gpu_stream_merge.py --out "$dest" --reps 2
echo "gpu_check: results in $dest (exit $status)"
exit $status

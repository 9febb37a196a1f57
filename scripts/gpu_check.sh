#!/usr/bin/env bash
# CUDA backend validation in one device call: build (sm_90a only unless JAX_MAMBA_CUDA_ARCHS is
# set), the GPU correctness grid (scripts/sanitize_cases.py --grid, then its small half with
# multi-row lanes forced), the GPU half of the test suite, and compute-sanitizer memcheck /
# racecheck on the small case set. Stages stop starting once BUDGET seconds (default 400) are
# used. Logs go to $OUT (or ./gpu_out); a short summary is printed last.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-400}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
stage_timeout() {  # min(wanted, time left - 10)
  local want=$1 l; l=$(( $(left) - 10 )); [ "$l" -lt "$want" ] && want=$l; echo "$want"
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader \
  > "$OUT/gpu.txt" 2>&1
summary "card: $(head -1 "$OUT/gpu.txt")"

t=$(date +%s)
export JAX_MAMBA_CUDA_ARCHS=${JAX_MAMBA_CUDA_ARCHS:-90a}
CMAKE_ARGS="-DJAX_MAMBA_CUDA_VERBOSE_PTXAS=ON" \
  pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1; rc=$?
summary "build (archs $JAX_MAMBA_CUDA_ARCHS): rc=$rc in $(( $(date +%s) - t )) s"
if [ $rc -ne 0 ]; then grep -E "error|Error" "$OUT/build.log" | head -30; tail -30 "$OUT/build.log"; exit 1; fi
grep -E "ptxas info|bytes stack frame" "$OUT/build.log" > "$OUT/ptxas.txt" || true
summary "ptxas: $(grep -c 'Used' "$OUT/ptxas.txt") kernels, $(grep -E 'spill (stores|loads)' "$OUT/ptxas.txt" | grep -vc ' 0 bytes spill stores, 0 bytes spill loads') with spills/stack"
python -c "import jax_mamba, jax; print('HAS_CUDA', jax_mamba.HAS_CUDA, jax.devices())" 2>&1 | tee -a "$OUT/summary.txt"

run_stage() {  # name, max seconds, command...
  local name=$1 want=$2; shift 2
  local to; to=$(stage_timeout "$want")
  if [ "$to" -lt 20 ]; then summary "$name: skipped (budget)"; return; fi
  local t=$(date +%s)
  timeout "$to" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  summary "$name: rc=$rc in $(( $(date +%s) - t )) s: $(grep -E '==== summary|passed|failed|ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$name.log" | tail -1)"
  grep -E "^FAIL |^FAILED" "$OUT/$name.log" | head -15
}

run_stage cases_small 60 python scripts/sanitize_cases.py
run_stage grid 170 python scripts/sanitize_cases.py --grid
JAX_MAMBA_CUDA_ROWS=4 run_stage grid_rows4 90 python scripts/sanitize_cases.py --grid --small
run_stage pytest_gpu ${PYTEST_TIMEOUT:-150} python -m pytest -q -p no:cacheprovider -k gpu tests

if command -v compute-sanitizer > /dev/null; then
  filt=()
  compute-sanitizer --help 2>&1 | grep -q -- "--kernel-name" && filt=(--kernel-name kns=ssu_)
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  for tool in memcheck racecheck; do
    run_stage "sanitize_$tool" 90 compute-sanitizer --tool $tool "${filt[@]}" --error-exitcode 9 \
      python scripts/sanitize_cases.py
  done
else
  summary "compute-sanitizer: not found"
fi
summary "total: $(( $(date +%s) - T0 )) s"
echo "==== summary"; cat "$OUT/summary.txt"

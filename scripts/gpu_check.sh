#!/usr/bin/env bash
# CUDA backend validation in one device call: CMake build (sm_90a only unless JAX_MAMBA_CUDA_ARCHS
# is set), the GPU correctness grid (scripts/sanitize_cases.py --grid, then its small half with
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

# Build with CMake directly (the same CMakeLists.txt pip/scikit-build-core drives) and drop the
# modules into ./jax_mamba, so the checks import this tree regardless of pip/site-packages.
# (On the device machine a bare `pip` is the system pip (/usr/local/lib/python3.12), not the
# venv of `python`, and `pip install --no-build-isolation .` fails there with "Cannot import
# 'scikit_build_core.build'"; `python -m pip` is the venv's.)
probe=$(python -c "import scikit_build_core.build; print('scikit_build_core.build imports')" 2>&1 | tail -1)
summary "python: $(command -v python) $(python -V 2>&1); python -m pip: $(python -m pip -V 2>&1 | cut -c1-50); pip on PATH: $(pip -V 2>&1 | cut -c1-60); probe: $probe"
t=$(date +%s)
ARCHS=${JAX_MAMBA_CUDA_ARCHS:-90a}
BDIR=build/gpu_check
{ cmake -S . -B "$BDIR" -DSKBUILD_PROJECT_NAME=jax_mamba -DJAX_MAMBA_CUDA=ON \
    -DPython_EXECUTABLE="$(command -v python)" -Dnanobind_DIR="$(python -m nanobind --cmake_dir)" \
    -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" -DCMAKE_BUILD_TYPE=Release -DJAX_MAMBA_CUDA_VERBOSE_PTXAS=ON \
  && cmake --build "$BDIR" -j 16 && cp "$BDIR"/_cpu*.so "$BDIR"/_cuda*.so jax_mamba/; } \
  > "$OUT/build.log" 2>&1; rc=$?
summary "build (cmake, archs $ARCHS): rc=$rc in $(( $(date +%s) - t )) s"
if [ $rc -ne 0 ]; then grep -E "error|Error" "$OUT/build.log" | head -30; tail -30 "$OUT/build.log"; exit 1; fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
grep -E "ptxas info|bytes stack frame" "$OUT/build.log" > "$OUT/ptxas.txt" || true
summary "ptxas: $(grep -c 'Used' "$OUT/ptxas.txt") kernels, $(grep -E 'spill (stores|loads)' "$OUT/ptxas.txt" | grep -vc ' 0 bytes spill stores, 0 bytes spill loads') with spills"
python -c "import jax_mamba, jax; print('HAS_CUDA', jax_mamba.HAS_CUDA, jax_mamba.__file__, jax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/summary.txt"

# All stage logs go into one file ($OUT/stages.log): the device returns only a few files.
run_stage() {  # name, max seconds, command...
  local name=$1 want=$2; shift 2
  local to; to=$(stage_timeout "$want")
  if [ "$to" -lt 20 ]; then summary "$name: skipped (budget)"; return; fi
  local t=$(date +%s) log="$OUT/.stage.tmp"
  timeout "$to" "$@" > "$log" 2>&1; local rc=$?
  { echo "===================== $name (rc=$rc)"; cat "$log"; } >> "$OUT/stages.log"
  summary "$name: rc=$rc in $(( $(date +%s) - t )) s: $(grep -E '==== summary|passed|failed|ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)"
  grep -E "^FAIL |^FAILED|^E  " "$log" | head -30
  rm -f "$log"
}

run_stage cases_small 60 python scripts/sanitize_cases.py
run_stage grid 170 python scripts/sanitize_cases.py --grid
JAX_MAMBA_CUDA_ROWS=4 run_stage grid_rows4 90 python scripts/sanitize_cases.py --grid --small
run_stage pytest_gpu ${PYTEST_TIMEOUT:-150} python -m pytest -q -rf --tb=short -p no:cacheprovider -k gpu tests

if command -v compute-sanitizer > /dev/null; then
  filt=()
  compute-sanitizer --help 2>&1 | grep -q "kns=" && filt=(--kernel-name kns=ssu_)
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  for tool in memcheck racecheck; do
    run_stage "sanitize_$tool" 90 compute-sanitizer --tool $tool "${filt[@]}" --error-exitcode 9 \
      python scripts/sanitize_cases.py
  done
else
  summary "compute-sanitizer: not found"
fi
# a first performance look (the package's benchmark), if time is left
run_stage bench_bf16 45 python -m jax_mamba.benchmark --state-dtype bfloat16 --batch 1 64 --reps 5 --impl ffi
run_stage bench_f32 35 python -m jax_mamba.benchmark --state-dtype float32 --input-dtype float32 --batch 1 64 --reps 5 --impl ffi
sed -n '/== bench_/,$p' "$OUT/stages.log" | grep -E "^(device|case|b[0-9])" | tail -12
summary "total: $(( $(date +%s) - T0 )) s"
echo "==== summary"; cat "$OUT/summary.txt"

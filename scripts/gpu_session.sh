#!/usr/bin/env bash
# One device call: CMake build (sm_90a), GPU tests, compute-sanitizer on the small case set,
# kernel timings (scripts/gpu_perf.py, variants through JAX_MAMBA_CUDA_ROWS) and ncu kernel
# times. Stages: STAGES="build tests sanitize perf ncu" (default all). Logs go to $OUT (or
# ./gpu_out) as few files (the device returns at most 8); a short table is printed last.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
STAGES=${STAGES:-"build tests sanitize perf ncu"}
LOG="$OUT/stages.log"
T0=$(date +%s)
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }
stage() {  # name, timeout, command...
  local name=$1 to=$2; shift 2
  local t=$(date +%s)
  { echo "===================== $name"; timeout "$to" "$@"; echo "rc=$?"; } >> "$LOG" 2>&1
  summary "$name: $(tail -1 "$LOG") in $(( $(date +%s) - t )) s"
}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
summary "card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
summary "commit: $(git rev-parse --short HEAD 2>/dev/null) $(git status --short | wc -l) files changed"

BDIR=build/gpu
if has build; then
  t=$(date +%s)
  { cmake -S . -B "$BDIR" -DSKBUILD_PROJECT_NAME=jax_mamba -DJAX_MAMBA_CUDA=ON \
      -DPython_EXECUTABLE="$(command -v python)" -Dnanobind_DIR="$(python -m nanobind --cmake_dir)" \
      -DCMAKE_CUDA_ARCHITECTURES=90a -DCMAKE_BUILD_TYPE=Release -DJAX_MAMBA_CUDA_VERBOSE_PTXAS=ON \
    && cmake --build "$BDIR" -j 16 && cp "$BDIR"/_cpu*.so "$BDIR"/_cuda*.so jax_mamba/; } \
    > "$OUT/build.log" 2>&1; rc=$?
  summary "build: rc=$rc in $(( $(date +%s) - t )) s"
  [ $rc -eq 0 ] || { grep -E "error" "$OUT/build.log" | head -20; exit 1; }
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python -c "import jax, jax_mamba; print('jax', jax.__version__, 'HAS_CUDA', jax_mamba.HAS_CUDA, jax.devices())" \
  2>&1 | tee -a "$OUT/summary.txt"

if has tests; then
  stage pytest_gpu "${TEST_TIMEOUT:-300}" python -m pytest -q -x -rf -p no:cacheprovider -k "gpu" ${TEST_FILES:-tests}
  grep -E "^FAILED|^E  " "$LOG" | head -20
  JAX_MAMBA_CUDA_ROWS=1 stage pytest_rows1 120 python -m pytest -q -x -p no:cacheprovider -k "gpu" \
    tests/test_algorithms.py tests/test_ops.py
  stage cases_small 120 python scripts/sanitize_cases.py
  grep -E "^FAIL" "$LOG" | head -20
fi
if has sanitize; then
  filt=(); compute-sanitizer --help 2>&1 | grep -q "kns=" && filt=(--kernel-name kns=ssu_)
  stage memcheck 200 compute-sanitizer --tool memcheck "${filt[@]}" --error-exitcode 9 \
    python scripts/sanitize_cases.py
  grep -E "ERROR SUMMARY|^FAIL" "$LOG" | tail -3
fi
if has perf; then
  copy=$(python -c "import sys; sys.path.insert(0, 'scripts'); import gpu_perf; print(f'{gpu_perf.torch_copy_gbs():.0f}')" 2>>"$LOG")
  summary "torch copy 2 GiB: $copy GB/s (read + write)"
  CASES=${CASES:-"b1-bf16 b8-bf16 b64-bf16 b256-bf16 b64-f16 b64-f32 b256-f32 b64-bf16-P128 b64-bf16-H80-G1 b64-f32-H80-G1 b128-bf16-H128 b64-bf16-T4-inter b64-f32-T6-inter b64-bf16-T6-inter b64-i16 b64-f16-sr b64-f32-mamba1-P8192-N16"}
  # shellcheck disable=SC2086
  TAG=auto stage perf_auto 400 python scripts/gpu_perf.py --copy "$copy" $CASES
  for v in ${ROWS_VARIANTS:-}; do
    TAG=rows$v JAX_MAMBA_CUDA_ROWS=$v stage "perf_rows$v" 120 python scripts/gpu_perf.py --copy "$copy" \
      b1-bf16 b64-bf16 b256-bf16 b64-f32
  done
  for a in ${ALG_VARIANTS:-}; do
    TAG=$a stage "perf_$a" 120 python scripts/gpu_perf.py --copy "$copy" b1-bf16-alg=$a b64-bf16-alg=$a \
      b64-f32-alg=$a
  done
fi
if has ncu && command -v ncu > /dev/null; then
  for cs in ${NCU_CASES:-b64-bf16 b1-bf16}; do
    stage "ncu_$cs" 150 ncu --clock-control none --kernel-name regex:ssu_ --launch-skip 40 --launch-count 4 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section MemoryWorkloadAnalysis python scripts/gpu_perf.py "$cs"
  done
  grep -E "ssu_|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Stall|Block Size|Grid Size" "$LOG" \
    | grep -v "^ROW" | sed -n '1,400p' > "$OUT/ncu_brief.txt"
fi
echo "==== rows"; grep "^ROW" "$LOG"
echo "==== summary"; cat "$OUT/summary.txt"; echo "total $(( $(date +%s) - T0 )) s"

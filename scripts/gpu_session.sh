#!/usr/bin/env bash
# One device call: build with CUDA, run the whole test suite on the GPU, the sanitizers, the
# example and (BENCH=1) the benchmark. Logs go to $OUT (or ./gpu_out); a short table is printed last.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader > "$OUT/gpu.txt" 2>&1
summary "card: $(head -1 "$OUT/gpu.txt")"
t0=$(date +%s)
python -m pip install --no-build-isolation -v . > "$OUT/build.log" 2>&1; rc=$?
summary "build: rc=$rc in $(( $(date +%s) - t0 )) s"
[ $rc -eq 0 ] || { tail -40 "$OUT/build.log"; exit 1; }
REPO=$PWD
RUN=$(mktemp -d); cd "$RUN"  # outside the repo, so `import jax_mamba` is the installed package
python -c "import jax_mamba, jax; print('HAS_CUDA', jax_mamba.HAS_CUDA, jax_mamba.__file__, jax.devices())" 2>&1 | tee -a "$OUT/summary.txt"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  t0=$(date +%s)
  timeout ${TEST_TIMEOUT:-420} python -m pytest -q -p no:cacheprovider -rf ${PYTEST_ARGS:-"$REPO/tests"} > "$OUT/pytest.log" 2>&1
  summary "pytest: rc=$? in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/pytest.log")"
  grep -E "^FAILED|^ERROR" "$OUT/pytest.log" | head -20
  # vertical with the smallest tiles and one row per lane group: the stage ring wraps many times
  t0=$(date +%s)
  JAX_MAMBA_CUDA_VTILES=64 JAX_MAMBA_CUDA_ROWS=1 timeout 200 python -m pytest -q -p no:cacheprovider \
    -rf "$REPO/tests/test_algorithms.py" -k vertical > "$OUT/pytest_vertical_wrap.log" 2>&1
  summary "pytest vertical ring-wrap: rc=$? in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/pytest_vertical_wrap.log")"
fi
if [ "${SANITIZE:-0}" = 1 ]; then
  for tool in memcheck racecheck; do
    timeout 300 compute-sanitizer --tool $tool --error-exitcode 9 python "$REPO/scripts/sanitize_cases.py" \
      > "$OUT/sanitize_$tool.log" 2>&1
    summary "compute-sanitizer $tool: rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -1)"
  done
fi
if [ "${EXAMPLE:-1}" = 1 ]; then
  python "$REPO/examples/decode_loop.py" --batch 64 --slots 512 --heads 64 --dim 64 --dstate 128 \
    --ngroups 8 --layers 4 --steps 16 > "$OUT/example.log" 2>&1
  summary "example: $(tail -2 "$OUT/example.log" | tr '\n' ' ')"
fi
if [ "${BENCH:-0}" = 1 ]; then
  cases=("--state-dtype bfloat16" "--state-dtype float32 --input-dtype float32"
         "--state-dtype float16 --sr" "--state-dtype int16" "--state-dtype bfloat16 --mtp 4 --inter"
         "--mamba1 --dim 8192 --dstate 16 --state-dtype float32 --input-dtype float32")
  for args in "${cases[@]}"; do
    # shellcheck disable=SC2086
    python -m jax_mamba.benchmark $args --batch 1 8 64 256 --reps 10 >> "$OUT/bench.log" 2>&1
  done
  cat "$OUT/bench.log"
fi
echo "==== summary"; cat "$OUT/summary.txt"

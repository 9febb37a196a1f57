#!/usr/bin/env bash
# Kernel iteration in one device call: build (sm_90a), ptxas summary of the fast path, the GPU
# correctness subset, then scripts/fast_harness.py per variant (one process each: the variant
# switches are read once per process). Run it in the tree scripts/export_clean.sh exports (the
# committed HEAD, carried as build/clean): the device's .git may be older than the checkout, so
# restoring files from its HEAD is not safe. NCU="case ..." and CLI="case ..." add an ncu pass
# and the benchmark CLI (below).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
[ -f .export_commit ] && export JAX_MAMBA_GIT_COMMIT=$(cat .export_commit)
echo "code: ${JAX_MAMBA_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null) (working tree)}"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
# The fast path is the default (ffi/ssu_plan.cc); a variant with JAX_MAMBA_CUDA_FAST=0 times the
# fallback kernels.
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
t=$(date +%s)
BDIR=build/gpu
{ cmake -S . -B "$BDIR" -DSKBUILD_PROJECT_NAME=jax_mamba -DJAX_MAMBA_CUDA=ON \
    -DPython_EXECUTABLE="$(command -v python)" -Dnanobind_DIR="$(python -m nanobind --cmake_dir)" \
    -DCMAKE_CUDA_ARCHITECTURES=90a -DCMAKE_BUILD_TYPE=Release -DJAX_MAMBA_CUDA_VERBOSE_PTXAS=ON \
  && cmake --build "$BDIR" -j 16 && cp "$BDIR"/_cpu*.so "$BDIR"/_cuda*.so jax_mamba/; } > "$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t )) s"
awk '/Compiling entry function/ {f=$0} /spill stores/ && f ~ /ssu_fast/ && !/ 0 bytes spill stores/ {print "SPILL", f, $0}' "$OUT/build.log" | head
export PYTHONPATH=$PWD
if [ -n "${TESTS:-}" ]; then
  t=$(date +%s)
  timeout "${TEST_TIMEOUT:-240}" python -m pytest -q ${PYTEST_ARGS:--x} -p no:cacheprovider --tb=short $TESTS > "$OUT/tests.log" 2>&1
  echo "tests rc=$? in $(( $(date +%s) - t )) s: $(tail -1 "$OUT/tests.log")"
  grep -E "^FAILED|^E  " "$OUT/tests.log" | head -15
fi
run() { local tag=$1; shift; env JAX_MAMBA_UNUSED=1 "$@" TAG="$tag" timeout "${HARNESS_TIMEOUT:-150}" python scripts/fast_harness.py --reps "${REPS:-15}" $CASES 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tee -a "$OUT/harness.log"; }
[ -n "${COPY:-}" ] && python scripts/fast_harness.py --copy --reps 1 b1-bf16 2>&1 | grep torch
IFS=';' read -ra VARS <<< "${VARIANTS:-fast:JAX_MAMBA_CUDA_FAST=1}"
for v in "${VARS[@]}"; do  # tag:ENV=v ENV=v[:case case ...]
  tag=${v%%:*}; rest=${v#*:}; envs=${rest%%:*}; cases=$CASES
  [[ "$rest" == *:* ]] && cases=${rest#*:}
  CASES=$cases run "$tag" $envs
done
# NCU="case ...": ncu kernel time, DRAM %, warps active, grid and registers of every ssu_ kernel
# of a short harness run (CSV: $OUT/ncu.csv), to tell kernel time from per-call overhead.
if [ -n "${NCU:-}" ]; then
  # shellcheck disable=SC2086
  timeout "${NCU_TIMEOUT:-100}" ncu --clock-control none --kernel-name regex:ssu_ --csv --metrics \
    gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size,launch__block_size,launch__registers_per_thread \
    python scripts/fast_harness.py --reps 1 --calls 3 $NCU > "$OUT/ncu.csv" 2>&1
  echo "ncu rc=$?: $(grep -c '"gpu__time_duration.sum"' "$OUT/ncu.csv") kernel rows in ncu.csv"
fi
# CLI="case ...": the package's benchmark CLI on those cases (its ceiling, JSON in $OUT/cli.json)
if [ -n "${CLI:-}" ]; then
  args=(); for c in $CLI; do args+=(--case "$c"); done
  timeout "${CLI_TIMEOUT:-220}" python -m jax_mamba.benchmark --impl ffi --reps "${CLI_REPS:-7}" \
    --json "$OUT/cli.json" "${args[@]}" > "$OUT/cli.txt" 2>&1
  echo "cli rc=$?"; grep -v "^W0000\|^I0000\|^WARNING" "$OUT/cli.txt" | tail -40
fi

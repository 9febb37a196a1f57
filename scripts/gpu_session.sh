#!/usr/bin/env bash
# The GPU runner, one device call, from the repo root:
#   build      CMake build (sm_90a, or $JAX_MAMBA_CUDA_ARCHS) with the modules dropped into
#              ./jax_mamba; ptxas register / spill summary
#   tests      the GPU half of the test suite (-k gpu: every case on the GPU, the kernel case
#              grid of tests/test_kernel_cases.py included) except the tests that run child
#              processes, then with multi-row lanes forced (JAX_MAMBA_CUDA_ROWS=1 on the strategy
#              / op tests, =4 on the grid's small half). With pytest-xdist installed the suite
#              runs in TEST_WORKERS (default 4) processes sharing the GPU, the timing tests
#              (tests/test_benchmark.py) after it in one; TEST_WORKERS=1 runs all in one process
#              (about 250 s on an H100, 2026-12-08)
#   children   the GPU tests that run child processes: the fallback kernels re-running four test
#              files (tests/test_fallback_kernels.py) and the random degenerate shapes
#              (test_degenerate_property), in parallel like `tests` (one process: about 300 s
#              on an H100). Serially, `build tests children` does not fit one 600 s device call:
#              run `children` (or `sanitize racecheck perf`) in a second call right after the
#              first WITHOUT carry: the device keeps build/clean (ignored by git) and so the
#              modules built into build/clean/jax_mamba while it stays warm (30 s idle);
#              carrying build/clean again replaces it and drops them
#   sanitize   compute-sanitizer memcheck on the small case set (pytest -m sanitize -k gpu)
#   racecheck  the same under compute-sanitizer racecheck (not in the default STAGES)
#   perf       kernel timings by the package's benchmark CLI (python -m jax_mamba.benchmark;
#              the default (the fast path where it covers a case), then the fallback kernels:
#              JAX_MAMBA_CUDA_FAST=0, perf_fallback.json;
#              variants: ROWS_VARIANTS="1 2 4" through JAX_MAMBA_CUDA_ROWS, ALG_VARIANTS="vertical")
#              and torch's copy_ of 1 GiB beside the CLI's ceiling (they must agree within 3%)
#   ncu        ncu sections of the ssu_ kernels on NCU_CASES (the fallback kernels' too with
#              NCU_FALLBACK=1)
#   examples   examples/mamba2_decode.py (default size and a larger one) and
#              examples/speculative_decoding.py on the GPU (not in the default STAGES); without
#              flax on the machine it installs wheels/examples/ (scripts/fetch_example_wheels.sh,
#              carried with the checkout) into a private directory first
#   multigpu   issue #11, for an nvidia-h200-x2 machine (not in the default STAGES; needs the
#              build stage on a fresh machine: STAGES="build multigpu"): the sharding cases on a
#              2-GPU mesh (tests/test_sharding.py: the subset test_two_devices[gpu] first, every
#              case last; each bit for bit equal to one GPU, no collective on a state-sized
#              array, state kept sharded and in place), between them the benchmark's b64-bf16
#              and b256-bf16 rows on one GPU and with the cache sharded over heads and over
#              slots on 2 GPUs (--shard heads --shard slots --devices 2: us/call, aggregate
#              GB/s, 'vs 1' the ratio to one GPU, target >= 1.8x), JSON in $OUT/multigpu.json.
#              NVLink multicast stays off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1
#              and NVSHMEM_DISABLE_NVLS=1 are exported for it. MULTIGPU_CASES (default
#              "b64-bf16 b256-bf16"), MULTIGPU_SHARD (default "heads slots"). With PYTEST_K=cpu
#              it is a dry run on 2 forced host CPU devices at a tiny shape
# STAGES="build tests sanitize perf ncu" (default). A stage does not start once BUDGET seconds
# (default 560: a device call lasts at most 600) are spent, and runs at most until then.
# PYTEST_K (default gpu) picks the platform of the pytest stages: PYTEST_K=cpu STAGES=tests
# runs the same commands without a GPU (a dry run of this script). Logs go to $OUT (or
# ./gpu_out) as few files (the device returns at most 8); a short summary is printed last.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
STAGES=${STAGES:-"build tests sanitize perf ncu"}
BUDGET=${BUDGET:-560}
K=${PYTEST_K:-gpu}
LOG="$OUT/stages.log"
T0=$(date +%s)
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }
stage() {  # name, wanted timeout (s), command...: output appended to $LOG under "== name"
  local name=$1 to=$2 t rc tmp left; shift 2
  left=$(( BUDGET - ($(date +%s) - T0) - 10 ))
  [ "$left" -lt "$to" ] && to=$left
  if [ "$to" -lt 20 ]; then summary "$name: skipped (BUDGET=$BUDGET s spent)"; return 0; fi
  t=$(date +%s); tmp=$(mktemp)
  timeout "$to" "$@" > "$tmp" 2>&1; rc=$?
  { echo "===================== $name"; cat "$tmp"; echo "rc=$rc"; } >> "$LOG"
  summary "$name: rc=$rc in $(( $(date +%s) - t )) s$([ $rc -eq 124 ] && echo " (timeout $to s)")" \
    "$(grep -E ' passed| failed|no tests ran' "$tmp" | tail -1)" \
    "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$tmp" | tail -1)"
  grep -E "^FAILED|^ERROR |^E  " "$tmp" | head -20
  rm -f "$tmp"
}
# faulthandler: a test still running after 120 s prints every thread's stack into the log, so
# a hang (or a slow child process) shows where it is before the stage's timeout kills it
PYTEST=(python -m pytest -q -rf --tb=short -p no:cacheprovider -o faulthandler_timeout=120)
CHILDREN=(tests/test_fallback_kernels.py "tests/test_degenerate.py::test_degenerate_property")
XDIST=()  # independent tests in TEST_WORKERS processes on the one GPU (timing tests excluded)
if [ "${TEST_WORKERS:-4}" -gt 1 ] && python -c "import xdist" 2> /dev/null; then
  XDIST=(-n "${TEST_WORKERS:-4}")
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
summary "card: $(nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader 2>&1 | head -1)"
if [ -f .export_commit ]; then  # a tree from scripts/export_clean.sh: the device's .git may be older
  export JAX_MAMBA_GIT_COMMIT=$(cat .export_commit); summary "commit: $JAX_MAMBA_GIT_COMMIT (exported tree)"
else
  summary "commit: $(git rev-parse --short HEAD 2>/dev/null) $(git status --short 2>/dev/null | wc -l) files changed"
fi

BDIR=build/gpu
if has build; then
  t=$(date +%s)
  ARCHS=${JAX_MAMBA_CUDA_ARCHS:-90a}
  # CMake directly (the CMakeLists.txt pip / scikit-build-core drives), modules copied into
  # ./jax_mamba, so everything below imports this tree (PYTHONPATH) whatever site-packages holds
  { cmake -S . -B "$BDIR" -DSKBUILD_PROJECT_NAME=jax_mamba -DJAX_MAMBA_CUDA=ON \
      -DPython_EXECUTABLE="$(command -v python)" -Dnanobind_DIR="$(python -m nanobind --cmake_dir)" \
      -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" -DCMAKE_BUILD_TYPE=Release -DJAX_MAMBA_CUDA_VERBOSE_PTXAS=ON \
    && cmake --build "$BDIR" -j 16 && cp "$BDIR"/_cpu*.so "$BDIR"/_cuda*.so jax_mamba/; } \
    > "$OUT/build.log" 2>&1; rc=$?
  summary "build (archs $ARCHS): rc=$rc in $(( $(date +%s) - t )) s"
  if [ $rc -ne 0 ]; then grep -E "error|Error" "$OUT/build.log" | head -20; tail -20 "$OUT/build.log"; exit 1; fi
  # ptxas -v: "Function properties for NAME" precedes "N bytes stack frame, S bytes spill ..."
  spills=$(awk '/Function properties for/ {f = $NF}
                /bytes spill stores/ && !/ 0 bytes spill stores, 0 bytes spill loads/ {print f ":" $0}' \
             "$OUT/build.log" | sort -u)
  demangle() { if command -v c++filt > /dev/null; then c++filt; else cat; fi; }
  summary "ptxas: $(grep -c 'ptxas info *: Used' "$OUT/build.log") kernels compiled," \
    "$(printf '%s' "$spills" | grep -c .) with spills"
  [ -n "$spills" ] && printf '%s\n' "$spills" | demangle | cut -c1-200 | head -12 | tee -a "$OUT/summary.txt"
fi
compgen -G "jax_mamba/_cuda*.so" > /dev/null \
  || summary "warning: no jax_mamba/_cuda*.so (a fresh machine needs STAGES with build): GPU tests skip"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python -c "import jax, jax_mamba; print('jax', jax.__version__, 'HAS_CUDA', jax_mamba.HAS_CUDA, jax.devices())" \
  2>&1 | tail -1 | tee -a "$OUT/summary.txt"

if has tests; then
  # shellcheck disable=SC2086
  stage pytest_$K "${TEST_TIMEOUT:-420}" "${PYTEST[@]}" "${XDIST[@]}" -k "$K" \
    --deselect "${CHILDREN[0]}" --deselect "${CHILDREN[1]}" --deselect tests/test_benchmark.py \
    ${TEST_FILES:-tests}
  stage pytest_timing_$K 240 "${PYTEST[@]}" -k "$K" tests/test_benchmark.py
  JAX_MAMBA_CUDA_ROWS=1 stage pytest_rows1 120 "${PYTEST[@]}" -k "$K" tests/test_algorithms.py tests/test_ops.py
  JAX_MAMBA_CUDA_ROWS=4 stage grid_rows4 120 "${PYTEST[@]}" -m grid -k "$K and test_grid_case" \
    tests/test_kernel_cases.py
fi
has children && stage children_$K 540 "${PYTEST[@]}" "${XDIST[@]}" -k "$K" "${CHILDREN[@]}"
for tool in memcheck racecheck; do
  if { [ $tool = memcheck ] && has sanitize; } || has $tool; then
    if command -v compute-sanitizer > /dev/null; then
      filt=(); compute-sanitizer --help 2>&1 | grep -q "kns=" && filt=(--kernel-name kns=ssu_)
      stage "$tool" 240 compute-sanitizer --tool $tool "${filt[@]}" --error-exitcode 9 \
        "${PYTEST[@]}" -m sanitize -k "$K" tests/test_kernel_cases.py
    else
      summary "$tool: skipped (compute-sanitizer not found)"
    fi
  fi
done
if has perf; then
  # torch's copy_ of 1 GiB (one launch per timing between events, median after warm-up, read +
  # write): the check on the CLI's ceiling, which must agree within 3% (docs/performance.md)
  copy=$(python - 2>> "$LOG" <<'EOF'
import statistics, torch
a = torch.empty((1 << 30) // 4, dtype=torch.float32, device="cuda").normal_()
b = torch.empty_like(a)
ts = []
for i in range(23):
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record(); b.copy_(a); e1.record(); torch.cuda.synchronize()
    ts.append(e0.elapsed_time(e1) / 1e3)
print(f"{2 * a.nbytes / statistics.median(ts[3:]) / 1e9:.0f}")
EOF
)
  summary "torch copy_ 1 GiB: ${copy:-n/a} GB/s (read + write, events)"
  CASES=${CASES:-"b1-bf16 b8-bf16 b64-bf16 b256-bf16 b64-fp16 b64-fp32 b256-fp32 b64-bf16-p128 b64-bf16-h80g1 b64-fp32-h80g1 b128-bf16-h128 mtp4-b1-bf16-inter mtp4-b8-bf16-inter mtp4-b64-bf16-inter mtp6-b64-fp32-inter mtp6-b64-bf16-inter b64-int16 b64-fp16-sr mamba1-b64-fp32"}
  cases=(); for c in $CASES; do cases+=(--case "$c"); done
  rm -f "$OUT/perf.json"  # the comparison below reads this run's ceiling, never an older one
  # shellcheck disable=SC2086
  stage perf_auto 400 python -m jax_mamba.benchmark --impl ffi --json "$OUT/perf.json" "${cases[@]}" \
    ${PERF_ARGS:-}
  # the CLI's ceiling (from its JSON; without one, measured alone) beside torch's copy_
  summary "$(TORCH_GBS=${copy:-} PERF_JSON="$OUT/perf.json" python - 2>&1 <<'EOF' | tail -3
import json, os
t = os.environ.get("TORCH_GBS") or ""
try:
    h = json.load(open(os.environ["PERF_JSON"]))["header"]
    src = "perf_auto"
except (OSError, ValueError, KeyError):
    import jax
    from jax_mamba import _copy
    c = _copy.cuda_ceiling(jax.devices("gpu")[0], 1 << 30)
    h = {"copy_gbs": c.gbs, "copy_method": c.method, "copy_memcpy_gbs": c.memcpy_gbs,
         "copy_kernel_gbs": c.kernel_gbs, "copy_buffer_mb": c.buffer_mb,
         "copy_write_gbs": c.write_gbs}
    src = "measured alone: no perf.json"
k = h.get("copy_kernel_gbs")
w = h.get("copy_write_gbs")
print(f"CLI ceiling ({src}): {h['copy_gbs']:.0f} GB/s by {h['copy_method']} (cudaMemcpyAsync "
      f"{h['copy_memcpy_gbs']:.0f}, SM kernel {k or float('nan'):.0f} GB/s, "
      f"{h.get('copy_buffer_mb')} MiB; write-only memset {w or float('nan'):.0f} GB/s)")
if t:
    d = h["copy_gbs"] / float(t) - 1
    print(f"ceiling vs torch copy_ {t} GB/s: {100 * d:+.1f}%: "
          + ("agree within 3%" if abs(d) <= 0.03 else "DISAGREE (more than 3% apart)"))
else:
    print("ceiling vs torch copy_: no torch figure (torch missing?)")
EOF
)"
  # the fallback kernels (what ran before the fast path; JAX_MAMBA_CUDA_FAST=0), same cases
  [ -z "${NO_FALLBACK:-}" ] && JAX_MAMBA_CUDA_FAST=0 stage perf_fallback 400 python -m jax_mamba.benchmark \
    --impl ffi --json "$OUT/perf_fallback.json" "${cases[@]}" ${PERF_ARGS:-}
  for v in ${ROWS_VARIANTS:-}; do
    JAX_MAMBA_CUDA_ROWS=$v stage "perf_rows$v" 120 python -m jax_mamba.benchmark --impl ffi \
      --case b1-bf16 --case b64-bf16 --case b256-bf16 --case b64-fp32
  done
  for a in ${ALG_VARIANTS:-}; do
    stage "perf_$a" 120 python -m jax_mamba.benchmark --impl ffi --algorithm "$a" \
      --case b1-bf16 --case b64-bf16 --case b64-fp32
  done
fi
if has ncu; then
  if command -v ncu > /dev/null; then
    for cs in ${NCU_CASES:-b64-bf16 b1-bf16}; do
      stage "ncu_$cs" 150 ncu --clock-control none --kernel-name regex:ssu_ \
        --launch-skip 40 --launch-count 4 --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
        python -m jax_mamba.benchmark --impl ffi --case "$cs" --reps 3 --no-device-time
      [ -n "${NCU_FALLBACK:-}" ] && JAX_MAMBA_CUDA_FAST=0 stage "ncu_fallback_$cs" 150 ncu --clock-control none --kernel-name regex:ssu_ \
        --launch-skip 40 --launch-count 4 \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section MemoryWorkloadAnalysis python -m jax_mamba.benchmark --impl ffi --case "$cs" --reps 3 --no-device-time
    done
    grep -E "ssu_|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Stall|stalled|Warp Cycles Per Issued|Block Size|Grid Size" "$LOG" \
      | sed -n '1,400p' > "$OUT/ncu_brief.txt"
  else
    summary "ncu: skipped (not found)"
  fi
fi
if has multigpu; then
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  if [ "$K" = gpu ]; then
    summary "multigpu: $(python -c "import jax; d = jax.devices('gpu'); print(len(d), 'GPUs:', d)" \
      2>&1 | tail -1)"
    bench=(--platform gpu)
    for c in ${MULTIGPU_CASES:-b64-bf16 b256-bf16}; do bench+=(--case "$c"); done
    benv=()
  else  # dry run: 2 forced host CPU devices, a tiny free-form shape
    bench=(--platform cpu --batch 8 --heads 4 --ngroups 2 --dim 8 --dstate 16 --calls 2 --reps 2
           --cache-mb 1 --copy-mb 1 --flush-mb 0.5)
    benv=(XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=2" JAX_PLATFORMS=cpu)
  fi
  for sh in ${MULTIGPU_SHARD:-heads slots}; do bench+=(--shard "$sh"); done
  # the subset (test_two_devices[gpu]; with K=cpu [cpu]), the benchmark, then every case
  stage sharding_2dev_$K 200 "${PYTEST[@]}" -k "$K and two_devices" tests/test_sharding.py
  # named perf_*: its rows are in the "==== perf" digest below
  stage perf_multigpu 240 env "${benv[@]}" python -m jax_mamba.benchmark --impl ffi "${bench[@]}" \
    --devices 2 --json "$OUT/multigpu.json"
  [ "$K" = gpu ] && stage sharding_2gpu_every_case 300 "${PYTEST[@]}" -k "gpu and every_case" \
    tests/test_sharding.py
fi
if has examples; then
  if ! python -c "import flax" 2> /dev/null; then
    if compgen -G "wheels/examples/*.whl" > /dev/null; then
      deps=${TMPDIR:-/tmp}/jax_mamba_example_deps
      python -m pip install -q --no-deps --no-index --target "$deps" wheels/examples/*.whl \
        >> "$LOG" 2>&1 && export PYTHONPATH=$PYTHONPATH:$deps
    fi
  fi
  if python -c "import flax" 2> /dev/null; then
    stage mamba2_decode 150 python examples/mamba2_decode.py
    stage mamba2_decode_large 200 python examples/mamba2_decode.py --layers 8 --d-model 1024 \
      --d-state 128 --headdim 64 --batch 64 --slots 128 --prompt-len 64 --new-tokens 128 \
      --state-dtype bfloat16
    stage speculative_decoding 150 python examples/speculative_decoding.py
    grep -E "tok|diff|max|accepted|==|ok|FAIL" "$LOG" | grep -v "^===" | tail -30 \
      > "$OUT/examples_brief.txt"
  else
    summary "examples: skipped (flax not importable; run scripts/fetch_example_wheels.sh and carry wheels/)"
  fi
fi
echo "==== perf"
awk '/^===================== / {p = ($2 ~ /^perf/); if (p) print}
     p && (/^device / || /^case / || / (ffi|reference) /)' "$LOG" 2> /dev/null
echo "==== summary"; cat "$OUT/summary.txt"; echo "total $(( $(date +%s) - T0 )) s"

// Host emulation of the CUDA fast-path kernels (ssu_cuda_fast.cuh) for the CPU module: the
// same kernel source, compiled by the host compiler with the CUDA intrinsics it uses defined on
// the host (ssu_cuda_emu.cc), run warp by warp with one host thread per lane. It lets the CPU
// test suite check the fast path's indexing, validity, write and rounding logic on a machine
// without a GPU (JAX_MAMBA_CPU_EMULATE_FAST=1, unless JAX_MAMBA_CUDA_FAST=0; docs/performance.md).
// It says nothing about speed, memory ordering or what only a GPU can show.
#pragma once
#include "ssu_plan.h"

namespace ssu {
namespace emu {

// Whether the module was built with the emulation (the CUDA headers were found at build time).
bool available();
// Whether JAX_MAMBA_CPU_EMULATE_FAST=1 (read once per process).
bool enabled();
// Runs the planned fast-path kernel (pl.kernel kFast or kFastMtp) on host memory; false when pl
// is not a fast-path plan (nothing run).
bool run_fast(const Params& p, const cuda::Plan& pl);
// Fast-path calls emulated so far in this process, and of them those with T compiled in.
long long calls();
long long steps_calls();
// The fast path's int16 row encoder (pack_state<I16> with the row's i16_rcp) on n rows of 8
// values, row i with scale sc[i]: out[8 i + e] the stored int16 (tests/test_fast_emulation.py
// checks it against IEEE division on inputs where a reciprocal alone would round wrongly).
// false when the emulation is not built.
bool int16_encode(const float* v, const float* sc, int64_t n, int16_t* out);

}  // namespace emu
}  // namespace ssu

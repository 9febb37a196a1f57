// The jax_mamba_copy FFI target: a plain buffer copy, the bandwidth ceiling the benchmark
// compares against (SPEC §5). Handlers live in copy_cpu.cc / copy_cuda.cu; the nanobind
// modules only need these accessors.
#pragma once

namespace jax_mamba_copy {
void* cpu_handler();   // copy_cpu.cc
void* cuda_handler();  // copy_cuda.cu
}  // namespace jax_mamba_copy

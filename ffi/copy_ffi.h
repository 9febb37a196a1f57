// The jax_mamba_copy FFI target: a plain buffer copy (the benchmark's L2 flush, and its
// ceiling on the CPU). Handlers live in copy_cpu.cc / copy_cuda.cu; the nanobind modules only
// need these accessors. measure_ceiling (copy_ceiling.cu) is the CUDA ceiling of the benchmark
// (docs/performance.md, "Ceiling"), a host function outside any XLA program.
#pragma once

#include <cstddef>
#include <string>

namespace jax_mamba_copy {
void* cpu_handler();   // copy_cpu.cc
void* cuda_handler();  // copy_cuda.cu

// One ceiling measurement: per-copy median seconds and GB/s (read + written) of each method, and
// beside them a write-only figure: cudaMemsetAsync over the destination (bytes written only; a
// reference for write-heavy calls, such as MTP with intermediate states, not a ceiling).
struct Ceiling {
  double memcpy_s = 0, kernel_s = 0;  // cudaMemcpyAsync D2D / the 16-byte SM copy kernel
  double memcpy_gbs = 0, kernel_gbs = 0;
  double write_s = 0, write_gbs = 0;       // cudaMemsetAsync of the destination
  std::size_t buffer_bytes = 0;            // bytes of each buffer actually copied
  int grid = 0, threads = 0, device = -1;  // the kernel's launch, the CUDA device used
};

// Copies a buffer of buffer_bytes (whole MiB; halved on an allocation failure, never below
// min_buffer_bytes) on CUDA device `device` (-1: the current one), `warmup` untimed then
// `reps` timed launches of each method (and of the write-only memset), each between two events.
// Returns "" and fills *out, or the error (every CUDA call is checked). copy_ceiling.cu.
std::string measure_ceiling(int device, std::size_t buffer_bytes, std::size_t min_buffer_bytes,
                            int reps, int warmup, Ceiling* out);
}  // namespace jax_mamba_copy

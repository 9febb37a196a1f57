// The one launcher: the kernel of a plan (ssu_plan.h) for one (state dtype, input dtype) pair,
// instantiated once per pair in a translation unit the build generates from
// ssu_cuda_instance.cu.in, so that a many-core build compiles the 12 pairs in parallel.
#pragma once
#include <atomic>
#include <type_traits>

#include "ssu_cuda_fast.cuh"
#include "ssu_cuda_generic.cuh"
#include "ssu_cuda_horizontal.cuh"
#include "ssu_cuda_simple.cuh"
#include "ssu_cuda_simple_step1.cuh"
#include "ssu_cuda_vertical.cuh"

namespace ssu {
namespace cuda {

// Persistent launch: as many CTAs as are resident at once (occupancy queried once per block
// size and instantiation; a host-only query, so command-buffer capture is unaffected).
template <DType ST, DType IT, int KV>
cudaError_t launch_step1(const Params& p, const Plan& pl, cudaStream_t stream) {
  static std::atomic<int> per_sm[9] = {};
  const int slot = pl.threads / 32;
  int bps = per_sm[slot].load(std::memory_order_relaxed);
  if (bps == 0) {
    cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &bps, ssu_simple_step1<ST, IT, KV>, pl.threads, 0);
    if (err != cudaSuccess) return err;
    bps = bps > 0 ? bps : 1;
    per_sm[slot].store(bps, std::memory_order_relaxed);
  }
  const int64_t resident = int64_t(bps) * pl.sms;
  const int64_t blocks = pl.l.main_blocks < resident ? pl.l.main_blocks : resident;
  ssu_simple_step1<ST, IT, KV>
      <<<dim3(unsigned(blocks)), dim3(unsigned(pl.threads)), 0, stream>>>(p, pl.l);
  return cudaSuccess;
}

// The register-row strategies: simple or horizontal entry point, NV 16-byte vectors per lane.
template <DType ST, DType IT, bool kHorizontal>
cudaError_t launch_rows(const Params& p, const Plan& pl, dim3 grid, dim3 block,
                        cudaStream_t stream) {
  auto run = [&](auto kernel) {
    kernel<<<grid, block, 0, stream>>>(p, pl.l);
    return cudaSuccess;
  };
  auto pick = [&](auto nv) -> cudaError_t {
    constexpr int NV = decltype(nv)::value;
    if constexpr (kHorizontal)
      return run(ssu_horizontal<ST, IT, NV>);
    else
      return run(ssu_simple<ST, IT, NV>);
  };
  switch (pl.nv) {
    case 1: return pick(std::integral_constant<int, 1>{});
    case 2: return pick(std::integral_constant<int, 2>{});
    case 4: return pick(std::integral_constant<int, 4>{});
    case 8:
      if constexpr (ST == DType::F32) return pick(std::integral_constant<int, 8>{});
      return cudaErrorInvalidConfiguration;
    default: return cudaErrorInvalidConfiguration;
  }
}

// The fast path: grid (row chunks, heads, entries [+ varlen's zero slice]); the instance
// fast_kernel picks for the call's dstate, rows per thread, steps and parameter layout;
// programmatic dependent launch when the plan asks.
template <DType ST, DType IT>
cudaError_t launch_fast(const Params& p, const Plan& pl, cudaStream_t stream) {
  const FastKernel kernel = fast_kernel<ST, IT>(p, pl);
  if (kernel == nullptr) return cudaErrorInvalidConfiguration;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(pl.l.chunks), unsigned(p.H), unsigned(pl.slices));
  cfg.blockDim = dim3(unsigned(pl.threads));
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pl.pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, p, pl.l);
}

template <DType ST, DType IT>
cudaError_t launch_input(const Params& p, const Plan& pl, cudaStream_t stream) {
  const int64_t blocks = pl.l.main_blocks + pl.l.zero_blocks;
  const dim3 grid(static_cast<unsigned>(blocks)), block(static_cast<unsigned>(pl.threads));
  if (pl.kernel == Kernel::kFast || pl.kernel == Kernel::kFastMtp)
    return launch_fast<ST, IT>(p, pl, stream);
  if (pl.kernel == Kernel::kVertical) return launch_vert<ST, IT>(p, pl, grid, block, stream);
  if (pl.kernel == Kernel::kSimpleStep1) {
    switch (pl.nv) {
      case 1: return launch_step1<ST, IT, 1>(p, pl, stream);
      case 2: return launch_step1<ST, IT, 2>(p, pl, stream);
      case 4: return launch_step1<ST, IT, 4>(p, pl, stream);
      case 8: return launch_step1<ST, IT, 8>(p, pl, stream);
      default: return cudaErrorInvalidConfiguration;
    }
  }
  if (pl.kernel == Kernel::kGeneric) {
    if (pl.smem > 48 * 1024) {
      cudaError_t err =
          cudaFuncSetAttribute(ssu_generic<ST, IT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(pl.smem));
      if (err != cudaSuccess) return err;
    }
    ssu_generic<ST, IT><<<grid, block, pl.smem, stream>>>(p, pl.l);
    return cudaSuccess;
  }
  if (pl.kernel == Kernel::kHorizontal)
    return launch_rows<ST, IT, true>(p, pl, grid, block, stream);
  return launch_rows<ST, IT, false>(p, pl, grid, block, stream);
}

}  // namespace cuda
}  // namespace ssu

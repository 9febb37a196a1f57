// What the CUDA handler (ssu_cuda.cu) and the per-state-dtype kernel translation units
// (ssu_cuda_<dtype>.cu) share beyond the plan (ssu_plan.h): the launch entry points.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include "ssu_plan.h"

namespace ssu {
namespace cuda {

// Defined (and explicitly instantiated) in ssu_cuda_<dtype>.cu.
template <DType ST>
cudaError_t launch_state(const Params& p, const Plan& plan, cudaStream_t stream);

}  // namespace cuda
}  // namespace ssu

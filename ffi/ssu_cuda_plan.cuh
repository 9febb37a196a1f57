// What the CUDA handler (ssu_cuda.cu) and the per-state-dtype kernel translation units
// (ssu_cuda_<dtype>.cu) share beyond the plan (ssu_plan.h): the launch entry points.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include "ssu_plan.h"

namespace ssu {
namespace cuda {

// Defined in ssu_cuda_launch.cuh, explicitly instantiated per (state, input) dtype pair in the
// generated ssu_cuda_<state>_<input>.cu.
template <DType ST, DType IT>
cudaError_t launch_input(const Params& p, const Plan& plan, cudaStream_t stream);

}  // namespace cuda
}  // namespace ssu

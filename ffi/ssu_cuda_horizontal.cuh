// Strategy "horizontal": the register-row body of ssu_cuda_simple.cuh planned with the
// narrowest lane groups: up to 32 state values per lane accumulated sequentially, L as small
// as 1 lane per row (ssu_plan.cc picks NV and L). A separate entry point so that profiles and
// the planner name the strategy the user asked for.
#pragma once
#include "ssu_cuda_simple.cuh"

namespace ssu {
namespace cuda {

template <DType ST, DType IT, int NV>
__global__ void __launch_bounds__(256, RegMinBlocks<ST, NV>::value)
    ssu_horizontal(const Params p, const Launch l) {
  register_rows<ST, IT, NV>(p, l);
}

}  // namespace cuda
}  // namespace ssu

// Kernels for one state dtype (I16), split per dtype so the build compiles them in parallel.
#include "ssu_cuda_launch.cuh"

namespace ssu {
namespace cuda {
template cudaError_t launch_state<DType::I16>(const Params&, const Plan&, cudaStream_t);
}  // namespace cuda
}  // namespace ssu

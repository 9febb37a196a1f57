// nanobind module `_cuda`: exposes the CUDA handler (ssu_cuda.cu) as a capsule per target name.
// Kept out of the .cu files so nvcc never sees nanobind.
#include <stdexcept>
#include <tuple>

#include <cuda_runtime.h>

#include "nanobind/nanobind.h"
#include "copy_ffi.h"
#include "ssu_module_py.h"

namespace ssu {
namespace cuda {
void* handler();
}  // namespace cuda
}  // namespace ssu

// (multiprocessors, opt-in shared memory per block) of the current CUDA device, for planning
// at lowering time.
static std::tuple<int, int> device_limits() {
  int dev = 0, sms = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) throw std::runtime_error(cudaGetErrorString(err));
  return {sms, optin};
}

NB_MODULE(_cuda, m) {
  m.def("device_limits", &device_limits);
  ssu::def_module_functions(m);
  m.def("registrations", []() {
    nanobind::dict d;
    d["jax_mamba_ssu"] = nanobind::capsule(ssu::cuda::handler());
    d["jax_mamba_copy"] = nanobind::capsule(jax_mamba_copy::cuda_handler());
    return d;
  });
}

// nanobind module `_cuda`: exposes the CUDA handler (ssu_cuda.cu) as a capsule per target name.
// Kept out of the .cu files so nvcc never sees nanobind.
#include "nanobind/nanobind.h"
#include "copy_ffi.h"
#include "ssu_contract_py.h"

namespace ssu {
namespace cuda {
void* handler();
}  // namespace cuda
}  // namespace ssu

NB_MODULE(_cuda, m) {
  m.def("contract", &ssu::contract_dict);
  m.def("registrations", []() {
    nanobind::dict d;
    d["jax_mamba_ssu"] = nanobind::capsule(ssu::cuda::handler());
    d["jax_mamba_copy"] = nanobind::capsule(jax_mamba_copy::cuda_handler());
    return d;
  });
}

// nanobind module `_cuda`: exposes the CUDA handler (ssu_cuda.cu) as a capsule per target name,
// the device limits the planner needs, and the benchmark's copy ceiling (copy_ceiling.cu).
// Kept out of the .cu files so nvcc never sees nanobind.
#include <cstdint>
#include <stdexcept>
#include <string>
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

// The benchmark's ceiling (docs/performance.md, "Ceiling"): (memcpy GB/s, SM kernel GB/s,
// bytes per copy read + written, buffer bytes used, kernel grid, write-only memset GB/s) of a
// copy of `nbytes` on CUDA device `device` (-1: current); RuntimeError naming the failed CUDA
// call otherwise.
static std::tuple<double, double, double, int64_t, int, double> copy_ceiling(int64_t nbytes,
                                                                             int reps, int warmup,
                                                                             int device,
                                                                             int64_t min_nbytes) {
  if (nbytes <= 0)
    throw std::invalid_argument("copy_ceiling: nbytes must be > 0, got " + std::to_string(nbytes));
  if (min_nbytes <= 0)
    throw std::invalid_argument("copy_ceiling: min_nbytes must be > 0, got " +
                                std::to_string(min_nbytes));
  jax_mamba_copy::Ceiling c;
  std::string err;
  {
    nanobind::gil_scoped_release release;  // a second of GPU work: let other threads run
    err = jax_mamba_copy::measure_ceiling(device, static_cast<std::size_t>(nbytes),
                                          static_cast<std::size_t>(min_nbytes), reps, warmup, &c);
  }
  if (!err.empty()) throw std::runtime_error(err);
  return {c.memcpy_gbs,
          c.kernel_gbs,
          2.0 * static_cast<double>(c.buffer_bytes),
          static_cast<int64_t>(c.buffer_bytes),
          c.grid,
          c.write_gbs};
}

NB_MODULE(_cuda, m) {
  namespace nb = nanobind;
  m.def("device_limits", &device_limits);
  m.def("copy_ceiling", &copy_ceiling, nb::arg("nbytes"), nb::arg("reps") = 20,
        nb::arg("warmup") = 3, nb::arg("device") = -1, nb::arg("min_nbytes") = 256 << 20);
  ssu::def_module_functions(m);
  m.def("registrations", []() {
    nanobind::dict d;
    d["jax_mamba_ssu"] = nanobind::capsule(ssu::cuda::handler());
    d["jax_mamba_copy"] = nanobind::capsule(jax_mamba_copy::cuda_handler());
    return d;
  });
}

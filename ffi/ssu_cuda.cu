// CUDA handler of the jax_mamba_ssu FFI target: decodes the call frame (ssu_ffi.h), picks a
// kernel strategy and launch shape (make_plan, ssu_plan.cc), launches on XLA's stream. No
// allocation, no synchronisation, no host reads of device data: command-buffer (CUDA graph)
// compatible.
#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <string>

#include <cuda_runtime.h>

#include "ssu_cuda_plan.cuh"
#include "ssu_ffi.h"

namespace ssu {
namespace cuda {
namespace {

// Per-device attributes, queried once per device (benign race: identical values).
cudaError_t device_info(DeviceInfo* out) {
  constexpr int kMaxDevices = 64;
  static std::array<std::atomic<int>, kMaxDevices> sms{}, optin{};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < kMaxDevices && sms[dev].load(std::memory_order_relaxed) > 0) {
    out->sms = sms[dev].load(std::memory_order_relaxed);
    out->smem_optin = optin[dev].load(std::memory_order_relaxed);
    return cudaSuccess;
  }
  err = cudaDeviceGetAttribute(&out->sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&out->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < kMaxDevices) {
    optin[dev].store(out->smem_optin, std::memory_order_relaxed);
    sms[dev].store(out->sms, std::memory_order_relaxed);
  }
  return cudaSuccess;
}

// The instantiation for the call's (state, input) dtypes.
template <DType ST>
cudaError_t launch_for_state(const Params& p, const Plan& plan, cudaStream_t stream) {
  switch (p.input_t) {
    case DType::F32: return launch_input<ST, DType::F32>(p, plan, stream);
    case DType::BF16: return launch_input<ST, DType::BF16>(p, plan, stream);
    case DType::F16: return launch_input<ST, DType::F16>(p, plan, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch(const Params& p, const Plan& plan, cudaStream_t stream) {
  switch (p.state_t) {
    case DType::F32: return launch_for_state<DType::F32>(p, plan, stream);
    case DType::BF16: return launch_for_state<DType::BF16>(p, plan, stream);
    case DType::F16: return launch_for_state<DType::F16>(p, plan, stream);
    case DType::I16: return launch_for_state<DType::I16>(p, plan, stream);
  }
  return cudaErrorInvalidValue;
}

ffi::Error SsuCuda(cudaStream_t stream SSU_HANDLER_PARAMS) {
  Call call = SSU_CALL;
  Params p;
  int64_t algorithm_id = 0;
  AliasCopies copies;
  if (auto err = decode_params(call, &p, &algorithm_id, &copies); err.failure()) return err;
  DeviceInfo di;
  if (cudaError_t err = device_info(&di); err != cudaSuccess)
    return ffi::Error::Internal(std::string("jax_mamba_ssu: ") + cudaGetErrorString(err));
  Plan plan;
  std::string why;
  if (!make_plan(p, algorithm_id, di, &plan, &why)) return bad(why);
  for (int i = 0; i < copies.n; ++i) {
    if (cudaError_t e = cudaMemcpyAsync(copies.c[i].dst, copies.c[i].src, copies.c[i].bytes,
                                        cudaMemcpyDeviceToDevice, stream);
        e != cudaSuccess)
      return ffi::Error::Internal(std::string("jax_mamba_ssu: ") + cudaGetErrorString(e));
  }
  if (plan.kernel == Kernel::kNone) return ffi::Error::Success();
  cudaError_t err = cudaErrorInvalidValue;
  err = launch(p, plan, stream);
  if (err == cudaSuccess) err = cudaGetLastError();
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("jax_mamba_ssu: CUDA launch failed: ") +
                                cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER(kSsuCuda, SsuCuda,
                       bind_ssu(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
                       {ffi::Traits::kCmdBufferCompatible});

void* handler() { return reinterpret_cast<void*>(kSsuCuda); }

}  // namespace cuda
}  // namespace ssu

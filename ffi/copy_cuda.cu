// CUDA handler of jax_mamba_copy: one device-to-device cudaMemcpyAsync on XLA's stream. The
// benchmark's L2 flush; not its ceiling (copy_ceiling.cu, docs/performance.md): chained inside
// an XLA program it reads far below a single cudaMemcpy. No allocation or synchronisation, so
// it can be captured into an XLA command buffer (CUDA graph memcpy node).
#include <string>

#include <cuda_runtime.h>

#include "copy_ffi.h"
#include "xla/ffi/api/ffi.h"

namespace jax_mamba_copy {
namespace {
namespace ffi = xla::ffi;

ffi::Error CopyCuda(cudaStream_t stream, ffi::AnyBuffer src, ffi::Result<ffi::AnyBuffer> dst) {
  if (src.size_bytes() != dst->size_bytes() || src.element_type() != dst->element_type())
    return ffi::Error::InvalidArgument("jax_mamba_copy: result must match the operand");
  if (src.size_bytes() == 0) return ffi::Error::Success();  // pointers may be null
  cudaError_t err = cudaMemcpyAsync(dst->untyped_data(), src.untyped_data(), src.size_bytes(),
                                    cudaMemcpyDeviceToDevice, stream);
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("jax_mamba_copy: cudaMemcpyAsync failed: ") +
                                cudaGetErrorString(err));
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER(kCopyCuda, CopyCuda,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<ffi::AnyBuffer>()
                           .Ret<ffi::AnyBuffer>(),
                       {ffi::Traits::kCmdBufferCompatible});
}  // namespace

void* cuda_handler() { return reinterpret_cast<void*>(kCopyCuda); }
}  // namespace jax_mamba_copy

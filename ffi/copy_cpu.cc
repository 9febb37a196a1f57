// CPU handler of jax_mamba_copy: memcpy of the operand into the (unaliased) result.
#include <cstring>

#include "copy_ffi.h"
#include "xla/ffi/api/ffi.h"

namespace jax_mamba_copy {
namespace {
namespace ffi = xla::ffi;

ffi::Error CopyCpu(ffi::AnyBuffer src, ffi::Result<ffi::AnyBuffer> dst) {
  if (src.size_bytes() != dst->size_bytes() || src.element_type() != dst->element_type())
    return ffi::Error::InvalidArgument("jax_mamba_copy: result must match the operand");
  // zero-size buffers may come with null pointers, which memcpy must not see
  if (src.size_bytes()) std::memcpy(dst->untyped_data(), src.untyped_data(), src.size_bytes());
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER(kCopyCpu, CopyCpu,
                       ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
}  // namespace

void* cpu_handler() { return reinterpret_cast<void*>(kCopyCpu); }
}  // namespace jax_mamba_copy

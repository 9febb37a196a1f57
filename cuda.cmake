# CUDA handlers (included from CMakeLists.txt after enable_language(CUDA)).
# The kernels and the FFI handler live in a static library compiled by nvcc; only the small
# nanobind module source goes through nanobind_add_module (its host-only flags would break
# nvcc). The CUDA runtime is linked statically.
find_package(CUDAToolkit REQUIRED)

# One translation unit per (state dtype, input dtype) pair: the kernels are templates on both,
# and 12 units let a many-core build compile them in parallel.
set(JAX_MAMBA_CUDA_INSTANCES "")
foreach(STATE F32 BF16 F16 I16)
  foreach(INPUT F32 BF16 F16)
    set(unit "${CMAKE_CURRENT_BINARY_DIR}/generated/ssu_cuda_${STATE}_${INPUT}.cu")
    configure_file(ffi/ssu_cuda_instance.cu.in "${unit}" @ONLY)
    list(APPEND JAX_MAMBA_CUDA_INSTANCES "${unit}")
  endforeach()
endforeach()

add_library(jax_mamba_cuda_kernels STATIC
  ffi/ssu_cuda.cu
  ffi/ssu_plan.cc
  ${JAX_MAMBA_CUDA_INSTANCES}
  ffi/copy_cuda.cu
  ffi/copy_ceiling.cu)
target_include_directories(jax_mamba_cuda_kernels SYSTEM PRIVATE ${XLA_FFI_INCLUDE_DIR})
target_include_directories(jax_mamba_cuda_kernels PRIVATE ffi)
set_target_properties(jax_mamba_cuda_kernels PROPERTIES
  CUDA_STANDARD 17
  CUDA_STANDARD_REQUIRED ON
  POSITION_INDEPENDENT_CODE ON
  CUDA_VISIBILITY_PRESET hidden
  CXX_VISIBILITY_PRESET hidden
  CUDA_RUNTIME_LIBRARY Static)
# No --use_fast_math: the int16 encode divides and the SR/fp16 code handles fp32 subnormals,
# both must match the CPU bit for bit (IEEE division, no flush-to-zero). The recurrence uses
# __expf explicitly instead.
target_compile_options(jax_mamba_cuda_kernels PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:-O3 --expt-relaxed-constexpr -Xcompiler=-fvisibility=hidden>)
if(JAX_MAMBA_CUDA_VERBOSE_PTXAS)
  target_compile_options(jax_mamba_cuda_kernels PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Xptxas=-v>)
endif()

nanobind_add_module(_cuda NB_STATIC NOMINSIZE ffi/ssu_cuda_module.cc)
target_include_directories(_cuda SYSTEM PRIVATE ${XLA_FFI_INCLUDE_DIR})  # contract() reads ssu_ffi.h
target_include_directories(_cuda PRIVATE ffi)
target_link_libraries(_cuda PRIVATE jax_mamba_cuda_kernels CUDA::cudart_static)
install(TARGETS _cuda LIBRARY DESTINATION jax_mamba)

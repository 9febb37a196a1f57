// The benchmark's bandwidth ceiling (docs/performance.md, "Ceiling"): a device-to-device copy
// of >= 1 GiB timed the way torch times its `copy_`, one launch per timing between two CUDA
// events, median of `reps` timings after `warmup` untimed launches. Two methods, both
// reported: (a) cudaMemcpyAsync device to device, (b) an SM copy kernel with 16-byte loads and
// stores, grid-stride, as many CTAs as the device holds at once. Bytes = read + written.
//
// Host code only for the nanobind module (ssu_cuda_module.cc); it allocates its own buffers
// with cudaMalloc on the chosen device and its own stream, so it runs outside any XLA program
// (a copy captured into XLA's command buffer, chained K times, read 2700 GB/s on an H200 where
// cudaMemcpy reads ~4200).
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "copy_ffi.h"

namespace jax_mamba_copy {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread before the first store
constexpr std::size_t kMiB = std::size_t(1) << 20;

// dst[i] = src[i] for i < n (n 16-byte vectors). Each thread first issues kUnroll independent
// loads spaced by the grid's width, then the stores; the remainder goes one vector at a time.
__global__ void __launch_bounds__(kThreads)
    copy_kernel(const uint4* __restrict__ src, uint4* __restrict__ dst, std::size_t n) {
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (; i + (kUnroll - 1) * stride < n; i += kUnroll * stride) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      v[u] = src[i + u * stride];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      dst[i + u * stride] = v[u];
  }
  for (; i < n; i += stride)
    dst[i] = src[i];
}

// Owns what one measurement created; the destructor releases it on every return path (its
// own errors are not reported: the measurement's result, or first error, is what counts).
struct Resources {
  int previous_device = -1;
  void* src = nullptr;
  void* dst = nullptr;
  cudaStream_t stream = nullptr;
  std::vector<cudaEvent_t> events;
  ~Resources() {
    if (stream) cudaStreamSynchronize(stream);
    for (cudaEvent_t e : events)
      cudaEventDestroy(e);
    if (stream) cudaStreamDestroy(stream);
    if (src) cudaFree(src);
    if (dst) cudaFree(dst);
    if (previous_device >= 0) cudaSetDevice(previous_device);
  }
};

std::string failed(const char* what, cudaError_t err) {
  return std::string("copy_ceiling: ") + what + " failed: " + cudaGetErrorName(err) + " (" +
         cudaGetErrorString(err) + ")";
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

}  // namespace

std::string measure_ceiling(int device, std::size_t buffer_bytes, std::size_t min_buffer_bytes,
                            int reps, int warmup, Ceiling* out) {
#define CEILING_CHECK(call)                              \
  do {                                                   \
    cudaError_t err_ = (call);                           \
    if (err_ != cudaSuccess) return failed(#call, err_); \
  } while (0)
  if (reps < 1) return "copy_ceiling: reps must be >= 1, got " + std::to_string(reps);
  if (warmup < 0) return "copy_ceiling: warmup must be >= 0, got " + std::to_string(warmup);
  if (buffer_bytes < kMiB)
    return "copy_ceiling: nbytes must be >= 1 MiB, got " + std::to_string(buffer_bytes);
  min_buffer_bytes = std::max(kMiB, std::min(min_buffer_bytes, buffer_bytes));
  buffer_bytes -= buffer_bytes % kMiB;  // whole MiB: a multiple of the 16-byte vector

  Resources r;
  int current = 0;
  CEILING_CHECK(cudaGetDevice(&current));
  if (device < 0) device = current;
  if (device != current) {
    CEILING_CHECK(cudaSetDevice(device));
    r.previous_device = current;
  }
  int sms = 0, blocks_per_sm = 0;
  CEILING_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  CEILING_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, copy_kernel, kThreads, 0));
  const int grid = std::max(1, sms * std::max(1, blocks_per_sm));

  // Both buffers of one size; on an allocation failure halve it, down to min_buffer_bytes.
  std::size_t size = buffer_bytes;
  for (;;) {
    cudaError_t err = cudaMalloc(&r.src, size);
    if (err == cudaSuccess) {
      err = cudaMalloc(&r.dst, size);
      if (err != cudaSuccess) {
        cudaFree(r.src);
        r.src = nullptr;
      }
    }
    if (err == cudaSuccess) break;
    if (err != cudaErrorMemoryAllocation) return failed("cudaMalloc", err);
    cudaGetLastError();  // an allocation failure is not sticky; clear it
    if (size / 2 < min_buffer_bytes)
      return "copy_ceiling: cudaMalloc of 2 x " + std::to_string(size / kMiB) +
             " MiB failed (out of device memory; the smallest size tried is 2 x " +
             std::to_string(min_buffer_bytes / kMiB) + " MiB)";
    size = std::max(min_buffer_bytes, size / 2 - (size / 2) % kMiB);
  }

  CEILING_CHECK(cudaStreamCreateWithFlags(&r.stream, cudaStreamNonBlocking));
  r.events.resize(2, nullptr);
  for (cudaEvent_t& e : r.events)
    CEILING_CHECK(cudaEventCreate(&e));
  // Initialised source (0xA5 bytes): the copy must not be reading never-touched pages.
  CEILING_CHECK(cudaMemsetAsync(r.src, 0xA5, size, r.stream));
  CEILING_CHECK(cudaMemsetAsync(r.dst, 0, size, r.stream));
  CEILING_CHECK(cudaStreamSynchronize(r.stream));

  const std::size_t vectors = size / sizeof(uint4);
  const auto* src = static_cast<const uint4*>(r.src);
  auto* dst = static_cast<uint4*>(r.dst);
  std::vector<double> times[3];  // the write-only memset, cudaMemcpyAsync, the SM copy kernel
  for (int i = 0; i < warmup + reps; ++i) {
    // alternated, so all see the same conditions; the kernel last, so the check below reads
    // a copy
    for (int method = 0; method < 3; ++method) {
      CEILING_CHECK(cudaEventRecord(r.events[0], r.stream));
      if (method == 0) {
        CEILING_CHECK(cudaMemsetAsync(r.dst, 0x5A, size, r.stream));
      } else if (method == 1) {
        CEILING_CHECK(cudaMemcpyAsync(r.dst, r.src, size, cudaMemcpyDeviceToDevice, r.stream));
      } else {
        copy_kernel<<<grid, kThreads, 0, r.stream>>>(src, dst, vectors);
        CEILING_CHECK(cudaGetLastError());
      }
      CEILING_CHECK(cudaEventRecord(r.events[1], r.stream));
      CEILING_CHECK(cudaEventSynchronize(r.events[1]));
      float ms = 0.f;
      CEILING_CHECK(cudaEventElapsedTime(&ms, r.events[0], r.events[1]));
      if (i >= warmup) times[method].push_back(ms * 1e-3);
    }
  }
  // The kernel's copy must be a copy: spot-check the first and last vector against the source
  // pattern (the memset and the memcpy wrote the destination before it in each round).
  unsigned char head[16], tail[16];
  CEILING_CHECK(cudaMemcpy(head, r.dst, 16, cudaMemcpyDeviceToHost));
  CEILING_CHECK(
      cudaMemcpy(tail, static_cast<char*>(r.dst) + size - 16, 16, cudaMemcpyDeviceToHost));
  for (int b = 0; b < 16; ++b)
    if (head[b] != 0xA5 || tail[b] != 0xA5)
      return "copy_ceiling: the destination does not hold the source's bytes after the copy";

  const double moved = 2.0 * double(size);  // read + written
  out->write_s = median(times[0]);
  out->memcpy_s = median(times[1]);
  out->kernel_s = median(times[2]);
  if (!(out->memcpy_s > 0) || !(out->kernel_s > 0) || !(out->write_s > 0))
    return "copy_ceiling: an event pair measured no time (memcpy " + std::to_string(out->memcpy_s) +
           " s, kernel " + std::to_string(out->kernel_s) + " s, memset " +
           std::to_string(out->write_s) + " s)";
  out->memcpy_gbs = moved / out->memcpy_s / 1e9;
  out->kernel_gbs = moved / out->kernel_s / 1e9;
  out->write_gbs = double(size) / out->write_s / 1e9;  // written only
  out->buffer_bytes = size;
  out->grid = grid;
  out->threads = kThreads;
  out->device = device;
  return "";
#undef CEILING_CHECK
}

}  // namespace jax_mamba_copy

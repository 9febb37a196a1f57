// Host emulation of the fast-path kernels (ssu_cuda_emu.h says what for). The kernel source is
// ssu_cuda_fast.cuh itself; this file supplies what the host compiler lacks: the CUDA builtins
// the kernels use, and a launcher that runs each CTA warp by warp, one std::thread per lane,
// with __shfl_xor_sync as a two-phase exchange between the warp's 32 lanes. The fast-path
// kernels use no shared memory and no barrier, so warps are independent.
#include "ssu_cuda_emu.h"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <condition_variable>
#include <mutex>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#ifdef JAX_MAMBA_CPU_EMULATION
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace ssu {
namespace emu {
struct Warp {  // what the 32 lanes of one emulated warp share
  std::mutex mu;
  std::condition_variable cv;
  int arrived = 0;
  unsigned phase = 0;
  float vals[32];
  void arrive_and_wait() {  // a reusable barrier of the 32 lanes
    std::unique_lock<std::mutex> lock(mu);
    const unsigned ph = phase;
    if (++arrived == 32) {
      arrived = 0;
      ++phase;
      cv.notify_all();
    } else {
      cv.wait(lock, [&] { return phase != ph; });
    }
  }
};
thread_local uint3 t_tid, t_bid;
thread_local dim3 t_bdim;
thread_local Warp* t_warp;
}  // namespace emu
}  // namespace ssu

#define threadIdx (::ssu::emu::t_tid)
#define blockIdx (::ssu::emu::t_bid)
#define blockDim (::ssu::emu::t_bdim)
#undef __launch_bounds__
#define __launch_bounds__(...)

// Global loads and stores; a GPU faults on an access not aligned to its size, so the
// emulation does too (abort) rather than let x86 forgive it.
template <class T>
inline const T* aligned(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % sizeof(T) != 0) std::abort();
  return p;
}
template <class T>
inline T __ldg(const T* p) {
  return *aligned(p);
}
template <class T>
inline T __ldcs(const T* p) {
  return *aligned(p);
}
template <class T>
inline void __stcs(T* p, T v) {
  *const_cast<T*>(aligned(p)) = v;
}
inline float __expf(float v) { return expf(v); }
inline float __frcp_rn(float v) { return 1.f / v; }  // IEEE: correctly rounded
inline unsigned __umulhi(unsigned a, unsigned b) {
  return unsigned((unsigned long long)a * b >> 32);
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline float __shfl_xor_sync(unsigned, float v, int off) {
  ::ssu::emu::Warp* w = ::ssu::emu::t_warp;
  const int lane = int(threadIdx.x) % 32;
  w->vals[lane] = v;
  w->arrive_and_wait();
  const float r = w->vals[lane ^ off];
  w->arrive_and_wait();
  return r;
}
// Used by kernels of ssu_cuda_row.cuh that are never emulated.
inline int __syncthreads_or(int) { std::abort(); }
inline int __syncthreads_and(int) { std::abort(); }

#include "ssu_cuda_fast.cuh"

namespace ssu {
namespace emu {
namespace {

std::atomic<long long> g_calls{0};
std::atomic<long long> g_steps_calls{0};  // of them, with T compiled in (plan.steps > 0)

// 32 lane threads for the whole grid: each runs the kernel for every (CTA, warp) in the same
// order, and the lanes meet at a barrier after each, so a warp's shuffles always pair lanes of
// the same (CTA, warp). Early returns are uniform over a CTA in these kernels (an entry's
// validity), so every lane performs the same shuffles.
void launch(const Params& p, const cuda::Plan& pl, cuda::FastKernel kernel) {
  const unsigned gx = unsigned(pl.l.chunks), gy = unsigned(p.H), gz = unsigned(pl.slices);
  const unsigned warps = unsigned(pl.threads) / 32;
  Warp warp;
  auto lane_main = [&](unsigned l) {
    t_bdim = dim3(unsigned(pl.threads));
    t_warp = &warp;
    for (unsigned z = 0; z < gz; ++z)
      for (unsigned y = 0; y < gy; ++y)
        for (unsigned x = 0; x < gx; ++x)
          for (unsigned w = 0; w < warps; ++w) {
            t_tid = uint3{w * 32 + l, 0u, 0u};
            t_bid = uint3{x, y, z};
            kernel(p, pl.l);
            warp.arrive_and_wait();
          }
  };
  std::vector<std::thread> lanes;
  for (unsigned l = 1; l < 32; ++l)
    lanes.emplace_back(lane_main, l);
  lane_main(0);
  for (auto& t : lanes)
    t.join();
}

template <DType ST, DType IT>
bool run_st_it(const Params& p, const cuda::Plan& pl) {
  const cuda::FastKernel kernel = cuda::fast_kernel<ST, IT>(p, pl);
  if (kernel == nullptr) return false;
  launch(p, pl, kernel);
  return true;
}

template <DType ST>
bool run_st(const Params& p, const cuda::Plan& pl) {
  switch (p.input_t) {
    case DType::F32: return run_st_it<ST, DType::F32>(p, pl);
    case DType::BF16: return run_st_it<ST, DType::BF16>(p, pl);
    default: return run_st_it<ST, DType::F16>(p, pl);
  }
}

}  // namespace

bool available() { return true; }

bool int16_encode(const float* v, const float* sc, int64_t n, int16_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    const uint4 w = cuda::pack_state<DType::I16>(v + 8 * i, sc[i], cuda::i16_rcp(sc[i]));
    const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
    for (int e = 0; e < 8; ++e)
      out[8 * i + e] = int16_t(uint16_t(ws[e / 2] >> (16 * (e % 2))));
  }
  return true;
}

bool run_fast(const Params& p, const cuda::Plan& pl) {
  bool ran = false;
  switch (p.state_t) {
    case DType::F32: ran = run_st<DType::F32>(p, pl); break;
    case DType::BF16: ran = run_st<DType::BF16>(p, pl); break;
    case DType::F16: ran = run_st<DType::F16>(p, pl); break;
    case DType::I16: ran = run_st<DType::I16>(p, pl); break;
  }
  if (ran) ++g_calls;
  if (ran && pl.steps > 0) ++g_steps_calls;
  return ran;
}

}  // namespace emu
}  // namespace ssu

#else  // built without the CUDA headers: no emulation

namespace ssu {
namespace emu {
bool available() { return false; }
bool run_fast(const Params&, const cuda::Plan&) { return false; }
bool int16_encode(const float*, const float*, int64_t, int16_t*) { return false; }
}  // namespace emu
}  // namespace ssu

#endif

namespace ssu {
namespace emu {
bool enabled() {
  static const bool v = [] {
    const char* e = std::getenv("JAX_MAMBA_CPU_EMULATE_FAST");
    return e != nullptr && std::atoi(e) > 0;
  }();
  return v;
}
#ifndef JAX_MAMBA_CPU_EMULATION
long long calls() { return 0; }
long long steps_calls() { return 0; }
#else
long long calls() { return g_calls.load(); }
long long steps_calls() { return g_steps_calls.load(); }
#endif
}  // namespace emu
}  // namespace ssu

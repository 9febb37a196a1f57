// The generic fallback (planned for "auto" and "simple" when dstate is not in whole 16-byte
// vectors or above what the register kernels hold): any N, one warp per row, fp32 state row
// in shared memory, scalar loads.
#pragma once
#include "ssu_cuda_row.cuh"

namespace ssu {
namespace cuda {

template <DType ST, DType IT>
__global__ void __launch_bounds__(128) ssu_generic(const Params p, const Launch l) {
  extern __shared__ float smem[];
  constexpr bool kSR = ST == DType::BF16 || ST == DType::F16;
  Ctx c;
  if (!prologue<IT>(p, l, c)) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t H = p.H, P = p.P, N = p.N, HP = H * P;
  const int64_t h = c.h, g = c.h / (int(p.H) / int(p.G));
  const int64_t pr = c.chunk * l.rows_cta + warp;
  if (pr >= P) return;  // whole warp
  const int64_t hp = h * P + pr;
  float* s = smem + int64_t(warp) * N;  // each lane touches only its columns n = lane mod 32

  if (c.padded) {
    for (int64_t n = lane; n < N; n += 32)
      s[n] = 0.f;
  } else {
    const int64_t off = (int64_t(c.src) * HP + hp) * N;
    const float sc = ST == DType::I16 ? p.state_scale[int64_t(c.src) * HP + hp] : 1.f;
    for (int64_t n = lane; n < N; n += 32)
      s[n] = ld_state_scalar<ST>(p.state, off + n) * sc;
  }
  const float Dv = p.has_D ? ld_w(p.D, p.param_t, p.D_elem ? hp : h) : 0.f;
  const float bias = p.has_dt_bias ? ld_w(p.dt_bias, p.param_t, p.bias_elem ? hp : h) : 0.f;
  const float Ah = p.A_elem ? 0.f : __ldg(p.A + h);
  const StoreCtx sx = store_ctx(p, kSR);

  auto store_row = [&](void* base, float* scales, int64_t rb, uint32_t t, uint32_t kind) {
    float sc = 1.f;
    if constexpr (ST == DType::I16) {
      float am = 0.f;
      for (int64_t n = lane; n < N; n += 32)
        am = fmaxf(am, fabsf(s[n]));
      am = group_max<32>(am, 32);
      sc = int16_scale(am);
      if (lane == 0) scales[rb + hp] = sc;
    }
    const int64_t off = (rb + hp) * N;
    for (int64_t n = lane; n < N; n += 32)
      st_state_scalar<ST>(base, off + n, s[n], sc, sx, t, kind);
  };

  for (int t = 0; t < c.len; ++t) {
    const int64_t row = c.row0 + t;
    const int64_t bc = (row * p.G + g) * N;
    const float dt = dt_value(p, row, h, hp, bias);
    const float xv = ld_scalar<IT>(p.x, row * HP + hp);
    const float dAh = __expf(Ah * dt);
    float y = 0.f;
    for (int64_t n = lane; n < N; n += 32) {
      const float a = p.A_elem ? __expf(__ldg(p.A + hp * N + n) * dt) : dAh;
      const float sv = s[n] * a + (ld_scalar<IT>(p.B, bc + n) * dt) * xv;
      s[n] = sv;
      y += sv * ld_scalar<IT>(p.C, bc + n);
    }
    y = group_sum<32>(y, 32);
    if (lane == 0) {
      float v = y + Dv * xv;
      if (p.has_z) v = dev_gate(v, ld_scalar<IT>(p.z, row * HP + hp));
      st_out<IT>(p.out, row * HP + hp, v);
    }
    const int d = c.write_slot(p, t);
    if (d >= 0) store_row(p.state, p.state_scale, int64_t(d) * HP, uint32_t(t), 0u);
    if (c.ii >= 0 && t < p.CS)
      store_row(p.inter, p.inter_scales, (c.ii * p.CS + t) * HP, uint32_t(t), 1u);
  }
}

}  // namespace cuda
}  // namespace ssu

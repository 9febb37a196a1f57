// Single-step kernel (entries of exactly one step: STP, MTP with T = 1), used by "simple" and
// "auto". Included from ssu_cuda_kernels.cuh, whose helpers (prologue/Ctx, vector loads and
// stores, dt_value, group reductions) it uses.
//
// ssu_step1<ST, IT, KV>: a CTA owns (entry, head, row chunk). A state row is VPR = N / E
// 16-byte vectors (VPR a power of two <= 32); lane j of each group of VPR consecutive lanes
// owns column block j of every row it touches, so its B and C vectors are loaded once. A thread
// owns KV rows (chunk rows (tid / VPR) + k * (threads / VPR)): all KV state vectors are loaded
// first (KV * 16 bytes in flight per thread), kept as raw words, then each row is decoded,
// stepped, reduced over its group and stored in turn. With one step the state never needs to
// be held in fp32 as a whole, which is what lets KV grow without spilling (the register-row
// kernel keeps RM x V fp32 values live across the steps).
#pragma once

namespace ssu {
namespace cuda {

template <DType ST>
__device__ __forceinline__ void cvt_raw_vec(const uint4 u, float* v) {
  if constexpr (ST == DType::F32) {
    v[0] = __uint_as_float(u.x); v[1] = __uint_as_float(u.y);
    v[2] = __uint_as_float(u.z); v[3] = __uint_as_float(u.w);
  } else {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      v[2 * j] = half_word<ST>(w[j], 0);
      v[2 * j + 1] = half_word<ST>(w[j], 1);
    }
  }
}

template <DType ST, DType IT, int KV>
__global__ void __launch_bounds__(256) ssu_step1(const Params p, const Launch l) {
  using SW = typename Stor<ST>::type;
  constexpr int E = 16 / int(sizeof(SW));
  constexpr bool kSR = ST == DType::BF16 || ST == DType::F16;

  Ctx c;
  if (!prologue<IT>(p, l, c)) return;  // uniform over the CTA
  const int VPR = 1 << l.lshift;
  const int j = int(threadIdx.x) & (VPR - 1);
  const int rstep = int(blockDim.x) >> l.lshift;
  const int H = int(p.H), P = int(p.P), HP = H * P, h = c.h;
  const int64_t N = p.N;
  const int g = h / (H / int(p.G));
  const int pr0 = c.chunk * l.rows_cta + (int(threadIdx.x) >> l.lshift);
  const int pend = min(P, (c.chunk + 1) * l.rows_cta);
  const int row = c.row0;  // the entry's one step
  const int64_t xrow = int64_t(row) * HP;
  const int hp0 = h * P;
  auto pk = [&](int k) { return pr0 + k * rstep; };
  auto on = [&](int k) { return pk(k) < pend; };

  // ---- every load first: state vectors, their int16 scales, this step's inputs ----
  uint4 raw[KV];
  float qs[KV];
  const int64_t src_row0 = int64_t(c.src) * HP + hp0;
#pragma unroll
  for (int k = 0; k < KV; ++k) {
    raw[k] = make_uint4(0u, 0u, 0u, 0u);
    qs[k] = 1.f;
    if (on(k) && !c.padded) {
      raw[k] = __ldcs(reinterpret_cast<const uint4*>(static_cast<const SW*>(p.state) +
                                                     (src_row0 + pk(k)) * N) + j);
      if constexpr (ST == DType::I16) qs[k] = p.state_scale[src_row0 + pk(k)];
    }
  }
  float Bv[E], Cv[E];
  {
    const int64_t bc = (int64_t(row) * p.G + g) * N + int64_t(j) * E;
    ld_in_vec<IT, E>(p.B, bc, Bv);
    ld_in_vec<IT, E>(p.C, bc, Cv);
  }
  float xr[KV];
#pragma unroll
  for (int k = 0; k < KV; ++k) xr[k] = on(k) ? ld_scalar<IT>(p.x, xrow + hp0 + pk(k)) : 0.f;
  const bool dt_row = p.dt_elem || p.bias_elem;  // dt differs between rows
  const float bias_h = p.has_bias && !p.bias_elem ? ld_w(p.dt_bias, p.w_t, h) : 0.f;
  const float Dh = p.has_D && !p.D_elem ? ld_w(p.D, p.w_t, h) : 0.f;
  const float Ah = p.A_elem ? 0.f : __ldg(p.A + h);
  const float dt_h = dt_row ? 0.f : dt_value(p, row, h, 0, bias_h);
  const float dA_h = __expf(Ah * dt_h);

  const int d = c.write_slot(p, 0);        // state slot written, -1: none
  const bool to_inter = c.ii >= 0;         // intermediate row ii, step 0
  const StoreCtx sx = store_ctx(p, kSR);
  const int64_t inter_row0 = int64_t(c.ii) * p.CS * HP + hp0;

#pragma unroll
  for (int k = 0; k < KV; ++k) {
    const int pp = on(k) ? pk(k) : pr0;
    const int hp = hp0 + pp;
    float s[E];
    cvt_raw_vec<ST>(raw[k], s);
    float dtr = dt_h, dA = dA_h;
    if (dt_row) {
      const float b = p.has_bias && p.bias_elem ? ld_w(p.dt_bias, p.w_t, hp) : bias_h;
      dtr = dt_value(p, row, h, hp, b);
      dA = __expf(Ah * dtr);
    }
    float a[E];
    if (p.A_elem) {
      const float4* ap = reinterpret_cast<const float4*>(p.A + int64_t(hp) * N + int64_t(j) * E);
#pragma unroll
      for (int q = 0; q < E / 4; ++q) {
        const float4 f = __ldg(ap + q);
        a[4 * q] = __expf(f.x * dtr); a[4 * q + 1] = __expf(f.y * dtr);
        a[4 * q + 2] = __expf(f.z * dtr); a[4 * q + 3] = __expf(f.w * dtr);
      }
    } else {
#pragma unroll
      for (int i = 0; i < E; ++i) a[i] = dA;
    }
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < E; ++i) {
      // same association as the CPU and the register kernel: s*dA + (B*dt)*x
      const float sv = (s[i] * qs[k]) * a[i] + (Bv[i] * dtr) * xr[k];
      s[i] = sv;
      acc += sv * Cv[i];
    }
    const float y = group_sum<32>(acc, VPR);
    if (j == 0 && on(k)) {
      const float Dv = p.has_D && p.D_elem ? ld_w(p.D, p.w_t, hp) : Dh;
      float v = y + Dv * xr[k];
      if (p.has_z) v = dev_gate(v, ld_scalar<IT>(p.z, xrow + hp));
      st_out<IT>(p.out, xrow + hp, v);
    }
    if (d < 0 && !to_inter) continue;  // uniform over the CTA
    float sc = 1.f;
    if constexpr (ST == DType::I16) {
      float am = 0.f;
#pragma unroll
      for (int i = 0; i < E; ++i) am = fmaxf(am, fabsf(s[i]));
      sc = int16_scale(group_max<32>(am, VPR));
    }
    if (!on(k)) continue;
    if (d >= 0) {
      const int64_t r = int64_t(d) * HP + hp;
      if constexpr (ST == DType::I16) if (j == 0) p.state_scale[r] = sc;
      st_state_vec<ST, E>(p.state, r * N + int64_t(j) * E, s, sc, sx, 0u, 0u);
    }
    if (to_inter) {
      const int64_t r = inter_row0 + pp;
      if constexpr (ST == DType::I16) if (j == 0) p.inter_scales[r] = sc;
      st_state_vec<ST, E>(p.inter, r * N + int64_t(j) * E, s, sc, sx, 0u, 1u);
    }
  }
}

}  // namespace cuda
}  // namespace ssu

// Strategy "simple" for entries of exactly one step (STP, MTP with T = 1), also chosen by
// "auto": a persistent form of the register-row layout. Uses the row module's helpers
// (prologue/Ctx, vector loads and stores, dt_value, group reductions).
//
// ssu_simple_step1<ST, IT, KV>: a work item is (entry, head, row chunk); a persistent CTA loops
// over items, loading the next while computing the current one. A state row is VPR = N / E 16-byte
// vectors (VPR a power of two <= 32); lane j of each group of VPR consecutive lanes owns column
// block j of every row it touches, so its B and C vectors are loaded once. A thread owns KV rows
// (chunk rows (tid / VPR) + k * (threads / VPR)): all KV state vectors are loaded first (KV * 16
// bytes in flight per thread), kept as raw words, then each row is decoded, stepped, reduced over
// its group and stored in turn. With one step the state never needs to be held in fp32 as a whole,
// which is what lets KV grow without spilling (the register-row kernel keeps RM x V fp32 values
// live across the steps).
#pragma once
#include "ssu_cuda_row.cuh"

namespace ssu {
namespace cuda {

// Raw words of E consecutive input elements (16 bytes for 16-bit inputs with E = 8).
template <DType IT, int E>
struct InRaw {
  static constexpr int kWords = IT == DType::F32 ? E : E / 2;
  uint32_t w[kWords];
};

template <DType IT, int E>
__device__ __forceinline__ void ld_in_raw(const void* base, int64_t i, InRaw<IT, E>& r) {
  if constexpr (IT == DType::F32) {
    const uint4* q = reinterpret_cast<const uint4*>(static_cast<const float*>(base) + i);
#pragma unroll
    for (int k = 0; k < E / 4; ++k) {
      const uint4 u = __ldg(q + k);
      r.w[4 * k] = u.x;
      r.w[4 * k + 1] = u.y;
      r.w[4 * k + 2] = u.z;
      r.w[4 * k + 3] = u.w;
    }
  } else if constexpr (E == 8) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + i));
    r.w[0] = u.x;
    r.w[1] = u.y;
    r.w[2] = u.z;
    r.w[3] = u.w;
  } else {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(base) + i));
    r.w[0] = u.x;
    r.w[1] = u.y;
  }
}

template <DType IT, int E>
__device__ __forceinline__ void cvt_in(const InRaw<IT, E>& r, float (&v)[E]) {
#pragma unroll
  for (int k = 0; k < InRaw<IT, E>::kWords; ++k) {
    if constexpr (IT == DType::F32) {
      v[k] = __uint_as_float(r.w[k]);
    } else {
      v[2 * k] = half_word<IT>(r.w[k], 0);
      v[2 * k + 1] = half_word<IT>(r.w[k], 1);
    }
  }
}

// Work items are (entry, chunk of l.heads_item heads); an item is streamed as batches: batch
// (qh, qb) covers head h0 + qh, rows qb * l.rows_cta + [0, rows_cta); a thread holds KV rows of
// a batch: rows (tid / VPR) + k * (threads / VPR). Ctx::chunk holds the item's state write slot
// (-1: none), resolved once per item.
__device__ __forceinline__ bool step1_item(const Params& p, const Launch& l, int64_t it, Ctx& c) {
  const unsigned u = unsigned(it), uch = unsigned(l.chunks);
  c.b = int(u / uch);
  c.h = int(u % uch) * l.heads_item;
  const Entry e = resolve_entry(p, c.b);
  c.row0 = int(e.row0);
  c.len = int(e.len);
  c.src = int(e.src);
  c.ii = int(e.ii);
  c.padded = e.padded;
  c.chunk = e.valid && e.len > 0 ? c.write_slot(p, 0) : -1;  // reused: the state slot written
  if (!e.valid) {  // step1_nan writes NaN over [nan_lo, nan_hi), kept in row0 / src
    c.len = -1;
    c.row0 = int(e.nan_lo);
    c.src = int(e.nan_hi);
    return false;
  }
  return e.len > 0;
}

template <DType IT>
__device__ __forceinline__ void step1_nan(const Params& p, const Launch& l, const Ctx& c) {
  if (c.len != -1) return;  // empty entry: nothing to write
  const int h1 = min(int(p.H), c.h + l.heads_item), P = int(p.P);
  const int n = (h1 - c.h) * P;
  for (int64_t row = c.row0; row < c.src; ++row)
    for (int i = int(threadIdx.x); i < n; i += blockDim.x)
      st_out<IT>(p.out, (row * p.H + c.h) * P + i, __int_as_float(0x7fc00000));
}

// What a thread loads for one batch before computing it: its KV state vectors (raw), their
// int16 scales and the KV rows' x.
template <DType ST, DType IT, int KV>
struct Step1Loads {
  uint4 raw[KV];
  float qs[ST == DType::I16 ? KV : 1];
  float xr[KV];
};

// Per-head values of the head being computed (reloaded when the batch's head changes).
template <int E>
struct Step1Head {
  int h = -1;
  float dt = 0.f, dA = 1.f, D = 0.f, A = 0.f, bias = 0.f;
  float Bv[E], Cv[E];
};

template <DType ST, DType IT, int KV>
struct Step1 {
  using SW = typename Stor<ST>::type;
  static constexpr int E = 16 / int(sizeof(SW));
  static constexpr bool kSR = ST == DType::BF16 || ST == DType::F16;
  const Params& p;
  const Launch& l;
  int VPR, j, rstep;

  __device__ int heads(const Ctx& c) const { return min(int(p.H), c.h + l.heads_item) - c.h; }
  __device__ int row_of(int qb, int k) const {
    return qb * l.rows_cta + (int(threadIdx.x) >> l.lshift) + k * rstep;
  }

  __device__ __forceinline__ void load(const Ctx& c, int qh, int qb,
                                       Step1Loads<ST, IT, KV>& ld) const {
    const int HP = int(p.H * p.P), hp0 = (c.h + qh) * int(p.P), P = int(p.P);
    const int64_t N = p.N;
    const int64_t src_row0 = int64_t(c.src) * HP + hp0;
    const int64_t xrow = int64_t(c.row0) * HP + hp0;
#pragma unroll
    for (int k = 0; k < KV; ++k) {
      const int pk = row_of(qb, k);
      ld.raw[k] = make_uint4(0u, 0u, 0u, 0u);
      if constexpr (ST == DType::I16) ld.qs[k] = 1.f;
      ld.xr[k] = 0.f;
      if (pk < P) {
        if (!c.padded) {
          ld.raw[k] = __ldcs(reinterpret_cast<const uint4*>(static_cast<const SW*>(p.state) +
                                                            (src_row0 + pk) * N) +
                             j);
          if constexpr (ST == DType::I16) ld.qs[k] = p.state_scale[src_row0 + pk];
        }
        ld.xr[k] = ld_scalar<IT>(p.x, xrow + pk);
      }
    }
  }

  __device__ __forceinline__ void head_values(const Ctx& c, int h, Step1Head<E>& hv) const {
    hv.h = h;
    const int row = c.row0;
    const int g = h / (int(p.H) / int(p.G));
    const int64_t bc = (int64_t(row) * p.G + g) * p.N + int64_t(j) * E;
    ld_in_vec<IT, E>(p.B, bc, hv.Bv);
    ld_in_vec<IT, E>(p.C, bc, hv.Cv);
    hv.bias = p.has_dt_bias && !p.bias_elem ? ld_w(p.dt_bias, p.param_t, h) : 0.f;
    hv.D = p.has_D && !p.D_elem ? ld_w(p.D, p.param_t, h) : 0.f;
    hv.A = p.A_elem ? 0.f : __ldg(p.A + h);
    const bool dt_row = p.dt_elem || p.bias_elem;
    hv.dt = dt_row ? 0.f : dt_value(p, row, h, 0, hv.bias);
    hv.dA = __expf(hv.A * hv.dt);
  }

  __device__ __forceinline__ void compute(const Ctx& c, int qh, int qb,
                                          const Step1Loads<ST, IT, KV>& ld,
                                          Step1Head<E>& hv) const {
    const int H = int(p.H), P = int(p.P), HP = H * P;
    const int h = c.h + qh;
    if (h != hv.h) head_values(c, h, hv);  // uniform over the CTA
    const int64_t N = p.N;
    const int row = c.row0;  // the entry's one step
    const int64_t xrow = int64_t(row) * HP;
    const int hp0 = h * P;
    const bool dt_row = p.dt_elem || p.bias_elem;  // dt differs between rows
    const int d = c.chunk;                         // state slot written, -1: none
    const bool to_inter = c.ii >= 0;               // intermediate row ii, step 0
    const StoreCtx sx = store_ctx(p, kSR);
    const int64_t inter_row0 = int64_t(c.ii) * p.CS * HP + hp0;
#pragma unroll
    for (int k = 0; k < KV; ++k) {
      const bool on = row_of(qb, k) < P;
      const int pp = on ? row_of(qb, k) : 0;
      const int hp = hp0 + pp;
      float s[E];
      cvt_state_vec<ST>(ld.raw[k], s);
      if constexpr (ST == DType::I16) {
#pragma unroll
        for (int i = 0; i < E; ++i)
          s[i] *= ld.qs[k];
      }
      float dtr = hv.dt, dA = hv.dA;
      if (dt_row) {
        const float b = p.has_dt_bias && p.bias_elem ? ld_w(p.dt_bias, p.param_t, hp) : hv.bias;
        dtr = dt_value(p, row, h, hp, b);
        dA = __expf(hv.A * dtr);
      }
      float a[E];
      if (p.A_elem) {
        const float4* ap = reinterpret_cast<const float4*>(p.A + int64_t(hp) * N + int64_t(j) * E);
#pragma unroll
        for (int r = 0; r < E / 4; ++r) {
          const float4 f = __ldg(ap + r);
          a[4 * r] = __expf(f.x * dtr);
          a[4 * r + 1] = __expf(f.y * dtr);
          a[4 * r + 2] = __expf(f.z * dtr);
          a[4 * r + 3] = __expf(f.w * dtr);
        }
      } else {
#pragma unroll
        for (int i = 0; i < E; ++i)
          a[i] = dA;
      }
      float acc = 0.f;
#pragma unroll
      for (int i = 0; i < E; ++i) {
        // same association as the CPU and the register kernel: s*dA + (B*dt)*x
        const float sv = s[i] * a[i] + (hv.Bv[i] * dtr) * ld.xr[k];
        s[i] = sv;
        acc += sv * hv.Cv[i];
      }
      const float y = group_sum<32>(acc, VPR);
      if (j == 0 && on) {
        const float Dv = p.has_D && p.D_elem ? ld_w(p.D, p.param_t, hp) : hv.D;
        float v = y + Dv * ld.xr[k];
        if (p.has_z) v = dev_gate(v, ld_scalar<IT>(p.z, xrow + hp));
        st_out<IT>(p.out, xrow + hp, v);
      }
      if (d < 0 && !to_inter) continue;  // uniform over the CTA
      float sc = 1.f;
      if constexpr (ST == DType::I16) {
        float am = 0.f;
#pragma unroll
        for (int i = 0; i < E; ++i)
          am = fmaxf(am, fabsf(s[i]));
        sc = int16_scale(group_max<32>(am, VPR));
      }
      if (!on) continue;
      if (d >= 0) {
        const int64_t r = int64_t(d) * HP + hp;
        if constexpr (ST == DType::I16)
          if (j == 0) p.state_scale[r] = sc;
        st_state_vec<ST, E>(p.state, r * N + int64_t(j) * E, s, sc, sx, 0u, 0u);
      }
      if (to_inter) {
        const int64_t r = inter_row0 + pp;
        if constexpr (ST == DType::I16)
          if (j == 0) p.inter_scales[r] = sc;
        st_state_vec<ST, E>(p.inter, r * N + int64_t(j) * E, s, sc, sx, 0u, 1u);
      }
    }
  }
};

// Occupancy floor by rows per thread (ptxas, sm_90a, 16-bit inputs).
template <int KV>
struct Step1MinBlocks {
  static constexpr int value = KV == 1 ? 4 : (KV == 2 ? 3 : (KV == 4 ? 2 : 1));
};

// Persistent grid: CTA k takes items k, k + gridDim.x, ... (l.main_blocks items) and streams
// their batches; the loads of the next batch (of this item or the next) are issued before the
// current batch is computed, so every thread keeps KV state vectors in flight throughout.
template <DType ST, DType IT, int KV>
__global__ void __launch_bounds__(256, Step1MinBlocks<KV>::value)
    ssu_simple_step1(const Params p, const Launch l) {
  using W = Step1<ST, IT, KV>;
  const W w{p, l, 1 << l.lshift, int(threadIdx.x) & ((1 << l.lshift) - 1),
            int(blockDim.x) >> l.lshift};
  const int64_t items = l.main_blocks, stride = gridDim.x;
  // Finds the next item with work from `it` on (writing NaN for invalid ones).
  auto next_item = [&](int64_t it, Ctx& c) {
    for (; it < items; it += stride) {
      if (step1_item(p, l, it, c)) return it;
      step1_nan<IT>(p, l, c);
    }
    return items;
  };
  Ctx c;
  int64_t it = next_item(blockIdx.x, c);
  if (it >= items) return;
  int qh = 0, qb = 0, nh = w.heads(c);
  Step1Loads<ST, IT, KV> cur;
  w.load(c, qh, qb, cur);
  Step1Head<W::E> hv;
  for (;;) {
    // the batch after (it, qh, qb)
    Ctx cn = c;
    int64_t itn = it;
    int qhn = qh, qbn = qb + 1;
    if (qbn == l.batches_head) {
      qbn = 0;
      if (++qhn == nh) {
        itn = next_item(it + stride, cn);
        qhn = 0;
      }
    }
    Step1Loads<ST, IT, KV> nxt;
    if (itn < items) w.load(cn, qhn, qbn, nxt);
    w.compute(c, qh, qb, cur, hv);
    if (itn >= items) return;
    if (itn != it) {
      hv.h = -1;  // B/C and dt belong to the entry
      nh = w.heads(cn);
    }
    c = cn;
    it = itn;
    qh = qhn;
    qb = qbn;
    cur = nxt;
  }
}

}  // namespace cuda
}  // namespace ssu

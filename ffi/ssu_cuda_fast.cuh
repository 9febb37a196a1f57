// The fast path: single-token steps (STP, and MTP with T = 1) specialised at compile time.
//
// ssu_fast<ST, IT, N, KV, ELEM, SR>: state dtype, input dtype, dstate N, rows per thread KV,
// per-element parameters (Mamba-1 style A (H,P,N), dt / D / dt_bias per (H,P)) and stochastic
// rounding (16-bit float states with a seed: one Philox call per stored 16-byte vector of 8
// elements, ssu_math.h sr_block) are template parameters, so the inner loop's bounds, vectors
// per row and the shuffle reduction's width are constants. What a call switches besides (index
// width, dst given, D, dt_bias, softplus, z, the dt/D/dt_bias dtype) costs one uniform branch per
// thread, outside the per-element loop.
//
// Layout: a state row (slot, head, p) is VPR = N * sizeof(state) / 16 16-byte vectors; a group
// of LPR = min(VPR, 32) consecutive lanes covers a row, lane l owning vectors l, l + LPR, ...
// (VPL per row), so its slices of B and C are loaded once, as fp32. A CTA is one (column block
// x = row chunk, y = head, z = entry): the entry's slot, validity, dt, dA and the lane's B / C
// are resolved once per thread from the same addresses (one transaction per warp); no shared
// memory and no barrier. A thread owns KV rows p0 + k * groups: it issues all KV * VPL
// streaming 16-byte state loads before using any, then x; per row: update, dot with C,
// streaming store; the row's lanes reduce with log2(LPR) shuffles; lane 0 writes out.
// Offsets inside a slot are 32-bit (H*P*N < 2^31, checked by the planner), the slot base 64-bit.
//
// The entry's resolution is resolve_entry (ssu_params.h) restricted to what the planner sends
// here (one step, 1-D or no indices, no intermediate buffer, no num_accepted_tokens, no
// cache_steps limit below 1): a padded entry reads zeros and writes no state; an out-of-range
// read or write slot makes the entry invalid (NaN out, nothing written).
//
// Programmatic dependent launch: griddepcontrol.wait precedes every global access (dt, B, C, x
// and even the indices and A may come from the kernel before), launch_dependents follows it;
// both are no-ops unless the launch carries the programmatic-serialization attribute
// (ssu_cuda_launch.cuh, JAX_MAMBA_CUDA_PDL).
#pragma once
#include "ssu_cuda_row.cuh"

namespace ssu {
namespace cuda {

// int16 rows: the scale of a row of new values, max |v| over the row's LPR lanes (every lane
// of the warp takes part). NaN values do not raise the maximum, as
// in the CPU handler.
template <int LPR, int VPL, int E>
__device__ __forceinline__ float row_scale(const float (&v)[VPL][E]) {
  float am = 0.f;
#pragma unroll
  for (int j = 0; j < VPL; ++j)
#pragma unroll
    for (int i = 0; i < E; ++i)
      am = fmaxf(am, fabsf(v[j][i]));
  return int16_scale(group_max<LPR>(am, LPR));
}

__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Compile-time shape of a fast-path row.
template <DType ST, int N>
struct FastRow {
  static constexpr int E = 16 / int(sizeof(typename Stor<ST>::type));  // elements per vector
  static constexpr int VPR = N / E;                                    // vectors per row
  static constexpr int LPR = VPR < 32 ? VPR : 32;                      // lanes per row
  static constexpr int VPL = VPR / LPR;                                // vectors per lane
  static_assert(N % E == 0 && VPR >= 1 && (VPR & (VPR - 1)) == 0, "dstate: 16-byte vectors");
};

// dt / D / dt_bias bits (dtype known at run time): loaded now, converted after every other
// load is in flight (a load whose value is converted at once would stall the next one).
__device__ __forceinline__ uint32_t ld_w_raw(const void* base, DType t, int i) {
  return t == DType::F32 ? __ldg(static_cast<const uint32_t*>(base) + i)
                         : uint32_t(__ldg(static_cast<const unsigned short*>(base) + i));
}
__device__ __forceinline__ float w_value(uint32_t w, DType t) {
  if (t == DType::F32) return __uint_as_float(w);
  if (t == DType::BF16) return __uint_as_float(w << 16);
  return __half2float(__ushort_as_half((unsigned short)w));
}

template <DType ST, DType IT, int N, int KV, bool ELEM, bool SR>
__global__ void __launch_bounds__(256) ssu_fast(const Params p, const Launch l) {
  static_assert(!SR || ST == DType::BF16 || ST == DType::F16, "stochastic rounding: 16-bit floats");
  using SW = typename Stor<ST>::type;
  using R = FastRow<ST, N>;
  constexpr int E = R::E, LPR = R::LPR, VPL = R::VPL;
  const int tid = int(threadIdx.x);
  const int lane = tid % LPR;
  const int groups = int(blockDim.x) / LPR;
  const int h = int(blockIdx.y), b = int(blockIdx.z);
  const int H = int(p.H), P = int(p.P);
  const int p0 = int(blockIdx.x) * l.rows_cta + tid / LPR;  // row k of this thread: p0 + k*groups
  const int xb = (b * H + h) * P;                           // out / x / z offset of (b, h, 0)
  const DType pt = p.param_t;
  auto row = [&](int k) { return p0 + k * groups; };
  auto on = [&](int k) { return row(k) < P; };  // uniform over a row's lanes

  grid_dependency_wait();
  grid_dependents_launch();

  // ---- every load that needs no slot, issued before any value is used ----
  const int64_t vsrc = p.has_src_idx ? load_index(p.src_idx, p.idx64, b) : int64_t(b);
  const int64_t vdst = p.has_dst && p.update_state ? load_index(p.dst, p.idx64, b) : 0;
  const bool per_row_dt = ELEM && (p.dt_elem || p.bias_elem);
  const uint32_t w_dt = per_row_dt ? 0u : ld_w_raw(p.dt, pt, b * H + h);
  const bool bias_h_on = p.has_dt_bias && !(ELEM && p.bias_elem);
  const uint32_t w_bias = bias_h_on ? ld_w_raw(p.dt_bias, pt, h) : 0u;
  const bool D_h_on = p.has_D && !(ELEM && p.D_elem);
  const uint32_t w_D = D_h_on ? ld_w_raw(p.D, pt, h) : 0u;
  const float A_h = ELEM && p.A_elem ? 0.f : __ldg(p.A + h);
  const uint32_t k0 = SR ? __ldg(p.seed) : 0u, k1 = SR ? __ldg(p.seed + 1) : 0u;  // Philox key
  const int g = l.g_mul ? int(__umulhi(unsigned(h), l.g_mul) >> l.g_shr) : h;     // h / (H / G)
  float Bf[VPL][E], Cf[VPL][E];
  {
    const int bc = (b * int(p.G) + g) * N + lane * E;
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      ld_in_vec<IT, E>(p.B, bc + j * LPR * E, Bf[j]);
      ld_in_vec<IT, E>(p.C, bc + j * LPR * E, Cf[j]);
    }
  }
  float xf[KV], zf[KV];
#pragma unroll
  for (int k = 0; k < KV; ++k) {
    xf[k] = on(k) ? ld_scalar<IT>(p.x, xb + row(k)) : 0.f;
    zf[k] = p.has_z && lane == 0 && on(k) ? ld_scalar<IT>(p.z, xb + row(k)) : 0.f;
  }
  // per-element parameters (Mamba-1): this thread's rows' dt, dt_bias, D and A slices
  uint32_t w_dtr[ELEM ? KV : 1], w_biasr[ELEM ? KV : 1], w_Dr[ELEM ? KV : 1];
  float4 Ar[ELEM ? KV : 1][ELEM ? VPL * E / 4 : 1];
  if constexpr (ELEM) {
#pragma unroll
    for (int k = 0; k < KV; ++k) {
      const int hp = h * P + (on(k) ? row(k) : 0);
      w_dtr[k] =
          per_row_dt ? ld_w_raw(p.dt, pt, p.dt_elem ? xb + (on(k) ? row(k) : 0) : b * H + h) : 0u;
      w_biasr[k] = p.has_dt_bias && p.bias_elem ? ld_w_raw(p.dt_bias, pt, hp) : 0u;
      w_Dr[k] = p.has_D && p.D_elem && lane == 0 ? ld_w_raw(p.D, pt, hp) : 0u;
#pragma unroll
      for (int j = 0; j < VPL; ++j)
#pragma unroll
        for (int q = 0; q < E / 4; ++q)
          Ar[k][j * (E / 4) + q] = p.A_elem
                                       ? __ldg(reinterpret_cast<const float4*>(
                                                   p.A + (int64_t(hp) * N + (lane + j * LPR) * E)) +
                                               q)
                                       : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }

  // ---- the entry (resolve_entry for one step): slot read, slot written (-1: none), validity ----
  const bool padded = p.has_src_idx && vsrc == p.pad;
  bool ok = padded || slot_ok(vsrc, p.S);
  int64_t dst = -1;
  if (ok && !padded && p.update_state) {
    if (!p.has_dst)
      dst = vsrc;
    else if (vdst != p.pad) {
      ok = slot_ok(vdst, p.S);
      dst = vdst;
    }
  }
  if (!ok) {  // invalid: NaN out, nothing written
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < KV; ++k)
        if (on(k)) st_out<IT>(p.out, xb + row(k), __int_as_float(0x7fc00000));
    }
    return;
  }

  // ---- state loads (streaming) ----
  const uint32_t slot_elems = uint32_t(H) * uint32_t(P) * uint32_t(N);
  const uint32_t in_slot = uint32_t(h * P + p0) * uint32_t(N) + uint32_t(lane * E);
  const uint32_t row_step = uint32_t(groups) * uint32_t(N);
  const SW* const src_row =
      static_cast<const SW*>(p.state) + uint64_t(padded ? 0 : vsrc) * slot_elems + in_slot;
  uint4 raw[KV][VPL];
#pragma unroll
  for (int k = 0; k < KV; ++k)
#pragma unroll
    for (int j = 0; j < VPL; ++j)
      raw[k][j] = on(k) && !padded
                      ? __ldcs(reinterpret_cast<const uint4*>(src_row + k * row_step + j * LPR * E))
                      : make_uint4(0u, 0u, 0u, 0u);
  constexpr bool Q = ST == DType::I16;
  const uint32_t HP = uint32_t(H) * uint32_t(P);
  float qs[Q ? KV : 1];  // int16: the read rows' scales
  if constexpr (Q) {
#pragma unroll
    for (int k = 0; k < KV; ++k)
      qs[k] = on(k) && !padded
                  ? __ldg(p.state_scale + uint64_t(vsrc) * HP + uint32_t(h * P + row(k)))
                  : 1.f;
  }

  // ---- per-head scalars (their loads have landed while the state loads fly) ----
  const float bias_h = bias_h_on ? w_value(w_bias, pt) : 0.f;
  const float D_h = D_h_on ? w_value(w_D, pt) : 0.f;
  float dt_h = 0.f, dA_h = 1.f;
  if (!per_row_dt) {
    dt_h = w_value(w_dt, pt) + bias_h;
    if (p.softplus) dt_h = dev_softplus(dt_h);
    dA_h = __expf(A_h * dt_h);
  }

  // ---- update, dot with C, store ----
  SW* const dst_row =
      dst >= 0 ? static_cast<SW*>(p.state) + uint64_t(dst) * slot_elems + in_slot : nullptr;
  float acc[KV];
#pragma unroll
  for (int k = 0; k < KV; ++k) {
    float dtr = dt_h, dA = dA_h;
    if constexpr (ELEM) {
      if (per_row_dt) {
        const float bias = p.has_dt_bias ? (p.bias_elem ? w_value(w_biasr[k], pt) : bias_h) : 0.f;
        dtr = w_value(w_dtr[k], pt) + bias;
        if (p.softplus) dtr = dev_softplus(dtr);
        dA = __expf(A_h * dtr);
      }
    }
    float a = 0.f;
    float sv[VPL][E];  // the row's new values (int16: encoded once the row's scale is known)
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      float* const s = sv[j];
      float dAe[E];
      cvt_state_vec<ST>(raw[k][j], s);
      if constexpr (Q) {
#pragma unroll
        for (int e = 0; e < E; ++e)
          s[e] *= qs[k];
      }
#pragma unroll
      for (int e = 0; e < E; ++e)
        dAe[e] = dA;
      if constexpr (ELEM) {
        if (p.A_elem) {
#pragma unroll
          for (int q = 0; q < E / 4; ++q) {
            const float4 f = Ar[k][j * (E / 4) + q];
            dAe[4 * q] = __expf(f.x * dtr);
            dAe[4 * q + 1] = __expf(f.y * dtr);
            dAe[4 * q + 2] = __expf(f.z * dtr);
            dAe[4 * q + 3] = __expf(f.w * dtr);
          }
        }
      }
#pragma unroll
      for (int e = 0; e < E; ++e) {
        // same association as the CPU handler and the other kernels: s*dA + (B*dt)*x
        s[e] = s[e] * dAe[e] + (Bf[j][e] * dtr) * xf[k];
        a += s[e] * Cf[j][e];
      }
    }
    float sc = 1.f, rc = 0.f;
    if constexpr (Q) {
      // every lane, outside any branch, even with nothing to store: a shuffle under a condition
      // the compiler cannot prove warp-uniform gets a collective fallback around it (SASS:
      // WARPSYNC.COLLECTIVE, BSSY / BSYNC per shuffle)
      sc = row_scale<LPR>(sv);
      rc = i16_rcp(sc);
      if (dst_row != nullptr && lane == 0 && on(k))
        p.state_scale[uint64_t(dst) * HP + uint32_t(h * P + row(k))] = sc;
    }
    if constexpr (SR) {
      acc[k] = a;
      // stochastic rounding: one Philox call per vector, its group of 8 elements in the state
      // buffer (sr_block: counter (element / 8, step 0, kind 0))
      if (dst_row != nullptr && on(k)) {
        const uint64_t e0 = uint64_t(dst) * slot_elems + (in_slot + k * row_step);
#pragma unroll
        for (int j = 0; j < VPL; ++j)
          __stcs(reinterpret_cast<uint4*>(dst_row + k * row_step + j * LPR * E),
                 pack_state_sr<ST>(
                     sv[j], sr_block(e0 + uint32_t(j * LPR * E), 0u, 0u, k0, k1, p.philox_rounds)));
      }
    } else {
#pragma unroll
      for (int j = 0; j < VPL; ++j)
        raw[k][j] = pack_state<ST>(sv[j], sc, rc);
      acc[k] = a;
      if (dst_row != nullptr && on(k)) {
#pragma unroll
        for (int j = 0; j < VPL; ++j)
          __stcs(reinterpret_cast<uint4*>(dst_row + k * row_step + j * LPR * E), raw[k][j]);
      }
    }
  }

  // ---- the row's lanes reduce; lane 0 writes out (+ D x, gate) ----
#pragma unroll
  for (int k = 0; k < KV; ++k)
    acc[k] = group_sum<LPR>(acc[k], LPR);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < KV; ++k) {
      if (!on(k)) continue;
      float v = acc[k];
      if (p.has_D) v += (ELEM && p.D_elem ? w_value(w_Dr[k], pt) : D_h) * xf[k];
      if (p.has_z) v = dev_gate(v, zf[k]);
      st_out<IT>(p.out, xb + row(k), v);
    }
  }
}

}  // namespace cuda
}  // namespace ssu

namespace ssu {
namespace cuda {

// ---- Multi-token steps (MTP, T >= 2) and varlen on the same layout ----
//
// ssu_fast_mtp<ST, IT, N, KV, SR, VL>, VL = true for varlen (cu_seqlens; instantiated for dstate
// 64 / 128 and float32 / bfloat16 inputs: fast_varlen_dstate / fast_varlen_input; VL defaults to
// false, so the other instances are the kernels they were): per-head parameters only (Mamba-2);
// float states, with stochastic rounding (SR) or without, and int16 block-scaled states. A CTA is
// (row chunk, head, entry) as above; the entry is resolved once per thread by resolve_entry
// (ssu_params.h: 2-D indices, num_accepted_tokens, dst, the intermediate row, cache_steps and every
// validity rule, uniform over the CTA). The thread's KV rows stay in fp32 registers across the T
// steps and are rounded only when stored. Step t + 1's inputs (x, z, dt, B/C slices and, with 2-D
// dst, its write slot) are loaded before step t is computed, so each step's loads fly under the
// previous step's math. After step t: the row's state to intermediate[ii, t] (when the entry has an
// intermediate row) and to the step's dst slot (state_write_slot), both streaming stores.

// The inputs of one step for this thread: dt bits, the B / C slices as loaded (16-bit inputs two
// to a word: the next step's prefetch holds half the registers of fp32 values), x and z of its
// rows, and the step's state write slot (-1: none).
template <DType IT, int N, int KV, int VPL, int E>
struct MtpStep {
  static constexpr int W = InWords<IT, E>::value;
  uint32_t w_dt;
  uint32_t Bw[VPL][W], Cw[VPL][W];
  float xf[KV], zf[KV];
  int64_t wslot;
};

// Varlen (VL): the grid's z axis has one more slice, nb, whose CTA (row chunk, head) zeroes the
// rows of out no sequence owns (varlen_zero_fill). A sequence CTA resolves its entry as above
// (resolve_entry: its span cu[b] .. cu[b+1], its bounds, every index rule), issues its state
// loads, and only then learns from its warp whether its rows intersect another sequence's
// (warp_seq_overlaps: the warp's lanes split the nb sequences, one shuffle reduction); an
// overlapped sequence is invalid (NaN over its rows, nothing written), like one with wrong
// bounds. The tokens of a sequence are a runtime loop, as T is above.

// Whether the rows sequence b owns (bounds already checked, span [a, z) non-empty) intersect
// another sequence's: seq_overlaps (ssu_params.h) with the nb sequences split over the warp's
// lanes. Every lane of the warp calls it (a shuffle reduction).
__device__ __forceinline__ bool warp_seq_overlaps(const Params& p, int b) {
  const SeqSpan q = seq_span(p, b);
  bool mine = false;
  for (int64_t t = int64_t(threadIdx.x % 32u); t < p.nb && !mine; t += 32)
    mine = t != b && spans_intersect(q, seq_span(p, t));
  return group_max<32>(mine ? 1.f : 0.f, 32) > 0.f;
}

// The zero slice (blockIdx.z == nb) of a varlen grid: CTA (row chunk x, head h) writes 0 to the
// rows of out no sequence owns (docs/semantics.md, "Invalid runtime data"), in its head and row
// chunk. With cu_seqlens non-decreasing (each warp checks, one shuffle reduction) they are
// [0, cu[0]) and [cu[nb], rows); otherwise (invalid input) each row's owner is looked up, a
// warp per row.
template <DType IT>
__device__ __forceinline__ void varlen_zero_fill(const Params& p, const Launch& l) {
  const int h = int(blockIdx.y), H = int(p.H), P = int(p.P);
  const int pc0 = int(blockIdx.x) * l.rows_cta;
  const int width = (pc0 + l.rows_cta < P ? pc0 + l.rows_cta : P) - pc0;
  const int lane = int(threadIdx.x % 32u), warp = int(threadIdx.x / 32u);
  const int warps = int(blockDim.x / 32u);
  bool dec = false;
  for (int64_t t = lane; t < p.nb && !dec; t += 32)
    dec = load_index(p.cu_seqlens, p.cu_seqlens64, t) >
          load_index(p.cu_seqlens, p.cu_seqlens64, t + 1);
  const bool mono = !(group_max<32>(dec ? 1.f : 0.f, 32) > 0.f);
  if (mono) {
    const int64_t lo = clamp_rows(load_index(p.cu_seqlens, p.cu_seqlens64, 0), p.rows);
    int64_t hi = clamp_rows(load_index(p.cu_seqlens, p.cu_seqlens64, p.nb), p.rows);
    if (hi < lo) hi = lo;
    const int n1 = int(lo), n = n1 + int(p.rows - hi);  // rows to zero: [0, lo), [hi, rows)
    for (int i = int(threadIdx.x); i < n * width; i += int(blockDim.x)) {
      const int j = i / width, r = j < n1 ? j : int(hi) + (j - n1);
      st_out<IT>(p.out, (r * H + h) * P + pc0 + i % width, 0.f);
    }
    return;
  }
  for (int r = warp; r < int(p.rows); r += warps) {
    bool owned = false;
    for (int64_t s = lane; s < p.nb && !owned; s += 32) {
      const SeqSpan q = seq_span(p, s);
      owned = r >= q.lo && r < q.hi;
    }
    if (group_max<32>(owned ? 1.f : 0.f, 32) > 0.f) continue;
    for (int i = lane; i < width; i += 32)
      st_out<IT>(p.out, (r * H + h) * P + pc0 + i, 0.f);
  }
}

// Registers: the T-step loop keeps KV rows, the next step's inputs and the entry live; bounded to
// 128 (2 CTAs of 256 or 4 of 128 threads per SM, not 3) where that needs no spills: float states
// without stochastic rounding (ptxas: 96-128 registers, none spilled); int16 and SR would spill.
template <DType ST, bool SR>
struct MtpMinBlocks {
  static constexpr int value = ST == DType::I16 || SR ? 1 : 2;
};

// TC > 0: T (steps per entry) compiled in (the planner sends only calls with p.T == TC; not for
// varlen, whose lengths are per sequence): the step loop unrolled, and with one row per thread
// (the small-batch plan, latency-bound) every step's inputs loaded before the first step runs
// instead of one step ahead. TC = 0: the runtime loop.
template <DType ST, DType IT, int N, int KV, bool SR, bool VL = false, int TC = 0>
__global__ void __launch_bounds__(256, MtpMinBlocks<ST, SR>::value)
    ssu_fast_mtp(const Params p, const Launch l) {
  static_assert(!SR || ST == DType::BF16 || ST == DType::F16, "stochastic rounding: 16-bit floats");
  static_assert(TC == 0 || !VL, "compile-time steps: not for varlen");
  constexpr int PD = TC > 0 && KV == 1 ? TC : 1;  // steps whose inputs are loaded ahead
  using SW = typename Stor<ST>::type;
  using R = FastRow<ST, N>;
  constexpr int E = R::E, LPR = R::LPR, VPL = R::VPL;
  using Step = MtpStep<IT, N, KV, VPL, E>;
  const int tid = int(threadIdx.x);
  const int lane = tid % LPR;
  const int groups = int(blockDim.x) / LPR;
  const int h = int(blockIdx.y), b = int(blockIdx.z);
  const int H = int(p.H), P = int(p.P), G = int(p.G);
  const int p0 = int(blockIdx.x) * l.rows_cta + tid / LPR;
  const DType pt = p.param_t;
  auto row = [&](int k) { return p0 + k * groups; };
  auto on = [&](int k) { return row(k) < P; };

  grid_dependency_wait();
  grid_dependents_launch();

  if constexpr (VL) {
    if (b == int(p.nb)) {  // the zero slice
      varlen_zero_fill<IT>(p, l);
      return;
    }
  }
  const float A_h = __ldg(p.A + h);
  const uint32_t k0 = SR ? __ldg(p.seed) : 0u, k1 = SR ? __ldg(p.seed + 1) : 0u;  // Philox key
  const uint32_t w_bias = p.has_dt_bias ? ld_w_raw(p.dt_bias, pt, h) : 0u;
  const uint32_t w_D = p.has_D ? ld_w_raw(p.D, pt, h) : 0u;
  const int g = l.g_mul ? int(__umulhi(unsigned(h), l.g_mul) >> l.g_shr) : h;  // h / (H / G)
  const Entry e = resolve_entry(p, b);
  if (!e.valid) {  // NaN over the entry's rows of out, nothing written
    if (lane == 0)
      for (int64_t r = e.nan_lo; r < e.nan_hi; ++r)
#pragma unroll
        for (int k = 0; k < KV; ++k)
          if (on(k)) st_out<IT>(p.out, (int(r) * H + h) * P + row(k), __int_as_float(0x7fc00000));
    return;
  }
  const int len = TC > 0 ? TC : int(e.len), row0 = int(e.row0);
  if (len == 0) return;

  auto load_step = [&](int t, Step& s) {
    const int rt = row0 + t;
    s.w_dt = ld_w_raw(p.dt, pt, rt * H + h);
    const int bc = (rt * G + g) * N + lane * E;
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      ld_in_words<IT, E>(p.B, bc + j * LPR * E, s.Bw[j]);
      ld_in_words<IT, E>(p.C, bc + j * LPR * E, s.Cw[j]);
    }
    const int xb = (rt * H + h) * P;
#pragma unroll
    for (int k = 0; k < KV; ++k) {
      s.xf[k] = on(k) ? ld_scalar<IT>(p.x, xb + row(k)) : 0.f;
      s.zf[k] = p.has_z && lane == 0 && on(k) ? ld_scalar<IT>(p.z, xb + row(k)) : 0.f;
    }
    s.wslot = e.padded ? -1 : state_write_slot(p, e, b, t);
  };

  // ---- state loads (streaming), then step 0's inputs ----
  const uint32_t slot_elems = uint32_t(H) * uint32_t(P) * uint32_t(N);
  const uint32_t in_slot = uint32_t(h * P + p0) * uint32_t(N) + uint32_t(lane * E);
  const uint32_t row_step = uint32_t(groups) * uint32_t(N);
  const SW* const src_row =
      static_cast<const SW*>(p.state) + uint64_t(e.padded ? 0 : e.src) * slot_elems + in_slot;
  uint4 raw[KV][VPL];
#pragma unroll
  for (int k = 0; k < KV; ++k)
#pragma unroll
    for (int j = 0; j < VPL; ++j)
      raw[k][j] = on(k) && !e.padded
                      ? __ldcs(reinterpret_cast<const uint4*>(src_row + k * row_step + j * LPR * E))
                      : make_uint4(0u, 0u, 0u, 0u);
  Step cur;                 // the runtime loop's current step
  Step s[TC > 0 ? TC : 1];  // TC > 0: step t's inputs in s[t], the first PD loaded here
  if constexpr (TC > 0) {
#pragma unroll
    for (int t = 0; t < PD; ++t)
      load_step(t, s[t]);
  } else {
    load_step(0, cur);
  }
  if constexpr (VL) {  // rows shared with another sequence: invalid (uniform over the CTA)
    if (warp_seq_overlaps(p, b)) {
      if (lane == 0)
        for (int r = row0; r < row0 + len; ++r)
#pragma unroll
          for (int k = 0; k < KV; ++k)
            if (on(k)) st_out<IT>(p.out, (r * H + h) * P + row(k), __int_as_float(0x7fc00000));
      return;
    }
  }
  const float bias_h = p.has_dt_bias ? w_value(w_bias, pt) : 0.f;
  const float D_h = p.has_D ? w_value(w_D, pt) : 0.f;
  constexpr bool Q = ST == DType::I16;
  const uint32_t HP = uint32_t(H) * uint32_t(P);
  float st[KV][VPL][E];
#pragma unroll
  for (int k = 0; k < KV; ++k) {
    // int16: the read row's scale (its load follows the state's)
    const float qs = Q && on(k) && !e.padded
                         ? __ldg(p.state_scale + uint64_t(e.src) * HP + uint32_t(h * P + row(k)))
                         : 1.f;
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      cvt_state_vec<ST>(raw[k][j], st[k][j]);
      if constexpr (Q) {
#pragma unroll
        for (int q = 0; q < E; ++q)
          st[k][j][q] *= qs;
      }
    }
  }

  SW* const inter_row = e.to_inter ? static_cast<SW*>(p.inter) +
                                         uint64_t(e.ii) * uint64_t(p.CS) * slot_elems + in_slot
                                   : nullptr;
  // one step: the update with step t's inputs, its stores, its rows of out
  auto run_step = [&](const int t, const Step& cur) {
    float dt = w_value(cur.w_dt, pt) + bias_h;
    if (p.softplus) dt = dev_softplus(dt);
    const float dA = __expf(A_h * dt);
    const bool store = cur.wslot >= 0 || inter_row != nullptr;
    SW* const dst_row = cur.wslot >= 0
                            ? static_cast<SW*>(p.state) + uint64_t(cur.wslot) * slot_elems + in_slot
                            : nullptr;
    SW* const it_row = inter_row != nullptr ? inter_row + uint64_t(t) * slot_elems : nullptr;
    float Bf[VPL][E], Cf[VPL][E];
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      cvt_in_words<IT, E>(cur.Bw[j], Bf[j]);
      cvt_in_words<IT, E>(cur.Cw[j], Cf[j]);
    }
    float acc[KV];
#pragma unroll
    for (int k = 0; k < KV; ++k) {
      float a = 0.f;
#pragma unroll
      for (int j = 0; j < VPL; ++j) {
#pragma unroll
        for (int q = 0; q < E; ++q) {
          st[k][j][q] = st[k][j][q] * dA + (Bf[j][q] * dt) * cur.xf[k];
          a += st[k][j][q] * Cf[j][q];
        }
      }
      acc[k] = a;
      float sc = 1.f, rc = 0.f;
      if constexpr (Q) {
        // every step, outside any branch (as in ssu_fast: a shuffle under a condition the
        // compiler cannot prove warp-uniform gets a collective fallback around it)
        sc = row_scale<LPR>(st[k]);
        rc = i16_rcp(sc);
        if (store && lane == 0 && on(k)) {
          const uint32_t r = uint32_t(h * P + row(k));
          if (dst_row != nullptr) p.state_scale[uint64_t(cur.wslot) * HP + r] = sc;
          if (it_row != nullptr)
            p.inter_scales[(uint64_t(e.ii) * uint64_t(p.CS) + t) * HP + r] = sc;
        }
      }
      if (store && on(k)) {
        if constexpr (SR) {
          // stochastic rounding: one Philox call per vector and destination, its group of 8
          // elements in that buffer (sr_block: counter (element / 8, step t, kind 1 for the
          // intermediate buffer, 0 for the state))
          const uint32_t r0 = in_slot + k * row_step;  // the row's first element in its slot
          const uint64_t ie0 = (uint64_t(e.ii) * uint64_t(p.CS) + uint64_t(t)) * slot_elems + r0;
          const uint64_t de0 = uint64_t(cur.wslot) * slot_elems + r0;
#pragma unroll
          for (int j = 0; j < VPL; ++j) {
            const uint32_t c = uint32_t(j * LPR * E);
            if (it_row != nullptr)
              __stcs(reinterpret_cast<uint4*>(it_row + k * row_step + c),
                     pack_state_sr<ST>(
                         st[k][j], sr_block(ie0 + c, uint32_t(t), 1u, k0, k1, p.philox_rounds)));
            if (dst_row != nullptr)
              __stcs(reinterpret_cast<uint4*>(dst_row + k * row_step + c),
                     pack_state_sr<ST>(
                         st[k][j], sr_block(de0 + c, uint32_t(t), 0u, k0, k1, p.philox_rounds)));
          }
        } else {
#pragma unroll
          for (int j = 0; j < VPL; ++j) {
            const uint4 v = pack_state<ST>(st[k][j], sc, rc);
            if (it_row != nullptr)
              __stcs(reinterpret_cast<uint4*>(it_row + k * row_step + j * LPR * E), v);
            if (dst_row != nullptr)
              __stcs(reinterpret_cast<uint4*>(dst_row + k * row_step + j * LPR * E), v);
          }
        }
      }
    }
#pragma unroll
    for (int k = 0; k < KV; ++k)
      acc[k] = group_sum<LPR>(acc[k], LPR);
    if (lane == 0) {
      const int xb = ((row0 + t) * H + h) * P;
#pragma unroll
      for (int k = 0; k < KV; ++k) {
        if (!on(k)) continue;
        float v = acc[k];
        if (p.has_D) v += D_h * cur.xf[k];
        if (p.has_z) v = dev_gate(v, cur.zf[k]);
        st_out<IT>(p.out, xb + row(k), v);
      }
    }
  };
  if constexpr (TC > 0) {
#pragma unroll
    for (int t = 0; t < TC; ++t) {
      if (t + PD < TC) load_step(t + PD, s[t + PD]);
      run_step(t, s[t]);
    }
  } else {
    for (int t = 0; t < len; ++t) {
      Step nxt;
      if (t + 1 < len) load_step(t + 1, nxt);
      run_step(t, cur);
      if (t + 1 < len) cur = nxt;
    }
  }
}

// The fast-path instance that runs plan pl (kernel kFast / kFastMtp, varlen included, pl.nv rows
// per thread) of p, nullptr when none does. One selection for the CUDA launcher
// (ssu_cuda_launch.cuh) and the host emulation (ssu_cuda_emu.cc).
using FastKernel = void (*)(const Params, const Launch);

// The instance with T = steps compiled in (fast_mtp_steps), nullptr when there is none.
template <DType ST, DType IT, int N, int KV>
FastKernel fast_kernel_steps(int steps) {
  if constexpr (fast_mtp_steps_types(ST, IT, N)) {
    switch (steps) {
      case 2: return ssu_fast_mtp<ST, IT, N, KV, false, false, 2>;
      case 4: return ssu_fast_mtp<ST, IT, N, KV, false, false, 4>;
      case 6: return ssu_fast_mtp<ST, IT, N, KV, false, false, 6>;
      case 8: return ssu_fast_mtp<ST, IT, N, KV, false, false, 8>;
      default: return nullptr;
    }
  }
  return nullptr;
}

template <DType ST, DType IT, int N, int KV, bool SR>
FastKernel fast_kernel_sr(const Params& p, const Plan& pl) {
  if (pl.kernel == Kernel::kFastMtp) {
    if constexpr (!SR) {
      if (pl.steps > 0 && !p.varlen) return fast_kernel_steps<ST, IT, N, KV>(pl.steps);
    }
    if (!p.varlen) return ssu_fast_mtp<ST, IT, N, KV, SR>;
    if constexpr (fast_varlen_dstate(N) && fast_varlen_input(IT))
      return ssu_fast_mtp<ST, IT, N, KV, SR, true>;  // varlen: grid z = sequences + 1
    return nullptr;
  }
  if (p.dt_elem || p.A_elem || p.D_elem || p.bias_elem) {
    if constexpr (fast_elem_dstate(N)) return ssu_fast<ST, IT, N, KV, true, SR>;
    return nullptr;
  }
  return ssu_fast<ST, IT, N, KV, false, SR>;
}

// Stochastic rounding (a seed with a 16-bit float state) has instances of its own; a seed
// with any other state dtype is refused before it gets here and would be ignored.
template <DType ST, DType IT, int N, int KV>
FastKernel fast_kernel_kv(const Params& p, const Plan& pl) {
  if constexpr (ST == DType::BF16 || ST == DType::F16)
    if (p.has_seed) return fast_kernel_sr<ST, IT, N, KV, true>(p, pl);
  return fast_kernel_sr<ST, IT, N, KV, false>(p, pl);
}

template <DType ST, DType IT, int N>
FastKernel fast_kernel_n(const Params& p, const Plan& pl) {
  switch (pl.nv) {
    case 1: return fast_kernel_kv<ST, IT, N, 1>(p, pl);
    case 2: return fast_kernel_kv<ST, IT, N, 2>(p, pl);
    case 4: return fast_kernel_kv<ST, IT, N, 4>(p, pl);
    default: return nullptr;
  }
}

template <DType ST, DType IT>
FastKernel fast_kernel(const Params& p, const Plan& pl) {
  if (pl.kernel != Kernel::kFast && pl.kernel != Kernel::kFastMtp) return nullptr;
  switch (p.N) {
    case 16: return fast_kernel_n<ST, IT, 16>(p, pl);
    case 32: return fast_kernel_n<ST, IT, 32>(p, pl);
    case 64: return fast_kernel_n<ST, IT, 64>(p, pl);
    case 128: return fast_kernel_n<ST, IT, 128>(p, pl);
    case 256: return fast_kernel_n<ST, IT, 256>(p, pl);
    default: return nullptr;
  }
}

}  // namespace cuda
}  // namespace ssu

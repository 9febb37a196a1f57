// The device-side row/step module every CUDA strategy shares: typed loads and stores of the
// state and inputs (int16 scales, stochastic rounding), the recurrence's helpers, group
// reductions, the CTA prologue (grid decomposition, varlen coverage and zero fill, invalid
// entries) and run_rows, the T steps of a lane group's rows held in registers.
//
// Strategies (one file each, named as users pass `algorithm`; planned in ssu_plan.cc, launched
// by ssu_cuda_launch.cuh): ssu_cuda_simple.cuh (lane groups up to a warp per row; its
// single-step persistent form in ssu_cuda_simple_step1.cuh), ssu_cuda_horizontal.cuh (few
// lanes, many columns each), ssu_cuda_vertical.cuh (shared-memory ring of row tiles) and the
// generic fallback ssu_cuda_generic.cuh (any dstate).
//
// Every CTA works on one (entry, head, row chunk): entry = batch row or varlen sequence, so
// resolve_entry (ssu_params.h) runs uniformly per CTA on device-resident indices.
// Varlen (docs/semantics.md, "Invalid runtime data"): a valid sequence owns its rows of `out` alone
// (overlapping sequences are both invalid, resolve_entry), so CTAs never write the same row with
// different values; rows no sequence owns are zeroed by extra "zero" CTAs.
#pragma once
#include <atomic>
#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "ssu_cuda_plan.cuh"
#include "ssu_math.h"
#include "ssu_params.h"

namespace ssu {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// scalar and vector conversions
// ---------------------------------------------------------------------------------------------

template <DType T>
__device__ __forceinline__ float half_word(uint32_t w, int hi) {  // 16-bit element of a word
  const uint32_t h = hi ? (w >> 16) : (w & 0xffffu);
  if constexpr (T == DType::BF16)
    return __uint_as_float(h << 16);
  else if constexpr (T == DType::F16)
    return __half2float(__ushort_as_half((unsigned short)h));
  else  // I16: 1.5 * 2^23 + (h ^ 0x8000) is exact in fp32; subtracting 1.5 * 2^23 + 2^15 leaves the
        // signed value (two full-rate instructions where I2F issues at a quarter of the rate)
    return __uint_as_float((h ^ 0x8000u) | 0x4B400000u) - 12615680.f;
}

template <DType T>
__device__ __forceinline__ float ld_scalar(const void* base, int64_t i) {  // read-only inputs
  if constexpr (T == DType::F32)
    return __ldg(static_cast<const float*>(base) + i);
  else {
    const uint16_t u = __ldg(static_cast<const unsigned short*>(base) + i);
    if constexpr (T == DType::BF16)
      return __uint_as_float(uint32_t(u) << 16);
    else if constexpr (T == DType::F16)
      return __half2float(__ushort_as_half(u));
    else
      return float(int16_t(u));
  }
}

// dt / D / dt_bias: dtype known only at run time (uniform branch).
__device__ __forceinline__ float ld_w(const void* base, DType t, int64_t i) {
  switch (t) {
    case DType::F32: return ld_scalar<DType::F32>(base, i);
    case DType::BF16: return ld_scalar<DType::BF16>(base, i);
    default: return ld_scalar<DType::F16>(base, i);
  }
}

template <DType T>
__device__ __forceinline__ uint16_t to16_rn(float v) {
  if constexpr (T == DType::BF16)
    return f32_to_bf16_rn(v);
  else
    return __half_as_ushort(__float2half_rn(v));
}

// out / NaN / zero stores (round to nearest even).
template <DType T>
__device__ __forceinline__ void st_out(void* base, int64_t i, float v) {
  if constexpr (T == DType::F32)
    static_cast<float*>(base)[i] = v;
  else
    static_cast<uint16_t*>(base)[i] = to16_rn<T>(v);
}

// E consecutive input elements (E * sizeof(T) bytes, aligned to that size) as raw 32-bit words:
// E of them for fp32, E / 2 (two elements each) for 16-bit inputs. Held this way, a prefetched
// vector costs half the registers of its fp32 values (ssu_fast_mtp's next step).
template <DType T, int E>
struct InWords {
  static constexpr int value = T == DType::F32 ? E : E / 2;
};

template <DType T, int E>
__device__ __forceinline__ void ld_in_words(const void* base, int64_t i,
                                            uint32_t (&w)[InWords<T, E>::value]) {
  if constexpr (T == DType::F32) {
    const uint4* q = reinterpret_cast<const uint4*>(static_cast<const float*>(base) + i);
#pragma unroll
    for (int j = 0; j < E / 4; ++j) {
      const uint4 f = __ldg(q + j);
      w[4 * j] = f.x;
      w[4 * j + 1] = f.y;
      w[4 * j + 2] = f.z;
      w[4 * j + 3] = f.w;
    }
  } else {
    const uint16_t* b = static_cast<const uint16_t*>(base) + i;
    if constexpr (E == 8) {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(b));
      w[0] = u.x;
      w[1] = u.y;
      w[2] = u.z;
      w[3] = u.w;
    } else {
      static_assert(E == 4, "16-bit input vectors are 4 or 8 elements");
      const uint2 u = __ldg(reinterpret_cast<const uint2*>(b));
      w[0] = u.x;
      w[1] = u.y;
    }
  }
}

// The words of ld_in_words as fp32.
template <DType T, int E>
__device__ __forceinline__ void cvt_in_words(const uint32_t (&w)[InWords<T, E>::value],
                                             float (&v)[E]) {
  if constexpr (T == DType::F32) {
#pragma unroll
    for (int j = 0; j < E; ++j)
      v[j] = __uint_as_float(w[j]);
  } else {
#pragma unroll
    for (int j = 0; j < E / 2; ++j) {
      v[2 * j] = half_word<T>(w[j], 0);
      v[2 * j + 1] = half_word<T>(w[j], 1);
    }
  }
}

// E consecutive input elements (E * sizeof(T) bytes, aligned to that size) as fp32.
template <DType T, int E>
__device__ __forceinline__ void ld_in_vec(const void* base, int64_t i, float (&v)[E]) {
  uint32_t w[InWords<T, E>::value];
  ld_in_words<T, E>(base, i, w);
  cvt_in_words<T, E>(w, v);
}

// The E elements of one 16-byte state vector (raw words, e.g. from shared memory) -> fp32.
template <DType ST>
__device__ __forceinline__ void cvt_state_vec(const uint4 u, float* v) {
  if constexpr (ST == DType::F32) {
    v[0] = __uint_as_float(u.x);
    v[1] = __uint_as_float(u.y);
    v[2] = __uint_as_float(u.z);
    v[3] = __uint_as_float(u.w);
  } else {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      v[2 * j] = half_word<ST>(w[j], 0);
      v[2 * j + 1] = half_word<ST>(w[j], 1);
    }
  }
}

// One 16-byte state vector (E elements) -> fp32 (streaming load: read once, written once).
template <DType ST, int E>
__device__ __forceinline__ void ld_state_vec(const void* base, int64_t i, float* v) {
  cvt_state_vec<ST>(
      __ldcs(reinterpret_cast<const uint4*>(static_cast<const typename Stor<ST>::type*>(base) + i)),
      v);
}

// int16 encoding without a division per element (docs/semantics.md "int16 state": rint of
// clamp(v / scale) with IEEE division, as the CPU handler's int16_encode). i16_rcp: the row's
// correctly rounded reciprocal, or 0 where the scale is outside [2^-96, 2^96]. With it the
// quotient is q0 = v * rc corrected once by its exact residual (Markstein): the correctly
// rounded v / sc whenever the residual does not underflow, i.e. for every |q| >= 2^-28 at such
// scales, and where it is smaller both round to 0 (3e8 random and adversarial pairs: the same
// int16 every time). Then int16_encode's clamp, and its rint as the 1.5 * 2^23 addition (half
// to even, exact for |q| <= 32767) whose low 16 bits are the two's-complement value: the same
// code on the GPU and in the host emulation, so the emulated encoder test covers it.
__device__ __forceinline__ float i16_rcp(float sc) {
  return sc >= 0x1p-96f && sc <= 0x1p96f ? __frcp_rn(sc) : 0.f;
}
template <bool FAST>
__device__ __forceinline__ uint32_t i16_bits(float v, float sc, float rc) {
  if constexpr (FAST) {
    const float q0 = v * rc;
    const float q = fminf(fmaxf(fmaf(rc, fmaf(-sc, q0, v), q0), -32767.f), 32767.f);
    return __float_as_uint(q + 12582912.f) & 0xffffu;
  } else {
    return uint16_t(int16_encode(v, sc));
  }
}
template <bool FAST>
__device__ __forceinline__ uint4 pack_i16(const float* v, float sc, float rc) {
  uint32_t w[4];
#pragma unroll
  for (int j = 0; j < 4; ++j)
    w[j] = i16_bits<FAST>(v[2 * j], sc, rc) | (i16_bits<FAST>(v[2 * j + 1], sc, rc) << 16);
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// fp32 values of one 16-byte state vector -> its stored words (round to nearest even; int16:
// encoded with the row's scale `sc` and its i16_rcp `rc`, docs/semantics.md "int16 state").
template <DType ST>
__device__ __forceinline__ uint4 pack_state(const float* v, float sc = 1.f, float rc = 0.f) {
  if constexpr (ST == DType::I16) {
    return rc != 0.f ? pack_i16<true>(v, sc, rc) : pack_i16<false>(v, sc, rc);
  } else if constexpr (ST == DType::F32) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
                      __float_as_uint(v[3]));
  } else {
    uint32_t w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if constexpr (ST == DType::BF16) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);
        w[j] = *reinterpret_cast<const uint32_t*>(&h);
      } else {
        const __half2 h = __floats2half2_rn(v[2 * j], v[2 * j + 1]);
        w[j] = *reinterpret_cast<const uint32_t*>(&h);
      }
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// fp32 values of one 16-byte vector of a 16-bit float state -> its stored words with
// stochastic rounding: element i takes sr_half(r, i), r being the Philox output of the
// vector's group of 8 elements (ssu_math.h sr_block; the vector starts at a multiple of 8).
template <DType ST>
__device__ __forceinline__ uint4 pack_state_sr(const float* v, const Rand4& r) {
  static_assert(ST == DType::BF16 || ST == DType::F16, "stochastic rounding: 16-bit floats");
  uint32_t w[4];
  if constexpr (ST == DType::F16) {
    // fp16's normal range, as f32_to_f16_sr: the top 13 random bits added to the 13 dropped bits,
    // which are then cleared; the value left is an fp16 (or >= 65536) and the hardware's packed
    // round-to-nearest conversion stores it exactly (or as Inf): a few integer operations per
    // element instead of the whole rule. A vector with an element outside that range (fp16
    // subnormal, Inf / NaN) takes the rule element by element. (The carry written as a shared
    // helper cost 4 registers here under nvcc 13.0: 71 -> 75, 7 -> 6 CTAs per SM.)
    uint32_t rb[8];
    bool other = false;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t u = __float_as_uint(v[i]), a = u & 0x7fffffffu;
      other |= a - 0x38800000u >= 0x7f800000u - 0x38800000u;  // a < 2^-14 or not finite
      rb[i] = ((a + (sr_half(r, i) >> 3)) & 0x7fffe000u) | (u & 0x80000000u);
    }
    if (!other) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const __half2 h =
            __floats2half2_rn(__uint_as_float(rb[2 * j]), __uint_as_float(rb[2 * j + 1]));
        w[j] = *reinterpret_cast<const uint32_t*>(&h);
      }
      return make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t lo =
        ST == DType::BF16 ? f32_to_bf16_sr(v[2 * j], r.r[j]) : f32_to_f16_sr(v[2 * j], r.r[j]);
    const uint32_t hi = ST == DType::BF16 ? f32_to_bf16_sr(v[2 * j + 1], r.r[j] >> 16)
                                          : f32_to_f16_sr(v[2 * j + 1], r.r[j] >> 16);
    w[j] = lo | (hi << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

struct StoreCtx {  // what a state store needs besides the values
  bool sr;
  int rounds;
  uint32_t k0, k1;
};

// Stores E fp32 values as one 16-byte state vector at element offset `off` (off % E == 0).
// `sc`: the int16 row scale. With stochastic rounding (16-bit states, E == 8, off % 8 == 0)
// the vector is exactly the Philox group off / 8 (sr_block, ssu_math.h).
template <DType ST, int E>
__device__ __forceinline__ void st_state_vec(void* base, int64_t off, const float* v, float sc,
                                             const StoreCtx& sx, uint32_t t, uint32_t kind) {
  uint4* dst = reinterpret_cast<uint4*>(static_cast<typename Stor<ST>::type*>(base) + off);
  if constexpr (ST == DType::BF16 || ST == DType::F16) {
    if (sx.sr) {
      __stcs(dst, pack_state_sr<ST>(v, sr_block(uint64_t(off), t, kind, sx.k0, sx.k1, sx.rounds)));
      return;
    }
  }
  __stcs(dst, pack_state<ST>(v, sc));
}

// One state element (generic kernel): plain loads/stores, SR per element.
template <DType ST>
__device__ __forceinline__ float ld_state_scalar(const void* base, int64_t i) {
  const auto u = static_cast<const typename Stor<ST>::type*>(base)[i];
  if constexpr (ST == DType::F32)
    return u;
  else if constexpr (ST == DType::I16)
    return float(u);
  else
    return half_word<ST>(uint32_t(u), 0);
}

template <DType ST>
__device__ __forceinline__ void st_state_scalar(void* base, int64_t i, float v, float sc,
                                                const StoreCtx& sx, uint32_t t, uint32_t kind) {
  auto* q = static_cast<typename Stor<ST>::type*>(base);
  if constexpr (ST == DType::F32)
    q[i] = v;
  else if constexpr (ST == DType::I16)
    q[i] = int16_encode(v, sc);
  else {
    if (sx.sr) {
      const uint32_t rnd =
          sr_half(sr_block(uint64_t(i), t, kind, sx.k0, sx.k1, sx.rounds), int(i & 7));
      q[i] = ST == DType::BF16 ? f32_to_bf16_sr(v, rnd) : f32_to_f16_sr(v, rnd);
    } else {
      q[i] = to16_rn<ST>(v);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// recurrence scalars (fast intrinsics; the state/out encodings above are exact)
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float dev_softplus(float v) { return v <= 20.f ? log1pf(__expf(v)) : v; }
__device__ __forceinline__ float dev_gate(float y, float z) { return y * (z / (1.f + __expf(-z))); }

template <int WIDTH>
__device__ __forceinline__ float group_sum(float v, int L) {
#pragma unroll
  for (int o = WIDTH / 2; o > 0; o >>= 1)
    if (o < L) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <int WIDTH>
__device__ __forceinline__ float group_max(float v, int L) {
#pragma unroll
  for (int o = WIDTH / 2; o > 0; o >>= 1)
    if (o < L) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float dt_value(const Params& p, int64_t row, int64_t h, int64_t hp,
                                          float bias) {
  float d = ld_w(p.dt, p.param_t, p.dt_elem ? row * p.H * p.P + hp : row * p.H + h) + bias;
  return p.softplus ? dev_softplus(d) : d;
}

__device__ __forceinline__ StoreCtx store_ctx(const Params& p, bool sr_dtype) {
  StoreCtx s{false, p.philox_rounds, 0u, 0u};
  if (sr_dtype && p.has_seed) {
    s.sr = true;
    s.k0 = __ldg(p.seed);
    s.k1 = __ldg(p.seed + 1);
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// CTA prologue: grid decomposition, varlen coverage, zero fill, invalid entries
// ---------------------------------------------------------------------------------------------

// Rows of `out` that no sequence owns are 0 (docs/semantics.md, "Invalid runtime data"). With
// cu_seqlens non-decreasing they are [0, cu[0]) and [cu[nb], rows); otherwise (invalid input, the
// slow path) each row's ownership is looked up over all sequences. Main CTAs never write these
// rows.
template <DType IT>
__device__ void zero_fill(const Params& p, const Launch& l, int64_t zb) {
  bool mono = true;
  for (int64_t i = threadIdx.x; i < p.nb; i += blockDim.x)
    mono = mono && load_index(p.cu_seqlens, p.cu_seqlens64, i) <=
                       load_index(p.cu_seqlens, p.cu_seqlens64, i + 1);
  mono = __syncthreads_and(mono);
  const int64_t HP = p.H * p.P;
  if (mono) {
    const int64_t lo = clamp_rows(load_index(p.cu_seqlens, p.cu_seqlens64, 0), p.rows);
    int64_t hi = clamp_rows(load_index(p.cu_seqlens, p.cu_seqlens64, p.nb), p.rows);
    if (hi < lo) hi = lo;
    const int64_t n1 = lo * HP, n = n1 + (p.rows - hi) * HP;
    for (int64_t i = zb * blockDim.x + threadIdx.x; i < n; i += l.zero_blocks * blockDim.x)
      st_out<IT>(p.out, i < n1 ? i : hi * HP + (i - n1), 0.f);
    return;
  }
  for (int64_t r = zb; r < p.rows; r += l.zero_blocks) {
    bool owned = false;
    for (int64_t s = threadIdx.x; s < p.nb && !owned; s += blockDim.x) {
      const SeqSpan q = seq_span(p, s);
      owned = r >= q.lo && r < q.hi;
    }
    if (__syncthreads_or(owned)) continue;
    for (int64_t i = threadIdx.x; i < HP; i += blockDim.x)
      st_out<IT>(p.out, r * HP + i, 0.f);
  }
}

// One CTA's entry, resolved (valid and non-empty). 32-bit fields: slot, row and entry counts
// are below 2^31 (checked on the host); element offsets are formed in 64 bits where used.
struct Ctx {
  int b, h, chunk;
  int row0, len, src, ii;  // first row, steps, slot read, intermediate row (-1: none)
  bool padded;
  // Slot of `state` written after step t (-1: none), per ssu_params.h.
  __device__ int write_slot(const Params& p, int t) const {
    const Entry e{row0, len, src, ii, true, padded, 0, 0};
    return int(state_write_slot(p, e, b, t));
  }
};

// Returns false when the CTA has nothing left to do (zero CTA, invalid entry, empty entry).
// Called by every thread of the CTA (it synchronises).
template <DType IT>
__device__ __forceinline__ bool prologue(const Params& p, const Launch& l, Ctx& c) {
  const int64_t blk = blockIdx.x;
  if (blk >= l.main_blocks) {
    zero_fill<IT>(p, l, blk - l.main_blocks);
    return false;
  }
  // 32-bit divisions (the grid is < 2^31 CTAs; 64-bit division is a slow call)
  const unsigned ublk = unsigned(blk), uch = unsigned(l.chunks), uH = unsigned(p.H);
  c.chunk = int(ublk % uch);
  const unsigned bh = ublk / uch;
  c.h = int(bh % uH);
  c.b = int(bh / uH);
  bool overlapped = false;
  if (p.varlen) {  // seq_overlaps, the sequences split over the CTA's threads
    const SeqSpan q = seq_span(p, c.b);
    const int64_t per = (p.nb + blockDim.x - 1) / blockDim.x, t0 = threadIdx.x * per;
    const bool mine =
        seq_overlaps(p, q, c.b, t0 < p.nb ? t0 : p.nb, t0 + per < p.nb ? t0 + per : p.nb);
    overlapped = __syncthreads_or(mine);
  }
  const Entry e = resolve_entry(p, c.b, overlapped);
  if (!e.valid) {  // NaN over the entry's rows, this CTA's (head, row chunk) part
    const int p0 = c.chunk * l.rows_cta;
    const int p1 = p0 + l.rows_cta < p.P ? p0 + l.rows_cta : int(p.P);
    const float nan = __int_as_float(0x7fc00000);
    for (int row = int(e.nan_lo); row < int(e.nan_hi); ++row)
      for (int pp = p0 + int(threadIdx.x); pp < p1; pp += blockDim.x)
        st_out<IT>(p.out, (int64_t(row) * p.H + c.h) * p.P + pp, nan);
    return false;
  }
  c.row0 = int(e.row0);
  c.len = int(e.len);
  c.src = int(e.src);
  c.ii = int(e.ii);
  c.padded = e.padded;
  return e.len > 0;
}

// ---------------------------------------------------------------------------------------------
// run_rows: the T steps of the register-row kernels
// ---------------------------------------------------------------------------------------------

// The T steps of the register-row kernels (simple, horizontal, vertical) on the RM rows a lane
// group holds decoded in `s` (fp32, NV 16-byte vectors per lane): recurrence, group reduction, out,
// and the state / intermediate stores. Rows: hp[r] (head*P + p), active where bit r of `act`.
// load_bc(t, k, Bk, Ck) writes the E values of step t's B and C at this lane's vector k; with
// several rows per lane they are loaded once per step for all rows.
template <DType ST, DType IT, int NV, int RM, int V, typename LoadBC>
__device__ __forceinline__ void run_rows(const Params& p, const Ctx& c, int L, int lane,
                                         const int (&hp)[RM], unsigned act, float (&s)[RM][V],
                                         LoadBC&& load_bc) {
  constexpr int E = 16 / int(sizeof(typename Stor<ST>::type));
  static_assert(V == E * NV, "rows hold NV state vectors per lane");
  constexpr bool kSR = ST == DType::BF16 || ST == DType::F16;
  const int HP = int(p.H * p.P);
  const int h = c.h;
  const int64_t N = p.N;
  const int nvec = int(N / E);
  auto on = [&](int r) { return (act >> r) & 1u; };
  auto vok = [&](int k) { return lane + k * L < nvec; };
  auto col = [&](int k) { return int64_t(lane + k * L) * E; };

  // per-head parameters (per-element ones are read where used)
  const float Dh = p.has_D && !p.D_elem ? ld_w(p.D, p.param_t, h) : 0.f;
  const float bias_h = p.has_dt_bias && !p.bias_elem ? ld_w(p.dt_bias, p.param_t, h) : 0.f;
  const bool dt_row = p.dt_elem || p.bias_elem;  // dt differs between rows
  const float Ah = p.A_elem ? 0.f : __ldg(p.A + h);

  // Stores the R rows at row block `rb` (state: slot*HP, intermediate: (ii*CS + t)*HP).
  auto store_rows = [&](void* base, float* scales, int64_t rb, uint32_t t, uint32_t kind) {
    const StoreCtx sx = store_ctx(p, kSR);
#pragma unroll
    for (int r = 0; r < RM; ++r) {
      float sc = 1.f;
      if constexpr (ST == DType::I16) {
        float am = 0.f;
#pragma unroll
        for (int i = 0; i < V; ++i)
          am = fmaxf(am, fabsf(s[r][i]));
        am = group_max<32>(am, L);
        sc = int16_scale(am);
        if (lane == 0 && on(r)) scales[rb + hp[r]] = sc;
      }
      if (!on(r)) continue;
#pragma unroll
      for (int k = 0; k < NV; ++k)
        if (vok(k))
          st_state_vec<ST, E>(base, (rb + hp[r]) * N + col(k), &s[r][k * E], sc, sx, t, kind);
    }
  };

  for (int t = 0; t < c.len; ++t) {
    const int row = c.row0 + t;
    const int64_t xrow = int64_t(row) * HP;
    float Bv[RM > 1 ? V : 1], Cv[RM > 1 ? V : 1];
    if constexpr (RM > 1) {
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        if (vok(k)) {
          load_bc(t, k, &Bv[k * E], &Cv[k * E]);
        } else {
#pragma unroll
          for (int i = 0; i < E; ++i) {
            Bv[k * E + i] = 0.f;
            Cv[k * E + i] = 0.f;
          }
        }
      }
    }
    float dt_h = 0.f;
    if (!dt_row) dt_h = dt_value(p, row, h, 0, bias_h);
    const float dA_h = __expf(Ah * dt_h);
    float y[RM], xr[RM];
#pragma unroll
    for (int r = 0; r < RM; ++r) {
      xr[r] = on(r) ? ld_scalar<IT>(p.x, xrow + hp[r]) : 0.f;
      float dtr = dt_h, dA = dA_h;
      if (dt_row) {
        const float b = p.has_dt_bias && p.bias_elem ? ld_w(p.dt_bias, p.param_t, hp[r]) : bias_h;
        dtr = dt_value(p, row, h, hp[r], b);
        dA = __expf(Ah * dtr);
      }
      float acc = 0.f;
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        if (!vok(k)) continue;
        float Bk[E], Ck[E];
        if constexpr (RM > 1) {
#pragma unroll
          for (int i = 0; i < E; ++i) {
            Bk[i] = Bv[k * E + i];
            Ck[i] = Cv[k * E + i];
          }
        } else {
          load_bc(t, k, Bk, Ck);
        }
        float a[E];
        if (p.A_elem) {
          const float4* ap = reinterpret_cast<const float4*>(p.A + int64_t(hp[r]) * N + col(k));
#pragma unroll
          for (int j = 0; j < E / 4; ++j) {
            const float4 f = __ldg(ap + j);
            a[4 * j] = __expf(f.x * dtr);
            a[4 * j + 1] = __expf(f.y * dtr);
            a[4 * j + 2] = __expf(f.z * dtr);
            a[4 * j + 3] = __expf(f.w * dtr);
          }
        } else {
#pragma unroll
          for (int i = 0; i < E; ++i)
            a[i] = dA;
        }
#pragma unroll
        for (int i = 0; i < E; ++i) {
          // same association as the CPU: s*dA + (B*dt)*x (contracted to FMAs)
          const float sv = s[r][k * E + i] * a[i] + (Bk[i] * dtr) * xr[r];
          s[r][k * E + i] = sv;
          acc += sv * Ck[i];
        }
      }
      y[r] = acc;
    }
#pragma unroll
    for (int r = 0; r < RM; ++r)
      y[r] = group_sum<32>(y[r], L);
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < RM; ++r) {
        if (!on(r)) continue;
        const float Dv = p.has_D && p.D_elem ? ld_w(p.D, p.param_t, hp[r]) : Dh;
        float v = y[r] + Dv * xr[r];
        if (p.has_z) v = dev_gate(v, ld_scalar<IT>(p.z, xrow + hp[r]));
        st_out<IT>(p.out, xrow + hp[r], v);
      }
    }
    const int d = c.write_slot(p, t);
    if (d >= 0) store_rows(p.state, p.state_scale, int64_t(d) * HP, uint32_t(t), 0u);
    if (c.ii >= 0 && t < p.CS)
      store_rows(p.inter, p.inter_scales, (int64_t(c.ii) * p.CS + t) * HP, uint32_t(t), 1u);
  }
}

}  // namespace cuda
}  // namespace ssu

// Per-element math shared by the CPU and CUDA kernels: softplus, gating, Philox-4x32,
// round-to-nearest and stochastic rounding to 16-bit floats, int16 row encode/decode.
// Everything is plain scalar code on bit patterns so host and device give the same bits
// (the device may still use faster exp/log intrinsics in the recurrence itself).
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__CUDACC__)
#define SSU_HD __host__ __device__ __forceinline__
#else
#define SSU_HD inline
#endif

namespace ssu {

// Element types the kernels understand (values chosen independently of XLA's enum).
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2, I16 = 3 };

// The element type a DType is stored as (16-bit floats as raw bits).
template <DType T>
struct Stor;
template <>
struct Stor<DType::F32> {
  using type = float;
};
template <>
struct Stor<DType::BF16> {
  using type = uint16_t;
};
template <>
struct Stor<DType::F16> {
  using type = uint16_t;
};
template <>
struct Stor<DType::I16> {
  using type = int16_t;
};

SSU_HD uint32_t f32_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
#endif
}
SSU_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float v;
  std::memcpy(&v, &u, 4);
  return v;
#endif
}

// ---- 16-bit float <-> fp32 (exact widening; narrowing rounds to nearest even) ----
SSU_HD float bf16_to_f32(uint16_t h) { return bits_f32(uint32_t(h) << 16); }

SSU_HD uint16_t f32_to_bf16_rn(float v) {
  uint32_t u = f32_bits(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

SSU_HD float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return bits_f32(sign | 0x7f800000u | (m << 13));
  if (e == 0) {  // zero or subnormal: m * 2^-24
    float v = float(m) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

// fp32 -> fp16, round to nearest even, with subnormals and overflow to Inf.
SSU_HD uint16_t f32_to_f16_rn(float v) {
  uint32_t u = f32_bits(v);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to Inf
  if (a >= 0x38800000u) {                                 // normal fp16 range
    uint32_t r = a + 0x0fffu + ((a >> 13) & 1u);
    return uint16_t(sign | ((r - 0x38000000u) >> 13));
  }
  // subnormal: value = q * 2^-24 with q rounded to nearest even integer
  float q = bits_f32(a) * 16777216.0f;  // exact (power-of-two scale)
  float fl = floorf(q);
  float fr = q - fl;
  uint32_t qi = uint32_t(fl);
  if (fr > 0.5f || (fr == 0.5f && (qi & 1u))) ++qi;
  return uint16_t(sign | qi);
}

// ---- Philox-4x32 (Salmon et al.), key = 64-bit seed, counter = 4 words ----
struct Rand4 {
  uint32_t r[4];
};

// One Philox round: both halves of each 32x32 product from one wide multiply.
SSU_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                         uint32_t k1) {  // Random123 / Triton tl.randint4x round function
  const uint64_t m0 = uint64_t(0xD2511F53u) * c0, m2 = uint64_t(0xCD9E8D57u) * c2;
  const uint32_t n0 = uint32_t(m2 >> 32) ^ c1 ^ k0;
  const uint32_t n2 = uint32_t(m0 >> 32) ^ c3 ^ k1;
  c0 = n0;
  c1 = uint32_t(m2);
  c2 = n2;
  c3 = uint32_t(m0);
}

// R rounds known at compile time: straight-line code (the loop, its counter and the key
// additions fold away; the per-round keys are shared by every call of a thread).
template <int R>
SSU_HD Rand4 philox4x32_r(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                          uint32_t k1) {
#pragma unroll
  for (int i = 0; i < R; ++i)
    philox_round(c0, c1, c2, c3, k0 + uint32_t(i) * 0x9E3779B9u, k1 + uint32_t(i) * 0xBB67AE85u);
  return Rand4{{c0, c1, c2, c3}};
}

// The default round count (docs/semantics.md): its unrolled form serves every call that uses it.
constexpr int kPhiloxDefaultRounds = 10;

SSU_HD Rand4 philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                        uint32_t k1, int rounds) {
  if (rounds == kPhiloxDefaultRounds)
    return philox4x32_r<kPhiloxDefaultRounds>(c0, c1, c2, c3, k0, k1);
  for (int i = 0; i < rounds; ++i) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Rand4{{c0, c1, c2, c3}};
}

// Stochastic-rounding bits (docs/semantics.md, "Stochastic rounding"): a store of kind `kind`
// (0 = state cache, 1 = intermediate buffer) at step `t` draws one Philox call per group of 8
// consecutive elements of the destination buffer, counter (g low, g high, t, kind) with
// g = e / 8 for the element's linear index e in that buffer; element e takes the 16-bit half
// e % 8 of the call's output: word (e % 8) / 2, its low half for even e, its high half for odd.
// sr_block: the Philox output of e's group; sr_half: the 16 bits of element i = e % 8 in it.
SSU_HD Rand4 sr_block(uint64_t e, uint32_t t, uint32_t kind, uint32_t k0, uint32_t k1, int rounds) {
  const uint64_t g = e >> 3;
  return philox4x32(uint32_t(g), uint32_t(g >> 32), t, kind, k0, k1, rounds);
}
SSU_HD uint32_t sr_half(const Rand4& r, int i) {
  const int w = i >> 1;  // selects, not r.r[w]: a runtime index would put r in local memory
  const uint32_t x = w == 0 ? r.r[0] : w == 1 ? r.r[1] : w == 2 ? r.r[2] : r.r[3];
  return (x >> ((i & 1) * 16)) & 0xffffu;
}

// ---- stochastic rounding (unbiased: E[result] = v), from 16 random bits (the low half of rnd)
// ---- bf16: add the 16 random bits to the 16 dropped mantissa bits, then truncate (bf16 shares
// fp32's exponent range, so this is exact SR for normals and subnormals alike).
SSU_HD uint16_t f32_to_bf16_sr(float v, uint32_t rnd) {
  uint32_t u = f32_bits(v);
  if ((u & 0x7f800000u) == 0x7f800000u) return f32_to_bf16_rn(v);  // Inf / NaN
  u += rnd & 0xffffu;
  return uint16_t(u >> 16);
}

// fp16: normal range -> add the top 13 of the 16 random bits to the 13 dropped mantissa bits
// and truncate (exact); subnormal range -> the grid is 2^-24: |v|*2^24 = q + f (q integer,
// 0 <= f < 1) rounds up to q + 1 when (r + 1/2) / 2^16 < f for the 16-bit random r, i.e. with
// probability f rounded to a multiple of 2^-16.
SSU_HD uint16_t f32_to_f16_sr(float v, uint32_t rnd) {
  uint32_t u = f32_bits(v);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return f32_to_f16_rn(v);
  if (a >= 0x38800000u) {
    uint32_t r = (a + ((rnd & 0xffffu) >> 3)) & ~0x1fffu;
    if (r >= 0x47800000u) return uint16_t(sign | 0x7c00u);  // beyond 65504 -> Inf
    return uint16_t(sign | ((r - 0x38000000u) >> 13));
  }
  float q = bits_f32(a) * 16777216.0f;
  float fl = floorf(q);
  float fr = q - fl;  // exact
  uint32_t qi = uint32_t(fl);
  if ((float(rnd & 0xffffu) + 0.5f) * 1.52587890625e-05f < fr) ++qi;  // (r + 1/2) * 2^-16: exact
  return uint16_t(sign | qi);
}

// ---- the recurrence's scalar pieces ----
SSU_HD float softplus20(float v) { return v <= 20.f ? log1pf(expf(v)) : v; }
SSU_HD float silu_gate(float y, float z) { return y * (z / (1.f + expf(-z))); }

// ---- int16 block scaling: one scale per row, scale = amax / 32767 (1 for an all-zero row) ----
SSU_HD float int16_scale(float amax) { return amax > 0.f ? amax / 32767.f : 1.f; }
SSU_HD int16_t int16_encode(float v, float scale) {
  float q = v / scale;
#if defined(__CUDA_ARCH__)
  q = fminf(fmaxf(q, -32767.f), 32767.f);
  return int16_t(rintf(q));  // q is finite and in range, rintf rounds half to even
#else
  // fmaxf/fminf semantics (a NaN q clamps to -32767) as compares, which vectorise
  q = q > -32767.f ? q : -32767.f;
  q = q < 32767.f ? q : 32767.f;
  // Same bits as rintf (half to even) for |q| < 2^22, and vectorisable: a libm call per
  // element made the CPU int16 path slower than the jnp reference.
  const float magic = 12582912.f;  // 1.5 * 2^23 (no -ffast-math: the sum is not folded)
  return int16_t((q + magic) - magic);
#endif
}

}  // namespace ssu

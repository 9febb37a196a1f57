// CPU handler: the reference-speed implementation of SPEC §3 on ssu::Params.
// One row (slot, head, p) at a time: decode, run the T steps in fp32, store per §3.1.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "nanobind/nanobind.h"
#include "ssu_ffi.h"

namespace ssu {
namespace {

template <DType T> struct Storage;
template <> struct Storage<DType::F32> { using type = float; };
template <> struct Storage<DType::BF16> { using type = uint16_t; };
template <> struct Storage<DType::F16> { using type = uint16_t; };
template <> struct Storage<DType::I16> { using type = int16_t; };

template <DType T>
inline float ld(const void* p, int64_t i) {
  auto v = static_cast<const typename Storage<T>::type*>(p)[i];
  if constexpr (T == DType::F32) return v;
  else if constexpr (T == DType::BF16) return bf16_to_f32(v);
  else if constexpr (T == DType::F16) return f16_to_f32(v);
  else return float(v);
}

template <DType T>
inline void st_rn(void* p, int64_t i, float v) {
  auto* q = static_cast<typename Storage<T>::type*>(p);
  if constexpr (T == DType::F32) q[i] = v;
  else if constexpr (T == DType::BF16) q[i] = f32_to_bf16_rn(v);
  else q[i] = f32_to_f16_rn(v);
}

inline float ld_any(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::F32: return ld<DType::F32>(p, i);
    case DType::BF16: return ld<DType::BF16>(p, i);
    default: return ld<DType::F16>(p, i);
  }
}

// Stores one row of N fp32 values at element offset `off` of `base` (state or intermediate
// buffer), with its scale for int16 and stochastic rounding when a seed is given.
template <DType ST>
void store_row(const Params& p, void* base, float* scale, int64_t off, int64_t scale_off,
               const float* s, uint32_t t, uint32_t kind) {
  const int64_t N = p.N;
  if constexpr (ST == DType::I16) {
    float amax = 0.f;
    for (int64_t n = 0; n < N; ++n) amax = std::fmax(amax, std::fabs(s[n]));
    float sc = int16_scale(amax);
    auto* q = static_cast<int16_t*>(base) + off;
    for (int64_t n = 0; n < N; ++n) q[n] = int16_encode(s[n], sc);
    scale[scale_off] = sc;
  } else if constexpr (ST == DType::F32) {
    std::memcpy(static_cast<float*>(base) + off, s, N * sizeof(float));
  } else {
    auto* q = static_cast<uint16_t*>(base) + off;
    if (!p.has_seed) {
      for (int64_t n = 0; n < N; ++n) st_rn<ST>(q, n, s[n]);
      return;
    }
    Rand4 r{};
    for (int64_t n = 0; n < N; ++n) {
      uint64_t e = uint64_t(off + n);
      if (n == 0 || (e & 3) == 0) r = sr_block(e, t, kind, p.seed[0], p.seed[1], p.philox_rounds);
      q[n] = ST == DType::BF16 ? f32_to_bf16_sr(s[n], r.r[e & 3]) : f32_to_f16_sr(s[n], r.r[e & 3]);
    }
  }
}

template <DType ST, DType IT>
void run(const Params& p) {
  const int64_t H = p.H, P = p.P, N = p.N, HP = H * P, rows_per_group = H / p.G;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (p.varlen)  // rows that no sequence owns stay 0
    for (int64_t i = 0; i < p.rows * HP; ++i) st_rn<IT>(p.out, i, 0.f);
  std::vector<float> s(N), dA(N);
  for (int64_t b = 0; b < p.nb; ++b) {
    const Entry e = resolve_entry(p, b);
    if (!e.valid) {
      for (int64_t i = e.nan_lo * HP; i < e.nan_hi * HP; ++i) st_rn<IT>(p.out, i, nan);
      continue;
    }
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / rows_per_group;
      for (int64_t pp = 0; pp < P; ++pp) {
        const int64_t hp = h * P + pp;
        if (e.padded) {
          std::fill(s.begin(), s.end(), 0.f);
        } else {
          const int64_t off = (e.src * HP + hp) * N;
          const float sc = ST == DType::I16 ? p.state_scale[e.src * HP + hp] : 1.f;
          for (int64_t n = 0; n < N; ++n) s[n] = ld<ST>(p.state, off + n) * sc;
        }
        const float Dv = !p.has_D ? 0.f : ld_any(p.D, p.w_t, p.D_elem ? hp : h);
        const float bias = !p.has_bias ? 0.f : ld_any(p.dt_bias, p.w_t, p.bias_elem ? hp : h);
        for (int64_t t = 0; t < e.len; ++t) {
          const int64_t row = e.row0 + t;
          const float xv = ld<IT>(p.x, row * HP + hp);
          float dt = ld_any(p.dt, p.w_t, p.dt_elem ? row * HP + hp : row * H + h) + bias;
          if (p.softplus) dt = softplus20(dt);
          if (p.A_elem) {
            for (int64_t n = 0; n < N; ++n) dA[n] = std::exp(p.A[hp * N + n] * dt);
          } else {
            std::fill(dA.begin(), dA.end(), std::exp(p.A[h] * dt));
          }
          const int64_t bc = (row * p.G + g) * N;
          float y = 0.f;
          for (int64_t n = 0; n < N; ++n) {
            s[n] = s[n] * dA[n] + (ld<IT>(p.B, bc + n) * dt) * xv;
            y += s[n] * ld<IT>(p.C, bc + n);
          }
          y += Dv * xv;
          if (p.has_z) y = silu_gate(y, ld<IT>(p.z, row * HP + hp));
          st_rn<IT>(p.out, row * HP + hp, y);

          const int64_t d = state_write_slot(p, e, b, t);
          if (d >= 0) store_row<ST>(p, p.state, p.state_scale, (d * HP + hp) * N, d * HP + hp,
                                    s.data(), uint32_t(t), 0);
          if (e.ii >= 0) {
            const int64_t blk = (e.ii * p.CS + t) * HP + hp;
            store_row<ST>(p, p.inter, p.inter_scales, blk * N, blk, s.data(), uint32_t(t), 1);
          }
        }
      }
    }
  }
}

template <DType ST>
void dispatch_input(const Params& p) {
  switch (p.in_t) {
    case DType::F32: return run<ST, DType::F32>(p);
    case DType::BF16: return run<ST, DType::BF16>(p);
    default: return run<ST, DType::F16>(p);
  }
}

ffi::Error SsuCpu(ffi::RemainingArgs args, ffi::RemainingRets rets, ffi::Dictionary attrs) {
  Params p;
  int64_t algorithm = 0;  // validated in Python; every strategy is the same loop on the CPU
  if (auto err = decode_params(args, rets, attrs, &p, &algorithm); err.failure()) return err;
  switch (p.state_t) {
    case DType::F32: dispatch_input<DType::F32>(p); break;
    case DType::BF16: dispatch_input<DType::BF16>(p); break;
    case DType::F16: dispatch_input<DType::F16>(p); break;
    case DType::I16: dispatch_input<DType::I16>(p); break;
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER(kSsuCpu, SsuCpu, bind_ssu(ffi::Ffi::Bind()));

// Registered for the CUDA platform when the CUDA module was not built: runs on the host,
// touches no buffer, and reports why.
ffi::Error MissingCuda(ffi::RemainingArgs, ffi::RemainingRets, ffi::Dictionary) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented,
                    "jax_mamba was built without CUDA (nvcc was not found at install time); "
                    "reinstall with nvcc on PATH, or run on the CPU / use jax_mamba.reference");
}
XLA_FFI_DEFINE_HANDLER(kMissingCuda, MissingCuda, bind_ssu(ffi::Ffi::Bind()));

}  // namespace
}  // namespace ssu

NB_MODULE(_cpu, m) {
  m.def("registrations", []() {
    nanobind::dict d;
    d["jax_mamba_ssu"] = nanobind::capsule(reinterpret_cast<void*>(ssu::kSsuCpu));
    return d;
  });
  m.def("missing_cuda_registrations", []() {
    nanobind::dict d;
    d["jax_mamba_ssu"] = nanobind::capsule(reinterpret_cast<void*>(ssu::kMissingCuda));
    return d;
  });
}

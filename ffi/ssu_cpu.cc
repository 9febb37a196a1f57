// CPU handler: the reference-speed implementation of docs/semantics.md on ssu::Params.
// One row (slot, head, p) at a time: decode, run the T steps in fp32, store (docs/semantics.md,
// "One entry", "int16 state", "Stochastic rounding").
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "nanobind/nanobind.h"
#include "nanobind/ndarray.h"
#include "ssu_module_py.h"
#include "copy_ffi.h"
#include "ssu_cuda_emu.h"

namespace ssu {
namespace {

template <DType T>
inline float ld(const void* p, int64_t i) {
  auto v = static_cast<const typename Stor<T>::type*>(p)[i];
  if constexpr (T == DType::F32)
    return v;
  else if constexpr (T == DType::BF16)
    return bf16_to_f32(v);
  else if constexpr (T == DType::F16)
    return f16_to_f32(v);
  else
    return float(v);
}

template <DType T>
inline void st_rn(void* p, int64_t i, float v) {
  auto* q = static_cast<typename Stor<T>::type*>(p);
  if constexpr (T == DType::F32)
    q[i] = v;
  else if constexpr (T == DType::BF16)
    q[i] = f32_to_bf16_rn(v);
  else
    q[i] = f32_to_f16_rn(v);
}

inline float ld_any(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::F32: return ld<DType::F32>(p, i);
    case DType::BF16: return ld<DType::BF16>(p, i);
    default: return ld<DType::F16>(p, i);
  }
}

// sr_block (ssu_math.h) for groups g0 .. g0+nblk-1, 4 words each into `out` (room for nblk
// rounded up to 8 groups). Eight independent Philox streams per pass so the rounds vectorise:
// one call per group done serially cost more than the whole recurrence.
inline void philox_blocks(uint64_t g0, int64_t nblk, uint32_t t, uint32_t kind, uint32_t key0,
                          uint32_t key1, int rounds, uint32_t* out) {
  for (int64_t b0 = 0; b0 < nblk; b0 += 8) {
    uint32_t c0[8], c1[8], c2[8], c3[8];
    for (int j = 0; j < 8; ++j) {
      const uint64_t g = g0 + uint64_t(b0 + j);
      c0[j] = uint32_t(g);
      c1[j] = uint32_t(g >> 32);
      c2[j] = t;
      c3[j] = kind;
    }
    uint32_t k0 = key0, k1 = key1;
    for (int i = 0; i < rounds; ++i) {  // the round function of philox4x32 (ssu_math.h)
      for (int j = 0; j < 8; ++j) {
        const uint64_t p0 = uint64_t(0xD2511F53u) * c0[j], p2 = uint64_t(0xCD9E8D57u) * c2[j];
        const uint32_t n0 = uint32_t(p2 >> 32) ^ c1[j] ^ k0;
        const uint32_t n2 = uint32_t(p0 >> 32) ^ c3[j] ^ k1;
        c1[j] = uint32_t(p2);
        c3[j] = uint32_t(p0);
        c0[j] = n0;
        c2[j] = n2;
      }
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    for (int j = 0; j < 8; ++j) {
      uint32_t* o = out + (b0 + j) * 4;
      o[0] = c0[j];
      o[1] = c1[j];
      o[2] = c2[j];
      o[3] = c3[j];
    }
  }
}

// Stores one row of N fp32 values at element offset `off` of `base` (state or intermediate
// buffer), with its scale for int16 and stochastic rounding when a seed is given.
template <DType ST>
void store_row(const Params& p, void* base, float* scale, int64_t off, int64_t scale_off,
               const float* s, uint32_t t, uint32_t kind) {
  const int64_t N = p.N;
  if constexpr (ST == DType::I16) {
    // max |s| ignoring NaN (std::fmax semantics), as 8 independent partial maxima so the
    // loop vectorises; the order does not matter: no partial is ever NaN.
    float m8[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int64_t n0 = 0;
    for (; n0 + 8 <= N; n0 += 8)
      for (int j = 0; j < 8; ++j) {
        const float a = std::fabs(s[n0 + j]);
        m8[j] = a > m8[j] ? a : m8[j];
      }
    for (; n0 < N; ++n0) {
      const float a = std::fabs(s[n0]);
      m8[0] = a > m8[0] ? a : m8[0];
    }
    float amax = 0.f;
    for (float v : m8)
      amax = v > amax ? v : amax;
    float sc = int16_scale(amax);
    auto* q = static_cast<int16_t*>(base) + off;
    for (int64_t n = 0; n < N; ++n)
      q[n] = int16_encode(s[n], sc);
    scale[scale_off] = sc;
  } else if constexpr (ST == DType::F32) {
    std::memcpy(static_cast<float*>(base) + off, s, N * sizeof(float));
  } else {
    auto* q = static_cast<uint16_t*>(base) + off;
    if (!p.has_seed) {
      for (int64_t n = 0; n < N; ++n)
        st_rn<ST>(q, n, s[n]);
      return;
    }
    // Element e takes half e % 8 of sr_block(e) (ssu_math.h): the halves of the row's blocks,
    // in order, from element 8 * g0 on.
    const uint64_t g0 = uint64_t(off) >> 3;
    const int64_t nblk = int64_t(((uint64_t(off + N) + 7) >> 3) - g0);
    thread_local std::vector<uint32_t> words;
    words.resize(size_t(nblk + 8) * 4);
    philox_blocks(g0, nblk, t, kind, p.seed[0], p.seed[1], p.philox_rounds, words.data());
    const int64_t h0 = off & 7;  // half of the first block the row starts at
    for (int64_t n = 0; n < N; ++n) {
      const int64_t i = h0 + n;
      const uint32_t r = words[size_t(i >> 1)] >> ((i & 1) * 16);
      q[n] = ST == DType::BF16 ? f32_to_bf16_sr(s[n], r) : f32_to_f16_sr(s[n], r);
    }
  }
}

// s = s*dA + (B*dt)*x over one row, and the 8 partial sums of s*C (column n goes to acc[n%8]).
// Blocks of 8 columns so the compiler vectorises it; dA == nullptr: one decay `da` for all.
inline void recur(float* __restrict s, const float* __restrict dA, float da,
                  const float* __restrict B, const float* __restrict C, float dt, float xv,
                  int64_t N, float (&acc)[8]) {
  int64_t n = 0;
  for (; n + 8 <= N; n += 8)
    for (int j = 0; j < 8; ++j) {
      const float v = s[n + j] * (dA ? dA[n + j] : da) + (B[n + j] * dt) * xv;
      s[n + j] = v;
      acc[j] += v * C[n + j];
    }
  for (; n < N; ++n) {
    const float v = s[n] * (dA ? dA[n] : da) + (B[n] * dt) * xv;
    s[n] = v;
    acc[n & 7] += v * C[n];
  }
}

// One (entry, head) work item: every row p of head h of entry b, all steps.
template <DType ST, DType IT>
void run_item(const Params& p, const Entry& e, int64_t b, int64_t h) {
  const int64_t H = p.H, P = p.P, N = p.N, HP = H * P, L = e.len;
  const int64_t g = h / (H / p.G);
  // Per-step operands shared by the head's rows, widened to fp32 once.
  std::vector<float> Bf(L * N), Cf(L * N), dth(L), s(N), dA(N);
  for (int64_t t = 0; t < L; ++t) {
    const int64_t bc = ((e.row0 + t) * p.G + g) * N;
    for (int64_t n = 0; n < N; ++n) {
      Bf[t * N + n] = ld<IT>(p.B, bc + n);
      Cf[t * N + n] = ld<IT>(p.C, bc + n);
    }
  }
  const float bias_h = p.has_dt_bias && !p.bias_elem ? ld_any(p.dt_bias, p.param_t, h) : 0.f;
  const bool dt_per_row = p.dt_elem || p.bias_elem;  // else dt' depends on (t, h) only
  for (int64_t t = 0; t < L && !dt_per_row; ++t) {
    float d = ld_any(p.dt, p.param_t, (e.row0 + t) * H + h) + bias_h;
    dth[t] = p.softplus ? softplus20(d) : d;
  }
  for (int64_t pp = 0; pp < P; ++pp) {
    const int64_t hp = h * P + pp;
    if (e.padded) {
      std::fill(s.begin(), s.end(), 0.f);
    } else {
      const int64_t off = (e.src * HP + hp) * N;
      const float sc = ST == DType::I16 ? p.state_scale[e.src * HP + hp] : 1.f;
      for (int64_t n = 0; n < N; ++n)
        s[n] = ld<ST>(p.state, off + n) * sc;
    }
    const float Dv = !p.has_D ? 0.f : ld_any(p.D, p.param_t, p.D_elem ? hp : h);
    const float bias = p.bias_elem ? ld_any(p.dt_bias, p.param_t, hp) : bias_h;
    for (int64_t t = 0; t < L; ++t) {
      const int64_t row = e.row0 + t;
      const float xv = ld<IT>(p.x, row * HP + hp);
      float dt = dth[t];
      if (dt_per_row) {
        dt = ld_any(p.dt, p.param_t, p.dt_elem ? row * HP + hp : row * H + h) + bias;
        if (p.softplus) dt = softplus20(dt);
      }
      const float* Bt = &Bf[t * N];
      const float* Ct = &Cf[t * N];
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // 8 lanes: vectorisable sum
      if (p.A_elem) {
        for (int64_t n = 0; n < N; ++n)
          dA[n] = std::exp(p.A[hp * N + n] * dt);
        recur(s.data(), dA.data(), 0.f, Bt, Ct, dt, xv, N, acc);
      } else {
        const float da = std::exp(p.A[h] * dt);
        recur(s.data(), nullptr, da, Bt, Ct, dt, xv, N, acc);
      }
      float y = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      y += Dv * xv;
      if (p.has_z) y = silu_gate(y, ld<IT>(p.z, row * HP + hp));
      st_rn<IT>(p.out, row * HP + hp, y);

      const StateWrite w = state_write(p, e, b, t);  // in [0, S) when on (e is valid)
      if (w.on)
        store_row<ST>(p, p.state, p.state_scale, (w.index * HP + hp) * N, w.index * HP + hp,
                      s.data(), uint32_t(t), 0);
      if (e.to_inter && t < p.CS) {
        const int64_t blk = (e.ii * p.CS + t) * HP + hp;
        store_row<ST>(p, p.inter, p.inter_scales, blk * N, blk, s.data(), uint32_t(t), 1);
      }
    }
  }
}

template <DType ST, DType IT>
void run_range(const Params& p, const std::vector<uint8_t>& overlapped, int64_t item0,
               int64_t item1) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t it = item0; it < item1; ++it) {
    const int64_t b = it / p.H, h = it % p.H;
    const Entry e = resolve_entry(p, b, p.varlen && overlapped[size_t(b)]);
    if (!e.valid) {  // NaN over the entry's rows, head h only: items stay disjoint
      for (int64_t r = e.nan_lo; r < e.nan_hi; ++r)
        for (int64_t pp = 0; pp < p.P; ++pp)
          st_rn<IT>(p.out, (r * p.H + h) * p.P + pp, nan);
      continue;
    }
    if (e.len > 0) run_item<ST, IT>(p, e, b, h);
  }
}

// seq_overlaps (ssu_params.h) for every sequence at once: sort the owned row ranges by start;
// a range meets another iff it starts before the furthest end of the ranges sorted before it,
// or the next range starts before it ends.
std::vector<uint8_t> overlapping_sequences(const Params& p) {
  std::vector<uint8_t> res(size_t(p.varlen ? p.nb : 0), 0);
  if (!p.varlen) return res;
  std::vector<std::pair<int64_t, int64_t>> spans;  // (lo, sequence) of non-empty ranges
  std::vector<int64_t> hi(size_t(p.nb));
  for (int64_t s = 0; s < p.nb; ++s) {
    const SeqSpan q = seq_span(p, s);
    hi[size_t(s)] = q.hi;
    if (q.lo < q.hi) spans.emplace_back(q.lo, s);
  }
  std::sort(spans.begin(), spans.end());
  int64_t reach = 0;  // furthest end of spans[0 .. i), for i > 0
  for (size_t i = 0; i < spans.size(); ++i) {
    const int64_t s = spans[i].second, end = hi[size_t(s)];
    if (i > 0 && spans[i].first < reach) res[size_t(s)] = 1;
    if (i + 1 < spans.size() && spans[i + 1].first < end) res[size_t(s)] = 1;
    reach = i > 0 ? std::max(reach, end) : end;
  }
  return res;
}

// Splits the (entry, head) items over the caller and XLA's intra-op thread pool. Tasks hold
// the shared counter by value, so one that starts after the handler returned finds no work.
template <DType ST, DType IT>
void run(const Params& p, ffi::ThreadPool pool) {
  if (p.varlen)  // rows that no sequence owns stay 0
    for (int64_t i = 0; i < p.rows * p.H * p.P; ++i)
      st_rn<IT>(p.out, i, 0.f);
  const std::vector<uint8_t> overlapped = overlapping_sequences(p);
  const int64_t items = p.nb * p.H;
  const int64_t work = items * (p.T > 0 ? p.T : 1) * p.P * p.N;
  const int64_t threads = std::min<int64_t>(pool.num_threads(), items);
  if (threads <= 1 || work < (1 << 16)) return run_range<ST, IT>(p, overlapped, 0, items);
  const int64_t chunk = std::max<int64_t>(1, items / (4 * (threads + 1)));
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto sh = std::make_shared<Shared>();
  auto ov = std::make_shared<const std::vector<uint8_t>>(overlapped);
  auto worker = [sh, ov, p, items, chunk]() {
    for (;;) {
      const int64_t i0 = sh->next.fetch_add(chunk);
      if (i0 >= items) return;
      const int64_t i1 = std::min(items, i0 + chunk);
      run_range<ST, IT>(p, *ov, i0, i1);
      if (sh->done.fetch_add(i1 - i0) + (i1 - i0) == items) {
        std::lock_guard<std::mutex> lock(sh->mu);
        sh->cv.notify_all();
      }
    }
  };
  for (int64_t i = 0; i < threads; ++i)
    pool.Schedule(decltype(worker)(worker));
  worker();
  std::unique_lock<std::mutex> lock(sh->mu);
  sh->cv.wait(lock, [&] { return sh->done.load() == items; });
}

template <DType ST>
void dispatch_input(const Params& p, ffi::ThreadPool pool) {
  switch (p.input_t) {
    case DType::F32: return run<ST, DType::F32>(p, pool);
    case DType::BF16: return run<ST, DType::BF16>(p, pool);
    default: return run<ST, DType::F16>(p, pool);
  }
}

ffi::Error SsuCpu(ffi::ThreadPool pool SSU_HANDLER_PARAMS) {
  Call call = SSU_CALL;
  Params p;
  int64_t algorithm_id = 0;  // every strategy is the same loop on the CPU (emulation aside)
  AliasCopies copies;
  if (auto err = decode_params(call, &p, &algorithm_id, &copies); err.failure()) return err;
  for (int i = 0; i < copies.n; ++i)
    std::memcpy(copies.c[i].dst, copies.c[i].src, copies.c[i].bytes);
  if (emu::enabled()) {  // developer switch: the CUDA fast path, emulated (ssu_cuda_emu.h)
    cuda::DeviceInfo di;
    di.sms = 132;  // an H100 / H200: the planner's choices for the machines it targets
    di.smem_optin = 232448;
    cuda::Plan pl;
    std::string why;
    if (cuda::make_plan(p, algorithm_id, di, &pl, &why) && emu::run_fast(p, pl))
      return ffi::Error::Success();
  }
  switch (p.state_t) {
    case DType::F32: dispatch_input<DType::F32>(p, pool); break;
    case DType::BF16: dispatch_input<DType::BF16>(p, pool); break;
    case DType::F16: dispatch_input<DType::F16>(p, pool); break;
    case DType::I16: dispatch_input<DType::I16>(p, pool); break;
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER(kSsuCpu, SsuCpu, bind_ssu(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

// Registered for the CUDA platform when the CUDA module was not built: runs on the host,
// touches no buffer, and reports why.
ffi::Error MissingCuda(ffi::RemainingArgs, ffi::RemainingRets, ffi::Dictionary) {  // any frame
  return ffi::Error(ffi::ErrorCode::kUnimplemented,
                    "jax_mamba was built without CUDA (at install time JAX_MAMBA_CUDA=AUTO found "
                    "no nvcc or no NVIDIA driver, or JAX_MAMBA_CUDA=OFF); reinstall with nvcc "
                    "on PATH and JAX_MAMBA_CUDA=ON (docs/install.md), or run on the CPU / use "
                    "jax_mamba.reference");
}
XLA_FFI_DEFINE_HANDLER(kMissingCuda, MissingCuda,
                       ffi::Ffi::Bind().RemainingArgs().RemainingRets().Attrs());

}  // namespace
}  // namespace ssu

NB_MODULE(_cpu, m) {
  ssu::def_module_functions(m);
  m.def("registrations", []() {
    nanobind::dict d;
    d["jax_mamba_ssu"] = nanobind::capsule(reinterpret_cast<void*>(ssu::kSsuCpu));
    d["jax_mamba_copy"] = nanobind::capsule(jax_mamba_copy::cpu_handler());
    return d;
  });
  m.def("emulation", []() {  // the CUDA fast path's host emulation (ssu_cuda_emu.h)
    nanobind::dict d;
    d["available"] = ssu::emu::available();
    d["enabled"] = ssu::emu::enabled();
    d["calls"] = ssu::emu::calls();
    d["steps_calls"] = ssu::emu::steps_calls();
    return d;
  });
  // The fast path's int16 row encoder as emulated on the host (ssu_cuda_emu.h int16_encode):
  // values (n, 8) float32, scales (n,) float32 -> (n, 8) int16. For tests.
  m.def("emulated_int16_encode",
        [](nanobind::ndarray<const float, nanobind::shape<-1, 8>, nanobind::c_contig> v,
           nanobind::ndarray<const float, nanobind::shape<-1>, nanobind::c_contig> sc) {
          const int64_t n = int64_t(v.shape(0));
          if (int64_t(sc.shape(0)) != n)
            throw nanobind::value_error("emulated_int16_encode: scales must have one per row");
          auto* out = new int16_t[size_t(8 * n)];
          nanobind::capsule owner(out, [](void* p) noexcept { delete[] static_cast<int16_t*>(p); });
          if (!ssu::emu::int16_encode(v.data(), sc.data(), n, out))
            throw nanobind::value_error("emulated_int16_encode: the emulation is not built");
          return nanobind::ndarray<nanobind::numpy, int16_t, nanobind::ndim<2>>(
              out, {size_t(n), size_t(8)}, owner);
        });
  m.def("missing_cuda_registrations", []() {
    nanobind::dict d;
    d["jax_mamba_ssu"] = nanobind::capsule(reinterpret_cast<void*>(ssu::kMissingCuda));
    d["jax_mamba_copy"] = nanobind::capsule(reinterpret_cast<void*>(ssu::kMissingCuda));
    return d;
  });
}

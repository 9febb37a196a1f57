// Planning of the CUDA kernels (ssu_plan.h): host-only, no CUDA headers.
#include "ssu_plan.h"

#include <algorithm>
#include <cstdlib>
#include <string>

namespace ssu {
namespace cuda {
namespace {

// Debug / tuning override of the rows per lane group (JAX_MAMBA_CUDA_ROWS=1|2|4, clipped to
// what the kernel holds); read once per process. 0 = heuristic.
int rows_override() {
  static const int v = [] {
    const char* e = std::getenv("JAX_MAMBA_CUDA_ROWS");
    return e ? std::atoi(e) : 0;
  }();
  return v;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int pow2_ceil(int64_t v) {
  int r = 1;
  while (r < v)
    r <<= 1;
  return r;
}
int log2i(int v) {
  int s = 0;
  while ((1 << s) < v)
    ++s;
  return s;
}

int env_int(const char* name) {
  const char* e = std::getenv(name);
  return e ? std::atoi(e) : 0;
}

// Fast-path switches, read once per process. The calls the fast path covers go to it (ssu_fast,
// ssu_fast_mtp); JAX_MAMBA_CUDA_FAST=0 sends everything to the other kernels (the fallback, kept
// for what the fast path does not cover and for comparison). JAX_MAMBA_CUDA_PDL=1 launches it with
// programmatic dependent launch; JAX_MAMBA_CUDA_THREADS=32..256 sets its CTA size.
bool fast_enabled() {
  static const bool v = [] {
    const char* e = std::getenv("JAX_MAMBA_CUDA_FAST");
    return !(e && e[0] == '0');
  }();
  return v;
}
bool fast_mtp_enabled() {  // JAX_MAMBA_CUDA_FAST_MTP=0: multi-token steps to the other kernels
  static const bool v = [] {
    const char* e = std::getenv("JAX_MAMBA_CUDA_FAST_MTP");
    return !(e && e[0] == '0');
  }();
  return v;
}
bool mtp_steps_enabled() {  // JAX_MAMBA_CUDA_MTP_STEPS=1: T compiled in where instantiated
  static const bool v = env_int("JAX_MAMBA_CUDA_MTP_STEPS") > 0;
  return v;
}
bool pdl_enabled() {
  static const bool v = env_int("JAX_MAMBA_CUDA_PDL") > 0;
  return v;
}
int threads_override() {
  static const int v = env_int("JAX_MAMBA_CUDA_THREADS");
  return v;
}

// Divisor d -> (mul, shr) with n / d == umulhi(n, mul) >> shr for 0 <= n < 2^31 (round-up
// reciprocal, p = 31 + ceil(log2 d)); mul 0 stands for d == 1.
void fast_divisor(int64_t d, uint32_t* mul, int* shr) {
  if (d <= 1) {
    *mul = 0;
    *shr = 0;
    return;
  }
  int lg = 0;
  while ((int64_t(1) << lg) < d)
    ++lg;
  const int pw = 31 + lg;
  *mul = uint32_t(((uint64_t(1) << pw) + uint64_t(d) - 1) / uint64_t(d));
  *shr = pw - 32;
}

// The fast path (ssu_cuda_fast.cuh) for p, when it covers p. One step (ssu_fast): no varlen,
// 1-D or no indices, no intermediate buffer, no num_accepted_tokens, per-head or (dstate 16)
// per-element parameters. Several steps (ssu_fast_mtp): no varlen, per-head parameters, every
// index form, intermediate buffers, num_accepted_tokens; varlen too (its VL instances): as several
// steps, for dstate 64 / 128 and float32 / bfloat16 inputs, as many sequences as the grid's z
// axis holds with its zero slice (nb + 1 <= 65535), sequences of any length. All: float32 /
// bfloat16 / float16 states (stochastic rounding too) and int16 block-scaled ones, a dstate they
// are instantiated for, and sizes whose offsets fit their 32-bit arithmetic and grid (entries and
// heads on the grid's z / y axes).
bool fast_plan(const Params& p, const DeviceInfo& di, Plan* pl) {
  if (!fast_enabled()) return false;
  if (p.nb < 1 || (!p.varlen && p.T < 1)) return false;
  const bool mtp = p.varlen || p.T > 1;
  const bool elem = p.dt_elem || p.A_elem || p.D_elem || p.bias_elem;
  const int64_t H = p.H, P = p.P, N = p.N, G = p.G > 0 ? p.G : 1;
  if (!fast_dstate(N)) return false;
  if (mtp) {
    if (elem || !fast_mtp_enabled()) return false;
    if (p.varlen && !(fast_varlen_dstate(N) && fast_varlen_input(p.input_t))) return false;
  } else {
    if (p.has_inter || p.src_2d || p.dst_2d || p.has_num_accepted) return false;
    if (elem && !fast_elem_dstate(N)) return false;
  }
  constexpr int64_t kMax = int64_t(INT32_MAX);
  // token rows of x / out / B / C (varlen: `rows`); varlen's grid has one more z slice (zeros)
  const int64_t tokens = p.varlen ? p.rows : p.nb * p.T;
  const int64_t slices = p.nb + (p.varlen ? 1 : 0);
  if (slices > 65535 || H > 65535 || H * P * N >= kMax || tokens * H * P >= kMax ||
      tokens * G * N >= kMax)
    return false;
  const int E = p.state_t == DType::F32 ? 4 : 8;  // int16: 8, like the 16-bit floats
  const int64_t vpr = N / E, lpr = std::min<int64_t>(vpr, 32), vpl = vpr / lpr;
  // Threads: 128 (measured within +-1 us of 256), fewer where a CTA's row groups outnumber P.
  int threads = 128;
  if (threads_override() >= 32) threads = std::min(256, pow2_ceil(threads_override()));
  while (threads > 32 && threads / lpr / 2 >= P)
    threads /= 2;
  threads = std::max<int>(threads, int(std::min<int64_t>(lpr, 32)));
  threads = (threads + 31) / 32 * 32;
  const int64_t groups = threads / lpr;
  // Rows per thread: 4 when a row is one vector per lane (64 bytes of state in flight per
  // thread; on an H100 7-8% faster than 2 for MTP and int16 states, 2-4% for fp16 and
  // H80 G1 / P128 bf16, even elsewhere), 2 with per-element parameters (their A slices
  // double the registers; 4 was 4% slower for Mamba-1), 1 for two or more vectors per lane.
  // Fewer where the grid would have under 4 CTAs per SM: at small batch more CTAs beat more
  // bytes per thread (the call is latency-bound). Never more rows than the head has.
  int kv = vpl >= 2 ? 1 : elem ? 2 : 4;
  while (kv > 1 && p.nb * H * ceil_div(P, groups * kv) < 4 * int64_t(di.sms))
    kv /= 2;
  if (rows_override() > 0) kv = std::min(4, pow2_ceil(rows_override()));
  while (kv > 1 && groups * (kv / 2) >= P)
    kv /= 2;
  pl->kernel = mtp ? Kernel::kFastMtp : Kernel::kFast;
  pl->nv = kv;
  pl->threads = threads;
  pl->smem = 0;
  pl->pdl = pdl_enabled();
  pl->slices = int(slices);
  pl->steps = mtp && !p.varlen && !p.has_seed && mtp_steps_enabled() &&
                      fast_mtp_steps(p.state_t, p.input_t, N, p.T)
                  ? int(p.T)
                  : 0;
  Launch& l = pl->l;
  l.lshift = log2i(int(lpr));
  l.R = kv;
  l.rows_cta = int(groups) * kv;
  fast_divisor(H / G, &l.g_mul, &l.g_shr);
  return true;
}

}  // namespace

// Register-row kernels (ssu_simple, ssu_horizontal: ssu_cuda_simple.cuh): needs N % E == 0 and N <=
// 1024, E = 16 / sizeof(state) (4 for float32, 8 for 16-bit and int16 states).
//   simple:     NV = smallest of {1,2,4,(8)} with 32*NV*E >= N; L = lanes per row (<= 32).
//   horizontal: NV = largest with E*NV <= 32 values per lane, reduced while NV/2 vectors
//               cover the row; L = the remaining lanes (1 for N <= 32 fp32 / 32 16-bit).
// Generic kernel (ssu_generic): everything else (simple/auto only).
// Vertical kernel (ssu_vertical, ssu_cuda_vertical.cuh): needs N % E == 0 and N <= 256 (else an
// error). NV = 1 (2 for float32 N > 128),
//   L = lanes per row as for simple, CTAs of <= kVertThreads threads, tile = groups * R rows
//   per shared-memory stage (<= 8 KiB), rows_cta = a power-of-two number of tiles, as many as
//   keep >= 8 CTAs per SM; B/C staged for up to bc_steps steps (<= 16 KiB).
//   Overrides (debug / tuning, read once): JAX_MAMBA_CUDA_ROWS (R), JAX_MAMBA_CUDA_VTILES
//   (tiles per CTA, clipped to the head).
bool make_plan(const Params& p, int64_t algorithm, const DeviceInfo& di, Plan* pl,
               std::string* why) {
  if (algorithm < 0 || algorithm > 3) {
    *why = "unknown algorithm id " + std::to_string(algorithm);
    return false;
  }
  const int64_t H = p.H, P = p.P, N = p.N;
  pl->kernel = Kernel::kNone;
  if (H <= 0 || P <= 0 || p.nb < 0 || p.rows < 0) return true;
  if (p.nb == 0 && (!p.varlen || p.rows == 0)) return true;
  if (H * P >= int64_t(INT32_MAX) || N >= int64_t(INT32_MAX) || p.S >= int64_t(INT32_MAX) ||
      p.rows >= int64_t(INT32_MAX) || p.nb >= int64_t(INT32_MAX) ||
      p.I * p.CS >= int64_t(INT32_MAX)) {
    *why =
        "nheads*dim, dstate, cache slots, tokens, batch and intermediate rows*steps must be "
        "below 2^31 for the CUDA kernels";
    return false;
  }

  const bool f32 = p.state_t == DType::F32;
  const int E = f32 ? 4 : 8;
  const int nv_max = f32 ? 8 : 4;  // 32 fp32 values per lane at most
  const bool vec = N > 0 && N % E == 0 && N / E <= 32 * nv_max;
  const int64_t nvec = vec ? N / E : 0;

  Launch& l = pl->l;
  l = Launch{};
  if (algorithm == kVertical) {
    if (!(N > 0 && N % E == 0 && N <= 256)) {
      *why = "algorithm: 'vertical' expected dstate to be a multiple of " + std::to_string(E) +
             " (16-byte state vectors) and at most 256, got dstate=" + std::to_string(N);
      return false;
    }
    static const int vtiles_override = [] {
      const char* e = std::getenv("JAX_MAMBA_CUDA_VTILES");
      return e ? std::atoi(e) : 0;
    }();
    const int esize = f32 ? 4 : 2;
    const int nv = nvec > 32 ? 2 : 1;
    const int L = pow2_ceil(ceil_div(nvec, nv));
    const int rmax = rows_per_lane(E * nv);
    const double rows_total = double(p.nb) * double(H) * double(P);
    const double resident = double(di.sms) * 2048.0;
    int R = rmax;
    while (R > 1 && rows_total * L / R < 2.0 * resident)
      R /= 2;
    if (rows_override() > 0) R = std::min(rmax, rows_override());
    const int64_t ng = std::min<int64_t>(kVertThreads / L, ceil_div(P, R));
    const int threads = int(std::min<int64_t>(kVertThreads, ceil_div(ng * L, 32) * 32));
    const int tile = (threads / L) * R;
    const int64_t ntile = ceil_div(P, tile);
    int64_t k = 1;  // tiles per CTA
    if (vtiles_override > 0) {
      k = std::min<int64_t>(vtiles_override, ntile);
    } else {
      const int64_t heads = p.nb * H, target = 8 * int64_t(di.sms);
      while (k * 2 <= ntile && heads * ceil_div(ntile, k * 2) >= target)
        k *= 2;
    }
    // B/C staging: the steps an entry may have (T; varlen: its limit when there is one), capped.
    const int64_t limit = p.has_inter ? p.CS : p.has_cache_steps ? p.cache_steps : 8;
    const int64_t steps = p.varlen ? limit : p.T;
    const int64_t bc_steps = std::max<int64_t>(0, std::min<int64_t>(steps, 16384 / (8 * N)));
    const size_t smem = size_t(kVertStages) * vert_stage_bytes(tile, N, esize) +
                        size_t(bc_steps) * 2 * size_t(N) * sizeof(float);
    if (smem > size_t(di.smem_optin)) {
      *why = "algorithm: 'vertical' expected at most " + std::to_string(di.smem_optin) +
             " bytes of shared memory per block (the device's limit), got a plan needing " +
             std::to_string(smem) + " for dstate=" + std::to_string(N);
      return false;
    }
    pl->kernel = Kernel::kVertical;
    pl->nv = nv;
    pl->threads = threads;
    pl->smem = smem;
    l.lshift = log2i(L);
    l.R = R;
    l.tile_rows = tile;
    l.bc_steps = int(bc_steps);
    l.rows_cta = int(std::min<int64_t>(k * tile, P));
  } else if ((algorithm == kAuto || algorithm == kSimple) && fast_plan(p, di, pl)) {
    // planned above (fast_plan); chunks and grid below
  } else if (algorithm != kHorizontal && !p.varlen && p.T == 1 && vec && nvec <= 32 &&
             (nvec & (nvec - 1)) == 0 && p.nb * H >= 6 * int64_t(di.sms)) {
    // Single-step kernel (persistent, ssu_simple_step1, ssu_cuda_simple_step1.cuh): a row is VPR =
    // nvec vectors, one per lane of a VPR-lane group; a thread holds KV rows of a batch; an item is
    // an entry's chunk of HC heads, so the index resolution is paid once per HC * P rows. HC: as
    // many heads as leave >= 2 items per resident CTA (3 per SM at KV = 2). With fewer than that
    // many (entry, head) pairs (small batch, Mamba-1's single head) the register-row kernel,
    // which also splits a head's rows over CTAs, is faster (measured, notes/kernel_versions.md).
    const int VPR = int(nvec);
    int kv = 2;
    while (kv > 1 && int64_t(kv / 2) * (256 / VPR) >= P)
      kv /= 2;  // small heads: fewer rows
    if (rows_override() > 0) kv = std::min(8, pow2_ceil(rows_override()));
    const int64_t rows_batch = std::min<int64_t>(int64_t(kv) * (256 / VPR), P);
    const int threads =
        int(std::min<int64_t>(256, ceil_div(ceil_div(rows_batch, kv) * VPR, 32) * 32));
    const int64_t want_items = 2 * 3 * int64_t(di.sms);
    int hc = 1;
    while (hc * 2 <= H && H % (hc * 2) == 0 && p.nb * (H / (hc * 2)) >= want_items)
      hc *= 2;
    pl->kernel = Kernel::kSimpleStep1;
    pl->nv = kv;
    pl->threads = threads;
    pl->smem = 0;
    pl->persistent = true;
    l.lshift = log2i(VPR);
    l.R = kv;
    l.rows_cta = kv * (threads / VPR);
    l.heads_item = hc;
    l.batches_head = int(ceil_div(P, l.rows_cta));
  } else if (algorithm == kHorizontal && !vec) {
    *why = "algorithm: 'horizontal' expected dstate to be a multiple of " + std::to_string(E) +
           " (16-byte state vectors) and at most " + std::to_string(32 * nv_max * E) +
           ", got dstate=" + std::to_string(N);
    return false;
  } else if (vec) {
    int nv = 1;
    if (algorithm == kHorizontal) {
      nv = nv_max;
      while (nv > 1 && nv / 2 >= nvec)
        nv /= 2;
    } else {
      while (nv * 32 < nvec)
        nv *= 2;
    }
    const int L = pow2_ceil(ceil_div(nvec, nv));
    const int V = E * nv;
    const int rmax = rows_per_lane(V);
    // Rows per lane group: as many as keep >= 2 full waves of resident threads (more rows
    // per lane = more loads in flight and B/C reuse; fewer = more CTAs at small batch).
    const double rows_total = double(p.nb) * double(H) * double(P);
    const double resident = double(di.sms) * 2048.0;
    int R = rmax;
    while (R > 1 && rows_total * L / R < 2.0 * resident)
      R /= 2;
    if (rows_override() > 0) R = std::min(rmax, rows_override());
    int64_t ng = std::min<int64_t>(256 / L, ceil_div(P, R));
    int threads = int(std::min<int64_t>(256, ceil_div(ng * L, 32) * 32));
    pl->kernel = algorithm == kHorizontal ? Kernel::kHorizontal : Kernel::kSimple;
    pl->nv = nv;
    pl->threads = threads;
    pl->smem = 0;
    l.lshift = log2i(L);
    l.R = R;
    l.rows_cta = (threads / L) * R;
  } else {
    const size_t row_bytes = size_t(N > 0 ? N : 0) * sizeof(float);
    int warps = int(std::min<int64_t>(4, P));
    while (warps > 1 && warps * row_bytes > 48 * 1024)
      --warps;
    const size_t smem = warps * row_bytes;
    if (smem > size_t(di.smem_optin)) {
      *why = "dstate=" + std::to_string(N) +
             " is too large for the CUDA kernels (one fp32 "
             "state row must fit in shared memory)";
      return false;
    }
    pl->kernel = Kernel::kGeneric;
    pl->nv = 0;
    pl->threads = 32 * warps;
    pl->smem = smem;
    l.lshift = 5;
    l.R = 1;
    l.rows_cta = warps;
  }
  pl->sms = di.sms;
  if (pl->kernel == Kernel::kSimpleStep1) {  // items: (entry, chunk of heads_item heads)
    l.chunks = ceil_div(H, l.heads_item);
    l.main_blocks = p.nb * l.chunks;
  } else {
    l.chunks = ceil_div(P, l.rows_cta);
    l.main_blocks = p.nb * H * l.chunks;
  }
  l.zero_blocks = 0;
  if (p.varlen) {
    const int64_t elems = p.rows * H * P;
    l.zero_blocks =
        std::max<int64_t>(1, std::min<int64_t>(1024, ceil_div(elems, pl->threads * 16)));
  }
  if (l.main_blocks + l.zero_blocks > int64_t(INT32_MAX)) {
    *why = "problem too large for one CUDA grid";
    return false;
  }
  return true;
}

const char* kernel_name(Kernel k) {
  switch (k) {
    case Kernel::kSimple: return "ssu_simple";
    case Kernel::kHorizontal: return "ssu_horizontal";
    case Kernel::kGeneric: return "ssu_generic";
    case Kernel::kVertical: return "ssu_vertical";
    case Kernel::kSimpleStep1: return "ssu_simple_step1";
    case Kernel::kFast: return "ssu_fast";
    case Kernel::kFastMtp: return "ssu_fast_mtp";
    default: return "none";
  }
}

}  // namespace cuda
}  // namespace ssu

// Strategy "simple" (and "auto" where the plan says so): a state row (one (slot, head, p)) is
// owned by a group of L = 2^lshift lanes, up to a warp; lane j holds NV 16-byte vectors of the
// row (columns [(j + k*L)*E, +E), E = 16 / sizeof(state)) as fp32 registers. A lane group owns
// R rows (R <= rows_per_lane(E*NV), runtime) so R rows' loads are in flight at once and B/C
// are loaded once per step for all R rows. The fp32 state stays in registers across all T
// steps; out[row] = group-shuffle reduction. Needs N % E == 0 and N/E <= 32*NV.
// register_rows is the body both register-row strategies run; "horizontal"
// (ssu_cuda_horizontal.cuh) is the same body planned with the narrowest lane groups.
#pragma once
#include "ssu_cuda_row.cuh"

namespace ssu {
namespace cuda {

// Occupancy floor: 4 CTAs of 256 threads (64 registers) for up to 8 state values per lane,
// 2 CTAs (128 registers) above. Rows per lane group: rows_per_lane() in ssu_plan.h.
template <DType ST, int NV>
struct RegMinBlocks {
  static constexpr int value = 16 / int(sizeof(typename Stor<ST>::type)) * NV <= 8 ? 4 : 2;
};

template <DType ST, DType IT, int NV>
__device__ __forceinline__ void register_rows(const Params& p, const Launch& l) {
  constexpr int E = 16 / int(sizeof(typename Stor<ST>::type));
  constexpr int V = E * NV;
  constexpr int RM = rows_per_lane(V);

  Ctx c;
  if (!prologue<IT>(p, l, c)) return;
  const int L = 1 << l.lshift;
  const int lane = threadIdx.x & (L - 1);
  const int NG = blockDim.x >> l.lshift;
  // H*P < 2^31 (checked on the host): row ids within a slot fit in 32 bits; element offsets
  // below are 64-bit.
  const int HP = int(p.H * p.P);
  const int h = int(c.h);
  const int64_t N = p.N;
  const int g = h / (int(p.H) / int(p.G));
  const int nvec = int(N / E);

  int hp[RM];
  unsigned act = 0;  // bit r: row r of this lane group exists
  {
    const int p0 = int(c.chunk) * l.rows_cta + (threadIdx.x >> l.lshift);
#pragma unroll
    for (int r = 0; r < RM; ++r) {
      const int pr = p0 + r * NG;
      const bool a = r < l.R && pr < p.P;
      act |= unsigned(a) << r;
      hp[r] = h * int(p.P) + (a ? pr : 0);
    }
  }
  auto on = [&](int r) { return (act >> r) & 1u; };
  auto vok = [&](int k) { return lane + k * L < nvec; };
  auto col = [&](int k) { return int64_t(lane + k * L) * E; };

  // ---- load the source rows (zeros when padded) ----
  float s[RM][V];
#pragma unroll
  for (int r = 0; r < RM; ++r)
#pragma unroll
    for (int i = 0; i < V; ++i)
      s[r][i] = 0.f;
  if (!c.padded) {
    const int64_t base = int64_t(c.src) * HP;
#pragma unroll
    for (int r = 0; r < RM; ++r) {
      if (!on(r)) continue;
#pragma unroll
      for (int k = 0; k < NV; ++k)
        if (vok(k)) ld_state_vec<ST, E>(p.state, (base + hp[r]) * N + col(k), &s[r][k * E]);
    }
    if constexpr (ST == DType::I16) {
#pragma unroll
      for (int r = 0; r < RM; ++r) {
        const float sc = on(r) ? p.state_scale[base + hp[r]] : 0.f;
#pragma unroll
        for (int i = 0; i < V; ++i)
          s[r][i] *= sc;
      }
    }
  }

  run_rows<ST, IT, NV>(p, c, L, lane, hp, act, s, [&](int t, int k, float* Bk, float* Ck) {
    const int64_t bc = (int64_t(c.row0 + t) * p.G + g) * N;
    ld_in_vec<IT, E>(p.B, bc + col(k), *reinterpret_cast<float (*)[E]>(Bk));
    ld_in_vec<IT, E>(p.C, bc + col(k), *reinterpret_cast<float (*)[E]>(Ck));
  });
}

template <DType ST, DType IT, int NV>
__global__ void __launch_bounds__(256, RegMinBlocks<ST, NV>::value)
    ssu_simple(const Params p, const Launch l) {
  register_rows<ST, IT, NV>(p, l);
}

}  // namespace cuda
}  // namespace ssu

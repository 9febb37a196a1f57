// "vertical" CUDA strategy of selective_state_update (docs/performance.md, "Strategies"): a
// producer-consumer pipeline of state row tiles through a shared-memory ring. Uses the row module
// (ssu_cuda_row.cuh): prologue/Ctx, state vector stores, dt_value, group reductions, run_rows.
//
// ssu_vertical<ST, IT, NV>: a CTA owns (entry, head, row chunk) like the other kernels. The rows of
// one (slot, head) are contiguous in memory, so the chunk's source rows are one contiguous
// range of rows_cta * N state elements (N % E == 0: every row is a whole number of 16-byte
// vectors, so every row starts 16-byte aligned). It is streamed in tiles of `tile_rows` rows
// through kVertStages shared-memory buffers:
//   * sm_90: thread 0 issues one 1-D bulk async copy (cp.async.bulk ... complete_tx) per tile,
//     tracked by a per-stage mbarrier (arrive.expect_tx + transaction bytes); the consumers wait
//     on the stage's phase parity. sm_80: every thread issues 16-byte cp.async.cg copies, one
//     commit group per tile (empty groups past the end keep the count uniform), wait_group.
//   * Consumers: the same lane-group layout as the register-row kernels (L = 2^lshift lanes per
//   row, NV 16-byte
//     vectors per lane, R rows per group): a group copies its rows of the tile from shared
//     memory into fp32 registers, the CTA synchronises (the stage is free) and thread 0 refills
//     the stage with tile i + kVertStages, then the rows run all T steps in registers (same
//     math and store order as the register-row kernels) with out / state / intermediate stores
//     straight to global memory. So while tile i is computed, tiles i+1 .. i+kVertStages are in
//     flight.
//   * B and C of every step are converted to fp32 once per CTA into shared memory when the
//     entry has at most l.bc_steps steps (else read from global per step, like the register-row
//     kernels).
//   * Padded entries use a zero state and skip the pipeline.
// Restrictions (make_plan / ops.check_algorithm): N % E == 0 and N <= 256 (NV = 1, or 2 for
// float32 states with N > 128).
#pragma once
#include "ssu_cuda_row.cuh"

namespace ssu {
namespace cuda {
namespace vert {

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count)
               : "memory");
}
// Makes the initialised barriers visible to the async proxy (the bulk copies' complete_tx).
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
}
// Global -> this CTA's shared memory, `bytes` (multiple of 16, both addresses 16-byte aligned),
// completion counted on `bar` as transaction bytes.
__device__ __forceinline__ void bulk_g2s(void* dst, const void* src, uint32_t bytes,
                                         uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar))
      : "memory");
}
// Returns once the phase with parity `parity` of `bar` has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
        "selp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
  } while (!done);
}
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_u32(dst)), "l"(src)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
#endif

}  // namespace vert

template <DType ST, DType IT, int NV>
__global__ void __launch_bounds__(kVertThreads, 6) ssu_vertical(const Params p, const Launch l) {
  using SW = typename Stor<ST>::type;
  constexpr int E = 16 / int(sizeof(SW));
  constexpr int V = E * NV;
  constexpr int RM = rows_per_lane(V);
  constexpr int S = kVertStages;
  extern __shared__ __align__(128) unsigned char vsm[];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __shared__ __align__(8) uint64_t full[S];  // stage s holds a tile: phase k = tile s + k*S
#endif

  Ctx c;
  if (!prologue<IT>(p, l, c)) return;  // uniform over the CTA
  const int tid = int(threadIdx.x), nthr = int(blockDim.x);
  const int L = 1 << l.lshift;
  const int lane = tid & (L - 1);
  const int gi = tid >> l.lshift;  // lane group
  const int G = nthr >> l.lshift;  // lane groups per CTA; tile_rows = G * R
  const int HP = int(p.H * p.P), P = int(p.P);
  const int h = c.h;
  const int64_t N = p.N;
  const int g = h / (int(p.H) / int(p.G));
  const int nvec = int(N / E);
  const int p0 = c.chunk * l.rows_cta;
  const int p1 = p0 + l.rows_cta < P ? p0 + l.rows_cta : P;
  const int TR = l.tile_rows;
  const int ntiles = (p1 - p0 + TR - 1) / TR;
  const uint32_t row_bytes = uint32_t(N) * uint32_t(sizeof(SW));
  const uint32_t stage_bytes = vert_stage_bytes(TR, N, int(sizeof(SW)));
  float* bcs = reinterpret_cast<float*>(vsm + size_t(S) * stage_bytes);  // [t][B: N | C: N]
  const bool staged = c.len <= l.bc_steps;
  const bool pipe = !c.padded;  // padded entries read nothing
  // First source row of this chunk (only formed for non-padded entries: src is a slot then).
  const unsigned char* gsrc =
      pipe ? static_cast<const unsigned char*>(p.state) +
                 ((int64_t(c.src) * HP + int64_t(h) * P + p0) * N) * int64_t(sizeof(SW))
           : nullptr;

  // Tile i (rows [p0 + i*TR, +TR) clipped to p1) -> stage i % S.
  auto issue = [&](int i) {
    const int nr = min(TR, p1 - p0 - i * TR);
    const uint32_t bytes = uint32_t(nr) * row_bytes;
    unsigned char* dst = vsm + size_t(i % S) * stage_bytes;
    const unsigned char* src = gsrc + int64_t(i) * TR * row_bytes;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (tid == 0) {
      vert::mbar_arrive_expect_tx(&full[i % S], bytes);
      vert::bulk_g2s(dst, src, bytes, &full[i % S]);
    }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    for (uint32_t o = uint32_t(tid) * 16u; o < bytes; o += uint32_t(nthr) * 16u)
      vert::cp_async16(dst + o, src + o);
#else
    for (uint32_t o = uint32_t(tid) * 16u; o < bytes; o += uint32_t(nthr) * 16u)
      *reinterpret_cast<uint4*>(dst + o) = *reinterpret_cast<const uint4*>(src + o);
#endif
  };

  // ---- B/C of every step -> fp32 shared memory (when they fit) ----
  if (staged) {
    const int n2 = int(N), cnt = c.len * n2;
    for (int i = tid; i < cnt; i += nthr) {
      const int t = i / n2, n = i - t * n2;
      const int64_t bc = (int64_t(c.row0 + t) * p.G + g) * N + n;
      bcs[2 * i - n] = ld_scalar<IT>(p.B, bc);       // t*2N + n
      bcs[2 * i - n + n2] = ld_scalar<IT>(p.C, bc);  // t*2N + N + n
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (pipe && tid == 0) {
#pragma unroll
    for (int s = 0; s < S; ++s)
      vert::mbar_init(&full[s], 1u);
    vert::mbar_init_fence();
  }
#endif
  __syncthreads();  // staged B/C and the barriers are ready
  if (pipe) {
#pragma unroll
    for (int i = 0; i < S; ++i) {
      if (i < ntiles) issue(i);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900 && __CUDA_ARCH__ >= 800
      vert::cp_async_commit();  // one group per tile slot, empty past the end
#endif
    }
  }

  auto vok = [&](int k) { return lane + k * L < nvec; };
  auto col = [&](int k) { return int64_t(lane + k * L) * E; };

  for (int i = 0; i < ntiles; ++i) {
    const int tr0 = p0 + i * TR;       // first row (of P) of the tile
    const int nr = min(TR, p1 - tr0);  // rows in the tile
    int hp[RM];
    unsigned act = 0;  // bit r: row r of this lane group exists
#pragma unroll
    for (int r = 0; r < RM; ++r) {
      const int q = gi + r * G;
      const bool a = r < l.R && q < nr;
      act |= unsigned(a) << r;
      hp[r] = h * P + tr0 + (a ? q : 0);
    }
    auto on = [&](int r) { return (act >> r) & 1u; };

    float s[RM][V];
#pragma unroll
    for (int r = 0; r < RM; ++r)
#pragma unroll
      for (int v = 0; v < V; ++v)
        s[r][v] = 0.f;

    if (pipe) {
      const int st = i % S;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      vert::mbar_wait(&full[st], uint32_t(i / S) & 1u);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
      vert::cp_async_wait<S - 1>();  // groups 0..i done (S + i committed)
      __syncthreads();               // ... by every thread
#else
      __syncthreads();
#endif
      const unsigned char* sb = vsm + size_t(st) * stage_bytes;
#pragma unroll
      for (int r = 0; r < RM; ++r) {
        if (!on(r)) continue;
        const unsigned char* rowp = sb + uint32_t(gi + r * G) * row_bytes;
#pragma unroll
        for (int k = 0; k < NV; ++k)
          if (vok(k))
            cvt_state_vec<ST>(*reinterpret_cast<const uint4*>(rowp + col(k) * int64_t(sizeof(SW))),
                              &s[r][k * E]);
      }
      if constexpr (ST == DType::I16) {
        const int64_t base = int64_t(c.src) * HP;
#pragma unroll
        for (int r = 0; r < RM; ++r) {
          const float sc = on(r) ? p.state_scale[base + hp[r]] : 0.f;
#pragma unroll
          for (int v = 0; v < V; ++v)
            s[r][v] *= sc;
        }
      }
      __syncthreads();  // every thread is done reading stage st: refill it
      if (i + S < ntiles) issue(i + S);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900 && __CUDA_ARCH__ >= 800
      vert::cp_async_commit();
#endif
    }

    run_rows<ST, IT, NV>(p, c, L, lane, hp, act, s, [&](int t, int k, float* Bk, float* Ck) {
      if (staged) {  // fp32 rows in shared memory: [t][B: N | C: N]
        const float4* bp = reinterpret_cast<const float4*>(bcs + int64_t(t) * 2 * N + col(k));
        const float4* cp = reinterpret_cast<const float4*>(bcs + int64_t(t) * 2 * N + N + col(k));
#pragma unroll
        for (int j = 0; j < E / 4; ++j) {
          const float4 fb = bp[j], fc = cp[j];
          Bk[4 * j] = fb.x;
          Bk[4 * j + 1] = fb.y;
          Bk[4 * j + 2] = fb.z;
          Bk[4 * j + 3] = fb.w;
          Ck[4 * j] = fc.x;
          Ck[4 * j + 1] = fc.y;
          Ck[4 * j + 2] = fc.z;
          Ck[4 * j + 3] = fc.w;
        }
      } else {
        const int64_t bc = (int64_t(c.row0 + t) * p.G + g) * N;
        ld_in_vec<IT, E>(p.B, bc + col(k), *reinterpret_cast<float (*)[E]>(Bk));
        ld_in_vec<IT, E>(p.C, bc + col(k), *reinterpret_cast<float (*)[E]>(Ck));
      }
    });
  }
}

// Host side: launches the vertical kernel (NV = 2 only for float32 states with N > 128).
template <DType ST, DType IT>
cudaError_t launch_vert(const Params& p, const Plan& pl, dim3 grid, dim3 block,
                        cudaStream_t stream) {
  auto run = [&](auto kernel) -> cudaError_t {
    // Static shared memory of the kernel (mbarriers, prologue scratch) is below 1 KiB.
    if (pl.smem + 1024 > 48 * 1024) {
      cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(pl.smem));
      if (err != cudaSuccess) return err;
    }
    kernel<<<grid, block, pl.smem, stream>>>(p, pl.l);
    return cudaSuccess;
  };
  if (pl.nv == 1) return run(ssu_vertical<ST, IT, 1>);
  if constexpr (ST == DType::F32) {
    if (pl.nv == 2) return run(ssu_vertical<ST, IT, 2>);
  }
  return cudaErrorInvalidConfiguration;
}

}  // namespace cuda
}  // namespace ssu

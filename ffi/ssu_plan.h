// Planning of the CUDA kernels as pure host functions: which strategy runs a problem and with
// what launch shape, or why it cannot. No CUDA headers: compiled into the CUDA module (its
// handler plans every call) and into the CPU module, so the rules are unit-tested on any
// machine and the Python layer refuses an impossible explicit `algorithm` at lowering time
// with the same words the handler would use.
#pragma once
#include <cstdint>
#include <string>
#include "ssu_params.h"

namespace ssu {
namespace cuda {

// What one CTA of the main grid covers, and the grid layout (see make_plan).
//   main CTAs:  blockIdx.x in [0, main_blocks) -> (entry b, head h, row chunk), row-major
//               (b, h, chunk); each CTA owns rows [chunk*rows_cta, +rows_cta) of head h.
//   zero CTAs:  blockIdx.x in [main_blocks, main_blocks + zero_blocks) (varlen only) zero the
//               rows of `out` that no sequence owns.
struct Launch {
  int lshift;           // log2(lanes per state row): register / vertical kernels (generic: 5)
  int R;                // rows per lane group (register / vertical), 1 for the generic kernel
  int rows_cta;         // rows of P per CTA
  int64_t chunks;       // CTAs per (entry, head)
  int64_t main_blocks;  // nb * H * chunks
  int64_t zero_blocks;  // varlen zero-fill CTAs
  int tile_rows;        // vertical kernel: rows per shared-memory stage (= groups * R)
  int bc_steps;         // vertical kernel: most steps whose B/C are staged in shared memory
  int heads_item;       // single-step kernel: heads per work item (item = entry x head chunk)
  int batches_head;     // single-step kernel: batches of rows_cta rows per head
  uint32_t g_mul;       // fast path: h / (H / G) = umulhi(h, g_mul) >> g_shr (g_mul 0: H == G)
  int g_shr;
};

// Most rows one lane group of the register kernel carries at once, for V fp32 state values
// per lane (host and device must agree).
constexpr int rows_per_lane(int V) { return V <= 4 ? 4 : (V <= 8 ? 2 : 1); }

// One kernel per strategy (ssu_cuda_<strategy>.cuh), named as users name the strategy.
enum class Kernel : int {
  kNone = 0,
  kSimple = 1,
  kHorizontal = 2,
  kGeneric = 3,
  kVertical = 4,
  kSimpleStep1 = 5,
  kFast = 6,
  kFastMtp = 7
};

// The fast path (ssu_cuda_fast.cuh): the dstates it is instantiated for, and its rows per
// thread (KV, a template parameter: 1, 2 or 4).
constexpr bool fast_dstate(int64_t N) {
  return N == 16 || N == 32 || N == 64 || N == 128 || N == 256;
}
// Per-element parameters (Mamba-1) are instantiated for these dstates only.
constexpr bool fast_elem_dstate(int64_t N) { return N == 16; }
// Varlen on the fast path (ssu_fast_mtp<..., VL = true>) is instantiated for these dstates and
// input dtypes only.
constexpr bool fast_varlen_dstate(int64_t N) { return N == 64 || N == 128; }
constexpr bool fast_varlen_input(DType t) { return t == DType::F32 || t == DType::BF16; }
// Multi-token steps with T compiled in (ssu_fast_mtp<..., TC = T>: the step loop unrolled, all
// steps' inputs loaded up front at one row per thread) are instantiated for these states,
// inputs, dstates and T, without stochastic rounding; opt-in (JAX_MAMBA_CUDA_MTP_STEPS=1) until
// measured against the runtime loop (notes/kernel_versions.md v18).
constexpr bool fast_mtp_steps_types(DType st, DType in, int64_t N) {
  return (st == DType::F32 || st == DType::BF16) && in == DType::BF16 && N == 128;
}
constexpr bool fast_mtp_steps(DType st, DType in, int64_t N, int64_t T) {
  return fast_mtp_steps_types(st, in, N) && (T == 2 || T == 4 || T == 6 || T == 8);
}

// Vertical kernel (ssu_cuda_vertical.cuh): shared-memory ring depth, most threads per CTA, and
// the bytes of one stage of `tile_rows` state rows of N elements (128-byte aligned stages).
constexpr int kVertStages = 3;
constexpr int kVertThreads = 128;
SSU_HD constexpr uint32_t vert_stage_bytes(int tile_rows, int64_t N, int elem) {
  return uint32_t((int64_t(tile_rows) * N * elem + 127) / 128 * 128);
}

struct Plan {
  Kernel kernel = Kernel::kNone;
  int nv = 0;  // 16-byte state vectors per lane (register / vertical kernels), rows
               // per thread (single-step kernel)
  int threads = 0;
  size_t smem = 0;          // dynamic shared memory (generic / vertical kernels)
  bool persistent = false;  // grid = resident CTAs, each looping over l.main_blocks items
  bool pdl = false;         // fast path: launched with programmatic stream serialization
  int sms = 0;              // multiprocessors of the device (persistent grids)
  int slices = 0;           // fast path: the grid's z extent (entries, + varlen's zero slice)
  int steps = 0;            // fast multi-token path: T compiled into the kernel (0: runtime loop)
  Launch l{};
};

// What planning needs to know about the device.
struct DeviceInfo {
  int sms = 0;
  int smem_optin = 48 * 1024;
};

// The `algorithm` strategy names (docs/performance.md, "Strategies"), in id order.
enum Algorithm : int64_t { kAuto = 0, kSimple = 1, kVertical = 2, kHorizontal = 3 };

// The plan for p under `algorithm` on a device like di; false (and *why) when that strategy
// cannot run p.
bool make_plan(const Params& p, int64_t algorithm, const DeviceInfo& di, Plan* pl,
               std::string* why);

// Kernel names as they appear in profiles (ncu, nsys).
const char* kernel_name(Kernel k);

}  // namespace cuda
}  // namespace ssu

// Decoding the FFI call frame into ssu::Params, shared by the CPU and CUDA handlers.
// Operands arrive in a fixed order (absent ones as zero-size placeholders, flagged in the
// `present` attribute); the Python layer has already validated shapes and dtypes, so the
// checks here only guard against a mismatched caller and never touch data.
#pragma once
#include <string>
#include <utility>
#include "xla/ffi/api/ffi.h"
#include "ssu_params.h"

namespace ssu {
namespace ffi = xla::ffi;

// Operand order, mirrored in jax_mamba/ops.py (_OPERANDS).
enum Arg : int {
  aState, aX, aDt, aA, aB, aC, aD, aZ, aDtBias, aSbi, aDst, aScale, aOut, aInter, aInterIdx,
  aInterScales, aCu, aNacc, aSeed, kNumArgs
};
enum Ret : int { rOut, rState, rScale, rInter, rInterScales, kNumRets };

template <typename Binding>
auto bind_ssu(Binding b) {
  return std::move(b).RemainingArgs().RemainingRets().Attrs();
}

inline bool to_dtype(ffi::DataType t, DType* out) {
  switch (t) {
    case ffi::DataType::F32: *out = DType::F32; return true;
    case ffi::DataType::BF16: *out = DType::BF16; return true;
    case ffi::DataType::F16: *out = DType::F16; return true;
    case ffi::DataType::S16: *out = DType::I16; return true;
    default: return false;
  }
}

inline ffi::Error bad(const std::string& what) {
  return ffi::Error::InvalidArgument("jax_mamba_ssu: " + what);
}

// An aliased result whose buffer XLA did not make the operand's own (seen on GPU inside while
// loops: lax.map / sequential vmap). The kernels read and write through the result pointer,
// so the handler first copies the operand there.
struct AliasCopy {
  const void* src;
  void* dst;
  size_t bytes;
};
struct AliasCopies {
  AliasCopy c[kNumRets];
  int n = 0;
};

inline ffi::Error decode_params(ffi::RemainingArgs args, ffi::RemainingRets rets,
                                ffi::Dictionary attrs, Params* p, int64_t* algorithm,
                                AliasCopies* copies) {
  if (args.size() != kNumArgs || rets.size() != kNumRets)
    return bad("expected " + std::to_string(int(kNumArgs)) + " operands and " +
               std::to_string(int(kNumRets)) + " results, got " + std::to_string(args.size()) +
               " and " + std::to_string(rets.size()));
  ffi::AnyBuffer in[kNumArgs] = {
      *args.get<ffi::AnyBuffer>(0),  *args.get<ffi::AnyBuffer>(1),  *args.get<ffi::AnyBuffer>(2),
      *args.get<ffi::AnyBuffer>(3),  *args.get<ffi::AnyBuffer>(4),  *args.get<ffi::AnyBuffer>(5),
      *args.get<ffi::AnyBuffer>(6),  *args.get<ffi::AnyBuffer>(7),  *args.get<ffi::AnyBuffer>(8),
      *args.get<ffi::AnyBuffer>(9),  *args.get<ffi::AnyBuffer>(10), *args.get<ffi::AnyBuffer>(11),
      *args.get<ffi::AnyBuffer>(12), *args.get<ffi::AnyBuffer>(13), *args.get<ffi::AnyBuffer>(14),
      *args.get<ffi::AnyBuffer>(15), *args.get<ffi::AnyBuffer>(16), *args.get<ffi::AnyBuffer>(17),
      *args.get<ffi::AnyBuffer>(18)};
  ffi::Result<ffi::AnyBuffer> out[kNumRets] = {
      *rets.get<ffi::AnyBuffer>(0), *rets.get<ffi::AnyBuffer>(1), *rets.get<ffi::AnyBuffer>(2),
      *rets.get<ffi::AnyBuffer>(3), *rets.get<ffi::AnyBuffer>(4)};

  auto attr = [&](const char* name, auto def) {
    auto v = attrs.get<decltype(def)>(name);
    return v.has_value() ? *v : def;
  };
  int64_t present = attr("present", int64_t(-1));
  if (present < 0) return bad("missing attribute 'present'");
  p->pad = attr("pad_slot_id", int64_t(-1));
  p->softplus = attr("dt_softplus", false);
  p->update_state = !attr("disable_state_update", false);
  p->philox_rounds = int(attr("philox_rounds", int64_t(10)));
  // -1: no limit (a limit of 0 steps is a real one)
  p->cache_steps = attr("cache_steps", int64_t(-1));
  p->has_cache_steps = p->cache_steps >= 0;
  *algorithm = attr("algorithm", int64_t(0));

  p->has_D = present & kD; p->has_z = present & kZ; p->has_bias = present & kDtBias;
  p->has_sbi = present & kSbi; p->has_dst = present & kDst; p->has_inter = present & kInter;
  p->has_inter_idx = present & kInterIdx; p->varlen = present & kCuSeqlens;
  p->has_nacc = present & kNacc; p->has_seed = present & kSeed;

  // Aliased buffers keep the caller's shape: a 3-D state (S, P, N) is the H = 1 case.
  auto st = in[aState].dimensions();
  if (st.size() != 4 && st.size() != 3) return bad("state must be rank 3 or 4");
  p->S = st[0]; p->H = st.size() == 4 ? st[1] : 1;
  p->P = st[st.size() - 2]; p->N = st[st.size() - 1];
  auto xd = in[aX].dimensions();
  if (p->varlen) {
    if (xd.size() != 3) return bad("varlen x must be rank 3 after normalisation");
    p->rows = xd[0]; p->T = 0;
    p->nb = in[aCu].dimensions()[0] - 1;
  } else {
    if (xd.size() != 4) return bad("x must be rank 4 after normalisation");
    p->nb = xd[0]; p->T = xd[1]; p->rows = xd[0] * xd[1];
  }
  auto bd = in[aB].dimensions();
  p->G = bd[bd.size() - 2];
  if (p->H <= 0 || p->P <= 0 || p->N <= 0) return bad("nheads, dim and dstate must be positive");
  if (p->G <= 0 || p->H % p->G != 0) return bad("ngroups must divide nheads");
  if (p->nb < 0) return bad("cu_seqlens must have at least one element");
  if (!to_dtype(in[aState].element_type(), &p->state_t)) return bad("unsupported state dtype");
  if (!to_dtype(in[aX].element_type(), &p->in_t) || p->in_t == DType::I16)
    return bad("unsupported x dtype");
  if (!to_dtype(in[aDt].element_type(), &p->w_t) || p->w_t == DType::I16)
    return bad("unsupported dt dtype");
  if (in[aA].element_type() != ffi::DataType::F32) return bad("A must be float32");

  p->dt_elem = in[aDt].dimensions().size() == xd.size();
  p->A_elem = in[aA].dimensions().size() == 3;
  p->D_elem = in[aD].dimensions().size() == 2;
  p->bias_elem = in[aDtBias].dimensions().size() == 2;
  p->sbi_2d = p->has_sbi && in[aSbi].dimensions().size() == 2;
  p->dst_2d = p->has_dst && in[aDst].dimensions().size() == 2;
  p->K_sbi = p->sbi_2d ? in[aSbi].dimensions()[1] : 1;
  p->K_dst = p->dst_2d ? in[aDst].dimensions()[1] : 1;
  p->idx64 = (p->has_sbi ? in[aSbi] : p->has_dst ? in[aDst] : in[aInterIdx]).element_type() ==
             ffi::DataType::S64;
  p->cu64 = in[aCu].element_type() == ffi::DataType::S64;
  p->nacc64 = in[aNacc].element_type() == ffi::DataType::S64;
  if (p->has_inter) {
    auto id = in[aInter].dimensions();
    p->I = id[0]; p->CS = id[1];
  } else {
    p->I = 0; p->CS = 0;
  }

  p->x = in[aX].untyped_data(); p->dt = in[aDt].untyped_data();
  p->A = static_cast<const float*>(in[aA].untyped_data());
  p->B = in[aB].untyped_data(); p->C = in[aC].untyped_data();
  p->D = in[aD].untyped_data(); p->z = in[aZ].untyped_data();
  p->dt_bias = in[aDtBias].untyped_data();
  p->sbi = in[aSbi].untyped_data(); p->dst = in[aDst].untyped_data();
  p->inter_idx = in[aInterIdx].untyped_data();
  p->cu = in[aCu].untyped_data(); p->nacc = in[aNacc].untyped_data();
  p->seed = static_cast<const uint32_t*>(in[aSeed].untyped_data());
  // Results alias their inputs (state, scales, intermediates, a given out): the kernels read
  // and write through the result pointers.
  p->out = out[rOut]->untyped_data();
  p->state = out[rState]->untyped_data();
  p->state_scale = static_cast<float*>(out[rScale]->untyped_data());
  p->inter = out[rInter]->untyped_data();
  p->inter_scales = static_cast<float*>(out[rInterScales]->untyped_data());

  const int pairs[kNumRets][2] = {{aOut, rOut}, {aState, rState}, {aScale, rScale},
                                  {aInter, rInter}, {aInterScales, rInterScales}};
  copies->n = 0;
  for (const auto& pr : pairs) {
    const ffi::AnyBuffer& src = in[pr[0]];
    ffi::Result<ffi::AnyBuffer>& dst = out[pr[1]];
    const size_t bytes = src.size_bytes();
    if (bytes == 0 || bytes != dst->size_bytes() || src.untyped_data() == dst->untyped_data())
      continue;
    copies->c[copies->n++] = {src.untyped_data(), dst->untyped_data(), bytes};
  }
  return ffi::Error::Success();
}

}  // namespace ssu

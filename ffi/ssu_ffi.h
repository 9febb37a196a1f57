// The typed FFI contract of the jax_mamba_ssu target, shared by the CPU and CUDA handlers, and
// its decoding into ssu::Params. Operands, results and attributes are bound by name from the
// tables below (XLA rejects a call with a missing or mistyped attribute); the Python side has
// one copy of the same tables (jax_mamba/_contract.py), and tests/test_contract.py fails when
// they differ from what the compiled modules report (contract()).
//
// XLA FFI operands are positional and only a suffix can be omitted, so every optional operand
// is always passed (a zero-size placeholder when absent) and its presence is an explicit
// `has_<name>` attribute: no size, 0 included, ever means "absent".
#pragma once
#include <string>
#include <string_view>
#include <utility>
#include <vector>
#include "xla/ffi/api/ffi.h"
#include "ssu_params.h"

// X(name): operands in call order; the required ones first.
// clang-format off
#define SSU_REQUIRED_OPERANDS(X) X(state) X(x) X(dt) X(A) X(B) X(C)
#define SSU_OPTIONAL_OPERANDS(X)                                                          \
  X(D) X(z) X(dt_bias) X(state_batch_indices) X(dst_state_batch_indices) X(state_scale)    \
  X(out) X(intermediate_states_buffer) X(intermediate_state_indices)                      \
  X(intermediate_state_scales) X(cu_seqlens) X(num_accepted_tokens) X(rand_seed)
// X(name): results, each named after the operand whose buffer it aliases (`out` only when
// one was given).
#define SSU_RESULTS(X) \
  X(out) X(state) X(state_scale) X(intermediate_states_buffer) X(intermediate_state_scales)
// X(C++ type, name, Python type name): static settings, then one has_<operand> per optional
// operand (bound after these, generated from SSU_OPTIONAL_OPERANDS).
#define SSU_SETTINGS(X)                                                                   \
  X(int64_t, pad_slot_id, "int") X(bool, dt_softplus, "bool")                             \
  X(bool, disable_state_update, "bool") X(int64_t, philox_rounds, "int")                  \
  X(int64_t, cache_steps, "int") X(std::string_view, algorithm, "str")
// clang-format on

namespace ssu {
namespace ffi = xla::ffi;

#define SSU_ENUM_ARG(name) a_##name,
#define SSU_ENUM_RET(name) r_##name,
enum Arg : int { SSU_REQUIRED_OPERANDS(SSU_ENUM_ARG) SSU_OPTIONAL_OPERANDS(SSU_ENUM_ARG) kNumArgs };
enum Ret : int { SSU_RESULTS(SSU_ENUM_RET) kNumRets };
#undef SSU_ENUM_ARG
#undef SSU_ENUM_RET

// The binding, in handler-parameter order: context (added by the caller), operands, results,
// settings, presence flags.
#define SSU_BIND_ARG(name) .template Arg<ffi::AnyBuffer>()
#define SSU_BIND_RET(name) .template Ret<ffi::AnyBuffer>()
#define SSU_BIND_SETTING(type, name, py) .template Attr<type>(#name)
#define SSU_BIND_FLAG(name) .template Attr<bool>("has_" #name)
template <typename Binding>
auto bind_ssu(Binding b) {
  return std::move(b) SSU_REQUIRED_OPERANDS(SSU_BIND_ARG) SSU_OPTIONAL_OPERANDS(SSU_BIND_ARG)
      SSU_RESULTS(SSU_BIND_RET) SSU_SETTINGS(SSU_BIND_SETTING) SSU_OPTIONAL_OPERANDS(SSU_BIND_FLAG);
}
#undef SSU_BIND_ARG
#undef SSU_BIND_RET
#undef SSU_BIND_SETTING
#undef SSU_BIND_FLAG

// The handler parameters matching bind_ssu, each prefixed by a comma (they follow the context
// parameter), and the same names as a braced initialiser for decode_params.
#define SSU_PARAM_ARG(name) , ffi::AnyBuffer name
#define SSU_PARAM_RET(name) , ffi::Result<ffi::AnyBuffer> ret_##name
#define SSU_PARAM_SETTING(type, name, py) , type name
#define SSU_PARAM_FLAG(name) , bool has_##name
// clang-format off
#define SSU_HANDLER_PARAMS                                                               \
  SSU_REQUIRED_OPERANDS(SSU_PARAM_ARG) SSU_OPTIONAL_OPERANDS(SSU_PARAM_ARG)               \
  SSU_RESULTS(SSU_PARAM_RET) SSU_SETTINGS(SSU_PARAM_SETTING) SSU_OPTIONAL_OPERANDS(SSU_PARAM_FLAG)
#define SSU_LIST_ARG(name) name,
#define SSU_LIST_RET(name) ret_##name,
#define SSU_LIST_SETTING(type, name, py) name,
#define SSU_LIST_FLAG(name) has_##name,
// A Call from the handler's parameters: `Call call = SSU_CALL;`
#define SSU_CALL                                                                          \
  {{SSU_REQUIRED_OPERANDS(SSU_LIST_ARG) SSU_OPTIONAL_OPERANDS(SSU_LIST_ARG)},             \
   {SSU_RESULTS(SSU_LIST_RET)},                                                           \
   {SSU_SETTINGS(SSU_LIST_SETTING)},                                                      \
   {SSU_OPTIONAL_OPERANDS(SSU_LIST_FLAG)}}
// clang-format on

#define SSU_FIELD_SETTING(type, name, py) type name;
#define SSU_FIELD_FLAG(name) bool name;
struct Settings {
  SSU_SETTINGS(SSU_FIELD_SETTING)
};
struct Presence {
  SSU_OPTIONAL_OPERANDS(SSU_FIELD_FLAG)
};
#undef SSU_FIELD_SETTING
#undef SSU_FIELD_FLAG

// One decoded call frame.
struct Call {
  ffi::AnyBuffer in[kNumArgs];
  ffi::Result<ffi::AnyBuffer> ret[kNumRets];
  Settings set;
  Presence has;
};

// The contract as the compiled module sees it, for the Python-side check.
struct Contract {
  std::vector<std::string> operands, results, optional;
  std::vector<std::pair<std::string, std::string>> attributes;  // (name, Python type)
};
inline Contract contract() {
  Contract c;
#define SSU_C_ARG(name) c.operands.push_back(#name);
#define SSU_C_OPT(name) c.optional.push_back(#name);
#define SSU_C_RET(name) c.results.push_back(#name);
#define SSU_C_SETTING(type, name, py) c.attributes.push_back({#name, py});
#define SSU_C_FLAG(name) c.attributes.push_back({"has_" #name, "bool"});
  // clang-format off
  SSU_REQUIRED_OPERANDS(SSU_C_ARG) SSU_OPTIONAL_OPERANDS(SSU_C_ARG)
  SSU_OPTIONAL_OPERANDS(SSU_C_OPT) SSU_RESULTS(SSU_C_RET)
  SSU_SETTINGS(SSU_C_SETTING) SSU_OPTIONAL_OPERANDS(SSU_C_FLAG)
// clang-format on
#undef SSU_C_ARG
#undef SSU_C_OPT
#undef SSU_C_RET
#undef SSU_C_SETTING
#undef SSU_C_FLAG
          return c;
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

// Strategy names, as users pass them (`algorithm`, README).
inline int parse_algorithm(std::string_view s) {
  constexpr std::string_view names[] = {"auto", "simple", "vertical", "horizontal"};
  for (int i = 0; i < 4; ++i)
    if (s == names[i]) return i;
  return -1;
}
inline std::string unknown_algorithm(std::string_view s) {
  return "algorithm: expected auto/simple/vertical/horizontal, got '" + std::string(s) + "'";
}

inline ffi::Error decode_params(Call& call, Params* p, int64_t* algorithm, AliasCopies* copies) {
  ffi::AnyBuffer* in = call.in;
  ffi::Result<ffi::AnyBuffer>* out = call.ret;
  const Settings& set = call.set;
  const Presence& has = call.has;
  *algorithm = parse_algorithm(set.algorithm);
  if (*algorithm < 0) return bad(unknown_algorithm(set.algorithm));
  if (set.philox_rounds <= 0 || set.philox_rounds > 1 << 20)
    return bad("philox_rounds: expected a positive round count, got " +
               std::to_string(set.philox_rounds));
  if (set.cache_steps < 0)
    return bad("cache_steps: expected >= 0, got " + std::to_string(set.cache_steps));
  p->pad = set.pad_slot_id;
  p->softplus = set.dt_softplus;
  p->update_state = !set.disable_state_update;
  p->philox_rounds = int(set.philox_rounds);
  // The public meaning: 0 is no limit of its own; the intermediate buffer's step axis (below)
  // is a limit too.
  p->cache_steps = set.cache_steps;
  p->has_cache_steps = set.cache_steps > 0;

  p->has_D = has.D;
  p->has_z = has.z;
  p->has_dt_bias = has.dt_bias;
  p->has_src_idx = has.state_batch_indices;
  p->has_dst = has.dst_state_batch_indices;
  p->has_inter = has.intermediate_states_buffer;
  p->has_inter_idx = has.intermediate_state_indices;
  p->varlen = has.cu_seqlens;
  p->has_num_accepted = has.num_accepted_tokens;
  p->has_seed = has.rand_seed;
  struct Flag {
    int arg;
    bool present;
    const char* name;
  };
#define SSU_FLAG_AT(name) Flag{a_##name, has.name, #name},
  for (const Flag& f : {SSU_OPTIONAL_OPERANDS(SSU_FLAG_AT)})
    if (!f.present && in[f.arg].element_count() != 0)
      return bad(std::string(f.name) + ": has_" + f.name + "=false but the operand has " +
                 std::to_string(in[f.arg].element_count()) + " elements (expected a placeholder)");
#undef SSU_FLAG_AT
  if (has.intermediate_state_indices && !has.intermediate_states_buffer)
    return bad("has_intermediate_state_indices without has_intermediate_states_buffer");
  if (has.num_accepted_tokens && !has.state_batch_indices)
    return bad("has_num_accepted_tokens without has_state_batch_indices");

  // Aliased buffers keep the caller's shape: a 3-D state (S, P, N) is the H = 1 case.
  auto st = in[a_state].dimensions();
  if (st.size() != 4 && st.size() != 3) return bad("state must be rank 3 or 4");
  p->S = st[0];
  p->H = st.size() == 4 ? st[1] : 1;
  p->P = st[st.size() - 2];
  p->N = st[st.size() - 1];
  auto xd = in[a_x].dimensions();
  if (p->varlen) {
    if (xd.size() != 3) return bad("varlen x must be rank 3 after normalisation");
    p->rows = xd[0];
    p->T = 0;
    p->nb = in[a_cu_seqlens].dimensions()[0] - 1;
  } else {
    if (xd.size() != 4) return bad("x must be rank 4 after normalisation");
    p->nb = xd[0];
    p->T = xd[1];
    p->rows = xd[0] * xd[1];
  }
  auto bd = in[a_B].dimensions();
  p->G = bd[bd.size() - 2];
  if (p->H <= 0 || p->P <= 0 || p->N <= 0) return bad("nheads, dim and dstate must be positive");
  if (p->G <= 0 || p->H % p->G != 0) return bad("ngroups must divide nheads");
  if (p->nb < 0) return bad("cu_seqlens must have at least one element");
  if (!to_dtype(in[a_state].element_type(), &p->state_t)) return bad("unsupported state dtype");
  if ((p->state_t == DType::I16) != has.state_scale)
    return bad("has_state_scale must be set exactly for an int16 state");
  if (!to_dtype(in[a_x].element_type(), &p->input_t) || p->input_t == DType::I16)
    return bad("unsupported x dtype");
  if (!to_dtype(in[a_dt].element_type(), &p->param_t) || p->param_t == DType::I16)
    return bad("unsupported dt dtype");
  if (in[a_A].element_type() != ffi::DataType::F32) return bad("A must be float32");

  p->dt_elem = in[a_dt].dimensions().size() == xd.size();
  p->A_elem = in[a_A].dimensions().size() == 3;
  p->D_elem = in[a_D].dimensions().size() == 2;
  p->bias_elem = in[a_dt_bias].dimensions().size() == 2;
  p->src_2d = p->has_src_idx && in[a_state_batch_indices].dimensions().size() == 2;
  p->dst_2d = p->has_dst && in[a_dst_state_batch_indices].dimensions().size() == 2;
  p->K_src = p->src_2d ? in[a_state_batch_indices].dimensions()[1] : 1;
  p->K_dst = p->dst_2d ? in[a_dst_state_batch_indices].dimensions()[1] : 1;
  p->idx64 = (p->has_src_idx ? in[a_state_batch_indices]
              : p->has_dst   ? in[a_dst_state_batch_indices]
                             : in[a_intermediate_state_indices])
                 .element_type() == ffi::DataType::S64;
  p->cu_seqlens64 = in[a_cu_seqlens].element_type() == ffi::DataType::S64;
  p->num_accepted64 = in[a_num_accepted_tokens].element_type() == ffi::DataType::S64;
  if (p->has_inter) {
    auto id = in[a_intermediate_states_buffer].dimensions();
    p->I = id[0];
    p->CS = id[1];
  } else {
    p->I = 0;
    p->CS = 0;
  }

  p->x = in[a_x].untyped_data();
  p->dt = in[a_dt].untyped_data();
  p->A = static_cast<const float*>(in[a_A].untyped_data());
  p->B = in[a_B].untyped_data();
  p->C = in[a_C].untyped_data();
  p->D = in[a_D].untyped_data();
  p->z = in[a_z].untyped_data();
  p->dt_bias = in[a_dt_bias].untyped_data();
  p->src_idx = in[a_state_batch_indices].untyped_data();
  p->dst = in[a_dst_state_batch_indices].untyped_data();
  p->inter_idx = in[a_intermediate_state_indices].untyped_data();
  p->cu_seqlens = in[a_cu_seqlens].untyped_data();
  p->num_accepted = in[a_num_accepted_tokens].untyped_data();
  p->seed = static_cast<const uint32_t*>(in[a_rand_seed].untyped_data());
  // Results alias their inputs (state, scales, intermediates, a given out): the kernels read
  // and write through the result pointers.
  p->out = out[r_out]->untyped_data();
  p->state = out[r_state]->untyped_data();
  p->state_scale = static_cast<float*>(out[r_state_scale]->untyped_data());
  p->inter = out[r_intermediate_states_buffer]->untyped_data();
  p->inter_scales = static_cast<float*>(out[r_intermediate_state_scales]->untyped_data());

  const int pairs[kNumRets][2] = {{a_out, r_out},
                                  {a_state, r_state},
                                  {a_state_scale, r_state_scale},
                                  {a_intermediate_states_buffer, r_intermediate_states_buffer},
                                  {a_intermediate_state_scales, r_intermediate_state_scales}};
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

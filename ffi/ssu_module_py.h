// What both nanobind modules expose besides registrations(): contract(), the typed FFI
// contract (ssu_ffi.h) as this build compiled it, checked against the Python tables
// (tests/test_contract.py); plan(), the CUDA planner (ssu_plan.h) on a described problem, and
// plan_detail(), the same plan's launch shape (tests/test_plan.py).
#pragma once
#include <stdexcept>
#include <string>
#include "nanobind/nanobind.h"
#include "nanobind/stl/string.h"
#include "nanobind/stl/tuple.h"
#include "ssu_ffi.h"
#include "ssu_plan.h"

namespace ssu {
inline nanobind::dict contract_dict() {
  const Contract c = contract();
  nanobind::list operands, results, optional, attributes;
  for (const auto& s : c.operands)
    operands.append(nanobind::str(s.c_str()));
  for (const auto& s : c.results)
    results.append(nanobind::str(s.c_str()));
  for (const auto& s : c.optional)
    optional.append(nanobind::str(s.c_str()));
  for (const auto& [name, py] : c.attributes)
    attributes.append(nanobind::make_tuple(nanobind::str(name.c_str()), nanobind::str(py.c_str())));
  nanobind::dict d;
  d["operands"] = operands;
  d["results"] = results;
  d["optional"] = optional;
  d["attributes"] = attributes;
  return d;
}

// The CUDA planner's plan for a problem described by its canonical sizes; false and *why when
// it has none.
inline bool plan_sizes(int64_t S, int64_t H, int64_t P, int64_t N, int64_t nb, int64_t T,
                       int64_t rows, const std::string& state_dtype, bool varlen, bool has_inter,
                       int64_t I, int64_t CS, int64_t cache_steps, const std::string& algorithm,
                       int sms, int smem_optin, bool has_seed, bool per_element,
                       const std::string& input_dtype, cuda::Plan* plan, std::string* why) {
  Params p{};
  p.has_seed = has_seed;   // stochastic rounding (rand_seed given)
  p.A_elem = per_element;  // Mamba-1 (per-element A): the planner treats such kinds alike
  p.S = S;
  p.H = H;
  p.P = P;
  p.N = N;
  p.nb = nb;
  p.T = T;
  p.rows = rows;
  p.varlen = varlen;
  p.has_inter = has_inter;
  p.I = I;
  p.CS = CS;
  p.cache_steps = cache_steps;
  p.has_cache_steps = cache_steps > 0;
  // the first `n` of these names (states: all four; inputs: the floats) -> *t, or *why
  auto dtype = [why](const std::string& name, int n, const char* what, DType* t) {
    const std::string names[] = {"float32", "bfloat16", "float16", "int16"};
    const DType dts[] = {DType::F32, DType::BF16, DType::F16, DType::I16};
    for (int i = 0; i < n; ++i)
      if (names[i] == name) {
        *t = dts[i];
        return true;
      }
    *why = std::string("unsupported ") + what + " dtype " + name;
    return false;
  };
  if (!dtype(state_dtype, 4, "state", &p.state_t) || !dtype(input_dtype, 3, "input", &p.input_t))
    return false;
  const int64_t id = parse_algorithm(algorithm);
  if (id < 0) {
    *why = unknown_algorithm(algorithm);
    return false;
  }
  cuda::DeviceInfo di;
  di.sms = sms;
  di.smem_optin = smem_optin;
  return cuda::make_plan(p, id, di, plan, why);
}

#define SSU_PLAN_ARGS                                                                            \
  int64_t S, int64_t H, int64_t P, int64_t N, int64_t nb, int64_t T, int64_t rows,               \
      const std::string &state_dtype, bool varlen, bool has_inter, int64_t I, int64_t CS,        \
      int64_t cache_steps, const std::string &algorithm, int sms, int smem_optin, bool has_seed, \
      bool per_element, const std::string &input_dtype
#define SSU_PLAN_PASS                                                                          \
  S, H, P, N, nb, T, rows, state_dtype, varlen, has_inter, I, CS, cache_steps, algorithm, sms, \
      smem_optin, has_seed, per_element, input_dtype

// (kernel name, "" ) or ("", why not).
inline std::tuple<std::string, std::string> plan_py(SSU_PLAN_ARGS) {
  cuda::Plan plan;
  std::string why;
  if (!plan_sizes(SSU_PLAN_PASS, &plan, &why)) return {"", why};
  return {cuda::kernel_name(plan.kernel), ""};
}

// The plan's launch shape, for tests of the planner's choices: kernel, rows per thread (the
// register kernels: vectors per lane), threads per CTA, rows per CTA, the fast path's z extent,
// the fast multi-token path's compiled-in T (0: runtime loop).
inline nanobind::dict plan_detail_py(SSU_PLAN_ARGS) {
  cuda::Plan plan;
  std::string why;
  if (!plan_sizes(SSU_PLAN_PASS, &plan, &why)) throw std::invalid_argument(why);
  nanobind::dict d;
  d["kernel"] = cuda::kernel_name(plan.kernel);
  d["nv"] = plan.nv;
  d["threads"] = plan.threads;
  d["rows_cta"] = plan.l.rows_cta;
  d["slices"] = plan.slices;
  d["steps"] = plan.steps;
  return d;
}

inline void def_module_functions(nanobind::module_& m) {
  namespace nb = nanobind;
  m.def("contract", &contract_dict);
#define SSU_PLAN_NAMES                                                                           \
  nb::arg("S"), nb::arg("H"), nb::arg("P"), nb::arg("N"), nb::arg("nb"), nb::arg("T"),           \
      nb::arg("rows"), nb::arg("state_dtype"), nb::arg("varlen"), nb::arg("has_inter"),          \
      nb::arg("I"), nb::arg("CS"), nb::arg("cache_steps"), nb::arg("algorithm"), nb::arg("sms"), \
      nb::arg("smem_optin"), nb::arg("has_seed") = false, nb::arg("per_element") = false,        \
                             nb::arg("input_dtype") = "float32"
  m.def("plan", &plan_py, SSU_PLAN_NAMES);
  m.def("plan_detail", &plan_detail_py, SSU_PLAN_NAMES);
#undef SSU_PLAN_NAMES
}
#undef SSU_PLAN_ARGS
#undef SSU_PLAN_PASS
}  // namespace ssu

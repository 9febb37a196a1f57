// What both nanobind modules expose besides registrations(): contract(), the typed FFI
// contract (ssu_ffi.h) as this build compiled it, checked against the Python tables
// (tests/test_contract.py); plan(), the CUDA planner (ssu_plan.h) on a described problem.
#pragma once
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

// (kernel name, "" ) or ("", why not) for a problem described by its canonical sizes.
inline std::tuple<std::string, std::string> plan_py(
    int64_t S, int64_t H, int64_t P, int64_t N, int64_t nb, int64_t T, int64_t rows,
    const std::string& state_dtype, bool varlen, bool has_inter, int64_t I, int64_t CS,
    int64_t cache_steps, const std::string& algorithm, int sms, int smem_optin, bool has_seed) {
  Params p{};
  p.has_seed = has_seed;  // stochastic rounding (rand_seed given)
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
  const std::string types[] = {"float32", "bfloat16", "float16", "int16"};
  const DType dts[] = {DType::F32, DType::BF16, DType::F16, DType::I16};
  int t = 0;
  while (t < 4 && types[t] != state_dtype)
    ++t;
  if (t == 4) return {"", "unsupported state dtype " + state_dtype};
  p.state_t = dts[t];
  const int64_t id = parse_algorithm(algorithm);
  if (id < 0) return {"", unknown_algorithm(algorithm)};
  cuda::DeviceInfo di;
  di.sms = sms;
  di.smem_optin = smem_optin;
  cuda::Plan plan;
  std::string why;
  if (!cuda::make_plan(p, id, di, &plan, &why)) return {"", why};
  return {cuda::kernel_name(plan.kernel), ""};
}

inline void def_module_functions(nanobind::module_& m) {
  namespace nb = nanobind;
  m.def("contract", &contract_dict);
  m.def("plan", &plan_py, nb::arg("S"), nb::arg("H"), nb::arg("P"), nb::arg("N"), nb::arg("nb"),
        nb::arg("T"), nb::arg("rows"), nb::arg("state_dtype"), nb::arg("varlen"),
        nb::arg("has_inter"), nb::arg("I"), nb::arg("CS"), nb::arg("cache_steps"),
        nb::arg("algorithm"), nb::arg("sms"), nb::arg("smem_optin"), nb::arg("has_seed") = false);
}
}  // namespace ssu

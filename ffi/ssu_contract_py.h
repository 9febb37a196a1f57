// contract() of the nanobind modules: the typed FFI contract (ssu_ffi.h) as this build compiled
// it, so the Python tables can be checked against it (tests/test_contract.py).
#pragma once
#include "nanobind/nanobind.h"
#include "ssu_ffi.h"

namespace ssu {
inline nanobind::dict contract_dict() {
  const Contract c = contract();
  nanobind::list operands, results, optional, attributes;
  for (const auto& s : c.operands) operands.append(nanobind::str(s.c_str()));
  for (const auto& s : c.results) results.append(nanobind::str(s.c_str()));
  for (const auto& s : c.optional) optional.append(nanobind::str(s.c_str()));
  for (const auto& [name, py] : c.attributes)
    attributes.append(nanobind::make_tuple(nanobind::str(name.c_str()), nanobind::str(py.c_str())));
  nanobind::dict d;
  d["operands"] = operands;
  d["results"] = results;
  d["optional"] = optional;
  d["attributes"] = attributes;
  return d;
}
}  // namespace ssu

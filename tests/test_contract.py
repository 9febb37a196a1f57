"""The typed FFI contract: Python's tables equal what the compiled modules bound, and XLA
rejects a call frame that does not follow it (missing or mistyped attributes, a placeholder
that is not empty)."""
import dataclasses

import jax
import numpy as np
import pytest

import jax_mamba
from jax_mamba import _contract, _cpu, _ffi
from jax_mamba._problem import SIGNATURE, Problem, build_problem
from cases import Cfg, make_case

MODULES = [("cpu", _cpu)] + ([("cuda", _ffi._cuda)] if jax_mamba.HAS_CUDA else [])


@pytest.mark.parametrize("platform,module", MODULES, ids=[m[0] for m in MODULES])
def test_python_tables_equal_the_compiled_contract(platform, module):
    c = module.contract()
    assert c["operands"] == list(_contract.OPERANDS)
    assert c["optional"] == list(_contract.OPTIONAL)
    assert c["results"] == list(_contract.RESULTS)
    assert c["attributes"] == [(name, t.__name__) for name, t in _contract.ATTRIBUTES]


def test_every_problem_field_is_an_operand():
    """Operands are the public arguments and the Problem fields, by the same names; each
    result aliases an operand."""
    fields = {f.name for f in dataclasses.fields(Problem)}
    assert set(_contract.OPERANDS) <= fields
    assert set(_contract.OPERANDS) - {"rand_seed"} <= {name for name, _ in SIGNATURE}
    assert set(_contract.RESULTS) <= set(_contract.OPERANDS)


def _frame(**cfg):
    kw = make_case(Cfg(**cfg), np.random.default_rng(0))
    pb, _ = build_problem(**{name: kw.get(name, default) for name, default in SIGNATURE})
    return _contract.frame(pb)


def _run(operands, results, aliases, attrs):
    call = jax.ffi.ffi_call(_contract.TARGET, results, input_output_aliases=aliases)
    with jax.default_device(jax.devices("cpu")[0]):
        return jax.block_until_ready(jax.jit(lambda *o: call(*o, **attrs))(*operands))


def test_the_frame_runs():
    out = _run(*_frame())[0]
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("name", [name for name, _ in _contract.ATTRIBUTES])
def test_a_missing_attribute_is_rejected(name):
    operands, results, aliases, attrs = _frame()
    del attrs[name]
    with pytest.raises(Exception, match="(?i)attribute"):
        _run(operands, results, aliases, attrs)


@pytest.mark.parametrize("name,bad", [("pad_slot_id", np.int32(-1)), ("dt_softplus", 1),
                                      ("philox_rounds", 10.0), ("algorithm", 0),
                                      ("has_D", 1), ("cache_steps", True)])
def test_a_mistyped_attribute_is_rejected(name, bad):
    operands, results, aliases, attrs = _frame()
    attrs[name] = bad
    with pytest.raises(Exception, match="(?i)attr|type|wrong"):
        _run(operands, results, aliases, attrs)


def test_an_unknown_algorithm_name_is_rejected():
    operands, results, aliases, attrs = _frame()
    attrs["algorithm"] = "diagonal"
    with pytest.raises(Exception, match="algorithm: expected auto/simple/vertical/horizontal"):
        _run(operands, results, aliases, attrs)


def test_a_flag_that_hides_a_real_operand_is_rejected():
    """has_D=False with a non-empty D: the handler refuses rather than guess."""
    operands, results, aliases, attrs = _frame(D=True)
    attrs["has_D"] = False
    with pytest.raises(Exception, match="D: has_D=false but the operand has"):
        _run(operands, results, aliases, attrs)


def test_absent_operands_are_empty_placeholders_flagged_absent():
    operands, _, aliases, attrs = _frame(D=False, sbi="none")
    names = list(_contract.OPERANDS)
    for name in ("D", "z", "state_batch_indices", "cu_seqlens", "rand_seed"):
        assert attrs[f"has_{name}"] is False
        assert operands[names.index(name)].shape == (0,)
        assert names.index(name) not in aliases  # nothing to update in place
    assert attrs["has_state_batch_indices"] is False and aliases[0] == 1  # state -> result 1

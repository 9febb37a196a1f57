"""Degenerate shapes, careless calls, bad cu_seqlens and extreme index values
(docs/semantics.md: "Invalid runtime data", "Errors at trace time"; issues #7, #18).

Crash-prone cases run in a child process: a segfault or heap corruption fails the test
instead of killing pytest."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mamba
from cases import Cfg, check, make_case, to_device

HERE = os.path.dirname(__file__)
IMPLS = {"ffi": jax_mamba.selective_state_update,
         "reference": jax_mamba.reference.selective_state_update}


def _child(code_or_args, timeout=600):
    """Runs python code (str) or tests/degenerate_worker.py args (list) in a child process."""
    cmd = [sys.executable] + (["-c", textwrap.dedent(code_or_args)] if isinstance(code_or_args, str)
                              else [os.path.join(HERE, "degenerate_worker.py")] + code_or_args)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE] + sys.path))
    # cwd=tests/: `python -c` puts the cwd first on sys.path, and from the repo root the source
    # tree (no compiled modules when the package is installed) would shadow the install
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)
    tail = "\n".join((r.stdout + r.stderr).splitlines()[-25:])
    assert r.returncode == 0, f"child exited with {r.returncode}:\n{tail}"
    return r.stdout


def _platform_device(platform):
    """The first device of `platform`; skips the test when this machine has no GPU (or the
    CUDA handlers were not built)."""
    if platform == "gpu":
        try:
            gpus = jax.devices("gpu")
        except RuntimeError:
            gpus = []
        if not (gpus and jax_mamba.HAS_CUDA):
            pytest.skip("needs a GPU with the CUDA handlers built")
    return jax.devices(platform)[0]


@pytest.mark.parametrize("seed", [1, 2])
def test_degenerate_property(seed, device):
    """Random degenerate / boundary shapes (axes 0, 1, limits; every index form and mode;
    empty batches, zero steps, arbitrary cu_seqlens): handler, reference and oracle agree."""
    out = _child([str(seed), "40", device.platform])
    assert out.strip().endswith("ok")


# ---- extreme index values (issue #18) ----

EXTREME_OPERANDS = ["state_batch_indices", "dst_state_batch_indices", "intermediate_state_indices",
                    "num_accepted_tokens", "cu_seqlens"]


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
@pytest.mark.parametrize("idx", ["int32", "int64"])
@pytest.mark.parametrize("operand", EXTREME_OPERANDS)
def test_extreme_index_values(operand, idx, platform):
    """INT64_MIN, INT64_MAX, INT32_MIN, INT32_MAX (and their neighbours), pad_slot_id - 1, pad,
    pad + 1, the operand's bounds and, for int64, values whose low 32 bits are a valid slot or
    the pad, one element at a time, in every index operand (1-D and 2-D, used and unused
    columns, padded entries, disable_state_update), with the default pad and an extreme one:
    handler and reference agree with the oracle, nothing else is written
    (tests/degenerate_worker.py, EXTREMES)."""
    _platform_device(platform)
    out = _child(["extremes", operand, idx, platform])
    assert out.strip().endswith("ok") and " values" in out, out[-500:]


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("dst_2d", [False, True])
def test_dst_int64_min_is_invalid(dst_2d, impl, platform):
    """Issue #18's repro: a dst slot of INT64_MIN is out of range like any other (NaN out,
    nothing written), not "no write" (the value the C++ handler once used for it)."""
    from conftest import x64
    dev = _platform_device(platform)
    S, H, P, N = 4, 2, 4, 8
    r = np.random.default_rng(0)
    st = r.standard_normal((S, H, P, N)).astype(np.float32)
    lo = np.iinfo(np.int64).min
    with x64(), jax.default_device(dev):
        dst = np.array([[lo]] if dst_2d else [lo])
        res = IMPLS[impl](
            st, r.standard_normal((1, H, P)).astype(np.float32), np.full((1, H), .1, np.float32),
            -np.ones(H, np.float32), r.standard_normal((1, 1, N)).astype(np.float32),
            r.standard_normal((1, 1, N)).astype(np.float32), np.ones(H, np.float32),
            state_batch_indices=np.array([1]), dst_state_batch_indices=dst)
        assert res.state.dtype == np.float32 and dst.dtype == np.int64
        out, state = np.asarray(res.out), np.asarray(res.state)
    assert np.isnan(out).all(), out
    np.testing.assert_array_equal(state, st)


# ---- the handler's own defence: shapes Python now rejects, fed straight to the FFI call ----

_RAW = """
import dataclasses, numpy as np, jax, jax.numpy as jnp
import jax_mamba
from jax_mamba import ops, _problem
from cases import Cfg, make_case, to_device
dev = jax.devices({platform!r})[0]
cfg = Cfg(mode={mode!r}, sbi="2d", dst={dst!r}, inter={inter!r}, S=40, b=3, T=2)
kw = to_device(make_case(cfg, np.random.default_rng(0)), dev)
pb, restore = _problem.build_problem(**{{n: kw.get(n, d) for n, d in _problem.SIGNATURE}})
state0 = np.asarray(pb.state).copy()
{edit}
with jax.default_device(dev):
    res = ops._call(pb, restore)
out = np.asarray(res.out, np.float32)
# nothing may be written anywhere; every entry with a step is NaN (varlen: empty sequences
# and rows no sequence owns are 0)
np.testing.assert_array_equal(np.asarray(res.state), state0)
assert np.isnan(out).any() and (np.isnan(out) | (out == 0)).all(), out
if {mode!r} != "varlen":
    assert np.isnan(out).all(), out
print("ok")
"""

_INTER0 = ("pb.intermediate_states_buffer = pb.intermediate_states_buffer[:, :0]; "
           "restore = dataclasses.replace(restore, inter_shape=pb.intermediate_states_buffer.shape); "
           "pb.settings = dataclasses.replace(pb.settings, cache_steps=None)")
RAW_CASES = {
    "sbi_width0_stp": dict(mode="stp", dst="none", inter="none",
                           edit="pb.state_batch_indices = pb.state_batch_indices[:, :0]"),
    "sbi_width0_varlen": dict(mode="varlen", dst="none", inter="none",
                              edit="pb.state_batch_indices = pb.state_batch_indices[:, :0]"),
    "dst_width0_stp": dict(mode="stp", dst="2d", inter="none",
                           edit="pb.dst_state_batch_indices = pb.dst_state_batch_indices[:, :0]"),
    "inter_steps0_stp": dict(mode="stp", dst="none", inter="idx",
                             edit=_INTER0),
    "inter_steps0_mtp": dict(mode="mtp", dst="none", inter="idx",
                             edit=_INTER0),
    "inter_steps0_varlen": dict(mode="varlen", dst="none", inter="noidx",
                                edit=_INTER0),
}


@pytest.mark.parametrize("name", sorted(RAW_CASES))
def test_handler_rejects_zero_widths_at_runtime(name, device):
    """Issue #7 cases 1-2 below the Python checks: no crash, no write, NaN outputs."""
    c = RAW_CASES[name]
    _child(_RAW.format(platform=device.platform, **c))


# ---- the same shapes through the public API: trace-time errors ----

def _kw(**over):
    cfg = Cfg(**{k: v for k, v in over.items() if k in Cfg.__dataclass_fields__})
    return cfg, make_case(cfg, np.random.default_rng(0))


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("mode", ["stp", "mtp", "varlen"])
def test_inter_zero_steps_is_an_error(mode, impl):
    _, kw = _kw(mode=mode, inter="idx")
    kw["intermediate_states_buffer"] = kw["intermediate_states_buffer"][:, :0]
    kw["cache_steps"] = 0
    with pytest.raises(ValueError, match=r"intermediate_states_buffer.*step axis"):
        IMPLS[impl](**kw)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("mode", ["stp", "mtp", "varlen"])
@pytest.mark.parametrize("name", ["state_batch_indices", "dst_state_batch_indices"])
def test_index_width_zero_is_an_error(name, mode, impl):
    _, kw = _kw(mode=mode, sbi="2d", dst="2d", S=40)
    kw[name] = kw[name][:, :0]
    with pytest.raises(ValueError, match=rf"{name}.*K >= "):
        IMPLS[impl](**kw)


# ---- invalid cu_seqlens (issue #7 case 3) ----

def _varlen(cu, TT, seed=0):
    cfg = Cfg(mode="varlen", sbi="1d", S=12, b=len(cu) - 1, T=8)
    kw = make_case(cfg, np.random.default_rng(seed))
    kw["cu_seqlens"] = jnp.asarray(cu, jnp.int32)
    for k in ("x", "z", "out", "B", "C", "dt"):
        if kw.get(k) is not None:
            a = np.zeros((TT,) + kw[k].shape[1:], np.float32)
            a[:] = np.random.default_rng(seed + 1).standard_normal(a.shape)
            kw[k] = jnp.asarray(a, kw[k].dtype)
    return cfg, kw


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_decreasing_last_pair_leaves_valid_rows(impl, device):
    """cu=[0,3,6,4], TT=8: [3,6) is valid and keeps its rows; the decreasing entry owns none;
    rows 6-7 belong to nobody (0)."""
    cfg, kw = _varlen([0, 3, 6, 4], 8)
    kw = to_device(kw, device)
    res = IMPLS[impl](**kw)
    want = check(cfg, kw, res)
    out = np.asarray(res.out, np.float32)
    assert np.isfinite(out[:6]).all() and not np.isnan(want["out"][:6]).any()
    assert (out[6:] == 0).all()
    slot = int(kw["state_batch_indices"][2])
    np.testing.assert_array_equal(np.asarray(res.state[slot]), np.asarray(kw["state"][slot]))


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_overlapping_spans_are_both_invalid(impl, device):
    """cu=[0,4,2,6]: [0,4) and [2,6) share rows 2-3, so both are invalid (NaN, no writes)."""
    cfg, kw = _varlen([0, 4, 2, 6], 8)
    kw = to_device(kw, device)
    res = IMPLS[impl](**kw)
    check(cfg, kw, res)
    out = np.asarray(res.out, np.float32)
    assert np.isnan(out[:6]).all() and (out[6:] == 0).all()
    np.testing.assert_array_equal(np.asarray(res.state), np.asarray(kw["state"]))


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_gap_after_decrease_is_not_an_overlap(impl, device):
    """cu=[5,6,0,1]: [5,6) and [0,1) do not share a row (the decrease crosses 1..5 but owns
    nothing), so both are valid; rows 1-4 and 6-7 are 0."""
    cfg, kw = _varlen([5, 6, 0, 1], 8)
    kw = to_device(kw, device)
    res = IMPLS[impl](**kw)
    want = check(cfg, kw, res)
    out = np.asarray(res.out, np.float32)
    assert not np.isnan(want["out"]).any()
    assert (out[1:5] == 0).all() and (out[6:] == 0).all() and np.isfinite(out).all()


# ---- careless calls (issue #7 case 4) ----

@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("name", ["state", "x", "dt", "A", "B", "C"])
def test_none_for_required(name, impl):
    _, kw = _kw()
    kw[name] = None
    with pytest.raises(TypeError, match=rf"^{name}: expected an array, got None"):
        IMPLS[impl](**kw)


@pytest.mark.parametrize("flag", ["dt_softplus", "disable_state_update"])
@pytest.mark.parametrize("value", ["no", 1, None, 0.0])
def test_flag_must_be_bool(flag, value):
    _, kw = _kw()
    kw[flag] = value
    with pytest.raises(TypeError, match=rf"{flag}: expected a Python bool"):
        jax_mamba.selective_state_update(**kw)


@pytest.mark.parametrize("flag", ["dt_softplus", "disable_state_update"])
def test_traced_flag_names_argument(flag):
    _, kw = _kw()
    arrays = {k: v for k, v in kw.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in kw.items() if k not in arrays and k != flag}

    def f(arrays, v):
        return jax_mamba.selective_state_update(**arrays, **static, **{flag: v})
    with pytest.raises(TypeError, match=rf"{flag}: .*traced.*static"):
        jax.jit(f)(arrays, True)


@pytest.mark.parametrize("pad,idx,ok", [(2**70, "int32", False), (2**40, "int32", False),
                                        (-2**31 - 1, "int32", False), (2**31 - 1, "int32", True),
                                        (2**40, "int64", True), (2**63, "int64", False)])
def test_pad_slot_id_range(pad, idx, ok):
    from conftest import x64
    with x64(idx == "int64"):
        _, kw = _kw(idx=idx)
        kw["pad_slot_id"] = pad
        if ok:
            jax_mamba.selective_state_update(**kw)
        else:
            with pytest.raises(ValueError, match=r"pad_slot_id: expected a value within"):
                jax_mamba.selective_state_update(**kw)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("axis", ["H", "P", "N", "G"])
@pytest.mark.parametrize("state", ["f32", "i16"])
def test_zero_sized_model_axes(axis, state, impl):
    _, kw = _kw(state=state)
    S, H, P, N = kw["state"].shape
    G = kw["B"].shape[-2]
    dims = dict(H=H, P=P, N=N, G=G)
    dims[axis] = 0
    H, P, N, G = dims["H"], dims["P"], dims["N"], dims["G"]
    sd = jnp.int16 if state == "i16" else jnp.float32
    kw.update(state=jnp.zeros((S, H, P, N), sd), x=jnp.zeros((3, H, P)), dt=jnp.zeros((3, H)),
              A=jnp.zeros((H,)), B=jnp.zeros((3, G, N)), C=jnp.zeros((3, G, N)),
              D=jnp.zeros((H,)), out=None, z=None, dt_bias=None)
    if state == "i16":
        kw["state_scale"] = jnp.ones((S, H, P))
    name = {"H": "state", "P": "state", "N": "state", "G": "B"}[axis]
    with pytest.raises(ValueError, match=rf"^{name}: .*(at least 1|ngroups)"):
        IMPLS[impl](**kw)


# ---- opt-in checked mode ----

@pytest.mark.parametrize("corrupt,words", [
    (("state_batch_indices", (0,), 10_000), "state_batch_indices: slot outside"),
    (("num_accepted_tokens", (0,), 99), "num_accepted_tokens outside"),
    (("cu_seqlens", (2,), 0), "cu_seqlens"),
    (("dst_state_batch_indices", (0, 0), 999), "dst_state_batch_indices: slot outside"),
])
def test_checked_mode_raises(corrupt, words):
    from jax.experimental import checkify
    cfg = Cfg(mode="varlen", sbi="2d", dst="2d", nacc=True, S=60, b=4)
    kw = make_case(cfg, np.random.default_rng(5))
    kw["num_accepted_tokens"] = jnp.ones_like(kw["num_accepted_tokens"])
    arrays = {k: v for k, v in kw.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in kw.items() if k not in arrays}
    step = jax_mamba.checked(jax.jit(
        lambda a: jax_mamba.checked_selective_state_update(**a, **static).out))
    step(arrays)  # valid data: no error
    name, pos, value = corrupt
    bad = np.asarray(arrays[name]).copy()
    bad[pos] = value
    arrays[name] = jnp.asarray(bad, arrays[name].dtype)
    with pytest.raises(checkify.JaxRuntimeError, match=words):
        step(arrays)
    assert any(np.asarray(v).any() for v in jax_mamba.runtime_faults(**arrays, **static).values())

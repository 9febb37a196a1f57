"""Trace-time errors (docs/errors.md): the right exception, naming the argument that is wrong,
what was expected and what was given."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mamba
from cases import Cfg, make_case
from conftest import x64

f32, bf16, f16, i16, i32 = jnp.float32, jnp.bfloat16, jnp.float16, jnp.int16, jnp.int32


def base(**over):
    cfg = Cfg(**{k: v for k, v in over.items() if k in Cfg.__dataclass_fields__})
    return make_case(cfg, np.random.default_rng(0))


def z(shape, dtype=f32):
    return jnp.zeros(shape, dtype)


# (id, Cfg overrides, kwarg edits, exception, words the message must contain)
CASES = [
    ("state_rank", {}, dict(state=z((12, 4, 8))[0]), ValueError, ["state", "rank"]),
    ("state_dtype", {}, dict(state=z((12, 4, 8, 16), jnp.int32)), TypeError, ["state", "int32"]),
    ("x_rank", {}, dict(x=z((3,))), ValueError, ["x", "(3,)"]),
    ("x_trailing", {}, dict(x=z((3, 4, 9))), ValueError, ["x", "(3, 4, 9)"]),
    ("x_dtype", {}, dict(x=z((3, 4, 8), i32)), TypeError, ["x", "int32"]),
    ("dt_shape", {}, dict(dt=z((3, 5))), ValueError, ["dt", "(3, 5)"]),
    ("dt_dtype", {}, dict(dt=z((3, 4), i32)), TypeError, ["dt", "int32"]),
    ("A_shape", {}, dict(A=z((5,))), ValueError, ["A", "(5,)"]),
    ("A_dtype", {}, dict(A=z((4,), i32)), TypeError, ["A", "int32"]),
    ("B_shape", {}, dict(B=z((3, 2, 15))), ValueError, ["B", "(3, 2, 15)"]),
    ("B_dtype", {}, dict(B=z((3, 2, 16), bf16)), TypeError, ["B", "bfloat16"]),
    ("C_shape", {}, dict(C=z((3, 1, 16))), ValueError, ["C", "(3, 1, 16)"]),
    ("ngroups", {}, dict(B=z((3, 3, 16)), C=z((3, 3, 16))), ValueError, ["ngroups", "3"]),
    ("z_shape", {}, dict(z=z((3, 4, 7))), ValueError, ["z", "(3, 4, 7)"]),
    ("out_dtype", {}, dict(out=z((3, 4, 8), f16)), TypeError, ["out", "float16"]),
    ("D_shape", {}, dict(D=z((4, 3))), ValueError, ["D", "(4, 3)"]),
    ("D_dtype", {}, dict(D=z((4,), bf16)), TypeError, ["D", "bfloat16"]),
    ("bias_shape", {}, dict(dt_bias=z((8,))), ValueError, ["dt_bias", "(8,)"]),
    ("mamba1_forms_with_4d", {}, dict(x=z((3, 8))), ValueError, ["x"]),
    ("sbi_dtype", {}, dict(state_batch_indices=z((3,), f32)), TypeError,
     ["state_batch_indices", "float32"]),
    ("sbi_shape", {}, dict(state_batch_indices=z((4,), i32)), ValueError,
     ["state_batch_indices", "(4,)"]),
    ("sbi_narrow_mtp", dict(mode="mtp"), dict(state_batch_indices=z((3, 2), i32)), ValueError,
     ["state_batch_indices", "K", "3"]),
    ("mixed_index_dtypes", {}, dict(dst_state_batch_indices=z((3,), jnp.int16)), TypeError,
     ["dst_state_batch_indices"]),
    ("too_few_slots", dict(sbi="none"), dict(state=z((2, 4, 8, 16))), ValueError, ["state", "2"]),
    ("nacc_without_2d", {}, dict(num_accepted_tokens=z((3,), i32)), ValueError,
     ["num_accepted_tokens", "2-D"]),
    ("int16_no_scale", dict(state="i16"), dict(state_scale=None), ValueError, ["state_scale", "int16"]),
    ("scale_float_state", {}, dict(state_scale=z((12, 4, 8))), ValueError, ["state_scale", "float32"]),
    ("scale_shape", dict(state="i16"), dict(state_scale=z((12, 4))), ValueError,
     ["state_scale", "(12, 4)"]),
    ("scale_dtype", dict(state="i16"), dict(state_scale=z((12, 4, 8), bf16)), TypeError,
     ["state_scale", "bfloat16"]),
    ("inter_and_dst", dict(mode="mtp", inter="idx"),
     dict(dst_state_batch_indices=z((3,), i32)), ValueError, ["dst_state_batch_indices", "intermediate"]),
    ("inter_dtype", dict(mode="mtp", inter="idx"),
     dict(intermediate_states_buffer=z((5, 3, 4, 8, 16), bf16)), TypeError,
     ["intermediate_states_buffer", "bfloat16"]),
    ("inter_shape", dict(mode="mtp", inter="idx"),
     dict(intermediate_states_buffer=z((5, 3, 4, 8, 15))), ValueError,
     ["intermediate_states_buffer", "(5, 3, 4, 8, 15)"]),
    ("cache_steps_mismatch", dict(mode="mtp", inter="idx"), dict(cache_steps=4), ValueError,
     ["cache_steps", "4"]),
    ("inter_rows", dict(mode="mtp", inter="noidx"),
     dict(intermediate_states_buffer=z((2, 3, 4, 8, 16))), ValueError,
     ["intermediate_states_buffer", "2"]),
    ("inter_idx_alone", {}, dict(intermediate_state_indices=z((3,), i32)), ValueError,
     ["intermediate_state_indices", "without"]),
    ("inter_scales_alone", {}, dict(intermediate_state_scales=z((3, 3, 4, 8))), ValueError,
     ["intermediate_state_scales", "without"]),
    ("int16_inter_no_scales", dict(mode="mtp", inter="idx", state="i16"),
     dict(intermediate_state_scales=None), ValueError, ["intermediate_state_scales", "int16"]),
    ("inter_scales_float", dict(mode="mtp", inter="idx"),
     dict(intermediate_state_scales=z((5, 3, 4, 8))), ValueError, ["intermediate_state_scales", "float32"]),
    ("T_exceeds_cache_steps", dict(mode="mtp"), dict(cache_steps=2), ValueError, ["T=3", "cache_steps=2"]),
    ("negative_cache_steps", {}, dict(cache_steps=-1), ValueError, ["cache_steps", "-1"]),
    ("seed_f32_state", {}, dict(rand_seed=1), ValueError, ["rand_seed", "float32"]),
    ("seed_int16_state", dict(state="i16"), dict(rand_seed=1), ValueError, ["rand_seed", "int16"]),
    ("seed_float", dict(state="f16"), dict(rand_seed=jnp.float32(1)), TypeError, ["rand_seed", "float32"]),
    ("seed_shape", dict(state="f16"), dict(rand_seed=jnp.zeros((3,), i32)), ValueError, ["rand_seed", "(3,)"]),
    ("philox_rounds", dict(state="f16", sr=True), dict(philox_rounds=0), ValueError, ["philox_rounds", "0"]),
    ("algorithm", {}, dict(algorithm="fastest"), ValueError, ["algorithm", "fastest"]),
    ("pad_not_int", {}, dict(pad_slot_id=1.5), TypeError, ["pad_slot_id", "float"]),
    ("cu_dtype", dict(mode="varlen"), dict(cu_seqlens=z((4,), f32)), TypeError, ["cu_seqlens", "float32"]),
    ("cu_rank", dict(mode="varlen"), dict(cu_seqlens=z((2, 2), i32)), ValueError, ["cu_seqlens", "(2, 2)"]),
    ("varlen_x_rank", dict(mode="varlen"), dict(x=z((1, 5, 4, 8))), ValueError, ["x", "total_tokens"]),
]


@pytest.mark.parametrize("cfg,edits,exc,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize("impl", ["ffi", "reference"])
def test_error(cfg, edits, exc, words, impl):
    kw = base(**cfg)
    kw.update(edits)
    kw = {k: v for k, v in kw.items() if v is not None or k in ("D",)}
    fn = jax_mamba.selective_state_update if impl == "ffi" else jax_mamba.reference.selective_state_update
    with pytest.raises(exc) as info:
        fn(**kw)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in message: {msg}"
    assert "expected" in msg or "requires" in msg or "required" in msg or "without" in msg \
        or "cannot" in msg or "only allowed" in msg or "exceed" in msg or "must" in msg, msg


def test_valid_base_case_runs():
    """The unedited base case is valid, so each error above comes from its one edit."""
    jax_mamba.selective_state_update(**base())


@pytest.mark.parametrize("algorithm", ["auto", "simple", "vertical", "horizontal"])
def test_algorithm_on_cpu_is_validated_and_ignored(algorithm):
    cpu = jax.devices("cpu")[0]
    kw = {k: jax.device_put(v, cpu) if isinstance(v, jax.Array) else v for k, v in base().items()}
    want = jax_mamba.selective_state_update(**kw)
    got = jax_mamba.selective_state_update(**dict(kw, algorithm=algorithm))
    np.testing.assert_array_equal(np.asarray(got.out), np.asarray(want.out))


@pytest.mark.parametrize("algorithm,N,state,ok", [
    ("vertical", 16, "f32", True), ("vertical", 12, "f32", True), ("vertical", 256, "f32", True),
    ("vertical", 256, "i16", True), ("vertical", 12, "bf16", False),
    ("vertical", 260, "f32", False), ("vertical", 512, "bf16", False),
    ("horizontal", 16, "f32", True),
    ("horizontal", 12, "f32", True), ("horizontal", 12, "bf16", False),
    ("horizontal", 1028, "f32", False), ("horizontal", 512, "bf16", True),
    ("simple", 13, "bf16", True), ("auto", 13, "f32", True)])
def test_algorithm_rules_for_cuda(algorithm, N, state, ok, monkeypatch):
    """The CUDA planner's restrictions apply when lowering for CUDA (here cross-lowered with
    jax.export, as a GPU machine would lower), never for the CPU."""
    from jax import export
    kw = base(N=N, state=state)
    kw["algorithm"] = algorithm
    arrays = {k: v for k, v in kw.items() if hasattr(v, "shape")}
    static = {k: v for k, v in kw.items() if k not in arrays}
    f = jax.jit(lambda a: jax_mamba.selective_state_update(**a, **static))

    def lower(platform):
        return export.export(f, platforms=[platform], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("jax_mamba_ssu")])(arrays)

    lower("cpu")
    monkeypatch.setattr(jax_mamba._ffi, "HAS_CUDA", True)  # lowering needs no CUDA module
    if ok:
        lower("cuda")
    else:
        with pytest.raises(ValueError, match="algorithm") as info:
            lower("cuda")
        msg = str(info.value)
        assert algorithm in msg and "expected" in msg and f"dstate={N}" in msg, msg


# ---- the argument named is the argument that is wrong (issue #15 item 4) ----

def test_wrong_group_count_in_B_names_B():
    kw = base()                                   # H 4, G 2: B with 3 groups cannot be right
    kw["B"] = z((3, 3, 16))
    with pytest.raises(ValueError, match=r"^B: ngroups \(axis -2\) must divide nheads=4, got "
                                         r"ngroups=3"):
        jax_mamba.selective_state_update(**kw)


def test_C_disagreeing_with_B_names_C():
    kw = base()                                   # both 1 and 2 groups divide H 4: B decides
    kw["C"] = z((3, 1, 16))
    with pytest.raises(ValueError, match=r"^C: expected the shape of B \(3, 2, 16\)"):
        jax_mamba.selective_state_update(**kw)


@pytest.mark.parametrize("with_bias", [False, True])
def test_dt_in_another_dtype_than_the_parameters_names_dt(with_bias):
    kw = base(bias=with_bias)                     # x, D (and dt_bias) float32
    kw["dt"] = kw["dt"].astype(bf16)
    with pytest.raises(TypeError, match=r"^dt: expected dtype float32 as in D"):
        jax_mamba.selective_state_update(**kw)


def test_flag_passed_positionally_names_z_and_says_so():
    kw = base()
    args = [kw.pop(n) for n in ("state", "x", "dt", "A", "B", "C", "D")]
    kw.pop("dt_softplus")
    with pytest.raises(TypeError) as info:
        jax_mamba.selective_state_update(*args, True, **kw)
    msg = str(info.value)
    assert msg.startswith("z (passed as positional argument 8;"), msg
    assert "got bool True" in msg and "keyword" in msg, msg


def test_positional_optional_argument_is_marked_in_any_error():
    kw = base(bias=True)                          # dt_bias given where z goes: (4,) is no z
    args = [kw.pop(n) for n in ("state", "x", "dt", "A", "B", "C", "D")]
    bias = kw.pop("dt_bias")
    with pytest.raises(ValueError, match=r"^z \(passed as positional argument 8; .*\): "
                                         r"expected shape \(3, 4, 8\), got \(4,\)"):
        jax_mamba.selective_state_update(*args, bias, **kw)


# Base configurations in which every argument is present (tests/cases.py Cfg fields).
FULL = dict(z=True, bias=True)
CONFIGS = {
    "stp": FULL,
    "dst": dict(FULL, dst="1d"),
    "int16": dict(FULL, state="i16"),
    "inter": dict(FULL, mode="mtp", inter="idx", state="i16"),
    "varlen": dict(FULL, mode="varlen", inter="idx"),
    "nacc": dict(FULL, mode="mtp", sbi="2d", nacc=True),
    "seed": dict(FULL, state="f16", sr=True),
}
# argument -> (configuration, a wrong dtype, the axes whose size is free to differ)
ARGUMENTS = {
    "state": ("stp", i32, {0}),                   # any number of slots
    "x": ("stp", bf16, set()),
    "dt": ("stp", bf16, set()),
    "A": ("stp", i32, set()),
    "B": ("stp", bf16, set()),
    "C": ("stp", bf16, set()),
    "D": ("stp", bf16, set()),
    "z": ("stp", bf16, set()),
    "dt_bias": ("stp", bf16, set()),
    "state_batch_indices": ("stp", f32, set()),
    "out": ("stp", bf16, set()),
    "dst_state_batch_indices": ("dst", f32, set()),
    "state_scale": ("int16", bf16, set()),
    "intermediate_states_buffer": ("inter", bf16, {0, 1}),   # rows; steps >= T
    "intermediate_state_indices": ("inter", f32, set()),
    "intermediate_state_scales": ("inter", bf16, set()),
    "cu_seqlens": ("varlen", f32, set()),
    "num_accepted_tokens": ("nacc", f32, set()),
}


def _mutations():
    for name, (cfg, bad_dtype, free) in ARGUMENTS.items():
        shape = tuple(base(**CONFIGS[cfg])[name].shape)
        yield name, cfg, "dtype", ("dtype", bad_dtype)
        yield name, cfg, "rank+1", ("shape", shape + (1,))
        if len(shape) > 1:
            yield name, cfg, "rank-1", ("shape", shape[:-1])
        for axis in range(len(shape)):
            if axis not in free:
                grown = shape[:axis] + (shape[axis] + 1,) + shape[axis + 1:]
                yield name, cfg, f"size{axis}", ("shape", grown)


MUTATIONS = list(_mutations())
# edits that give another valid form: a 2-D index array of width K = 1 >= T in STP, and the
# (S, H, P, 1) form of state_scale
VALID = {("state_batch_indices", "rank+1"), ("dst_state_batch_indices", "rank+1"),
         ("state_scale", "rank+1")}


@pytest.mark.parametrize("name,cfg,kind,edit", MUTATIONS,
                         ids=[f"{m[0]}-{m[1]}-{m[2]}" for m in MUTATIONS])
def test_every_wrong_argument_is_the_one_named(name, cfg, kind, edit):
    kw = base(**CONFIGS[cfg])
    jax_mamba.reference.selective_state_update(**kw)          # the unedited call is valid
    arr = kw[name]
    what, v = edit
    kw[name] = arr.astype(v) if what == "dtype" else jnp.zeros(v, arr.dtype)
    if (name, kind) in VALID:
        jax_mamba.reference.selective_state_update(**kw)
        return
    with pytest.raises((TypeError, ValueError)) as info:
        jax_mamba.reference.selective_state_update(**kw)
    msg = str(info.value)
    assert msg.startswith(name + ":"), f"{name} {kind} {v}: {msg}"


@pytest.mark.parametrize("odd,others,dtype", [
    ("x", ("B", "C"), bf16),                      # x is the one that differs from B and C
    ("B", ("x", "C"), bf16),
    ("D", ("dt", "dt_bias"), bf16),
    ("dt_bias", ("dt", "D"), f16),
])
def test_the_odd_dtype_out_is_named(odd, others, dtype):
    kw = base(bias=True)
    kw[odd] = kw[odd].astype(dtype)
    with pytest.raises(TypeError, match=rf"^{odd}: expected dtype float32 as in "
                                        rf"{others[0]}.*{others[1]}.*got {np.dtype(dtype).name}"):
        jax_mamba.selective_state_update(**kw)


@pytest.mark.parametrize("changed", ["state_batch_indices", "dst_state_batch_indices"])
def test_index_dtypes_follow_state_batch_indices(changed):
    """At most two of the three index arrays meet in one call (dst excludes the intermediate
    buffer): a tie, which state_batch_indices decides."""
    with x64():
        kw = base(dst="1d")
        kw[changed] = kw[changed].astype(jnp.int64)
        want = "int64" if changed == "state_batch_indices" else "int32"
        with pytest.raises(TypeError, match=rf"^dst_state_batch_indices: expected dtype {want} "
                                            r"as in state_batch_indices"):
            jax_mamba.selective_state_update(**kw)


def test_rand_seed_is_named():
    kw = base(**CONFIGS["seed"])
    for bad, exc in ((jnp.float32(1), TypeError), (jnp.zeros((3,), i32), ValueError),
                     (jnp.zeros((2, 2), i32), ValueError)):
        with pytest.raises(exc, match="^rand_seed:"):
            jax_mamba.selective_state_update(**dict(kw, rand_seed=bad))

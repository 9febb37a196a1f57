"""Stochastic rounding (docs/semantics.md) and the shared Philox / int16 math."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mamba
from jax_mamba.reference import philox4x32
from cases import Cfg, make_case, split_static


def test_philox_known_answers():
    """Random123's philox4x32-10 known-answer vectors."""
    u = lambda *v: [jnp.uint32(x) for x in v]
    vectors = [
        (u(0, 0, 0, 0), u(0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        (u(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), u(0xFFFFFFFF, 0xFFFFFFFF),
         (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (u(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), u(0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, want in vectors:
        got = philox4x32(*ctr, *key, 10)
        assert tuple(int(g) for g in got) == want


N_SEEDS = 256


@pytest.mark.parametrize("state", ["f16", "bf16"])
@pytest.mark.parametrize("where", ["state", "intermediate"])
def test_stochastic_rounding_is_unbiased(state, where, device):
    cfg = Cfg(mode="mtp", T=2, S=8, b=2, H=2, P=8, N=32, G=1, state=state, sr=True,
              inter="idx" if where == "intermediate" else "none")
    kw = make_case(cfg, np.random.default_rng(5))
    kw.pop("rand_seed")
    kw = {k: jax.device_put(v, device) if isinstance(v, jax.Array) else v for k, v in kw.items()}
    arrays, static = split_static(kw)

    run = jax.jit(lambda seed, **a: jax_mamba.selective_state_update(rand_seed=seed, **a, **static))

    def stored(seed):
        r = run(jax.device_put(jnp.int32(seed), device), **arrays)
        return r.state if where == "state" else r.intermediate_states_buffer

    # one jitted call per seed (not lax.map: see test_inplace.test_map_over_a_closed_over_state)
    samples = np.stack([np.asarray(stored(s * 7919 + 3), np.float64) for s in range(N_SEEDS)])
    # the exact fp32 values: the same call with a float32 state of the same (exact) contents
    f32 = dict(arrays)
    f32["state"] = arrays["state"].astype(jnp.float32)
    if where == "intermediate":
        f32["intermediate_states_buffer"] = arrays["intermediate_states_buffer"].astype(jnp.float32)
    r = jax_mamba.selective_state_update(**f32, **static)
    exact = np.asarray(r.state if where == "state" else r.intermediate_states_buffer, np.float64)
    changed = ~np.isclose(exact, np.asarray(arrays["state" if where == "state" else
                                                   "intermediate_states_buffer"], np.float64))
    assert changed.sum() > 100
    s, v = samples[:, changed], exact[changed]
    # every sample is one of the two neighbours of v in the state dtype
    eps = 2.0 ** (-10 if state == "f16" else -7)
    ulp = np.maximum(np.abs(v), 2.0 ** -14 if state == "f16" else 1e-30) * eps * 2
    assert (np.abs(s - v) <= ulp).all()
    lo = np.min(s, 0)
    hi = np.max(s, 0)
    spacing = np.where(hi > lo, hi - lo, 1.0)
    p = np.clip((v - lo) / spacing, 0, 1)
    mean = s.mean(0)
    se = spacing * np.sqrt(np.maximum(p * (1 - p), 1.0 / N_SEEDS) / N_SEEDS)
    zscore = (mean - v) / se
    assert np.abs(zscore).max() < 6, np.abs(zscore).max()
    # aggregate bias over all elements, in units of their standard errors
    assert abs(zscore.mean()) < 6 / np.sqrt(zscore.size) * 2
    # not just round-to-nearest: some elements took both neighbours
    assert (hi > lo).mean() > 0.5
    # round-to-nearest would be biased: its mean error is not within these bounds
    rn = np.asarray(jnp.asarray(v, jnp.float16 if state == "f16" else jnp.bfloat16), np.float64)
    assert np.abs((rn - v) / se).max() > 6


@pytest.mark.parametrize("state", ["f16", "bf16"])
def test_seed_determinism(state, device):
    kw = make_case(Cfg(mode="mtp", state=state, sr=True, inter="idx"), np.random.default_rng(6))
    kw.pop("rand_seed")
    kw = {k: jax.device_put(v, device) if isinstance(v, jax.Array) else v for k, v in kw.items()}
    run = lambda s: jax_mamba.selective_state_update(rand_seed=s, **kw)
    a, b, c = run(123), run(123), run(124)
    for f in ("state", "intermediate_states_buffer"):
        np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)))
        assert not np.array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(c, f)))


def test_64bit_seed_uses_high_word():
    kw = make_case(Cfg(state="f16", sr=True), np.random.default_rng(8))
    kw.pop("rand_seed")
    with jax.enable_x64(True):
        a = jax_mamba.selective_state_update(rand_seed=jnp.int64(5), **kw).state
        b = jax_mamba.selective_state_update(rand_seed=jnp.int64(5 + (1 << 40)), **kw).state
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    c = jax_mamba.selective_state_update(rand_seed=5 + (1 << 40), **kw).state  # Python int
    np.testing.assert_array_equal(np.asarray(b), np.asarray(c))


# ---- the bit assignment, checked against an independent numpy implementation of the rule
# docs/semantics.md states (Philox by uint64 products, rounding in float64) ----

_M32 = np.uint64(0xFFFFFFFF)


def np_philox(c, key, rounds):
    c0, c1, c2, c3 = (np.asarray(v).astype(np.uint64) for v in c)
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(rounds):
        p0, p2 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2  # < 2^64: exact
        c0, c1, c2, c3 = (p2 >> np.uint64(32)) ^ c1 ^ k0, p2 & _M32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _M32
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & _M32, (k1 + np.uint64(0xBB67AE85)) & _M32
    return c0, c1, c2, c3


def np_sr_bits(e, t, kind, key, rounds):
    """The 16 random bits of elements at linear indices e (int64 array) stored at step t (an
    array broadcasting with e) to a buffer of kind `kind`: Philox counter (e // 8 low, high, t,
    kind), element e takes half e % 8 of the 4 output words (word (e % 8) // 2, low half for
    even e)."""
    g = (e >> 3).astype(np.uint64)
    words = np_philox((g & _M32, g >> np.uint64(32), np.broadcast_to(t, e.shape),
                       np.full(e.shape, kind)), key, rounds)
    w = np.choose((e & 7) >> 1, words)
    return (w >> ((e & 1) * 16).astype(np.uint64)) & np.uint64(0xFFFF)


def np_sr(v, r, state):
    """fp32 array v rounded stochastically with 16-bit random values r, as raw uint16 bits."""
    with np.errstate(over="ignore", invalid="ignore"):
        return _np_sr(np.asarray(v, np.float32), r, state)


def _np_sr(v, r, state):
    import ml_dtypes
    u = v.view(np.uint32).astype(np.uint64)
    a = u & np.uint64(0x7FFFFFFF)
    if state == "bf16":
        bits = (u + r) >> np.uint64(16)
        rn = v.astype(ml_dtypes.bfloat16).view(np.uint16)
        special = (u & np.uint64(0x7F800000)) == np.uint64(0x7F800000)
    else:
        sign = (u >> np.uint64(16)) & np.uint64(0x8000)
        s = (a + (r >> np.uint64(3))) & ~np.uint64(0x1FFF)  # normal range: the top 13 bits of r
        normal = np.where(s >= 0x47800000, np.uint64(0x7C00),
                          (np.maximum(s, np.uint64(0x38000000)) - np.uint64(0x38000000)) >> np.uint64(13))
        q = np.abs(v.astype(np.float64)) * 2.0**24  # subnormal range: grid 2^-24
        f = q - np.floor(q)
        sub = np.floor(q).astype(np.uint64) + ((r.astype(np.float64) + 0.5) / 65536 < f)
        bits = sign | np.where(a >= 0x38800000, normal, sub)
        rn = v.astype(np.float16).view(np.uint16)
        special = a >= np.uint64(0x7F800000)
    return np.where(special, rn, bits.astype(np.uint16)).astype(np.uint16)


def test_numpy_philox_known_answer():
    got = np_philox([np.uint32(v) for v in (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)],
                    (0xA4093822, 0x299F31D0), 10)
    assert tuple(int(w) for w in got) == (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


def test_reference_sr_bits_follow_the_rule():
    """jax_mamba.reference.sr_bits against the numpy rule, element indices past 2^35 included
    (the group index's high counter word)."""
    from jax_mamba.reference import sr_bits
    e = np.concatenate([np.arange(40), (1 << 35) + np.arange(-9, 23), (1 << 40) + np.arange(16)])
    key = (0x01234567, 0x89ABCDEF)
    with jax.enable_x64(True):
        got = np.asarray(sr_bits(jnp.asarray(e, jnp.int64), 3, 1, jnp.asarray(key, jnp.uint32), 10))
    want = np_sr_bits(e.astype(np.int64), 3, 1, key, 10)
    np.testing.assert_array_equal(got.astype(np.uint64), want)
    assert (want < 1 << 16).all() and len(set(want.tolist())) > len(e) - 3  # 16 distinct bits each


# pre-rounding values the stores see: state 0, A = 0, dt = 1, x = 1 make the state after step
# t exactly the fp32 sum of B over steps 0..t, on every backend; B mixes ordinary values with
# the special ranges (fp16 subnormals and overflow, bf16 overflow, NaN, Inf). No fp32 subnormal:
# XLA's CPU threads flush them to zero in arithmetic, before any rounding.
_SPECIAL = np.array([65510.0, 65530.0, -65520.0, 7e4, 3.39e38, -3.4e38, np.nan, np.inf, -np.inf,
                     0.0, 1.5 * 2.0**-24, -3e-6, 6e-5, 2.0**-14, 1.0, -2.0**-25], np.float32)


DTYPES_SR = {"bf16": jnp.bfloat16, "f16": jnp.float16}


def _sr_case(state, mtp, rng):
    S, H, P, N, b, T = 8, 2, 8, 32, 3, 3
    tok = (b, T) if mtp else (b,)
    Bv = rng.standard_normal(tok + (1, N)) * np.array([1.0, 1e-5, 1e-3, 300.0])[rng.integers(0, 4, tok + (1, N))]
    Bv = Bv.astype(np.float32)
    flat = Bv.reshape(-1)
    pick = rng.choice(flat.size, 3 * _SPECIAL.size, replace=False)
    flat[pick] = np.tile(_SPECIAL, 3)
    kw = dict(state=jnp.zeros((S, H, P, N), DTYPES_SR[state]), x=jnp.ones(tok + (H, P), jnp.float32),
              dt=jnp.ones(tok + (H,), jnp.float32), A=jnp.zeros((H,), jnp.float32), B=jnp.asarray(Bv),
              C=jnp.asarray(rng.standard_normal(tok + (1, N)), jnp.float32), D=None,
              state_batch_indices=jnp.asarray([5, 1, 2], jnp.int32),
              rand_seed=jnp.asarray([0x9E3779B9, 0x7F4A7C15], jnp.uint32), philox_rounds=7)
    if mtp:
        kw["intermediate_states_buffer"] = jnp.zeros((4, T, H, P, N), DTYPES_SR[state])
        kw["intermediate_state_indices"] = jnp.asarray([2, 0, 3], jnp.int32)
    return kw, (T if mtp else 1)


def expected_sr_stores(kw, T, state):
    """(state, intermediate buffer or None) as raw uint16 bits, by the numpy rule, from the exact
    cumulative sums of B (see _sr_case)."""
    key = tuple(int(w) for w in np.asarray(kw["rand_seed"]))
    rounds = kw["philox_rounds"]
    Bv = np.asarray(kw["B"]).reshape(3, T, -1)  # (b, T, N)
    with np.errstate(invalid="ignore", over="ignore"):
        sums = np.cumsum(Bv, axis=1, dtype=np.float32)  # sequential fp32 adds, as the kernels
    S, H, P, N = kw["state"].shape
    st = np.asarray(kw["state"]).view(np.uint16).copy()
    e = np.arange(st.size, dtype=np.int64).reshape(st.shape)
    for b, slot in enumerate(np.asarray(kw["state_batch_indices"])):
        v = np.broadcast_to(sums[b, T - 1], (H, P, N))
        st[slot] = np_sr(v, np_sr_bits(e[slot], T - 1, 0, key, rounds), state)
    if "intermediate_states_buffer" not in kw:
        return st, None
    it = np.asarray(kw["intermediate_states_buffer"]).view(np.uint16).copy()
    e = np.arange(it.size, dtype=np.int64).reshape(it.shape)
    for b, row in enumerate(np.asarray(kw["intermediate_state_indices"])):
        for t in range(T):
            v = np.broadcast_to(sums[b, t], (H, P, N))
            it[row, t] = np_sr(v, np_sr_bits(e[row, t], t, 1, key, rounds), state)
    return st, it


def _same_bits(name, got, want):
    """Bit equality, except that a NaN matches any NaN: its sign and payload come from the fp32
    NaN the platform's arithmetic made (0x7fffffff on CUDA, 0x7fc00000 on x86), and docs say
    NaN is stored as with round to nearest, which keeps them."""
    dt = np.asarray(got).dtype
    got = np.asarray(got).view(np.uint16)
    inf = 0x7c00 if dt == np.float16 else 0x7f80  # exponent all ones
    nan = lambda u: (u & 0x7fff) > inf  # noqa: E731
    bad = (got != want) & ~(nan(got) & nan(want))
    if bad.any():
        i = np.argwhere(bad)[0]
        raise AssertionError(f"{name}: {bad.sum()} of {bad.size} stored values differ from the "
                             f"documented bit assignment, first at {tuple(i)}: expected "
                             f"{want[tuple(i)]:#06x}, got {got[tuple(i)]:#06x}")


@pytest.mark.parametrize("state", ["bf16", "f16"])
@pytest.mark.parametrize("mtp", [False, True], ids=["stp", "mtp"])
def test_bit_assignment_is_the_documented_one(state, mtp, device):
    """Every stored bit, state and intermediate buffer, equals the rule of docs/semantics.md
    computed independently in numpy: the handler on each platform and jax_mamba.reference."""
    kw, T = _sr_case(state, mtp, np.random.default_rng(11))
    want_st, want_it = expected_sr_stores(kw, T, state)
    on_dev = {k: jax.device_put(v, device) if isinstance(v, jax.Array) else v for k, v in kw.items()}
    for name, fn in (("handler", jax_mamba.selective_state_update),
                     ("reference", jax_mamba.reference.selective_state_update)):
        r = fn(**on_dev)
        _same_bits(f"{name} state", r.state, want_st)
        if want_it is not None:
            _same_bits(f"{name} intermediate_states_buffer", r.intermediate_states_buffer, want_it)

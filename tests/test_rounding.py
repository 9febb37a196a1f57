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

"""In-place updates (docs/jax.md): aliasing + donation leave no copy of any aliased buffer."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mamba
from cases import Cfg, make_case, split_static

S, H, P, N, G, b = 64, 4, 16, 32, 2, 3


def _hlo_copies(text, arr):
    """Lines of the compiled HLO that copy a value with the shape of `arr`."""
    dt = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int16": "s16"}[str(arr.dtype)]
    shape = f"{dt}[{','.join(map(str, arr.shape))}]"
    return [l for l in text.splitlines()
            if re.search(r"\bcopy(-start)?\(", l) and shape in l]


def _step_args(state_dtype="f32", inter=False, heads=True):
    cfg = Cfg(S=S, H=H if heads else 1, P=P, N=N, G=G if heads else 1, b=b, state=state_dtype,
              out=True, mode="mtp" if inter else "stp", T=2, inter="idx" if inter else "none",
              heads=heads)
    return make_case(cfg, np.random.default_rng(0))


@pytest.mark.parametrize("state_dtype,inter,heads", [
    ("f32", False, True), ("bf16", True, True), ("i16", True, True), ("f32", False, False),
    ("i16", True, False)])
def test_donated_step_has_no_copies(state_dtype, inter, heads):
    kw = _step_args(state_dtype, inter, heads)
    donated = ["state", "out"] + (["state_scale"] if state_dtype == "i16" else []) + (
        ["intermediate_states_buffer"] if inter else []) + (
        ["intermediate_state_scales"] if inter and state_dtype == "i16" else [])
    kw, static = split_static(kw)

    def step(**kw):
        return jax_mamba.selective_state_update(**kw, **static)

    fn = jax.jit(step, donate_argnames=donated)
    compiled = fn.lower(**kw).compile()
    text = compiled.as_text()
    aliased = [kw[n] for n in donated]
    for arr in aliased:
        assert not _hlo_copies(text, arr), f"copy of a {arr.shape} buffer:\n" + "\n".join(
            _hlo_copies(text, arr))
    assert compiled.memory_analysis().alias_size_in_bytes >= sum(a.nbytes for a in aliased)

    ptrs = {n: kw[n].unsafe_buffer_pointer() for n in donated}
    res = fn(**kw)
    field = {"state": "state", "out": "out", "state_scale": "state_scale",
             "intermediate_states_buffer": "intermediate_states_buffer",
             "intermediate_state_scales": "intermediate_state_scales"}
    for n in donated:
        assert getattr(res, field[n]).unsafe_buffer_pointer() == ptrs[n], n
        assert kw[n].is_deleted(), n


def test_not_donated_is_still_correct_and_keeps_input():
    kw = _step_args()
    before = np.asarray(kw["state"]).copy()
    arrays, static = split_static(kw)
    res = jax.jit(lambda **a: jax_mamba.selective_state_update(**a, **static))(**arrays)
    np.testing.assert_array_equal(np.asarray(kw["state"]), before)  # XLA copied
    ref = jax_mamba.reference.selective_state_update(**kw)
    np.testing.assert_allclose(np.asarray(res.state), np.asarray(ref.state), rtol=1e-5, atol=1e-5)


def test_fori_loop_stays_in_place():
    kw = _step_args()
    state = kw.pop("state")
    kw.pop("out")
    steps = 5

    def loop(state, x):
        def body(i, st):
            return jax_mamba.selective_state_update(st, x * (i + 1), *[kw[k] for k in (
                "dt", "A", "B", "C", "D")], state_batch_indices=kw["state_batch_indices"]).state
        return jax.lax.fori_loop(0, steps, body, state)

    fn = jax.jit(loop, donate_argnums=0)
    text = fn.lower(state, kw["x"]).compile().as_text()
    assert not _hlo_copies(text, state)
    want = state
    for i in range(steps):
        want = jax_mamba.reference.selective_state_update(
            want, kw["x"] * (i + 1), *[kw[k] for k in ("dt", "A", "B", "C", "D")],
            state_batch_indices=kw["state_batch_indices"]).state
    want = np.asarray(want)
    p = state.unsafe_buffer_pointer()
    got = fn(state, kw["x"])
    assert got.unsafe_buffer_pointer() == p
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_layer_stacked_cache_in_place():
    """(L, S, H, P, N) cache, scanned over layers through a (L*S, ...) view with slot offsets."""
    L = 3
    kw = _step_args()
    cache = jnp.asarray(np.random.default_rng(1).standard_normal((L, S, H, P, N)), jnp.float32)
    idx = kw["state_batch_indices"]

    def decode(cache, x):
        flat = cache.reshape((L * S, H, P, N))

        def layer(flat, l):
            r = jax_mamba.selective_state_update(flat, x, kw["dt"], kw["A"], kw["B"], kw["C"],
                                                 kw["D"], state_batch_indices=idx + l * S)
            return r.state, r.out
        flat, ys = jax.lax.scan(layer, flat, jnp.arange(L))
        return flat.reshape(cache.shape), ys

    fn = jax.jit(decode, donate_argnums=0)
    text = fn.lower(cache, kw["x"]).compile().as_text()
    assert not _hlo_copies(text, cache) and not _hlo_copies(
        text, jax.ShapeDtypeStruct((L * S, H, P, N), cache.dtype))
    want = []
    for l in range(L):
        want.append(np.asarray(jax_mamba.reference.selective_state_update(
            cache[l], kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], kw["D"],
            state_batch_indices=idx).state))
    p = cache.unsafe_buffer_pointer()
    got, _ = fn(cache, kw["x"])
    assert got.unsafe_buffer_pointer() == p
    np.testing.assert_allclose(np.asarray(got), np.stack(want), rtol=1e-5, atol=1e-5)


def test_traced_seed_does_not_retrace():
    kw = make_case(Cfg(state="f16", sr=True), np.random.default_rng(2))
    traces = []

    def step(seed, **kw):
        traces.append(1)
        return jax_mamba.selective_state_update(rand_seed=seed, **kw).state

    kw.pop("rand_seed")
    kw, static = split_static(kw)
    fn = jax.jit(lambda seed, **a: step(seed, **a, **static))
    a = fn(jnp.int32(1), **kw)
    b = fn(jnp.int32(2), **kw)
    c = fn(jnp.int32(1), **kw)
    assert len(traces) == 1
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_seed_forms():
    """An int, a 1-element array and a PRNG key are all accepted; equal seeds give equal bits."""
    kw = make_case(Cfg(state="bf16", sr=True), np.random.default_rng(3))
    kw.pop("rand_seed")
    f = lambda s: np.asarray(jax_mamba.selective_state_update(rand_seed=s, **kw).state)
    np.testing.assert_array_equal(f(5), f(jnp.array([5], jnp.int32)))
    np.testing.assert_array_equal(f(jax.random.key(9)), f(jax.random.key(9)))
    assert not np.array_equal(f(jax.random.key(9)), f(jax.random.key(10)))


def test_vmap_is_correct(device):
    kw = make_case(Cfg(out=False), np.random.default_rng(4))
    kw = {k: jax.device_put(v, device) if isinstance(v, jax.Array) else v for k, v in kw.items()}
    states = jnp.stack([kw["state"], kw["state"] * 2])
    xs = jnp.stack([kw["x"], kw["x"] * -1])
    rest = {k: v for k, v in kw.items() if k not in ("state", "x")}
    got = jax.vmap(lambda s, x: jax_mamba.selective_state_update(s, x, **rest).state)(states, xs)
    for i in range(2):
        want = jax_mamba.reference.selective_state_update(states[i], xs[i], **rest).state
        np.testing.assert_allclose(np.asarray(got[i]), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_map_over_a_closed_over_state(device):
    """lax.map over calls that all read one closed-over (non-donated) state: XLA must give each
    iteration its own copy of the aliased buffer, so every iteration sees the original."""
    kw = make_case(Cfg(mode="mtp", T=2, out=False), np.random.default_rng(9))
    kw = {k: jax.device_put(v, device) if isinstance(v, jax.Array) else v for k, v in kw.items()}
    arrays, static = split_static(kw)
    scales = jax.device_put(jnp.arange(1, 5, dtype=jnp.float32), device)

    def one(k):
        a = dict(arrays, x=arrays["x"] * k)
        r = jax_mamba.selective_state_update(**a, **static)
        return r.state, r.out

    got_state, got_out = jax.jit(lambda ks: jax.lax.map(one, ks))(scales)
    for i, k in enumerate(np.asarray(scales)):
        want_state, want_out = jax.jit(one)(jnp.float32(k))
        np.testing.assert_allclose(np.asarray(got_out[i]), np.asarray(want_out), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(got_state[i]), np.asarray(want_state), rtol=1e-6,
                                   atol=1e-6)

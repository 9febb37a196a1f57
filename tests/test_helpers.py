"""Model-level helpers (README "Model-level helpers", issue #10 item 3): the causal-conv1d
decode update, the layer-stacked cache under lax.scan (zero copies, checked in the compiled
HLO) and the speculative-decoding commits (SGLang and vLLM styles)."""
import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mamba
from jax_mamba import cache as jcache
from jax_mamba import speculative as spec
from jax_mamba.conv import causal_conv1d, causal_conv1d_update


def _rand(rng, shape, dtype=jnp.float32, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def _same(a, b, device, exact=True):
    """Bit-exact on the CPU; the GPU's single-step and multi-step kernels may contract
    differently, so there a tight fp32 tolerance (also where matmuls of different batch
    shapes feed the compared values: exact=False; those matmuls are full fp32, `_mm`)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if device.platform == "cpu" and exact:
        np.testing.assert_array_equal(a, b)
    else:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# causal_conv1d_update


def _np_conv_update(state, x, w, bias, act, idx, pad):
    """Naive numpy twin: per entry, per step: append x, dot the last `width` inputs, shift."""
    state = np.array(state, np.float64)
    x = np.asarray(x, np.float64)
    stp = x.ndim == 2
    x = x[:, None] if stp else x
    b, T, D = x.shape
    W = w.shape[1]
    out = np.zeros((b, T, D))
    S = state.shape[0]
    for e in range(b):
        s = e if idx is None else int(idx[e])
        if s == pad:
            cur = np.zeros(state.shape[1:])
        elif not 0 <= s < S:
            out[e] = np.nan
            continue
        else:
            cur = state[s].copy()
        for t in range(T):
            ext = np.concatenate([cur, x[e, t][:, None]], -1)
            y = (ext[:, -W:] * w).sum(-1) + (0 if bias is None else bias)
            out[e, t] = y / (1 + np.exp(-y)) if act == "silu" else y
            cur = ext[:, 1:]
        if s != pad:
            state[s] = cur
    return (out[:, 0] if stp else out), state


@pytest.mark.parametrize("T,state_len,act,use_bias,with_idx", [
    (None, 3, "silu", True, True), (None, 3, None, False, False), (3, 3, "silu", True, True),
    (2, 5, None, True, True), (None, 0, "silu", True, True)])
def test_conv_update_matches_numpy(T, state_len, act, use_bias, with_idx, device):
    rng = np.random.default_rng(0)
    S, D, b = 9, 24, 4
    W = state_len + 1 if state_len < 3 else 4
    state = _rand(rng, (S, D, state_len))
    x = _rand(rng, (b, D) if T is None else (b, T, D))
    w = _rand(rng, (D, W), scale=0.5)
    bias = _rand(rng, (D,)) if use_bias else None
    idx = jnp.array([7, -1, 2, 4], jnp.int32) if with_idx else None   # entry 1 is padding
    with jax.default_device(device):
        r = causal_conv1d_update(state, x, w, bias, act, idx)
    out, new = _np_conv_update(state, x, np.asarray(w), None if bias is None else
                               np.asarray(bias), act, None if idx is None else np.asarray(idx), -1)
    np.testing.assert_allclose(np.asarray(r.out), out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(r.conv_state), new, rtol=0, atol=0)  # moves only
    if with_idx:   # untouched slots keep their bytes, the pad entry wrote nothing
        keep = [s for s in range(S) if s not in (7, 2, 4)]
        np.testing.assert_array_equal(np.asarray(r.conv_state)[keep], np.asarray(state)[keep])


def test_conv_update_invalid_and_pad_values(device):
    rng = np.random.default_rng(1)
    S, D, b = 6, 8, 4
    state = _rand(rng, (S, D, 3))
    x, w = _rand(rng, (b, D)), _rand(rng, (D, 4))
    idx = jnp.array([0, 5, 99, -3], jnp.int32)   # pad_slot_id=0: slot 0 unreachable
    with jax.default_device(device):
        r = causal_conv1d_update(state, x, w, None, "silu", idx, pad_slot_id=0)
    out = np.asarray(r.out)
    assert np.isfinite(out[:2]).all() and np.isnan(out[2:]).all()
    new = np.asarray(r.conv_state)
    np.testing.assert_array_equal(new[:5], np.asarray(state)[:5])
    assert not np.array_equal(new[5], np.asarray(state)[5])
    with jax.default_device(device):  # disable_state_update: same outputs, nothing written
        r2 = causal_conv1d_update(state, x, w, None, "silu", idx, 0, disable_state_update=True)
    np.testing.assert_array_equal(np.asarray(r2.conv_state), np.asarray(state))
    np.testing.assert_array_equal(np.asarray(r2.out), out)


def test_conv_steps_equal_full_sequence():
    """T single steps == one T-step call == the full-sequence causal_conv1d (outputs, state)."""
    rng = np.random.default_rng(2)
    b, L, D, W = 3, 7, 16, 4
    x, w, bias = _rand(rng, (b, L, D)), _rand(rng, (D, W)), _rand(rng, (D,))
    init = _rand(rng, (b, D, W - 1))
    full, final = causal_conv1d(x, w, bias, "silu", initial_state=init)
    st, outs = init, []
    for t in range(L):
        r = causal_conv1d_update(st, x[:, t], w, bias, "silu")
        st, outs = r.conv_state, outs + [r.out]
    np.testing.assert_allclose(np.stack(outs, 1), full, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(st, final)
    r = causal_conv1d_update(init, x, w, bias, "silu")
    np.testing.assert_allclose(r.out, full, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(r.conv_state, final)


def test_conv_errors():
    s, x, w = jnp.zeros((4, 8, 3)), jnp.zeros((2, 8)), jnp.zeros((8, 4))
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d_update(s, x, jnp.zeros((7, 4)))
    with pytest.raises(ValueError, match="state_len"):
        causal_conv1d_update(jnp.zeros((4, 8, 2)), x, w)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_update(s, x, w, activation="relu")
    with pytest.raises(ValueError, match="conv_state_indices"):
        causal_conv1d_update(s, x, w, conv_state_indices=jnp.zeros((3,), jnp.int32))


# ------------------------------------------------------------------------------------------
# HLO evidence: donated buffers are updated in place

_DT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int16": "s16"}


def _shape_str(a, shape=None):
    return f"{_DT[str(a.dtype)]}[{','.join(map(str, a.shape if shape is None else shape))}]"


def _bad_lines(text, arrays):
    """Lines that copy a buffer of (a flat or per-layer view of) a donated array, or write a
    per-layer slice of it with dynamic-update-slice."""
    shapes = set()
    for a in arrays:
        shapes |= {_shape_str(a), _shape_str(a, (a.shape[0] * a.shape[1],) + a.shape[2:]),
                   _shape_str(a, a.shape[1:])}
    return [l for l in text.splitlines()
            if re.search(r"\b(copy(-start)?|dynamic-update-slice)\(", l)
            and any(s in l.split("=", 1)[-1] for s in shapes)]


def _aliased_shapes(text):
    """Shapes (as `_shape_str`) of the parameters aliased to outputs, from the HLO module
    header: input_output_alias={ {0}: (3, {}, may-alias), ... } and the parameter list of
    entry_computation_layout={(f32[..]{..}, ...)->...}. By shape, not by number: newer jax
    (0.12) passes closed-over arrays as leading parameters, so a donated argument's number
    is not its position in the call."""
    head = text.splitlines()[0]
    assert "input_output_alias={" in head, f"no input_output_alias in the header:\n{head[:400]}"
    aliases = head.split("input_output_alias={", 1)[1].split("entry_computation_layout", 1)[0]
    numbers = [int(p) for p in re.findall(r"\}: \((\d+), \{", aliases)]
    params = head.split("entry_computation_layout={(", 1)[1].split(")->", 1)[0]
    shapes = re.findall(r"([a-z][a-z0-9]*\[[0-9,]*\])", params)
    return collections.Counter(shapes[p] for p in numbers)


def test_conv_update_donated_in_place():
    rng = np.random.default_rng(3)
    state = _rand(rng, (64, 32, 3))
    x, w = _rand(rng, (4, 32)), _rand(rng, (32, 4))
    idx = jnp.array([5, 9, -1, 60], jnp.int32)
    f = jax.jit(lambda s, x, i: causal_conv1d_update(s, x, w, None, "silu", i)[::-1],
                donate_argnums=0)
    text = f.lower(state, x, idx).compile().as_text()
    assert not _bad_lines(text, [state]), _bad_lines(text, [state])
    assert _aliased_shapes(text)[_shape_str(state)] == 1, text.splitlines()[0][:500]
    ptr = state.unsafe_buffer_pointer()
    new, _ = f(state, x, idx)
    assert new.unsafe_buffer_pointer() == ptr and state.is_deleted()


# ------------------------------------------------------------------------------------------
# layer-stacked cache

L, S, H, P, N, G, b = 3, 12, 4, 8, 16, 2, 3
CD, W = 72, 4   # CD >= H*P + G*N


def _mm(a, w):
    """The toy model's matmul, in full fp32. The default precision of an fp32 matmul on a
    recent NVIDIA GPU is TF32 (10-bit mantissa inputs) for a matrix product, while a product
    with a single row may run as an fp32 reduction: a verify pass over b*T tokens and the
    one-token oracle then differ by ~1e-3 relative (issue 14: test_commit_layer_cache[gpu]
    failed so, 8.8% of the states off by up to 1.4e-2)."""
    return jnp.matmul(a, w, precision=jax.lax.Precision.HIGHEST)


def _toy_ssm_inputs(u):
    """x, dt, B of the toy layer, sliced from the conv output u (..., CD)."""
    lead = u.shape[:-1]
    return (u[..., :H * P].reshape(lead + (H, P)), u[..., :H],
            u[..., H * P:H * P + G * N].reshape(lead + (G, N)))


def _layer_step(ssu, slots, write_intermediate=False):
    """A toy layer: conv over a CD-wide input, SSU on x/dt/B sliced from it (params per layer).
    write_intermediate: the verify pass (T tokens, intermediates, no cache writes)."""

    def layer(h, p, view):
        xin = _mm(h, p["w_in"])                               # (b, [T,] CD)
        u, view = view.causal_conv1d_update(xin, p["conv_w"], p["conv_b"], "silu",
                                            conv_state_indices=slots,
                                            disable_state_update=write_intermediate)
        x, dt, B = _toy_ssm_inputs(u)
        y, view = view.selective_state_update(
            x, dt, p["A"], B, B * 0.5, p["D"], dt_bias=p["dt_bias"], dt_softplus=True,
            state_batch_indices=slots, write_intermediate=write_intermediate, ssu=ssu,
            disable_state_update=write_intermediate)
        h = h + _mm(y.reshape(x.shape[:-2] + (H * P,)), p["w_out"])
        return h, view, (xin if write_intermediate else None)

    return layer


def _params(rng):
    return dict(w_in=_rand(rng, (L, 32, CD), scale=32 ** -0.5),
                conv_w=_rand(rng, (L, CD, W), scale=0.5), conv_b=_rand(rng, (L, CD), scale=0.1),
                A=-jnp.exp(_rand(rng, (L, H), scale=0.5)), D=_rand(rng, (L, H)),
                dt_bias=_rand(rng, (L, H), scale=0.5),
                w_out=_rand(rng, (L, H * P, 32), scale=(H * P) ** -0.5))


def _random_cache(rng, dtype=jnp.float32, rows=0, steps=0):
    c = jcache.allocate_layer_cache(L, S, H, P, N, dtype, conv_dim=CD, d_conv=W,
                                    intermediate_rows=rows, cache_steps=steps)
    ssm = (jnp.asarray(rng.integers(-2000, 2000, c.ssm.shape), jnp.int16) if dtype == jnp.int16
           else _rand(rng, c.ssm.shape, dtype, 0.3))
    scale = None if c.ssm_scale is None else _rand(rng, c.ssm_scale.shape, scale=1e-4) ** 2 + 1e-5
    return jcache.LayerCache(ssm, _rand(rng, c.conv.shape, c.conv.dtype, 0.5), scale,
                             c.intermediate, c.intermediate_scales)


def test_allocate_layouts():
    c = jcache.allocate_layer_cache(2, 5, 3, 4, 8, jnp.int16, conv_dim=10, d_conv=4,
                                    intermediate_rows=6, cache_steps=3)
    assert c.ssm.shape == (2, 5, 3, 4, 8) and c.ssm.dtype == jnp.int16
    assert c.ssm_scale.shape == (2, 5, 3, 4) and c.conv.shape == (2, 5, 10, 3)
    assert c.conv.dtype == jnp.float32
    assert c.intermediate.shape == (2, 6, 3, 3, 4, 8)
    assert c.intermediate_scales.shape == (2, 6, 3, 3, 4)
    m1 = jcache.allocate_layer_cache(2, 5, None, 16, 4, jnp.bfloat16)
    assert m1.ssm.shape == (2, 5, 16, 4) and m1.conv is None and m1.ssm_scale is None
    leaves = jax.tree_util.tree_leaves(c)
    assert len(leaves) == 5
    v = c.view(1)
    assert v.ssm.shape == (10, 3, 4, 8) and v.intermediate.shape == (12, 3, 3, 4, 8)
    jax.tree_util.tree_map(np.testing.assert_array_equal, v.stacked(), c)


def test_flat_slot_indices():
    idx = jnp.array([0, 4, -1, 7, 5, -2], jnp.int32)
    f = np.asarray(jcache.flat_slot_indices(idx, 2, 5, 3, pad_slot_id=-1))
    np.testing.assert_array_equal(f, [10, 14, -1, 15, 15, 15])     # invalid -> L*S (NaN there)
    f = np.asarray(jcache.flat_slot_indices(idx, 1, 5, 3, pad_slot_id=4))
    np.testing.assert_array_equal(f, [5, -1, 15, 15, 15, 15])      # pad 4 -> flat pad -1
    f = np.asarray(jcache.flat_slot_indices(idx[:2], jnp.arange(3), 5, 3))
    np.testing.assert_array_equal(f, [[0, 4], [5, 9], [10, 14]])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int16])
def test_scan_layers_matches_per_layer_caches(dtype, device):
    """scan_layers over the flat view == L separate per-layer caches updated one by one."""
    rng = np.random.default_rng(4)
    params, c0 = _params(rng), _random_cache(rng, dtype)
    slots = jnp.array([9, -1, 2], jnp.int32)
    h0 = _rand(rng, (b, 32))
    layer = _layer_step(jax_mamba.selective_state_update, slots)
    with jax.default_device(device):
        h, c, _ = jax.jit(lambda c, h: jcache.scan_layers(layer, c, h, params))(c0, h0)
        hr = h0
        ssm, conv, scale = [], [], []
        for l in range(L):
            p = jax.tree.map(lambda a, l=l: a[l], params)
            xin = _mm(hr, p["w_in"])
            u, cs = causal_conv1d_update(c0.conv[l], xin, p["conv_w"], p["conv_b"], "silu", slots)
            x, dt, B = _toy_ssm_inputs(u)
            r = jax_mamba.selective_state_update(
                c0.ssm[l], x, dt, p["A"], B, B * 0.5, p["D"], dt_bias=p["dt_bias"],
                dt_softplus=True, state_batch_indices=slots,
                state_scale=None if c0.ssm_scale is None else c0.ssm_scale[l])
            hr = hr + _mm(r.out.reshape(b, H * P), p["w_out"])
            ssm, conv, scale = ssm + [r.state], conv + [cs], scale + [r.state_scale]
    # jit vs eager matmuls round differently: tolerance, not bits
    _same(h, hr, device, exact=False)
    _same(c.conv, jnp.stack(conv), device, exact=False)
    if dtype == jnp.int16:   # compare decoded values: rounding may differ by one step
        dec = lambda q, sc: np.asarray(q, np.float32) * np.asarray(sc)[..., None]
        got, want = dec(c.ssm, c.ssm_scale), dec(jnp.stack(ssm), jnp.stack(scale))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2 * float(jnp.max(c.ssm_scale)))
    else:
        _same(c.ssm, jnp.stack(ssm), device, exact=False)


@pytest.mark.parametrize("dtype,inter", [(jnp.float32, False), (jnp.bfloat16, True),
                                         (jnp.int16, True)])
def test_scan_layers_donated_has_no_copies(dtype, inter):
    """The compiled HLO of a donated step over all layers: every cache buffer is aliased
    (input_output_alias), none is copied, no layer is written by dynamic-update-slice, and
    the buffers keep their addresses."""
    rng = np.random.default_rng(5)
    params = _params(rng)
    T = 2
    c = _random_cache(rng, dtype, rows=b if inter else 0, steps=T if inter else 0)
    slots = jnp.array([9, -1, 2], jnp.int32)
    h = _rand(rng, (b, T, 32) if inter else (b, 32))
    layer = _layer_step(jax_mamba.selective_state_update, slots, write_intermediate=inter)

    def step(cache, h):
        h, cache, _ = jcache.scan_layers(layer, cache, h, params)
        return cache, h

    f = jax.jit(step, donate_argnums=0)
    text = f.lower(c, h).compile().as_text()
    leaves = jax.tree_util.tree_leaves(c)
    bad = _bad_lines(text, leaves)
    assert not bad, "\n".join(bad)
    want = collections.Counter(_shape_str(a) for a in leaves)
    assert _aliased_shapes(text) >= want, (want, text.splitlines()[0][:500])
    ptrs = [a.unsafe_buffer_pointer() for a in leaves]
    new, _ = f(c, h)
    assert [a.unsafe_buffer_pointer() for a in jax.tree_util.tree_leaves(new)] == ptrs


def test_layer_view_errors():
    c = jcache.allocate_layer_cache(2, 4, 2, 4, 8)
    v = c.view(0)
    with pytest.raises(ValueError, match="conv"):
        v.causal_conv1d_update(jnp.zeros((1, 4)), jnp.zeros((4, 4)))
    with pytest.raises(ValueError, match="intermediate"):
        v.selective_state_update(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2)), jnp.zeros(2),
                                 jnp.zeros((1, 1, 8)), jnp.zeros((1, 1, 8)),
                                 write_intermediate=True)


# ------------------------------------------------------------------------------------------
# speculative decoding

def _ssm_inputs(rng, nb, T, S_=16, dtype=jnp.float32):
    return dict(x=_rand(rng, (nb, T, H, P)), dt=_rand(rng, (nb, T, H)),
                A=-jnp.exp(_rand(rng, (H,), scale=0.5)), B=_rand(rng, (nb, T, G, N)),
                C=_rand(rng, (nb, T, G, N)), D=_rand(rng, (H,)),
                dt_bias=_rand(rng, (H,), scale=0.5))


def _single_steps(state, inp, slots, nacc, scale=None, pad_slot_id=-1):
    """The oracle: feed each entry's accepted tokens one at a time (STP calls)."""
    for e in range(slots.shape[0]):
        for t in range(int(nacc[e])):
            r = jax_mamba.selective_state_update(
                state, inp["x"][e:e + 1, t], inp["dt"][e:e + 1, t], inp["A"],
                inp["B"][e:e + 1, t], inp["C"][e:e + 1, t], inp["D"], dt_bias=inp["dt_bias"],
                dt_softplus=True, state_batch_indices=slots[e:e + 1], state_scale=scale,
                pad_slot_id=pad_slot_id)
            state, scale = r.state, r.state_scale
    return state, scale


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int16])
def test_sglang_verify_and_commit(dtype, device):
    rng = np.random.default_rng(6)
    T, S_, nb = 4, 16, 5
    inp = _ssm_inputs(rng, nb, T)
    if dtype == jnp.int16:
        state = jnp.asarray(rng.integers(-3000, 3000, (S_, H, P, N)), jnp.int16)
        scale = _rand(rng, (S_, H, P), scale=1e-2) ** 2 + 1e-4
        inter, iscale = jnp.zeros((8, T, H, P, N), jnp.int16), jnp.ones((8, T, H, P))
    else:
        state, scale = _rand(rng, (S_, H, P, N), scale=0.3), None
        inter, iscale = jnp.zeros((8, T, H, P, N)), None
    slots = jnp.array([3, 11, -1, 0, 7], jnp.int32)
    rows = jnp.array([6, 0, 1, 3, 2], jnp.int32)
    nacc = jnp.array([2, 4, 3, 0, 1], jnp.int32)
    with jax.default_device(device):
        r = spec.verify_drafts(state, **{k: inp[k] for k in "x dt A B C D".split()},
                               dt_bias=inp["dt_bias"], dt_softplus=True,
                               intermediate_states_buffer=inter, state_batch_indices=slots,
                               intermediate_state_indices=rows, state_scale=scale,
                               intermediate_state_scales=iscale)
        np.testing.assert_array_equal(np.asarray(r.state), np.asarray(state))
        commit = jax.jit(spec.commit_accepted_states, donate_argnums=0)
        c = commit(jnp.array(state), r.intermediate_states_buffer, nacc, slots, rows,
                   state_scale=scale, intermediate_state_scales=r.intermediate_state_scales)
        want, want_scale = _single_steps(state, inp, slots, nacc, scale)
        if dtype == jnp.int16:
            # single-token decoding re-quantises after every token, the verify pass only once:
            # bit-exact against one multi-token call over each entry's accepted prefix
            mtp, mtp_scale = state, scale
            for e in range(nb):
                n = int(nacc[e])
                if n:
                    r1 = jax_mamba.selective_state_update(
                        mtp, *[inp[k][e:e + 1, :n] for k in ("x", "dt")], inp["A"],
                        *[inp[k][e:e + 1, :n] for k in ("B", "C")], inp["D"],
                        dt_bias=inp["dt_bias"], dt_softplus=True,
                        state_batch_indices=slots[e:e + 1], state_scale=mtp_scale)
                    mtp, mtp_scale = r1.state, r1.state_scale
    if dtype == jnp.int16:
        _same(c.state, mtp, device)
        _same(c.state_scale, mtp_scale, device)
        dec = lambda q, sc: np.asarray(q, np.float32) * np.asarray(sc)[..., None]
        np.testing.assert_allclose(dec(c.state, c.state_scale), dec(want, want_scale),
                                   atol=8 * float(jnp.max(c.state_scale)))
    else:
        _same(c.state, want, device)


def test_vllm_slot_table_and_num_accepted(device):
    """2-D slot table as state_batch_indices and dst: after the verify call the state after n
    accepted tokens is in table[b, n-1]; the next round reads it through num_accepted_tokens."""
    rng = np.random.default_rng(7)
    T, S_, nb = 3, 20, 3
    state = _rand(rng, (S_, H, P, N), scale=0.3)
    table = jnp.array([[4, 5, 6], [10, 11, 12], [0, 1, 2]], jnp.int32)
    inp1, inp2 = _ssm_inputs(rng, nb, T), _ssm_inputs(rng, nb, T)
    n1 = jnp.array([2, 3, 1], jnp.int32)
    n2 = jnp.array([1, 2, 3], jnp.int32)
    kw = lambda i: dict(x=i["x"], dt=i["dt"], A=i["A"], B=i["B"], C=i["C"], D=i["D"],
                        dt_bias=i["dt_bias"], dt_softplus=True)
    with jax.default_device(device):
        first = jnp.ones((nb,), jnp.int32)      # round 1 reads table[b, 0]
        s1 = jax_mamba.selective_state_update(state, **kw(inp1), state_batch_indices=table,
                                              dst_state_batch_indices=table,
                                              num_accepted_tokens=first).state
        want1, _ = _single_steps(state, inp1, table[:, 0], n1)
        _same(s1[spec.accepted_state_slots(table, n1)], want1[table[:, 0]], device)
        s2 = jax_mamba.selective_state_update(s1, **kw(inp2), state_batch_indices=table,
                                              dst_state_batch_indices=table,
                                              num_accepted_tokens=n1).state
        # oracle for round 2: start from the committed round-1 states in the home slots
        home = jnp.asarray(want1)
        want2, _ = _single_steps(home, inp2, table[:, 0], n2)
        _same(s2[spec.accepted_state_slots(table, n2)], want2[table[:, 0]], device)
        # compacting the accepted states back into the home slots, in place
        c = jax.jit(spec.copy_states, donate_argnums=0)(
            s2, spec.accepted_state_slots(table, n2), table[:, 0])
    _same(c.state[table[:, 0]], want2[table[:, 0]], device)


def test_vllm_varlen_dst(device):
    """Varlen: sequences of different draft lengths flattened with cu_seqlens; the 2-D dst table
    gets the state after each step of each sequence."""
    rng = np.random.default_rng(8)
    S_, K = 24, 4
    lengths = [3, 1, 4]
    nb = len(lengths)
    cu = spec.cu_seqlens_from_lengths(lengths)
    np.testing.assert_array_equal(cu, [0, 3, 4, 8])
    inp = _ssm_inputs(rng, nb, K)
    flat = {k: jnp.concatenate([inp[k][s, :l] for s, l in enumerate(lengths)])
            for k in ("x", "dt", "B", "C")}
    state = _rand(rng, (S_, H, P, N), scale=0.3)
    src = jnp.array([2, 9, 17], jnp.int32)
    dst = jnp.array([[3, 4, 5, -1], [10, -1, -1, -1], [18, 19, 20, 21]], jnp.int32)
    with jax.default_device(device):
        r = jax_mamba.selective_state_update(
            state, flat["x"], flat["dt"], inp["A"], flat["B"], flat["C"], inp["D"],
            dt_bias=inp["dt_bias"], dt_softplus=True, state_batch_indices=src,
            dst_state_batch_indices=dst, cu_seqlens=cu)
        np.testing.assert_array_equal(np.asarray(r.state)[np.asarray(src)],
                                      np.asarray(state)[np.asarray(src)])   # src not written
        for n in range(1, K + 1):
            nacc = jnp.minimum(jnp.array(lengths), n)
            want, _ = _single_steps(state, inp, src, nacc)
            _same(r.state[spec.accepted_state_slots(dst, nacc)], want[src], device)


def test_commit_conv_state_equals_single_steps(device):
    rng = np.random.default_rng(9)
    S_, D, T = 10, 12, 4
    conv0 = _rand(rng, (S_, D, 3))
    x, w = _rand(rng, (4, T, D)), _rand(rng, (D, 4))
    slots = jnp.array([1, 8, -1, 4], jnp.int32)
    nacc = jnp.array([3, 4, 2, 0], jnp.int32)
    with jax.default_device(device):
        v = causal_conv1d_update(conv0, x, w, None, "silu", slots, disable_state_update=True)
        np.testing.assert_array_equal(np.asarray(v.conv_state), np.asarray(conv0))
        got = jax.jit(spec.commit_conv_state, donate_argnums=0)(jnp.array(conv0), x, nacc, slots)
        want = conv0
        for e in range(4):
            for t in range(int(nacc[e])):
                want = causal_conv1d_update(want, x[e:e + 1, t], w, None, "silu",
                                            slots[e:e + 1]).conv_state
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_commit_layer_cache(device):
    """Verify T tokens through scan_layers (intermediates, conv without writes), commit all
    layers at once == feeding the accepted tokens one at a time through scan_layers."""
    rng = np.random.default_rng(10)
    T = 3
    params = _params(rng)
    c0 = _random_cache(rng, jnp.float32, rows=b, steps=T)
    slots = jnp.array([9, -1, 2], jnp.int32)
    nacc = jnp.array([2, 3, 1], jnp.int32)
    h = _rand(rng, (b, T, 32))
    verify = _layer_step(jax_mamba.selective_state_update, slots, write_intermediate=True)
    with jax.default_device(device):
        _, cv, xins = jax.jit(lambda c, h: jcache.scan_layers(verify, c, h, params))(c0, h)
        np.testing.assert_array_equal(np.asarray(cv.ssm), np.asarray(c0.ssm))
        conv_only = spec.commit_layer_cache(cv, nacc, slots, conv_inputs=xins,
                                            commit_ssm=False)   # vLLM style: conv only
        np.testing.assert_array_equal(np.asarray(conv_only.ssm), np.asarray(c0.ssm))
        got = jax.jit(spec.commit_layer_cache, donate_argnums=0)(cv, nacc, slots,
                                                                  conv_inputs=xins)
        np.testing.assert_array_equal(np.asarray(conv_only.conv), np.asarray(got.conv))
        # oracle: per entry, feed its accepted tokens one at a time (the inputs of every layer
        # depend on the previous layer, so step the whole stack)
        want = c0
        step = jax.jit(lambda c, h, s: jcache.scan_layers(
            _layer_step(jax_mamba.selective_state_update, s), c, h, params)[1])
        for e in range(b):
            for t in range(int(nacc[e])):
                want = step(want, h[e:e + 1, t], slots[e:e + 1])
    _same(got.ssm, want.ssm, device, exact=False)
    _same(got.conv, want.conv, device, exact=False)


def test_hlo_check_catches_naive_layer_indexing():
    """Negative control for the checks above: cache[l] / .at[l].set under scan is flagged."""
    c = jnp.zeros((L, S, H, P, N))
    slots = jnp.array([1, 2], jnp.int32)

    def step(c, x):
        def body(c, l):
            r = jax_mamba.selective_state_update(
                c[l], x, jnp.ones((2, H)), -jnp.ones(H), jnp.ones((2, 1, N)),
                jnp.ones((2, 1, N)), jnp.ones(H), state_batch_indices=slots)
            return c.at[l].set(r.state), None
        return jax.lax.scan(body, c, jnp.arange(L))[0]

    text = jax.jit(step, donate_argnums=0).lower(c, jnp.ones((2, H, P))).compile().as_text()
    assert _bad_lines(text, [c])

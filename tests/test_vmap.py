"""vmap of selective_state_update (docs/sharding.md "vmap", issue #10 item 2): equal to a loop
over the instances, and with a donated batched cache in place (the vmapped axis is folded into
the slot axis: one kernel call, no copy of the state)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mamba
from cases import Cfg, make_case, split_static

SHARED = ("A", "D", "dt_bias")  # per-head parameters: one set for every instance (foldable)


def _bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _instances(cfg, V, seed, edit=None):
    kws = []
    for v in range(V):
        kw = make_case(cfg, np.random.default_rng(seed + v))
        if edit is not None:
            kw = edit(kw, v)
        kws.append(kw)
    if cfg.mode == "varlen":  # one token count for every instance: pad with unowned rows
        TT = max(k["x"].shape[0] for k in kws)
        for k in kws:
            for name in ("x", "dt", "B", "C", "z", "out"):
                if k.get(name) is not None:
                    a = k[name]
                    k[name] = jnp.pad(a, [(0, TT - a.shape[0])] + [(0, 0)] * (a.ndim - 1),
                                      constant_values=np.nan if name == "out" else 0)
    arrays = [split_static(k)[0] for k in kws]
    return arrays, split_static(kws[0])[1]


def _run(cfg, V=3, seed=0, unbatched=SHARED, edit=None, device=None):
    """vmap over V instances vs the V unbatched calls: every result equal bit for bit."""
    arrays, static = _instances(cfg, V, seed, edit)
    keys = list(arrays[0])
    axes = {k: (None if k in unbatched else 0) for k in keys}
    batched = {k: (arrays[0][k] if axes[k] is None else jnp.stack([a[k] for a in arrays]))
               for k in keys}

    def f(a):
        return jax_mamba.selective_state_update(**a, **static)

    got = jax.jit(jax.vmap(f, in_axes=(axes,)))(batched)
    for v in range(V):
        one = {k: (batched[k] if axes[k] is None else batched[k][v]) for k in keys}
        want = jax.jit(f)(one)
        for field in want._fields:
            w, g = getattr(want, field), getattr(got, field)
            assert (w is None) == (g is None), field
            if w is None:
                continue
            assert g.shape == (V,) + w.shape, (field, g.shape, w.shape)
            diff = _bits(g[v]) != _bits(w)
            assert not diff.any(), \
                f"instance {v}: {field} differs at {np.argwhere(diff)[:4].tolist()}"
    return got


def _invalid(rows):
    """An out-of-range read slot (S + 1, or negative) for the given entries."""
    def edit(kw, v):
        sbi = np.asarray(kw["state_batch_indices"]).copy()
        S = kw["state"].shape[0]
        for e in rows:
            sbi[e] = S + 1 if (e + v) % 2 else -3
        kw["state_batch_indices"] = jnp.asarray(sbi, sbi.dtype)
        return kw
    return edit


def _invalid_in(name, rows, n_of):
    """Out-of-range values (n + 1, or negative) in index array `name` for the given entries;
    n_of(kw) is the range of that array (S for slot indices, I for intermediate rows)."""
    def edit(kw, v):
        a = np.asarray(kw[name]).copy()
        n = n_of(kw)
        for e in rows:
            a[e] = n + 1 if (e + v) % 2 else -3
        kw[name] = jnp.asarray(a, a.dtype)
        return kw
    return edit


def _slots(kw):
    return kw["state"].shape[0]


def _rows(kw):
    return kw["intermediate_states_buffer"].shape[0]


FOLD_CASES = {
    "stp_pads_invalid": (Cfg(mode="stp", S=12, b=4, pads=True), _invalid([1])),
    "stp_pad_is_S": (Cfg(mode="stp", S=12, b=4, pads=True, pad_slot_id=12), _invalid([2])),
    "stp_pad_in_range": (Cfg(mode="stp", S=12, b=4, pads=True, pad_slot_id=3), None),
    "stp_noindex_inter": (Cfg(mode="stp", S=6, b=4, sbi="none", inter="noidx", z=True), None),
    "mtp_2d_dst_nacc": (Cfg(mode="mtp", S=40, b=3, T=2, sbi="2d", dst="2d", nacc=True,
                            pads=True), None),
    "mtp_inter_i16": (Cfg(mode="mtp", S=12, b=3, T=2, state="i16", inter="idx", pads=True,
                          bias=True, softplus=True), None),
    "mamba1_mtp": (Cfg(mode="mtp", heads=False, S=12, b=3, T=2, G=1, pads=True), _invalid([0])),
    # an invalid dst / intermediate index stays invalid in the folded view (it must not
    # reach a slot or row of another instance)
    "stp_dst_invalid": (Cfg(mode="stp", S=12, b=3, dst="1d"),
                        _invalid_in("dst_state_batch_indices", [0, 2], _slots)),
    "mtp_dst2d_invalid": (Cfg(mode="mtp", S=20, b=3, T=2, dst="2d", pads=True),
                          _invalid_in("dst_state_batch_indices", [1], _slots)),
    "mtp_inter_invalid": (Cfg(mode="mtp", S=12, b=3, T=2, inter="idx"),
                          _invalid_in("intermediate_state_indices", [0, 1], _rows)),
    "disable_update_bf16": (Cfg(mode="stp", S=12, b=3, state="bf16", inp="bf16", w="bf16",
                                dst="1d", disable=True), None),
}


@pytest.mark.parametrize("name", list(FOLD_CASES))
def test_vmap_fold_matches_loop(name):
    cfg, edit = FOLD_CASES[name]
    _run(cfg, edit=edit)


@pytest.mark.parametrize("name,cfg,unbatched", [
    ("varlen", Cfg(mode="varlen", S=32, b=3, T=3, sbi="2d", dst="1d", pads=True), SHARED),
    ("varlen_inter", Cfg(mode="varlen", S=12, b=3, T=2, inter="idx", pads=True), SHARED),
    ("batched_params", Cfg(mode="mtp", S=12, b=3, T=2, pads=True, bias=True), ()),
])
def test_vmap_loop_matches_loop(name, cfg, unbatched):
    """Instances that cannot share one call (varlen, per-instance A/D/dt_bias) run one after
    another over the folded cache: still equal to the loop."""
    _run(cfg, unbatched=unbatched, edit=_invalid([1]) if name == "varlen" else None)


def test_vmap_partly_batched():
    """Only the cache batched (one x for every instance), or only x batched (one cache,
    broadcast): equal to the loop."""
    cfg = Cfg(mode="stp", S=12, b=3, pads=True)
    _run(cfg, unbatched=SHARED + ("x", "dt", "B", "C", "state_batch_indices", "out"))
    _run(cfg, unbatched=SHARED + ("state",))


def test_vmap_nested_and_axis():
    """vmap of vmap folds twice; a batch axis that is not leading works too."""
    cfg = Cfg(mode="stp", S=8, b=2, pads=True)
    arrays, static = _instances(cfg, 6, 11)

    def f(a):
        return jax_mamba.selective_state_update(**a, **static)

    keys = list(arrays[0])
    axes = {k: (None if k in SHARED else 0) for k in keys}
    stacked = {k: (arrays[0][k] if axes[k] is None else
                   jnp.stack([a[k] for a in arrays]).reshape((2, 3) + arrays[0][k].shape))
               for k in keys}
    got = jax.jit(jax.vmap(jax.vmap(f, in_axes=(axes,)), in_axes=(axes,)))(stacked)
    moved = dict(stacked, state=jnp.moveaxis(stacked["state"], 1, 2))  # (2, S, 3, H, P, N)
    ax2 = dict(axes, state=1)
    got2 = jax.jit(jax.vmap(jax.vmap(f, in_axes=(ax2,)), in_axes=(axes,)))(moved)
    for i in range(2):
        for j in range(3):
            one = {k: (stacked[k] if axes[k] is None else stacked[k][i, j]) for k in keys}
            want = f(one)
            for g in (got, got2):
                np.testing.assert_array_equal(_bits(g.out[i, j]), _bits(want.out))
                np.testing.assert_array_equal(_bits(g.state[i, j]), _bits(want.state))


def test_vmap_int32_index_overflow_is_refused():
    """Folding V instances of S slots needs indices up to V*S (the invalid marker): past the
    int32 range the rule asks for int64 indices instead of wrapping around."""
    S = 2**30 + 1           # 2 * S > int32 max; shapes only (eval_shape allocates nothing)
    st = jax.ShapeDtypeStruct((2, S, 1, 1, 8), jnp.float32)
    x = jax.ShapeDtypeStruct((2, 1, 1, 1), jnp.float32)
    A = jnp.full((1,), -1.0, jnp.float32)
    BC = jax.ShapeDtypeStruct((2, 1, 1, 8), jnp.float32)
    sbi = jax.ShapeDtypeStruct((2, 1), jnp.int32)

    def f(st, x, b, c, i):
        return jax_mamba.selective_state_update(st, x, x, A, b, c, None,
                                                state_batch_indices=i).out

    with pytest.raises(ValueError, match=r"2 instances of 1073741825 slots exceed int32"):
        jax.eval_shape(jax.vmap(f), st, x, BC, BC, sbi)
    small = jax.ShapeDtypeStruct((2, 2**30 - 1, 1, 1, 8), jnp.float32)   # 2 * S fits
    assert jax.eval_shape(jax.vmap(f), small, x, BC, BC, sbi).shape == (2, 1, 1, 1)


def _entry(hlo):
    return hlo[hlo.index("\nENTRY"):]


def _shapes_of(line):
    return [tuple(int(x) for x in d.split(",") if x)
            for d in re.findall(r"[a-z]+[0-9]*\[([0-9,]*)\]", line.split("=", 1)[1].split("(")[0])]


@pytest.mark.parametrize("mode", ["stp", "mtp_inter_i16", "varlen"])
def test_vmap_donated_in_place(mode):
    """A jitted, donated, vmapped step: the batched cache (and scales, intermediate buffer)
    is aliased to the output, the HLO holds no copy of it and the buffer is reused."""
    cfg = {"stp": Cfg(mode="stp", S=16, b=3, pads=True),
           "mtp_inter_i16": Cfg(mode="mtp", S=16, b=3, T=2, state="i16", inter="idx"),
           "varlen": Cfg(mode="varlen", S=16, b=3, T=2, pads=True)}[mode]
    V = 4
    arrays, static = _instances(cfg, V, 5)
    bufs = [k for k in ("state", "state_scale", "intermediate_states_buffer",
                        "intermediate_state_scales") if k in arrays[0]]
    keys = list(arrays[0])
    axes = {k: (None if k in SHARED else 0) for k in keys if k not in bufs}

    def step(b, rest):
        r = jax_mamba.selective_state_update(**b, **rest, **static)
        return {k: getattr(r, k) for k in bufs}, r.out

    fn = jax.jit(jax.vmap(step, in_axes=(0, axes)), donate_argnums=0)

    def fresh():
        return ({k: jnp.stack([a[k] for a in arrays]) + 0 for k in bufs},
                {k: (arrays[0][k] if axes[k] is None else jnp.stack([a[k] for a in arrays]))
                 for k in axes})

    b, rest = fresh()
    hlo = fn.lower(b, rest).compile().as_text()
    header = hlo.splitlines()[0]
    aliased = re.findall(r"\{(\d*)\}: \((\d+), \{\}, may-alias\)", header)
    assert len(aliased) >= len(bufs), header[:400]
    big = {tuple(b[k].shape) for k in bufs}
    big |= {(s[0] * s[1],) + s[2:] for s in big}  # the folded view
    for line in _entry(hlo).splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%\S+\s*=\s*.+?\s+([a-z][a-z0-9\-]*)\(", line)
        if m and m.group(1) in ("copy", "copy-start", "dynamic-update-slice"):
            assert not set(_shapes_of(line)) & big, f"copy of a cache: {line.strip()[:200]}"
        if m and m.group(1) == "fusion" and "copy" in line.split("=")[0]:
            assert not set(_shapes_of(line)) & big, f"copy fusion of a cache: {line.strip()[:200]}"
    n_calls = len(re.findall(r"custom-call\(", hlo))
    assert n_calls == 1, f"expected one kernel call in the module, found {n_calls}"
    ptr = {k: b[k].unsafe_buffer_pointer() for k in bufs}
    new, out = fn(b, rest)
    for k in bufs:
        assert new[k].unsafe_buffer_pointer() == ptr[k], f"{k} was not updated in place"
    # and the values are those of the loop
    b2, rest2 = fresh()
    for v in range(V):
        one = {**{k: b2[k][v] for k in bufs},
               **{k: (rest2[k] if axes[k] is None else rest2[k][v]) for k in axes}}
        w_bufs, w_out = jax.jit(step)(one, {})
        np.testing.assert_array_equal(_bits(out[v]), _bits(w_out))
        for k in bufs:
            np.testing.assert_array_equal(_bits(new[k][v]), _bits(w_bufs[k]))


def test_vmap_grad_still_points_to_reference():
    cfg = Cfg(mode="stp", S=8, b=2)
    arrays, static = _instances(cfg, 2, 3)
    x = jnp.stack([a["x"] for a in arrays])

    def loss(xv, a):
        return jax_mamba.selective_state_update(**dict(a, x=xv), **static).out.sum()

    with pytest.raises(TypeError, match="reference"):
        jax.vmap(jax.grad(loss), in_axes=(0, None))(x, arrays[0])

"""Child process of test_sharding.py: jax.jit with a sharded state cache on 8 host CPU devices.

    python sharding_worker.py CASE [CASE ...]      (or `list` to print the case names)

For each case: the sharded, donated call must equal the unsharded call bit for bit (every
result), keep the state's sharding and buffers, and its compiled HLO must hold no collective
on a state-sized array and no copy of the state. Prints `ok CASE` per case.
"""
import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jax_mamba  # noqa: E402
from cases import Cfg, make_case  # noqa: E402

BUFFERS = ("state", "state_scale", "intermediate_states_buffer", "intermediate_state_scales")
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter",
               "collective-broadcast", "ragged-all-to-all")


# ---- index edits: slots chosen so that each entry's slots live on one shard ----

def _same_shard_slots(kw, cfg, shards, K=1, dst_K=0, pad_rows=(), bad_rows=()):
    """sbi (and dst) with entry b's slots on shard b % shards; rows in pad_rows padded, rows
    in bad_rows given an out-of-range read slot."""
    S, b = cfg.S, cfg.b
    Sl = S // shards
    rng = np.random.default_rng(7)
    src = np.zeros((b, K), np.int64)
    dst = np.zeros((b, max(dst_K, 1)), np.int64)
    used = {}
    for e in range(b):
        k = e % shards
        free = [s for s in range(k * Sl, (k + 1) * Sl) if s not in used and s != cfg.pad_slot_id]
        rng.shuffle(free)
        need = K + dst_K
        assert len(free) >= need, "cache too small for the case"
        src[e] = free[:K]
        dst[e, :dst_K] = free[K:need]
        for s in free[:need]:
            used[s] = e
    for e in pad_rows:
        src[e] = cfg.pad_slot_id
    for e in bad_rows:
        src[e] = S + 5 if e % 2 else -7
    idx = jnp.int32
    kw["state_batch_indices"] = jnp.asarray(src[:, 0] if K == 1 and cfg.sbi == "1d" else src, idx)
    if dst_K:
        kw["dst_state_batch_indices"] = jnp.asarray(dst[:, :dst_K] if cfg.dst == "2d"
                                                    else dst[:, 0], idx)
    return kw


def _inter_like_slots(kw, cfg, rng):
    """An intermediate buffer with one row per cache slot, indexed by the read slot (SGLang's
    layout): rows live on the shard of their slot when the buffer is sharded like the cache."""
    src = np.asarray(kw["state_batch_indices"])
    src = src if src.ndim == 1 else src[:, 0]
    hp = kw["state"].shape[1:-1]
    CS = kw["intermediate_states_buffer"].shape[1]
    shape = (cfg.S, CS) + hp + kw["state"].shape[-1:]
    if cfg.state == "i16":
        kw["intermediate_states_buffer"] = jnp.asarray(rng.integers(-100, 100, shape), jnp.int16)
        kw["intermediate_state_scales"] = jnp.asarray(rng.random(shape[:-1]), jnp.float32)
    else:
        kw["intermediate_states_buffer"] = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kw["intermediate_state_indices"] = jnp.asarray(src, jnp.int32)
    return kw


def _bad_index(kw, cfg, rows):
    sbi = np.asarray(kw["state_batch_indices"]).copy()
    for e in rows:
        sbi[e] = cfg.S + 3 if e % 2 else -5
    kw["state_batch_indices"] = jnp.asarray(sbi, kw["state_batch_indices"].dtype)
    return kw


# ---- the cases: (Cfg, mesh shape, mesh axes, specs of the buffers, edit) ----

H8 = dict(S=16, H=8, P=4, N=16)
CASES = {
    # tensor parallel over heads
    "heads_stp_gshard": (Cfg(mode="stp", G=8, b=3, z=True, bias=True, softplus=True, **H8),
                         (8,), ("m",), {"state": P(None, "m")}, None),
    "heads_stp_gslice": (Cfg(mode="stp", G=2, b=3, A_elem=True, DB_elem=True, dt_elem=True, **H8),
                         (8,), ("m",), {"state": P(None, "m")}, None),
    "heads_mtp_inter": (Cfg(mode="mtp", G=4, b=3, T=2, inter="idx", pads=True, **H8),
                        (8,), ("m",), {"state": P(None, "m"),
                                       "intermediate_states_buffer": P(None, None, "m")}, None),
    "heads_varlen_i16": (Cfg(mode="varlen", G=2, b=3, T=3, state="i16", inp="bf16", w="bf16",
                             z=True, sbi="2d", **H8),
                         (4,), ("m",), {"state": P(None, "m"), "state_scale": P(None, "m")},
                         None),
    # data parallel over slots
    "slots_stp_pads_invalid": (Cfg(mode="stp", G=2, b=6, pads=True, S=32, H=2, P=4, N=16),
                               (8,), ("m",), {"state": P("m")},
                               lambda kw, cfg, rng: _bad_index(kw, cfg, [1, 4])),
    "slots_stp_pad_in_range": (Cfg(mode="stp", G=1, b=5, pads=True, pad_slot_id=5, S=32, H=2,
                                   P=4, N=16),
                               (8,), ("m",), {"state": P("m")}, None),
    "slots_stp_noindex": (Cfg(mode="stp", G=1, b=6, sbi="none", inter="noidx", S=16, H=2, P=4,
                              N=16, z=True),
                          (8,), ("m",), {"state": P("m")}, None),
    "slots_mtp_dst2d_nacc": (Cfg(mode="mtp", G=2, b=4, T=2, sbi="2d", dst="2d", nacc=True,
                                 S=64, H=2, P=4, N=16),
                             (8,), ("m",), {"state": P("m")},
                             lambda kw, cfg, rng: _same_shard_slots(
                                 kw, cfg, 8, K=3, dst_K=3, pad_rows=[2])),
    "slots_mtp_inter_sharded": (Cfg(mode="mtp", G=2, b=5, T=2, inter="idx", state="i16",
                                    S=32, H=2, P=4, N=16),
                                (8,), ("m",), {"state": P("m"), "state_scale": P("m"),
                                               "intermediate_states_buffer": P("m"),
                                               "intermediate_state_scales": P("m")},
                                lambda kw, cfg, rng: _inter_like_slots(
                                    _same_shard_slots(kw, cfg, 8, pad_rows=[3]), cfg, rng)),
    "slots_mtp_inter_replicated": (Cfg(mode="mtp", G=2, b=5, T=2, inter="idx", pads=True,
                                       S=32, H=2, P=4, N=16),
                                   (8,), ("m",), {"state": P("m")}, None),
    "slots_varlen_2d": (Cfg(mode="varlen", G=1, b=4, T=3, sbi="2d", dst="1d", pads=True,
                            S=64, H=2, P=4, N=16),
                        (8,), ("m",), {"state": P("m")},
                        lambda kw, cfg, rng: _same_shard_slots(kw, cfg, 8, K=3, dst_K=1,
                                                               pad_rows=[1])),
    "slots_mamba1_i16_inter": (Cfg(mode="mtp", heads=False, G=1, b=4, T=2, state="i16",
                                   inter="idx", pads=True, S=16, P=8, N=16),
                               (8,), ("m",), {"state": P("m"), "state_scale": P("m")},
                               lambda kw, cfg, rng: _bad_index(kw, cfg, [1])),
    "slots_varlen_noout": (Cfg(mode="varlen", G=2, b=3, T=2, out=False, S=16, H=2, P=4, N=16),
                           (4,), ("m",), {"state": P("m")}, None),
    # both, on a 2-D mesh
    "mesh4x2_mtp_i16": (Cfg(mode="mtp", G=2, b=4, T=2, sbi="2d", state="i16", S=32, H=4, P=4,
                            N=16),
                        (4, 2), ("s", "h"), {"state": P("s", "h"), "state_scale": P("s", "h")},
                        None),
    "mesh2x4_stp_gslice": (Cfg(mode="stp", G=2, b=5, pads=True, z=True, S=16, H=8, P=4, N=16),
                           (2, 4), ("s", "h"), {"state": P("s", "h")},
                           lambda kw, cfg, rng: _bad_index(kw, cfg, [3])),
    "mesh2x4_varlen_inter": (Cfg(mode="varlen", G=4, b=3, T=2, inter="idx", S=16, H=8, P=4,
                                 N=16),
                             (2, 4), ("s", "h"), {"state": P("s", "h"),
                                                  "intermediate_states_buffer": P("s", None, "h")},
                             lambda kw, cfg, rng: _inter_like_slots(kw, cfg, rng)),
    # what the rule cannot run locally falls back to a correct (gathering) call
    "fallback_state_on_P": (Cfg(mode="stp", G=2, b=3, S=16, H=8, P=8, N=16), (8,), ("m",),
                            {"state": P(None, None, "m")}, None),
    "fallback_G_uneven": (Cfg(mode="stp", G=3, b=3, S=16, H=12, P=4, N=16), (4,), ("m",),
                          {"state": P(None, "m")}, None),
    "fallback_x_on_batch": (Cfg(mode="stp", G=2, b=8, **H8), (8,), ("m",),
                            {"state": P(None, "m"), "x": P("m")}, None),
}
# the fallbacks that gather the state (correct, not in place); small per-entry operands
# gathered; a replicated intermediate buffer combined by an all-reduce of the buffer (never of
# the state); the cases whose unsharded result has NaN rows (invalid indices)
GATHERS = {"fallback_state_on_P", "fallback_G_uneven"}
SMALL_GATHERS = {"fallback_x_on_batch"}
BUFFER_ALLREDUCE = {"slots_mtp_inter_replicated", "slots_stp_noindex", "slots_mamba1_i16_inter"}
EXPECT_NAN = {"slots_stp_pads_invalid", "mesh2x4_stp_gslice", "slots_mamba1_i16_inter"}


def _bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _instructions(hlo):
    """(result type, opcode, line) of every instruction of the compiled HLO."""
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%\S+\s*=\s*(.+?)\s+([a-z][a-z0-9\-]*)\(", line)
        if m:
            yield m.group(1), m.group(2), line


def _arrays(typ):
    """[(dtype, dims)] of an HLO result type (an array or a tuple)."""
    return [(d, tuple(int(x) for x in dims.split(",") if x))
            for d, dims in re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", typ)]


def run(name):
    cfg, mesh_shape, axes, specs, edit = CASES[name]
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    kw = make_case(cfg, np.random.default_rng(sum(map(ord, name))))
    if edit is not None:
        kw = edit(kw, cfg, rng)
    arrays = {k: np.asarray(v) for k, v in kw.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in kw.items() if not isinstance(v, jax.Array)}
    buf_names = [k for k in BUFFERS if k in arrays]

    def step(bufs, rest):
        r = jax_mamba.selective_state_update(**bufs, **rest, **static)
        # updated buffers first: donations are paired with outputs by size, in order
        return {k: getattr(r, k) for k in buf_names}, r.out

    def result(pair):
        bufs, out = pair
        return jax_mamba.SSUResult(out, *(bufs.get(k) for k in BUFFERS))

    # unsharded: everything on one device
    d0 = jax.devices()[0]
    want = result(jax.jit(step)({k: jax.device_put(arrays[k], d0) for k in buf_names},
                         {k: jax.device_put(v, d0) for k, v in arrays.items()
                          if k not in buf_names}))

    mesh = Mesh(np.array(jax.devices()[:int(np.prod(mesh_shape))]).reshape(mesh_shape), axes)
    shard = {k: NamedSharding(mesh, specs.get(k, P())) for k in arrays}
    # buffers owned by XLA (a host array put on a CPU device may share the array's memory,
    # which XLA then cannot donate)
    owned = jax.jit(lambda a: a, donate_argnums=())
    bufs = {k: owned(jax.device_put(arrays[k], shard[k])) for k in buf_names}
    rest = {k: jax.device_put(v, shard[k]) for k, v in arrays.items() if k not in buf_names}
    fn = jax.jit(step, donate_argnums=0)
    hlo = fn.lower(bufs, rest).compile().as_text()
    ptrs = {k: sorted(s.data.unsafe_buffer_pointer() for s in bufs[k].addressable_shards)
            for k in buf_names}
    got = result(fn(bufs, rest))

    # bit-exact against the unsharded call
    for field in got._fields:
        g, w = getattr(got, field), getattr(want, field)
        assert (g is None) == (w is None), field
        if g is not None:
            assert g.shape == w.shape and g.dtype == w.dtype, (field, g.shape, w.shape)
            diff = _bits(g) != _bits(w)
            assert not diff.any(), (f"{name}: {field} differs from the unsharded call at "
                                    f"{np.argwhere(diff)[:5].tolist()}")
    assert np.isnan(np.asarray(want.out, np.float32)).any() == (name in EXPECT_NAN), name

    # sharding and buffers of the state (and the other buffers) kept
    state_sharding = shard["state"]
    for k in buf_names:
        res = getattr(got, k)
        if name not in GATHERS:
            assert res.sharding.is_equivalent_to(shard[k], res.ndim), (k, res.sharding, shard[k])
            assert sorted(s.data.unsafe_buffer_pointer() for s in res.addressable_shards) == \
                ptrs[k], f"{name}: {k} is not updated in place"

    # HLO: no collective on a state-sized array, no copy of the state
    state = arrays["state"]
    local = tuple(state_sharding.shard_shape(state.shape))
    local_elems = int(np.prod(local))
    header = hlo.splitlines()[0]
    n_alias = len(re.findall(r"\{[0-9]*\}: \(\d+, \{\}, may-alias\)", header))
    assert name in GATHERS or n_alias >= len(buf_names), \
        f"{name}: donated buffers not aliased: {header[:300]}"
    collectives = []
    for typ, op, line in _instructions(hlo):
        arrs = _arrays(typ)
        base = op.replace("-start", "").replace("-done", "")
        if base in COLLECTIVES:
            collectives.append((op, arrs))
            if name in GATHERS:
                continue
            for _, dims in arrs:
                n = int(np.prod(dims)) if dims else 1
                assert dims not in (local, tuple(state.shape)), f"{name}: {line.strip()[:200]}"
                if name not in BUFFER_ALLREDUCE:
                    assert n < local_elems, f"{name}: state-sized collective {line.strip()[:200]}"
            if name not in BUFFER_ALLREDUCE | SMALL_GATHERS:
                assert base == "all-reduce", f"{name}: unexpected collective {line.strip()[:200]}"
        if op in ("copy", "copy-start") and name not in GATHERS:
            for _, dims in arrs:
                assert dims not in (local, tuple(state.shape)), f"{name}: state copy {line.strip()[:200]}"
    if name.startswith("heads"):
        assert not collectives, f"{name}: head sharding needs no collective: {collectives}"
    return collectives


# ---- checks that are not "equal to the unsharded call" ----

def _mesh(n, axes=("m",)):
    return Mesh(np.array(jax.devices()[:n]), axes)


def _hlo_collectives(hlo):
    return [(op, _arrays(typ)) for typ, op, _ in _instructions(hlo)
            if op.replace("-start", "").replace("-done", "") in COLLECTIVES]


def special_dst_off_shard():
    """A dst slot on another shard than the read slot: that entry faults visibly (NaN out, no
    write), the other entries are exactly as unsharded (docs/sharding.md)."""
    cfg = Cfg(mode="stp", G=1, b=4, dst="1d", S=32, H=2, P=4, N=16)
    kw = _same_shard_slots(make_case(cfg, np.random.default_rng(3)), cfg, 8, dst_K=1)
    dst = np.asarray(kw["dst_state_batch_indices"]).copy()
    dst[0] = 5 * 4  # shard 5 holds no other entry's slot
    kw["dst_state_batch_indices"] = jnp.asarray(dst, jnp.int32)
    arrays = {k: np.asarray(v) for k, v in kw.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in kw.items() if not isinstance(v, jax.Array)}
    f = jax.jit(lambda a: jax_mamba.selective_state_update(**a, **static))
    want = f({k: jax.device_put(v, jax.devices()[0]) for k, v in arrays.items()})
    mesh = _mesh(8)
    got = f({k: jax.device_put(v, NamedSharding(mesh, P("m") if k == "state" else P()))
             for k, v in arrays.items()})
    out, wout = np.asarray(got.out), np.asarray(want.out)
    assert np.isnan(out[0]).all() and not np.isnan(wout[0]).any()
    assert (_bits(out[1:]) == _bits(wout[1:])).all()
    expect = np.asarray(want.state).copy()
    expect[dst[0]] = arrays["state"][dst[0]]
    assert (_bits(got.state) == _bits(expect)).all()


def special_vmap_heads():
    """vmap over a batched cache sharded on heads: folded into slots, still partitioned."""
    V, cfg = 2, Cfg(mode="stp", G=8, b=3, pads=True, **H8)
    kws = [make_case(cfg, np.random.default_rng(20 + v)) for v in range(V)]
    static = {k: v for k, v in kws[0].items() if not isinstance(v, jax.Array)}
    shared = ("A", "D")
    arrays = {k: (np.asarray(kws[0][k]) if k in shared else
                  np.stack([np.asarray(kw[k]) for kw in kws]))
              for k, v in kws[0].items() if isinstance(v, jax.Array)}
    axes = {k: (None if k in shared else 0) for k in arrays}
    rest_names = [k for k in arrays if k != "state"]

    def step(state, rest):
        r = jax.vmap(lambda st, a: jax_mamba.selective_state_update(st, **a, **static),
                     in_axes=(0, {k: axes[k] for k in rest_names}))(state, rest)
        return r.state, r.out

    d0 = jax.devices()[0]
    want = jax.jit(step)(jax.device_put(arrays["state"], d0),
                         {k: jax.device_put(arrays[k], d0) for k in rest_names})
    mesh = _mesh(8)
    sh = NamedSharding(mesh, P(None, None, "m"))
    state = jax.jit(lambda a: a)(jax.device_put(arrays["state"], sh))
    rest = {k: jax.device_put(arrays[k], NamedSharding(mesh, P())) for k in rest_names}
    fn = jax.jit(step, donate_argnums=0)
    hlo = fn.lower(state, rest).compile().as_text()
    assert not _hlo_collectives(hlo), _hlo_collectives(hlo)
    got = fn(state, rest)
    for g, w in zip(got, want):
        assert (_bits(g) == _bits(w)).all()
    assert got[0].sharding.is_equivalent_to(sh, 5), got[0].sharding


def special_shard_map():
    """A user's shard_map over heads: the rule steps aside (all axes manual), same result."""
    cfg = Cfg(mode="mtp", G=8, b=3, T=2, **H8)
    kw = make_case(cfg, np.random.default_rng(4))
    arrays = {k: v for k, v in kw.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in kw.items() if not isinstance(v, jax.Array)}
    want = jax.jit(lambda a: jax_mamba.selective_state_update(**a, **static))(arrays)
    specs = {"state": P(None, "m"), "x": P(None, None, "m"), "dt": P(None, None, "m"),
             "A": P("m"), "D": P("m"), "B": P(None, None, "m"), "C": P(None, None, "m"),
             "state_batch_indices": P(), "out": P(None, None, "m")}
    mesh = _mesh(8)

    def local(a):
        r = jax_mamba.selective_state_update(**a, **static)
        return r.out, r.state

    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=({k: specs[k] for k in arrays},),
                               out_specs=(specs["out"], specs["state"])))
    out, state = fn(arrays)
    assert (_bits(out) == _bits(want.out)).all() and (_bits(state) == _bits(want.state)).all()


def special_sr_heads():
    """Stochastic rounding under head sharding: out exact; the state rounds to a neighbour
    of the unsharded value (its random bits follow the shard's element index)."""
    cfg = Cfg(mode="stp", G=2, b=3, state="bf16", inp="bf16", w="bf16", sr=True, **H8)
    kw = make_case(cfg, np.random.default_rng(5))
    arrays = {k: np.asarray(v) for k, v in kw.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in kw.items() if not isinstance(v, jax.Array)}
    f = jax.jit(lambda a: jax_mamba.selective_state_update(**a, **static))
    want = f({k: jax.device_put(v, jax.devices()[0]) for k, v in arrays.items()})
    mesh = _mesh(8)
    got = f({k: jax.device_put(v, NamedSharding(mesh, P(None, "m") if k == "state" else P()))
             for k, v in arrays.items()})
    assert (_bits(got.out) == _bits(want.out)).all()
    g, w = np.asarray(got.state, np.float32), np.asarray(want.state, np.float32)
    assert (np.abs(g - w) <= np.abs(w) * 2.0 ** -7 + 1e-30).all()


def special_eager_slots():
    """An eager (not jitted) call on a sharded cache is partitioned too."""
    cfg = Cfg(mode="stp", G=2, b=5, pads=True, S=32, H=2, P=4, N=16)
    kw = make_case(cfg, np.random.default_rng(6))
    arrays = {k: v for k, v in kw.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in kw.items() if not isinstance(v, jax.Array)}
    want = jax_mamba.selective_state_update(**arrays, **static)
    sh = NamedSharding(_mesh(8), P("m"))
    got = jax_mamba.selective_state_update(**dict(arrays, state=jax.device_put(arrays["state"], sh)),
                                           **static)
    assert got.state.sharding.is_equivalent_to(sh, 4), got.state.sharding
    assert (_bits(got.state) == _bits(want.state)).all() and (_bits(got.out) == _bits(want.out)).all()


SPECIAL = {"eager_slots": special_eager_slots,
           "dst_off_shard": special_dst_off_shard, "vmap_heads": special_vmap_heads,
           "shard_map_heads": special_shard_map, "sr_heads": special_sr_heads}


def main(argv):
    if argv == ["list"]:
        print("\n".join(list(CASES) + list(SPECIAL)))
        return
    assert len(jax.devices()) == 8, jax.devices()
    for name in argv:
        if name in SPECIAL:
            SPECIAL[name]()
            print(f"ok {name}")
            continue
        colls = run(name)
        summary = sorted({f"{op} {d}[{','.join(map(str, s))}]" for op, arrs in colls
                          for d, s in arrs})
        print(f"ok {name} collectives={summary}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Random problem generation and result checking shared by the test modules."""
import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from oracle import oracle

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16, "i16": jnp.int16}


@dataclasses.dataclass(frozen=True)
class Cfg:
    mode: str = "stp"            # stp | mtp | varlen
    heads: bool = True           # 4-D state (Mamba-2) or 3-D (Mamba-1)
    S: int = 12
    H: int = 4
    P: int = 8
    N: int = 16
    G: int = 2
    b: int = 3                   # batch, or number of sequences in varlen
    T: int = 3                   # MTP steps, or the longest varlen sequence
    state: str = "f32"
    inp: str = "f32"
    w: str = "f32"
    idx: str = "int32"
    dt_elem: bool = False
    A_elem: bool = False
    DB_elem: bool = False        # D and dt_bias per element
    z: bool = False
    D: bool = True
    bias: bool = False
    softplus: bool = False
    sbi: str = "1d"              # none | 1d | 2d
    pads: bool = False
    pad_slot_id: int = -1
    dst: str = "none"            # none | 1d | 2d
    inter: str = "none"          # none | idx | noidx
    nacc: bool = False
    disable: bool = False
    out: bool = True
    sr: bool = False
    cache_steps: int = 0


def _rand(rng, shape, dtype, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, DTYPES.get(dtype, dtype))


def make_case(cfg: Cfg, rng):
    """Keyword arguments for selective_state_update drawn from `rng` for configuration `cfg`."""
    S, H, P, N, G, b, T = cfg.S, cfg.H, cfg.P, cfg.N, cfg.G, cfg.b, cfg.T
    hp = (H, P) if cfg.heads else (P,)
    kw = {}
    if cfg.state == "i16":
        kw["state"] = jnp.asarray(rng.integers(-32767, 32768, (S,) + hp + (N,)), jnp.int16)
        kw["state_scale"] = jnp.asarray(rng.random((S,) + hp) * 1e-4 + 1e-5, jnp.float32)
    else:
        kw["state"] = _rand(rng, (S,) + hp + (N,), cfg.state)
    if cfg.mode == "varlen":
        lens = rng.integers(0, T + 1, b)
        lens[0] = T
        start = int(rng.integers(0, 2))
        cu = np.concatenate([[0], np.cumsum(lens)]) + start
        TT = int(cu[-1]) + int(rng.integers(0, 2))
        lead = (TT,)
        kw["cu_seqlens"] = jnp.asarray(cu, cfg.idx)
        steps = T
    elif cfg.mode == "mtp":
        lead, steps = (b, T), T
    else:
        lead, steps = (b,), 1
    kw["x"] = _rand(rng, lead + hp, cfg.inp)
    dt_shape = lead + hp if (cfg.dt_elem or not cfg.heads) else lead + (H,)
    kw["dt"] = jnp.asarray(rng.random(dt_shape) * 0.5 + (0 if cfg.softplus else 0.05) -
                           (1.0 if cfg.softplus else 0), DTYPES[cfg.w])
    if cfg.heads:
        kw["A"] = jnp.asarray(-(rng.random((H, P, N) if cfg.A_elem else (H,)) + 0.5), jnp.float32)
    else:
        kw["A"] = jnp.asarray(-(rng.random((P, N)) + 0.5), jnp.float32)
    kw["B"] = _rand(rng, lead + ((G, N) if cfg.heads else (N,)), cfg.inp)
    kw["C"] = _rand(rng, lead + ((G, N) if cfg.heads else (N,)), cfg.inp)
    pshape = (H, P) if (cfg.DB_elem and cfg.heads) else ((H,) if cfg.heads else (P,))
    kw["D"] = _rand(rng, pshape, cfg.w) if cfg.D else None
    if cfg.bias:
        kw["dt_bias"] = jnp.asarray(rng.random(pshape) - 0.5, DTYPES[cfg.w])
    if cfg.z:
        kw["z"] = _rand(rng, lead + hp, cfg.inp)
    kw["dt_softplus"] = cfg.softplus
    kw["pad_slot_id"] = cfg.pad_slot_id

    # distinct slots: sources, then destinations, never shared between entries
    K = steps + 1
    perm = rng.permutation(S)
    if cfg.sbi == "none":  # entry i reads slot i: destinations come from the other slots
        perm = np.concatenate([np.arange(b), b + rng.permutation(S - b)])
    need = b * (K if cfg.sbi == "2d" else 1)
    assert S >= need + (b * K if cfg.dst != "none" else 0), "cache too small for the case"
    if cfg.sbi != "none":
        src = perm[:need].reshape((b, K) if cfg.sbi == "2d" else (b,))
        if cfg.pads:
            mask = rng.random(b) < 0.34
            mask[0] = True
            if cfg.sbi == "2d":
                src = src.copy()
                src[mask] = cfg.pad_slot_id
            else:
                src = np.where(mask, cfg.pad_slot_id, src)
        kw["state_batch_indices"] = jnp.asarray(src, cfg.idx)
        if cfg.nacc:
            kw["num_accepted_tokens"] = jnp.asarray(rng.integers(0, K + 1, b), cfg.idx)
    if cfg.dst != "none":
        d = perm[need:need + b * K]
        d = d.reshape(b, K) if cfg.dst == "2d" else d[:b]
        if cfg.pads:
            d = d.copy()
            d[rng.random(d.shape) < 0.2] = cfg.pad_slot_id
        kw["dst_state_batch_indices"] = jnp.asarray(d, cfg.idx)
    if cfg.inter != "none":
        I = b + 2
        CS = max(steps, cfg.cache_steps)
        shape = (I, CS) + hp + (N,)
        if cfg.state == "i16":
            kw["intermediate_states_buffer"] = jnp.asarray(rng.integers(-100, 100, shape), jnp.int16)
            kw["intermediate_state_scales"] = jnp.asarray(rng.random((I, CS) + hp), jnp.float32)
        else:
            kw["intermediate_states_buffer"] = _rand(rng, shape, cfg.state)
        if cfg.inter == "idx":
            ii = rng.permutation(I)[:b]
            if cfg.pads:
                ii = np.where(rng.random(b) < 0.3, cfg.pad_slot_id, ii)
            kw["intermediate_state_indices"] = jnp.asarray(ii, cfg.idx)
    kw["cache_steps"] = cfg.cache_steps
    kw["disable_state_update"] = cfg.disable
    if cfg.out:
        kw["out"] = jnp.full(kw["x"].shape, jnp.nan, kw["x"].dtype)  # poisoned
    if cfg.sr:
        kw["rand_seed"] = jnp.asarray(rng.integers(0, 2**31), jnp.int32)
    return kw


TOL = {"f32": 3e-5, "bf16": 1.2e-2, "f16": 2.5e-3, "i16": 3e-4}
STATE_TOL = dict(TOL, f32=1e-5)  # issue #3: an fp32 state within 1e-5 of the float64 oracle


def close(name, got, want, tol):
    """Same NaN pattern, and max |got - want| <= tol * max |want| over the finite elements."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    gn, wn = np.isnan(got), np.isnan(want)
    assert (gn == wn).all(), (f"{name}: NaN pattern differs at {np.argwhere(gn != wn)[:5].tolist()}"
                              f" (got NaN: {gn.sum()}, want NaN: {wn.sum()})")
    if (~wn).any():
        scale = max(np.abs(want[~wn]).max(), 1e-6)
        err = np.abs(got[~wn] - want[~wn]).max() / scale
        assert err <= tol, f"{name}: max error {err:.3g} (relative to max {scale:.3g}) > {tol}"


def decoded(arr, scale):
    a = np.asarray(arr, np.float64)
    if scale is not None:
        a = a * np.asarray(scale, np.float64).reshape(a.shape[:-1])[..., None]
    return a


def check(cfg: Cfg, kw, res, tol_out=None):
    """Compares a result with the float64 oracle; slots nobody writes must keep their bytes."""
    want = oracle(**kw)
    out_tol = tol_out or TOL[cfg.inp]
    close("out", res.out, want["out"], out_tol)
    assert res.out.dtype == kw["x"].dtype and res.out.shape == kw["x"].shape
    st_tol = STATE_TOL[cfg.state] * (2 if cfg.sr else 1)
    w = want["written"]
    got_state = decoded(res.state, res.state_scale)
    close("state (written slots)", got_state[w], want["state"][w], st_tol)
    np.testing.assert_array_equal(np.asarray(res.state)[~w], np.asarray(kw["state"])[~w],
                                  err_msg="a slot that must not be written changed")
    if cfg.state == "i16":
        np.testing.assert_array_equal(np.asarray(res.state_scale)[~w],
                                      np.asarray(kw["state_scale"])[~w])
    if want["inter"] is not None:
        iw = want["inter_written"]
        got = decoded(res.intermediate_states_buffer, res.intermediate_state_scales)
        close("intermediate (written)", got[iw], want["inter"][iw], st_tol)
        np.testing.assert_array_equal(np.asarray(res.intermediate_states_buffer)[~iw],
                                      np.asarray(kw["intermediate_states_buffer"])[~iw],
                                      err_msg="an intermediate entry that must not be written changed")
    else:
        assert res.intermediate_states_buffer is None
    return want


def to_device(kw, device):
    return {k: (jax.device_put(v, device) if isinstance(v, jax.Array) else v) for k, v in kw.items()}


def seed_of(cfg, salt=0):
    """A per-configuration seed that is stable across runs (unlike hash())."""
    return zlib.crc32(repr(cfg).encode()) + salt


def split_static(kw):
    """(array kwargs, static kwargs) so the arrays can be passed through jit."""
    arrays = {k: v for k, v in kw.items() if isinstance(v, jax.Array)}
    return arrays, {k: v for k, v in kw.items() if k not in arrays}

"""Trace-time validation of selective_state_update's arguments (SPEC §2, §3.6) and their
normalisation into the canonical layout both the FFI kernels and the reference run on:

    state (S, H, P, N); x, z, out (nb, T, H, P) or varlen (TT, H, P); dt like x or without P;
    A float32 (H,) or (H, P, N); B, C (..., G, N); D, dt_bias (H,) or (H, P);
    sbi, dst (nb,) or (nb, K); state_scale (S, H, P); intermediates (I, CS, H, P, N) + (I, CS, H, P);
    seed uint32 (2,).

Inputs are only reshaped (free in XLA). The aliased buffers (state, state_scale, out and the
intermediate buffers) keep the caller's shapes: XLA inserts copies when an aliased operand is a
reshape (e.g. with an inserted size-1 head axis) of a donated parameter, so consumers must use
`dims` (S, H, P, N) rather than the rank of these arrays.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

ALGORITHMS = ("auto", "simple", "vertical", "horizontal")
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
STATE_DTYPES = FLOAT_DTYPES + (jnp.int16,)
INDEX_DTYPES = (jnp.int32, jnp.int64)


class SSUResult(NamedTuple):
    """Result of selective_state_update: `out` like x, then the updated (aliased) buffers,
    None where the corresponding argument was not given."""
    out: jax.Array
    state: jax.Array
    state_scale: Optional[jax.Array]
    intermediate_states_buffer: Optional[jax.Array]
    intermediate_state_scales: Optional[jax.Array]


# So that an exported step returning SSUResult can be serialized (jax.export).
jax.export.register_namedtuple_serialization(SSUResult, serialized_name="jax_mamba.SSUResult")


def _names(dtypes):
    return "/".join(np.dtype(d).name for d in dtypes)


def _check_dtype(name, arr, allowed):
    if not any(arr.dtype == np.dtype(d) for d in allowed):
        raise TypeError(f"{name}: expected dtype {_names(allowed)}, got {arr.dtype}")


def _check_shape(name, arr, *expected):
    got = tuple(arr.shape)
    if got not in [tuple(e) for e in expected]:
        want = " or ".join(str(tuple(e)) for e in expected)
        raise ValueError(f"{name}: expected shape {want}, got {got}")


def _as_array(name, v):
    if v is None:
        return None
    if not hasattr(v, "shape") or not hasattr(v, "dtype"):
        try:
            v = jnp.asarray(v)
        except TypeError as e:
            raise TypeError(f"{name}: expected an array, got {type(v).__name__}") from e
    return v


def _static_int(name, v):
    if isinstance(v, jax.core.Tracer):
        raise TypeError(f"{name}: expected a static Python int, got a traced value (it is baked "
                        "into the compiled kernel; mark it static, e.g. jax.jit(..., "
                        "static_argnames=...))")
    if isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a Python int, got bool {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name}: expected a static Python int, got {type(v).__name__} "
                        "(it is baked into the compiled kernel; pass it as a static argument)") from None


def _static_bool(name, v):
    if isinstance(v, jax.core.Tracer):
        raise TypeError(f"{name}: expected a static Python bool, got a traced value (it selects "
                        "the computation at trace time; mark it static, e.g. jax.jit(..., "
                        "static_argnames=...))")
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a Python bool (True or False), got "
                        f"{type(v).__name__} {v!r}")
    return bool(v)


def _required(name, v):
    if v is None:
        raise TypeError(f"{name}: expected an array, got None (it is a required argument)")
    return v


_INT_RANGE = {np.dtype(np.int32): (-2**31, 2**31 - 1), np.dtype(np.int64): (-2**63, 2**63 - 1)}


@dataclasses.dataclass
class Problem:
    """Canonical arrays plus the static settings and what is needed to restore user shapes."""
    state: Any
    x: Any
    dt: Any
    A: Any
    B: Any
    C: Any
    D: Any
    z: Any
    dt_bias: Any
    sbi: Any
    dst: Any
    state_scale: Any
    out: Any
    inter: Any
    inter_idx: Any
    inter_scales: Any
    cu_seqlens: Any
    nacc: Any
    seed: Any
    pad_slot_id: int
    dt_softplus: bool
    disable_state_update: bool
    philox_rounds: int
    cache_steps: Optional[int]  # longest allowed sequence (cache_steps or the buffer's step axis)
    algorithm: str
    dims: tuple          # canonical (S, H, P, N) of the state
    mode: str            # "stp" | "mtp" | "varlen"
    nb: int              # entries (batch rows or sequences)
    T: int               # steps per entry (0 in varlen)
    x_shape: tuple
    state_shape: tuple
    scale_shape: Optional[tuple]
    inter_shape: Optional[tuple]
    inter_scales_shape: Optional[tuple]

    @property
    def S(self):
        return self.dims[0]

    @property
    def H(self):
        return self.dims[1]

    @property
    def P(self):
        return self.dims[2]

    @property
    def N(self):
        return self.dims[3]

    @property
    def G(self):
        return self.B.shape[-2]

    def result(self, out, state, state_scale, inter, inter_scales) -> SSUResult:
        """Reshapes canonical results back to the user's shapes."""
        return SSUResult(
            out.reshape(self.x_shape),
            state.reshape(self.state_shape),
            None if self.scale_shape is None else state_scale.reshape(self.scale_shape),
            None if self.inter_shape is None else inter.reshape(self.inter_shape),
            None if self.inter_scales_shape is None else inter_scales.reshape(self.inter_scales_shape),
        )


def seed_words(name, seed):
    """rand_seed (integer scalar / 1-element array, a raw uint32 (2,) key or a typed PRNG key)
    -> uint32 (2,) = (low, high) words of the 64-bit Philox key."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        v = int(seed) & 0xFFFFFFFFFFFFFFFF
        return jnp.asarray(np.array([v & 0xFFFFFFFF, v >> 32], dtype=np.uint32))
    seed = _as_array(name, seed)
    if jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
        words = jax.random.key_data(seed).reshape(-1).astype(jnp.uint32)
        if words.shape[0] < 2:
            words = jnp.concatenate([words, jnp.zeros((2 - words.shape[0],), jnp.uint32)])
        return words[:2]
    if not jnp.issubdtype(seed.dtype, jnp.integer):
        raise TypeError(f"{name}: expected an integer scalar, a 1-element integer array or a "
                        f"JAX PRNG key, got dtype {seed.dtype}")
    if seed.dtype == np.uint32 and seed.shape == (2,):
        return seed
    if seed.size != 1:
        raise ValueError(f"{name}: expected a scalar or 1-element array, got shape {tuple(seed.shape)}")
    v = seed.reshape(())
    if v.dtype.itemsize == 8:
        u = v.astype(jnp.uint64) if v.dtype != np.uint64 else v
        return jnp.stack([(u & 0xFFFFFFFF).astype(jnp.uint32), (u >> 32).astype(jnp.uint32)])
    low = v.astype(jnp.uint32)
    high = jnp.where(v < 0, jnp.uint32(0xFFFFFFFF), jnp.uint32(0)) if jnp.issubdtype(
        v.dtype, jnp.signedinteger) else jnp.uint32(0)
    return jnp.stack([low, high])


# The public signature (names, order, defaults) of selective_state_update and its reference;
# build_problem takes the same arguments in the same order. None marks a required argument.
SIGNATURE = (
    ("state", None), ("x", None), ("dt", None), ("A", None), ("B", None), ("C", None),
    ("D", None), ("z", None), ("dt_bias", None), ("dt_softplus", False),
    ("state_batch_indices", None), ("pad_slot_id", -1), ("state_scale", None), ("out", None),
    ("disable_state_update", False), ("intermediate_states_buffer", None),
    ("intermediate_state_indices", None), ("intermediate_state_scales", None),
    ("rand_seed", None), ("philox_rounds", 10), ("cache_steps", 0), ("algorithm", "auto"),
    ("dst_state_batch_indices", None), ("cu_seqlens", None), ("num_accepted_tokens", None),
)


def build_problem(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices,
                  pad_slot_id, state_scale, out, disable_state_update,
                  intermediate_states_buffer, intermediate_state_indices,
                  intermediate_state_scales, rand_seed, philox_rounds, cache_steps, algorithm,
                  dst_state_batch_indices, cu_seqlens, num_accepted_tokens) -> Problem:
    # ---- statics ----
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
    pad_slot_id = _static_int("pad_slot_id", pad_slot_id)
    philox_rounds = _static_int("philox_rounds", philox_rounds)
    cache_steps = _static_int("cache_steps", cache_steps)
    if philox_rounds <= 0:
        raise ValueError(f"philox_rounds: expected a positive number of rounds, got {philox_rounds}")
    if cache_steps < 0:
        raise ValueError(f"cache_steps: expected >= 0, got {cache_steps}")
    dt_softplus = _static_bool("dt_softplus", dt_softplus)
    disable_state_update = _static_bool("disable_state_update", disable_state_update)
    for name, v in (("state", state), ("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        _required(name, v)

    (state, x, dt, A, B, C, D, z, dt_bias, sbi, state_scale, out, inter, inter_idx, inter_scales,
     dst, cu, nacc) = [_as_array(n, v) for n, v in zip(
        ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "state_batch_indices",
         "state_scale", "out", "intermediate_states_buffer", "intermediate_state_indices",
         "intermediate_state_scales", "dst_state_batch_indices", "cu_seqlens",
         "num_accepted_tokens"),
        (state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, state_scale, out,
         intermediate_states_buffer, intermediate_state_indices, intermediate_state_scales,
         dst_state_batch_indices, cu_seqlens, num_accepted_tokens))]

    # ---- state ----
    if state.ndim not in (3, 4):
        raise ValueError(f"state: expected rank 4 (S, H, P, N) or rank 3 (S, P, N), got shape "
                         f"{tuple(state.shape)}")
    _check_dtype("state", state, STATE_DTYPES)
    heads = state.ndim == 4
    if heads:
        S, H, P, N = state.shape
    else:
        (S, P, N), H = state.shape, 1
    for axis, v in (("nheads (axis 1)", H), ("dim", P), ("dstate (last axis)", N)):
        if v == 0:
            raise ValueError(f"state: {axis} must be at least 1, got shape {tuple(state.shape)}")
    hp = (H, P) if heads else (P,)  # trailing axes of x in the user's layout

    # ---- mode, x ----
    _check_dtype("x", x, FLOAT_DTYPES)
    if cu is not None:
        mode = "varlen"
        _check_dtype("cu_seqlens", cu, INDEX_DTYPES)
        if cu.ndim != 1 or cu.shape[0] < 1:
            raise ValueError(f"cu_seqlens: expected shape (num_seqs + 1,), got {tuple(cu.shape)}")
        if x.ndim != state.ndim - 1:
            raise ValueError(f"x: with cu_seqlens expected shape (total_tokens, {', '.join(map(str, hp))}), "
                             f"got {tuple(x.shape)}")
        nb, T = cu.shape[0] - 1, 0
    elif x.ndim == state.ndim:
        mode, nb, T = "mtp", x.shape[0], x.shape[1]
    elif x.ndim == state.ndim - 1:
        mode, nb, T = "stp", x.shape[0], 1
    else:
        want = "(b, H, P) or (b, T, H, P)" if heads else "(b, P) or (b, T, P)"
        raise ValueError(f"x: expected {want} for state of shape {tuple(state.shape)}, got "
                         f"{tuple(x.shape)}")
    lead = tuple(x.shape[:x.ndim - len(hp)])
    if tuple(x.shape[len(lead):]) != hp:
        raise ValueError(f"x: expected trailing axes {hp} (from state {tuple(state.shape)}), got "
                         f"shape {tuple(x.shape)}")

    # ---- per-token tensors ----
    _check_dtype("dt", dt, FLOAT_DTYPES)
    per_head_dt = lead + ((H,) if heads else ())
    if heads:
        _check_shape("dt", dt, x.shape, per_head_dt)
    else:
        _check_shape("dt", dt, x.shape)
    dt_elem = tuple(dt.shape) == tuple(x.shape)

    for name, arr in (("B", B), ("C", C)):
        _check_dtype(name, arr, (x.dtype,))
        if heads:
            if arr.ndim != len(lead) + 2 or tuple(arr.shape[:len(lead)]) != lead or arr.shape[-1] != N:
                raise ValueError(f"{name}: expected shape {lead + ('G', N)}, got {tuple(arr.shape)}")
        else:
            _check_shape(name, arr, lead + (N,))
    if C.shape != B.shape:
        raise ValueError(f"C: expected the shape of B {tuple(B.shape)}, got {tuple(C.shape)}")
    G = B.shape[-2] if heads else 1
    if G == 0:
        raise ValueError(f"B: ngroups (axis -2) must be at least 1, got shape {tuple(B.shape)}")
    if H % G:
        raise ValueError(f"B: ngroups (axis -2) must divide nheads={H}, got ngroups={G}")
    for name, arr in (("z", z), ("out", out)):
        if arr is not None:
            _check_dtype(name, arr, (x.dtype,))
            _check_shape(name, arr, x.shape)

    # ---- parameters ----
    if not jnp.issubdtype(A.dtype, jnp.floating):
        raise TypeError(f"A: expected a floating dtype, got {A.dtype}")
    if heads:
        _check_shape("A", A, (H,), (H, P, N))
    else:
        _check_shape("A", A, (P, N))
    A_elem = A.ndim != 1
    for name, arr in (("D", D), ("dt_bias", dt_bias)):
        if arr is None:
            continue
        _check_dtype(name, arr, (dt.dtype,))
        if heads:
            _check_shape(name, arr, (H,), (H, P))
        else:
            _check_shape(name, arr, (P,))

    # ---- indices ----
    idx_dtype = None
    for name, arr in (("state_batch_indices", sbi), ("dst_state_batch_indices", dst),
                      ("intermediate_state_indices", inter_idx)):
        if arr is None:
            continue
        _check_dtype(name, arr, INDEX_DTYPES)
        if idx_dtype is None:
            idx_dtype = (name, arr.dtype)
        elif arr.dtype != idx_dtype[1]:
            raise TypeError(f"{name}: expected the dtype of {idx_dtype[0]} ({idx_dtype[1]}), got {arr.dtype}")
    for name, arr in (("state_batch_indices", sbi), ("dst_state_batch_indices", dst)):
        if arr is None:
            continue
        if arr.ndim not in (1, 2) or arr.shape[0] != nb:
            raise ValueError(f"{name}: expected shape ({nb},) or ({nb}, K), got {tuple(arr.shape)}")
        if arr.ndim == 2 and arr.shape[1] == 0:
            raise ValueError(f"{name}: a 2-D index array needs width K >= 1 (one column per step), "
                             f"got shape {tuple(arr.shape)}")
        if mode == "mtp" and arr.ndim == 2 and arr.shape[1] < T:
            raise ValueError(f"{name}: expected a 2-D index array of width K >= T={T}, got shape "
                             f"{tuple(arr.shape)}")
    lo, hi = _INT_RANGE[np.dtype(idx_dtype[1])] if idx_dtype else _INT_RANGE[np.dtype(np.int64)]
    if not lo <= pad_slot_id <= hi:
        what = f"the range of the index dtype {idx_dtype[1]}" if idx_dtype else "int64"
        raise ValueError(f"pad_slot_id: expected a value within {what} [{lo}, {hi}], got "
                         f"{pad_slot_id}")
    if sbi is None and nb > S:
        raise ValueError(f"state: without state_batch_indices the cache needs at least batch={nb} "
                         f"slots, got {S}")
    if nacc is not None:
        if sbi is None or sbi.ndim != 2:
            raise ValueError("num_accepted_tokens: requires a 2-D state_batch_indices, got "
                             + ("None" if sbi is None else f"shape {tuple(sbi.shape)}"))
        _check_dtype("num_accepted_tokens", nacc, INDEX_DTYPES)
        _check_shape("num_accepted_tokens", nacc, (nb,))

    # ---- int16 scales ----
    scale_shape = None
    if state.dtype == np.int16:
        if state_scale is None:
            raise ValueError("state_scale: required for an int16 state, got None")
        _check_dtype("state_scale", state_scale, (jnp.float32,))
        want = (S, H, P) if heads else (S, P)
        _check_shape("state_scale", state_scale, want, want + (1,))
        scale_shape = tuple(state_scale.shape)
    elif state_scale is not None:
        raise ValueError(f"state_scale: only allowed with an int16 state, got state dtype {state.dtype}")

    # ---- intermediate buffer ----
    inter_shape = inter_scales_shape = None
    max_len = cache_steps if cache_steps > 0 else None  # None: no limit
    if inter is not None:
        if dst is not None:
            raise ValueError("dst_state_batch_indices: cannot be combined with "
                             "intermediate_states_buffer (choose one write mode)")
        _check_dtype("intermediate_states_buffer", inter, (state.dtype,))
        if inter.ndim != (5 if heads else 4) or tuple(inter.shape[2:]) != tuple(state.shape[1:]):
            want = ("I", "cache_steps") + tuple(state.shape[1:])
            raise ValueError(f"intermediate_states_buffer: expected shape {want}, got {tuple(inter.shape)}")
        I, CS = inter.shape[:2]
        if CS == 0:
            raise ValueError("intermediate_states_buffer: expected a step axis (axis 1) of at least "
                             f"1, got shape {tuple(inter.shape)}")
        if cache_steps not in (0, CS):
            raise ValueError(f"cache_steps: expected 0 or the buffer's step axis {CS}, got {cache_steps}")
        max_len = CS
        if inter_idx is None and nb > I:
            raise ValueError(f"intermediate_states_buffer: without intermediate_state_indices it "
                             f"needs at least batch={nb} rows, got {I}")
        if inter_idx is not None:
            _check_shape("intermediate_state_indices", inter_idx, (nb,))
        inter_shape = tuple(inter.shape)
        if state.dtype == np.int16:
            if inter_scales is None:
                raise ValueError("intermediate_state_scales: required for an int16 "
                                 "intermediate_states_buffer, got None")
            _check_dtype("intermediate_state_scales", inter_scales, (jnp.float32,))
            _check_shape("intermediate_state_scales", inter_scales, (I, CS) + tuple(hp))
            inter_scales_shape = tuple(inter_scales.shape)
        elif inter_scales is not None:
            raise ValueError("intermediate_state_scales: only allowed with an int16 buffer, got "
                             f"buffer dtype {inter.dtype}")
    else:
        for name, arr in (("intermediate_state_indices", inter_idx),
                          ("intermediate_state_scales", inter_scales)):
            if arr is not None:
                raise ValueError(f"{name}: given without intermediate_states_buffer")
    if mode == "mtp" and max_len and T > max_len:
        raise ValueError(f"x: T={T} steps exceed cache_steps={max_len}")

    # ---- stochastic rounding ----
    seed = None
    if rand_seed is not None:
        if state.dtype not in (np.float16, jnp.bfloat16):
            raise ValueError(f"rand_seed: stochastic rounding expected a float16 or bfloat16 "
                             f"state, got state dtype {state.dtype}")
        seed = seed_words("rand_seed", rand_seed)

    # ---- canonical layout ----
    canon_lead = (nb, T) if mode == "stp" else lead
    x_shape = tuple(x.shape)
    xc = x.reshape(canon_lead + (H, P))
    if dt_elem:
        dtc = dt.reshape(canon_lead + (H, P))
    else:
        dtc = dt.reshape(canon_lead + (H,))
    Bc, Cc = (a.reshape(canon_lead + (G, N)) for a in (B, C))
    zc = None if z is None else z.reshape(xc.shape)
    A32 = A.astype(jnp.float32)
    Ac = A32.reshape(H, P, N) if A_elem else A32
    Dc = None if D is None else D.reshape((H, P) if (D.ndim == 2 or not heads) else (H,))
    bc = None if dt_bias is None else dt_bias.reshape(
        (H, P) if (dt_bias.ndim == 2 or not heads) else (H,))
    return Problem(
        state=state, x=xc, dt=dtc, A=Ac, B=Bc, C=Cc, D=Dc, z=zc, dt_bias=bc,
        sbi=sbi, dst=dst, state_scale=state_scale, out=out, inter=inter, inter_idx=inter_idx,
        inter_scales=inter_scales, cu_seqlens=cu, nacc=nacc, seed=seed, pad_slot_id=pad_slot_id,
        dt_softplus=dt_softplus, disable_state_update=disable_state_update,
        philox_rounds=philox_rounds, cache_steps=max_len, algorithm=algorithm, dims=(S, H, P, N),
        mode=mode, nb=nb, T=T,
        x_shape=x_shape, state_shape=tuple(state.shape), scale_shape=scale_shape,
        inter_shape=inter_shape, inter_scales_shape=inter_scales_shape)

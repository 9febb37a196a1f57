"""Trace-time validation of selective_state_update's arguments (docs/shapes.md, docs/errors.md) and their
normalisation into the canonical layout both the FFI kernels and the reference run on:

    state (S, H, P, N); x, z, out (nb, T, H, P) or varlen (TT, H, P); dt like x or without P;
    A float32 (H,) or (H, P, N); B, C (..., G, N); D, dt_bias (H,) or (H, P);
    state_batch_indices, dst_state_batch_indices (nb,) or (nb, K); state_scale (S, H, P);
    intermediate buffer (I, CS, H, P, N) + scales (I, CS, H, P); rand_seed uint32 (2,).

In steps: one validation function per argument group, then `canonicalise`, which returns the
Problem plus a Restore that maps results back to the caller's shapes; `public_function` holds
the one definition of the public signature.

Inputs are only reshaped (free in XLA). The aliased buffers (state, state_scale, out and the
intermediate buffers) keep the caller's shapes: XLA inserts copies when an aliased operand is a
reshape (e.g. with an inserted size-1 head axis) of a donated parameter, so consumers must use
`dims` (S, H, P, N) rather than the rank of these arrays.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import operator
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import _contract, _doc

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
    if isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name}: expected an array or None, got bool {v!r} (flags such as "
                        "dt_softplus and disable_state_update are passed by keyword)")
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


@dataclasses.dataclass(frozen=True)
class Settings:
    """The static (compile-time) settings of a call, validated."""
    pad_slot_id: int
    dt_softplus: bool
    disable_state_update: bool
    philox_rounds: int
    cache_steps: Optional[int]  # longest allowed sequence: cache_steps or the buffer's step axis
    algorithm: str


@dataclasses.dataclass
class Problem:
    """The canonical problem both the kernels and the reference run on: the operands (named as
    the public arguments; absent ones None), the settings, and the canonical sizes."""
    state: Any
    x: Any
    dt: Any
    A: Any
    B: Any
    C: Any
    D: Any
    z: Any
    dt_bias: Any
    state_batch_indices: Any
    dst_state_batch_indices: Any
    state_scale: Any
    out: Any
    intermediate_states_buffer: Any
    intermediate_state_indices: Any
    intermediate_state_scales: Any
    cu_seqlens: Any
    num_accepted_tokens: Any
    rand_seed: Any
    settings: Settings
    dims: tuple          # canonical (S, H, P, N) of the state
    mode: str            # "stp" | "mtp" | "varlen"
    nb: int              # entries (batch rows or sequences)
    T: int               # steps per entry (0 in varlen)

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


@dataclasses.dataclass(frozen=True)
class Restore:
    """Maps canonical results back to the caller's shapes."""
    x_shape: tuple
    state_shape: tuple
    scale_shape: Optional[tuple]
    inter_shape: Optional[tuple]
    inter_scales_shape: Optional[tuple]

    def __call__(self, out, state, state_scale, inter, inter_scales) -> SSUResult:
        def shaped(a, shape):
            return None if shape is None else a.reshape(shape)
        return SSUResult(out.reshape(self.x_shape), state.reshape(self.state_shape),
                         shaped(state_scale, self.scale_shape), shaped(inter, self.inter_shape),
                         shaped(inter_scales, self.inter_scales_shape))


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


# ---- validation (docs/errors.md) ----
#
# Which argument an error names. Sizes and dtypes that several arguments share (the leading
# batch / step axes, H, P, N, the input dtype, the parameter dtype, the index dtype) are
# decided by a vote among the arguments that carry them: the most common value wins, a tie goes
# to the argument listed first (the state, then x, then the FlashInfer order). Each argument is
# then checked against the decided values in argument order, so one wrong argument is the one
# named, even when it is the state or x. Where only two arguments share a size (state and
# state_scale, B and C, the intermediate buffer and its scales) the first is the reference.

def _settings(pad_slot_id, dt_softplus, disable_state_update, philox_rounds, cache_steps,
              algorithm):
    """The static arguments (cache_steps as given; the buffer's step axis joins it later)."""
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
    pad_slot_id = _static_int("pad_slot_id", pad_slot_id)
    philox_rounds = _static_int("philox_rounds", philox_rounds)
    cache_steps = _static_int("cache_steps", cache_steps)
    if philox_rounds <= 0:
        raise ValueError(f"philox_rounds: expected a positive number of rounds, got {philox_rounds}")
    if cache_steps < 0:
        raise ValueError(f"cache_steps: expected >= 0, got {cache_steps}")
    return Settings(pad_slot_id, _static_bool("dt_softplus", dt_softplus),
                    _static_bool("disable_state_update", disable_state_update), philox_rounds,
                    cache_steps, algorithm)


def _vote(claims):
    """claims [(argument, value)] in priority order -> the most common value (ties: the one
    claimed first)."""
    counts = collections.Counter(v for _, v in claims)
    best = max(counts.values())
    return next(v for _, v in claims if counts[v] == best)


def _joined(names):
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _as_in(claims, value, exclude):
    """' as in x, A and D': the other arguments that carry the decided value."""
    names = [n for n, v in claims if v == value and n != exclude]
    return f" as in {_joined(names)}" if names else ""


def _one_dtype(group, claims, allowed, order=None):
    """Arguments that must share one dtype out of `allowed`: names the first one whose dtype is
    not allowed, else the first that differs from the majority."""
    for name, dt in claims:
        if not any(dt == np.dtype(d) for d in allowed):
            raise TypeError(f"{name}: expected dtype {_names(allowed)}, got {dt}")
    if not claims:
        return None
    agreed = _vote(order or claims)
    for name, dt in claims:
        if dt != agreed:
            raise TypeError(f"{name}: expected dtype {agreed}{_as_in(claims, agreed, name)} "
                            f"({group} share one dtype), got {dt}")
    return agreed


def _dtypes(a):
    """Every dtype rule (state, the input group, the parameter group, A, the index group)."""
    _check_dtype("state", a["state"], STATE_DTYPES)
    present = lambda names: [(n, a[n].dtype) for n in names if a[n] is not None]  # noqa: E731
    _one_dtype("x, B, C, z and out", present(("x", "B", "C", "z", "out")), FLOAT_DTYPES)
    params = present(("dt", "D", "dt_bias"))
    # a tie (dt and D differ, no dt_bias) goes to the one with x's dtype
    order = sorted(params, key=lambda c: c[1] != a["x"].dtype)
    _one_dtype("dt, D and dt_bias", params, FLOAT_DTYPES, order)
    if not jnp.issubdtype(a["A"].dtype, jnp.floating):
        raise TypeError(f"A: expected a floating dtype, got {a['A'].dtype}")
    _one_dtype("state_batch_indices, dst_state_batch_indices and intermediate_state_indices",
               present(("state_batch_indices", "dst_state_batch_indices",
                        "intermediate_state_indices")), INDEX_DTYPES)
    for name in ("cu_seqlens", "num_accepted_tokens"):
        if a[name] is not None:
            _check_dtype(name, a[name], INDEX_DTYPES)


@dataclasses.dataclass(frozen=True)
class _Shape:
    """What validation learns about the layout: state geometry and the call's mode."""
    S: int
    H: int
    P: int
    N: int
    heads: bool          # 4-D Mamba-2 state (else 3-D Mamba-1, H = 1)
    hp: tuple            # trailing axes of x in the caller's layout: (H, P) or (P,)
    mode: str = ""
    nb: int = 0
    T: int = 0
    lead: tuple = ()     # leading axes of x in the caller's layout


def _lead(arr, trailing):
    return tuple(arr.shape[:arr.ndim - trailing]) if arr.ndim >= trailing else None


def _geometry(a) -> _Shape:
    """Mamba-1 / Mamba-2 from the state's rank; the leading axes (hence the mode, b and T) and
    H, P, N by vote; then the state, x, dt, A, B, C, D, dt_bias, z and out checked against
    them, in that order."""
    state, x, dt, A, B, C, D, bias, cu = (a[n] for n in ("state", "x", "dt", "A", "B", "C", "D",
                                                          "dt_bias", "cu_seqlens"))
    if state.ndim not in (3, 4):
        raise ValueError(f"state: expected rank 4 (S, H, P, N) or rank 3 (S, P, N), got shape "
                         f"{tuple(state.shape)}")
    heads = state.ndim == 4
    k = 2 if heads else 1                       # (H, P) / (P,) after the leading axes of x
    per_token = [n for n in ("x", "B", "C", "z", "out") if a[n] is not None]
    lens = (1,) if cu is not None else (1, 2)   # (TT,) | (b,) or (b, T)
    leads = [(n, _lead(a[n], k)) for n in per_token]
    votes = [(n, v) for n, v in leads if v is not None and len(v) in lens]
    hp_names = "H, P" if heads else "P"
    if not votes:
        want = ("(total_tokens, " + hp_names + ")" if cu is not None else
                f"(b, {hp_names}) or (b, T, {hp_names})")
        raise ValueError(f"x: expected {want}{' with cu_seqlens' if cu is not None else ''} for "
                         f"a state of shape {tuple(state.shape)}, got {tuple(x.shape)}")
    lead = _vote(votes)
    nl = len(lead)

    # H, P, N: every argument of a valid rank claims the sizes it carries
    H_c, P_c, N_c = [], [], []
    def claim(name, arr, **axes):  # noqa: E306
        for key, axis in axes.items():
            {"H": H_c, "P": P_c, "N": N_c}[key].append((name, arr.shape[axis]))
    if heads:
        claim("state", state, H=1, P=2, N=3)
    else:
        claim("state", state, P=1, N=2)
    for n in ("x", "z", "out"):
        if a[n] is not None and a[n].ndim == nl + k:
            claim(n, a[n], **(dict(H=-2, P=-1) if heads else dict(P=-1)))
    if heads and dt.ndim == nl + 1:
        claim("dt", dt, H=-1)
    elif dt.ndim == nl + k:
        claim("dt", dt, **(dict(H=-2, P=-1) if heads else dict(P=-1)))
    if heads and A.ndim == 1:
        claim("A", A, H=0)
    elif heads and A.ndim == 3:
        claim("A", A, H=0, P=1, N=2)
    elif not heads and A.ndim == 2:
        claim("A", A, P=0, N=1)
    for n in ("B", "C"):
        if a[n].ndim == nl + (2 if heads else 1):
            claim(n, a[n], N=-1)
    for n, arr in (("D", D), ("dt_bias", bias)):
        if arr is not None and heads and arr.ndim in (1, 2):
            claim(n, arr, **(dict(H=0) if arr.ndim == 1 else dict(H=0, P=1)))
        elif arr is not None and not heads and arr.ndim == 1:
            claim(n, arr, P=0)
    # (argument, rank, the axis where its (H, P) / (P,) starts)
    for n, rank, i in (("state_scale", state.ndim - 1, 1),
                       ("intermediate_states_buffer", state.ndim + 1, 2),
                       ("intermediate_state_scales", state.ndim, 2)):
        arr = a[n]
        if arr is not None and arr.ndim == rank:
            claim(n, arr, **(dict(H=i, P=i + 1) if heads else dict(P=i)))
            if n == "intermediate_states_buffer":
                claim(n, arr, N=-1)
    H = _vote(H_c) if heads else 1
    P, N = _vote(P_c), _vote(N_c)
    hp = (H, P) if heads else (P,)
    S = state.shape[0]

    # the state
    want = (S,) + hp + (N,)
    if tuple(state.shape) != want:
        why = [f"{key} {v}{_as_in(c, v, 'state')}"
               for key, got, v, c in (("nheads", state.shape[1] if heads else 1, H, H_c),
                                      ("dim", state.shape[-2], P, P_c),
                                      ("dstate", state.shape[-1], N, N_c)) if got != v]
        raise ValueError(f"state: expected shape {want} ({'; '.join(why)}), got "
                         f"{tuple(state.shape)}")
    for axis, v in (("nheads (axis 1)", H), ("dim", P), ("dstate (last axis)", N)):
        if v == 0:
            raise ValueError(f"state: {axis} must be at least 1, got shape {tuple(state.shape)}")

    # x, then the mode
    if tuple(x.shape) != lead + hp:
        if cu is not None:
            raise ValueError(f"x: with cu_seqlens expected shape (total_tokens, "
                             f"{', '.join(map(str, hp))}) = {lead + hp}, got {tuple(x.shape)}")
        why = _as_in(votes, lead, "x")
        raise ValueError(f"x: expected shape {lead + hp}"
                         f"{f' (leading axes {lead}{why})' if why else ''}, got {tuple(x.shape)}")
    if cu is not None:
        if cu.ndim != 1 or cu.shape[0] < 1:
            raise ValueError(f"cu_seqlens: expected shape (num_seqs + 1,), got {tuple(cu.shape)}")
        # the number of sequences, by vote with the per-sequence index arrays
        seqs = [("cu_seqlens", cu.shape[0] - 1)] + [
            (n, a[n].shape[0]) for n in ("state_batch_indices", "dst_state_batch_indices",
                                         "intermediate_state_indices", "num_accepted_tokens")
            if a[n] is not None and a[n].ndim in (1, 2)]
        NS = _vote(seqs)
        if NS != cu.shape[0] - 1:
            raise ValueError(f"cu_seqlens: expected shape ({NS + 1},) ({NS} sequences"
                             f"{_as_in(seqs, NS, 'cu_seqlens')}), got {tuple(cu.shape)}")
        mode, nb, T = "varlen", NS, 0
    elif nl == 2:
        mode, nb, T = "mtp", lead[0], lead[1]
    else:
        mode, nb, T = "stp", lead[0], 1
    sh = _Shape(S, H, P, N, heads, hp, mode, nb, T, lead)

    # dt, A, B, C, D, dt_bias, z, out
    if heads:
        _check_shape("dt", dt, lead + hp, lead + (H,))
        _check_shape("A", A, (H,), (H, P, N))
    else:
        _check_shape("dt", dt, lead + hp)
        _check_shape("A", A, (P, N))
    for name in ("B", "C"):
        arr = a[name]
        if not heads:
            _check_shape(name, arr, lead + (N,))
            continue
        if arr.ndim != nl + 2 or tuple(arr.shape[:nl]) != lead or arr.shape[-1] != N:
            raise ValueError(f"{name}: expected shape {lead + ('G', N)}, got {tuple(arr.shape)}")
        G = arr.shape[-2]
        if G == 0:
            raise ValueError(f"{name}: ngroups (axis -2) must be at least 1, got shape "
                             f"{tuple(arr.shape)}")
        if H % G:
            raise ValueError(f"{name}: ngroups (axis -2) must divide nheads={H}, got "
                             f"ngroups={G} (shape {tuple(arr.shape)})")
    if C.shape != B.shape:
        raise ValueError(f"C: expected the shape of B {tuple(B.shape)} (B and C share ngroups), "
                         f"got {tuple(C.shape)}")
    for name, arr in (("D", D), ("dt_bias", bias)):
        if arr is not None:
            _check_shape(name, arr, *(((H,), (H, P)) if heads else ((P,),)))
    for name in ("z", "out"):
        if a[name] is not None:
            _check_shape(name, a[name], lead + hp)
    return sh


def _indices(sh: _Shape, st: Settings, sbi, dst, inter_idx, nacc):
    """Index arrays (their dtypes checked by _dtypes): widths, pad_slot_id in range,
    num_accepted_tokens' needs."""
    given = [arr for arr in (sbi, dst, inter_idx) if arr is not None]
    idx_dtype = given[0].dtype if given else None
    nb, T = sh.nb, sh.T
    for name, arr in (("state_batch_indices", sbi), ("dst_state_batch_indices", dst)):
        if arr is None:
            continue
        if arr.ndim not in (1, 2) or arr.shape[0] != nb:
            raise ValueError(f"{name}: expected shape ({nb},) or ({nb}, K), got {tuple(arr.shape)}")
        if arr.ndim == 2 and arr.shape[1] == 0:
            raise ValueError(f"{name}: a 2-D index array needs width K >= 1 (one column per "
                             f"step), got shape {tuple(arr.shape)}")
        if sh.mode == "mtp" and arr.ndim == 2 and arr.shape[1] < T:
            raise ValueError(f"{name}: expected a 2-D index array of width K >= T={T}, got "
                             f"shape {tuple(arr.shape)}")
    lo, hi = _INT_RANGE[np.dtype(idx_dtype if idx_dtype else np.int64)]
    if not lo <= st.pad_slot_id <= hi:
        what = f"the range of the index dtype {idx_dtype}" if idx_dtype else "int64"
        raise ValueError(f"pad_slot_id: expected a value within {what} [{lo}, {hi}], got "
                         f"{st.pad_slot_id}")
    if sbi is None and nb > sh.S:
        raise ValueError(f"state: without state_batch_indices the cache needs at least "
                         f"batch={nb} slots, got {sh.S}")
    if nacc is not None:
        if sbi is None or sbi.ndim != 2:
            raise ValueError("num_accepted_tokens: requires a 2-D state_batch_indices, got "
                             + ("None" if sbi is None else f"shape {tuple(sbi.shape)}"))
        _check_shape("num_accepted_tokens", nacc, (nb,))


def _state_scale(sh: _Shape, state, state_scale):
    """int16 states need float32 scales (S, H, P) (or with a trailing 1); others none."""
    if state.dtype == np.int16:
        if state_scale is None:
            raise ValueError("state_scale: required for an int16 state, got None")
        _check_dtype("state_scale", state_scale, (jnp.float32,))
        want = (sh.S, sh.H, sh.P) if sh.heads else (sh.S, sh.P)
        _check_shape("state_scale", state_scale, want, want + (1,))
    elif state_scale is not None:
        raise ValueError(f"state_scale: only allowed with an int16 state, got state dtype "
                         f"{state.dtype}")


def _intermediates(sh: _Shape, st: Settings, state, inter, inter_idx, inter_scales, dst):
    """The intermediate-state buffer and its indices / scales; returns the longest allowed
    sequence (cache_steps or the buffer's step axis; None: no limit)."""
    max_len = st.cache_steps if st.cache_steps > 0 else None
    if inter is None:
        for name, arr in (("intermediate_state_indices", inter_idx),
                          ("intermediate_state_scales", inter_scales)):
            if arr is not None:
                raise ValueError(f"{name}: given without intermediate_states_buffer")
        return max_len
    if dst is not None:
        raise ValueError("dst_state_batch_indices: cannot be combined with "
                         "intermediate_states_buffer (choose one write mode)")
    _check_dtype("intermediate_states_buffer", inter, (state.dtype,))
    if inter.ndim != (5 if sh.heads else 4) or tuple(inter.shape[2:]) != tuple(state.shape[1:]):
        want = ("I", "cache_steps") + tuple(state.shape[1:])
        raise ValueError(f"intermediate_states_buffer: expected shape {want}, got "
                         f"{tuple(inter.shape)}")
    I, CS = inter.shape[:2]
    if CS == 0:
        raise ValueError("intermediate_states_buffer: expected a step axis (axis 1) of at "
                         f"least 1, got shape {tuple(inter.shape)}")
    if st.cache_steps not in (0, CS):
        raise ValueError(f"cache_steps: expected 0 or the buffer's step axis {CS}, got "
                         f"{st.cache_steps}")
    if inter_idx is None and sh.nb > I:
        raise ValueError(f"intermediate_states_buffer: without intermediate_state_indices it "
                         f"needs at least batch={sh.nb} rows, got {I}")
    if inter_idx is not None:
        _check_shape("intermediate_state_indices", inter_idx, (sh.nb,))
    if state.dtype == np.int16:
        if inter_scales is None:
            raise ValueError("intermediate_state_scales: required for an int16 "
                             "intermediate_states_buffer, got None")
        _check_dtype("intermediate_state_scales", inter_scales, (jnp.float32,))
        _check_shape("intermediate_state_scales", inter_scales, (I, CS) + tuple(sh.hp))
    elif inter_scales is not None:
        raise ValueError("intermediate_state_scales: only allowed with an int16 buffer, got "
                         f"buffer dtype {inter.dtype}")
    return CS


def _rand_seed(state, rand_seed):
    if rand_seed is None:
        return None
    if state.dtype not in (np.float16, jnp.bfloat16):
        raise ValueError(f"rand_seed: stochastic rounding expected a float16 or bfloat16 "
                         f"state, got state dtype {state.dtype}")
    return seed_words("rand_seed", rand_seed)


# ---- canonical layout ----

def canonicalise(sh: _Shape, st: Settings, a: dict):
    """(Problem, Restore) from validated arguments `a` (public names -> arrays or None).
    Inputs are only reshaped (free in XLA); the aliased buffers keep the caller's shapes."""
    H, P, N = sh.H, sh.P, sh.N
    lead = (sh.nb, sh.T) if sh.mode == "stp" else sh.lead
    x, dt, A, D, bias = a["x"], a["dt"], a["A"], a["D"], a["dt_bias"]
    G = a["B"].shape[-2] if sh.heads else 1
    per_elem = lambda v: v.ndim == 2 or not sh.heads  # noqa: E731 - D / dt_bias (H, P)
    A32 = A.astype(jnp.float32)
    canon = dict(a,
                 x=x.reshape(lead + (H, P)),
                 dt=dt.reshape(lead + ((H, P) if dt.shape == x.shape else (H,))),
                 B=a["B"].reshape(lead + (G, N)), C=a["C"].reshape(lead + (G, N)),
                 z=None if a["z"] is None else a["z"].reshape(lead + (H, P)),
                 A=A32 if A.ndim == 1 else A32.reshape(H, P, N),
                 D=None if D is None else D.reshape((H, P) if per_elem(D) else (H,)),
                 dt_bias=None if bias is None else bias.reshape((H, P) if per_elem(bias) else (H,)))
    pb = Problem(**canon, settings=st, dims=(sh.S, H, P, N), mode=sh.mode, nb=sh.nb, T=sh.T)
    shape = lambda v: None if v is None else tuple(v.shape)  # noqa: E731
    restore = Restore(tuple(x.shape), tuple(a["state"].shape), shape(a["state_scale"]),
                      shape(a["intermediate_states_buffer"]), shape(a["intermediate_state_scales"]))
    return pb, restore


_ARRAYS = tuple(n for n in _contract.OPERANDS if n != "rand_seed")  # rand_seed: seed_words


def build_problem(**args):
    """Validates the public arguments (by name, as in SIGNATURE) and returns (Problem, Restore)."""
    st = _settings(**{name: args[name] for name, _ in _contract.SETTINGS})
    for name in _contract.REQUIRED:
        _required(name, args[name])
    a = {name: _as_array(name, args[name]) for name in _ARRAYS}
    _dtypes(a)
    sh = _geometry(a)
    _indices(sh, st, a["state_batch_indices"], a["dst_state_batch_indices"],
             a["intermediate_state_indices"], a["num_accepted_tokens"])
    _state_scale(sh, a["state"], a["state_scale"])
    max_len = _intermediates(sh, st, a["state"], a["intermediate_states_buffer"],
                             a["intermediate_state_indices"], a["intermediate_state_scales"],
                             a["dst_state_batch_indices"])
    if sh.mode == "mtp" and max_len and sh.T > max_len:
        raise ValueError(f"x: T={sh.T} steps exceed cache_steps={max_len}")
    a["rand_seed"] = _rand_seed(a["state"], args["rand_seed"])
    return canonicalise(sh, dataclasses.replace(st, cache_steps=max_len), a)


# The public signature (names, order, defaults) of selective_state_update, its reference and
# its checked variant: written once, in `public_function`. None marks a required argument.
def selective_state_update(  # named so that a bad call's TypeError names the function
    state, x, dt, A, B, C, D, z=None, dt_bias=None, dt_softplus=False,
    state_batch_indices=None, pad_slot_id=-1, state_scale=None, out=None,
    disable_state_update=False, intermediate_states_buffer=None,
    intermediate_state_indices=None, intermediate_state_scales=None,
    rand_seed=None, philox_rounds=10, cache_steps=0, algorithm="auto",
    dst_state_batch_indices=None, cu_seqlens=None, num_accepted_tokens=None,
):
    return dict(locals())


_signature_template = selective_state_update
del selective_state_update

SIGNATURE = tuple((name, None if p.default is inspect.Parameter.empty else p.default)
                  for name, p in inspect.signature(_signature_template).parameters.items())


_POSITIONAL_ONLY_USUAL = 7  # state, x, dt, A, B, C, D: the arguments usually passed by position


def _positional_note(e, n_positional):
    """The error again, saying so when the argument it names was passed by position beyond D
    (a shifted positional argument, e.g. a flag, lands in z or dt_bias); None otherwise."""
    msg = str(e)
    names = [n for n, _ in SIGNATURE[_POSITIONAL_ONLY_USUAL:n_positional]]
    for i, name in enumerate(names, _POSITIONAL_ONLY_USUAL + 1):
        if msg.startswith(name + ":"):
            return type(e)(f"{name} (passed as positional argument {i}; arguments after D are "
                           f"best passed by keyword):{msg[len(name) + 1:]}")
    return None


def public_function(run, module, doc):
    """The public function: THE signature, validation and canonicalisation, then
    `run(problem, restore)`; its docstring is `doc` followed by the documentation of every
    argument (_doc.ARGUMENTS)."""
    @functools.wraps(_signature_template)
    def selective_state_update(*args, **kwargs):
        try:
            pb, restore = build_problem(**_signature_template(*args, **kwargs))
        except (TypeError, ValueError) as e:
            named = _positional_note(e, len(args))
            if named is None:
                raise
            raise named from None
        return run(pb, restore)

    selective_state_update.__module__ = module
    selective_state_update.__qualname__ = selective_state_update.__name__ = "selective_state_update"
    selective_state_update.__doc__ = doc.rstrip() + "\n\n" + _doc.ARGUMENTS
    selective_state_update.__annotations__ = {"return": SSUResult}
    return selective_state_update

"""Pure-jnp selective_state_update with the semantics of docs/semantics.md: the test oracle
and a portable fallback (TPU, debugging). Same signature and result as jax_mamba.selective_state_update;
it runs on any backend and under jit, but materialises per-step temporaries (it is not fast)."""
from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
from jax import lax

from ._problem import Problem, public_function

_U32 = jnp.uint32


def _u32(v):
    return jnp.asarray(v, _U32)


def _mulhilo(a, b):
    """(high, low) 32-bit words of the 64-bit product of uint32 a and constant b, without x64."""
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = _u32(b & 0xFFFF), _u32(b >> 16)
    ll, lh, hl, hh = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    hi = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)
    return hi, a * _u32(b)


def philox4x32(c0, c1, c2, c3, k0, k1, rounds):
    for _ in range(rounds):
        hi_a, lo_a = _mulhilo(c2, 0xCD9E8D57)
        hi_b, lo_b = _mulhilo(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi_a ^ c1 ^ k0, lo_a, hi_b ^ c3 ^ k1, lo_b
        k0, k1 = k0 + _u32(0x9E3779B9), k1 + _u32(0xBB67AE85)
    return c0, c1, c2, c3


def sr_bits(elem, t, kind, seed, rounds):
    """16 random bits of each element (int32/64 linear index `elem` in its destination buffer) at
    step t, as in ffi/ssu_math.h (sr_block, sr_half): one Philox call per 8 consecutive elements
    (counter (elem // 8, t, kind)); element e takes the 16-bit half e % 8 of its output, word
    (e % 8) // 2, the low half for even e and the high half for odd."""
    g = elem >> 3
    lo = g.astype(_U32)
    hi = (g >> 32).astype(_U32) if g.dtype.itemsize == 8 else jnp.zeros_like(lo)
    r = philox4x32(lo, hi, jnp.broadcast_to(_u32(t), lo.shape), jnp.full(lo.shape, kind, _U32),
                   seed[0], seed[1], rounds)
    k = ((elem & 7) >> 1).astype(jnp.int32)
    w = jnp.where(k == 0, r[0], jnp.where(k == 1, r[1], jnp.where(k == 2, r[2], r[3])))
    return (w >> ((elem & 1) * 16).astype(_U32)) & 0xFFFF


def _to_bf16_sr(v, rnd):
    u = lax.bitcast_convert_type(v, _U32)
    special = (u & 0x7F800000) == 0x7F800000
    r = lax.bitcast_convert_type(((u + (rnd & 0xFFFF)) >> 16).astype(jnp.uint16), jnp.bfloat16)
    return jnp.where(special, v.astype(jnp.bfloat16), r)


def _to_f16_sr(v, rnd):
    u = lax.bitcast_convert_type(v, _U32)
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    r = (a + ((rnd & 0xFFFF) >> 3)) & ~_u32(0x1FFF)  # the top 13 of the 16 bits
    normal = jnp.where(r >= 0x47800000, _u32(0x7C00), (r - 0x38000000) >> 13)
    q = lax.bitcast_convert_type(a, jnp.float32) * 16777216.0
    fl = jnp.floor(q)
    # subnormal: up when (r + 1/2) / 2^16 < the fraction (exact in fp32)
    up = ((rnd & 0xFFFF).astype(jnp.float32) + 0.5) * 1.52587890625e-05 < q - fl
    sub = fl.astype(_U32) + up.astype(_U32)
    bits = (sign | jnp.where(a >= 0x38800000, normal, sub)).astype(jnp.uint16)
    out = lax.bitcast_convert_type(bits, jnp.float16)
    return jnp.where(a >= 0x7F800000, v.astype(jnp.float16), out)


def _encode(pb: Problem, s, elem0, t, kind):
    """fp32 rows s (..., N) -> (stored values, scales or None). elem0: linear index of each row's
    first element in the destination buffer (for stochastic rounding)."""
    dtype = pb.state.dtype
    if dtype == jnp.int16:
        amax = jnp.max(jnp.abs(s), axis=-1)
        scale = jnp.where(amax > 0, amax / 32767.0, 1.0)
        q = jnp.rint(jnp.clip(s / scale[..., None], -32767.0, 32767.0)).astype(jnp.int16)
        return q, scale
    if pb.rand_seed is None or dtype == jnp.float32:
        return s.astype(dtype), None
    elem = elem0[..., None] + jnp.arange(pb.N, dtype=elem0.dtype)
    rnd = sr_bits(elem, t, kind, pb.rand_seed, pb.settings.philox_rounds)
    return (_to_bf16_sr(s, rnd) if dtype == jnp.bfloat16 else _to_f16_sr(s, rnd)), None


def _resolve(pb: Problem):
    """Vectorised ssu::resolve_entry: per entry (row0, len, src, padded, ii, to_inter, ok, ...)
    and, in `faults`, one boolean array per kind of invalid runtime data (jax_mamba.checked
    reports them). Index values are caller data (any value of their dtype): what happens is
    decided by flags (padded, to_inter, ok), never by giving some index value a meaning."""
    nb, S, pad = pb.nb, pb.S, pb.settings.pad_slot_id
    rows = pb.x.shape[0] * (pb.T if pb.mode != "varlen" else 1)
    b = jnp.arange(nb)
    faults = {}
    ok_bounds = jnp.ones((nb,), bool)
    if pb.mode == "varlen":
        cu = pb.cu_seqlens.astype(jnp.int64 if pb.cu_seqlens.dtype == jnp.int64 else jnp.int32)
        a, z = cu[:-1], cu[1:]
        # rows each sequence owns; sequences whose owned rows meet are both invalid
        # (docs/semantics.md, "Varlen bounds")
        lo = jnp.clip(a, 0, rows)
        hi = jnp.where(z >= a, jnp.clip(z, 0, rows), lo)
        full = lo < hi
        meet = (full[:, None] & full[None, :] & (lo[:, None] < hi[None, :])
                & (lo[None, :] < hi[:, None]) & ~jnp.eye(nb, dtype=bool))
        faults["cu_seqlens: bounds negative, decreasing or beyond the token count"] = ~(
            (a >= 0) & (z >= a) & (z <= rows))
        faults["cu_seqlens: sequence shares rows with another sequence"] = jnp.any(meet, axis=1)
        ok_bounds = ~functools.reduce(jnp.logical_or, faults.values())
        row0, length = a, jnp.where(ok_bounds, z - a, 0)
        bad_lo, bad_hi = lo, hi
    else:
        row0, length = b * pb.T, jnp.full((nb,), pb.T)
        bad_lo = bad_hi = row0
    if pb.settings.cache_steps is not None:
        faults["sequence longer than cache_steps"] = length > pb.settings.cache_steps
    for name in ("state_batch_indices", "dst_state_batch_indices"):
        idx = getattr(pb, name)
        if idx is not None and idx.ndim == 2:
            faults[f"sequence longer than the width of {name}"] = length > idx.shape[1]
    padded = jnp.zeros((nb,), bool)
    src = b
    if pb.state_batch_indices is not None:
        K = pb.state_batch_indices.shape[1] if pb.state_batch_indices.ndim == 2 else 1
        col = jnp.zeros((nb,), jnp.int32)
        if pb.num_accepted_tokens is not None:
            na = pb.num_accepted_tokens
            faults["num_accepted_tokens outside [0, K]"] = ~((na >= 0) & (na <= K))
            # column na - 1 (0 when na <= 1), formed without overflow for any value (an
            # entry with na outside [0, K] is invalid: its column is never used)
            col = jnp.clip(jnp.where(na > 1, na, 1), 1, K) - 1
        table = pb.state_batch_indices.reshape(nb, K)
        v = jnp.take_along_axis(table, col.astype(jnp.int32)[:, None], axis=1)[:, 0]
        padded = v == pad
        faults["state_batch_indices: slot outside [0, S) and not pad_slot_id"] = ~(
            padded | ((v >= 0) & (v < S)))
        src = v
    ii, to_inter = b, jnp.zeros((nb,), bool)  # the row written is ii where to_inter
    if pb.intermediate_states_buffer is not None:
        I = pb.intermediate_states_buffer.shape[0]
        cand = pb.intermediate_state_indices if pb.intermediate_state_indices is not None else b
        skip = (cand == pad) if pb.intermediate_state_indices is not None else jnp.zeros((nb,), bool)
        faults["intermediate_state_indices: row outside [0, I) and not pad_slot_id"] = ~(
            padded | skip | ((cand >= 0) & (cand < I)))
        ii, to_inter = cand, ~(padded | skip)
    e = dict(row0=row0, len=length, src=src, padded=padded, ii=ii, to_inter=to_inter,
             ok_bounds=ok_bounds, bad_lo=bad_lo, bad_hi=bad_hi, rows=rows)
    if pb.dst_state_batch_indices is not None and not pb.settings.disable_state_update:
        faults["dst_state_batch_indices: slot outside [0, S) and not pad_slot_id"] = _dst_bad(pb, e)
    # a zero-length sequence reads and writes nothing, so nothing about it is checked
    # beyond its bounds (as in ssu::resolve_entry)
    empty = length == 0
    for k in faults:
        if not k.startswith("cu_seqlens"):
            faults[k] = faults[k] & ~empty
    e["faults"] = faults
    e["ok"] = ~functools.reduce(jnp.logical_or, faults.values(), jnp.zeros((nb,), bool))
    return e


def _dst_bad(pb: Problem, e):
    """Entries that would write a dst slot outside [0, S) at a step they run."""
    bad = jnp.zeros((pb.nb,), bool)
    steps = pb.dst_state_batch_indices.shape[1] if pb.dst_state_batch_indices.ndim == 2 else 1
    for t in range(steps):
        tt = t if pb.dst_state_batch_indices.ndim == 2 else e["len"] - 1
        raw, happens = _state_write(pb, e, tt)
        used = happens & (tt < e["len"]) & (tt >= 0)
        bad |= used & ~((raw >= 0) & (raw < pb.S))
    return bad


def _state_write(pb: Problem, e, t):
    """Raw index written after step t (per entry) and whether a write happens."""
    last = t == e["len"] - 1
    if pb.dst_state_batch_indices is not None:
        if pb.dst_state_batch_indices.ndim == 2:
            raw = pb.dst_state_batch_indices[:, jnp.minimum(t, pb.dst_state_batch_indices.shape[1] - 1)]
            happens = t < e["len"]
        else:
            raw, happens = pb.dst_state_batch_indices, last
        happens = happens & (raw != pb.settings.pad_slot_id)
    else:
        raw, happens = e["src"], last
    happens = happens & ~e["padded"] & (not pb.settings.disable_state_update)
    return raw, happens


def _run(pb: Problem):
    """Canonical results (out, state, state_scale, intermediates, their scales) of pb."""
    # NumPy operands as jax arrays (as the kernel call converts them): the step loop indexes
    # them with traced rows
    pb = dataclasses.replace(pb, **{f.name: jnp.asarray(getattr(pb, f.name))
                                    for f in dataclasses.fields(pb)
                                    if isinstance(getattr(pb, f.name), np.ndarray)})
    H, P, N, G, nb, S = pb.H, pb.P, pb.N, pb.G, pb.nb, pb.S
    e = _resolve(pb)
    rows = e["rows"]
    if pb.mode == "varlen":
        widths = [i.shape[1] for i in (pb.state_batch_indices, pb.dst_state_batch_indices)
                  if i is not None and i.ndim == 2]
        cs = pb.settings.cache_steps
        steps = cs if cs is not None else min([rows] + widths)
    else:
        steps = pb.T
    x = pb.x.reshape((rows, H, P))
    dt = pb.dt.reshape((rows,) + pb.dt.shape[(1 if pb.mode == "varlen" else 2):])
    Bm, Cm = (a.reshape(rows, G, N) for a in (pb.B, pb.C))
    z = None if pb.z is None else pb.z.reshape(rows, H, P)

    ok = e["ok"]
    valid = ok & (e["len"] > 0)
    state = pb.state.reshape(S, H, P, N)
    scale = None if pb.state_scale is None else pb.state_scale.reshape(S, H, P)
    inter = iscale = None
    if pb.intermediate_states_buffer is not None:
        I, CS = pb.intermediate_states_buffer.shape[:2]
        inter = pb.intermediate_states_buffer.reshape(I, CS, H, P, N)
        iscale = None if pb.intermediate_state_scales is None else pb.intermediate_state_scales.reshape(I, CS, H, P)
    src = jnp.clip(e["src"], 0, S - 1)
    s = state[src].astype(jnp.float32)
    if scale is not None:
        s = s * scale[src][..., None]
    s = jnp.where((e["padded"] | ~valid)[:, None, None, None], 0.0, s)

    A = pb.A.astype(jnp.float32)
    A_b = A[:, None, None] if A.ndim == 1 else A  # (H,1,1) or (H,P,N)
    f32 = lambda a: None if a is None else a.astype(jnp.float32)
    D, bias = f32(pb.D), f32(pb.dt_bias)
    if D is not None and D.ndim == 1:
        D = D[:, None]
    if bias is not None and bias.ndim == 1:
        bias = bias[:, None]
    heads_per_group = H // G

    out = jnp.zeros((rows, H, P), pb.x.dtype)
    carry = (s, state, scale, inter, iscale, out)

    def step(carry, t):
        s, state, scale, inter, iscale, out = carry
        active = valid & (t < e["len"])
        row = jnp.clip(e["row0"] + t, 0, rows - 1)
        xv = x[row].astype(jnp.float32)                              # (nb,H,P)
        d = dt[row].astype(jnp.float32)
        d = d[..., None] if d.ndim == 2 else d                       # (nb,H,1|P)
        if bias is not None:
            d = d + bias
        if pb.settings.dt_softplus:
            d = jnp.where(d <= 20.0, jnp.log1p(jnp.exp(d)), d)
        Bv = jnp.repeat(Bm[row].astype(jnp.float32), heads_per_group, axis=1)  # (nb,H,N)
        Cv = jnp.repeat(Cm[row].astype(jnp.float32), heads_per_group, axis=1)
        dA = jnp.exp(A_b * d[..., None])
        new = s * dA + (Bv[:, :, None, :] * d[..., None]) * xv[..., None]
        y = jnp.sum(new * Cv[:, :, None, :], axis=-1)
        if D is not None:
            y = y + D * xv
        if z is not None:
            zv = z[row].astype(jnp.float32)
            y = y * (zv / (1.0 + jnp.exp(-zv)))
        s = jnp.where(active[:, None, None, None], new, s)
        out = out.at[jnp.where(active, row, rows)].set(y.astype(out.dtype), mode="drop")

        raw, happens = _state_write(pb, e, t)
        slot = jnp.where(active & happens, raw, S)
        elem0 = ((slot.astype(jnp.int64 if raw.dtype == jnp.int64 else jnp.int32)[:, None, None] * H
                  + jnp.arange(H)[:, None]) * P + jnp.arange(P)) * N
        vals, sc = _encode(pb, s, elem0, t, 0)
        state = state.at[slot].set(vals, mode="drop")
        if sc is not None:
            scale = scale.at[slot].set(sc, mode="drop")
        if inter is not None:
            I, CS = inter.shape[:2]
            irow = jnp.where(active & e["to_inter"], e["ii"], I)  # I: dropped
            flat = irow * CS + t
            elem0 = ((flat[:, None, None] * H + jnp.arange(H)[:, None]) * P + jnp.arange(P)) * N
            vals, sc = _encode(pb, s, elem0, t, 1)
            inter = inter.at[irow, t].set(vals, mode="drop")
            if sc is not None:
                iscale = iscale.at[irow, t].set(sc, mode="drop")
        return (s, state, scale, inter, iscale, out), None

    if steps and rows and nb:  # nothing to compute on empty batches (and nothing to gather)
        carry, _ = lax.scan(step, carry, jnp.arange(steps))
    _, state, scale, inter, iscale, out = carry

    # invalid entries: NaN over their rows
    lo = jnp.where(e["ok_bounds"], e["row0"], e["bad_lo"])
    hi = jnp.where(e["ok_bounds"], e["row0"] + e["len"], e["bad_hi"])
    r = jnp.arange(rows)[:, None]
    bad = jnp.any((~ok)[None, :] & (r >= lo[None, :]) & (r < hi[None, :]), axis=1)
    out = jnp.where(bad[:, None, None], jnp.nan, out).astype(pb.x.dtype)
    return out, state, scale, inter, iscale


selective_state_update = public_function(
    lambda pb, restore: restore(*_run(pb)), __name__,
    """Pure-jnp twin of :func:`jax_mamba.selective_state_update` (same arguments and result).""")

"""SPMD partitioning rule of the jax_mamba_ssu call: under jax.jit with a sharded state cache
each device runs the kernel on its own shard (heads: tensor parallel; slots: data parallel)."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import _contract, _lowering, reference
from ._problem import Problem, Settings

# How it works (docs/sharding.md has the user's view).
#
# `call` wraps the bare FFI call in jax.experimental.custom_partitioning. On one device (and
# inside shard_map, where every axis is manual) JAX inlines the wrapped function, so the HLO
# is the bare custom call. On several devices the partitioner asks `_partition` for a plan:
#
#   * the state's sharding drives everything: its slot axis (0) and head axis (1) may be
#     sharded, its P and N axes are replicated (the partitioner gathers them if they were not:
#     correct, not fast);
#   * heads (any head mesh size that divides H, whatever G): every per-head operand and result
#     is split on H like the state; B and C are split on G when the head mesh size divides G
#     (each shard's heads are whole groups), otherwise B / C are replicated (per-entry, small)
#     and each shard picks the groups of its own heads out of them (`_pick_groups`: one group
#     when its heads lie in one group, one per run of heads when they straddle groups);
#   * slots: per-entry operands are replicated; every shard maps global slot indices to its
#     own (`_local_src`): an entry whose read slot lives on another shard is padded locally
#     (it is that shard's work), so the kernel runs every entry everywhere but updates only
#     the shard's own slots. Outputs are then combined (`_combine`): for each row of `out`
#     that a real (non-pad, in-range) entry owns, the owner's bits are taken through one
#     integer all-reduce of an out-sized array; rows where every shard computed the same
#     thing (pads, invalid entries, rows of no sequence) are kept as computed;
#   * writes that may land on another shard (dst slots; intermediate-buffer rows) are spilled
#     (`_spill_dst`, `_spill_inter`): the owner of the entry writes them into per-entry scratch
#     rows, one integer all-reduce of those rows (per-entry sized, never the cache) brings them
#     to every shard, and each shard scatters the rows that land on its own slots / buffer rows
#     (all of them for a buffer replicated on axis 0). Which rows are written is decided on the
#     global indices, as unsharded (`_entries`, the reference's ssu::resolve_entry). Without
#     dst (or under disable_state_update) and without an intermediate buffer nothing is
#     spilled: the kernel writes the read slot in place.
#
# Index values are caller data: any value of the index dtype may arrive, and none is given an
# internal meaning. Under slot sharding the local calls get index operands this rule builds:
# every global value is classified by comparisons (== pad_slot_id, in [0, S), on this shard)
# and re-encoded as a local index in range, LOCAL_PAD (the local calls' pad_slot_id) or
# LOCAL_BAD (out of range locally, so invalid); no global value passes through unclassified.
#
# The partitioned function works on the canonical operand tuple of _contract.frame and the
# call's attributes; it changes `pad_slot_id` (a local pad value), the index operands (and,
# where it has to supply explicit local indices, the matching has_<operand> flag) and, when
# it spills, puts the per-entry scratch in place of the state (dst) or of the intermediate
# buffer.

_NAMES = _contract.OPERANDS
_I = {name: i for i, name in enumerate(_NAMES)}
_RESULTS = _contract.RESULTS
_REQUIRED = set(_contract.REQUIRED)
_INDEX_OPERANDS = ("state_batch_indices", "dst_state_batch_indices", "intermediate_state_indices")

# Codes of the rule's own local index operands (never a caller's value, see above)
LOCAL_PAD = -1     # pad_slot_id of the shard-local calls (no local index is negative)
LOCAL_BAD = -2     # out of range for the local call and not LOCAL_PAD: the entry is invalid


def kernel(operands, results, aliases, attrs, plan):
    """The bare kernel call (what a single device runs): the jax_mamba_ssu primitive."""
    return _lowering.bind(operands, results, aliases, attrs, plan)


def replan(plan, **changes):
    """The planner request `plan` ((name, value) pairs) with some sizes changed."""
    return tuple((k, changes.get(k, v)) for k, v in plan)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Static facts of one call, read from the canonical operands and the attributes."""
    shapes: tuple
    dtypes: tuple
    present: tuple          # per operand
    res_shapes: tuple
    res_dtypes: tuple
    aliases: tuple          # sorted (operand index, result index)
    attrs: tuple            # sorted (name, value)
    plan: tuple             # the CUDA planner's request ((name, value) pairs)

    def has(self, name):
        return self.present[_I[name]]

    def shape(self, name):
        return self.shapes[_I[name]]

    @property
    def attr(self):
        return dict(self.attrs)

    @property
    def heads(self):
        return len(self.shape("state")) == 4

    @property
    def varlen(self):
        return self.has("cu_seqlens")

    @property
    def S(self):
        return self.shape("state")[0]

    @property
    def H(self):
        return self.shape("state")[1] if self.heads else 1

    @property
    def G(self):
        return self.shape("B")[-2]

    @property
    def nb(self):
        return self.shape("cu_seqlens")[0] - 1 if self.varlen else self.shape("x")[0]

    @property
    def T(self):
        return 1 if self.varlen else self.shape("x")[1]

    @property
    def index_dtype(self):
        """The dtype of the call's index operands (one for all of them), int32 without any."""
        return next((self.dtypes[_I[n]] for n in _INDEX_OPERANDS if self.has(n)),
                    np.dtype(np.int32))

    @property
    def rows(self):
        """Rows of `out` (entries x steps, or tokens in varlen)."""
        return self.shape("x")[0] * (1 if self.varlen else self.shape("x")[1])


def _layout(operands, results, aliases, attrs, plan):
    present = [name in _REQUIRED or bool(attrs[f"has_{name}"]) for name in _NAMES]
    return _Layout(
        shapes=tuple(tuple(a.shape) for a in operands),
        dtypes=tuple(np.dtype(a.dtype) for a in operands),
        present=tuple(present),
        res_shapes=tuple(tuple(r.shape) for r in results),
        res_dtypes=tuple(np.dtype(r.dtype) for r in results),
        aliases=tuple(sorted(aliases.items())),
        attrs=tuple(sorted(attrs.items())),
        plan=tuple(plan))


# ---------------------------------------------------------------- the plan (static)

@dataclasses.dataclass(frozen=True)
class _Plan:
    slot: tuple = ()         # mesh axes the slot axis is split over
    head: tuple = ()         # mesh axes the head axis is split over
    groups: str = ""         # "shard" (B/C split on G) | "pick" (B/C replicated, each shard
    #                          picks its heads' groups, _pick_groups) | "" (no head split)
    inter_slot: bool = False  # intermediate buffer split on axis 0 along `slot`
    arg_specs: tuple = ()
    res_specs: tuple = ()


def _axes(sharding, dim):
    if not isinstance(sharding, NamedSharding):
        return ()
    spec = tuple(sharding.spec)
    if dim >= len(spec) or spec[dim] is None:
        return ()
    e = spec[dim]
    return (e,) if isinstance(e, str) else tuple(e)


def _size(mesh, axes):
    return math.prod(mesh.shape[a] for a in axes)


def _entry(axes):
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def _plan(lay: _Layout, mesh, shardings) -> _Plan:
    st = shardings[_I["state"]]
    slot = _axes(st, 0)
    if slot and lay.S % _size(mesh, slot):
        slot = ()
    head = tuple(a for a in _axes(st, 1) if a not in slot) if lay.heads else ()
    groups = ""
    if head:
        mh = _size(mesh, head)
        if lay.H % mh:  # uneven heads per shard: not expressible, replicated (gathers)
            head = ()
        else:
            groups = "shard" if lay.G % mh == 0 else "pick"
    inter_slot = False
    if slot and lay.has("intermediate_states_buffer"):
        I = lay.shape("intermediate_states_buffer")[0]
        inter_slot = (_axes(shardings[_I["intermediate_states_buffer"]], 0) == slot
                      and I % _size(mesh, slot) == 0)
    h, s = _entry(head), _entry(slot)
    i0 = s if inter_slot else None

    def spec(name, shape, present):
        nd = len(shape)
        if not present:
            return (None,) * nd
        if name == "state":
            return (s, h, None, None) if lay.heads else (s, None, None)
        if name == "state_scale":
            return ((s, h) if lay.heads else (s,)) + (None,) * (nd - (2 if lay.heads else 1))
        if name == "intermediate_states_buffer":
            return (i0, None) + ((h,) if lay.heads else ()) + (None, None)
        if name == "intermediate_state_scales":
            return (i0, None) + ((h,) if lay.heads else ()) + (None,) * (nd - (3 if lay.heads else 2))
        if name in ("x", "z", "out"):  # head axis second to last (4-D state)
            return (None,) * (nd - 2) + ((h, None) if lay.heads else (None, None))
        if name == "dt":
            per_elem = nd == len(lay.shape("x"))
            return (None,) * (nd - 2) + ((h, None) if per_elem else (None, h))
        if name in ("A", "D", "dt_bias"):
            return (h,) + (None,) * (nd - 1)
        if name in ("B", "C"):
            return (None,) * (nd - 2) + ((h if groups == "shard" else None), None)
        return (None,) * nd  # indices, cu_seqlens, num_accepted_tokens, seed

    arg_specs = tuple(spec(n, sh, p) for n, sh, p in zip(_NAMES, lay.shapes, lay.present))
    res_specs = []
    for name, shape in zip(_RESULTS, lay.res_shapes):
        if name == "out":
            res_specs.append(spec("out", shape, True))
        else:
            res_specs.append(arg_specs[_I[name]] if lay.has(name) else (None,) * len(shape))
    return _Plan(slot=slot, head=head, groups=groups, inter_slot=inter_slot,
                 arg_specs=arg_specs, res_specs=tuple(res_specs))


def _tile(mesh, shape, spec):
    out = []
    for d, e in zip(shape, spec):
        axes = () if e is None else (e,) if isinstance(e, str) else tuple(e)
        out.append(d // _size(mesh, axes))
    return tuple(out)


# ---------------------------------------------------------------- the shard-local call

def _axis_index(mesh, axes):
    """Linear index of this shard along `axes` (major to minor, as in a PartitionSpec)."""
    i = jnp.int32(0)
    for a in axes:
        i = i * mesh.shape[a] + lax.axis_index(a)
    return i


def _local_src(v, pad, S, off, n, pad_aware=True):
    """Read slots: own -> local index; global pad -> local pad; another shard's -> local pad
    (its work, not ours); outside [0, S) -> invalid everywhere."""
    off = off.astype(v.dtype)
    mine = (v >= off) & (v < off + n)
    valid = (v >= 0) & (v < S)
    r = jnp.where(mine, v - off, jnp.where(valid, LOCAL_PAD, LOCAL_BAD))
    return jnp.where(v == pad, LOCAL_PAD, r).astype(v.dtype) if pad_aware else r.astype(v.dtype)


def _unused_dst(v, pad):
    """dst under disable_state_update: never written nor checked by the kernel; pads stay pads,
    everything else becomes a value that is no local slot."""
    return jnp.where(v == pad, LOCAL_PAD, LOCAL_BAD).astype(v.dtype)


def _read_slots(lay, ops):
    """Global read slot of each entry (as the kernel resolves it) and whether it is real."""
    nb, pad = lay.nb, lay.attr["pad_slot_id"]
    if not lay.has("state_batch_indices"):
        return jnp.arange(nb, dtype=jnp.int32), jnp.ones((nb,), bool)
    sbi = ops[_I["state_batch_indices"]]
    K = sbi.shape[1] if sbi.ndim == 2 else 1
    col = jnp.zeros((nb,), jnp.int32)
    if lay.has("num_accepted_tokens"):  # column na - 1 (0 for na <= 1), no overflow at any na
        na = ops[_I["num_accepted_tokens"]]
        col = (jnp.clip(jnp.where(na > 1, na, 1), 1, K) - 1).astype(jnp.int32)
    src = jnp.take_along_axis(sbi.reshape(nb, K), col[:, None], axis=1)[:, 0]
    return src, (src != pad) & (src >= 0) & (src < lay.S)


def _row_counts(lay, ops, weights):
    """Per row of `out`: how many of the entries with weight 1 own it."""
    w = weights.astype(jnp.int32)
    if not lay.varlen:
        return jnp.repeat(w, lay.T, total_repeat_length=lay.rows)
    cu = ops[_I["cu_seqlens"]]
    rows = lay.rows
    a, z = cu[:-1], cu[1:]
    lo = jnp.clip(a, 0, rows)
    hi = jnp.where(z >= a, jnp.clip(z, 0, rows), lo)
    d = jnp.zeros((rows + 1,), jnp.int32).at[lo].add(w).at[hi].add(-w)
    return jnp.cumsum(d)[:rows]


def _uint(dtype):
    return {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[np.dtype(dtype).itemsize]


def _combine(arr, R, n_all, n_mine, axes):
    """Rows (axis 0) owned by exactly one real entry take that entry's shard's bits (one
    integer all-reduce: exact for every value, NaN and -0 included); other rows are the same on
    every shard and stay as computed."""
    if R == 0 or arr.size == 0:
        return arr
    flat = arr.reshape(R, -1)
    bits = lax.bitcast_convert_type(flat, _uint(arr.dtype))
    wide = bits.astype(jnp.uint32) if bits.dtype.itemsize < 4 else bits
    one = (n_all == 1)[:, None]
    total = lax.psum(jnp.where(one & (n_mine == 1)[:, None], wide, 0), axes)
    bits = jnp.where(one, total.astype(bits.dtype), bits)
    return lax.bitcast_convert_type(bits, arr.dtype).reshape(arr.shape)


def _exchange(arr, axes):
    """`arr` is zero except, for each element, on at most one shard along `axes`: that shard's
    bits, everywhere, as unsigned integers of arr's width (an integer all-reduce, exact for
    every value; 16-bit values travel in pairs as 32-bit words)."""
    bits = lax.bitcast_convert_type(arr, _uint(arr.dtype))
    if arr.size == 0:
        return bits
    if bits.dtype.itemsize == 2 and arr.ndim and arr.shape[-1] % 2 == 0:
        pairs = bits.reshape(arr.shape[:-1] + (arr.shape[-1] // 2, 2))
        total = lax.psum(lax.bitcast_convert_type(pairs, jnp.uint32), axes)
        return lax.bitcast_convert_type(total, jnp.uint16).reshape(arr.shape)
    if bits.dtype.itemsize < 4:
        return lax.psum(bits.astype(jnp.uint32), axes).astype(bits.dtype)
    return lax.psum(bits, axes)


def _scatter_rows(buf, index, bits, platform):
    """buf.at[index].set(rows given as bit patterns), in place on a donated buffer. XLA:CPU has
    no bf16 scatter (it converts the whole buffer to f32 and back): there a bf16 buffer is
    scattered through its uint16 view, which costs two bit-reinterpreting passes over the
    buffer but no conversion; everywhere else (and for every other dtype) the scatter is native."""
    if buf.dtype == jnp.bfloat16 and platform == "cpu":
        view = lax.bitcast_convert_type(buf, _uint(buf.dtype))
        return lax.bitcast_convert_type(view.at[index].set(bits, mode="drop"), buf.dtype)
    return buf.at[index].set(lax.bitcast_convert_type(bits, buf.dtype), mode="drop")


def _entries(lay, ops):
    """Per entry, decided on the global indices exactly as the unsharded kernel decides it
    (reference._resolve is the vectorised ssu::resolve_entry): valid, steps run, padded."""
    a = lay.attr
    st = Settings(pad_slot_id=a["pad_slot_id"], dt_softplus=a["dt_softplus"],
                  disable_state_update=a["disable_state_update"],
                  philox_rounds=a["philox_rounds"], cache_steps=a["cache_steps"] or None,
                  algorithm=a["algorithm"])
    fields = {}
    for name in _NAMES:
        if not lay.has(name):
            fields[name] = None
        elif name == "intermediate_states_buffer":  # only its (global) row count is used
            fields[name] = jax.ShapeDtypeStruct(lay.shape(name), lay.dtypes[_I[name]])
        else:
            fields[name] = ops[_I[name]]
    st_shape = lay.shape("state")
    pb = Problem(**fields, settings=st, dims=(lay.S, lay.H) + tuple(st_shape[-2:]),
                 mode="varlen" if lay.varlen else "mtp", nb=lay.nb, T=lay.T)
    e = reference._resolve(pb)
    return e["ok"], e["len"], e["padded"]


def _spill_dst(lay, ops, attrs, results, local, src, mine, bad, off, Sl, axes, platform):
    """dst writes under slot sharding. The kernel of the read slot's shard runs the entry on a
    per-entry scratch state: rows [0, nb) hold the gathered read slots, rows nb + (entry, step)
    receive the states the entry writes (each dst slot of an entry one row: later steps
    overwrite earlier ones there, as in the cache). The written rows are exchanged (one
    all-reduce of the per-entry rows, never of the cache) and every shard scatters the rows whose
    dst slot it holds into its cache shard. Which rows are written is decided on the global
    indices (_entries), exactly as unsharded. Returns the function that finishes the results."""
    nb, S, pad = lay.nb, lay.S, lay.attr["pad_slot_id"]
    e = jnp.arange(nb, dtype=jnp.int32)
    ok, length, padded = _entries(lay, ops)
    i_st, i_sc, i_src, i_dst = (_I[n] for n in ("state", "state_scale", "state_batch_indices",
                                               "dst_state_batch_indices"))
    d = ops[i_dst]
    two_d = d.ndim == 2
    if two_d and not lay.varlen:
        d = d[:, :lay.T]  # columns at and past T are never used in MTP
    W = d.shape[1] if two_d else 1
    R = nb * (1 + W)
    keep = {"state": ops[i_st], "state_scale": ops[i_sc] if lay.has("state_scale") else None}
    rd = jnp.clip(src - off.astype(src.dtype), 0, Sl - 1)
    for name, i in (("state", i_st), ("state_scale", i_sc)):
        buf = keep[name]
        if buf is None:
            continue
        scratch = jnp.zeros((R,) + buf.shape[1:], buf.dtype).at[:nb].set(buf[rd])
        ops[i] = scratch
        results[_RESULTS.index(name)] = jax.ShapeDtypeStruct(scratch.shape, scratch.dtype)
    local["S"] = R
    # reads: this shard's entries read their scratch row; other shards' entries are padded
    # here; a read slot outside [0, S) stays invalid
    v = jnp.where(mine, e, jnp.where(bad, LOCAL_BAD, LOCAL_PAD))
    if lay.has("state_batch_indices"):
        sbi = ops[i_src]
        ops[i_src] = jnp.broadcast_to(v.reshape((nb,) + (1,) * (sbi.ndim - 1)),
                                      sbi.shape).astype(sbi.dtype)
    else:
        ops[i_src] = v.astype(lay.dtypes[i_dst])
        attrs["has_state_batch_indices"] = True
    # writes: each distinct dst slot of an entry -> one scratch row
    inr = (d != pad) & (d >= 0) & (d < S)
    if two_d:
        first = jnp.argmax(d[:, :, None] == d[:, None, :], axis=2).astype(jnp.int32)
        row = nb + e[:, None] * W + first
        steps = jnp.arange(W, dtype=jnp.int32)[None, :]
        wrote = ((ok & ~padded)[:, None] & inr & (steps < length[:, None])
                 & (first == steps))
    else:
        row = nb + e
        wrote = ok & ~padded & (length > 0) & inr
    ops[i_dst] = jnp.where(d == pad, LOCAL_PAD, jnp.where(inr, row, LOCAL_BAD)).astype(d.dtype)
    offd = off.astype(d.dtype)
    here = wrote & (d >= offd) & (d < offd + Sl)
    target = jnp.where(here, d - offd, Sl).reshape(-1)

    def finish(res):
        for name in ("state", "state_scale"):
            if keep[name] is None:
                continue
            r = _RESULTS.index(name)
            res[r] = _scatter_rows(keep[name], target, _exchange(res[r][nb:], axes), platform)
        return res

    return finish


def _spill_inter(lay, plan, ops, attrs, results, local, shard, axes, platform):
    """Intermediate-buffer writes under slot sharding: the kernel of the read slot's shard
    writes the entry's rows into a per-entry scratch buffer (row = entry), the rows are
    exchanged (one all-reduce of the per-entry rows) and every shard scatters the written
    (entry, step) rows that land in its part of the buffer (all of them when the buffer is
    replicated on axis 0). Returns the function that finishes the results."""
    nb, pad = lay.nb, lay.attr["pad_slot_id"]
    I = lay.shape("intermediate_states_buffer")[0]
    e = jnp.arange(nb, dtype=jnp.int32)
    ok, length, padded = _entries(lay, ops)
    names = ("intermediate_states_buffer", "intermediate_state_scales")
    keep = {n: ops[_I[n]] if lay.has(n) else None for n in names}
    for name in names:
        buf = keep[name]
        if buf is None:
            continue
        scratch = jnp.zeros((nb,) + buf.shape[1:], buf.dtype)
        ops[_I[name]] = scratch
        results[_RESULTS.index(name)] = jax.ShapeDtypeStruct(scratch.shape, scratch.dtype)
    local["I"] = nb
    ii_name = "intermediate_state_indices"
    explicit = lay.has(ii_name)
    dtype = lay.index_dtype
    ii = ops[_I[ii_name]] if explicit else jnp.arange(nb, dtype=dtype)
    skip = (ii == pad) if explicit else jnp.zeros((nb,), bool)  # positional rows: no pad
    inr = ~skip & (ii >= 0) & (ii < I)
    ops[_I[ii_name]] = jnp.where(skip, LOCAL_PAD, jnp.where(inr, e, LOCAL_BAD)).astype(dtype)
    attrs["has_" + ii_name] = True
    CS = keep[names[0]].shape[1]
    steps = jnp.arange(CS, dtype=jnp.int32)[None, :]
    wrote = (ok & ~padded & inr)[:, None] & (steps < length[:, None])
    if plan.inter_slot:
        Il = keep[names[0]].shape[0]
        o = (shard * Il).astype(ii.dtype)
        here = wrote & ((ii >= o) & (ii < o + Il))[:, None]
        target = jnp.where(here, (ii - o)[:, None], Il)
    else:
        target = jnp.where(wrote, ii[:, None], I)
    step_of = jnp.broadcast_to(steps, target.shape)

    def finish(res):
        for name in names:
            if keep[name] is None:
                continue
            r = _RESULTS.index(name)
            res[r] = _scatter_rows(keep[name], (target, step_of), _exchange(res[r], axes),
                                   platform)
        return res

    return finish


def _pick_groups(lay: _Layout, mesh, head, a):
    """This head shard's B or C out of the replicated (..., G, N) array: Gl local groups such
    that the kernel's local head j (group j // (Hl / Gl), Hl heads per shard) meets the group of
    its global head h0 + j. With q = H / G heads per group, runs of r = gcd(q, Hl) local heads
    never cross a group boundary (r divides q and h0 = shard * Hl), so local group i is global
    group (h0 + i * r) // q, and Gl = Hl / r: one group when the shard's heads lie in one group,
    repeated groups when they straddle groups (the copy is per-entry sized, never the cache)."""
    Hl = lay.H // _size(mesh, head)
    q = lay.H // lay.G
    r = math.gcd(q, Hl)
    h0 = _axis_index(mesh, head) * Hl
    if r == Hl:  # one group for the whole shard
        return lax.dynamic_slice_in_dim(a, h0 // q, 1, axis=a.ndim - 2)
    groups = (h0 + jnp.arange(Hl // r, dtype=jnp.int32) * r) // q
    return jnp.take(a, groups, axis=a.ndim - 2, mode="clip")


def _local(lay: _Layout, plan: _Plan, mesh, ops):
    ops = list(ops)
    attrs = lay.attr
    if plan.groups == "pick":
        for name in ("B", "C"):
            ops[_I[name]] = _pick_groups(lay, mesh, plan.head, ops[_I[name]])
    results = [jax.ShapeDtypeStruct(_tile(mesh, shape, spec), dtype) for shape, dtype, spec in
               zip(lay.res_shapes, lay.res_dtypes, plan.res_specs)]
    local = {"S": _tile(mesh, lay.shape("state"), plan.arg_specs[_I["state"]])[0]}
    if lay.heads:
        local["H"] = _tile(mesh, lay.shape("state"), plan.arg_specs[_I["state"]])[1]
    if lay.has("intermediate_states_buffer"):
        local["I"] = results[_RESULTS.index("intermediate_states_buffer")].shape[0]
    combine, finish = None, []
    if plan.slot:
        ms = _size(mesh, plan.slot)
        S, Sl, nb, pad = lay.S, lay.S // ms, lay.nb, attrs["pad_slot_id"]
        shard = _axis_index(mesh, plan.slot)
        off = shard * Sl
        src, real = _read_slots(lay, ops)
        mine = real & (src >= off) & (src < off + Sl)
        bad = ~real & (src != pad) if lay.has("state_batch_indices") else jnp.zeros((nb,), bool)
        n_all, n_mine = _row_counts(lay, ops, real), _row_counts(lay, ops, mine)
        combine = dict(n_all=n_all, n_mine=n_mine)
        has_dst = lay.has("dst_state_batch_indices")
        platform = getattr(mesh.devices.flat[0], "platform", "")
        writes = nb > 0 and lay.rows > 0  # else no entry runs a step: nothing is written
        if writes and lay.has("intermediate_states_buffer"):
            finish.append(_spill_inter(lay, plan, ops, attrs, results, local, shard, plan.slot,
                                       platform))
        if writes and has_dst and not attrs["disable_state_update"]:
            finish.append(_spill_dst(lay, ops, attrs, results, local, src, mine, bad, off, Sl,
                                     plan.slot, platform))
        else:  # the kernel updates this shard's own slots in place
            if lay.has("state_batch_indices"):
                i = _I["state_batch_indices"]
                ops[i] = _local_src(ops[i], pad, S, off, Sl)
            else:  # entry b reads slot b: explicit local indices
                ops[_I["state_batch_indices"]] = _local_src(
                    jnp.arange(nb, dtype=lay.index_dtype), pad, S, off, Sl, pad_aware=False)
                attrs["has_state_batch_indices"] = True
            if has_dst:  # under disable_state_update: neither written nor checked
                i = _I["dst_state_batch_indices"]
                ops[i] = _unused_dst(ops[i], pad)
        attrs["pad_slot_id"] = LOCAL_PAD
    res = list(kernel(ops, results, dict(lay.aliases), attrs, replan(lay.plan, **local)))
    if combine is not None:
        res[0] = _combine(res[0], lay.rows, combine["n_all"], combine["n_mine"], plan.slot)
    for f in finish:
        res = f(res)
    return tuple(res)


# ---------------------------------------------------------------- custom_partitioning glue

def _shardings(mesh, specs):
    return tuple(NamedSharding(mesh, PartitionSpec(*s)) for s in specs)


def _usable(mesh, shardings):
    return (isinstance(mesh, Mesh) and not mesh.empty
            and all(s is None or isinstance(s, NamedSharding) for s in shardings))


def _replicated_plan(lay):
    return _Plan(arg_specs=tuple((None,) * len(s) for s in lay.shapes),
                 res_specs=tuple((None,) * len(s) for s in lay.res_shapes))


def _fallback_mesh(shardings):
    devices = set()
    for s in shardings:
        if s is not None:
            devices |= set(s.device_set)
    return Mesh(np.array(sorted(devices, key=lambda d: d.id)), ("_replicated",))


def _choose(lay, mesh, arg_shapes):
    """(mesh, plan) for the operands' shardings."""
    shardings = [getattr(a, "sharding", None) for a in arg_shapes]
    if _usable(mesh, shardings):
        return mesh, _plan(lay, mesh, shardings)
    # not expressible on a named mesh: run replicated (correct, gathers)
    return _fallback_mesh(shardings), _replicated_plan(lay)


def _partition(lay, x64, mesh, arg_shapes, result_shape):
    with jax.enable_x64(x64):
        mesh, plan = _choose(lay, mesh, arg_shapes)

    def lower(*ops):
        with jax.enable_x64(x64):
            return _local(lay, plan, mesh, ops)

    return (mesh, lower, _shardings(mesh, plan.res_specs), _shardings(mesh, plan.arg_specs))


def _infer(lay, x64, mesh, arg_shapes, result_shape):
    with jax.enable_x64(x64):
        mesh, plan = _choose(lay, mesh, arg_shapes)
    return _shardings(mesh, plan.res_specs)


def _factors(lay):
    """Shardy factors of every operand and result dimension (sharding propagation only; the
    plan above decides what is split)."""
    lead = ["r"] if lay.varlen else ["b", "t"]
    ent = "e" if lay.varlen else "b"
    hp = ["h", "p"] if lay.heads else ["p"]

    def user_x(nd):  # out: the canonical layout of x, or the caller's (no T in STP, no H
        # axis with a 3-D state)
        trailing = ["h", "p"] if (lay.heads or nd == len(lead) + 2) else ["p"]
        return lead[:nd - len(trailing)] + trailing

    ops = []
    for k, (name, shape, present) in enumerate(zip(_NAMES, lay.shapes, lay.present)):
        nd = len(shape)
        if not present:
            f = [f"z{k}"]
        elif name == "state":
            f = ["s"] + hp + ["n"]
        elif name in ("x", "z"):
            f = lead + ["h", "p"]
        elif name == "dt":
            f = lead + ["h", "p"][: nd - len(lead)]
        elif name == "A":
            f = ["h", "p", "n"][:nd]
        elif name in ("D", "dt_bias"):
            f = ["h", "p"][:nd]
        elif name in ("B", "C"):
            f = lead + ["g", "n"]
        elif name == "state_batch_indices":
            f = [ent, "k1"][:nd]
        elif name == "dst_state_batch_indices":
            f = [ent, "k2"][:nd]
        elif name == "state_scale":
            f = (["s"] + hp + ["u"])[:nd]
        elif name == "out":
            f = user_x(nd)
        elif name == "intermediate_states_buffer":
            f = ["i", "c"] + hp + ["n"]
        elif name == "intermediate_state_scales":
            f = ["i", "c"] + hp
        elif name in ("intermediate_state_indices", "num_accepted_tokens"):
            f = [ent]
        elif name == "cu_seqlens":
            f = ["q"]
        else:  # rand_seed
            f = ["w"]
        ops.append(f)
    res = []
    for name, shape in zip(_RESULTS, lay.res_shapes):
        res.append(user_x(len(shape)) if name == "out" and not lay.has("out")
                   else ops[_I[name]])
    return ops, res


def _rule(lay):
    ops, res = _factors(lay)
    return ", ".join(" ".join(f) for f in ops) + " -> " + ", ".join(" ".join(f) for f in res)


def call(operands, results, aliases, attrs, plan):
    """The kernel call with its SPMD partitioning rule; on a single device (and inside
    shard_map) it lowers to exactly the bare custom call."""
    lay = _layout(operands, results, aliases, attrs, plan)
    # The partitioner calls back while XLA compiles, outside the caller's configuration
    # context: under `with jax.enable_x64(True)` the callbacks would otherwise trace with x64
    # off and turn the int64 index operands they build into int32 ones.
    x64 = bool(jax.config.jax_enable_x64)

    def body(*ops):
        return kernel(ops, results, aliases, attrs, plan)

    fn = custom_partitioning(body)
    fn.def_partition(
        partition=lambda mesh, a, r: _partition(lay, x64, mesh, a, r),
        infer_sharding_from_operands=lambda mesh, a, r: _infer(lay, x64, mesh, a, r),
        sharding_rule=_rule(lay))
    return tuple(fn(*operands))

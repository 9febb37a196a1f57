"""vmap of the kernel call in place: the vmapped axis is folded into the slot axis (one kernel
call over a (V*S, ...) cache), and the entry point that guards against differentiation."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_batching import custom_vmap

from . import _lowering, sharding

# With the vmapped axis folded into the slot axis, state (V, S, H, P, N) is viewed as
# (V*S, H, P, N) (a free reshape), entry b of instance v becomes entry v*nb + b and its slot
# indices are offset by v*S (intermediate rows by v*I), so one call updates the caches of many
# instances in place. Pad entries keep a pad value (one outside every folded range); an index
# that is invalid for its instance (outside [0, S)) becomes one that is invalid in the folded
# cache too, so it can never reach a neighbour's slots. Operands that are not batched are
# broadcast (a batched result needs its own copy of an unbatched buffer).
#
# The calls run in a lax.scan of at least two iterations that carries the folded buffers: XLA
# (layout assignment) copies an in-place custom-call operand that is a reshape of a buffer,
# but not a loop-carried one, and a loop of one iteration is inlined. So:
#   * foldable (one set of A/D/dt_bias and one seed for all instances, fixed-shape entries):
#     two calls, each over half of the instances (an odd V gets a dummy instance of padded
#     entries, which reads and writes nothing);
#   * otherwise (per-instance parameters or seed, varlen): one call per instance (V = 1 gets a
#     dummy second instance).

_NAMES = sharding._NAMES
_I = sharding._I
_RESULTS = sharding._RESULTS
_PER_ENTRY = ("x", "dt", "B", "C", "z", "num_accepted_tokens")
_BUFFERS = ("state", "state_scale", "intermediate_states_buffer", "intermediate_state_scales")
_PARAMS = ("A", "D", "dt_bias", "rand_seed")


def call(operands, results, aliases, attrs, plan):
    """The kernel call with its vmap and partitioning rules. Not differentiable: a JVP raises
    the error that points to jax_mamba.reference (inlined when lowered: no cost). An eager
    call runs jitted (compiled once per layout), so that sharded inputs are partitioned too."""
    if not any(isinstance(o, jax.core.Tracer) for o in operands):
        return _eager(sharding._layout(operands, results, aliases, attrs, plan))(*operands)
    return _guarded(operands, results, aliases, attrs, plan)


@functools.lru_cache(maxsize=256)
def _eager(lay):
    results = [jax.ShapeDtypeStruct(s, d) for s, d in zip(lay.res_shapes, lay.res_dtypes)]
    return jax.jit(lambda *ops: _guarded(ops, results, dict(lay.aliases), lay.attr, lay.plan))


def _guarded(operands, results, aliases, attrs, plan):
    @jax.custom_jvp
    def guarded(*ops):
        return _batchable(ops, results, aliases, attrs, plan)

    @guarded.defjvp
    def _no_derivative(primals, tangents):
        raise TypeError(_lowering.NOT_DIFFERENTIABLE)

    return guarded(*operands)


def _batchable(operands, results, aliases, attrs, plan):
    @custom_vmap
    def fn(*ops):
        return sharding.call(ops, results, aliases, attrs, plan)

    @fn.def_vmap
    def _rule(axis_size, in_batched, *ops):
        return _vmap_rule(axis_size, in_batched, ops, results, aliases, attrs, plan)

    return fn(*operands)


def _vmap_rule(V, in_batched, ops, results, aliases, attrs, plan):
    ops = list(ops)
    batched = list(in_batched)
    shapes = [tuple(o.shape[1:]) if b else tuple(o.shape) for o, b in zip(ops, batched)]
    lay = sharding._layout([jax.ShapeDtypeStruct(s, o.dtype) for s, o in zip(shapes, ops)],
                           results, aliases, attrs, plan)
    nb, S, pad = lay.nb, lay.S, lay.attr["pad_slot_id"]
    has = lay.has
    I = lay.shape("intermediate_states_buffer")[0] if has("intermediate_states_buffer") else 0

    def full(name):  # operand `name` with a leading instance axis
        o = ops[_I[name]]
        return o if batched[_I[name]] else jnp.broadcast_to(o[None], (V,) + o.shape)

    if V == 0:  # nothing runs; the buffers come back as given
        outs, outb = [], []
        for name, r in zip(_RESULTS, results):
            if name == "out":
                outs.append(full("out") if has("out") else
                            jnp.zeros((0,) + tuple(r.shape), r.dtype))
            else:
                outs.append(full(name) if has(name) else ops[_I[name]])
            outb.append(name == "out" or has(name))
        return tuple(outs), tuple(outb)

    idx_dtype = lay.index_dtype
    limit = max(V * S, V * I)
    if idx_dtype == np.int32 and limit > np.iinfo(np.int32).max:
        raise ValueError(f"vmap of selective_state_update: {V} instances of {S} slots exceed "
                         "int32 indices; pass int64 indices (jax_enable_x64)")
    # the folded view is the layer cache's flat view with instances for layers
    from .cache import flat_pad_slot_id, flat_slot_indices
    new_pad = flat_pad_slot_id(pad)
    new_attrs = dict(attrs, pad_slot_id=new_pad, has_state_batch_indices=True)
    if has("intermediate_states_buffer"):
        new_attrs["has_intermediate_state_indices"] = True

    fold = not lay.varlen and not any(batched[_I[n]] for n in _PARAMS)
    groups = 2 if fold else max(V, 2)
    per = -(-V // groups)          # instances per call
    Vp = groups * per              # with dummy instances of padded entries

    def padded(a, fill):
        if Vp == V:
            return a
        return jnp.concatenate([a, jnp.full((Vp - V,) + a.shape[1:], fill, a.dtype)])

    # the loop's carry: the aliased buffers, folded (V, S, ...) -> (V*S, ...)
    carry = {}
    for name in _BUFFERS:
        if has(name):
            b = full(name)
            carry[name] = b.reshape((V * b.shape[1],) + b.shape[2:])

    # per-instance operands, (Vp, ...)
    inst = jnp.arange(V, dtype=idx_dtype)
    xs = {}
    for name in _PER_ENTRY + ("out", "cu_seqlens"):
        if has(name):
            xs[name] = padded(full(name), 0)
    for name in _PARAMS:
        if has(name) and batched[_I[name]]:
            xs[name] = jnp.concatenate([full(name)] + [full(name)[:1]] * (Vp - V))

    def folded(name, n):  # instance v's indices into [v*n, (v+1)*n); pad / invalid kept so
        v = full(name)
        return flat_slot_indices(v, inst.reshape((V,) + (1,) * (v.ndim - 1)), n, V, pad)

    def positional(n):  # no indices: entry b uses slot / row b (never pad; in range, validated)
        return jnp.arange(nb, dtype=idx_dtype)[None, :] + (inst * n)[:, None]

    sbi = folded("state_batch_indices", S) if has("state_batch_indices") else positional(S)
    xs["state_batch_indices"] = padded(sbi, new_pad)
    if has("dst_state_batch_indices"):
        xs["dst_state_batch_indices"] = padded(folded("dst_state_batch_indices", S), new_pad)
    if has("intermediate_states_buffer"):
        ii = "intermediate_state_indices"
        rows = folded(ii, I) if has(ii) else positional(I)
        xs[ii] = padded(rows, new_pad)
    # (Vp, d, ...) -> (groups, per*d, ...): per instances side by side in one call
    for name, a in xs.items():
        if name in _PER_ENTRY + ("out", "state_batch_indices", "dst_state_batch_indices",
                                 "intermediate_state_indices"):
            xs[name] = a.reshape((groups, per * a.shape[1]) + a.shape[2:])
        # cu_seqlens and parameters only in one-instance calls (per == 1)

    call_results = []
    for name, r in zip(_RESULTS, results):
        shape = tuple(r.shape)
        if name == "out":
            shape = (per * shape[0],) + shape[1:]
        elif has(name):
            shape = tuple(carry[name].shape)
        call_results.append(jax.ShapeDtypeStruct(shape, r.dtype))
    call_plan = sharding.replan(plan, S=V * S, I=V * I, nb=per * nb, rows=per * lay.rows)

    def step(bufs, sliced):
        cur = list(ops)
        for name, a in list(sliced.items()) + list(bufs.items()):
            cur[_I[name]] = a
        res = _batchable(cur, call_results, aliases, new_attrs, call_plan)
        return {name: res[_RESULTS.index(name)] for name in bufs}, res[0]

    carry, outs = lax.scan(step, carry, xs)
    r0 = tuple(results[0].shape)
    out = outs.reshape((Vp,) + r0)[:V]
    res = [out] + [carry.get(name) for name in _RESULTS[1:]]
    return _unfold(V, res, results, has)


def _unfold(V, res, results, has):
    outs, outb = [], []
    for r, (name, spec) in enumerate(zip(_RESULTS, results)):
        a = res[r]
        if name == "out":
            outs.append(a)
            outb.append(True)
        elif has(name):
            outs.append(a.reshape((V,) + tuple(spec.shape)))
            outb.append(True)
        else:  # an absent buffer's zero-size placeholder
            outs.append(jnp.zeros(spec.shape, spec.dtype))
            outb.append(False)
    return tuple(outs), tuple(outb)

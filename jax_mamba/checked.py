"""Opt-in checked mode (SPEC §3.2): the kernels turn invalid runtime indices into NaN outputs
and skipped writes; for debugging a serving loop these helpers raise a readable error instead.

    ssu = jax_mamba.checked_selective_state_update if DEBUG else jax_mamba.selective_state_update

    def step(cache, x, ...):
        r = ssu(cache, x, dt, A, B, C, D, state_batch_indices=slots, ...)
        ...
    step = jax_mamba.checked(jax.jit(step))   # DEBUG: raises on a call with bad indices

checked_selective_state_update has selective_state_update's signature; outside jax_mamba.checked
it needs jax.experimental.checkify.checkify around it, like any checkify.check.

The checks are the same rules the kernels apply (jax_mamba.reference computes both), so a
call that passes them produces no NaN from invalid data.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.experimental import checkify

from . import ops
from ._problem import SIGNATURE, build_problem
from .reference import _resolve


def _bind(args, kwargs):
    names = [n for n, _ in SIGNATURE]
    if len(args) > len(names):
        raise TypeError(f"selective_state_update: expected at most {len(names)} positional "
                        f"arguments, got {len(args)}")
    bound = dict(SIGNATURE)
    bound.update(zip(names, args))
    for k, v in kwargs.items():
        if k not in bound:
            raise TypeError(f"selective_state_update: unexpected keyword argument {k!r}")
        bound[k] = v
    return bound


def runtime_faults(*args, **kwargs):
    """Same arguments as selective_state_update. Returns {description: bool array (entries,)}
    marking the entries whose runtime data is invalid (their outputs would be NaN)."""
    bound = _bind(args, kwargs)
    pb = build_problem(*[bound[n] for n, _ in SIGNATURE])
    return _resolve(pb)["faults"]


def checked_selective_state_update(*args, **kwargs):
    """selective_state_update preceded by checkify checks of its runtime indices, cu_seqlens
    and num_accepted_tokens. Must run under jax.experimental.checkify.checkify (or use
    jax_mamba.checked, which does that and raises)."""
    for what, bad in runtime_faults(*args, **kwargs).items():
        if bad.shape[0] == 0:
            continue
        checkify.check(~jnp.any(bad), "selective_state_update: {n} invalid entries, first "
                       "entry {b}: " + what, n=jnp.sum(bad), b=jnp.argmax(bad))
    return ops.selective_state_update(*args, **kwargs)


def checked(fn):
    """Wraps `fn` (jitted or not) with checkify so that a failed check inside it raises
    (checkify's JaxRuntimeError) after `fn` returns. Inside `fn`, call
    checked_selective_state_update (same signature as selective_state_update)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        err, out = checkify.checkify(fn)(*args, **kwargs)
        err.throw()
        return out
    return run

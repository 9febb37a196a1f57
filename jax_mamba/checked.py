"""Opt-in checked mode (docs/semantics.md, "Invalid runtime data"): the kernels turn invalid
runtime indices into NaN outputs and skipped writes; for debugging a serving loop these helpers
raise a readable error instead.

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
from ._problem import public_function
from .reference import _resolve


def _faults(pb, restore):
    return _resolve(pb)["faults"]


runtime_faults = public_function(_faults, __name__, """Same arguments as selective_state_update.
Returns {description: bool array (entries,)} marking the entries whose runtime data is invalid
(their outputs would be NaN).""")


def _checked_call(pb, restore):
    for what, bad in _resolve(pb)["faults"].items():
        if bad.shape[0] == 0:
            continue
        checkify.check(~jnp.any(bad), "selective_state_update: {n} invalid entries, first "
                       "entry {b}: " + what, n=jnp.sum(bad), b=jnp.argmax(bad))
    return ops._call(pb, restore)


checked_selective_state_update = public_function(_checked_call, __name__, """selective_state_update
preceded by checkify checks of its runtime indices, cu_seqlens and num_accepted_tokens. Must run
under jax.experimental.checkify.checkify (or use jax_mamba.checked, which does that and
raises).""")


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

"""Speculative decoding with a Mamba state cache: verify T draft tokens, keep the accepted prefix.

A recurrent state cannot be "truncated" like a KV cache: after verifying T draft tokens in one
multi-token (MTP) call, the state of the accepted prefix must be the one kept. Two recipes:

SGLang style (intermediate buffer, then a commit copy):
  1. ``verify_drafts``: one MTP call with ``intermediate_states_buffer`` and
     ``disable_state_update=True``; row ``ii`` of the buffer gets the state after each step t,
     ``state[slot]`` keeps the state before the drafts.
  2. ``commit_accepted_states``: ``state[slot] = intermediate[ii, n - 1]`` for the n accepted
     tokens (n = 0 keeps the old state), one gather/scatter of only those states, in place.
  The conv state is committed the same way by ``commit_conv_state`` from the conv inputs of
  the verified tokens (run the conv with ``disable_state_update=True`` during verification).

vLLM style (a slot per draft position, no copy):
  the verify call takes a 2-D slot table ``(b, K)`` as ``state_batch_indices`` and as
  ``dst_state_batch_indices``: the state after step t goes to ``table[b, t]``. The state after
  n accepted tokens is then in ``table[b, n - 1]`` (``accepted_state_slots``), and the next call
  passes the same table with ``num_accepted_tokens=n`` to read from it (docs/semantics.md: the read slot
  is ``table[b, max(n - 1, 0)]``). Varlen batches (``cu_seqlens``, one row of the table per
  sequence, sequences of different draft lengths) work the same way; ``cu_seqlens_from_lengths``
  builds the offsets. ``copy_states`` moves an accepted state to another slot if wanted.

All functions are pure jnp (gathers and ``.at[].set`` scatters: in place when the cache is
donated to the jitted step) and work on flat caches; for a layer-stacked
:class:`jax_mamba.cache.LayerCache` see ``commit_layer_cache``.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from .ops import selective_state_update as _kernel_ssu

__all__ = ["CommitResult", "verify_drafts", "commit_accepted_states", "commit_conv_state",
           "accepted_state_slots", "copy_states", "cu_seqlens_from_lengths",
           "commit_layer_cache"]


class CommitResult(NamedTuple):
    state: jax.Array
    state_scale: Optional[jax.Array]


def verify_drafts(state, x, dt, A, B, C, D=None, *, intermediate_states_buffer,
                  state_batch_indices=None, intermediate_state_indices=None, ssu=None,
                  **kwargs):
    """SGLang-style verification: ``ssu(...)`` over the T draft steps (x ``(b, T, H, P)``)
    with the intermediate buffer and ``disable_state_update=True``.

    Returns the SSUResult: ``out`` holds the T outputs (compare them with the drafts), the
    buffer row of entry b holds the state after each step, ``state`` is left unchanged, ready
    for :func:`commit_accepted_states`. Other keyword arguments go to ``ssu`` (default
    ``jax_mamba.selective_state_update``).
    """
    ssu = _kernel_ssu if ssu is None else ssu
    return ssu(state, x, dt, A, B, C, D, state_batch_indices=state_batch_indices,
               intermediate_states_buffer=intermediate_states_buffer,
               intermediate_state_indices=intermediate_state_indices,
               disable_state_update=True, **kwargs)


def _entry_indices(indices, nb, bound, pad_slot_id):
    """(index, write?) per entry; missing indices are positional (never pad)."""
    if indices is None:
        return jnp.arange(nb, dtype=jnp.int32), jnp.ones((nb,), bool)
    idx = jnp.asarray(indices)
    return idx, (idx != pad_slot_id) & (idx >= 0) & (idx < bound)


def commit_accepted_states(state, intermediate_states, num_accepted_tokens,
                           state_batch_indices=None, intermediate_state_indices=None, *,
                           state_scale=None, intermediate_state_scales=None, pad_slot_id=-1):
    """Commit the accepted prefix after :func:`verify_drafts`: for each entry b with
    ``n = num_accepted_tokens[b]``, ``state[slot_b] = intermediate_states[row_b, n - 1]``.

    Args:
      state: ``(S, ...)`` state cache (any dtype; int16 with ``state_scale``).
      intermediate_states: ``(I, T, ...)`` buffer written by the verification.
      num_accepted_tokens: ``(b,)`` accepted steps per entry, in ``[0, T]``.
      state_batch_indices: ``(b,)`` slot of each entry (b if None).
      intermediate_state_indices: ``(b,)`` buffer row of each entry (b if None).
      state_scale, intermediate_state_scales: the int16 scales, copied with their states.
      pad_slot_id: entries whose slot (or row) equals it are skipped.

    Only the accepted entries' states move (a gather of b rows and a scatter into b slots);
    entries with n = 0, a padded or out-of-range slot / row, or n > T write nothing. The copy
    is bit-exact, so the committed state is exactly what the verification computed after n
    steps, i.e. what n single-token calls compute from the same state (docs/semantics.md: the state is
    fp32 across steps and rounded only when stored). Returns ``CommitResult(state,
    state_scale)``.
    """
    n = jnp.asarray(num_accepted_tokens)
    nb = n.shape[0]
    I, T = intermediate_states.shape[:2]
    S = state.shape[0]
    slot, slot_ok = _entry_indices(state_batch_indices, nb, S, pad_slot_id)
    row, row_ok = _entry_indices(intermediate_state_indices, nb, I, pad_slot_id)
    ok = slot_ok & row_ok & (n >= 1) & (n <= T)
    row_r = jnp.where(ok, row, 0)
    step = jnp.clip(n - 1, 0, T - 1)
    dst = jnp.where(ok, slot, S)                          # out of range: dropped
    state = state.at[dst].set(intermediate_states[row_r, step], mode="drop")
    if state_scale is not None:
        if intermediate_state_scales is None:
            raise ValueError("intermediate_state_scales: required with state_scale")
        src = intermediate_state_scales[row_r, step].reshape(
            (nb,) + state_scale.shape[1:])
        state_scale = state_scale.at[dst].set(src, mode="drop")
    return CommitResult(state, state_scale)


def commit_conv_state(conv_state, x, num_accepted_tokens, conv_state_indices=None,
                      pad_slot_id=-1):
    """Commit the conv state of the accepted prefix.

    ``conv_state (S, dim, state_len)`` still holds the state before the T verified tokens (the
    verification ran ``causal_conv1d_update(..., disable_state_update=True)``); ``x (b, T,
    dim)`` are the conv inputs of those tokens. Slot b gets the last ``state_len`` inputs of
    ``[conv_state[slot_b], x[b, :n]]`` with ``n = num_accepted_tokens[b]`` — exactly what n
    single-token ``causal_conv1d_update`` calls leave. n = 0 or a padded / out-of-range slot:
    no write. Returns the new conv state.
    """
    n = jnp.asarray(num_accepted_tokens)
    b, T, D = x.shape
    S, _, Ls = conv_state.shape
    slot, ok = _entry_indices(conv_state_indices, b, S, pad_slot_id)
    ok = ok & (n >= 1) & (n <= T)
    s = conv_state[jnp.where(ok, slot, 0)]                              # (b, D, Ls)
    full = jnp.concatenate([s, jnp.swapaxes(x, 1, 2).astype(conv_state.dtype)], -1)
    take = jnp.clip(n, 0, T)[:, None] + jnp.arange(Ls)[None, :]         # (b, Ls)
    new = jnp.take_along_axis(full, take[:, None, :], axis=-1)
    return conv_state.at[jnp.where(ok, slot, S)].set(new, mode="drop")


def accepted_state_slots(dst_state_batch_indices, num_accepted_tokens):
    """vLLM style: the slot holding the state after the accepted prefix.

    After a verification call that wrote the state after step t to
    ``dst_state_batch_indices[b, t]`` (2-D), the state after ``n = num_accepted_tokens[b] >= 1``
    accepted tokens is in ``dst[b, n - 1]``; this returns those slots ``(b,)``. It is the slot a
    later call reads when given ``state_batch_indices=dst`` and ``num_accepted_tokens=n``
    (``max(n - 1, 0)``, as docs/semantics.md says).
    """
    dst = jnp.asarray(dst_state_batch_indices)
    n = jnp.asarray(num_accepted_tokens).astype(jnp.int32)
    col = jnp.clip(n - 1, 0, dst.shape[1] - 1)
    return jnp.take_along_axis(dst, col[:, None], axis=1)[:, 0]


def copy_states(state, src_slots, dst_slots, state_scale=None, pad_slot_id=-1):
    """``state[dst_slots[b]] = state[src_slots[b]]`` (and the scales), in place when donated.

    Entries whose src or dst is ``pad_slot_id`` or out of range are skipped; src == dst is a
    no-op. A dst must not be another entry's src. Returns ``CommitResult(state, state_scale)``.
    """
    S = state.shape[0]
    src, dst = jnp.asarray(src_slots), jnp.asarray(dst_slots)
    ok = ((src != pad_slot_id) & (src >= 0) & (src < S) & (dst != pad_slot_id) & (dst >= 0)
          & (dst < S))
    src_r, dst_w = jnp.where(ok, src, 0), jnp.where(ok, dst, S)
    state = state.at[dst_w].set(state[src_r], mode="drop")
    if state_scale is not None:
        state_scale = state_scale.at[dst_w].set(state_scale[src_r], mode="drop")
    return CommitResult(state, state_scale)


def cu_seqlens_from_lengths(lengths, dtype=jnp.int32):
    """``[0, l0, l0 + l1, ...]``: the ``cu_seqlens`` of sequences of the given lengths."""
    lengths = jnp.asarray(lengths, dtype)
    return jnp.concatenate([jnp.zeros((1,), dtype), jnp.cumsum(lengths, dtype=dtype)])


def commit_layer_cache(cache, num_accepted_tokens, state_batch_indices=None,
                       intermediate_state_indices=None, conv_inputs=None, pad_slot_id=-1, *,
                       commit_ssm=True):
    """:func:`commit_accepted_states` (and :func:`commit_conv_state`) for every layer of a
    :class:`jax_mamba.cache.LayerCache` in one gather/scatter each.

    Indices are per-layer slots / rows ``(b,)`` (positional if None), the same in every layer;
    ``conv_inputs (L, b, T, conv_dim)`` are the conv inputs of the verified tokens per layer
    (required if the cache has a conv state). ``commit_ssm=False`` commits only the conv state
    (vLLM style: the SSM states are already in the slot table). Returns the new LayerCache.
    """
    from .cache import flat_pad_slot_id, flat_slot_indices

    commit_ssm = commit_ssm and cache.intermediate is not None
    if not commit_ssm and cache.conv is None:
        raise ValueError("commit_layer_cache: nothing to commit (no intermediate buffer or "
                         "commit_ssm=False, and no conv state)")
    L, S = cache.num_layers, cache.num_slots
    n = jnp.asarray(num_accepted_tokens)
    b = n.shape[0]
    layers = jnp.arange(L, dtype=jnp.int32)[:, None]
    sbi = (jnp.arange(b, dtype=jnp.int32) if state_batch_indices is None
           else jnp.asarray(state_batch_indices))
    slots = flat_slot_indices(sbi, layers, S, L, pad_slot_id).reshape(-1)   # (L*b,)
    pad = flat_pad_slot_id(pad_slot_id)
    n_all = jnp.tile(n, L)
    view = cache.view()
    if commit_ssm:
        I = cache.intermediate.shape[1]
        if intermediate_state_indices is None:  # positional rows are never padding
            rows = (jnp.arange(b, dtype=jnp.int32)[None, :] + layers * I).reshape(-1)
        else:
            rows = flat_slot_indices(jnp.asarray(intermediate_state_indices), layers, I, L,
                                     pad_slot_id).reshape(-1)
        r = commit_accepted_states(view.ssm, view.intermediate, n_all, slots, rows,
                                   state_scale=view.ssm_scale,
                                   intermediate_state_scales=view.intermediate_scales,
                                   pad_slot_id=pad)
        view = dataclasses.replace(view, ssm=r.state, ssm_scale=r.state_scale)
    if cache.conv is not None:
        if conv_inputs is None:
            raise ValueError("conv_inputs: required, the cache has a conv state")
        x = jnp.asarray(conv_inputs)
        conv = commit_conv_state(view.conv, x.reshape((L * b,) + x.shape[2:]), n_all, slots, pad)
        view = dataclasses.replace(view, conv=conv)
    return view.stacked()

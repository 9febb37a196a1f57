"""The decode step's causal depthwise conv1d over a rolling state cache (Mamba / Mamba-2 `conv1d`).

Pure jnp. The state rows are gathered, the new windows are scattered back with ``.at[].set``:
inside ``jax.jit(..., donate_argnums=...)`` XLA updates the donated cache in place.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["ConvResult", "causal_conv1d_update", "causal_conv1d"]


class ConvResult(NamedTuple):
    out: jax.Array         # like x
    conv_state: jax.Array  # the updated cache (aliased to the input when donated)


def _activate(y, activation):
    if activation is None:
        return y
    if activation in ("silu", "swish"):
        return y * jax.nn.sigmoid(y)
    raise ValueError(f"activation: expected None, 'silu' or 'swish', got {activation!r}")


def _check(conv_state, x, weight, bias):
    if conv_state.ndim != 3:
        raise ValueError(f"conv_state: expected (S, dim, state_len), got shape {conv_state.shape}")
    if x.ndim not in (2, 3):
        raise ValueError(f"x: expected (b, dim) or (b, T, dim), got shape {x.shape}")
    D = conv_state.shape[1]
    if weight.ndim != 2 or weight.shape[0] != D:
        raise ValueError(f"weight: expected ({D}, width), got shape {weight.shape}")
    if x.shape[-1] != D:
        raise ValueError(f"x: expected last axis {D} (conv_state dim), got shape {x.shape}")
    W = weight.shape[1]
    if W < 1 or conv_state.shape[2] < W - 1:
        raise ValueError(f"conv_state: expected state_len >= width - 1 = {W - 1}, got shape "
                         f"{conv_state.shape}")
    if bias is not None and bias.shape != (D,):
        raise ValueError(f"bias: expected ({D},), got shape {bias.shape}")


def causal_conv1d_update(conv_state, x, weight, bias=None, activation=None,
                         conv_state_indices=None, pad_slot_id=-1, disable_state_update=False):
    """One decode step (or T steps) of a causal depthwise conv1d over a slot cache.

    Args:
      conv_state: ``(S, dim, state_len)`` cache, ``state_len >= width - 1``; slot ``s`` holds
        the last ``state_len`` inputs of its sequence, oldest first (the layout of
        ``causal_conv1d_update`` in the causal-conv1d package and vLLM).
      x: ``(b, dim)`` one new input per entry, or ``(b, T, dim)`` T new inputs.
      weight: ``(dim, width)``; ``weight[:, -1]`` multiplies the newest input.
      bias: optional ``(dim,)``.
      activation: None, or "silu" / "swish".
      conv_state_indices: optional ``(b,)`` slot of each entry (entry b uses slot b if None).
      pad_slot_id: entries whose index equals it read a zero state, compute their output and
        write nothing. Another index outside ``[0, S)`` reads nothing, writes nothing and gives
        a NaN output (a visible fault, as in ``selective_state_update``).
      disable_state_update: compute the outputs and leave the cache untouched (the verify
        pass of speculative decoding; see ``jax_mamba.speculative.commit_conv_state``).

    For each entry, with ``s = conv_state[slot]`` and the new inputs appended on the right,
    ``window_t = [s, x_0 .. x_t][-width:]`` and
    ``out_t = act(sum_k window_t[:, k] * weight[:, k] + bias)`` (fp32 arithmetic, stored in
    x.dtype); the slot then holds the last ``state_len`` inputs (``[s, x_0 .. x_{T-1}]``
    shifted left by T), stored in ``conv_state.dtype``.

    Returns ``ConvResult(out, conv_state)``. Two entries must not use the same slot.
    """
    if not isinstance(disable_state_update, bool):
        raise TypeError("disable_state_update: expected a Python bool (it is static)")
    _check(conv_state, x, weight, bias)
    stp = x.ndim == 2
    xs = x[:, None] if stp else x                                  # (b, T, D)
    b, T, D = xs.shape
    S, _, Ls = conv_state.shape
    W = weight.shape[1]
    if conv_state_indices is None:
        if b > S:
            raise ValueError(f"conv_state: expected at least b={b} slots without "
                             f"conv_state_indices, got {S}")
        idx = jnp.arange(b, dtype=jnp.int32)
        pad = jnp.zeros((b,), bool)
        bad = pad
    else:
        idx = jnp.asarray(conv_state_indices)
        if idx.shape != (b,) or not jnp.issubdtype(idx.dtype, jnp.integer):
            raise ValueError(f"conv_state_indices: expected ({b},) integers, got "
                             f"{idx.shape} {idx.dtype}")
        pad = idx == pad_slot_id
        bad = ~pad & ((idx < 0) | (idx >= S))
    ok = ~(pad | bad)
    s = conv_state[jnp.where(ok, idx, 0)].astype(jnp.float32)    # (b, D, Ls)
    s = jnp.where(ok[:, None, None], s, 0.0)
    xt = jnp.swapaxes(xs, 1, 2)                                    # (b, D, T)
    # the inputs are read as the cache stores them (a no-op when the dtypes agree), so T steps
    # in one call and T single-step calls give the same bits
    full = jnp.concatenate([s, xt.astype(conv_state.dtype).astype(jnp.float32)], -1)
    w = weight.astype(jnp.float32)
    y = jnp.zeros((b, D, T), jnp.float32)
    for k in range(W):       # window_t[:, k] = full[:, :, Ls + t - (W-1) + k]
        lo = Ls - (W - 1) + k
        y = y + full[:, :, lo:lo + T] * w[:, k, None]
    if bias is not None:
        y = y + bias.astype(jnp.float32)[:, None]
    y = _activate(y, activation)
    y = jnp.where(bad[:, None, None], jnp.nan, y)
    out = jnp.swapaxes(y, 1, 2).astype(x.dtype)
    out = out[:, 0] if stp else out
    if not disable_state_update:
        new = full[:, :, T:].astype(conv_state.dtype)              # (b, D, Ls)
        conv_state = conv_state.at[jnp.where(ok, idx, S)].set(new, mode="drop")
    return ConvResult(out, conv_state)


def causal_conv1d(x, weight, bias=None, activation=None, initial_state=None):
    """Full-sequence causal depthwise conv1d (the prefill twin of causal_conv1d_update).

    x ``(b, L, dim)``, weight ``(dim, width)``, optional ``initial_state (b, dim, state_len)``
    (inputs before the sequence; zeros if None, state_len = width - 1). Returns
    ``(out (b, L, dim), final_state (b, dim, state_len))``: the final state is what
    ``causal_conv1d_update`` would hold after feeding the L inputs one at a time.
    """
    b, L, D = x.shape
    W = weight.shape[1]
    if initial_state is None:
        initial_state = jnp.zeros((b, D, max(W - 1, 0)), x.dtype)
    Ls = initial_state.shape[-1]
    full = jnp.concatenate([initial_state.astype(jnp.float32),
                            jnp.swapaxes(x, 1, 2).astype(jnp.float32)], -1)  # (b, D, Ls+L)
    w = weight.astype(jnp.float32)
    y = jnp.zeros((b, D, L), jnp.float32)
    for k in range(W):
        lo = Ls - (W - 1) + k
        y = y + full[:, :, lo:lo + L] * w[:, k, None]
    if bias is not None:
        y = y + bias.astype(jnp.float32)[:, None]
    y = _activate(y, activation)
    final = full[:, :, L:].astype(initial_state.dtype)
    return jnp.swapaxes(y, 1, 2).astype(x.dtype), final

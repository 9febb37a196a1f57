"""A layer-stacked decode cache and its per-layer use under ``lax.scan`` with zero copies.

A Mamba model with L layers keeps, per layer and slot, an SSM state and a conv state. Stacking
them as ``(L, S, ...)`` arrays lets one ``lax.scan`` run all layers, but the obvious per-layer
access (``cache[l]`` then ``cache.at[l].set(...)``) copies a whole layer per step. The trick
used here: view the stack as ``(L*S, ...)`` (a free reshape of the leading axes), carry the
whole flat cache through the scan, and address layer l's slot s as ``l*S + s``. The
``selective_state_update`` custom call aliases its state operand to its result and the conv
update is a scatter, so inside ``jax.jit(..., donate_argnums=...)`` the cache is updated in
place: the compiled HLO has no copy of it and no dynamic-update-slice of a layer.

    cache = allocate_layer_cache(L, S, H, P, N, conv_dim=D, d_conv=4)

    def layer(h, params, view):                 # view: LayerView of layer l
        xBC, view = view.causal_conv1d_update(xBC, w, b, "silu", conv_state_indices=slots)
        y, view = view.selective_state_update(x, dt, A, B, C, D, state_batch_indices=slots, ...)
        return h, view, None

    h, cache, _ = scan_layers(layer, cache, h, stacked_params)   # inside a donated jit
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

from . import conv as _conv
from .ops import selective_state_update as _kernel_ssu

__all__ = ["LayerCache", "LayerView", "allocate_layer_cache", "flat_slot_indices",
           "flat_pad_slot_id", "scan_layers"]

_FIELDS = ("ssm", "conv", "ssm_scale", "intermediate", "intermediate_scales")


def _register(cls, data, meta):
    return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))


@dataclasses.dataclass(frozen=True)
class LayerCache:
    """Decode cache of all layers (a pytree; donate it to the jitted step).

    ssm: ``(L, S, H, P, N)`` (Mamba-1: ``(L, S, P, N)``), float32/bfloat16/float16/int16.
    conv: ``(L, S, conv_dim, d_conv - 1)`` rolling conv inputs, or None.
    ssm_scale: ``(L, S, H, P)`` float32 block scales of an int16 ``ssm`` (else None).
    intermediate: ``(L, I, T, H, P, N)`` per-step states of speculative verification, or None.
    intermediate_scales: ``(L, I, T, H, P)`` float32 scales of an int16 ``intermediate``.
    """
    ssm: jax.Array
    conv: Optional[jax.Array] = None
    ssm_scale: Optional[jax.Array] = None
    intermediate: Optional[jax.Array] = None
    intermediate_scales: Optional[jax.Array] = None

    @property
    def num_layers(self) -> int:
        return self.ssm.shape[0]

    @property
    def num_slots(self) -> int:
        return self.ssm.shape[1]

    def view(self, layer=0) -> "LayerView":
        """The flat ``(L*S, ...)`` view (free reshapes), addressing layer ``layer``."""
        L = self.num_layers
        flat = lambda a: None if a is None else a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])
        rows = 0 if self.intermediate is None else self.intermediate.shape[1]
        return LayerView(*(flat(getattr(self, f)) for f in _FIELDS),
                         layer=jnp.asarray(layer, jnp.int32), num_layers=L,
                         num_slots=self.num_slots, num_rows=rows)


_register(LayerCache, _FIELDS, ())


def allocate_layer_cache(num_layers, num_slots, nheads, headdim, dstate, dtype=jnp.float32, *,
                         conv_dim=None, d_conv=4, conv_dtype=None, intermediate_rows=0,
                         cache_steps=0) -> LayerCache:
    """Zero-filled :class:`LayerCache`.

    ``nheads=None`` gives the Mamba-1 layout (no head axis). ``dtype=int16`` adds the float32
    ``ssm_scale`` (ones). ``conv_dim`` adds the conv state ``(L, S, conv_dim, d_conv - 1)`` in
    ``conv_dtype`` (default: float32, or ``dtype`` when it is a float type).
    ``intermediate_rows=I`` with ``cache_steps=T`` adds the intermediate buffer
    ``(L, I, T, H, P, N)`` (plus its scales when int16).
    """
    dtype = jnp.dtype(dtype)
    L, S = int(num_layers), int(num_slots)
    head = () if nheads is None else (int(nheads),)
    row = head + (int(headdim),)
    ssm = jnp.zeros((L, S) + row + (int(dstate),), dtype)
    scale = jnp.ones((L, S) + row, jnp.float32) if dtype == jnp.int16 else None
    conv = None
    if conv_dim is not None:
        if conv_dtype is None:
            conv_dtype = jnp.float32 if dtype == jnp.int16 else dtype
        conv = jnp.zeros((L, S, int(conv_dim), int(d_conv) - 1), conv_dtype)
    inter = inter_scales = None
    if intermediate_rows:
        if cache_steps <= 0:
            raise ValueError(f"cache_steps: expected > 0 with intermediate_rows, got {cache_steps}")
        shape = (L, int(intermediate_rows), int(cache_steps)) + row
        inter = jnp.zeros(shape + (int(dstate),), dtype)
        inter_scales = jnp.ones(shape, jnp.float32) if dtype == jnp.int16 else None
    return LayerCache(ssm, conv, scale, inter, inter_scales)


def flat_pad_slot_id(pad_slot_id: int) -> int:
    """The pad value used for flat indices: ``pad_slot_id`` if negative, else -1 (a
    non-negative pad could name a real slot of another layer in the flat view)."""
    return int(pad_slot_id) if int(pad_slot_id) < 0 else -1


def flat_slot_indices(indices, layer, num_slots, num_layers, pad_slot_id=-1):
    """Slot indices of layer ``layer`` in the flat ``(num_layers * num_slots, ...)`` view.

    Valid slots s in ``[0, num_slots)`` become ``layer * num_slots + s``; entries equal to
    ``pad_slot_id`` become ``flat_pad_slot_id(pad_slot_id)``; any other value (out of range)
    becomes ``num_layers * num_slots``, out of range of the flat view too, so the kernel's
    invalid-index handling (NaN output, no write) still applies instead of silently reaching
    another layer. ``layer`` may be a 1-D array (e.g. ``arange(L)``: the result
    gets a leading layer axis, all layers at once) or any array broadcasting against
    ``indices``.
    """
    idx = jnp.asarray(indices)
    dt = idx.dtype
    layer = jnp.asarray(layer, dt)
    if layer.ndim == 1:   # one value per layer: the result gets a leading layer axis
        layer = layer.reshape(layer.shape + (1,) * idx.ndim)
    ok = (idx >= 0) & (idx < num_slots)
    flat = jnp.where(ok, idx + layer * jnp.asarray(num_slots, dt),
                     jnp.asarray(num_layers * num_slots, dt))
    return jnp.where(idx == pad_slot_id, jnp.asarray(flat_pad_slot_id(pad_slot_id), dt), flat)


@dataclasses.dataclass(frozen=True)
class LayerView:
    """Flat view of a :class:`LayerCache` addressing one layer (a pytree: carry it through
    ``lax.scan``). Its arrays are ``(L*S, ...)`` / ``(L*I, ...)``; ``layer`` may be traced."""
    ssm: jax.Array
    conv: Optional[jax.Array]
    ssm_scale: Optional[jax.Array]
    intermediate: Optional[jax.Array]
    intermediate_scales: Optional[jax.Array]
    layer: jax.Array
    num_layers: int
    num_slots: int
    num_rows: int

    def at_layer(self, layer) -> "LayerView":
        return dataclasses.replace(self, layer=jnp.asarray(layer, jnp.int32))

    def stacked(self) -> LayerCache:
        """Back to the ``(L, S, ...)`` :class:`LayerCache` (free reshapes)."""
        L = self.num_layers
        unflat = lambda a: None if a is None else a.reshape((L, a.shape[0] // L) + a.shape[1:])
        return LayerCache(*(unflat(getattr(self, f)) for f in _FIELDS))

    def slots(self, indices, pad_slot_id=-1, batch=None):
        """This layer's flat slot indices for ``indices`` (``arange(batch)`` if None)."""
        if indices is None:
            indices = jnp.arange(batch, dtype=jnp.int32)
        return flat_slot_indices(indices, self.layer, self.num_slots, self.num_layers,
                                 pad_slot_id)

    def rows(self, indices, pad_slot_id=-1, batch=None):
        """This layer's flat intermediate-buffer rows for ``indices`` (``arange(batch)`` if
        None: rows are then positional, as in selective_state_update without indices)."""
        if indices is None:
            return jnp.arange(batch, dtype=jnp.int32) + self.layer * self.num_rows
        return flat_slot_indices(indices, self.layer, self.num_rows, self.num_layers,
                                 pad_slot_id)

    def selective_state_update(self, x, dt, A, B, C, D=None, *, state_batch_indices=None,
                               dst_state_batch_indices=None, intermediate_state_indices=None,
                               write_intermediate=False, pad_slot_id=-1, cu_seqlens=None,
                               ssu: Optional[Callable] = None, **kwargs: Any):
        """``selective_state_update`` on this layer's slots; returns ``(out, new view)``.

        Indices are this layer's own (``[0, S)``, as for a per-layer cache); they are offset
        into the flat view here (missing ``state_batch_indices`` mean entry b → slot b).
        ``write_intermediate=True`` passes this layer's intermediate buffer (rows from
        ``intermediate_state_indices``, or positional). Other keyword arguments (z, dt_bias,
        dt_softplus, num_accepted_tokens, disable_state_update, rand_seed, ...) go to ``ssu``
        (default ``jax_mamba.selective_state_update``; ``jax_mamba.reference`` has the same
        signature).
        """
        ssu = _kernel_ssu if ssu is None else ssu
        nb = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        sbi = self.slots(state_batch_indices, pad_slot_id, nb)
        dst = None if dst_state_batch_indices is None else self.slots(dst_state_batch_indices,
                                                                      pad_slot_id)
        extra = {}
        if write_intermediate:
            if self.intermediate is None:
                raise ValueError("write_intermediate: the cache has no intermediate buffer")
            extra = dict(intermediate_states_buffer=self.intermediate,
                         intermediate_state_indices=self.rows(intermediate_state_indices,
                                                              pad_slot_id, nb).astype(sbi.dtype),
                         intermediate_state_scales=self.intermediate_scales)
        elif intermediate_state_indices is not None:
            raise ValueError("intermediate_state_indices: needs write_intermediate=True")
        r = ssu(self.ssm, x, dt, A, B, C, D, state_batch_indices=sbi,
                dst_state_batch_indices=dst, pad_slot_id=flat_pad_slot_id(pad_slot_id),
                state_scale=self.ssm_scale, cu_seqlens=cu_seqlens, **extra, **kwargs)
        new = dataclasses.replace(self, ssm=r.state, ssm_scale=r.state_scale)
        if write_intermediate:
            new = dataclasses.replace(new, intermediate=r.intermediate_states_buffer,
                                      intermediate_scales=r.intermediate_state_scales)
        return r.out, new

    def causal_conv1d_update(self, x, weight, bias=None, activation=None,
                             conv_state_indices=None, pad_slot_id=-1,
                             disable_state_update=False):
        """``jax_mamba.conv.causal_conv1d_update`` on this layer's conv slots; returns
        ``(out, new view)``. Indices as in :meth:`selective_state_update`."""
        if self.conv is None:
            raise ValueError("conv: the cache has no conv state (allocate with conv_dim=...)")
        idx = self.slots(conv_state_indices, pad_slot_id, x.shape[0])
        r = _conv.causal_conv1d_update(self.conv, x, weight, bias, activation, idx,
                                       flat_pad_slot_id(pad_slot_id), disable_state_update)
        return r.out, dataclasses.replace(self, conv=r.conv_state)


_register(LayerView, _FIELDS + ("layer",), ("num_layers", "num_slots", "num_rows"))


def scan_layers(fn, cache: LayerCache, carry, xs=None, *, unroll=1):
    """``lax.scan`` over the layers of ``cache`` with the whole cache in the carry.

    ``fn(carry, x_l, view) -> (carry, view, y_l)`` is called with ``x_l`` the layer-l slice of
    ``xs`` (e.g. stacked parameters) and ``view`` the :class:`LayerView` addressing layer l.
    Returns ``(carry, cache, ys)``. Inside a jitted step that donates ``cache`` the cache is
    updated in place (no copy, no per-layer dynamic-update-slice).
    """
    L = cache.num_layers

    def body(c, inp):
        carry, view = c
        l, x = inp
        carry, view, y = fn(carry, x, view.at_layer(l))
        return (carry, view.at_layer(0)), y

    (carry, view), ys = lax.scan(body, (carry, cache.view(0)),
                                 (jnp.arange(L, dtype=jnp.int32), xs), unroll=unroll)
    return carry, view.stacked(), ys

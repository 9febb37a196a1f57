"""The typed contract of the jax_mamba_ssu FFI target, Python side: operand, result and
attribute tables (one copy; ffi/ssu_ffi.h holds the C++ one and tests/test_contract.py checks
them against what the compiled modules report), and the frame of one call built from them."""
from __future__ import annotations

import jax
import jax.numpy as jnp

TARGET = "jax_mamba_ssu"

# Operands in call order, named as the public arguments (and the Problem fields); all but the
# first six are optional: absent ones travel as zero-size placeholders flagged
# has_<operand>=False.
OPERANDS = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "state_batch_indices",
            "dst_state_batch_indices", "state_scale", "out", "intermediate_states_buffer",
            "intermediate_state_indices", "intermediate_state_scales", "cu_seqlens",
            "num_accepted_tokens", "rand_seed")
REQUIRED = OPERANDS[:6]
OPTIONAL = OPERANDS[6:]
# Results, each named after the operand whose buffer it aliases (`out` only when given).
RESULTS = ("out", "state", "state_scale", "intermediate_states_buffer",
           "intermediate_state_scales")
# (attribute, Python type): static settings, then the presence flags.
SETTINGS = (("pad_slot_id", int), ("dt_softplus", bool), ("disable_state_update", bool),
            ("philox_rounds", int), ("cache_steps", int), ("algorithm", str))
ATTRIBUTES = SETTINGS + tuple((f"has_{name}", bool) for name in OPTIONAL)

_INDEX = {name: i for i, name in enumerate(OPERANDS)}


def _placeholder_dtype(name, pb):
    if name in ("out", "z"):
        return pb.x.dtype
    if name == "intermediate_states_buffer":
        return pb.state.dtype
    if name in ("state_scale", "intermediate_state_scales"):
        return jnp.float32
    if name == "rand_seed":
        return jnp.uint32
    if name in ("D", "dt_bias"):
        return pb.dt.dtype
    return jnp.int32  # index operands


def frame(pb):
    """(operands, result shapes, input_output_aliases, attributes) of one call on Problem pb."""
    operands, attrs = [], {}
    for name in OPERANDS:
        arr = getattr(pb, name)
        if name in OPTIONAL:
            attrs[f"has_{name}"] = arr is not None
        operands.append(jnp.zeros((0,), _placeholder_dtype(name, pb)) if arr is None else arr)
    results, aliases = [], {}
    for i, name in enumerate(RESULTS):
        arr = operands[_INDEX[name]]
        if name == "out" and pb.out is None:
            results.append(jax.ShapeDtypeStruct(pb.x.shape, pb.x.dtype))
            continue
        results.append(jax.ShapeDtypeStruct(arr.shape, arr.dtype))
        # zero-size placeholders are not aliased (nothing to update in place)
        if arr.size or name == "state":
            aliases[_INDEX[name]] = i
    st = pb.settings
    attrs.update(pad_slot_id=int(st.pad_slot_id), dt_softplus=bool(st.dt_softplus),
                 disable_state_update=bool(st.disable_state_update),
                 philox_rounds=int(st.philox_rounds), cache_steps=st.cache_steps or 0,
                 algorithm=str(st.algorithm))  # cache_steps: longest sequence, 0 = no limit
    return operands, results, aliases, attrs

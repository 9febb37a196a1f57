"""selective_state_update through the jax_mamba_ssu XLA FFI target (CPU and CUDA handlers)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import _contract, _ffi, _lowering
from . import batching as _batching
from ._problem import Problem, SSUResult, build_problem

# Problem fields in operand order (the contract itself is in _contract.py).
_OPERANDS = tuple(field for _, field in _contract.OPERANDS)


def _target_platform(*arrays) -> str:
    """Platform the call will run on: that of concrete (committed) inputs, else JAX's default
    backend, which is where jit places a computation on uncommitted arguments."""
    for a in arrays:
        try:  # tracers have no devices: fall through to the default backend
            return next(iter(a.devices())).platform
        except Exception:  # noqa: BLE001 - any tracer / non-array
            continue
    return jax.default_backend()


def check_algorithm(pb: Problem, platform: str):
    """SPEC §3.5: an explicit strategy the CUDA kernels cannot run is a trace-time ValueError
    (on the CPU every value is accepted and ignored). Mirrors make_plan in ffi/ssu_cuda.cu:
    'horizontal' needs dstate in whole 16-byte state vectors and at most 1024, 'vertical'
    (shared-memory row-tile pipeline) the same and at most 256."""
    if platform in ("cpu",) or pb.algorithm in ("auto", "simple"):
        return
    per_vector = 4 if pb.state.dtype == jnp.float32 else 8  # 16-byte state vectors
    limit = 256 if pb.algorithm == "vertical" else 1024
    if pb.N % per_vector or pb.N > limit:
        raise ValueError(f"algorithm: '{pb.algorithm}' expected dstate to be a multiple of "
                         f"{per_vector} (16-byte {pb.state.dtype} vectors) and at most {limit}, "
                         f"got dstate={pb.N}; use 'auto' or 'simple'")


def _call(pb: Problem) -> SSUResult:
    # batching.call: vmap folds into the slot axis, sharded jit partitions (sharding.py);
    # a JVP raises the error that points to the differentiable reference
    operands, results, aliases, attrs = _contract.frame(pb)
    return pb.result(*_batching.call(operands, results, aliases, attrs,
                                     _lowering.plan_request(pb)))


def selective_state_update(
    state, x, dt, A, B, C, D, z=None, dt_bias=None, dt_softplus=False,
    state_batch_indices=None, pad_slot_id=-1, state_scale=None, out=None,
    disable_state_update=False, intermediate_states_buffer=None,
    intermediate_state_indices=None, intermediate_state_scales=None,
    rand_seed=None, philox_rounds=10, cache_steps=0, algorithm="auto",
    dst_state_batch_indices=None, cu_seqlens=None, num_accepted_tokens=None,
) -> SSUResult:
    """One Mamba decode step (or T speculative steps) over a cache of states.

    Same arguments, order and defaults as FlashInfer's ``selective_state_update``; shapes and
    semantics are in SPEC.md (§2-§3). Returns :class:`SSUResult` ``(out, state, state_scale,
    intermediate_states_buffer, intermediate_state_scales)``. The state, its scales, the
    intermediate buffers and a given ``out`` are aliased to the results, so inside
    ``jax.jit(..., donate_argnums=...)`` they are updated in place.
    """
    pb = build_problem(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices,
                       pad_slot_id, state_scale, out, disable_state_update,
                       intermediate_states_buffer, intermediate_state_indices,
                       intermediate_state_scales, rand_seed, philox_rounds, cache_steps,
                       algorithm, dst_state_batch_indices, cu_seqlens, num_accepted_tokens)
    platform = _target_platform(state, x)
    _ffi.require_handler(platform)
    check_algorithm(pb, platform)
    return _call(pb)

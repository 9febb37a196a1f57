"""selective_state_update through the jax_mamba_ssu XLA FFI target (CPU and CUDA handlers)."""
from __future__ import annotations

from . import _contract, _lowering
from . import batching as _batching
from ._problem import Problem, Restore, SSUResult, public_function


def _call(pb: Problem, restore: Restore) -> SSUResult:
    # the platform-specific checks (CUDA planner, a build without CUDA) happen when lowering
    # batching.call: vmap folds into the slot axis, sharded jit partitions (sharding.py)
    operands, results, aliases, attrs = _contract.frame(pb)
    return restore(*_batching.call(operands, results, aliases, attrs,
                                     _lowering.plan_request(pb)))


selective_state_update = public_function(_call, __name__, """One Mamba decode step (or T speculative steps) over a cache of states.

Same arguments, order and defaults as FlashInfer's ``selective_state_update``; shapes and
semantics in docs/semantics.md (SPEC §2-§3). Returns :class:`SSUResult` ``(out, state,
state_scale, intermediate_states_buffer, intermediate_state_scales)``. The state, its scales,
the intermediate buffers and a given ``out`` are aliased to the results, so inside
``jax.jit(..., donate_argnums=...)`` they are updated in place.""")

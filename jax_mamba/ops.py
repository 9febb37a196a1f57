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


selective_state_update = public_function(_call, __name__, """\
One Mamba decode step (or T speculative steps) over a cache of states, in place.

Same arguments, order and defaults as FlashInfer's ``flashinfer.mamba.selective_state_update``.
Runs the CPU or CUDA handler of the ``jax_mamba_ssu`` XLA FFI target under ``jax.jit``,
``vmap``, ``lax.scan`` and sharded ``jit``; not differentiable (differentiate
``jax_mamba.reference.selective_state_update``, same signature, instead).

Returns:
  SSUResult(out, state, state_scale, intermediate_states_buffer, intermediate_state_scales):
  ``out`` like x (x's dtype), then the updated buffers, None where the argument was not given.

In place: state, state_scale, intermediate_states_buffer, intermediate_state_scales and a
given ``out`` are aliased to the results. Inside ``jax.jit(..., donate_argnums=...)`` with
them donated, XLA updates them in place (no copy); use the returned arrays and never the
donated inputs afterwards. Without donation XLA copies them first and the inputs stay valid.

Example (STP, Mamba-2, H=4 heads of P=8, N=16, G=2 groups, b=3 entries over S=8 slots)::

  state = jnp.zeros((8, 4, 8, 16), jnp.bfloat16)
  x, dt = jnp.ones((3, 4, 8)), jnp.ones((3, 4))
  A, D = -jnp.ones((4,)), jnp.ones((4,))
  B = C = jnp.ones((3, 2, 16))
  step = jax.jit(lambda s, i: jax_mamba.selective_state_update(
      s, x, dt, A, B, C, D, dt_softplus=True, state_batch_indices=i), donate_argnums=0)
  r = step(state, jnp.array([5, 0, 2], jnp.int32))      # r.out (3, 4, 8); r.state (8, 4, 8, 16)

Shapes and dtypes in docs/shapes.md, semantics in docs/semantics.md, errors in docs/errors.md,
JAX integration in docs/jax.md.""")

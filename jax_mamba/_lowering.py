"""The jax_mamba_ssu primitive: one call of the FFI target, lowered per platform at lowering
time (the platform comes from the lowering context, never from where the inputs live). CPU:
the call. CUDA: refuses, with a ValueError naming the cause, what the CUDA planner (the same
C++ as the handler's, ssu_plan.cc) cannot run, and fails clearly on a build without CUDA."""
from __future__ import annotations

import functools

import jax
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import mlir

from . import _contract, _cpu, _ffi

NOT_DIFFERENTIABLE = (
    "jax_mamba.selective_state_update has no derivative (it is an in-place inference kernel); "
    "differentiate jax_mamba.reference.selective_state_update instead (same signature, pure jnp)")

# Used when the device cannot be asked (lowering for CUDA on a machine without one, e.g.
# jax.export): an H100/H200 (132 SMs, 227 KiB of opt-in shared memory per block).
NOMINAL_DEVICE = (132, 232448)

ssu_p = Primitive("jax_mamba_ssu")
ssu_p.multiple_results = True


def bind(operands, results, aliases, attrs, plan):
    """One kernel call: the primitive on a frame (_contract.frame) and a plan request."""
    return tuple(ssu_p.bind(
        *operands, results=tuple((tuple(r.shape), np.dtype(r.dtype)) for r in results),
        aliases=tuple(sorted(dict(aliases).items())), attrs=tuple(sorted(dict(attrs).items())),
        plan=tuple(plan)))


def plan_request(pb):
    """What the CUDA planner needs to know about pb, as (name, value) pairs."""
    rows = pb.x.shape[0] if pb.mode == "varlen" else pb.nb * pb.T
    S, H, P, N = pb.dims
    inter = pb.intermediate_states_buffer
    return (("S", S), ("H", H), ("P", P), ("N", N), ("nb", pb.nb), ("T", pb.T), ("rows", rows),
            ("state_dtype", np.dtype(pb.state.dtype).name), ("varlen", pb.mode == "varlen"),
            ("has_inter", inter is not None), ("I", 0 if inter is None else inter.shape[0]),
            ("CS", 0 if inter is None else inter.shape[1]),
            ("cache_steps", pb.settings.cache_steps or 0), ("algorithm", pb.settings.algorithm))


def cuda_refusal(plan, device=None):
    """None when the CUDA kernels can run the planned problem, else why not."""
    sms, smem_optin = device or _device_limits()
    planner = _ffi._cuda or _cpu  # the same ssu_plan.cc in both modules
    kernel, why = planner.plan(**dict(plan), sms=sms, smem_optin=smem_optin)
    return why or None


def _device_limits():
    if _ffi._cuda is not None:
        try:
            return _ffi._cuda.device_limits()
        except RuntimeError:  # no usable device here (cross-lowering)
            pass
    return NOMINAL_DEVICE


def _ffi_function(results, aliases, attrs):
    ffi = jax.ffi.ffi_call(_contract.TARGET,
                           [jax.ShapeDtypeStruct(s, d) for s, d in results],
                           input_output_aliases=dict(aliases), vmap_method="sequential")
    return functools.partial(ffi, **dict(attrs))


@ssu_p.def_impl
def _impl(*operands, results, aliases, attrs, plan):
    """Eager evaluation (reached under jax.disable_jit: calls are jitted otherwise): the FFI
    call itself, whose own eager path compiles it; a strategy CUDA cannot run is then refused
    by the handler's planner instead of at lowering."""
    return _ffi_function(results, aliases, attrs)(*operands)


@ssu_p.def_abstract_eval
def _abstract(*operands, results, aliases, attrs, plan):
    return [jax.core.ShapedArray(s, d) for s, d in results]


def _lower_cpu(ctx, *operands, results, aliases, attrs, plan):
    fn = _ffi_function(results, aliases, attrs)
    return mlir.lower_fun(lambda *o: fn(*o), multiple_results=True)(ctx, *operands)


def _lower_cuda(ctx, *operands, results, aliases, attrs, plan):
    _ffi.require_handler("cuda")
    why = cuda_refusal(plan)
    if why is not None:
        algorithm = dict(plan)["algorithm"]
        if algorithm == "auto":
            raise ValueError(f"selective_state_update: the CUDA kernels cannot run this problem: "
                             f"{why}")
        raise ValueError(f"{why}; use 'auto' or 'simple'")
    return _lower_cpu(ctx, *operands, results=results, aliases=aliases, attrs=attrs, plan=plan)


mlir.register_lowering(ssu_p, _lower_cpu, platform="cpu")
mlir.register_lowering(ssu_p, _lower_cuda, platform="cuda")

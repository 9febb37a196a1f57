"""device_copy: the jax_mamba_copy FFI target (cudaMemcpyAsync device-to-device on CUDA, memcpy
on the CPU). The benchmark's bandwidth ceiling: unlike an XLA elementwise pass it is the copy
a hand-written kernel is judged against (SPEC §5)."""
import jax
import jax.numpy as jnp

from . import _ffi  # registers the targets

TARGET = "jax_mamba_copy"


def device_copy(x):
    """A fresh buffer with the bytes of ``x`` (same shape and dtype; never aliased)."""
    x = jnp.asarray(x)
    try:  # concrete arrays name their platform; under jit fall back to the default backend
        platform = next(iter(x.devices())).platform
    except Exception:  # noqa: BLE001 - tracers have no devices
        platform = jax.default_backend()
    _ffi.require_handler(platform)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype),
                            vmap_method="broadcast_all")
    return call(x)

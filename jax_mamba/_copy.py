"""The benchmark's copies (docs/performance.md, "Ceiling").

device_copy: the jax_mamba_copy FFI target (cudaMemcpyAsync device-to-device on CUDA, memcpy on
the CPU) inside an XLA program: the benchmark's L2 flush, and its ceiling on the CPU.

cuda_ceiling: the ceiling on a GPU, measured outside XLA the way torch times its `copy_` (one
launch per timing between two CUDA events, median after warm-up) by two methods, a device-to-
device cudaMemcpyAsync and a 16-byte-vector SM copy kernel; the faster is the ceiling. A chain
of the FFI copy inside one jitted function is not a ceiling: on an H200 it read 2700 GB/s where
a single cudaMemcpy reads ~4200.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from . import _ffi  # registers the targets

TARGET = "jax_mamba_copy"
MIN_CEILING_BYTES = 256 << 20  # cuda_ceiling halves its buffers on OOM down to this size


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


@dataclasses.dataclass(frozen=True)
class Ceiling:
    """A bandwidth ceiling: `gbs` (bytes read + written per second / 1e9) of `method`, the
    faster of those measured. memcpy_gbs: cudaMemcpyAsync device to device (on the CPU: the FFI
    memcpy chain); kernel_gbs: the SM copy kernel (None on the CPU). write_gbs: bytes written
    per second by cudaMemsetAsync over the same buffer (None on the CPU): a reference for
    write-heavy calls (MTP with intermediate states writes T + 1 states per state read), not a
    ceiling."""
    gbs: float
    method: str                  # "memcpy", "sm_kernel" or "memcpy_chain" (CPU)
    memcpy_gbs: float
    kernel_gbs: Optional[float]
    bytes: int                   # read + written by one copy
    buffer_mb: float             # size of the copied buffer actually used
    seconds: float               # one copy by `method`
    note: Optional[str] = None   # e.g. the buffer was smaller than asked for
    write_gbs: Optional[float] = None  # cudaMemsetAsync, bytes written only (None on the CPU)

    @classmethod
    def best_of(cls, memcpy_gbs, kernel_gbs, nbytes, buffer_mb, note=None, cpu=False,
                write_gbs=None):
        """The faster of the two methods (kernel_gbs None: memcpy only)."""
        use_kernel = kernel_gbs is not None and kernel_gbs > memcpy_gbs
        gbs = kernel_gbs if use_kernel else memcpy_gbs
        method = "sm_kernel" if use_kernel else ("memcpy_chain" if cpu else "memcpy")
        return cls(gbs=gbs, method=method, memcpy_gbs=memcpy_gbs, kernel_gbs=kernel_gbs,
                   bytes=int(nbytes), buffer_mb=buffer_mb, seconds=nbytes / (gbs * 1e9),
                   note=note, write_gbs=write_gbs)


def cuda_ceiling(device, nbytes: int, reps: int = 20, warmup: int = 3,
                 min_nbytes: int = MIN_CEILING_BYTES) -> Ceiling:
    """The copy ceiling of CUDA `device` (a jax Device) over a buffer of `nbytes`: cudaMemcpyAsync
    and the SM copy kernel (and the write-only memset beside them), each `warmup` untimed then
    `reps` event-timed launches (median).
    The buffers are cudaMalloc'ed here and freed before returning; when `nbytes` does not fit
    they are halved down to `min_nbytes`, and the result's `note` says so."""
    if device.platform not in ("gpu", "cuda"):
        raise ValueError(f"cuda_ceiling: device must be a CUDA GPU, got platform "
                         f"{device.platform!r}")
    _ffi.require_handler(device.platform)
    ordinal = getattr(device, "local_hardware_id", None)
    ordinal = device.id if ordinal is None else ordinal
    memcpy_gbs, kernel_gbs, moved, buffer, _grid, write_gbs = _ffi._cuda.copy_ceiling(
        int(nbytes), int(reps), int(warmup), int(ordinal), int(min_nbytes))
    note = None
    if buffer < nbytes - (nbytes % (1 << 20)):
        note = (f"cudaMalloc of 2 x {nbytes / 2**20:.0f} MiB failed; measured over "
                f"2 x {buffer / 2**20:.0f} MiB instead")
    return Ceiling.best_of(memcpy_gbs, kernel_gbs, moved, buffer / 2**20, note,
                           write_gbs=write_gbs)

"""jax_mamba: Mamba's selective_state_update for JAX as XLA FFI kernels (CUDA and CPU)."""
from . import reference
from ._ffi import HAS_CUDA
from ._problem import SSUResult
from .ops import selective_state_update

__all__ = ["selective_state_update", "SSUResult", "reference", "HAS_CUDA"]
__version__ = "0.1.0"

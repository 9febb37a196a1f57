"""jax_mamba: Mamba's selective_state_update for JAX as XLA FFI kernels (CUDA and CPU)."""
from . import reference
from ._ffi import HAS_CUDA
from ._problem import SSUResult
from .checked import checked, checked_selective_state_update, runtime_faults
from .ops import selective_state_update

__all__ = ["selective_state_update", "SSUResult", "reference", "HAS_CUDA", "checked",
           "checked_selective_state_update", "runtime_faults"]
__version__ = "0.1.0"

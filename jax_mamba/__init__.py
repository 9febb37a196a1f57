"""jax_mamba: Mamba's selective_state_update for JAX as XLA FFI kernels (CUDA and CPU)."""
from . import cache, conv, reference, speculative
from ._ffi import HAS_CUDA
from ._problem import SSUResult
from .cache import LayerCache, LayerView, allocate_layer_cache, scan_layers
from .checked import checked, checked_selective_state_update, runtime_faults
from .conv import causal_conv1d, causal_conv1d_update
from .ops import selective_state_update

__all__ = ["selective_state_update", "SSUResult", "reference", "HAS_CUDA", "checked",
           "checked_selective_state_update", "runtime_faults", "cache", "conv", "speculative",
           "LayerCache", "LayerView", "allocate_layer_cache", "scan_layers", "causal_conv1d",
           "causal_conv1d_update"]
__version__ = "0.1.0"

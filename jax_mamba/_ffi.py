"""Registers the compiled handlers under one target name for the CPU and, when built, CUDA."""
import jax

try:
    from . import _cpu
except ImportError as _e:  # the source tree without its compiled modules (e.g. a checkout)
    import os as _os
    raise ImportError(
        f"jax_mamba: the compiled CPU module (_cpu) is missing next to {_os.path.dirname(__file__)}. "
        "This is probably the source tree shadowing the installed package: run from outside "
        "the repository, or install in development mode with `pip install -e .` (needs "
        "scikit-build-core and nanobind for --no-build-isolation), or build in-tree as "
        "scripts/gpu_session.sh does.") from _e

from ._contract import TARGET  # noqa: E402, F401 (the target name, re-exported)

try:
    from . import _cuda  # built only when nvcc was found at install time
except ImportError:
    _cuda = None

HAS_CUDA = _cuda is not None

for _name, _capsule in _cpu.registrations().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")

# Without the CUDA module, a handler that only returns "built without CUDA" is registered for
# the CUDA platform, so a GPU computation fails with that message instead of a missing target.
_gpu = _cuda.registrations() if HAS_CUDA else _cpu.missing_cuda_registrations()
for _name, _capsule in _gpu.items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")

MISSING_CUDA = ("jax_mamba was built without CUDA (at install time JAX_MAMBA_CUDA=AUTO found no "
                "nvcc or no NVIDIA driver, or JAX_MAMBA_CUDA=OFF); reinstall with nvcc on PATH "
                "and JAX_MAMBA_CUDA=ON (docs/install.md), or run on the CPU / use "
                "jax_mamba.reference")


def require_handler(platform: str):
    """Lowering for a GPU without the CUDA module fails clearly at trace time (the
    registered fallback handler still catches what this cannot see, e.g. a later transfer)."""
    if platform in ("gpu", "cuda") and not HAS_CUDA:
        raise RuntimeError(f"{MISSING_CUDA} (computation targets platform {platform!r})")

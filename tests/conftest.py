import contextlib
import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import jax_mamba  # noqa: E402


def _gpu_devices():
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


PLATFORMS = ["cpu"] + (["gpu"] if _gpu_devices() and jax_mamba.HAS_CUDA else [])


@pytest.fixture(params=PLATFORMS)
def device(request):
    """Every correctness test runs once per available platform (CPU always, GPU when built)."""
    return jax.devices(request.param)[0]


def x64(enabled=True):
    """int64 indices need jax_enable_x64; scope it to the test."""
    if enabled:
        return jax.enable_x64(True)
    return contextlib.nullcontext()

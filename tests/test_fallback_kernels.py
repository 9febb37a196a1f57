"""The other kernels on the GPU (JAX_MAMBA_CUDA_FAST=0, read once per process, sends every call
to them instead of the fast path ssu_fast / ssu_fast_mtp; they also run what the fast path does
not cover): the GPU kernel cases, the invalid-index, in-place and op tests run again in a child
process with the switch off, after checking there that the switch reached the planner.
Skipped without a GPU (the planner's side runs everywhere: tests/test_plan.py)."""
import os
import subprocess
import sys

import pytest

from conftest import PLATFORMS

pytestmark = pytest.mark.skipif("gpu" not in PLATFORMS, reason="needs a GPU and the CUDA module")

HERE = os.path.dirname(os.path.abspath(__file__))


def _child(args, timeout):
    env = dict(os.environ, JAX_MAMBA_CUDA_FAST="0")
    return subprocess.run([sys.executable, *args], env=env, cwd=HERE, capture_output=True,
                          text=True, timeout=timeout)


def test_switch_reaches_the_planner():
    code = ("from jax_mamba import _ffi; "
            "print(_ffi._cuda.plan(S=64, H=64, P=64, N=128, nb=64, T={T}, rows=64 * {T}, "
            "state_dtype='bfloat16', varlen=False, has_inter=False, I=0, CS=0, cache_steps=0, "
            "algorithm='auto', sms=132, smem_optin=232448)[0])")
    for T, kernel in ((1, "ssu_simple_step1"), (4, "ssu_simple")):
        r = _child(["-c", code.format(T=T)], 120)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.split()[-1] == kernel


@pytest.mark.parametrize("module", ["test_kernel_cases.py", "test_invalid.py", "test_inplace.py",
                                    "test_ops.py"])
def test_gpu_tests_on_the_other_kernels(module):
    r = _child(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "gpu", module], 1200)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-2000:])

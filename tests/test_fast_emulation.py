"""The CUDA fast path (ssu_fast / ssu_fast_mtp) checked on the CPU through its host emulation
(ffi/ssu_cuda_emu.h: the kernel source compiled for the host, one thread per lane): with
JAX_MAMBA_CPU_EMULATE_FAST=1 (and the fast path not switched off by JAX_MAMBA_CUDA_FAST=0) the
CPU handler runs every call the fast path covers through the emulated kernel instead of its
own loop. This checks the kernels'
indexing, validity, write and rounding logic against the oracle without a GPU; it says nothing
about what only a GPU shows (the GPU suite runs the same tests on the fast path there).
Skipped when the CPU module was built without the CUDA headers."""
import os
import subprocess
import sys

import pytest

from jax_mamba import _cpu

pytestmark = pytest.mark.skipif(not _cpu.emulation()["available"],
                                reason="CPU module built without the CUDA headers")

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, JAX_MAMBA_CUDA_FAST="1", JAX_MAMBA_CPU_EMULATE_FAST="1")

CHECK = r"""
import numpy as np, jax.numpy as jnp
import jax_mamba
from jax_mamba import _cpu
r = np.random.default_rng(0)
S, H, P, N, G, b, T = 8, 4, 16, 16, 2, 3, 3
f = lambda *s: r.standard_normal(s).astype(np.float32)
for mtp in (False, True):
    for sd in (np.float32, jnp.bfloat16, np.int16):
        st = (r.integers(-3000, 3000, (S, H, P, N)) if sd == np.int16 else f(S, H, P, N)).astype(sd)
        tok = (b, T) if mtp else (b,)
        args = (st, f(*tok, H, P), np.abs(f(*tok, H)), -np.abs(f(H)), f(*tok, G, N), f(*tok, G, N), f(H))
        kw = dict(state_batch_indices=np.array([5, 1, 2], np.int32), dt_softplus=True,
                  z=f(*tok, H, P), dt_bias=f(H))
        if sd == np.int16:
            kw["state_scale"] = np.abs(f(S, H, P)) * 1e-3
        before = _cpu.emulation()["calls"]
        res = jax_mamba.selective_state_update(*args, **kw)
        ref = jax_mamba.reference.selective_state_update(*args, **kw)
        assert _cpu.emulation()["calls"] == before + 1, "the call did not take the emulated fast path"
        np.testing.assert_allclose(np.asarray(res.out), np.asarray(ref.out), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(res.state, np.float32), np.asarray(ref.state, np.float32),
                                   rtol=1e-2, atol=1)
print("OK", _cpu.emulation()["calls"])
"""


def test_calls_take_the_emulated_fast_path():
    r = subprocess.run([sys.executable, "-c", CHECK], env=ENV, cwd=HERE, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-2:] == ["OK", "6"], r.stdout[-500:]


RUN = ("import sys, pytest; rc = pytest.main(sys.argv[1:]); from jax_mamba import _cpu; "
       "print('EMULATED', _cpu.emulation()['calls']); sys.exit(rc)")


# (test_degenerate.py's CPU cases take 9 minutes emulated on 2 cores: left to manual runs)
@pytest.mark.parametrize("modules", [["test_kernel_cases.py", "test_invalid.py"],
                                     ["test_inplace.py"]])
def test_cpu_tests_on_the_emulated_fast_path(modules):
    """The oracle-checked CPU tests again, each call the fast path covers run by the emulated
    kernel (the child counts them; tests in child processes of their own count there)."""
    r = subprocess.run([sys.executable, "-c", RUN, "-q", "-x", "-p", "no:cacheprovider", "-k", "cpu",
                        *modules], env=ENV, cwd=HERE, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-2000:])
    emulated = int(r.stdout.split("EMULATED")[-1].split()[0])
    assert emulated > 0, "no call took the emulated fast path"

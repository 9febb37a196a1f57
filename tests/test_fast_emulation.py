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

import numpy as np
import pytest

from jax_mamba import _cpu

pytestmark = pytest.mark.skipif(not _cpu.emulation()["available"],
                                reason="CPU module built without the CUDA headers")

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, JAX_MAMBA_CUDA_FAST="1", JAX_MAMBA_CPU_EMULATE_FAST="1")

CHECK = r"""
import numpy as np, jax, jax.numpy as jnp
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
        res = jax.block_until_ready(jax_mamba.selective_state_update(*args, **kw))
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


SR_CASES = r"""
import sys, numpy as np, jax, jax.numpy as jnp
import jax_mamba
from jax_mamba import _cpu
r = np.random.default_rng(3)
S, H, P, G, b, T = 16, 3, 40, 1, 3, 3
f = lambda *s: r.standard_normal(s).astype(np.float32)
i32 = lambda *v: np.array(v, np.int32)
res = {}
for sd in ("bfloat16", "float16"):
    dt = jnp.dtype(sd)
    for case in ("stp", "stp_pad", "stp_elem", "mtp_inter", "mtp_2d"):
        mtp = case.startswith("mtp")
        N = 16 if case == "stp_elem" else 32
        tok = (b, T) if mtp else (b,)
        st = (f(S, H, P, N) * 3).astype(dt)
        kw = dict(dt_softplus=True, z=f(*tok, H, P), rand_seed=np.int32(977 + len(case)),
                  state_batch_indices=i32(5, -1, 2) if case == "stp_pad" else i32(5, 1, 2))
        A, dtv, D = -np.abs(f(H)), f(*tok, H), f(H)
        if case == "stp_elem":  # per-element parameters: the ELEM instances
            A, dtv, D = -np.abs(f(H, P, N)), f(*tok, H, P), f(H, P)
        kw["dt_bias"] = f(*D.shape)
        if case == "mtp_inter":
            kw["intermediate_states_buffer"] = (f(4, T, H, P, N)).astype(dt)
            kw["intermediate_state_indices"] = i32(3, 0, 2)
        if case == "mtp_2d":  # the state written after every step, each to a slot of its own
            kw["state_batch_indices"] = i32(*range(b * T)).reshape(b, T) % 7
            kw["dst_state_batch_indices"] = i32(*range(b * T)).reshape(b, T) + 7
        before = _cpu.emulation()["calls"]
        out = jax_mamba.selective_state_update(st, f(*tok, H, P), dtv, A, f(*tok, G, N),
                                               f(*tok, G, N), D, **kw)
        out = jax.block_until_ready(out)  # dispatch is asynchronous: count once it has run
        res[f"{sd}-{case}-calls"] = np.int64(_cpu.emulation()["calls"] - before)
        res[f"{sd}-{case}-out"] = np.asarray(out.out)
        res[f"{sd}-{case}-state"] = np.asarray(out.state).view(np.uint16)
        if out.intermediate_states_buffer is not None:
            res[f"{sd}-{case}-inter"] = np.asarray(out.intermediate_states_buffer).view(np.uint16)
np.savez(sys.argv[1], **res)
"""


def _sr_run(tmp_path, name, env):
    path = str(tmp_path / f"{name}.npz")
    r = subprocess.run([sys.executable, "-c", SR_CASES, path], env=env, cwd=HERE,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(np.load(path))


def test_stochastic_rounding_on_the_emulated_fast_path(tmp_path):
    """Stochastic rounding (bfloat16 / float16 states, STP with and without per-element
    parameters, MTP with an intermediate buffer and with 2-D indices writing every step) through
    the emulated ssu_fast / ssu_fast_mtp stores the same bits as the CPU handler's own loop, for
    1, 2 and 4 rows per thread: one Philox call per 16-byte vector draws the bits docs/semantics.md
    assigns to its 8 elements."""
    plain = _sr_run(tmp_path, "cpu", dict(os.environ, JAX_MAMBA_CPU_EMULATE_FAST="0"))
    for rows in ("", "2", "4"):
        env = dict(ENV, JAX_MAMBA_CUDA_ROWS=rows, JAX_MAMBA_CUDA_THREADS="32" if rows else "")
        emu = _sr_run(tmp_path, f"emu{rows}", env)
        assert set(emu) == set(plain)
        wrong = []
        for k in sorted(emu):
            if k.endswith("-calls"):
                assert emu[k] == 1, f"{k} (rows {rows or 'planned'}): expected 1 emulated call, got {emu[k]}"
                assert plain[k] == 0, f"{k}: the CPU run was emulated"
            elif k.endswith("-out"):  # the row sums' order differs (lane shuffles)
                np.testing.assert_allclose(emu[k], plain[k], rtol=1e-5, atol=1e-5, err_msg=k)
            else:
                bad = emu[k] != plain[k]
                if bad.any():
                    wrong.append(f"{k}: {bad.sum()} of {bad.size} differ, first at "
                                 f"{tuple(int(i) for i in np.argwhere(bad)[0])}")
        assert not wrong, (f"rows {rows or 'planned'}: stored values differ from the CPU "
                           f"handler's: " + "; ".join(wrong))


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

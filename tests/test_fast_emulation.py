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


def _sr_run(tmp_path, name, env, code=SR_CASES):
    path = str(tmp_path / f"{name}.npz")
    r = subprocess.run([sys.executable, "-c", code, path], env=env, cwd=HERE,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(np.load(path))


def _compare_with_cpu(emu, plain, rows, check_out):
    """One emulated run (`rows` per thread, '' as planned) against the CPU handler's: every case
    emulated exactly once (and the CPU run not at all), `check_out(label, emulated, cpu)` on each
    output (label: its key and `rows`), and every other stored array (states, intermediates,
    scales) equal bit for bit."""
    assert set(emu) == set(plain)
    wrong = []
    for k in sorted(emu):
        if k.endswith("-calls"):
            assert emu[k] == 1, f"{k} (rows {rows or 'planned'}): expected 1 emulated call, got {emu[k]}"
            assert plain[k] == 0, f"{k}: the CPU run was emulated"
        elif k.endswith("-out"):
            check_out(f"{k} (rows {rows or 'planned'})", emu[k], plain[k])
        else:
            bad = emu[k] != plain[k]
            if bad.any():
                wrong.append(f"{k}: {bad.sum()} of {bad.size} differ, first at "
                             f"{tuple(int(i) for i in np.argwhere(bad)[0])}")
    assert not wrong, (f"rows {rows or 'planned'}: stored values differ from the CPU "
                       f"handler's: " + "; ".join(wrong))


def _sr_out_close(label, a, b):  # the row sums' order differs (lane shuffles)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=label)


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
        _compare_with_cpu(emu, plain, rows, _sr_out_close)


# The child scripts' record of one call: out as float32, every stored array (state, int16
# scales, intermediate buffers and their scales) as raw bits for a bit-for-bit comparison.
SAVE_STORED = r"""
import numpy as np
def save_stored(res, key, o):
    res[key + "-out"] = np.asarray(o.out, np.float32)
    for field in ("state", "state_scale", "intermediate_states_buffer",
                  "intermediate_state_scales"):
        v = getattr(o, field)
        if v is not None:
            v = np.asarray(v)
            res[f"{key}-{field}"] = v.view(np.uint16 if v.dtype.itemsize == 2 else np.uint32)
"""

VARLEN_CASES = SAVE_STORED + r"""
import contextlib, sys, numpy as np, jax, jax.numpy as jnp
import jax_mamba
from jax_mamba import _cpu
r = np.random.default_rng(11)
f = lambda *s: r.standard_normal(s).astype(np.float32)
S, H, G, P = 40, 2, 1, 16
res = {}
# (state, input) dtypes: every state dtype, both input dtypes the varlen kernel is built for
for sd, it in (("float32", "float32"), ("bfloat16", "bfloat16"), ("float16", "float32"),
               ("int16", "bfloat16")):
    for case in ("pads", "nacc_2d", "nacc_2d_i64", "inter", "invalid", "bad_cu", "sr_2d",
                 "sr_inter"):
        if case.startswith("sr") and sd not in ("bfloat16", "float16"):
            continue
        if case == "nacc_2d_i64" and sd != "float32":  # int64 cu_seqlens and indices: once
            continue
        i32 = lambda v: np.asarray(v, np.int64 if case.endswith("i64") else np.int32)
        N = 128 if case in ("nacc_2d", "sr_2d") else 64
        lens = {"pads": [3, 1, 0, 4, 2], "nacc_2d": [2, 3, 1, 3], "nacc_2d_i64": [3, 0, 2, 1],
                "inter": [4, 1, 3, 0, 2],
                "invalid": [2, 3, 1, 2], "bad_cu": [0] * 5, "sr_2d": [3, 1, 2],
                "sr_inter": [1, 4, 2]}[case]
        nb = len(lens)
        cu = np.concatenate([[0], np.cumsum(lens)]) + 1  # row 0 and the last row: no sequence
        rows = int(cu[-1]) + 1
        if case == "bad_cu":  # 1 decreasing, 2 overlaps 0, 3 valid, 4 beyond the rows; row 0: none
            cu, rows = np.array([1, 4, 2, 6, 8, 12]), 11
        dt = jnp.dtype(sd)
        if sd == "int16":
            st = r.integers(-3000, 3000, (S, H, P, N)).astype(np.int16)
        else:
            st = (f(S, H, P, N) * 2).astype(dt)
        tok = lambda *s: f(rows, *s).astype(jnp.dtype(it))
        kw = dict(cu_seqlens=i32(cu), dt_softplus=True, z=tok(H, P), dt_bias=f(H),
                  state_batch_indices=i32(r.permutation(8)[:nb]),
                  out=jnp.full((rows, H, P), 7777.0, jnp.dtype(it)))  # unwritten rows show
        if sd == "int16":
            kw["state_scale"] = np.abs(f(S, H, P)) * 1e-3 + 1e-4
        if case == "pads":  # a padded sequence reads zeros; 1-D dst, one of them a pad
            kw["state_batch_indices"] = i32([5, -1, 2, 0, 7])
            kw["dst_state_batch_indices"] = i32([9, 10, 11, -1, 12])
        if case in ("nacc_2d", "nacc_2d_i64", "sr_2d", "invalid"):  # 2-D, num_accepted_tokens
            K = 4
            src = r.permutation(16)[:nb * K].reshape(nb, K)
            dst = 16 + r.permutation(S - 16)[:nb * K].reshape(nb, K)
            src[1, 0], dst[0, 1], dst[2, 0] = -1, -1, -1
            kw["state_batch_indices"] = i32(src)
            kw["dst_state_batch_indices"] = i32(dst)
            kw["num_accepted_tokens"] = i32(r.integers(0, K + 1, nb))
            if case == "invalid":  # 1: slot out of range; 3: a write beyond the cache
                kw["num_accepted_tokens"] = i32([1, 2, 0, 3])
                src[1, 1] = 99
                dst[3, 1] = S + 5
                kw["state_batch_indices"] = i32(src)
                kw["dst_state_batch_indices"] = i32(dst)
        if case in ("inter", "sr_inter"):  # intermediate rows, one a pad; CS the longest
            I, CS = nb + 2, max(lens)
            if sd == "int16":
                kw["intermediate_states_buffer"] = r.integers(-50, 50, (I, CS, H, P, N)).astype(np.int16)
                kw["intermediate_state_scales"] = np.abs(f(I, CS, H, P))
            else:
                kw["intermediate_states_buffer"] = f(I, CS, H, P, N).astype(dt)
            kw["intermediate_state_indices"] = i32(np.r_[r.permutation(I)[:nb - 1], -1])
        if case.startswith("sr"):
            kw["rand_seed"] = np.int32(4242 + len(case))
        before = _cpu.emulation()["calls"]
        with jax.enable_x64(True) if case.endswith("i64") else contextlib.nullcontext():
            o = jax_mamba.selective_state_update(st, tok(H, P), np.abs(f(rows, H)) - 0.5,
                                                 -np.abs(f(H)), tok(G, N), tok(G, N), f(H), **kw)
            o = jax.block_until_ready(o)  # dispatch is asynchronous: count once it has run
        key = f"{sd}-{it}-{case}"
        res[key + "-calls"] = np.int64(_cpu.emulation()["calls"] - before)
        save_stored(res, key, o)
np.savez(sys.argv[1], **res)
"""


def _varlen_out_matches(label, a, b):
    assert (np.isnan(a) == np.isnan(b)).all(), f"{label}: NaN rows differ"
    assert ((a == 0) == (b == 0)).all(), f"{label}: zero rows differ"
    assert not (a == 7777.0).any(), f"{label}: rows of out left unwritten"
    tol = 1e-5 if "-float32-" in label else 8e-3  # a 16-bit out may round one ulp apart
    np.testing.assert_allclose(a, b, rtol=tol, atol=1e-5, err_msg=label)


def test_varlen_on_the_emulated_fast_path(tmp_path):
    """Varlen (cu_seqlens) through the emulated ssu_fast_mtp<..., VL = true>, for every state
    dtype (float32, bfloat16, float16, int16 with its scales), float32 and bfloat16 inputs, dstate
    64 and 128, 1, 2 and 4 rows per thread: sequences of lengths 0 to 4 (rows no sequence owns before and after
    them), pads (read and write), 1-D and 2-D dst, num_accepted_tokens, intermediate buffers with a
    padded row, an out-of-range read slot and write slot (NaN rows, nothing written), cu_seqlens
    decreasing, overlapping and beyond the tokens (NaN rows, the other rows zeroed), int64
    cu_seqlens and indices, stochastic rounding. Every stored state, intermediate and scale bit
    equals the CPU handler's; out agrees to the row sums' order (the kernel's lane shuffles against
    the handler's 8 partial sums), NaN and zero rows exactly (out starts poisoned, so a row neither
    writes stands out)."""
    plain = _sr_run(tmp_path, "cpu", dict(os.environ, JAX_MAMBA_CPU_EMULATE_FAST="0"),
                    VARLEN_CASES)
    assert "float32-float32-nacc_2d_i64-out" in plain
    for rows in ("", "2", "4"):
        env = dict(ENV, JAX_MAMBA_CUDA_ROWS=rows, JAX_MAMBA_CUDA_THREADS="32" if rows else "")
        emu = _sr_run(tmp_path, f"emu{rows}", env, VARLEN_CASES)
        _compare_with_cpu(emu, plain, rows, _varlen_out_matches)
    # the cases reach what they are for
    assert np.isnan(plain["float32-float32-invalid-out"]).any()
    assert np.isnan(plain["float32-float32-bad_cu-out"]).any()
    assert (plain["float32-float32-bad_cu-out"][0] == 0).all()
    assert np.isfinite(plain["float32-float32-bad_cu-out"][6:8]).all()
    assert (plain["float32-float32-pads-out"][0] == 0).all()


STEPS_CASES = SAVE_STORED + r"""
import sys, numpy as np, jax, jax.numpy as jnp
import jax_mamba
from jax_mamba import _cpu
r = np.random.default_rng(23)
f = lambda *s: r.standard_normal(s).astype(np.float32)
i32 = lambda v: np.asarray(v, np.int32)
S, H, G, P, N, b = 40, 2, 1, 16, 128, 3
res = {}
# the instantiated set (ssu_plan.h fast_mtp_steps): float32 / bfloat16 states, bfloat16
# inputs, dstate 128, T 2 4 6 8; T 3 and a float16 state take the runtime loop either way
for sd, T in (("float32", 2), ("bfloat16", 4), ("float32", 6), ("bfloat16", 8),
              ("bfloat16", 3), ("float16", 4)):
    for case in ("inter", "nacc_2d"):
        st = (f(S, H, P, N) * 2).astype(jnp.dtype(sd))
        tok = lambda *s: f(b, T, *s).astype(jnp.bfloat16)
        kw = dict(dt_softplus=True, z=tok(H, P), dt_bias=f(H), D=f(H))
        if case == "inter":  # 1-D slots, one padded; an intermediate buffer, one row padded
            kw["state_batch_indices"] = i32([5, -1, 2])
            kw["intermediate_states_buffer"] = f(4, T, H, P, N).astype(jnp.dtype(sd))
            kw["intermediate_state_indices"] = i32([3, 0, -1])
        else:  # 2-D read / write slots and num_accepted_tokens: a write after every step
            src = r.integers(0, 8, (b, T))  # read slots 0-7, written ones 8 and up
            dst = 8 + r.permutation(S - 8)[:b * T].reshape(b, T)
            dst[1, 0] = -1
            kw["state_batch_indices"] = i32(src)
            kw["dst_state_batch_indices"] = i32(dst)
            kw["num_accepted_tokens"] = i32(r.integers(0, T + 1, b))
        before = _cpu.emulation()
        o = jax_mamba.selective_state_update(st, tok(H, P), np.abs(f(b, T, H)) - 0.5,
                                             -np.abs(f(H)), tok(G, N), tok(G, N), **kw)
        o = jax.block_until_ready(o)
        after = _cpu.emulation()
        key = f"{sd}-T{T}-{case}"
        res[key + "-calls"] = np.int64(after["calls"] - before["calls"])
        res[key + "-steps_calls"] = np.int64(after["steps_calls"] - before["steps_calls"])
        save_stored(res, key, o)
np.savez(sys.argv[1], **res)
"""


def test_compiled_steps_on_the_emulated_fast_path(tmp_path):
    """ssu_fast_mtp with T compiled in (JAX_MAMBA_CUDA_MTP_STEPS=1: the step loop unrolled and,
    at one row per thread, every step's inputs loaded before the first step) stores exactly what
    the runtime loop stores: out, states and intermediate buffers bit for bit, for float32 and
    bfloat16 states, T 2 / 4 / 6 / 8, 1, 2 and 4 rows per thread, an intermediate buffer with
    padded rows and 2-D slots with num_accepted_tokens. The switch reaches the instances it
    names and no others (T 3, a float16 state: the runtime loop)."""
    runs = {}
    for steps in ("0", "1"):
        for rows in ("1", "2", "4"):
            env = dict(ENV, JAX_MAMBA_CUDA_MTP_STEPS=steps, JAX_MAMBA_CUDA_ROWS=rows,
                       JAX_MAMBA_CUDA_THREADS="32")
            runs[steps, rows] = _sr_run(tmp_path, f"steps{steps}-{rows}", env, STEPS_CASES)
    for rows in ("1", "2", "4"):
        a, b = runs["0", rows], runs["1", rows]
        assert set(a) == set(b)
        for k in sorted(a):
            if k.endswith("-steps_calls"):
                compiled = "-T3-" not in k and not k.startswith("float16-")
                assert a[k] == 0, k
                assert b[k] == (1 if compiled else 0), (k, rows, b[k])
            elif k.endswith("-calls"):
                assert a[k] == b[k] == 1, (k, rows)
            else:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{k} rows={rows}")


EXTREME_CASES = SAVE_STORED + r"""
import sys, numpy as np, jax, jax.numpy as jnp
import jax_mamba
from jax_mamba import _cpu
r = np.random.default_rng(5)
S, H, P, N, G, b = 6, 4, 8, 128, 1, 3
f = lambda *s: r.standard_normal(s).astype(np.float32)
i32 = lambda *v: np.array(v, np.int32)
res = {}
A = np.array([0.0, -0.5, -1.0, 0.0], np.float32)  # heads 0 and 3: dA = 1 (nothing decays)
for mtp in (False, True):
    tok = (b, 2) if mtp else (b,)
    x, dt = f(*tok, H, P), np.abs(f(*tok, H)) * 0.1
    x[..., 1, :] = 0.0  # head 1: the state only decays
    x[..., 2, :] *= 1e-6
    # float16 + SR: values in fp16's subnormal range, near 65504 (SR may round up to Inf), NaN, Inf
    st = (f(S, H, P, N) * 1e-6).astype(np.float32)
    st[:, 0] = 65500.0 * np.sign(f(S, P, N))
    st[:, 3, 0, :4] = [np.nan, np.inf, -np.inf, 3e-8]
    st[:, 2] = f(S, P, N) * 3.0
    kw = dict(state_batch_indices=i32(4, 1, 2), rand_seed=np.int32(61), dt_softplus=False)
    if mtp:
        kw["intermediate_states_buffer"] = np.zeros((3, 2, H, P, N), np.float16)
        kw["intermediate_state_indices"] = i32(2, 0, 1)
    cases = {"f16sr": (st.astype(np.float16), kw)}
    # int16: rows whose new scale is below 2^-96 (head 1: rows of scale 1e-30, and 1e-38 whose
    # new scale is an fp32 subnormal), above 2^96, ordinary, and all-zero rows
    q = r.integers(-30000, 30000, (S, H, P, N)).astype(np.int16)
    q[:, 3, 1] = 0
    sc = np.abs(f(S, H, P)) * 1e-3 + 1e-4
    sc[:, 1] = 1e-38
    sc[:, 1, :4] = 1e-30
    sc[:, 0, :4] = 1e30
    kwq = dict(state_batch_indices=i32(4, 1, 2), state_scale=sc, dt_softplus=False)
    if mtp:
        kwq["intermediate_states_buffer"] = np.zeros((3, 2, H, P, N), np.int16)
        kwq["intermediate_state_scales"] = np.ones((3, 2, H, P), np.float32)
        kwq["intermediate_state_indices"] = i32(2, 0, 1)
    cases["i16"] = (q, kwq)
    for name, (s0, kw0) in cases.items():
        B, C = f(*tok, G, N), f(*tok, G, N)
        before = _cpu.emulation()["calls"]
        o = jax.block_until_ready(jax_mamba.selective_state_update(s0, x, dt, A, B, C, f(H), **kw0))
        key = f"{name}-{'mtp' if mtp else 'stp'}"
        res[key + "-calls"] = np.int64(_cpu.emulation()["calls"] - before)
        save_stored(res, key, o)
np.savez(sys.argv[1], **res)
"""


def _extreme_out_matches(label, a, b):
    assert (np.isnan(a) == np.isnan(b)).all(), f"{label}: NaN rows differ"
    fin = np.isfinite(a) & np.isfinite(b)
    assert (a[~fin] == b[~fin])[~np.isnan(a[~fin])].all(), f"{label}: infinite rows differ"
    np.testing.assert_allclose(a[fin], b[fin], rtol=1e-5, atol=1e-5, err_msg=label)


def test_extreme_values_on_the_emulated_fast_path(tmp_path):
    """The fast path's encoders where their shortcuts end: float16 stochastic rounding of
    values in fp16's subnormal range, at 65504 (rounding up to Inf), NaN and Inf (the rule
    element by element) beside ordinary ones (the packed conversion); int16 rows whose new
    scale is below 2^-96 or above 2^96 (IEEE division) beside ordinary and all-zero rows (the
    reciprocal with one correction); STP and MTP with an intermediate buffer. Every stored bit
    equals the CPU handler's."""
    plain = _sr_run(tmp_path, "cpu", dict(os.environ, JAX_MAMBA_CPU_EMULATE_FAST="0"),
                    EXTREME_CASES)
    emu = _sr_run(tmp_path, "emu", ENV, EXTREME_CASES)
    _compare_with_cpu(emu, plain, "", _extreme_out_matches)
    # the cases reach what they are for
    f16 = plain["f16sr-stp-state"].view(np.float16).astype(np.float32)
    assert np.isinf(f16).any() and np.isnan(f16).any()
    assert ((np.abs(f16) < 6.1e-5) & (f16 != 0)).any(), "no fp16 subnormal stored"
    scales = plain["i16-stp-state_scale"].view(np.float32)
    assert (scales < 2.0 ** -96).any() and (scales > 2.0 ** 96).any()
    assert ((scales < 2.0 ** -126) & (scales > 0)).any(), "no subnormal int16 scale"


def test_int16_encoder_matches_ieee_division():
    """The fast path's int16 encoder (a row's reciprocal and one exact-residual correction in
    place of a division per element) stores rint(clamp(v / scale)) with IEEE division: values
    within a few ulps of half-integers at scales down to fp32's subnormals (where the residual
    itself underflows and the shortcut must not be taken), random rows at ordinary and huge
    scales, zeros, NaN and the clamp."""
    r = np.random.default_rng(8)
    n = 20000
    sc = np.ldexp(1 + r.random(n), r.integers(-126, -110, n)).astype(np.float32)
    half = (r.integers(0, 24, (n, 8)) + 0.5).astype(np.float32)
    v = (half * sc[:, None]).astype(np.float32)
    v = (v.view(np.int32) + r.integers(-3, 4, (n, 8)).astype(np.int32)).view(np.float32)
    big = np.ldexp(1 + r.random(n), r.integers(-100, 100, n)).astype(np.float32)
    vb = (r.standard_normal((n, 8)) * 20000 * big[:, None]).astype(np.float32)
    vb[:5, 0] = [0.0, -0.0, np.nan, 40000 * big[1], -40000 * big[2]]
    sc = np.concatenate([sc, big, np.float32([1e-45, 3e-39, 1e-30, 1e30])])
    v = np.concatenate([v, vb, r.standard_normal((4, 8)).astype(np.float32) * sc[-4:, None]])
    got = _cpu.emulated_int16_encode(np.ascontiguousarray(v), np.ascontiguousarray(sc))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        q = np.clip(v / sc[:, None], -32767, 32767)  # fmaxf / fminf: NaN -> -32767
    want = np.where(np.isnan(q), -32767, np.rint(q)).astype(np.int16)
    bad = np.argwhere(got != want)
    assert bad.size == 0, (f"{len(bad)} of {got.size} differ, first: v={v[tuple(bad[0])]!r} "
                           f"scale={sc[bad[0][0]]!r} got {got[tuple(bad[0])]} want {want[tuple(bad[0])]}")


RUN = ("import sys, pytest; rc = pytest.main(sys.argv[1:]); from jax_mamba import _cpu; "
       "print('EMULATED', _cpu.emulation()['calls']); sys.exit(rc)")


# (test_degenerate.py's CPU cases take 9 minutes emulated on 2 cores: left to manual runs; so
# does the grid's sampled i64_idx, a varlen call of 12 sequences x 8 heads x 64 rows at dstate
# 128 that takes about a minute emulated: test_varlen_on_the_emulated_fast_path has int64 indices
# and cu_seqlens at a smaller size)
@pytest.mark.parametrize("modules", [["test_kernel_cases.py", "test_invalid.py"],
                                     ["test_inplace.py"]])
def test_cpu_tests_on_the_emulated_fast_path(modules):
    """The oracle-checked CPU tests again, each call the fast path covers run by the emulated
    kernel (the child counts them; tests in child processes of their own count there)."""
    r = subprocess.run([sys.executable, "-c", RUN, "-q", "-x", "-p", "no:cacheprovider", "-k",
                        "cpu and not i64_idx", *modules], env=ENV, cwd=HERE, capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-2000:])
    emulated = int(r.stdout.split("EMULATED")[-1].split()[0])
    assert emulated > 0, "no call took the emulated fast path"

"""Kernel-iteration harness for one device call: per-call µs of the package's
selective_state_update on named benchmark cases, against a torch copy ceiling measured in the
same process. Same method as the benchmark CLI (python -m jax_mamba.benchmark): chains of K and
2K donated calls in one jit, every call its own random slots of a >= 1 GiB cache and its own
x/dt/B/C, an L2 flush before every timed run, per call = (median t(2K) - median t(K)) / K (wall: it includes XLA's host
work per call), then the device time of one more traced K chain (jax_mamba/_bench_trace.py),
the figure to compare kernels by.

    python scripts/fast_harness.py b64-bf16 b256-bf16 ...   [--reps 15] [--calls 10]

Variants are environment variables read once per process (JAX_MAMBA_CUDA_FAST=0 for the
previous kernels, JAX_MAMBA_CUDA_ROWS, JAX_MAMBA_CUDA_THREADS, JAX_MAMBA_CUDA_PDL=1), so run
one process per variant; --tag labels its rows. Prints one line per case.
"""
import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_mamba
from jax_mamba import _bench_cases as bc
from jax_mamba import _bench_trace


def torch_copy_gbs(mb=1024):
    try:
        import torch
    except ImportError:
        return float("nan")
    a = torch.empty(int(mb * 2**20) // 4, dtype=torch.float32, device="cuda").normal_()
    b = torch.empty_like(a)
    ts = []
    for i in range(25):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        if i >= 5:
            ts.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * mb * 2**20 / statistics.median(ts) / 1e9


def arrays(c, calls, cache_mb, rng):
    S = bc.cache_slots(c, cache_mb, calls)
    hp = (c.dim,) if c.mamba1 else (c.heads, c.dim)
    st, inp = jnp.dtype(c.state_dtype), jnp.dtype(c.input_dtype)
    state = jax.random.normal(jax.random.key(0), (S,) + hp + (c.dstate,), st)
    per = (c.dim,) if c.mamba1 else (c.heads,)
    put = lambda a, dt=jnp.float32: jax.device_put(np.asarray(a, dt))
    params = (put(-(rng.random((c.dim, c.dstate) if c.mamba1 else per) + 0.5)),
              put(np.ones(per)), put(rng.random(per) - 0.5))
    bcs = (c.batch,) + ((c.dstate,) if c.mamba1 else (c.ngroups, c.dstate))
    inputs = tuple((put(rng.standard_normal((c.batch,) + hp), inp),
                    put(rng.random((c.batch,) + per)),
                    put(rng.standard_normal(bcs), inp), put(rng.standard_normal(bcs), inp),
                    put(rng.standard_normal((c.batch,) + hp), inp) if c.z else None)
                   for _ in range(calls))
    return S, state, params, inputs


def make_fn(calls):
    def run(state, params, inputs, slots):
        A, D, dt_bias = params
        outs = []
        for k in range(calls):
            x, dt, B, C, z = inputs[k]
            r = jax_mamba.selective_state_update(state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias,
                                                 dt_softplus=True, state_batch_indices=slots[k])
            state = r.state
            outs.append(r.out)
        return state, outs
    return jax.jit(run, donate_argnums=0)


def run_chain(fn, carry, S, batch, K, params, inputs, rng, flush):
    """One timed run of `fn` (a chain of up to 2K calls) on fresh random slots after an L2
    flush; the donated state lives on in carry[0]. Seconds."""
    idx = rng.choice(S, 2 * K * batch, replace=False).astype(np.int32)
    slots = tuple(jax.device_put(list(idx.reshape(2 * K, -1))))
    jax.block_until_ready((flush(), slots))
    t0 = time.perf_counter()
    st, outs = fn(carry[0], params, inputs, slots)
    jax.block_until_ready((st, outs))
    carry[0] = st
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--cache-mb", type=float, default=1024)
    ap.add_argument("--tag", default=os.environ.get("TAG", ""))
    ap.add_argument("--copy", action="store_true", help="measure torch's copy_ first")
    o = ap.parse_args()
    if o.copy:
        print(f"torch copy_ 1 GiB: {torch_copy_gbs():.0f} GB/s (read + write)", flush=True)
    flushbuf = jnp.zeros((256 * 2**20) // 4, jnp.float32)
    flush = jax.jit(lambda a: a + 1.0)
    rng = np.random.default_rng(0)
    K = o.calls
    for name in o.cases:
        c = bc.CASES[name]
        if c.state_dtype == "int16" or c.sr or c.mtp:  # scales / a seed / T steps: the CLI has them
            print(f"{o.tag:<14}{name:<22} skipped: time it with python -m jax_mamba.benchmark")
            continue
        S, state, params, inputs = arrays(c, 2 * K, c.cache_mb or o.cache_mb, rng)
        fns = {k: make_fn(k) for k in (K, 2 * K)}
        times = {k: [] for k in fns}
        carry = [state]
        do_flush = functools.partial(flush, flushbuf)
        for i in range(o.reps + 1):
            for k in fns:
                t = run_chain(fns[k], carry, S, c.batch, K, params, inputs, rng, do_flush)
                if i:
                    times[k].append(t)
        m1, m2 = statistics.median(times[K]), statistics.median(times[2 * K])
        per = (m2 - m1) / K
        traced = functools.partial(run_chain, fns[K], carry, S, c.batch, K, params, inputs, rng,
                                   do_flush)
        dev = _bench_trace.chain_device_us(_bench_trace.traced_run(traced), K)
        nbytes = bc.bytes_per_call(c)
        print(f"{o.tag:<14}{name:<22}{per * 1e6:9.2f} us {nbytes / per / 1e9:8.0f} GB/s wall"
              + (f"{dev:9.2f} us {nbytes / dev / 1e3:8.0f} GB/s device" if dev else ""),
              flush=True)
        del carry, state, inputs


if __name__ == "__main__":
    main()

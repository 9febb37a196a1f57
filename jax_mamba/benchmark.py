"""Benchmark: effective bandwidth of selective_state_update vs a device-to-device copy.

    python -m jax_mamba.benchmark --batch 1 8 64 256 --state-dtype bfloat16
    python -m jax_mamba.benchmark --mtp 4 --inter --batch 64       # speculative decoding
    python -m jax_mamba.benchmark --mamba1 --dim 8192 --dstate 16  # Mamba-1 (3-D state)

Each timing runs K and 2K consecutive calls inside one jitted function, each call on a disjoint
random set of slots of a cache far larger than the L2 cache (cold state); the per-call time is
(median t(2K) - median t(K)) / K, which cancels the fixed cost of dispatching the executable. Bytes follow FlashInfer's count: state read + write of the touched
slots (+ intermediate writes), x, dt, B, C, z, out and the per-head parameters.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_mamba

DT = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "int16": jnp.int16}


def _median_time(fn, args, reps):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device, nbytes=1 << 30, reps=10):
    """Bytes read + written per second by an elementwise pass over a large buffer."""
    a = jax.device_put(jnp.ones((nbytes // 4,), jnp.float32), device)
    t = _median_time(jax.jit(lambda a: a + 1.0), (a,), reps)
    return 2 * nbytes / t


def case(args, batch, device, rng):
    H, P, N, G = (1, args.dim, args.dstate, 1) if args.mamba1 else (
        args.heads, args.dim, args.dstate, args.ngroups)
    T, K = args.mtp, args.calls
    st = DT[args.state_dtype]
    elem = jnp.dtype(st).itemsize
    slot_bytes = H * P * N * elem
    S = max(2 * K * batch, int(np.ceil(args.cache_mb * 2**20 / slot_bytes)))
    hp = (P,) if args.mamba1 else (H, P)
    shape = (S,) + hp + (N,)
    # the cache is drawn on the device: a host-side draw of ~1 GiB dominated the run time
    key = jax.random.key(int(rng.integers(2**31)))
    with jax.default_device(device):
        if st == jnp.int16:
            state = jax.random.randint(key, shape, -30000, 30000, jnp.int16)
            scale = jax.random.uniform(key, (S,) + hp, jnp.float32) * 1e-4
        else:
            state, scale = jax.random.normal(key, shape, st), None
    lead = (batch, T) if T else (batch,)
    inp = DT[args.input_dtype]
    x = jnp.asarray(rng.standard_normal(lead + hp, np.float32), inp)
    dt = jnp.asarray(rng.random(lead + ((P,) if args.mamba1 else (H,))), jnp.float32)
    A = jnp.asarray(-(rng.random((P, N) if args.mamba1 else (H,)) + 0.5), jnp.float32)
    bc = lead + ((N,) if args.mamba1 else (G, N))
    B = jnp.asarray(rng.standard_normal(bc, np.float32), inp)
    C = jnp.asarray(rng.standard_normal(bc, np.float32), inp)
    D = jnp.ones((P,) if args.mamba1 else (H,), jnp.float32)
    z = jnp.asarray(rng.standard_normal(lead + hp, np.float32), inp) if args.z else None
    slots = jnp.asarray(rng.permutation(S)[:2 * K * batch].reshape(2 * K, batch), jnp.int32)
    inter = iscale = None
    if args.inter:
        inter = jnp.zeros((batch, T) + hp + (N,), st)
        iscale = jnp.zeros((batch, T) + hp, jnp.float32) if st == jnp.int16 else None
    put = lambda a: None if a is None else jax.device_put(a, device)
    arrays = [put(a) for a in (state, scale, inter, iscale, x, dt, A, B, C, D, z, slots)]
    nbytes = batch * slot_bytes * (2 + (T if args.inter else 0)) + x.nbytes * (2 + bool(z is not None)) \
        + dt.nbytes + B.nbytes + C.nbytes + (A.nbytes + D.nbytes if not args.mamba1 else 0) \
        + (batch * H * P * 4 * (2 + (T if args.inter else 0)) if st == jnp.int16 else 0)
    return arrays, nbytes


def make_fn(ssu, args, calls):
    seeded = args.sr

    def run(state, scale, inter, iscale, x, dt, A, B, C, D, z, slots):
        outs = []
        for k in range(calls):
            r = ssu(state, x, dt, A, B, C, D, z=z, dt_softplus=True, state_batch_indices=slots[k],
                    state_scale=scale, intermediate_states_buffer=inter,
                    intermediate_state_scales=iscale, rand_seed=k + 1 if seeded else None,
                    algorithm=args.algorithm if ssu is jax_mamba.selective_state_update else "auto")
            state, scale, inter, iscale = r.state, r.state_scale, r.intermediate_states_buffer, \
                r.intermediate_state_scales
            outs.append(r.out)
        return state, scale, inter, iscale, outs

    return jax.jit(run, donate_argnums=(0, 1, 2, 3))


def main(argv=None):
    ap = argparse.ArgumentParser(description="selective_state_update benchmark")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dstate", type=int, default=128)
    ap.add_argument("--ngroups", type=int, default=8)
    ap.add_argument("--state-dtype", default="bfloat16", choices=list(DT))
    ap.add_argument("--input-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--mtp", type=int, default=0, help="T > 0: multi-token with T steps")
    ap.add_argument("--inter", action="store_true", help="write an intermediate-state buffer (needs --mtp)")
    ap.add_argument("--sr", action="store_true", help="stochastic rounding (float16/bfloat16 state)")
    ap.add_argument("--z", action="store_true")
    ap.add_argument("--mamba1", action="store_true", help="3-D state (S, dim, dstate), no heads")
    ap.add_argument("--calls", type=int, default=10, help="consecutive calls per jitted function")
    ap.add_argument("--cache-mb", type=float, default=1024, help="state cache size (cold L2)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--algorithm", default="auto")
    ap.add_argument("--impl", nargs="+", default=["ffi", "reference"], choices=["ffi", "reference"])
    ap.add_argument("--platform", default=None, help="cpu or gpu (default: JAX's default)")
    args = ap.parse_args(argv)
    device = jax.devices(args.platform)[0] if args.platform else jax.devices()[0]
    copy = copy_bandwidth(device, nbytes=(1 << 30) if device.platform != "cpu" else (1 << 27))
    print(f"device {device.device_kind} ({device.platform}); jax {jax.__version__}; "
          f"copy {copy / 1e9:.0f} GB/s")
    print(f"{'case':<44}{'impl':<10}{'us/call':>10}{'GB/s':>9}{'% copy':>8}")
    rng = np.random.default_rng(0)
    impls = {"ffi": jax_mamba.selective_state_update,
             "reference": jax_mamba.reference.selective_state_update}
    rows = []
    for batch in args.batch:
        name = (f"b{batch} " + (f"P{args.dim} N{args.dstate} mamba1" if args.mamba1 else
                                f"H{args.heads} P{args.dim} N{args.dstate} G{args.ngroups}")
                + f" {args.state_dtype}" + (f" T{args.mtp}" if args.mtp else "")
                + (" inter" if args.inter else "") + (" sr" if args.sr else ""))
        for impl in args.impl:
            arrays, nbytes = case(args, batch, device, rng)
            fns = {k: make_fn(impls[impl], args, k) for k in (args.calls, 2 * args.calls)}
            state = list(arrays)  # donated buffers: each result is fed back in
            times = {k: [] for k in fns}
            for i in range(args.reps + 1):
                for k, fn in fns.items():
                    t0 = time.perf_counter()
                    res = fn(*state)
                    jax.block_until_ready(res)
                    times[k].append(time.perf_counter() - t0)
                    state[0:4] = res[0:4]
            med = {k: statistics.median(v[1:]) for k, v in times.items()}
            t = max(med[2 * args.calls] - med[args.calls], 1e-9) / args.calls
            rows.append((name, impl, t, nbytes / t))
            print(f"{name:<44}{impl:<10}{t * 1e6:>10.2f}{nbytes / t / 1e9:>9.0f}"
                  f"{100 * nbytes / t / copy:>7.0f}%", flush=True)
    return rows


if __name__ == "__main__":
    main()

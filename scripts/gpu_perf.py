"""Kernel timing probe for a device session (independent of the benchmark CLI, so that a
tuning run needs nothing else): per-call µs of chains of K and 2K donated calls, every call on
its own random slots of a >= 1 GiB cache and its own x/dt/B/C, against a torch device copy.

    python scripts/gpu_perf.py [--copy] CASE...      CASE: b64-bf16, b1-bf16, b256-f32, ...
"""
import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_mamba

DT = {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32, "i16": jnp.int16}


def torch_copy_gbs(nbytes=2 << 30):
    import torch
    a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ts = []
    for _ in range(20):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); b.copy_(a); e1.record(); torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    t = statistics.median(ts)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / t / 1e9


def parse(name):
    """b64-bf16[-H64][-P64][-N128][-G8][-T4][-inter][-sr][-mamba1][-alg=vertical]"""
    c = dict(b=1, st="bf16", H=64, P=64, N=128, G=8, T=0, inter=False, sr=False, mamba1=False,
             alg="auto", inp=None)
    for part in name.split("-"):
        if part[0] == "b" and part[1:].isdigit():
            c["b"] = int(part[1:])
        elif part in DT:
            c["st"] = part
        elif part[0] in "HPNGT" and part[1:].isdigit():
            c[part[0]] = int(part[1:])
        elif part in ("inter", "sr", "mamba1"):
            c[part] = True
        elif part.startswith("alg="):
            c["alg"] = part[4:]
        else:
            raise SystemExit(f"bad case part {part!r} in {name!r}")
    if c["inp"] is None:
        c["inp"] = "f32" if c["st"] == "f32" else ("f16" if c["st"] == "f16" else "bf16")
    if c["mamba1"]:
        c.update(H=1, G=1)
    return c


def run(name, K=10, reps=15, cache_bytes=1 << 30):
    c = parse(name)
    b, H, P, N, G, T = c["b"], c["H"], c["P"], c["N"], c["G"], c["T"]
    st, inp = DT[c["st"]], DT[c["inp"]]
    hp = (P,) if c["mamba1"] else (H, P)
    slot_bytes = H * P * N * jnp.dtype(st).itemsize
    S = max(2 * K * b + 1, cache_bytes // slot_bytes)
    key = jax.random.key(0)
    if st == jnp.int16:
        state = jax.random.randint(key, (S,) + hp + (N,), -30000, 30000, jnp.int16)
        scale = jax.random.uniform(key, (S,) + hp, jnp.float32) * 1e-4
    else:
        state, scale = jax.random.normal(key, (S,) + hp + (N,), st), None
    rng = np.random.default_rng(1)
    lead = (b, T) if T else (b,)
    sets = 2 * K  # one input set per call of the longer chain
    x = jnp.asarray(rng.standard_normal((sets,) + lead + hp), inp)
    dt = jnp.asarray(rng.random((sets,) + lead + ((P,) if c["mamba1"] else (H,))), jnp.float32)
    A = jnp.asarray(-(rng.random((P, N) if c["mamba1"] else (H,)) + 0.5), jnp.float32)
    bc = (sets,) + lead + ((N,) if c["mamba1"] else (G, N))
    B = jnp.asarray(rng.standard_normal(bc), inp)
    C = jnp.asarray(rng.standard_normal(bc), inp)
    D = jnp.ones((P,) if c["mamba1"] else (H,), jnp.float32)
    slots = jnp.asarray(rng.permutation(S)[:sets * b].reshape(sets, b), jnp.int32)
    inter = iscale = None
    if c["inter"]:
        inter = jnp.zeros((b, T) + hp + (N,), st)
        iscale = jnp.zeros((b, T) + hp, jnp.float32) if st == jnp.int16 else None

    def chain(k):
        def f(state, scale, inter, iscale, x, dt, B, C, slots):
            outs = []
            for i in range(k):
                r = jax_mamba.selective_state_update(
                    state, x[i], dt[i], A, B[i], C[i], D, dt_softplus=True,
                    state_batch_indices=slots[i], state_scale=scale,
                    intermediate_states_buffer=inter, intermediate_state_scales=iscale,
                    rand_seed=i + 1 if c["sr"] else None, algorithm=c["alg"])
                state, scale, inter, iscale = r[1:]
                outs.append(r.out)
            return state, scale, inter, iscale, outs
        return jax.jit(f, donate_argnums=(0, 1, 2, 3))

    fns = {k: chain(k) for k in (K, 2 * K)}
    bufs = [state, scale, inter, iscale]
    times = {k: [] for k in fns}
    for i in range(reps + 2):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            res = fn(*bufs, x, dt, B, C, slots)
            jax.block_until_ready(res)
            times[k].append(time.perf_counter() - t0)
            bufs = list(res[:4])
    med = {k: statistics.median(v[2:]) for k, v in times.items()}
    t = max(med[2 * K] - med[K], 1e-9) / K
    e = jnp.dtype(st).itemsize
    tt = max(T, 1)
    nbytes = (b * slot_bytes * (2 + (T if c["inter"] else 0))
              + b * tt * (H * P * 2 * jnp.dtype(inp).itemsize + 2 * G * N * jnp.dtype(inp).itemsize
                          + (P if c["mamba1"] else H) * 4)
              + (b * H * P * 4 * (2 + (T if c["inter"] else 0)) if st == jnp.int16 else 0))
    del e
    return t, nbytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--copy", type=float, default=0.0, help="copy GB/s measured before")
    ap.add_argument("--tag", default=os.environ.get("TAG", ""))
    args = ap.parse_args()
    copy = args.copy
    for name in args.cases:
        try:
            t, nbytes = run(name)
            gbs = nbytes / t / 1e9
            pct = f"{100 * gbs / copy:5.1f}%" if copy else ""
            print(f"ROW {args.tag:10s} {name:32s} {t * 1e6:9.2f} us {gbs:8.0f} GB/s {pct}", flush=True)
        except Exception as ex:  # noqa: BLE001
            print(f"ROW {args.tag:10s} {name:32s} ERROR {type(ex).__name__}: {str(ex)[:300]}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

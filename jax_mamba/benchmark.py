"""Benchmark: effective bandwidth of selective_state_update against a device copy.

    python -m jax_mamba.benchmark                              # bf16, batches 1 8 64 256 (GPU)
    python -m jax_mamba.benchmark --case all --json r.json     # every named case (list: --list)
    python -m jax_mamba.benchmark --case b64-bf16 --profile    # + kernel time by ncu
    python -m jax_mamba.benchmark --mtp 4 --inter --batch 64   # free-form shapes
    python -m jax_mamba.benchmark --impl ffi --case b64-bf16 --shard heads --shard slots
                                  # + the cache sharded over heads / slots on all devices

Method and targets: docs/performance.md.

Ceiling ('% copy'): on a GPU, a copy of a --copy-mb buffer (default 1024 MiB) measured in the
same run outside XLA, the way torch times its copy_: one launch per timing between two CUDA
events, median of several after warm-up, by two methods, cudaMemcpyAsync device to device and
an SM copy kernel with 16-byte loads and stores (grid-stride, the whole device's worth of
CTAs); both are printed and the faster is the ceiling. Bytes = read + written. On the CPU: a
chain of memcpy calls of the jax_mamba_copy FFI target. A row above 100% of copy means the
ruler is wrong: it is printed as an ERROR line after the table and the exit status is 1.

Timing: each timing runs K and 2K consecutive donated calls inside one jitted function;
per-call time = (median t(2K) - median t(K)) / K, which cancels the fixed cost of dispatching
the executable. Every call of a chain has its own random slots of a cache far larger than L2
(new slots every repetition) and its own x/dt/B/C buffers, and an L2 flush (a copy of
--flush-mb) precedes every timed run, so no call finds its inputs or state in cache. Bytes
follow FlashInfer's count (_bench_cases.bytes_per_call).

'dev us' / 'dev %' (GPU, one device): one more K chain run under jax.profiler, its span on the
GPU (first kernel of the handler's to the last one's end) over K: the device's own time per
call. The wall figure is larger by the host work that grows with K, chiefly XLA re-recording
each call of its command buffer when the new slot arrays moved (_bench_trace's docstring).

--shard heads|slots (repeatable) adds, after each config's one-device rows, rows of the same
donated chain on a mesh of --devices N devices (default: all of the platform's) with the cache
sharded over heads (P(None, "m"): x, dt, z, A, D, dt_bias and, where N divides G, B and C split
with it; no communication) or over slots (P("m"): per-entry inputs replicated, each call's
entries spread so that each device gets b/N entries whose slots are its own, entry e on device
e % N; one all-reduce of the out rows per call). Bytes are the one-device count (the whole
call's traffic, all devices together), so GB/s is the aggregate; '% copy' is against N times
the one-device copy; 'vs 1' is that GB/s over the one-device ffi row's. 'kept': the state came
back with its sharding and its buffers (donation in place on every device).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_mamba
from . import _bench_cases as bc
from . import _bench_ncu, _bench_trace
from ._copy import Ceiling, cuda_ceiling, device_copy

IMPLS = {"ffi": lambda: jax_mamba.selective_state_update,
         "reference": lambda: jax_mamba.reference.selective_state_update}
# platform defaults: the GPU ones are docs/performance.md's method (K = 20: with K = 10 and 5
# reps an H100 run read b1 as "noisy" and one row above the ceiling; three K = 20 / 15-rep runs
# of near-identical configurations agreed on the rows the variants leave alone, e.g. b64 fp32
# 106.3-106.6 µs, 2026-12-07); the CPU ones keep a default run under a minute
GPU_DEFAULTS = dict(batch=[1, 8, 64, 256], cache_mb=1024, copy_mb=1024, flush_mb=256, calls=20,
                    reps=20)
CPU_DEFAULTS = dict(batch=[1, 8, 64], cache_mb=64, copy_mb=64, flush_mb=16, calls=4, reps=3)
SHAPE_FLAGS = ("batch", "heads", "dim", "dstate", "ngroups", "state_dtype", "input_dtype", "mtp",
               "inter", "sr", "z", "mamba1")


def _chain_seconds(fns, run_once, reps, fallback=False):
    """(per-call seconds, {K: median s, 2K: median s}) of the K/2K pair `fns`; run_once(k, fn)
    -> seconds. NaN when noise made t(2K) <= t(K), or with `fallback` t(2K) / 2K (dispatch
    included)."""
    times = {k: [] for k in fns}
    for i in range(reps + 1):
        for k, fn in fns.items():
            t = run_once(k, fn)
            if i:  # the first run compiles
                times[k].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    k1, k2 = sorted(fns)
    if med[k2] > med[k1]:
        return (med[k2] - med[k1]) / (k2 - k1), med
    return (med[k2] / k2 if fallback else math.nan), med


def copy_bandwidth(device, nbytes, calls, reps):
    """(bytes read + written per second, seconds per copy) of jax_mamba_copy over `nbytes`."""
    with jax.default_device(device):
        a = jnp.ones((nbytes // 4,), jnp.float32)

    def chain(k):
        def f(y):
            for _ in range(k):
                y = device_copy(y)
            return y
        return jax.jit(f)

    def run_once(k, fn):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(a))
        return time.perf_counter() - t0

    k = max(1, min(calls, 8))
    t, _ = _chain_seconds({k: chain(k), 2 * k: chain(2 * k)}, run_once, max(reps, 5),
                          fallback=True)
    return 2 * a.nbytes / t, t


def measure_ceiling(device, nbytes, calls, reps) -> Ceiling:
    """The '% copy' ceiling of `device` over a buffer of `nbytes` (see the module docstring):
    on a GPU the faster of cudaMemcpyAsync and the SM copy kernel, each timed by events outside
    XLA; on the CPU the jax_mamba_copy chain (copy_bandwidth)."""
    if device.platform == "cpu":
        bw, _ = copy_bandwidth(device, nbytes, calls, reps)
        return Ceiling.best_of(bw / 1e9, None, 2 * (nbytes // 4) * 4, nbytes / 2**20, cpu=True)
    return cuda_ceiling(device, nbytes, reps=max(reps, 10), warmup=3)


def ruler_errors(rows, limit=100.0):
    """One loud line per row above `limit` % of copy: no kernel moves bytes faster than the
    device copies them, so such a row means the ceiling (the ruler) is wrong, not the kernel
    fast. Rows without a ratio (noisy) are not judged."""
    errors = []
    for r in rows:
        pct = max((p for p in (r.get("pct_copy"), r.get("device_pct_copy")) if p is not None),
                  default=None)
        if pct is not None and pct > limit:
            where = f" ({r['shard']} x{r['devices']})" if r.get("shard") else ""
            ceil = f" (ceiling {r['copy_gbs']:.0f} GB/s)" if r.get("copy_gbs") else ""
            errors.append(f"ERROR: {r['case']} {r['impl']}{where} at {pct:.1f}% of copy: above "
                          f"{limit:g}% of copy, the ruler is wrong{ceil}")
    return errors


def make_flush(device, mb):
    """Evicts L2 before a timed run: a copy of `mb` MiB leaves only its own lines in cache
    (`device` may be a list: one copy on each, all launched before waiting)."""
    if mb <= 0:
        return lambda: None
    bufs = []
    for d in (device if isinstance(device, (list, tuple)) else [device]):
        with jax.default_device(d):
            bufs.append(jnp.zeros((int(mb * 2**20) // 4,), jnp.float32))
    f = jax.jit(device_copy)
    return lambda: jax.block_until_ready([f(b) for b in bufs])


def shard_problem(c: bc.Config, shard, n):
    """Why config `c` cannot run sharded `shard` over n devices without the rule gathering
    something state-sized (None if it can)."""
    if shard == "heads":
        if c.mamba1:
            return "Mamba-1 (no heads): the state would be sharded on P, a gathering fallback"
        if c.heads % n:
            return f"{n} devices do not divide {c.heads} heads"
        if c.ngroups % n and n % c.ngroups:
            return f"{c.ngroups} groups on {n} devices: not expressible per device (fallback)"
    if shard == "slots" and c.inter:
        return ("an intermediate buffer of one row per entry: its rows would be exchanged "
                "whole every call")
    return None


def _pointers(a):
    return sorted(s.data.unsafe_buffer_pointer() for s in a.addressable_shards)


class Arrays:
    """Device arrays of one config: the donated carry, shared per-layer params, `calls` distinct
    per-call input sets, and fresh random slots on demand."""

    def __init__(self, c: bc.Config, calls, cache_mb, device, seed=0, mesh=None, shard=None):
        """mesh (1-D, axis "m") and shard ("heads" or "slots"): the arrays laid out for the
        sharded run (see the module docstring); without them everything is on `device`."""
        self.c, self.device, self.mesh, self.shard = c, device, mesh, shard
        self.rng = np.random.default_rng(seed)
        self.S = bc.cache_slots(c, cache_mb, calls)
        n = mesh.size if mesh is not None else 1
        if shard == "slots":  # a multiple of n, each shard holding `calls` sets of its entries
            self.S = n * max(-(-self.S // n), calls * -(-c.batch // n))
        hp = (c.dim,) if c.mamba1 else (c.heads, c.dim)
        st, inp = jnp.dtype(c.state_dtype), jnp.dtype(c.input_dtype)
        lead = (c.batch, c.mtp) if c.mtp else (c.batch,)
        key = jax.random.key(seed)
        heads = shard == "heads"
        lp = (None,) * len(lead)
        specs = {"state": P(None, "m") if heads else P("m"), "inter": P(*lp, "m"),
                 "per": P("m"), "x": P(*lp, "m"),
                 "bc": P(*lp, "m") if heads and c.ngroups % n == 0 else P()}
        self.sharding = lambda name=None: device if mesh is None else NamedSharding(
            mesh, specs[name] if name and (heads or name == "state") else P())

        def draw(key):
            if st == jnp.int16:
                return (jax.random.randint(key, (self.S,) + hp + (c.dstate,), -30000, 30000,
                                           jnp.int16),
                        jax.random.uniform(key, (self.S,) + hp, jnp.float32) * 1e-4)
            return jax.random.normal(key, (self.S,) + hp + (c.dstate,), st), None

        # the cache (up to GiBs) is drawn on the device, where that is quick; the small
        # operands further down come from the host (no per-shape compile of random ops)
        inter = iscale = None
        if mesh is None:
            with jax.default_device(device):
                state, scale = draw(key)
                if c.inter:
                    inter = jnp.zeros((c.batch, c.mtp) + hp + (c.dstate,), st)
                    iscale = (jnp.zeros((c.batch, c.mtp) + hp, jnp.float32)
                              if st == jnp.int16 else None)
        else:  # drawn in place on every device, each its shard
            ssh = self.sharding("state")
            state = jax.jit(lambda k: draw(k)[0], out_shardings=ssh)(key)
            scale = (jax.jit(lambda k: draw(k)[1], out_shardings=ssh)(key)
                     if st == jnp.int16 else None)
            zeros = lambda shape, dt: jax.jit(lambda: jnp.zeros(shape, dt),
                                              out_shardings=self.sharding("inter"))()
            if c.inter:
                inter = zeros((c.batch, c.mtp) + hp + (c.dstate,), st)
                iscale = zeros((c.batch, c.mtp) + hp, jnp.float32) if st == jnp.int16 else None
        self.carry = (state, scale, inter, iscale)
        r = self.rng
        put = lambda a, dt=jnp.float32, name=None: jax.device_put(np.asarray(a, dt),
                                                                  self.sharding(name))
        per = (c.dim,) if c.mamba1 else (c.heads,)
        self.params = (put(-(r.random((c.dim, c.dstate) if c.mamba1 else per) + 0.5),
                           name="per"),
                       put(np.ones(per), name="per"), put(r.random(per) - 0.5, name="per"))
        bcs = lead + ((c.dstate,) if c.mamba1 else (c.ngroups, c.dstate))
        self.inputs = tuple(
            (put(r.standard_normal(lead + hp, np.float32), inp, "x"),
             put(r.random(lead + per), name="x"),
             put(r.standard_normal(bcs, np.float32), inp, "bc"),
             put(r.standard_normal(bcs, np.float32), inp, "bc"),
             put(r.standard_normal(lead + hp, np.float32), inp, "x") if c.z else None)
            for _ in range(calls))
        jax.block_until_ready((self.carry, self.params, self.inputs))

    def slots(self, calls):
        """`calls` disjoint random slot sets (one (batch,) int32 array per call); sharded over
        slots: entry e's slots lie in the shard of device e % n."""
        b = self.c.batch
        if self.shard == "slots":
            n = self.mesh.size
            Sl = self.S // n
            idx = np.empty((calls, b), np.int32)
            for k in range(n):
                ents = np.arange(k, b, n)
                pick = self.rng.choice(Sl, calls * len(ents), replace=False) + k * Sl
                idx[:, ents] = pick.reshape(calls, len(ents))
        else:
            idx = self.rng.choice(self.S, calls * b, replace=False).astype(np.int32)
        return tuple(jax.block_until_ready(jax.device_put(list(idx.reshape(calls, -1)),
                                                          self.sharding())))


def make_fn(ssu, c: bc.Config, calls, algorithm):
    """jit of `calls` chained calls, each with its own inputs and slots (the first `calls` of
    those passed); the carry is donated."""

    def run(carry, params, inputs, slots):
        state, scale, inter, iscale = carry
        A, D, dt_bias = params
        outs = []
        for k in range(calls):
            x, dt, B, C, z = inputs[k]
            r = ssu(state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=True,
                    state_batch_indices=slots[k], state_scale=scale,
                    intermediate_states_buffer=inter, intermediate_state_scales=iscale,
                    rand_seed=k + 1 if c.sr else None, algorithm=algorithm)
            state, scale, inter, iscale = (r.state, r.state_scale, r.intermediate_states_buffer,
                                           r.intermediate_state_scales)
            outs.append(r.out)
        return (state, scale, inter, iscale), outs

    return jax.jit(run, donate_argnums=0)


def time_config(impl, c: bc.Config, o, device, flush, mesh=None, shard=None):
    """(seconds per call, chain medians, state kept, device µs per call) of `impl` on config `c`
    (K vs 2K chains, see the module docstring); kept: the state came back with its sharding and
    buffers; device µs: the traced chain's span on the GPU over K (ffi on one GPU, else None)."""
    K = o.calls
    arr = Arrays(c, 2 * K, c.cache_mb or o.cache_mb, device, mesh=mesh, shard=shard)
    state0 = arr.carry[0]
    sharding0, ptrs0 = state0.sharding, _pointers(state0)
    algorithm = o.algorithm if impl == "ffi" else "auto"
    fns = {k: make_fn(IMPLS[impl](), c, k, algorithm) for k in (K, 2 * K)}
    carry = [arr.carry]

    def run_once(k, fn):
        # both chains get all 2K input and slot sets (the K chain uses the first K): the host
        # cost of passing arguments, paid before the launch, is then the same and cancels
        slots = arr.slots(2 * K)
        flush()
        t0 = time.perf_counter()
        res = fn(carry[0], arr.params, arr.inputs, slots)
        jax.block_until_ready(res)
        t = time.perf_counter() - t0
        carry[0] = res[0]  # the donated state lives on in the result
        return t

    t = _chain_seconds(fns, run_once, o.reps)
    # the device's own time per call: one more K chain, traced (_bench_trace), one device only
    dev_us = None
    if device.platform != "cpu" and mesh is None and impl == "ffi" and o.device_time:
        dev_us = _bench_trace.chain_device_us(
            _bench_trace.traced_run(lambda: run_once(K, fns[K])), K)
    state = carry[0][0]
    kept = state.sharding.is_equivalent_to(sharding0, state.ndim) and _pointers(state) == ptrs0
    del carry[0], state0, state  # the cache (and arr, on return) freed before the next config
    return t + (kept, dev_us)


def profile_child(spec):
    """Run under ncu by _bench_ncu: `runs` chains of `calls` ffi calls, nothing timed here."""
    c = bc.Config(**spec["config"])
    device = jax.devices(spec["platform"])[0] if spec["platform"] else jax.devices()[0]
    d = GPU_DEFAULTS if device.platform != "cpu" else CPU_DEFAULTS
    arr = Arrays(c, spec["calls"], c.cache_mb or spec["cache_mb"] or d["cache_mb"], device)
    fn = make_fn(jax_mamba.selective_state_update, c, spec["calls"], spec["algorithm"])
    carry = arr.carry
    for _ in range(spec["runs"]):
        carry, outs = fn(carry, arr.params, arr.inputs, arr.slots(spec["calls"]))
        jax.block_until_ready((carry, outs))
    print(f"profile child: {spec['runs']} x {spec['calls']} calls on {device.device_kind}")


def git_commit():
    """The code's commit: JAX_MAMBA_GIT_COMMIT when set (scripts/export_clean.sh's tree has no
    .git of its own), else the checkout's HEAD."""
    if os.environ.get("JAX_MAMBA_GIT_COMMIT"):
        return os.environ["JAX_MAMBA_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)),
                               "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git, not a checkout: the header just says null
        return None


def plot(rows, path, header):
    """GB/s vs batch, one curve per (case family, impl), the copy ceiling as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    curves = {}
    for r in rows:
        if r["gbs"] is not None:
            fam = r["family"] + (f" {r['shard']} x{r['devices']}" if r.get("shard") else "")
            curves.setdefault((fam, r["impl"]), []).append((r["batch"], r["gbs"]))
    for (family, impl), pts in sorted(curves.items()):
        pts.sort()
        ax.plot(*zip(*pts), marker="o", label=f"{family} {impl}")
    ax.axhline(header["copy_gbs"], color="k", ls="--", label="device copy")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set(xlabel="batch", ylabel="GB/s (read + write)",
           title=f"selective_state_update, {header['device_kind']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_parser():
    ap = argparse.ArgumentParser(prog="jax-mamba-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", choices=["all", *bc.CASES], metavar="NAME",
                    help="named case (repeatable; 'all' = every case but b256-bf16-cache32g); "
                         "see --list")
    ap.add_argument("--list", action="store_true", help="print the named cases and exit")
    g = ap.add_argument_group("free-form shape (without --case; defaults: H64 P64 N128 G8, "
                              "bf16 state and inputs, one token)")
    g.add_argument("--batch", type=int, nargs="+",
                   help="batch sizes, one row each (default 1 8 64 256 on a GPU, 1 8 64 on the "
                        "CPU)")
    g.add_argument("--heads", type=int, help="H, number of heads (default 64)")
    g.add_argument("--dim", type=int,
                   help="P, head dimension (default 64; with --mamba1 the channel count, "
                        "default 8192)")
    g.add_argument("--dstate", type=int,
                   help="N, state size per row (default 128; with --mamba1 16)")
    g.add_argument("--ngroups", type=int, help="G, groups of B and C; must divide --heads "
                                               "(default 8)")
    g.add_argument("--state-dtype", choices=list(bc.SHORT),
                   help="dtype of the state cache (default bfloat16; int16 = block-scaled "
                        "with a float32 scale per row)")
    g.add_argument("--input-dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of x, B, C, z and out (default bfloat16)")
    g.add_argument("--mtp", type=int, help="T > 0: multi-token with T steps")
    g.add_argument("--inter", action="store_true", help="intermediate-state buffer (needs --mtp)")
    g.add_argument("--sr", action="store_true", help="stochastic rounding (fp16/bf16 state)")
    g.add_argument("--z", action="store_true", help="pass the gate z (adds its read)")
    g.add_argument("--mamba1", action="store_true", help="3-D state (S, dim, dstate), no heads")
    ap.add_argument("--calls", type=int,
                    help="K: consecutive calls per jitted function (default 20 GPU, 4 CPU)")
    ap.add_argument("--reps", type=int,
                    help="timed runs of each chain, median (default 20 GPU, 3 CPU)")
    ap.add_argument("--cache-mb", type=float, help="state cache (default 1024 GPU, 64 CPU)")
    ap.add_argument("--copy-mb", type=float,
                    help="buffer copied by the ceiling, MiB (default 1024 GPU, 64 CPU; on a "
                         "GPU halved down to 256 when it does not fit)")
    ap.add_argument("--flush-mb", type=float,
                    help="L2 flush before each run, MiB (default 256 GPU, 16 CPU; 0: none)")
    ap.add_argument("--algorithm", default="auto", choices=["auto", "simple", "vertical",
                                                            "horizontal"],
                    help="kernel strategy of the ffi handler (default auto: the planner "
                         "picks; the reference ignores it; see docs/semantics.md)")
    ap.add_argument("--impl", nargs="+", choices=list(IMPLS),
                    help="what to time: ffi (the package's handler) and/or reference (pure "
                         "jnp under XLA); default: ffi reference (with --shard: ffi)")
    ap.add_argument("--platform", choices=["cpu", "gpu", "cuda"],
                    help="JAX platform to run on (default: JAX's default backend)")
    ap.add_argument("--shard", action="append", choices=["heads", "slots"],
                    help="also time the cache sharded over heads (no communication) or over "
                         "slots (one all-reduce of out per call) on a mesh of --devices "
                         "devices, after each config's one-device rows (repeatable; ffi only; "
                         "GB/s is all devices together, 'vs 1' its ratio to one device)")
    ap.add_argument("--devices", type=int, help="mesh size for --shard (default: all devices "
                                                "of the platform)")
    ap.add_argument("--json", metavar="PATH", help="write header and rows as JSON")
    ap.add_argument("--plot", metavar="PATH", help="GB/s vs batch plot (needs matplotlib)")
    ap.add_argument("--profile", action="store_true",
                    help="also the kernel time per call measured by ncu (CUDA only)")
    ap.add_argument("--no-device-time", dest="device_time", action="store_false",
                    help="skip the traced chain that gives 'dev us' (GPU); e.g. under ncu, "
                         "whose profiler and jax.profiler's would compete")
    ap.add_argument("--profile-child", help=argparse.SUPPRESS)
    return ap


def parse_args(argv):
    ap = build_parser()
    o = ap.parse_args(argv)

    given = [f for f in SHAPE_FLAGS if getattr(o, f) not in (None, False)]
    if o.case and given:
        ap.error(f"--case fixes the shape; drop {', '.join('--' + f.replace('_', '-') for f in given)}"
                 " or --case")
    for f in ("calls", "reps"):
        if getattr(o, f) is not None and getattr(o, f) < 1:
            ap.error(f"--{f} must be >= 1, got {getattr(o, f)}")
    for f in ("cache_mb", "copy_mb"):
        if getattr(o, f) is not None and getattr(o, f) <= 0:
            ap.error(f"--{f.replace('_', '-')} must be > 0, got {getattr(o, f)}")
    if o.flush_mb is not None and o.flush_mb < 0:
        ap.error(f"--flush-mb must be >= 0, got {o.flush_mb}")
    if o.mamba1 and (o.heads or o.ngroups):
        ap.error("--mamba1 has no heads or groups: drop --heads/--ngroups")
    if o.devices is not None and not o.shard:
        ap.error("--devices sets the mesh of --shard: give --shard heads or --shard slots")
    if o.devices is not None and o.devices < 1:
        ap.error(f"--devices must be >= 1, got {o.devices}")
    o.shard = list(dict.fromkeys(o.shard or []))
    if o.plot and importlib.util.find_spec("matplotlib") is None:
        ap.error("--plot needs matplotlib: pip install 'jax_mamba[plot]' (or pip install matplotlib)")
    if o.shard and o.impl and "ffi" not in o.impl:
        ap.error("--shard times the ffi handler: keep ffi in --impl")
    o.impl = list(dict.fromkeys(o.impl or (["ffi"] if o.shard else ["ffi", "reference"])))
    if o.case:
        o.configs = bc.resolve(o.case)
    else:
        base = {f: getattr(o, f) for f in SHAPE_FLAGS if f != "batch" and getattr(o, f) is not None}
        if o.mamba1:
            base.update(heads=1, ngroups=1, dim=base.get("dim", 8192), dstate=base.get("dstate", 16))
        o.configs = [bc.Config(batch=b, **base) for b in (o.batch or [None])]
        err = next((e for c in o.configs for e in [bc.validate(dataclasses.replace(
            c, batch=c.batch or 1))] if e), None)
        if err:
            ap.error(err)
    return o


def _fill_defaults(o, device):
    d = GPU_DEFAULTS if device.platform != "cpu" else CPU_DEFAULTS
    for k, v in d.items():
        if k != "batch" and getattr(o, k) is None:
            setattr(o, k, v)
    if any(c.batch is None for c in o.configs):  # free-form without --batch
        o.configs = [dataclasses.replace(o.configs[0], batch=b) for b in d["batch"]]
    if device.platform != "cpu" and o.copy_mb < 1024:
        print(f"warning: --copy-mb {o.copy_mb:g} < 1024: the ceiling of docs/performance.md is "
              "a copy of >= 1 GiB")
    if device.platform != "cpu" and o.copy_mb < 1:
        raise SystemExit(f"--copy-mb must be >= 1 on a GPU, got {o.copy_mb:g}")


def _profile_all(o):
    """{config label: (kernel µs per call or None, message)}; run before this process touches
    the GPU, so that each ncu child gets the device memory that JAX would otherwise hold here."""
    if o.platform == "cpu" or "ffi" not in o.impl:
        print("--profile: ncu measures the CUDA ffi handler only; skipped")
        return {}
    out = {}
    configs = [c for c in o.configs if c.batch] or [  # free-form without --batch: GPU batches
        dataclasses.replace(o.configs[0], batch=b) for b in GPU_DEFAULTS["batch"]]
    for c in configs:
        spec = {"config": dataclasses.asdict(c), "calls": min(o.calls or 4, 4), "runs": 2,
                "cache_mb": o.cache_mb, "algorithm": o.algorithm, "platform": o.platform}
        us, msg = _bench_ncu.kernel_us_per_call(spec)
        print(f"ncu {c.label}: " + (f"{us:.2f} us/call kernel time ({msg})" if us else msg),
              flush=True)
        out[c.label] = us
    return out


def main(argv=None):
    """Console entry point (jax-mamba-bench): exit status 1 when a row is above 100% of copy
    (ruler_errors), else 0; run() returns the rows."""
    return 1 if ruler_errors(run(argv)) else 0


def run(argv=None):
    o = parse_args(argv)
    if o.list:
        for name, c in bc.CASES.items():
            print(f"{name:<24}{bc.Config(**{**dataclasses.asdict(c), 'name': ''}).label}")
        return []
    if o.profile_child:
        profile_child(json.loads(o.profile_child))
        return []
    kernel_us = _profile_all(o) if o.profile else {}
    devices = jax.devices(o.platform) if o.platform else jax.devices()
    device = devices[0]
    _fill_defaults(o, device)
    n, mesh = 1, None
    if o.shard:
        n = o.devices or len(devices)
        if n > len(devices):
            raise SystemExit(f"--devices {n}: only {len(devices)} {device.platform} devices")
        mesh = Mesh(np.array(devices[:n]), ("m",))
    ceil = measure_ceiling(device, int(o.copy_mb * 2**20), o.calls, o.reps)
    copy = ceil.gbs * 1e9
    header = {"device_kind": device.device_kind, "platform": device.platform,
              "jax_version": jax.__version__, "jaxlib_version": importlib.metadata.version("jaxlib"),
              "git_commit": git_commit(), "date": datetime.datetime.now(
                  datetime.timezone.utc).isoformat(timespec="seconds"),
              "copy_gbs": ceil.gbs, "copy_method": ceil.method,
              "copy_memcpy_gbs": ceil.memcpy_gbs, "copy_kernel_gbs": ceil.kernel_gbs,
              "copy_write_gbs": ceil.write_gbs,
              "copy_mb": o.copy_mb, "copy_buffer_mb": ceil.buffer_mb, "copy_bytes": ceil.bytes,
              "copy_us": ceil.seconds * 1e6, "copy_note": ceil.note,
              "calls": o.calls, "reps": o.reps, "cache_mb": o.cache_mb, "flush_mb": o.flush_mb}
    if o.shard:
        header.update(devices=n, shard=o.shard, mesh_device_kinds=[d.device_kind for d in
                                                                   devices[:n]])
    print(f"device {device.device_kind} ({device.platform}); jax {jax.__version__}; "
          + describe_ceiling(ceil))
    if ceil.note:
        print(f"warning: ceiling: {ceil.note}")
    on_gpu = device.platform != "cpu"
    print(f"{'case':<28}{'impl':<10}{'algo':<11}{'us/call':>10}{'GB/s':>9}{'% copy':>8}"
          f"{'speedup':>9}" + (f"{'dev us':>9}{'dev %':>7}" if on_gpu else "")
          + (f"{'kernel us':>11}" if o.profile else "")
          + (f"{'layout':>12}{'vs 1':>8}{'kept':>6}" if o.shard else ""))
    flush = make_flush(devices[:n] if mesh is not None else device, o.flush_mb)
    rows = []
    for c in o.configs:
        nbytes = bc.bytes_per_call(c)
        one_device_gbs = None
        for shard in [None] + o.shard:
            why = shard_problem(c, shard, n) if shard else None
            if why:
                print(f"{c.label:<28}{'ffi':<10}{'':<11}skipped over {shard} x{n}: {why}")
                continue
            nd = n if shard else 1
            impls = o.impl if shard is None else ["ffi"]
            timed = {impl: time_config(impl, c, o, device, flush, mesh if shard else None,
                                       shard) for impl in impls}
            t = {impl: v[0] for impl, v in timed.items()}
            for impl in impls:
                ok = math.isfinite(t[impl])
                sp = (t["reference"] / t[impl] if ok and "reference" in t and impl != "reference"
                      and math.isfinite(t["reference"]) else None)
                ku = kernel_us.get(c.label) if impl == "ffi" and not shard else None
                du = timed[impl][3]
                r = {"case": c.label, "family": c.family, "batch": c.batch, "impl": impl,
                     "algorithm": o.algorithm if impl == "ffi" else "-",
                     "us_per_call": t[impl] * 1e6 if ok else None,  # None: t(2K) <= t(K), noise
                     "gbs": nbytes / t[impl] / 1e9 if ok else None,
                     "pct_copy": 100 * nbytes / t[impl] / (copy * nd) if ok else None,
                     "speedup": sp, "bytes_per_call": nbytes,
                     "chain_median_us": {f"K={k}": v * 1e6 for k, v in timed[impl][1].items()},
                     "kernel_us_per_call": ku,
                     "device_us_per_call": du,
                     "device_pct_copy": 100 * nbytes / (du * 1e-6) / copy if du else None,
                     "copy_gbs": ceil.gbs * nd,
                     "cache_mb": c.cache_mb or o.cache_mb, "config": dataclasses.asdict(c)}
                extra = ""
                if o.shard:  # the layout columns (and keys) only when sharded rows are asked for
                    if shard is None and impl == "ffi":
                        one_device_gbs = r["gbs"]
                    vs = (r["gbs"] / one_device_gbs if shard and r["gbs"] and one_device_gbs
                          else None)
                    r.update(shard=shard, devices=nd, vs_one_device=vs,
                             state_kept=bool(timed[impl][2]))
                    extra = (f"{(f'{shard} x{nd}' if shard else '1 device'):>12}"
                             + (f"{vs:>7.2f}x" if vs else f"{'-':>8}")
                             + f"{'yes' if r['state_kept'] else 'NO':>6}")
                rows.append(r)
                print(f"{c.label:<28}{impl:<10}{r['algorithm']:<11}"
                      + (f"{r['us_per_call']:>10.2f}{r['gbs']:>9.0f}{r['pct_copy']:>7.0f}%" if ok
                         else f"{'noisy: t(2K) <= t(K), raise --reps/--calls':>27}")
                      + (f"{sp:>8.2f}x" if sp else f"{'-':>9}")
                      + ((f"{du:>9.2f}{r['device_pct_copy']:>6.0f}%" if du else f"{'-':>9}{'-':>7}")
                         if on_gpu else "")
                      + (f"{ku:>11.2f}" if ku else (f"{'-':>11}" if o.profile else ""))
                      + extra, flush=True)
    errors = ruler_errors(rows)
    header["ruler_errors"] = errors
    if o.json:
        with open(o.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)
    if o.plot:
        plot(rows, o.plot, header)
    if errors:
        sys.stdout.flush()
        print("\n".join(errors), file=sys.stderr, flush=True)
    return rows


def describe_ceiling(ceil: Ceiling):
    """The ceiling's line: the one used, then every method measured."""
    if ceil.kernel_gbs is None:
        return (f"copy {ceil.gbs:.0f} GB/s (jax_mamba_copy memcpy chain, {ceil.buffer_mb:g} MiB, "
                "read + write)")
    used = "SM copy kernel" if ceil.method == "sm_kernel" else "cudaMemcpyAsync"
    write = ("" if ceil.write_gbs is None else
             f"; write only (cudaMemsetAsync, not a ceiling) {ceil.write_gbs:.0f} GB/s")
    return (f"copy {ceil.gbs:.0f} GB/s = {used}, the faster of cudaMemcpyAsync "
            f"{ceil.memcpy_gbs:.0f} GB/s and SM copy kernel {ceil.kernel_gbs:.0f} GB/s "
            f"({ceil.buffer_mb:g} MiB, read + write, event-timed median){write}")


if __name__ == "__main__":
    raise SystemExit(main())

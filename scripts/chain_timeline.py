"""Where a chained call's time goes: the benchmark's jitted chain (jax_mamba.benchmark: K donated
calls, each on its own slots and inputs, after an L2 flush) run under jax.profiler, and the
device timeline read back from the trace (CUPTI, no nsys needed). Per case it prints

  - the kernels of one chain by name (count, median µs): anything that is not an ssu_ kernel
    (copies, fusions) is work the chain does beside ours;
  - the median ssu_ kernel time, the median gap between one kernel's end and the next one's
    start, and the chain's span / K (what the benchmark's per-call figure should approach);
  - the host's wall time of the same runs, and the host events that took the most of it
    (command-buffer updates, the handler's planning), to tell device time from host time.

    python scripts/chain_timeline.py b1-bf16 b64-bf16 [--calls 20] [--runs 3] [--same-slots]
                                     [--pipelined M]

--same-slots passes the same slot arrays to every run (no argument changes address between
runs), to see whether re-recording a command buffer for new arguments costs per-call time.
Run one process per XLA_FLAGS setting, e.g. XLA_FLAGS=--xla_gpu_enable_command_buffer= for the
chain without command buffers.
"""
import argparse
import collections
import glob
import os
import statistics
import tempfile
import time

import jax

import jax_mamba
from jax_mamba import _bench_cases as bc
from jax_mamba import _bench_trace
from jax_mamba import benchmark as bm


def host_events(path):
    """(event name, duration ns) of every event on the host planes of an xplane file."""
    pd = jax.profiler.ProfileData.from_file(path)
    return [(ev.name, ev.duration_ns) for plane in pd.planes
            if "host" in plane.name.lower() or "CPU" in plane.name
            for line in plane.lines for ev in line.events]


def chains(kernels, gap_ns=200_000):
    """Split time-sorted (name, start, dur) kernels into runs separated by > gap_ns idle."""
    runs, cur, end = [], [], None
    for k in kernels:
        if end is not None and k[1] - end > gap_ns:
            runs.append(cur)
            cur = []
        cur.append(k)
        end = max(end or 0, k[1] + k[2])
    if cur:
        runs.append(cur)
    return runs


def profile_case(c, o, device, flush):
    arr = bm.Arrays(c, o.calls, c.cache_mb or o.cache_mb, device)
    fn = bm.make_fn(jax_mamba.selective_state_update, c, o.calls, "auto")
    carry = [arr.carry]
    fixed = arr.slots(o.calls)

    def once():
        slots = fixed if o.same_slots else arr.slots(o.calls)
        flush()
        t0 = time.perf_counter()
        res = fn(carry[0], arr.params, arr.inputs, slots)
        jax.block_until_ready(res)
        carry[0] = res[0]
        return time.perf_counter() - t0

    for _ in range(3):
        once()
    logdir = tempfile.mkdtemp(prefix="chain_tl_")
    with jax.profiler.trace(logdir):
        walls = [once() for _ in range(o.runs)]
    paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    return walls, _bench_trace.device_kernels(paths[0]), host_events(paths[0])


def pipelined(c, o, device):
    """A decode loop's view: o.pipelined runs of the K chain dispatched back to back (each on new
    slot arrays, no flush, no wait in between), then one wait. Prints the wall time per call
    and the device span per call of the traced loop (gaps between runs included): when the two
    agree, dispatching ahead hides XLA's host work per call (re-recording the command buffer's
    FFI calls for the new slot arrays) behind the GPU's."""
    arr = bm.Arrays(c, o.calls, c.cache_mb or o.cache_mb, device)
    fn = bm.make_fn(jax_mamba.selective_state_update, c, o.calls, "auto")
    carry = arr.carry

    def loop():
        nonlocal carry
        t0 = time.perf_counter()
        outs = []
        for _ in range(o.pipelined):
            carry, out = fn(carry, arr.params, arr.inputs, arr.slots(o.calls))
            outs.append(out[-1])
        jax.block_until_ready((carry, outs))
        return time.perf_counter() - t0

    loop()  # compiles
    walls = []
    n = o.pipelined * o.calls
    dev = _bench_trace.chain_device_us(_bench_trace.traced_run(lambda: walls.append(loop())), n)
    wall = walls[0]
    print(f"   pipelined, {o.pipelined} runs x {o.calls} calls dispatched ahead: wall "
          f"{wall * 1e6 / n:.2f} µs per call, device span "
          + (f"{dev:.2f} µs per call" if dev else "- (no device plane)"))


def report(c, o, walls, dev, host_ev):
    print(f"== {c.name}: K={o.calls}, {o.runs} runs, same slots: {o.same_slots}")
    print(f"   host wall per run: median {statistics.median(walls) * 1e6:.1f} µs "
          f"({statistics.median(walls) * 1e6 / o.calls:.2f} µs per call)")
    if not dev:
        print("   no device plane in the trace")
        return
    pat = _bench_trace.KERNEL_PATTERN
    runs = [r for r in chains(dev) if any(pat in n for n, _, _ in r)]
    for i, run in enumerate(runs[-o.runs:]):
        ssu = [r for r in run if pat in r[0]]
        # the chain: from the first ssu_ kernel's start to the last one's end (the L2 flush
        # before it is left out); what else runs in between is listed below
        run = [r for r in run if ssu[0][1] <= r[1] <= ssu[-1][1]]
        names = collections.Counter(n[:60] for n, _, _ in run)
        durs = collections.defaultdict(list)
        for n, _, d in run:
            durs[n[:60]].append(d / 1e3)
        gaps = [b[1] - (a[1] + a[2]) for a, b in zip(ssu, ssu[1:])]
        span = (ssu[-1][1] + ssu[-1][2] - ssu[0][1]) / 1e3
        kern = statistics.median(r[2] for r in ssu) / 1e3
        gap = statistics.median(gaps) / 1e3 if gaps else 0.0
        print(f"   run {i}: {len(ssu)} ssu kernels, median {kern:.2f} µs, gap between ssu kernels "
              f"median {gap:.2f} µs (max {max(gaps) / 1e3 if gaps else 0:.2f}), span {span:.1f} µs "
              f"= {span / o.calls:.2f} µs per call")
        if i == 0:
            for n, k in names.most_common(8):
                print(f"      {k:4d} x {statistics.median(durs[n]):8.2f} µs  {n}")
    host = collections.defaultdict(float)
    for n, d in host_ev:
        host[n[:70]] += d / 1e3
    top = sorted(host.items(), key=lambda kv: -kv[1])[:12]
    print("   host events, total µs over the traced runs:")
    for n, t in top:
        print(f"      {t:10.1f}  {n}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cases", nargs="+", choices=list(bc.CASES))
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cache-mb", type=float, default=None)
    ap.add_argument("--same-slots", action="store_true")
    ap.add_argument("--pipelined", type=int, default=0, metavar="M",
                    help="also M runs dispatched back to back, new slots each (pipelined())")
    o = ap.parse_args()
    device = jax.devices()[0]
    d = bm.GPU_DEFAULTS if device.platform != "cpu" else bm.CPU_DEFAULTS
    o.cache_mb = o.cache_mb or d["cache_mb"]
    flush = bm.make_flush(device, d.get("flush_mb", 0))
    print(f"device: {device.device_kind}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    for name in o.cases:
        c = bc.CASES[name]
        report(c, o, *profile_case(c, o, device, flush))
        if o.pipelined:
            pipelined(c, o, device)


if __name__ == "__main__":
    main()

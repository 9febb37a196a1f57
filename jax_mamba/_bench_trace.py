"""The chain's device time, read from a jax.profiler trace (CUPTI) of one timed run: the
benchmark's 'dev us' column.

The wall-clock figure per call, (t(2K) - t(K)) / K, holds everything that grows with the number
of calls, host work included. Inside an XLA command buffer that host work is mostly XLA's own:
when an argument of the jitted chain sits at a new address (new slot arrays every run), XLA
re-records each custom call that reads it by tracing the handler again before the graph is
launched (about 8 µs per call on an H200 host; the wall-minus-device gap was 2-14 µs per call
on H100 and H200 hosts, varying from run to run). A decode loop that dispatches ahead of the
GPU should hide that host time behind the previous step (not yet measured); a synchronous run
cannot. The device figure is the span of the chain on the GPU, from the
first kernel of the call's family to the last one's end, divided by K: kernels and the gaps
between them, no host time.
"""
from __future__ import annotations

import glob
import os
import tempfile

import jax

KERNEL_PATTERN = "ssu_"  # the handler's kernels (ffi/ssu_cuda*.cuh), fast path and fallback


def device_kernels(path):
    """(name, start ns, duration ns) of every event on the GPU planes' stream (or kernel) lines
    of an xplane file (kernels and memcpys as CUPTI saw them), sorted by start; the lines that
    scripts/chain_timeline.py read kernels from on H100 and H200 (jax 0.11.2)."""
    pd = jax.profiler.ProfileData.from_file(path)
    seen, out = set(), []
    for plane in pd.planes:
        if "gpu" not in plane.name.lower():
            continue
        for line in plane.lines:
            if not any(w in line.name.lower() for w in ("stream", "kernel")):
                continue
            for ev in line.events:
                key = (ev.name, ev.start_ns)
                if key not in seen:  # the same kernel on a per-stream and an all-streams line
                    seen.add(key)
                    out.append((ev.name, ev.start_ns, ev.duration_ns))
    return sorted(out, key=lambda e: e[1])


def chain_device_us(events, calls, pattern=KERNEL_PATTERN):
    """Device µs per call of one traced chain of `calls` calls: from the first event whose name
    contains `pattern` to the last one's end, over `calls`. None without such events."""
    mine = [e for e in events if pattern in e[0]]
    if not mine:
        return None
    span_ns = max(s + d for _, s, d in mine) - mine[0][1]
    return span_ns / 1e3 / calls


def traced_run(run):
    """Events of the device planes recorded while `run()` executes; [] when the trace has no
    GPU plane (CPU runs) or no profiler session can be started (one already active). An error
    of `run()` itself propagates."""
    with tempfile.TemporaryDirectory(prefix="jax_mamba_bench_trace_") as logdir:
        try:
            jax.profiler.start_trace(logdir)
        except RuntimeError:
            run()
            return []
        try:
            run()
        finally:
            jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        return device_kernels(paths[0]) if paths else []

"""--profile: the kernel's own time per call, measured by Nsight Compute (the cross-check of
docs/performance.md).

The benchmark re-runs itself for one case under
    ncu --clock-control none --kernel-name regex:ssu_ --csv --metrics gpu__time_duration.sum
(a chain of `calls` donated calls, run twice: compile + once more) and divides the summed
duration of the matched kernels by the number of calls. ncu flushes the caches before every
kernel it profiles (its default --cache-control all), so the figure is a cold-cache kernel
time, free of dispatch and launch gaps; the wall-clock figure beside it includes them.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile

KERNEL_REGEX = "regex:ssu_"
_TO_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
          "second": 1e6, "s": 1e6}


def find_ncu():
    """$NCU, else ncu on PATH, else the CUDA toolkit's copy; None when there is none."""
    cand = [os.environ.get("NCU"), shutil.which("ncu"), "/usr/local/cuda/bin/ncu"]
    return next((c for c in cand if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def parse_csv(text: str) -> list[float]:
    """Kernel durations in µs from ncu's --csv output (lines before the header are ncu's log)."""
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        return []
    out = []
    for row in csv.DictReader(lines[start:]):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = row["Metric Value"].replace(",", "")  # some locales print thousands separators
        out.append(float(value) * _TO_US[row.get("Metric Unit", "nsecond").strip()])
    return out


def kernel_us_per_call(child_spec: dict, timeout=600):
    """(µs per call, message): runs the child under ncu; µs is None when it could not."""
    ncu = find_ncu()
    if ncu is None:
        return None, ("ncu (Nsight Compute) not found: set $NCU or put ncu on PATH; "
                      "kernel times skipped")
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "ncu.csv")
        cmd = [ncu, "--clock-control", "none", "--kernel-name", KERNEL_REGEX, "--csv",
               "--metrics", "gpu__time_duration.sum", "--log-file", log,
               sys.executable, "-P", "-m", "jax_mamba.benchmark", "--profile-child",
               json.dumps(child_spec)]
        # The child profiles the jax_mamba this process runs: -P keeps the cwd (e.g. a source
        # tree without compiled modules) off sys.path, PYTHONPATH names this package's parent.
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return None, f"ncu run timed out after {timeout} s"
        text = open(log).read() if os.path.exists(log) else ""
    durations = parse_csv(text)
    if p.returncode or not durations:
        tail = (p.stderr or p.stdout or text)[-600:]
        return None, f"ncu run failed (rc {p.returncode}, {len(durations)} kernels): {tail}"
    calls = child_spec["calls"] * child_spec["runs"]
    return sum(durations) / calls, f"{len(durations)} kernels over {calls} calls"

"""The CUDA planner (ffi/ssu_plan.cc) as pure host functions, through the CPU module: which
kernel runs a problem, and which explicit strategies are refused and why (docs/semantics.md, `algorithm`).

The fast path is on unless JAX_MAMBA_CUDA_FAST=0 (read once per process): the kernel choice is
checked in child processes with the switch on and off."""
import json
import os
import subprocess
import sys
import functools

import pytest

from jax_mamba import _cpu
from jax_mamba._lowering import NOMINAL_DEVICE

SMS, OPTIN = NOMINAL_DEVICE


def plan(algorithm="auto", S=64, H=80, P=64, N=128, nb=64, T=1, rows=None, dtype="bfloat16",
         varlen=False, inter=None, cache_steps=0, sms=SMS, optin=OPTIN, seed=False):
    I, CS = inter or (0, 0)
    return _cpu.plan(S=S, H=H, P=P, N=N, nb=nb, T=T, rows=nb * T if rows is None else rows,
                     state_dtype=dtype, varlen=varlen, has_inter=inter is not None, I=I, CS=CS,
                     cache_steps=cache_steps, algorithm=algorithm, sms=sms, smem_optin=optin,
                     has_seed=seed)


CHOICES = [  # (problem, kernel with the fast path on[, kernel with it off when different])
    (dict(), "ssu_fast", "ssu_simple_step1"),                 # the decode row: the fast path
    (dict(nb=1), "ssu_fast", "ssu_simple"),                   # small batch too (latency-bound)
    (dict(N=8), "ssu_simple_step1"),                          # a dstate the fast path is not built for
    (dict(N=8, nb=1), "ssu_simple"),                          # ... and too few (entry, head) pairs
    (dict(N=48), "ssu_simple"),                               # 6 vectors a row: not a power of two
    (dict(dtype="int16"), "ssu_fast", "ssu_simple_step1"),   # int16 block-scaled states too
    (dict(inter=(64, 1)), "ssu_simple_step1"),                # an intermediate buffer: neither
    (dict(cache_steps=1), "ssu_fast", "ssu_simple_step1"),    # a cache_steps limit the step fits in
    (dict(T=4), "ssu_fast_mtp", "ssu_simple"),                # MTP: the multi-step fast path
    (dict(T=4, inter=(64, 4)), "ssu_fast_mtp", "ssu_simple"), # ... with an intermediate buffer
    (dict(T=4, N=48), "ssu_simple"),                          # ... not for a dstate it lacks
    (dict(T=4, N=8), "ssu_simple"),
    (dict(T=4, dtype="int16"), "ssu_fast_mtp", "ssu_simple"), # ... and int16 states
    # stochastic rounding (rand_seed): the fast path's SR instances, STP and MTP
    (dict(seed=True), "ssu_fast", "ssu_simple_step1"),
    (dict(seed=True, dtype="float16"), "ssu_fast", "ssu_simple_step1"),
    (dict(seed=True, nb=1), "ssu_fast", "ssu_simple"),
    (dict(seed=True, N=16, dtype="float16"), "ssu_fast", "ssu_simple_step1"),
    (dict(seed=True, T=4), "ssu_fast_mtp", "ssu_simple"),
    (dict(seed=True, T=4, dtype="float16", inter=(64, 4)), "ssu_fast_mtp", "ssu_simple"),
    (dict(seed=True, inter=(64, 1)), "ssu_simple_step1"),    # STP with a buffer: as without SR
    (dict(seed=True, N=48), "ssu_simple"),                    # a dstate the fast path lacks
    # varlen (cu_seqlens): ssu_fast_mtp's varlen instances, dstate 64 / 128 (float32 inputs here)
    (dict(varlen=True, nb=8, T=0, rows=20), "ssu_fast_mtp", "ssu_simple"),
    (dict(varlen=True, nb=8, T=0, rows=20, N=64, dtype="float32"), "ssu_fast_mtp", "ssu_simple"),
    (dict(varlen=True, nb=8, T=0, rows=20, dtype="int16", inter=(10, 4)), "ssu_fast_mtp",
     "ssu_simple"),
    (dict(varlen=True, nb=8, T=0, rows=20, seed=True, dtype="float16"), "ssu_fast_mtp",
     "ssu_simple"),
    (dict(varlen=True, nb=1, T=0, rows=1), "ssu_fast_mtp", "ssu_simple"),  # one token
    (dict(varlen=True, nb=8, T=0, rows=20, N=32), "ssu_simple"),   # a dstate it is not built for
    (dict(varlen=True, nb=8, T=0, rows=20, N=256), "ssu_simple"),
    (dict(varlen=True, nb=65534, S=70000, T=0, rows=70000), "ssu_fast_mtp", "ssu_simple"),
    (dict(varlen=True, nb=65535, S=70000, T=0, rows=70000), "ssu_simple"),  # + the zero slice: > z
    (dict(N=12), "ssu_generic"),                              # not whole 16-byte vectors
    (dict(N=2048), "ssu_generic"),                            # more than a warp of vectors
    (dict(algorithm="simple"), "ssu_fast", "ssu_simple_step1"),
    (dict(algorithm="horizontal"), "ssu_horizontal"),         # per-thread columns: never the STP kernel
    (dict(algorithm="vertical"), "ssu_vertical"),
    (dict(nb=0), "none"),                                     # empty batch: nothing to launch
    (dict(varlen=True, nb=0, T=0, rows=5), "ssu_simple"),     # no sequences, yet rows to zero
    (dict(dtype="float32", N=16), "ssu_fast", "ssu_simple_step1"),
    *((dict(N=n, dtype=d), "ssu_fast", "ssu_simple" if n // (4 if d == "float32" else 8) > 32
       else "ssu_simple_step1") for n in (16, 32, 64, 128, 256)
      for d in ("float32", "bfloat16", "float16")),
    (dict(nb=70000, S=70000), "ssu_simple_step1"),            # more entries than the grid's z axis
    (dict(H=70000, P=1, N=16), "ssu_simple_step1"),           # more heads than its y axis
]


def _choices_in_child(fast):
    """plan() of every CHOICES problem in a child process with JAX_MAMBA_CUDA_FAST=fast."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_plan as t; "
            "print(json.dumps([t.plan(**c[0]) for c in t.CHOICES]))")
    env = dict(os.environ, JAX_MAMBA_CUDA_FAST=fast)
    r = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], env=env,
                       capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(__file__))
    assert r.returncode == 0, r.stderr[-2000:]
    return [tuple(x) for x in json.loads(r.stdout.strip().splitlines()[-1])]


@functools.lru_cache(None)
def choices(fast):
    return _choices_in_child(fast)


def _cases(kernels):
    return [pytest.param(i, id=f"{i}-{kernels[i][1]}") for i in range(len(kernels))]


@pytest.mark.parametrize("i", _cases(CHOICES))
def test_kernel_choice(i):
    """With JAX_MAMBA_CUDA_FAST=1 every problem gets the kernel listed."""
    kw, kernel = CHOICES[i][:2]
    assert choices("1")[i] == (kernel, ""), kw


@pytest.mark.parametrize("i", _cases(CHOICES))
def test_kernel_choice_without_fast_path(i):
    """JAX_MAMBA_CUDA_FAST=0: the fast path's problems run the other kernels (listed third); every other
    problem gets the same kernel as with the fast path on."""
    kw, kernel = CHOICES[i][0], CHOICES[i][-1]
    assert choices("0")[i] == (kernel, ""), kw


def test_fast_path_is_on_by_default():
    """The process default (no JAX_MAMBA_CUDA_FAST in the environment) is the fast path."""
    if "JAX_MAMBA_CUDA_FAST" in os.environ:
        pytest.skip("JAX_MAMBA_CUDA_FAST is set in this environment")
    assert plan() == ("ssu_fast", "")
    assert plan(T=4) == ("ssu_fast_mtp", "")
    assert plan(varlen=True, nb=8, T=0, rows=20) == ("ssu_fast_mtp", "")


ROWS = [  # (problem, rows per thread of the fast kernel the planner picks on a 132-SM device)
    (dict(), 4),                      # a row is one vector per lane: 4 rows (64 B) in flight
    (dict(nb=8, H=64), 4),
    (dict(nb=4, H=64), 2),            # 4 rows would leave under 4 CTAs per SM
    (dict(nb=1, H=64), 1),            # latency-bound: as many CTAs as rows allow
    (dict(T=4), 4),                   # MTP, int16, fp32 alike
    (dict(dtype="int16"), 4),
    (dict(dtype="float32"), 4),
    (dict(N=256, dtype="float32"), 1),  # two vectors per lane already
    (dict(P=4), 1),                   # never more rows than the head has
    (dict(H=1, P=8192, N=16, dtype="float32", per_element=True), 2),  # Mamba-1
]


@pytest.mark.parametrize("kw,kv", ROWS)
def test_fast_rows_per_thread(kw, kv):
    """The fast path's rows per thread (the planner's rule, ffi/ssu_plan.cc fast_plan)."""
    if {"JAX_MAMBA_CUDA_FAST", "JAX_MAMBA_CUDA_ROWS", "JAX_MAMBA_CUDA_THREADS"} & set(os.environ):
        pytest.skip("a planner override is set in this environment")
    kw = dict(dict(S=64, H=80, P=64, N=128, nb=64, T=1, state_dtype="bfloat16", varlen=False,
                   has_inter=False, I=0, CS=0, cache_steps=0, algorithm="auto", sms=132,
                   smem_optin=OPTIN), **{("state_dtype" if k == "dtype" else k): v
                                         for k, v in kw.items()})
    kw.setdefault("rows", kw["nb"] * kw["T"])
    d = _cpu.plan_detail(**kw)
    assert d["kernel"].startswith("ssu_fast") and d["nv"] == kv, (kw, d)
    lanes_per_row = min(32, kw["N"] * (4 if kw["state_dtype"] == "float32" else 2) // 16)
    assert d["rows_cta"] == d["nv"] * d["threads"] // lanes_per_row, d


STEPS_PROBLEMS = [  # (plan_detail changes, steps with JAX_MAMBA_CUDA_MTP_STEPS=1)
    (dict(), 4),                                   # bfloat16 state and input, dstate 128, T 4
    (dict(T=2), 2), (dict(T=8), 8), (dict(state_dtype="float32", T=6), 6),
    (dict(T=3), 0), (dict(T=10), 0),               # T not instantiated
    (dict(state_dtype="float16"), 0), (dict(state_dtype="int16"), 0),
    (dict(input_dtype="float32"), 0), (dict(N=64), 0),
    (dict(has_seed=True), 0),                      # stochastic rounding: the runtime loop
    (dict(T=1, has_inter=False, I=0, CS=0), 0),    # a single step: ssu_fast
    (dict(varlen=True, T=0, rows=40), 0),          # varlen: lengths per sequence
]


def test_compiled_steps_only_where_instantiated_and_asked():
    """plan_detail's `steps` (ssu_fast_mtp with T compiled in): only with
    JAX_MAMBA_CUDA_MTP_STEPS=1 (read once per process: child processes) and only for the states,
    inputs, dstates and T ssu_plan.h's fast_mtp_steps names."""
    base = dict(S=64, H=8, P=64, N=128, nb=16, T=4, rows=64, state_dtype="bfloat16",
                input_dtype="bfloat16", varlen=False, has_inter=True, I=16, CS=10, cache_steps=0,
                algorithm="auto", sms=132, smem_optin=OPTIN)
    code = ("import json, sys; from jax_mamba import _cpu; "
            "print(json.dumps([_cpu.plan_detail(**p) for p in json.loads(sys.argv[1])]))")
    problems = [dict(base, **kw) for kw, _ in STEPS_PROBLEMS]
    for on in ("0", "1"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_MAMBA_CUDA")}
        env["JAX_MAMBA_CUDA_MTP_STEPS"] = on
        # from the tests directory: in the repository root the source tree would shadow the
        # installed package (no compiled modules there)
        r = subprocess.run([sys.executable, "-c", code, json.dumps(problems)], env=env,
                           capture_output=True, text=True, timeout=120,
                           cwd=os.path.dirname(os.path.abspath(__file__)))
        assert r.returncode == 0, r.stderr[-2000:]
        details = json.loads(r.stdout.strip().splitlines()[-1])
        for (kw, steps), d in zip(STEPS_PROBLEMS, details):
            assert d["kernel"].startswith("ssu_fast"), (kw, d)
            assert d["steps"] == (steps if on == "1" else 0), (on, kw, d)


def test_plan_detail_refusal_names_the_cause():
    with pytest.raises(ValueError, match="unsupported state dtype float64"):
        _cpu.plan_detail(S=1, H=1, P=1, N=16, nb=1, T=1, rows=1, state_dtype="float64",
                         varlen=False, has_inter=False, I=0, CS=0, cache_steps=0,
                         algorithm="auto", sms=132, smem_optin=OPTIN)


@pytest.mark.parametrize("kw,words", [
    (dict(algorithm="vertical", N=512), ["'vertical'", "multiple of 8", "256", "dstate=512"]),
    (dict(algorithm="vertical", N=10, dtype="float32"), ["multiple of 4", "dstate=10"]),
    (dict(algorithm="horizontal", N=12), ["'horizontal'", "multiple of 8", "1024", "dstate=12"]),
    (dict(algorithm="horizontal", N=2048), ["1024", "dstate=2048"]),
    (dict(algorithm="vertical", N=256, dtype="float32", optin=8 * 1024),
     ["shared memory", str(8 * 1024)]),
    (dict(algorithm="diagonal"), ["auto/simple/vertical/horizontal", "'diagonal'"]),
    (dict(S=2**31), ["below 2^31"]),
    (dict(dtype="float64"), ["unsupported state dtype float64"]),
])
def test_refusals_say_why(kw, words):
    kernel, why = plan(**kw)
    assert kernel == ""
    for w in words:
        assert w in why, why


def test_vertical_accepts_what_it_documents():
    for dtype, E in (("float32", 4), ("bfloat16", 8), ("int16", 8)):
        for N in (E, 64, 256):
            assert plan(algorithm="vertical", N=N, dtype=dtype)[0] == "ssu_vertical", (dtype, N)

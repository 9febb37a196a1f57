"""The CUDA planner (ffi/ssu_plan.cc) as pure host functions, through the CPU module: which
kernel runs a problem, and which explicit strategies are refused and why (docs/semantics.md, `algorithm`)."""
import pytest

from jax_mamba import _cpu
from jax_mamba._lowering import NOMINAL_DEVICE

SMS, OPTIN = NOMINAL_DEVICE


def plan(algorithm="auto", S=64, H=80, P=64, N=128, nb=64, T=1, rows=None, dtype="bfloat16",
         varlen=False, inter=None, cache_steps=0, sms=SMS, optin=OPTIN):
    I, CS = inter or (0, 0)
    return _cpu.plan(S=S, H=H, P=P, N=N, nb=nb, T=T, rows=nb * T if rows is None else rows,
                     state_dtype=dtype, varlen=varlen, has_inter=inter is not None, I=I, CS=CS,
                     cache_steps=cache_steps, algorithm=algorithm, sms=sms, smem_optin=optin)


@pytest.mark.parametrize("kw,kernel", [
    (dict(), "ssu_fast"),                               # the decode row: the fast path
    (dict(nb=1), "ssu_fast"),                           # small batch too (latency-bound)
    (dict(N=8), "ssu_simple_step1"),                    # a dstate the fast path is not built for
    (dict(N=8, nb=1), "ssu_simple"),                    # ... and too few (entry, head) pairs
    (dict(N=48), "ssu_simple"),                         # 6 vectors a row: not a power of two
    (dict(dtype="int16"), "ssu_simple_step1"),          # int16 states: not on the fast path
    (dict(inter=(64, 1)), "ssu_simple_step1"),          # an intermediate buffer: neither
    (dict(cache_steps=1), "ssu_fast"),                  # a cache_steps limit the step fits in
    (dict(T=4), "ssu_fast_mtp"),                        # MTP: the multi-step fast path
    (dict(T=4, inter=(64, 4)), "ssu_fast_mtp"),         # ... with an intermediate buffer
    (dict(T=4, N=48), "ssu_simple"),                    # ... not for a dstate it lacks
    (dict(T=4, dtype="int16"), "ssu_simple"),           # ... nor for int16 states
    (dict(varlen=True, nb=8, T=0, rows=20), "ssu_simple"),
    (dict(N=12), "ssu_generic"),                     # not whole 16-byte vectors
    (dict(N=2048), "ssu_generic"),                   # more than a warp of vectors
    (dict(algorithm="simple"), "ssu_fast"),
    (dict(algorithm="horizontal"), "ssu_horizontal"),       # per-thread columns: never the STP kernel
    (dict(algorithm="vertical"), "ssu_vertical"),
    (dict(nb=0), "none"),                            # empty batch: nothing to launch
    (dict(varlen=True, nb=0, T=0, rows=5), "ssu_simple"),  # no sequences, yet rows to zero
    (dict(dtype="float32", N=16), "ssu_fast"),
    *((dict(N=n, dtype=d), "ssu_fast") for n in (16, 32, 64, 128, 256)
      for d in ("float32", "bfloat16", "float16")),
    (dict(nb=70000, S=70000), "ssu_simple_step1"),      # more entries than the grid's z axis
    (dict(H=70000, P=1, N=16), "ssu_simple_step1"),     # more heads than its y axis
])
def test_kernel_choice(kw, kernel):
    assert plan(**kw) == (kernel, "")


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

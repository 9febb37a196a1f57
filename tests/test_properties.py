"""Hypothesis: random small configurations and options; FFI handler, jnp reference and the
float64 oracle must agree (every draw is a new shape, hence a new compile: few examples)."""
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

import jax_mamba
from cases import Cfg, check, close, make_case, TOL


@st.composite
def configs(draw):
    heads = draw(st.booleans())
    mode = draw(st.sampled_from(["stp", "mtp", "varlen"]))
    H = draw(st.sampled_from([1, 2, 4, 6])) if heads else 1
    G = draw(st.sampled_from([g for g in (1, 2, 3, 6) if H % g == 0])) if heads else 1
    state = draw(st.sampled_from(["f32", "bf16", "f16", "i16"]))
    write = draw(st.sampled_from(["final", "dst1d", "dst2d", "inter_idx", "inter_noidx"]))
    sbi = draw(st.sampled_from(["none", "1d", "2d"]))
    if write == "dst2d":
        sbi = draw(st.sampled_from(["1d", "2d"]))
    b = draw(st.integers(1, 4))
    T = draw(st.integers(1, 4))
    return Cfg(
        mode=mode, heads=heads, H=H, G=G, b=b, T=T,
        P=draw(st.integers(1, 12)), N=draw(st.integers(1, 40)),
        S=b * (T + 1) * 2 + draw(st.integers(0, 5)),
        state=state, inp=draw(st.sampled_from(["f32", "bf16", "f16"])),
        w=draw(st.sampled_from(["f32", "bf16", "f16"])),
        dt_elem=draw(st.booleans()), A_elem=draw(st.booleans()), DB_elem=draw(st.booleans()),
        z=draw(st.booleans()), D=draw(st.booleans()), bias=draw(st.booleans()),
        softplus=draw(st.booleans()), sbi=sbi,
        pads=sbi != "none" and draw(st.booleans()),
        pad_slot_id=draw(st.sampled_from([-1, -5, 3, 1000])),
        dst={"dst1d": "1d", "dst2d": "2d"}.get(write, "none"),
        inter={"inter_idx": "idx", "inter_noidx": "noidx"}.get(write, "none"),
        nacc=sbi == "2d" and draw(st.booleans()),
        disable=draw(st.booleans()), out=draw(st.booleans()),
        sr=state in ("f16", "bf16") and draw(st.booleans()),
        cache_steps=draw(st.sampled_from([0, 0, 4])),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(cfg=configs(), seed=st.integers(0, 2**31))
def test_random_configurations(cfg, seed):
    kw = make_case(cfg, np.random.default_rng(seed))
    res = jax_mamba.selective_state_update(**kw)
    check(cfg, kw, res)
    ref = jax_mamba.reference.selective_state_update(**kw)
    close("out vs reference", res.out, ref.out, TOL[cfg.inp])

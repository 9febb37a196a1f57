"""Every CUDA kernel strategy (`algorithm`, docs/shapes.md) against the float64 oracle at model-like sizes.

GPU only (on the CPU `algorithm` is validated and ignored: test_errors.py). An explicit
strategy either runs a configuration correctly or raises ValueError at trace time; the common
shapes (dstate 16..256 in whole 16-byte vectors) must be accepted by every strategy.
"""
import dataclasses

import jax
import numpy as np
import pytest

import jax_mamba
from cases import Cfg, check, make_case, seed_of, to_device
from conftest import PLATFORMS

pytestmark = pytest.mark.skipif("gpu" not in PLATFORMS, reason="needs a GPU and the CUDA module")

ALGORITHMS = ("auto", "simple", "horizontal", "vertical")
B = Cfg(S=24, H=4, G=2, P=64, N=128, b=5, T=4)
CASES = {
    "stp-f32-n128": B,
    "stp-bf16-n64-p80": dataclasses.replace(B, state="bf16", inp="bf16", N=64, P=80, z=True),
    "stp-f16-n96-sr": dataclasses.replace(B, state="f16", inp="f16", N=96, sr=True, pads=True),
    "stp-f32-n256-p128": dataclasses.replace(B, N=256, P=128, bias=True, softplus=True),
    "stp-bf16-n16": dataclasses.replace(B, state="bf16", N=16, H=8, G=8),
    "stp-f32-n32-per-elem": dataclasses.replace(B, N=32, dt_elem=True, A_elem=True,
                                                DB_elem=True, bias=True),
    "mtp-bf16-inter": dataclasses.replace(B, mode="mtp", state="bf16", inp="bf16",
                                          inter="idx", pads=True, z=True),
    "mtp-f32-dst-nacc": dataclasses.replace(B, mode="mtp", S=64, sbi="2d", dst="2d", nacc=True,
                                            N=64, P=128),
    "mtp-bf16-sr-inter": dataclasses.replace(B, mode="mtp", state="bf16", sr=True, inter="noidx",
                                             N=64),
    "varlen-bf16-pads": dataclasses.replace(B, mode="varlen", state="bf16", inp="bf16", N=64,
                                            pads=True, z=True, softplus=True, bias=True),
    "varlen-f32-inter": dataclasses.replace(B, mode="varlen", inter="idx", N=128),
    "int16-stp": dataclasses.replace(B, state="i16", pads=True),
    "int16-mtp-inter": dataclasses.replace(B, mode="mtp", state="i16", inter="idx", N=64),
    "mamba1-p8192-n16": Cfg(heads=False, H=1, G=1, P=8192, N=16, S=6, b=3, state="bf16",
                            inp="bf16", z=True, bias=True, softplus=True),
    "mamba1-f32-p512-n16-mtp": Cfg(heads=False, H=1, G=1, P=512, N=16, S=8, b=2, T=3,
                                   mode="mtp", inter="idx"),
    "odd-n7-p5": dataclasses.replace(B, P=5, N=7, H=3, G=1),
    "f32-n12": dataclasses.replace(B, N=12),
    "bf16-n12": dataclasses.replace(B, state="bf16", N=12),
    "f32-n2048": dataclasses.replace(B, N=2048, P=8, b=2),
}


def must_accept(algorithm, cfg):
    """Configurations a strategy may not refuse: whole 16-byte state vectors, dstate <= 256."""
    per_vector = 4 if cfg.state == "f32" else 8
    return algorithm in ("auto", "simple") or (cfg.N % per_vector == 0 and cfg.N <= 256)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("name", list(CASES))
def test_strategy_against_oracle(name, algorithm):
    cfg = CASES[name]
    kw = to_device(make_case(cfg, np.random.default_rng(seed_of(cfg))), jax.devices("gpu")[0])
    kw["algorithm"] = algorithm
    f = jax.jit(jax_mamba.selective_state_update,
                static_argnames=("dt_softplus", "pad_slot_id", "disable_state_update",
                                 "cache_steps", "algorithm"))
    try:
        res = f(**kw)
    except ValueError as e:
        assert not must_accept(algorithm, cfg), f"{algorithm} refused {name}: {e}"
        assert "algorithm" in str(e) and algorithm in str(e)
        return
    check(cfg, kw, res)

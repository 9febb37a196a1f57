"""JAX integration: autodiff raises a pointer to the reference; a jitted step exports and
re-runs."""
import jax
import numpy as np
import pytest

import jax_mamba
from cases import Cfg, TOL, close, make_case, split_static


def test_grad_raises_and_points_to_reference():
    kw = make_case(Cfg(), np.random.default_rng(0))
    f = lambda x: jax_mamba.selective_state_update(**dict(kw, x=x)).out.sum()  # noqa: E731
    with pytest.raises(TypeError, match=r"no derivative.*jax_mamba\.reference"):
        jax.grad(f)(kw["x"])
    g = lambda x: jax_mamba.reference.selective_state_update(**dict(kw, x=x)).out.sum()  # noqa: E731
    assert np.isfinite(np.asarray(jax.grad(g)(kw["x"]))).all()


def test_hlo_is_the_bare_custom_call():
    """The differentiation guard leaves nothing in the compiled program but the custom call."""
    kw = make_case(Cfg(), np.random.default_rng(1))
    arrays, static = split_static(kw)
    hlo = jax.jit(lambda a: jax_mamba.selective_state_update(**a, **static)).lower(arrays) \
        .compile().as_text()
    assert hlo.count("custom-call") == 1 and "jvp" not in hlo


def _export_platform(device):
    """The platform name jax.export uses for `device`: concrete ("cpu", "cuda", "rocm"), not
    the generic "gpu" that a CUDA device reports (Device.platform, jax.default_backend()). An
    artifact exported for "gpu" is refused where the call lowers for "cuda" (seen with jax
    0.11.2). The concrete name is the backend that lists the device (jax.devices(name))."""
    if device.platform != "gpu":
        return device.platform
    for name in ("cuda", "rocm"):
        try:
            if device in jax.devices(name):
                return name
        except RuntimeError:   # no such backend here
            pass
    raise AssertionError(f"no concrete platform (cuda, rocm) lists device {device}")


def test_export_roundtrip(device):
    """jax.export of a jitted step: the FFI target is not on JAX's stable list, so the caller
    allows it explicitly (DisabledSafetyCheck.custom_call("jax_mamba_ssu"))."""
    from jax import export
    cfg = Cfg(mode="mtp", inter="idx")
    kw = make_case(cfg, np.random.default_rng(2))
    arrays, static = split_static(kw)
    arrays = jax.device_put(arrays, device)
    step = jax.jit(lambda a: jax_mamba.selective_state_update(**a, **static))
    platform = _export_platform(device)
    if device.platform == jax.default_backend():   # jax's own name for the default backend
        assert platform == export.default_export_platform(), (platform, device.platform)
    allow = [export.DisabledSafetyCheck.custom_call("jax_mamba_ssu")]
    exp = export.export(step, platforms=[platform], disabled_checks=allow)(arrays)
    assert exp.platforms == (platform,), exp.platforms
    again = export.deserialize(exp.serialize())
    got = again.call(arrays)
    want = step(arrays)
    close("out", got.out, want.out, TOL[cfg.inp] / 100)
    np.testing.assert_array_equal(np.asarray(got.state), np.asarray(want.state))


@pytest.mark.parametrize("cfg", [Cfg(), Cfg(mode="mtp", inter="idx", state="i16"),
                                 Cfg(mode="varlen", pads=True)], ids=["stp", "mtp_i16", "varlen"])
def test_disable_jit_runs_and_agrees(cfg, device):
    """Under jax.disable_jit (a debugging mode) the op evaluates eagerly, bit-equal to jit."""
    with jax.default_device(device):
        kw = make_case(cfg, np.random.default_rng(3))
        want = jax_mamba.selective_state_update(**kw)
        with jax.disable_jit():
            got = jax_mamba.selective_state_update(**kw)
    for g, w in zip(got, want):
        if w is not None:
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))

"""Target registration and the FFI call frame."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mamba
from jax_mamba import _cpu, _ffi
from cases import Cfg, make_case, split_static


def test_one_target_name_for_both_platforms():
    # + the benchmark's copy target (jax_mamba._copy), also on both platforms
    assert sorted(_cpu.registrations()) == sorted([_ffi.TARGET, "jax_mamba_copy"])
    gpu = (_ffi._cuda.registrations() if jax_mamba.HAS_CUDA else _cpu.missing_cuda_registrations())
    assert sorted(gpu) == sorted([_ffi.TARGET, "jax_mamba_copy"])


def test_missing_cuda_handler_reports_clearly():
    """Without the CUDA module, this handler is what a GPU computation reaches. Registered here
    under a test name for the CPU, it must fail with the explanation and touch nothing."""
    jax.ffi.register_ffi_target("jax_mamba_test_missing_cuda",
                                _cpu.missing_cuda_registrations()[_ffi.TARGET], platform="cpu")
    call = jax.ffi.ffi_call("jax_mamba_test_missing_cuda", jax.ShapeDtypeStruct((2,), jnp.float32))
    zeros = jax.device_put(np.zeros((2,), np.float32), jax.devices("cpu")[0])
    with pytest.raises(Exception, match="built without CUDA"):
        jax.block_until_ready(call(zeros))


def test_gpu_without_cuda_module_fails_when_lowering_for_cuda(monkeypatch):
    """The platform comes from the lowering, not from where the inputs live: lowering for
    CUDA without the CUDA module fails clearly, lowering the same function for the CPU works."""
    from jax import export
    kw, static = split_static(make_case(Cfg(), np.random.default_rng(0)))
    f = jax.jit(lambda a: jax_mamba.selective_state_update(**a, **static))
    checks = [export.DisabledSafetyCheck.custom_call("jax_mamba_ssu")]
    monkeypatch.setattr(_ffi, "HAS_CUDA", False)
    export.export(f, platforms=["cpu"], disabled_checks=checks)(kw)
    with pytest.raises(RuntimeError, match="built without CUDA"):
        export.export(f, platforms=["cuda"], disabled_checks=checks)(kw)
    monkeypatch.setattr(_ffi, "HAS_CUDA", True)
    both = export.export(f, platforms=["cpu", "cuda"], disabled_checks=checks)(kw)
    assert both.platforms == ("cpu", "cuda")


def test_cpu_placement_on_any_host_ignores_cuda_strategy_limits():
    """Inside jit under jax.default_device(cpu) (even on a GPU host) an algorithm the CUDA
    kernels refuse is validated and ignored, as docs/errors.md says for the CPU."""
    kw, static = split_static(make_case(Cfg(N=12, state="bf16", inp="bf16", w="bf16"),
                                        np.random.default_rng(0)))
    static["algorithm"] = "vertical"  # CUDA: dstate=12 is not whole 16-byte bf16 vectors
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        f = jax.jit(lambda a: jax_mamba.selective_state_update(**a, **static))
        out = f(jax.device_put(kw, cpu)).out
    assert np.isfinite(np.asarray(out, np.float32)).all()


def test_attributes_are_baked_and_recompile():
    """Static settings are FFI attributes: different values give different executables."""
    kw = make_case(Cfg(pads=True), np.random.default_rng(0))
    kw.pop("pad_slot_id")
    kw, static = split_static(kw)
    f = jax.jit(lambda pad, **k: jax_mamba.selective_state_update(**k, **static, pad_slot_id=pad),
                static_argnums=0)
    a = f(-1, **kw).out
    b = f(-2, **kw).out  # -1 is no longer padding: an out-of-range index -> NaN
    assert not np.isnan(np.asarray(a)).any()
    assert np.isnan(np.asarray(b)).any()
    hlo = jax.jit(lambda **k: jax_mamba.selective_state_update(**k, **static, pad_slot_id=7)
                  ).lower(**kw).as_text()
    assert "pad_slot_id = 7" in hlo and "jax_mamba_ssu" in hlo

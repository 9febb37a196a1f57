"""The front end alone (jax_mamba/_problem.py): the one public signature, validation in
argument groups, and canonicalisation into the flat problem plus its Restore."""
import inspect

import jax.numpy as jnp
import numpy as np
import pytest

import jax_mamba
from jax_mamba._problem import SIGNATURE, Restore, Settings, build_problem
from cases import Cfg, make_case


def problem(**cfg):
    kw = make_case(Cfg(**cfg), np.random.default_rng(0))
    return kw, *build_problem(**{n: kw.get(n, d) for n, d in SIGNATURE})


@pytest.mark.parametrize("fn", [jax_mamba.selective_state_update,
                                jax_mamba.reference.selective_state_update,
                                jax_mamba.checked_selective_state_update,
                                jax_mamba.runtime_faults])
def test_one_signature(fn):
    params = inspect.signature(fn).parameters
    assert [(n, None if p.default is inspect.Parameter.empty else p.default)
            for n, p in params.items()] == list(SIGNATURE)


def test_signature_matches_flashinfer_order():
    names = [n for n, _ in SIGNATURE]
    assert names[:7] == ["state", "x", "dt", "A", "B", "C", "D"]
    assert names[-3:] == ["dst_state_batch_indices", "cu_seqlens", "num_accepted_tokens"]


@pytest.mark.parametrize("cfg,x,dt,B", [
    (dict(mode="stp"), (3, 1, 4, 8), (3, 1, 4), (3, 1, 2, 16)),           # T axis inserted
    (dict(mode="stp", dt_elem=True), (3, 1, 4, 8), (3, 1, 4, 8), (3, 1, 2, 16)),
    (dict(mode="mtp", T=5), (3, 5, 4, 8), (3, 5, 4), (3, 5, 2, 16)),
    (dict(mode="stp", heads=False), (3, 1, 1, 8), (3, 1, 1, 8), (3, 1, 1, 16)),  # Mamba-1: H=1
])
def test_canonical_layout(cfg, x, dt, B):
    kw, pb, restore = problem(**cfg)
    assert pb.x.shape == x and pb.dt.shape == dt and pb.B.shape == B and pb.C.shape == B
    assert pb.A.dtype == jnp.float32
    # inputs are only reshaped: same values in the same order
    np.testing.assert_array_equal(np.asarray(pb.x).ravel(), np.asarray(kw["x"]).ravel())
    # aliased buffers keep the caller's shape; the restore object knows them
    assert pb.state.shape == kw["state"].shape
    assert restore.x_shape == tuple(kw["x"].shape)
    assert restore.state_shape == tuple(kw["state"].shape)


def test_varlen_layout():
    kw, pb, restore = problem(mode="varlen", b=4, T=3)
    assert pb.mode == "varlen" and pb.nb == 4 and pb.T == 0
    assert pb.x.shape == kw["x"].shape and pb.dt.shape == kw["dt"].shape


def test_per_element_parameters_get_their_axes():
    _, pb, _ = problem(A_elem=True, DB_elem=True, bias=True)
    assert pb.A.shape == (4, 8, 16) and pb.D.shape == (4, 8) and pb.dt_bias.shape == (4, 8)
    _, pb, _ = problem(heads=False, bias=True)
    assert pb.A.shape == (1, 8, 16) and pb.D.shape == (1, 8) and pb.dt_bias.shape == (1, 8)


def test_settings_and_cache_steps():
    _, pb, _ = problem()
    assert pb.settings == Settings(pad_slot_id=-1, dt_softplus=False, disable_state_update=False,
                                   philox_rounds=10, cache_steps=None, algorithm="auto")
    _, pb, _ = problem(mode="mtp", T=2, inter="idx")
    assert pb.settings.cache_steps == pb.intermediate_states_buffer.shape[1]  # the buffer's axis


def test_restore_reshapes_every_result():
    r = Restore(x_shape=(2, 3), state_shape=(4, 3, 5), scale_shape=(4, 3),
                inter_shape=None, inter_scales_shape=None)
    out = r(jnp.zeros((2, 1, 3)), jnp.zeros((4, 1, 3, 5)), jnp.zeros((4, 1, 3)), None, None)
    assert out.out.shape == (2, 3) and out.state.shape == (4, 3, 5)
    assert out.state_scale.shape == (4, 3)
    assert out.intermediate_states_buffer is None and out.intermediate_state_scales is None


def test_absent_optional_operands_are_none():
    _, pb, _ = problem(D=False, sbi="none")
    for name in ("D", "z", "dt_bias", "state_batch_indices", "dst_state_batch_indices",
                 "state_scale", "intermediate_states_buffer", "cu_seqlens",
                 "num_accepted_tokens", "rand_seed"):
        assert getattr(pb, name) is None, name


def test_the_state_is_named_when_the_others_agree():
    """A state missing its last axis is read as a 3-D (Mamba-1) state; B and C still carry
    dstate 16, so the state (not x, which no longer fits either) is the argument named."""
    kw = make_case(Cfg(), np.random.default_rng(0))
    kw["state"] = kw["state"][..., 0]
    kw["x"] = kw["x"][:, 0]
    with pytest.raises(ValueError, match=r"^state: expected .*dstate 16 as in B and C"):
        jax_mamba.selective_state_update(**kw)

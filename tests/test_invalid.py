"""Invalid runtime data (docs/semantics.md): no out-of-bounds access, no other slot touched, NaN
outputs for exactly the affected entries (checked against the oracle, which applies those rules)."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import jax_mamba
from cases import Cfg, check, make_case, to_device


def _set(kw, name, pos, value):
    arr = np.asarray(kw[name]).copy()
    arr[pos] = value
    kw[name] = jnp.asarray(arr, kw[name].dtype)


def corrupt_src(kw, rng):
    _set(kw, "state_batch_indices", (1,), 10_000)


def corrupt_src_negative(kw, rng):
    _set(kw, "state_batch_indices", (2,), -7)


def corrupt_dst(kw, rng):
    _set(kw, "dst_state_batch_indices", (1, 0), 999)


def corrupt_inter_idx(kw, rng):
    _set(kw, "intermediate_state_indices", (0,), 55)


def corrupt_nacc(kw, rng):
    _set(kw, "num_accepted_tokens", (1,), 99)


def corrupt_nacc_negative(kw, rng):
    _set(kw, "num_accepted_tokens", (2,), -1)


def cu_beyond(kw, rng):
    cu = np.asarray(kw["cu_seqlens"]).copy()
    cu[-1] = kw["x"].shape[0] + 3
    kw["cu_seqlens"] = jnp.asarray(cu, kw["cu_seqlens"].dtype)


def cu_decreasing(kw, rng):
    cu = np.asarray(kw["cu_seqlens"]).copy()
    cu[2] = cu[1] - 1 if cu[1] > 0 else 0
    cu[1] = cu[1] + 1
    kw["cu_seqlens"] = jnp.asarray(cu, kw["cu_seqlens"].dtype)


def cu_negative(kw, rng):
    cu = np.asarray(kw["cu_seqlens"]).copy()
    cu[0] = -2
    kw["cu_seqlens"] = jnp.asarray(cu, kw["cu_seqlens"].dtype)


def unread_columns_ignored(kw, rng):
    """Garbage in unread columns of a 2-D index array and in dst of a padded entry is fine."""
    sbi = np.asarray(kw["state_batch_indices"]).copy()
    sbi[:, -1] = 123456  # column K-1 is never the read column when nacc <= K-1 ... or nacc absent
    kw["state_batch_indices"] = jnp.asarray(sbi, kw["state_batch_indices"].dtype)


CASES = [
    ("src_out_of_range", dict(mode="mtp"), corrupt_src),
    ("src_negative_not_pad", dict(mode="stp", pads=True), corrupt_src_negative),
    ("dst_out_of_range", dict(mode="mtp", sbi="2d", dst="2d"), corrupt_dst),
    ("dst_out_of_range_disabled", dict(mode="mtp", sbi="2d", dst="2d", disable=True), corrupt_dst),
    ("inter_idx_out_of_range", dict(mode="mtp", inter="idx"), corrupt_inter_idx),
    ("nacc_too_large", dict(mode="mtp", sbi="2d", nacc=True), corrupt_nacc),
    ("nacc_negative", dict(mode="varlen", sbi="2d", nacc=True), corrupt_nacc_negative),
    ("cu_beyond_tokens", dict(mode="varlen", dst="2d", sbi="2d"), cu_beyond),
    ("cu_decreasing", dict(mode="varlen", inter="idx"), cu_decreasing),
    ("cu_negative", dict(mode="varlen"), cu_negative),
    ("seq_longer_than_cache_steps", dict(mode="varlen", cache_steps=2, T=4), None),
    ("seq_longer_than_K", dict(mode="varlen", sbi="2d", T=4), "narrow"),
    ("seq_longer_than_inter_steps", dict(mode="varlen", inter="noidx", T=4), "short_buffer"),
    ("unread_columns", dict(mode="mtp", sbi="2d"), unread_columns_ignored),
]


@pytest.mark.parametrize("over,corrupt", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize("impl", ["ffi", "reference"])
def test_invalid(over, corrupt, impl, device):
    if impl == "reference" and device.platform != "cpu":
        pytest.skip("reference checked on the CPU")
    cfg = dataclasses.replace(Cfg(S=60, b=4), **over)
    rng = np.random.default_rng(11)
    kw = make_case(cfg, rng)
    if corrupt == "narrow":
        kw["state_batch_indices"] = kw["state_batch_indices"][:, :2]
    elif corrupt == "short_buffer":
        kw["intermediate_states_buffer"] = kw["intermediate_states_buffer"][:, :2]
    elif corrupt is not None:
        corrupt(kw, rng)
    kw = to_device(kw, device)
    fn = jax_mamba.selective_state_update if impl == "ffi" else jax_mamba.reference.selective_state_update
    res = fn(**kw)
    want = check(cfg, kw, res)
    # unused indices are not checked (docs/semantics.md): dst under disable_state_update, unread columns
    unused = corrupt is unread_columns_ignored or cfg.disable
    assert np.isnan(want["out"]).any() != unused


def test_invalid_entry_writes_nothing_even_to_valid_dst():
    """An entry with a bad src index must not write its (valid) dst slot nor its scale."""
    cfg = Cfg(mode="stp", state="i16", sbi="1d", dst="1d", S=40)
    kw = make_case(cfg, np.random.default_rng(3))
    _set(kw, "state_batch_indices", (0,), 41)
    res = jax_mamba.selective_state_update(**kw)
    d = int(kw["dst_state_batch_indices"][0])
    np.testing.assert_array_equal(np.asarray(res.state[d]), np.asarray(kw["state"][d]))
    np.testing.assert_array_equal(np.asarray(res.state_scale[d]), np.asarray(kw["state_scale"][d]))
    assert np.isnan(np.asarray(res.out[0], np.float32)).all()
    assert not np.isnan(np.asarray(res.out[1:], np.float32)).any()

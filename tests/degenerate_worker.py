"""Degenerate and boundary configurations (docs/semantics.md: "Invalid runtime data", "Errors
at trace time"), run as a child process by test_degenerate.py so that a crash (segfault, heap
corruption) fails a test instead of killing pytest. Each case prints its description before it
runs: the last line names the culprit.

    python tests/degenerate_worker.py SEED COUNT [PLATFORM]
    python tests/degenerate_worker.py extremes OPERAND IDX [PLATFORM]

Every case compares the FFI handler and the jnp reference with the float64 oracle; slots,
scales and intermediate rows the oracle does not write must keep their bytes. `extremes` puts
the extreme values of the index dtype IDX (int32 | int64) and the values next to the pad and
to the operand's bounds into one index operand (EXTREMES), one element at a time.
"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_mamba  # noqa: E402
from cases import Cfg, check, make_case, split_static, to_device  # noqa: E402


def _slice_batch(kw, cfg, nb):
    """Keeps the first nb entries (nb = 0: an empty batch) of a generated case."""
    kw = dict(kw)
    per_entry = ["state_batch_indices", "dst_state_batch_indices", "num_accepted_tokens",
                 "intermediate_state_indices"]
    if cfg.mode == "varlen":
        cu = np.asarray(kw["cu_seqlens"])[:nb + 1]
        kw["cu_seqlens"] = jnp.asarray(cu, kw["cu_seqlens"].dtype)
    else:
        per_entry += ["x", "dt", "B", "C", "z", "out"]
    for k in per_entry:
        if kw.get(k) is not None:
            kw[k] = kw[k][:nb]
    return kw


def _zero_tokens(kw, cfg):
    """MTP: T = 0 steps; varlen: no tokens at all (every sequence empty)."""
    kw = dict(kw)
    ax = 1 if cfg.mode == "mtp" else 0
    for k in ("x", "dt", "B", "C", "z", "out"):
        if kw.get(k) is not None:
            kw[k] = jax.lax.slice_in_dim(kw[k], 0, 0, axis=ax)
    if cfg.mode == "varlen":
        kw["cu_seqlens"] = jnp.zeros_like(kw["cu_seqlens"])
    for k in ("state_batch_indices", "dst_state_batch_indices"):
        if cfg.mode == "mtp" and kw.get(k) is not None and kw[k].ndim == 2:
            kw[k] = kw[k][:, :1]  # K >= T = 0 still needs one column
    return kw


def _random_cu(kw, rng):
    """Arbitrary cu_seqlens: negative, decreasing, overlapping, beyond the token count."""
    kw = dict(kw)
    cu = np.asarray(kw["cu_seqlens"]).copy()
    TT = kw["x"].shape[0]
    for i in rng.choice(len(cu), size=int(rng.integers(1, 3)), replace=True):
        cu[i] = rng.integers(-2, TT + 3)
    kw["cu_seqlens"] = jnp.asarray(cu, kw["cu_seqlens"].dtype)
    return kw


def draw(rng):
    """(description, Cfg, transform) of one random degenerate / boundary case."""
    heads = bool(rng.random() < 0.75)
    mode = str(rng.choice(["stp", "mtp", "varlen"]))
    H = int(rng.choice([1, 2, 3])) if heads else 1
    G = int(rng.choice([g for g in (1, H) if H % g == 0])) if heads else 1
    b = int(rng.choice([1, 1, 2, 3]))
    T = int(rng.choice([1, 1, 2, 3]))
    sbi = str(rng.choice(["none", "1d", "2d"]))
    write = str(rng.choice(["final", "dst1d", "dst2d", "inter_idx", "inter_noidx"]))
    if write == "dst2d" and sbi == "none":
        sbi = "1d"
    K = T + 1
    need = b * (K if sbi == "2d" else 1) + (b * K if write.startswith("dst") else 0)
    state = str(rng.choice(["f32", "bf16", "f16", "i16"]))
    cfg = Cfg(mode=mode, heads=heads, H=H, G=G, b=b, T=T,
              P=int(rng.choice([1, 1, 2, 5])), N=int(rng.choice([1, 1, 2, 8, 17])),
              S=max(need, b) + int(rng.integers(0, 2)), state=state,
              inp=str(rng.choice(["f32", "bf16"])), w=str(rng.choice(["f32", "f16"])),
              dt_elem=bool(rng.random() < 0.3), A_elem=bool(rng.random() < 0.3),
              z=bool(rng.random() < 0.5), bias=bool(rng.random() < 0.5),
              softplus=bool(rng.random() < 0.5), sbi=sbi,
              pads=sbi != "none" and bool(rng.random() < 0.5),
              pad_slot_id=int(rng.choice([-1, 0, 1])),
              dst={"dst1d": "1d", "dst2d": "2d"}.get(write, "none"),
              inter={"inter_idx": "idx", "inter_noidx": "noidx"}.get(write, "none"),
              nacc=sbi == "2d" and bool(rng.random() < 0.5),
              disable=bool(rng.random() < 0.3), out=bool(rng.random() < 0.5),
              sr=state in ("f16", "bf16") and bool(rng.random() < 0.3),
              cache_steps=int(rng.choice([0, 0, 1, T])))
    if cfg.inter != "none" and cfg.cache_steps not in (0, T):  # 0 or the buffer's step axis
        cfg = dataclasses.replace(cfg, cache_steps=T)
    if cfg.mode == "mtp" and cfg.cache_steps and cfg.cache_steps < T:  # a trace-time error
        cfg = dataclasses.replace(cfg, cache_steps=T)
    kinds = ["plain", "empty_batch", "zero_tokens"] + (["random_cu"] * 2 if mode == "varlen" else [])
    kind = str(rng.choice(kinds))
    if kind == "zero_tokens" and mode == "stp":  # STP has no step axis: that is an empty batch
        kind = "empty_batch"
    return kind, cfg


def run_case(kind, cfg, rng, device):
    kw = make_case(cfg, rng)
    if kind == "empty_batch":
        kw = _slice_batch(kw, cfg, 0)
    elif kind == "zero_tokens":
        kw = _zero_tokens(kw, cfg)
    elif kind == "random_cu":
        kw = _random_cu(kw, rng)
    kw = to_device(kw, device)
    before = {k: np.asarray(v).copy() for k, v in kw.items() if isinstance(v, jax.Array)}
    for fn in (jax_mamba.selective_state_update, jax_mamba.reference.selective_state_update):
        res = fn(**kw)
        check(cfg, kw, res)
        if kind in ("empty_batch",) or (kind == "zero_tokens"):
            # nothing to do: every buffer bit-identical, out empty or all zeros (varlen)
            for name, got in (("state", res.state), ("state_scale", res.state_scale),
                              ("intermediate_states_buffer", res.intermediate_states_buffer),
                              ("intermediate_state_scales", res.intermediate_state_scales)):
                if got is not None:
                    np.testing.assert_array_equal(np.asarray(got), before[name], err_msg=name)
            assert not np.asarray(res.out, np.float32).any()


# ---- extreme index values (issue #18) ----

I32 = (-2**31, 2**31 - 1)
I64 = (-2**63, 2**63 - 1)
# pad_slot_id per index dtype: the default, and the dtype's extreme (INT64_MIN was the value
# the C++ handler used internally for "no write")
PADS = {"int32": [-1, I32[1]], "int64": [-1, I64[0]]}


def extreme_values(idx, pad, near):
    """The values put into an index operand: the dtype's extremes and their neighbours, the
    int32 extremes, pad - 1, pad, pad + 1, -1, 0 and `near` (values next to the operand's own
    bounds); for int64 also values whose low 32 bits are a valid slot, the int32 extremes or
    the pad (a 32-bit truncation would turn them into one)."""
    lo, hi = I64 if idx == "int64" else I32
    vals = [lo, lo + 1, hi - 1, hi, I32[0], I32[1], -1, 0, pad - 1, pad, pad + 1] + list(near)
    if idx == "int64":
        vals += [2**31, -2**31 - 1, 2**32 + 1, -2**32 + 1, pad + 2**32, pad - 2**32]
    return sorted({v for v in vals if lo <= v <= hi})


_SMALL = dict(H=2, G=1, P=4, N=8, b=3, T=2)
# operand -> [(Cfg, positions poked, which bounds are `near`)]. make_case pads entry 0 when
# pads=True: its dst is then never used (not checked), entry 1's is.
EXTREMES = {
    "state_batch_indices": [
        (Cfg(mode="stp", sbi="1d", dst="1d", S=12, **_SMALL), [(1,)], "S"),
        (Cfg(mode="varlen", sbi="1d", inter="noidx", S=12, **_SMALL), [(0,), (2,)], "S"),
        (Cfg(mode="mtp", sbi="2d", dst="2d", state="i16", S=24, **_SMALL),
         [(1, 0), (1, 2)], "S"),  # the read column, and one never read
    ],
    "dst_state_batch_indices": [
        (Cfg(mode="stp", sbi="1d", dst="1d", pads=True, state="bf16", S=12, **_SMALL),
         [(0,), (1,)], "S"),
        (Cfg(mode="mtp", sbi="1d", dst="1d", disable=True, S=12, **_SMALL), [(1,)], "S"),
        (Cfg(mode="mtp", sbi="2d", dst="2d", state="i16", S=24, **_SMALL),
         [(1, 0), (1, 1), (1, 2)], "S"),  # both steps' columns, and one past T
        (Cfg(mode="varlen", sbi="1d", dst="2d", S=16, **_SMALL), [(0, 1), (1, 2)], "S"),
    ],
    "intermediate_state_indices": [
        (Cfg(mode="mtp", sbi="1d", inter="idx", pads=True, S=12, **_SMALL), [(0,), (1,)], "I"),
        (Cfg(mode="varlen", sbi="1d", inter="idx", state="i16", S=12, **_SMALL), [(1,)], "I"),
    ],
    "num_accepted_tokens": [
        (Cfg(mode="mtp", sbi="2d", nacc=True, dst="2d", S=24, **_SMALL), [(1,)], "K"),
        (Cfg(mode="varlen", sbi="2d", nacc=True, inter="noidx", S=24, **_SMALL), [(0,)], "K"),
    ],
    "cu_seqlens": [
        (Cfg(mode="varlen", sbi="1d", dst="1d", S=12, **_SMALL), [(0,), (1,), (3,)], "TT"),
        (Cfg(mode="varlen", sbi="none", inter="noidx", S=12, **_SMALL), [(2,)], "TT"),
    ],
}


def _bounds(kw, which):
    """Values next to the operand's own bounds."""
    if which == "S":
        n = kw["state"].shape[0]
    elif which == "I":
        n = kw["intermediate_states_buffer"].shape[0]
    elif which == "K":
        n = kw["state_batch_indices"].shape[1]
    else:
        n = kw["x"].shape[0]
    return [n - 1, n, n + 1]


def _free_bounds(kw, pad):
    """Moves every use of slot 0 and S - 1 (and of intermediate rows 0 and I - 1) to an unused
    slot (row), so that a probe value at those bounds names a slot (row) no other entry reads or
    writes: two entries on one slot would make the result depend on their order."""
    kw = dict(kw)
    groups = [(("state_batch_indices", "dst_state_batch_indices"), kw["state"].shape[0])]
    if kw.get("intermediate_state_indices") is not None:
        groups.append((("intermediate_state_indices",),
                       kw["intermediate_states_buffer"].shape[0]))
    for names, n in groups:
        arrs = {k: np.asarray(kw[k]).copy() for k in names if kw.get(k) is not None}
        used = {int(v) for a in arrs.values() for v in a.ravel()}
        free = [v for v in range(1, n - 1) if v not in used and v != pad]
        for k, a in arrs.items():
            for i in zip(*np.nonzero((a == 0) | (a == n - 1))):
                if a[i] != pad:
                    a[i] = free.pop()
            kw[k] = jnp.asarray(a, kw[k].dtype)
    return kw


def run_extremes(operand, idx, device):
    if idx == "int64":
        jax.config.update("jax_enable_x64", True)
    fns = (jax_mamba.selective_state_update, jax_mamba.reference.selective_state_update)
    n = 0
    for c, (cfg0, positions, near) in enumerate(EXTREMES[operand]):
        for pad in PADS[idx]:
            cfg = dataclasses.replace(cfg0, idx=idx, pad_slot_id=pad)
            kw = _free_bounds(make_case(cfg, np.random.default_rng(100 + c)), pad)
            kw = to_device(kw, device)
            arrays, static = split_static(kw)
            jitted = [jax.jit(lambda a, f=f, st=static: f(**a, **st)) for f in fns]
            base = np.asarray(arrays[operand])
            assert base.dtype == np.dtype(idx), (operand, base.dtype, idx)
            for pos in positions:
                for v in extreme_values(idx, pad, _bounds(kw, near)):
                    a = base.copy()
                    a[pos] = v
                    print(f"{operand}[{pos}] = {v} (pad_slot_id={pad}, {idx}): {cfg}",
                          flush=True)
                    changed = dict(arrays, **{operand: jax.device_put(a, device)})
                    for fn in jitted:
                        check(cfg, dict(kw, **changed), fn(changed))
                    n += 1
    print(f"{n} values", flush=True)


def main():
    if sys.argv[1] == "extremes":
        operand, idx = sys.argv[2], sys.argv[3]
        platform = sys.argv[4] if len(sys.argv) > 4 else "cpu"
        device = jax.devices(platform)[0]
        with jax.default_device(device):
            run_extremes(operand, idx, device)
        print("ok", flush=True)
        return
    seed, count = int(sys.argv[1]), int(sys.argv[2])
    platform = sys.argv[3] if len(sys.argv) > 3 else "cpu"
    device = jax.devices(platform)[0]
    rng = np.random.default_rng(seed)
    for i in range(count):
        kind, cfg = draw(rng)
        print(f"case {i}: {kind} {cfg}", flush=True)
        with jax.default_device(device):
            run_case(kind, cfg, np.random.default_rng(rng.integers(2**31)), device)
    print("ok", flush=True)


if __name__ == "__main__":
    main()

"""Benchmark configurations: one `Config` per measured row, and the named cases (the rows of
docs/performance.md)."""
from __future__ import annotations

import dataclasses
import math

SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int16": "int16"}
LONG = {v: k for k, v in SHORT.items()}


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark shape. Mamba-2 defaults: H64 P64 N128 G8, bf16 state and inputs, per-head
    A/dt/dt_bias/D, dt_softplus. `cache_mb=None` takes the CLI's (platform-dependent) value."""
    batch: int
    heads: int = 64
    dim: int = 64
    dstate: int = 128
    ngroups: int = 8
    state_dtype: str = "bfloat16"
    input_dtype: str = "bfloat16"
    mtp: int = 0
    inter: bool = False
    sr: bool = False
    z: bool = False
    mamba1: bool = False
    cache_mb: float | None = None
    name: str = ""

    @property
    def label(self):
        if self.name:
            return self.name
        shape = (f"P{self.dim}-N{self.dstate}-mamba1" if self.mamba1 else
                 f"H{self.heads}-P{self.dim}-N{self.dstate}-G{self.ngroups}")
        in_dt = "" if self.input_dtype == self.state_dtype else f"-in{SHORT[self.input_dtype]}"
        return "-".join(filter(None, [
            f"mtp{self.mtp}" if self.mtp else "", f"b{self.batch}", shape,
            SHORT[self.state_dtype] + in_dt, "inter" if self.inter else "",
            "sr" if self.sr else "", "z" if self.z else ""]))

    @property
    def family(self):
        """The label without its batch: rows of one family form one curve of the plot."""
        return "-".join(p for p in self.label.split("-") if p != f"b{self.batch}")


def validate(c: Config) -> str | None:
    """Why this combination makes no sense (None if it does). Checked before any array is
    built: e.g. an intermediate buffer without MTP steps used to crash the CPU handler."""
    for f in ("batch", "heads", "dim", "dstate", "ngroups"):
        if getattr(c, f) < 1:
            return f"--{f} must be >= 1, got {getattr(c, f)}"
    if c.mtp < 0:
        return f"--mtp must be >= 0 (0 = single token), got {c.mtp}"
    if c.inter and not c.mtp:
        return "--inter (intermediate-state buffer) needs --mtp T with T >= 1"
    if c.sr and c.state_dtype not in ("float16", "bfloat16"):
        return f"--sr (stochastic rounding) needs a float16/bfloat16 state, got {c.state_dtype}"
    if c.state_dtype not in SHORT or c.input_dtype not in ("float32", "bfloat16", "float16"):
        return f"unsupported dtypes state={c.state_dtype} inputs={c.input_dtype}"
    if not c.mamba1 and c.heads % c.ngroups:
        return f"--ngroups ({c.ngroups}) must divide --heads ({c.heads})"
    if c.cache_mb is not None and c.cache_mb <= 0:
        return f"--cache-mb must be > 0, got {c.cache_mb}"
    return None


def bytes_per_call(c: Config) -> int:
    """FlashInfer's count (docs/performance.md): state read + write of the touched slots (+ intermediate
    writes), x, dt, B, C, z, out, per-head params (Mamba-2 only, as FlashInfer) and int16 scales."""
    hp = c.dim if c.mamba1 else c.heads * c.dim
    lead = c.batch * max(c.mtp, 1)
    st, inp = (2 if c.state_dtype != "float32" else 4), (2 if c.input_dtype != "float32" else 4)
    passes = 2 + (c.mtp if c.inter else 0)
    n = c.batch * hp * c.dstate * st * passes
    n += lead * hp * inp * (2 + c.z)                                        # x, out, z
    n += lead * (c.dim if c.mamba1 else c.heads) * 4                        # dt (float32)
    n += 2 * lead * c.dstate * (1 if c.mamba1 else c.ngroups) * inp         # B, C
    n += 0 if c.mamba1 else 3 * c.heads * 4                                 # A, D, dt_bias
    n += c.batch * hp * 4 * passes if c.state_dtype == "int16" else 0       # int16 scales
    return n


def _case(name, batch, dt="bf16", inputs=None, **kw):
    state = LONG[dt]
    return Config(batch=batch, state_dtype=state, name=name,
                  input_dtype=LONG[inputs] if inputs else (state if dt in ("fp16", "fp32") else
                                                           "bfloat16"), **kw)


# name -> Config. fp16/fp32 states take inputs of their own dtype; int16 takes bf16 inputs.
CASES = {c.name: c for c in [
    *(_case(f"b{b}-bf16", b) for b in (1, 8, 64, 256)),
    *(_case(f"b{b}-fp16", b, "fp16") for b in (64, 256)),
    *(_case(f"b{b}-fp32", b, "fp32") for b in (64, 256)),
    _case("b64-bf16-p80", 64, dim=80),
    _case("b64-bf16-p128", 64, dim=128),
    _case("b64-bf16-h80g1", 64, heads=80, ngroups=1),
    _case("b64-fp32-h80g1", 64, "fp32", heads=80, ngroups=1),
    _case("b128-bf16-h128", 128, heads=128),
    # small-batch speculative decoding (latency-bound, like b1 / b8 single-token)
    *(_case(f"mtp4-b{b}-bf16-inter", b, mtp=4, inter=True) for b in (1, 8)),
    _case("mtp4-b64-bf16-inter", 64, mtp=4, inter=True),
    _case("mtp6-b64-fp32-inter", 64, "fp32", mtp=6, inter=True),
    _case("mtp6-b64-bf16-inter", 64, mtp=6, inter=True),
    _case("b64-int16", 64, "int16"),
    _case("b64-fp16-sr", 64, "fp16", sr=True),
    _case("b64-bf16-sr", 64, sr=True),
    _case("mamba1-b64-fp32", 64, "fp32", mamba1=True, heads=1, ngroups=1, dim=8192, dstate=16),
    *(_case(f"b64-bf16-n{n}", 64, dstate=n) for n in (16, 64, 256)),
    # the large-cache row (docs/performance.md): 32 GiB of random slots (only when asked for by name)
    _case("b256-bf16-cache32g", 256, cache_mb=32768),
]}
BY_NAME_ONLY = {"b256-bf16-cache32g"}


def resolve(names) -> list[Config]:
    """Expand 'all' (every case but the by-name-only ones), keep order, drop repeats."""
    out = []
    for n in names:
        for k in ([k for k in CASES if k not in BY_NAME_ONLY] if n == "all" else [n]):
            if CASES[k] not in out:
                out.append(CASES[k])
    return out


def cache_slots(c: Config, cache_mb: float, calls: int) -> int:
    """Slots in the state cache: cache_mb worth, but at least one disjoint set per call."""
    slot = (c.dim if c.mamba1 else c.heads * c.dim) * c.dstate * (4 if c.state_dtype == "float32"
                                                                    else 2)
    return max(calls * c.batch, math.ceil(cache_mb * 2**20 / slot))

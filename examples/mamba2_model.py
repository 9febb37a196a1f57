"""A Mamba-2 language model in Flax NNX, decoding through jax_mamba.

Per layer (pre-norm residual block): RMSNorm -> in-projection to [z, xBC, dt] -> causal
depthwise conv1d over xBC (+ SiLU) -> split xBC into x, B, C -> SSM -> gated RMSNorm
(y * silu(z), normalised per group) -> out-projection. Embedding, L stacked layers, final
RMSNorm and an LM head tied to the embedding. A = -exp(A_log) per head, dt_bias per head,
D per head, ngroups groups of B/C shared by heads.

Two ways to run the same parameters:

- ``decode_step`` / ``verify_step``: one token (or T speculative tokens) per sequence against a
  :class:`jax_mamba.LayerCache` of slots, the conv through ``causal_conv1d_update`` and the
  SSM through ``selective_state_update`` (kernel or ``jax_mamba.reference``), all layers under
  one ``lax.scan`` over the flat cache view (in place when the cache is donated);
- ``forward``: the full sequence at once, the conv as a full causal conv and the SSM as
  Mamba-2's chunked SSD algorithm in plain jnp (intra-chunk quadratic form + inter-chunk
  state passing). It returns each layer's final states, so it doubles as the prefill.

Decoding token by token must reproduce ``forward`` on the same tokens: the end-to-end check
of the kernel, the conv update and the layer cache (``examples/mamba2_decode.py``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

try:
    from flax import nnx
except ImportError:  # the examples' one dependency beyond jax_mamba
    raise SystemExit("the Mamba-2 examples need flax: pip install \".[examples]\" "
                     "(or pip install flax)") from None

import jax_mamba
from jax_mamba.cache import LayerCache, allocate_layer_cache, scan_layers
from jax_mamba.conv import causal_conv1d


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
    vocab_size: int = 512
    d_model: int = 256
    n_layer: int = 4
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    headdim: int = 32
    ngroups: int = 1
    chunk_size: int = 16
    norm_eps: float = 1e-5

    @property
    def d_inner(self):
        return self.expand * self.d_model

    @property
    def nheads(self):
        return self.d_inner // self.headdim

    @property
    def conv_dim(self):
        return self.d_inner + 2 * self.ngroups * self.d_state

    def __post_init__(self):
        if self.d_inner % self.headdim or self.nheads % self.ngroups:
            raise ValueError(f"expand*d_model={self.d_inner} must be a multiple of headdim "
                             f"{self.headdim}, and nheads a multiple of ngroups {self.ngroups}")


def _rms(x, weight, eps, group=None):
    x32 = x.astype(jnp.float32)
    if group is not None:
        x32 = x32.reshape(x32.shape[:-1] + (-1, group))
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y.reshape(x.shape) * weight).astype(x.dtype)


def _softplus(v):
    """softplus as the SSU defines it (docs/semantics.md): log1p(exp(v)) for v <= 20, else v."""
    return jnp.where(v <= 20.0, jnp.log1p(jnp.exp(jnp.minimum(v, 20.0))), v)


class Mamba2Mixer(nnx.Module):
    def __init__(self, cfg: Mamba2Config, rngs: nnx.Rngs):
        self.cfg = cfg
        H, N, G, W = cfg.nheads, cfg.d_state, cfg.ngroups, cfg.d_conv
        d_in_proj = 2 * cfg.d_inner + 2 * G * N + H            # [z, xBC, dt]
        normal = jax.nn.initializers.normal
        self.in_proj = nnx.Param(normal(cfg.d_model ** -0.5)(rngs.params(),
                                                             (cfg.d_model, d_in_proj)))
        bound = 1.0 / math.sqrt(W)                              # depthwise conv, fan_in = W
        self.conv_weight = nnx.Param(jax.random.uniform(rngs.params(), (cfg.conv_dim, W),
                                                        minval=-bound, maxval=bound))
        self.conv_bias = nnx.Param(jax.random.uniform(rngs.params(), (cfg.conv_dim,),
                                                      minval=-bound, maxval=bound))
        # dt log-uniform in [1e-3, 1e-1], stored as its inverse softplus; A in [1, 16]
        dt = jnp.exp(jax.random.uniform(rngs.params(), (H,), minval=math.log(1e-3),
                                        maxval=math.log(1e-1)))
        self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)))
        self.A_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (H,), minval=1.0,
                                                          maxval=16.0)))
        self.D = nnx.Param(jnp.ones((H,)))
        self.norm_weight = nnx.Param(jnp.ones((cfg.d_inner,)))
        self.out_proj = nnx.Param(normal((cfg.d_inner * cfg.n_layer) ** -0.5)(
            rngs.params(), (cfg.d_inner, cfg.d_model)))

    # -- pieces shared by both paths -------------------------------------------------------
    def _project(self, u):
        cfg = self.cfg
        zxbcdt = u @ self.in_proj[...]
        z, xBC, dt = jnp.split(zxbcdt, [cfg.d_inner, cfg.d_inner + cfg.conv_dim], axis=-1)
        return z, xBC, dt

    def _split_xbc(self, xBC):
        cfg = self.cfg
        lead = xBC.shape[:-1]
        x, B, C = jnp.split(xBC, [cfg.d_inner, cfg.d_inner + cfg.ngroups * cfg.d_state], -1)
        return (x.reshape(lead + (cfg.nheads, cfg.headdim)),
                B.reshape(lead + (cfg.ngroups, cfg.d_state)),
                C.reshape(lead + (cfg.ngroups, cfg.d_state)))

    def _finish(self, y, z):
        """Gated RMSNorm (Mamba-2: gate first, then RMSNorm per group) and out-projection."""
        cfg = self.cfg
        y = y.reshape(z.shape)
        y = y * (z * jax.nn.sigmoid(z))
        y = _rms(y, self.norm_weight[...], cfg.norm_eps, group=cfg.d_inner // cfg.ngroups)
        return y @ self.out_proj[...]

    @property
    def A(self):
        return -jnp.exp(self.A_log[...].astype(jnp.float32))

    # -- decode: one token or T tokens against the slot cache ------------------------------
    def step(self, u, view, conv_slots, ssu: Optional[Callable] = None, *, verify=False,
             **ssu_kwargs):
        """u (b, d_model) or (b, T, d_model). Returns (out, view, xBC before the conv).

        ``verify=True`` (speculative verification): the conv reads its state without writing
        it, and the SSU gets ``ssu_kwargs`` (e.g. ``write_intermediate=True,
        disable_state_update=True``, or a 2-D slot table with ``num_accepted_tokens``)."""
        z, xBC_in, dt = self._project(u)
        xBC, view = view.causal_conv1d_update(xBC_in, self.conv_weight[...],
                                              self.conv_bias[...], "silu",
                                              conv_state_indices=conv_slots,
                                              disable_state_update=verify)
        x, B, C = self._split_xbc(xBC)
        ssu_kwargs.setdefault("state_batch_indices", conv_slots)
        y, view = view.selective_state_update(x, dt, self.A, B, C, self.D[...],
                                              dt_bias=self.dt_bias[...], dt_softplus=True,
                                              ssu=ssu, **ssu_kwargs)
        return self._finish(y, z), view, xBC_in

    # -- full sequence: causal conv + chunked SSD ------------------------------------------
    def forward(self, u):
        """u (b, L, d_model) -> (out, final SSM state (b, H, P, N), final conv state
        (b, conv_dim, d_conv - 1)), from zero states."""
        cfg = self.cfg
        z, xBC_in, dt = self._project(u)
        xBC, conv_state = causal_conv1d(xBC_in, self.conv_weight[...], self.conv_bias[...],
                                        "silu")
        x, B, C = self._split_xbc(xBC)
        dt = _softplus(dt.astype(jnp.float32) + self.dt_bias[...])
        y, ssm_state = ssd_chunked(x, dt, self.A, B, C, cfg.chunk_size)
        y = y + x * self.D[...][:, None]
        return self._finish(y.astype(u.dtype), z), ssm_state, conv_state


def _segsum(a):
    """a (..., Q) -> (..., Q, Q) with [l, s] = sum_{s < k <= l} a_k (-inf above the diagonal),
    summed directly (not as a difference of cumulative sums, which loses precision)."""
    Q = a.shape[-1]
    rep = jnp.broadcast_to(a[..., :, None], a.shape + (Q,))        # [k, s] = a_k
    strict = jnp.tril(jnp.ones((Q, Q), bool), -1)                   # k > s
    cs = jnp.cumsum(jnp.where(strict, rep, 0.0), axis=-2)           # [l, s] = sum_{s<k<=l}
    return jnp.where(jnp.tril(jnp.ones((Q, Q), bool)), cs, -jnp.inf)


def ssd_chunked(x, dt, A, B, C, chunk_size, initial_state=None):
    """Mamba-2's chunked SSD in plain jnp: the discrete recurrence
    ``s_t = exp(A dt_t) s_{t-1} + dt_t B_t x_t^T``, ``y_t = C_t . s_t`` over a whole sequence.

    x (b, L, H, P), dt (b, L, H) (already dt_bias + softplus), A (H,), B/C (b, L, G, N).
    Within each chunk of Q steps the output is the masked quadratic form
    ``y_l = sum_{s<=l} (C_l . B_s) exp(sum_{s<k<=l} a_k) dt_s x_s`` (a = A dt); each chunk's
    end state is reduced from its inputs; a scan over chunks passes the state on and adds its
    contribution ``C_l . exp(sum_{k<=l} a_k) S_prev`` to every output. Returns
    (y (b, L, H, P) float32, final state (b, H, P, N) float32).
    """
    b, L, H, P = x.shape
    G, N = B.shape[-2:]
    Q = int(chunk_size)
    nc = -(-L // Q)
    pad = nc * Q - L            # padded steps have dt = 0: no decay, no input, state unchanged
    f32 = lambda v: v.astype(jnp.float32)
    rep = H // G
    x, dt = f32(x), f32(dt)
    Bh, Ch = jnp.repeat(f32(B), rep, axis=2), jnp.repeat(f32(C), rep, axis=2)  # (b, L, H, N)
    if pad:
        pw = lambda v: jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
        x, dt, Bh, Ch = pw(x), pw(dt), pw(Bh), pw(Ch)
    ch = lambda v: v.reshape((b, nc, Q) + v.shape[2:])
    x, dt, Bh, Ch = ch(x), ch(dt), ch(Bh), ch(Ch)
    a = jnp.moveaxis(dt * f32(A), 2, -1)                    # (b, nc, H, Q)
    acum = jnp.cumsum(a, axis=-1)
    xdt = x * dt[..., None]                                  # (b, nc, Q, H, P)
    hi = jax.lax.Precision.HIGHEST
    # 1. intra-chunk outputs (diagonal blocks)
    decay = jnp.exp(_segsum(a))                              # (b, nc, H, Ql, Qs)
    cb = jnp.einsum("bclhn,bcshn->bchls", Ch, Bh, precision=hi)
    y_diag = jnp.einsum("bchls,bcshp->bclhp", cb * decay, xdt, precision=hi)
    # 2. each chunk's own end state (from zero)
    to_end = jnp.exp(acum[..., -1:] - acum)                  # (b, nc, H, Q)
    chunk_states = jnp.einsum("bcshn,bchs,bcshp->bchpn", Bh, to_end, xdt, precision=hi)
    # 3. state passing between chunks
    s0 = (jnp.zeros((b, H, P, N), jnp.float32) if initial_state is None
          else f32(initial_state))
    chunk_decay = jnp.exp(acum[..., -1])                     # (b, nc, H)

    def pass_state(s, inp):
        st, dec = inp
        return s * dec[..., None, None] + st, s              # emit the state entering a chunk

    final, entering = jax.lax.scan(pass_state, s0, (jnp.moveaxis(chunk_states, 1, 0),
                                                    jnp.moveaxis(chunk_decay, 1, 0)))
    entering = jnp.moveaxis(entering, 0, 1)                  # (b, nc, H, P, N)
    # 4. the entering state's contribution to each output
    y_off = jnp.einsum("bclhn,bchpn,bchl->bclhp", Ch, entering, jnp.exp(acum), precision=hi)
    y = (y_diag + y_off).reshape(b, nc * Q, H, P)[:, :L]
    return y, final


class Mamba2Block(nnx.Module):
    def __init__(self, cfg: Mamba2Config, rngs: nnx.Rngs):
        self.norm_weight = nnx.Param(jnp.ones((cfg.d_model,)))
        self.mixer = Mamba2Mixer(cfg, rngs)
        self.eps = cfg.norm_eps

    def step(self, h, view, conv_slots, ssu=None, **kw):
        y, view, xbc = self.mixer.step(_rms(h, self.norm_weight[...], self.eps), view,
                                       conv_slots, ssu, **kw)
        return h + y, view, xbc

    def forward(self, h):
        y, s, c = self.mixer.forward(_rms(h, self.norm_weight[...], self.eps))
        return h + y, s, c


class Mamba2LM(nnx.Module):
    """Embedding, ``n_layer`` Mamba-2 blocks with stacked parameters (leading layer axis, run
    under one ``lax.scan``), final RMSNorm, LM head tied to the embedding."""

    def __init__(self, cfg: Mamba2Config, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab_size,
                                                                     cfg.d_model)) * 0.02)
        blocks = [Mamba2Block(cfg, rngs) for _ in range(cfg.n_layer)]
        graphdef, _ = nnx.split(blocks[0])
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.state(b) for b in blocks])
        self.layers = nnx.merge(graphdef, stacked)        # one Block, params (L, ...)
        self.norm_f = nnx.Param(jnp.ones((cfg.d_model,)))

    def allocate_cache(self, num_slots, dtype=jnp.float32, intermediate_rows=0,
                       cache_steps=0) -> LayerCache:
        cfg = self.cfg
        return allocate_layer_cache(cfg.n_layer, num_slots, cfg.nheads, cfg.headdim,
                                    cfg.d_state, dtype, conv_dim=cfg.conv_dim,
                                    d_conv=cfg.d_conv, conv_dtype=jnp.float32,
                                    intermediate_rows=intermediate_rows,
                                    cache_steps=cache_steps)

    def _logits(self, h):
        return _rms(h, self.norm_f[...], self.cfg.norm_eps) @ self.embedding[...].T

    def _scan(self, h, cache, fn):
        graphdef, params = nnx.split(self.layers)

        def layer(h, p, view):
            return fn(nnx.merge(graphdef, p), h, view)

        return scan_layers(layer, cache, h, params)

    def decode_step(self, tokens, cache: LayerCache, slots, ssu=None):
        """tokens (b,) int -> (logits (b, vocab) float32, cache); sequence b lives in slot
        ``slots[b]`` of every layer."""
        h = self.embedding[...][tokens]
        h, cache, _ = self._scan(h, cache, lambda blk, h, view: blk.step(h, view, slots, ssu))
        return self._logits(h), cache

    def verify_step(self, tokens, cache: LayerCache, slots, ssu=None, **ssu_kwargs):
        """tokens (b, T) speculative tokens -> (logits (b, T, vocab), cache, conv inputs
        (L, b, T, conv_dim)). The conv state is read, not written (commit it with
        ``jax_mamba.speculative.commit_layer_cache``); ``ssu_kwargs`` pick the SSM recipe
        (``write_intermediate=True, disable_state_update=True`` for the SGLang style; a 2-D
        ``state_batch_indices`` / ``dst_state_batch_indices`` table and
        ``num_accepted_tokens`` for the vLLM style)."""
        h = self.embedding[...][tokens]
        h, cache, xbc = self._scan(h, cache, lambda blk, h, view: blk.step(
            h, view, slots, ssu, verify=True, **ssu_kwargs))
        return self._logits(h), cache, xbc

    def forward(self, tokens):
        """tokens (b, L) -> (logits (b, L, vocab), SSM states (n_layer, b, H, P, N), conv
        states (n_layer, b, conv_dim, d_conv - 1)): the full-sequence model from zero states."""
        graphdef, params = nnx.split(self.layers)

        def layer(h, p):
            h, s, c = nnx.merge(graphdef, p).forward(h)
            return h, (s, c)

        h, (ssm, conv) = jax.lax.scan(layer, self.embedding[...][tokens], params)
        return self._logits(h), ssm, conv


def init_model(cfg: Mamba2Config, seed=0):
    """(graphdef, params) of a randomly initialised Mamba2LM, the initialisation compiled as
    one program (eager init would compile every small random op on its own)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Mamba2LM(cfg, nnx.Rngs(0))))
    params = jax.jit(lambda: nnx.split(Mamba2LM(cfg, nnx.Rngs(seed)))[1])()
    return graphdef, params


def write_prefill(cache: LayerCache, slots, ssm_states, conv_states) -> LayerCache:
    """Store per-layer states from ``forward`` (n_layer, b, ...) into slots ``slots`` of the
    cache (a scatter: in place when the cache is donated). Float caches only."""
    if cache.ssm.dtype == jnp.int16:
        raise ValueError("write_prefill: int16 caches need block scales; use a float cache")
    return dataclasses.replace(
        cache, ssm=cache.ssm.at[:, slots].set(ssm_states.astype(cache.ssm.dtype)),
        conv=cache.conv.at[:, slots].set(conv_states.astype(cache.conv.dtype)))


def backend(name):
    """'kernel' -> jax_mamba.selective_state_update, 'reference' -> the pure-jnp twin."""
    return {"kernel": jax_mamba.selective_state_update,
            "reference": jax_mamba.reference.selective_state_update}[name]


def add_model_arguments(ap, *, layers, d_model, d_state, vocab, headdim=32, ngroups=1,
                        batch=4, seed=0):
    """The command-line options both examples share (model size, backend, batch, seed). Make
    the parser with formatter_class=argparse.ArgumentDefaultsHelpFormatter so that --help shows
    the defaults."""
    ap.add_argument("--backend", choices=["kernel", "reference"], default="kernel",
                    help="SSM step of the decoding loop: jax_mamba.selective_state_update "
                         "(kernel) or jax_mamba.reference (the checks run both where noted)")
    ap.add_argument("--layers", type=int, default=layers, help="Mamba-2 layers")
    ap.add_argument("--d-model", type=int, default=d_model, help="model (residual) width")
    ap.add_argument("--d-state", type=int, default=d_state, help="N, SSM state size per row")
    ap.add_argument("--headdim", type=int, default=headdim,
                    help="P, head dimension (heads H = expand * d_model / headdim, expand 2 "
                         "unless set)")
    ap.add_argument("--ngroups", type=int, default=ngroups,
                    help="G, groups of B and C (must divide the number of heads)")
    ap.add_argument("--vocab", type=int, default=vocab, help="vocabulary size")
    ap.add_argument("--batch", type=int, default=batch, help="sequences decoded together")
    ap.add_argument("--seed", type=int, default=seed, help="seed of the weights and prompts")

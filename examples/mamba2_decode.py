"""Generate with a Mamba-2 model (Flax NNX, random weights) through jax_mamba, and check it.

    python examples/mamba2_decode.py                      # CPU by default, or the GPU if present
    python examples/mamba2_decode.py --backend reference  # the SSM step in pure jnp
    python examples/mamba2_decode.py --layers 24 --d-model 768 --batch 32 --state-dtype bfloat16

1. Prefill: the prompt through the full-sequence model (causal conv + chunked SSD), its final
   states written into the sequences' cache slots.
2. Generate: a jitted loop (lax.scan over tokens; in each step lax.scan over the layers of a
   layer-stacked cache viewed as (L*S, ...)) with the cache donated, so it is updated in place;
   greedy, or sampled with --temperature. Prints tokens/s.
3. Check: the prompt + generated tokens fed one at a time through the decode step (kernel and
   reference backends) must give the logits of the full-sequence forward on the same tokens
   and the same final states. Prints the max differences; exits 1 if one is too large.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_mamba  # noqa: E402
from mamba2_model import (Mamba2Config, add_model_arguments, backend, init_model,  # noqa: E402
                          nnx, write_prefill)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(ap, layers=4, d_model=256, d_state=64, vocab=512)
    ap.add_argument("--expand", type=int, default=2, help="inner width = expand * d_model")
    ap.add_argument("--chunk-size", type=int, default=16,
                    help="chunk length of the full-sequence forward (chunked SSD)")
    ap.add_argument("--slots", type=int, default=16, help="cache slots (>= batch)")
    ap.add_argument("--prompt-len", type=int, default=24, help="prompt tokens per sequence")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence")
    ap.add_argument("--state-dtype", choices=["float32", "bfloat16", "float16"],
                    default="float32", help="dtype of the SSM state cache")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sampling temperature (0: greedy)")
    a = ap.parse_args(argv)
    if a.slots < a.batch:
        ap.error("--slots must be >= --batch")
    if min(a.layers, a.batch, a.prompt_len, a.new_tokens) < 1:
        ap.error("--layers, --batch, --prompt-len and --new-tokens must be >= 1")
    return a


def make_fns(graphdef, args):
    """Jitted prefill, generation loop (cache donated), teacher-forced decode and forward."""
    dtype = jnp.dtype(args.state_dtype)

    def prefill(params, prompt, slots):
        """A fresh cache holding the prompt's states in `slots`, and the last logits."""
        model = nnx.merge(graphdef, params)
        logits, ssm, conv = model.forward(prompt)
        cache = model.allocate_cache(args.slots, dtype)
        return write_prefill(cache, slots, ssm, conv), logits[:, -1]

    def generate(params, cache, first_logits, slots, key, ssu_name):
        model = nnx.merge(graphdef, params)
        ssu = backend(ssu_name)

        def pick(logits, k):
            if args.temperature > 0:
                return jax.random.categorical(k, logits / args.temperature).astype(jnp.int32)
            return jnp.argmax(logits, -1).astype(jnp.int32)

        def body(carry, k):
            cache, tok = carry
            logits, cache = model.decode_step(tok, cache, slots, ssu)
            return (cache, pick(logits, k)), tok

        k0, *ks = jax.random.split(key, args.new_tokens + 1)
        (cache, _), toks = jax.lax.scan(body, (cache, pick(first_logits, k0)),
                                        jnp.stack(ks)[: args.new_tokens])
        return cache, jnp.moveaxis(toks, 0, 1)             # (b, new_tokens)

    def teacher_forced(params, tokens, slots, ssu_name):
        """tokens (b, L) fed one at a time from a fresh cache: (cache, logits (b, L, V))."""
        model = nnx.merge(graphdef, params)
        ssu = backend(ssu_name)
        cache = model.allocate_cache(args.slots, dtype)

        def body(cache, tok):
            logits, cache = model.decode_step(tok, cache, slots, ssu)
            return cache, logits

        cache, logits = jax.lax.scan(body, cache, jnp.moveaxis(tokens, 1, 0))
        return cache, jnp.moveaxis(logits, 0, 1)

    def forward(params, tokens):
        return nnx.merge(graphdef, params).forward(tokens)

    return (jax.jit(prefill), jax.jit(generate, donate_argnums=1, static_argnums=5),
            jax.jit(teacher_forced, static_argnums=3), jax.jit(forward))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main(argv=None):
    args = parse_args(argv)
    # fp32 matmuls everywhere (the GPU default TF32 would dominate the differences compared)
    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = Mamba2Config(vocab_size=args.vocab, d_model=args.d_model, n_layer=args.layers,
                       d_state=args.d_state, expand=args.expand, headdim=args.headdim,
                       ngroups=args.ngroups, chunk_size=args.chunk_size)
    print(f"device: {jax.devices()[0]}  (jax {jax.__version__}, CUDA handlers built: "
          f"{jax_mamba.HAS_CUDA})")
    t_start = time.perf_counter()
    graphdef, params = init_model(cfg, args.seed)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    print(f"Mamba-2: {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.nheads} heads x "
          f"headdim {cfg.headdim}, d_state {cfg.d_state}, ngroups {cfg.ngroups}, "
          f"{n_params / 1e6:.2f}M params; cache {args.slots} slots, {args.state_dtype}")
    prefill, generate, teacher_forced, forward = make_fns(graphdef, args)
    dtype = jnp.dtype(args.state_dtype)
    rng = np.random.default_rng(args.seed)
    B = args.batch
    slots = jnp.asarray(rng.permutation(args.slots)[:B], jnp.int32)
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, args.prompt_len)), jnp.int32)
    key = jax.random.key(args.seed)

    # -- generation ------------------------------------------------------------------------
    def run(name):
        cache, first = prefill(params, prompt, slots)
        ptrs = [a.unsafe_buffer_pointer() for a in jax.tree_util.tree_leaves(cache)]
        t0 = time.perf_counter()
        cache, toks = generate(params, cache, first, slots, key, name)
        toks = np.asarray(toks)
        in_place = [a.unsafe_buffer_pointer() for a in jax.tree_util.tree_leaves(cache)] == ptrs
        return toks, time.perf_counter() - t0, in_place

    run(args.backend)                                    # compile
    toks, dt, in_place = run(args.backend)
    tps = B * args.new_tokens / dt
    print(f"generated {args.new_tokens} tokens x batch {B} with the {args.backend} backend: "
          f"{tps:.1f} tokens/s ({dt * 1e3 / args.new_tokens:.2f} ms per step; cache updated "
          f"in place: {in_place})")
    print(f"  sequence 0: {prompt[0, -4:].tolist()} | {toks[0, :12].tolist()} ...")

    # -- check: token-by-token decode vs the full-sequence forward, kernel vs reference ----
    seq = jnp.concatenate([prompt, jnp.asarray(toks)], axis=1)        # (b, T)
    logits_full, ssm_full, conv_full = forward(params, seq)
    res = {}
    for name in ("kernel", "reference"):
        cache, logits = teacher_forced(params, seq, slots, name)
        res[name] = (np.asarray(logits), np.asarray(cache.ssm[:, slots], np.float32),
                     np.asarray(cache.conv[:, slots]))
    k, r = res["kernel"], res["reference"]
    out = dict(
        tokens_per_s=tps, in_place=in_place,
        backends_logits=rel(k[0], r[0]), backends_state=rel(k[1], r[1]),
        decode_vs_forward_logits=rel(k[0], logits_full),
        decode_vs_forward_state=rel(k[1], np.asarray(ssm_full.astype(dtype), np.float32)),
        decode_vs_forward_conv=rel(k[2], conv_full),
        reference_vs_forward_logits=rel(r[0], logits_full))
    print(f"check on {seq.shape[1]} tokens x batch {B} (max |diff| / max |ref|):")
    print(f"  kernel vs reference backend:   logits {out['backends_logits']:.2e}, "
          f"SSM states {out['backends_state']:.2e}")
    print(f"  token-by-token decode vs full-sequence forward (chunked SSD): logits "
          f"{out['decode_vs_forward_logits']:.2e}, SSM states "
          f"{out['decode_vs_forward_state']:.2e}, conv states {out['decode_vs_forward_conv']:.2e}")
    # fp32 states: rounding-level agreement; 16-bit states round at every stored step
    tol = 1e-4 if dtype == jnp.float32 else 5e-2
    ok = all(out[k] <= tol for k in out if k not in ("tokens_per_s", "in_place"))
    out["ok"] = bool(ok and in_place)
    print(f"{'OK' if out['ok'] else 'FAILED'} (tolerance {tol:g}); total "
          f"{time.perf_counter() - t_start:.1f} s")
    print("results: " + json.dumps(out))
    return out


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)

"""Speculative decoding of a Mamba-2 model (Flax NNX, random weights) with jax_mamba.

    python examples/speculative_decoding.py              # CPU by default, or the GPU if present
    python examples/speculative_decoding.py --draft-tokens 6 --rounds 20 --noise 0.3

Each round, a draft model proposes K tokens after the pending token; the target model
verifies the T = K + 1 tokens [pending, d1..dK] in ONE multi-token step per layer, accepts the
longest prefix of drafts matching its greedy choice plus one token of its own, and keeps the
cache state of exactly the n = accepted + 1 tokens it consumed. Two ways to keep that state:

- SGLang style: the verify step writes the state after each of the T tokens into an
  intermediate buffer (``write_intermediate=True, disable_state_update=True``); then
  ``jax_mamba.speculative.commit_layer_cache`` copies step n - 1 of each row into the
  sequence's slot (and rebuilds the conv state from the verified conv inputs), every layer
  in one gather/scatter.
- vLLM style: a slot table (b, T) per sequence is both ``state_batch_indices`` and
  ``dst_state_batch_indices``, so step t's state lands in table[b, t]; the next round passes
  ``num_accepted_tokens=n`` and the kernel reads table[b, n - 1]: no copy at all.
- A layer-level varlen round (vLLM): sequences with different draft lengths flattened with
  ``cu_seqlens``, a 2-D ``dst_state_batch_indices``; any accepted prefix is read from its slot.

Checks (exit 1 on failure): the committed cache equals the cache reached by feeding the
accepted tokens one at a time through the ordinary decode step, and the generated tokens equal
plain greedy decoding of the target. The draft is the target with perturbed weights (--noise)
reading only the last --draft-context tokens: a stand-in for a small draft model that keeps
this example self-contained (its acceptance rate is what it is; the mechanics are the point).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_mamba  # noqa: E402
from jax_mamba import speculative as spec  # noqa: E402
from mamba2_model import (Mamba2Config, add_model_arguments, backend, init_model,  # noqa: E402
                          nnx, write_prefill)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(ap, layers=2, d_model=128, d_state=32, vocab=256)
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per sequence")
    ap.add_argument("--draft-tokens", type=int, default=4, help="K drafts per round")
    ap.add_argument("--draft-context", type=int, default=8,
                    help="tokens the draft model reads (the last ones)")
    ap.add_argument("--noise", type=float, default=0.05,
                    help="relative weight perturbation of the draft model")
    ap.add_argument("--rounds", type=int, default=12, help="speculative rounds")
    a = ap.parse_args(argv)
    if a.prompt_len < max(a.draft_context, 2):
        ap.error("--prompt-len must be >= max(--draft-context, 2)")
    if min(a.layers, a.batch, a.draft_tokens, a.rounds, a.draft_context) < 1:
        ap.error("sizes must be >= 1")
    return a


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


class Runner:
    """The jitted pieces; the target's cache is donated to every step that updates it."""

    def __init__(self, args, graphdef, target_params, draft_params):
        self.a = args
        self.K, self.T = args.draft_tokens, args.draft_tokens + 1
        self.tg = self.dg = graphdef
        self.tp, self.dp = target_params, draft_params
        self.ssu = backend(args.backend)
        self.max_len = args.prompt_len + args.rounds * self.T
        # parameters are arguments (not constants baked into the programs)
        jit = lambda f, **kw: functools.partial(jax.jit(f, **kw), params=(self.tp, self.dp))
        self.prefill = jit(self._prefill, static_argnums=(2, 3, 4))
        self.round_sglang = jit(functools.partial(self._round, "sglang"), donate_argnums=0)
        self.round_vllm = jit(functools.partial(self._round, "vllm"), donate_argnums=0)
        self.feed = jit(self._feed, donate_argnums=0)

    def target(self, params=None):
        return nnx.merge(self.tg, self.tp if params is None else params[0])

    def _prefill(self, tokens, slots, num_slots, rows, steps, params):
        """A fresh target cache (num_slots slots, `rows` intermediate rows of `steps` steps)
        holding the states of tokens (b, L) fed from zero states, in `slots`."""
        model = self.target(params)
        _, ssm, conv = model.forward(tokens)
        cache = model.allocate_cache(num_slots, intermediate_rows=rows, cache_steps=steps)
        return write_prefill(cache, slots, ssm, conv)

    def _draft(self, buf, length, params):
        """K greedy draft tokens after the pending token buf[b, length-1], from the draft
        model reading the last draft_context tokens from zero states (a fresh small cache each
        round): C + K - 1 decode steps, the last C context tokens, then its own choices."""
        draft = nnx.merge(self.dg, params[1])
        b, C, K = buf.shape[0], self.a.draft_context, self.K
        ctx = jnp.take_along_axis(buf, length[:, None] - C + jnp.arange(C)[None], axis=1)
        slots = jnp.arange(b, dtype=jnp.int32)

        def body(carry, t):
            cache, prev = carry
            tok = jnp.where(t < C, ctx[:, jnp.minimum(t, C - 1)], prev)
            logits, cache = draft.decode_step(tok, cache, slots, self.ssu)
            return (cache, jnp.argmax(logits, -1).astype(jnp.int32)), prev

        (_, last), prevs = jax.lax.scan(body, (draft.allocate_cache(b), ctx[:, 0]),
                                        jnp.arange(C + K - 1))
        # prevs[t] is the choice after step t-1: drafts are the choices after steps C-1..C+K-2
        drafts = jnp.concatenate([prevs[C:], last[None]], axis=0)
        return jnp.moveaxis(drafts, 0, 1)                                 # (b, K)

    def _round(self, style, cache, buf, length, nacc, slots, table, params):
        """One speculative round for every sequence. Returns (cache, buf, length, n)."""
        model = self.target(params)
        pending = jnp.take_along_axis(buf, length[:, None] - 1, axis=1)   # (b, 1)
        drafts = self._draft(buf, length, params)
        v = jnp.concatenate([pending, drafts], axis=1)                    # (b, T)
        if style == "sglang":   # rows of the intermediate buffer: one per sequence
            logits, cache, xbc = model.verify_step(
                v, cache, slots, self.ssu, write_intermediate=True, disable_state_update=True,
                intermediate_state_indices=jnp.arange(v.shape[0], dtype=jnp.int32))
        else:                   # slot table: read table[b, nacc-1], write table[b, t]
            logits, cache, xbc = model.verify_step(
                v, cache, slots, self.ssu, state_batch_indices=table,
                dst_state_batch_indices=table, num_accepted_tokens=nacc)
        choice = jnp.argmax(logits, -1).astype(jnp.int32)                # (b, T)
        match = drafts == choice[:, :-1]
        a = jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=1), axis=1)  # accepted drafts
        n = a + 1                                                         # tokens consumed
        # SGLang: state[slot] = intermediate[row, n-1]; conv from the consumed inputs
        # vLLM: only the conv state is committed (the SSM state is already in table[b, n-1])
        cache = spec.commit_layer_cache(cache, n, slots, conv_inputs=xbc,
                                        commit_ssm=style == "sglang")
        bonus = jnp.take_along_axis(choice, a[:, None], axis=1)[:, 0]
        i = jnp.arange(self.T)[None]
        new = jnp.where(i < a[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), bonus[:, None])
        pos = jnp.where(i <= a[:, None], length[:, None] + i, self.max_len)    # drop the rest
        buf = buf.at[jnp.arange(buf.shape[0])[:, None], pos].set(new, mode="drop")
        return cache, buf, length + n, n

    def _feed(self, cache, tokens, counts, slots, params):
        """The oracle: tokens (b, L) fed one at a time through the ordinary decode step,
        sequence b only its first counts[b] (padding slot afterwards: nothing written).
        Returns (cache, the target's greedy choice after each token (b, L))."""
        model = self.target(params)

        def body(cache, inp):
            t, tok = inp
            logits, cache = model.decode_step(tok, cache, jnp.where(t < counts, slots, -1),
                                              self.ssu)
            return cache, jnp.argmax(logits, -1).astype(jnp.int32)

        cache, choice = jax.lax.scan(body, cache, (jnp.arange(tokens.shape[1]),
                                                   jnp.moveaxis(tokens, 1, 0)))
        return cache, jnp.moveaxis(choice, 0, 1)


def run_model_level(args, r: Runner, style, prompt):
    b, T, P = args.batch, r.T, args.prompt_len
    # one cache layout for both styles (so each program compiles once): b * T slots, a row of
    # T per sequence (vLLM's slot table; the conv state and SGLang's SSM state live in column
    # 0), and b intermediate rows of T steps (used by SGLang only)
    table = jnp.arange(b * T, dtype=jnp.int32).reshape(b, T)
    slots, S = table[:, 0], b * T
    cache = r.prefill(prompt[:, :-1], slots, S, b, T)      # the prompt but its last token
    buf = jnp.zeros((b, r.max_len), jnp.int32).at[:, :P].set(prompt)
    length = jnp.full((b,), P, jnp.int32)
    nacc = jnp.ones((b,), jnp.int32)                        # vLLM: state in table[b, 0]
    step = r.round_sglang if style == "sglang" else r.round_vllm
    # compile outside the timing (on a throwaway cache of the same shapes)
    step(jax.tree.map(jnp.zeros_like, cache), buf, length, nacc, slots, table)
    t0, accepted = time.perf_counter(), []
    for _ in range(args.rounds):
        cache, buf, length, nacc = step(cache, buf, length, nacc, slots, table)
        accepted.append(np.asarray(nacc))
    jax.block_until_ready(cache)
    dt = time.perf_counter() - t0
    generated = np.asarray(length) - P
    # -- checks ----------------------------------------------------------------------------
    # committed state == the accepted tokens fed one at a time (all but the pending one)
    oracle = r.prefill(prompt[:, :-1], slots, S, b, T)
    oracle, choice = r.feed(oracle, buf[:, P - 1:], length - P, slots)
    held = slots if style == "sglang" else spec.accepted_state_slots(table, nacc)
    d_ssm = rel(cache.ssm[:, held], oracle.ssm[:, slots])
    d_conv = rel(cache.conv[:, slots], oracle.conv[:, slots])
    # generated tokens == plain greedy decoding of the target: every generated token is the
    # target's greedy choice after the tokens before it (by induction, the greedy sequence)
    bufn, choice = np.asarray(buf), np.asarray(choice)
    same = all(np.array_equal(bufn[i, P:P + generated[i]], choice[i, :generated[i]])
               for i in range(b))
    acc = np.stack(accepted)                                 # (rounds, b) tokens consumed
    return dict(style=style, tokens=int(generated.sum()), seconds=dt,
                tokens_per_round=float(generated.sum() / (args.rounds * b)),
                mean_accepted_drafts=float((acc - 1).mean()),
                committed_vs_single_token_ssm=d_ssm, committed_vs_single_token_conv=d_conv,
                same_tokens_as_greedy=bool(same))


def run_varlen_layer(args, rng):
    """One SSM layer, vLLM varlen: per-sequence draft lengths in one flat batch, states after
    every step in a 2-D dst table; any accepted prefix's state equals single-token decoding."""
    H, Pd, N, G = 4, 16, 32, 1
    lengths = rng.integers(1, args.draft_tokens + 2, size=args.batch)
    K, nb = int(lengths.max()), args.batch
    S = nb * (K + 1)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    state, A, D, dt_bias = f(S, H, Pd, N) * 0.3, -jnp.exp(f(H) * 0.5), f(H), f(H) * 0.5
    TT = int(lengths.sum())
    x, dt, B, C = f(TT, H, Pd), f(TT, H), f(TT, G, N), f(TT, G, N)
    cu = spec.cu_seqlens_from_lengths(lengths)
    src = jnp.arange(nb, dtype=jnp.int32) * (K + 1)                # home slots
    dst = src[:, None] + 1 + jnp.arange(K, dtype=jnp.int32)[None]  # then one per step
    dst = jnp.where(jnp.arange(K)[None] < jnp.asarray(lengths)[:, None], dst, -1)
    ssu = backend(args.backend)
    r = jax.jit(lambda s: ssu(s, x, dt, A, B, C, D, dt_bias=dt_bias, dt_softplus=True,
                              state_batch_indices=src, dst_state_batch_indices=dst,
                              cu_seqlens=cu), donate_argnums=0)(jnp.array(state))
    nacc = jnp.asarray(rng.integers(1, lengths + 1), jnp.int32)    # accepted per sequence
    got = r.state[spec.accepted_state_slots(dst, nacc)]
    want = state
    cun = np.asarray(cu)
    for s in range(nb):
        for t in range(int(nacc[s])):
            row = slice(cun[s] + t, cun[s] + t + 1)
            want = ssu(want, x[row], dt[row], A, B[row], C[row], D, dt_bias=dt_bias,
                       dt_softplus=True, state_batch_indices=src[s:s + 1]).state
    return dict(style="vllm-varlen-layer", lengths=lengths.tolist(),
                accepted=np.asarray(nacc).tolist(),
                committed_vs_single_token_ssm=rel(got, want[src]))


def main(argv=None):
    args = parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")
    print(f"device: {jax.devices()[0]}  (jax {jax.__version__}, CUDA handlers built: "
          f"{jax_mamba.HAS_CUDA})")
    t_start = time.perf_counter()
    cfg = Mamba2Config(vocab_size=args.vocab, d_model=args.d_model, n_layer=args.layers,
                       d_state=args.d_state, headdim=args.headdim, ngroups=args.ngroups,
                       chunk_size=8)
    graphdef, params = init_model(cfg, args.seed)
    noise = np.random.default_rng(args.seed + 1)
    leaves, tree = jax.tree_util.tree_flatten(params)
    draft_params = jax.tree_util.tree_unflatten(tree, [       # perturbed on the host
        jnp.asarray(w + args.noise * w.std() * noise.standard_normal(w.shape), w.dtype)
        for w in map(np.asarray, leaves)])
    r = Runner(args, graphdef, params, draft_params)
    rng = np.random.default_rng(args.seed)
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (args.batch, args.prompt_len)),
                         jnp.int32)
    print(f"target Mamba-2: {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.nheads} heads; "
          f"draft = target + {args.noise:g} noise on the last {args.draft_context} tokens; "
          f"K = {args.draft_tokens} drafts, {args.rounds} rounds, batch {args.batch}, "
          f"{args.backend} backend")
    results = [run_model_level(args, r, s, prompt) for s in ("sglang", "vllm")]
    results.append(run_varlen_layer(args, rng))
    tol = 1e-5
    ok = True
    for res in results:
        good = (res["committed_vs_single_token_ssm"] <= tol
                and res.get("committed_vs_single_token_conv", 0.0) <= tol
                and res.get("same_tokens_as_greedy", True))
        ok &= good
        if "tokens" in res:
            print(f"{res['style']:>6}: {res['tokens']} tokens in {res['seconds']:.2f} s, "
                  f"{res['tokens_per_round']:.2f} tokens per sequence and round "
                  f"(mean accepted drafts {res['mean_accepted_drafts']:.2f} of "
                  f"{args.draft_tokens}); same tokens as greedy decoding: "
                  f"{res['same_tokens_as_greedy']}")
            print(f"        committed cache vs single-token decoding of the accepted tokens "
                  f"(max |diff| / max |ref|): SSM {res['committed_vs_single_token_ssm']:.2e}, "
                  f"conv {res['committed_vs_single_token_conv']:.2e}  "
                  f"{'OK' if good else 'FAILED'}")
        else:
            print(f"varlen (one layer, draft lengths {res['lengths']}, accepted "
                  f"{res['accepted']}): committed state vs single-token decoding "
                  f"{res['committed_vs_single_token_ssm']:.2e}  {'OK' if good else 'FAILED'}")
    print(f"{'OK' if ok else 'FAILED'} (tolerance {tol:g}); total "
          f"{time.perf_counter() - t_start:.1f} s")
    print("results: " + json.dumps({"ok": bool(ok), "runs": results}))
    return dict(ok=bool(ok), runs=results)


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)

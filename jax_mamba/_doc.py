"""The argument documentation of selective_state_update, shared by every function with its
signature (the op, the reference, the checked variant, runtime_faults): `help()` on any of them
shows it. docs/shapes.md is the same content as tables; tests/test_docs.py checks that both name
every argument of the signature."""

ARGUMENTS = """\
Sizes: S cache slots, H heads, P head dim, N dstate, G groups (G divides H; head h uses group
h // (H/G)), b batch entries, T steps per entry, TT total tokens and NS sequences (varlen),
K width of a 2-D index array, I rows and CS steps of the intermediate buffer.

Modes, decided by the ranks of state and x and by cu_seqlens:
  STP (one token):   x (b, H, P)
  MTP (T tokens):    x (b, T, H, P)             (x has the rank of the state)
  varlen:            x (TT, H, P) + cu_seqlens  (sequence s is tokens cu_seqlens[s]..[s+1])
Mamba-2 has a 4-D state (S, H, P, N). Mamba-1 has a 3-D state (S, P, N): one head and one
group, the H and G axes dropped from every argument (x (b, P), dt (b, P), A (P, N), B and C
(b, N), D and dt_bias (P,), state_scale (S, P), ...). Below, "lead" stands for the leading axes
of x: (b,) in STP, (b, T) in MTP, (TT,) in varlen.

Per step, for each head h and row p of an entry (in float32; the state is rounded only when
stored):
  dt' = softplus(dt + dt_bias) if dt_softplus else dt + dt_bias
  state = exp(dt' * A) * state + dt' * B[g] * x          (outer product over N)
  out = sum_N(state * C[g]) + D * x, times z * sigmoid(z) when z is given

Args:
  state: (S, H, P, N) Mamba-2 or (S, P, N) Mamba-1; float32, bfloat16, float16 or int16
    (block-scaled, needs state_scale). The cache of all slots. Updated in place.
  x: lead + (H, P); float32, bfloat16 or float16. The input of each token.
  dt: lead + (H,) (per head) or lead + (H, P) (per element); Mamba-1 lead + (P,); a floating
    dtype shared with D and dt_bias (it may differ from x's).
  A: (H,) or (H, P, N); Mamba-1 (P, N); any floating dtype (used as float32).
  B, C: lead + (G, N); Mamba-1 lead + (N,); x's dtype; B and C have the same shape.
  D: (H,) or (H, P); Mamba-1 (P,); dt's dtype; or None for no skip term. Required in the
    signature (FlashInfer's order), so pass None explicitly to omit it.
  z: like x, x's dtype, or None (default): the gate.
  dt_bias: like D, dt's dtype, or None (default): added to dt before the softplus.
  dt_softplus: Python bool, default False: apply softplus to dt + dt_bias.
  state_batch_indices: the slot each entry reads and, by default, writes back: None (default:
    entry b uses slot b, needs S >= b), (b,) or (b, K) (varlen: (NS,) or (NS, K)); int32 or
    int64 (int64 needs jax_enable_x64), one dtype shared by all index arrays. A 2-D array is a
    slot per step: the entry reads column num_accepted_tokens[b] - 1 (column 0 without
    num_accepted_tokens, or when that is <= 0); in MTP, K >= T.
  pad_slot_id: Python int, default -1. An entry whose read slot equals it reads zeros, writes
    its output and nothing else; a dst or intermediate index equal to it skips that write. Any
    value in the index dtype's range; slot 0 is an ordinary slot.
  state_scale: (S, H, P) or (S, H, P, 1) (Mamba-1 (S, P) or (S, P, 1)) float32, or None
    (default): the per-row scales of an int16 state (value = q * scale); required with an
    int16 state, refused otherwise. Updated in place.
  out: like x, x's dtype, or None (default). When given, the output is written into it in place
    and returned as SSUResult.out; otherwise a new array.
  disable_state_update: Python bool, default False: write neither the state nor the dst slots
    (the intermediate buffer is still written): verify without committing.
  intermediate_states_buffer: (I, CS, H, P, N) (Mamba-1 (I, CS, P, N)), the state's dtype, or
    None (default). Entry b writes the state after every step t to row
    intermediate_state_indices[b] (or b), step t; the final state is written to the cache too
    unless disable_state_update. Not combinable with dst_state_batch_indices. Updated in place.
  intermediate_state_indices: (b,) (varlen (NS,)), the index dtype, or None (default: row b,
    needs I >= b).
  intermediate_state_scales: (I, CS, H, P) (Mamba-1 (I, CS, P)) float32, or None (default):
    the scales of an int16 buffer; required with one, refused otherwise. Updated in place.
  rand_seed: None (default: round to nearest even) or a seed for stochastic rounding of a
    float16 or bfloat16 state: a Python int, an integer scalar or 1-element array (may be
    traced: read on the device, no recompile), a raw uint32 (2,) key or a typed JAX PRNG key.
  philox_rounds: Python int >= 1, default 10: rounds of the Philox-4x32 generator.
  cache_steps: Python int >= 0, default 0: the longest sequence allowed (0: no limit, or the
    buffer's step axis CS when an intermediate buffer is given, which it must then equal).
  algorithm: "auto" (default), "simple", "horizontal" or "vertical": the CUDA kernel strategy.
    Validated and ignored on the CPU; lowering for CUDA refuses a strategy that cannot run the
    shape (docs/errors.md).
  dst_state_batch_indices: None (default: write back to the read slot), (b,) (write the final
    state to dst[b]) or (b, K) (write the state after step t to dst[b, t]); varlen (NS,) or
    (NS, K); the index dtype. The read slot is then not written.
  cu_seqlens: (NS + 1,) int32 or int64, or None (default): varlen mode, sequence s is tokens
    cu_seqlens[s] .. cu_seqlens[s + 1] of x.
  num_accepted_tokens: (b,) (varlen (NS,)), the index dtype, or None (default): with a 2-D
    state_batch_indices, entry b reads slot state_batch_indices[b, max(n - 1, 0)].

All settings (dt_softplus, pad_slot_id, disable_state_update, philox_rounds, cache_steps,
algorithm) are static: pass Python values, not traced ones. Pass every argument after D by
keyword. Wrong ranks, shapes, dtypes and combinations raise TypeError / ValueError naming the
argument (docs/errors.md). Invalid index values at run time are never read or written out of
bounds: the affected entries' outputs become NaN and they write nothing (docs/semantics.md;
jax_mamba.checked raises on them instead).
"""

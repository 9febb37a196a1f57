// The canonical problem description both kernels run on, and the per-entry index logic
// (read slot, validity, padding, write destinations; docs/semantics.md, "One entry" to
// "Invalid runtime data"), shared by CPU and CUDA.
//
// Index values are caller data: every int32 / int64 value may arrive, so none of them is ever
// given an internal meaning. Whether something happens (a pad, a write, an intermediate row)
// is a flag decided from the value (== pad_slot_id, in range); the value itself is only used
// once it is known to be a real, in-range index.
#pragma once
#include <cstdint>
#include "ssu_math.h"

namespace ssu {

// Canonical shapes (the Python layer reshapes into these):
//   state (S,H,P,N); x, z, out (nb,T,H,P) or varlen (rows,H,P); dt like x or without P;
//   A f32 (H) or (H,P,N); B, C rows x (G,N); D, dt_bias (H) or (H,P);
//   src_idx (state_batch_indices), dst (dst_state_batch_indices): (nb) or (nb,K);
//   state_scale f32 (S,H,P); inter (intermediate_states_buffer, I,CS,H,P,N) + inter_scales
//   (I,CS,H,P); inter_idx (intermediate_state_indices), num_accepted (num_accepted_tokens): (nb);
//   cu_seqlens (nb+1); seed (rand_seed) u32 (2). An entry reads slot `src`, writes `dst`, and
//   intermediate row `ii`.
// Absence is always an explicit flag, never a size: any size (0 included) is a real size.
struct Params {
  int64_t S, H, P, N, G, nb, T, rows;  // T: steps per entry (0 in varlen)
  int64_t K_src, K_dst;                // widths of 2-D index arrays (when src_2d / dst_2d)
  int64_t I, CS;                       // intermediate rows and step axis (when has_inter)
  int64_t cache_steps;                 // longest allowed sequence (when has_cache_steps)
  int64_t pad;
  int philox_rounds;
  DType state_t, input_t, param_t;  // state; x/B/C/z/out; dt/D/dt_bias
  bool idx64, cu_seqlens64, num_accepted64;
  bool varlen, dt_elem, A_elem, D_elem, bias_elem;
  bool has_D, has_z, has_dt_bias, has_src_idx, has_dst, has_inter, has_inter_idx, has_num_accepted,
      has_seed;
  bool src_2d, dst_2d, has_cache_steps;
  bool softplus, update_state;

  void* state;
  float* state_scale;
  const void *x, *dt, *B, *C, *D, *z, *dt_bias;
  const float* A;
  const void *src_idx, *dst, *inter_idx, *cu_seqlens, *num_accepted;
  const uint32_t* seed;
  void* out;
  void* inter;
  float* inter_scales;
};

SSU_HD int64_t load_index(const void* p, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(p)[i] : int64_t(static_cast<const int32_t*>(p)[i]);
}

// What one entry (batch row or varlen sequence) does.
struct Entry {
  int64_t row0, len;       // first row of x/out and number of steps
  int64_t src;             // slot read (meaningless when padded)
  int64_t ii;              // intermediate row written: in [0, I) when to_inter, else -1
  bool valid, padded;      // invalid: outputs NaN, nothing written; padded: reads zeros
  int64_t nan_lo, nan_hi;  // rows of out to fill with NaN when invalid
  bool to_inter;           // writes intermediate row ii (valid entries only). Last, so that
                           // an 8-value Entry{...} (the CUDA Ctx) still means the same.
};

SSU_HD bool slot_ok(int64_t v, int64_t n) { return v >= 0 && v < n; }

// A state write after one step: `on` says whether it happens; `index` is the value of the
// index array (or the read slot) it names, any int64 (checked by resolve_entry, meaningful
// only when `on`).
struct StateWrite {
  bool on;
  int64_t index;
};

// The state write after step t of entry e (not padded, or nothing is written). A dst equal
// to pad_slot_id is a skipped write (on = false): no index value means "no write" by itself.
SSU_HD StateWrite state_write(const Params& p, const Entry& e, int64_t b, int64_t t) {
  if (!p.update_state || e.padded) return StateWrite{false, 0};
  if (p.has_dst) {
    if (!p.dst_2d && t != e.len - 1) return StateWrite{false, 0};
    const int64_t d = load_index(p.dst, p.idx64, p.dst_2d ? b * p.K_dst + t : b);
    return StateWrite{d != p.pad, d};
  }
  return StateWrite{t == e.len - 1, e.src};
}

// Slot of `state` written after step t of a valid entry, -1 for none. A valid entry's writes
// are in [0, S) (resolve_entry checked them), so -1 is no slot: it stands only for
// `!state_write(...).on`, never for an index value (the CUDA kernels test `>= 0`).
SSU_HD int64_t state_write_slot(const Params& p, const Entry& e, int64_t b, int64_t t) {
  const StateWrite w = state_write(p, e, b, t);
  return w.on ? w.index : -1;
}

SSU_HD int64_t clamp_rows(int64_t r, int64_t rows) { return r < 0 ? 0 : (r > rows ? rows : r); }

// Varlen (docs/semantics.md, "Varlen bounds"): sequence s spans cu[s] .. cu[s+1]. Its bounds are
// wrong when negative, decreasing or beyond the token count. The rows it owns are its span clipped
// to [0, rows), none at all when cu decreases. Two sequences whose owned rows intersect are both
// invalid, so a valid sequence owns its rows alone and an invalid one may write NaN over all of its
// own.
struct SeqSpan {
  int64_t a, z;    // cu[s], cu[s+1]
  int64_t lo, hi;  // owned rows [lo, hi), lo == hi: none
  bool bounds_ok;
};

SSU_HD SeqSpan seq_span(const Params& p, int64_t s) {
  SeqSpan q;
  q.a = load_index(p.cu_seqlens, p.cu_seqlens64, s);
  q.z = load_index(p.cu_seqlens, p.cu_seqlens64, s + 1);
  q.bounds_ok = q.a >= 0 && q.z >= q.a && q.z <= p.rows;
  q.lo = clamp_rows(q.a, p.rows);
  q.hi = q.z >= q.a ? clamp_rows(q.z, p.rows) : q.lo;
  return q;
}

SSU_HD bool spans_intersect(const SeqSpan& u, const SeqSpan& v) {
  return u.lo < u.hi && v.lo < v.hi && u.lo < v.hi && v.lo < u.hi;
}

// Whether the rows sequence s owns intersect those of sequences [t0, t1) other than s. Callers
// split [0, nb) between threads; the scalar form (whole range) is the definition.
SSU_HD bool seq_overlaps(const Params& p, const SeqSpan& q, int64_t s, int64_t t0, int64_t t1) {
  if (q.lo >= q.hi) return false;
  for (int64_t t = t0; t < t1; ++t)
    if (t != s && spans_intersect(q, seq_span(p, t))) return true;
  return false;
}

// Whether row r of out belongs to some sequence (rows that belong to none are 0).
SSU_HD bool row_owned(const Params& p, int64_t r) {
  for (int64_t s = 0; s < p.nb; ++s) {
    const SeqSpan q = seq_span(p, s);
    if (r >= q.lo && r < q.hi) return true;
  }
  return false;
}

// `overlapped`: varlen only, seq_overlaps over all sequences (computed by the caller, which
// can share the work).
SSU_HD Entry resolve_entry(const Params& p, int64_t b, bool overlapped = false) {
  Entry e{0, 0, 0, -1, true, false, 0, 0, false};
  if (p.varlen) {
    const SeqSpan q = seq_span(p, b);
    if (!q.bounds_ok || overlapped) {  // NaN over the rows it owns (none when decreasing)
      e.valid = false;
      e.nan_lo = q.lo;
      e.nan_hi = q.hi;
      return e;
    }
    e.row0 = q.a;
    e.len = q.z - q.a;
  } else {
    e.row0 = b * p.T;
    e.len = p.T;
  }
  if (e.len == 0) return e;  // a zero-length sequence reads and writes nothing
  bool ok = !(p.has_cache_steps && e.len > p.cache_steps) && !(p.src_2d && e.len > p.K_src) &&
            !(p.dst_2d && e.len > p.K_dst) && !(p.has_inter && e.len > p.CS);
  if (ok && p.has_src_idx) {
    int64_t col = 0;
    if (p.has_num_accepted) {
      int64_t na = load_index(p.num_accepted, p.num_accepted64, b);
      ok = p.src_2d && na >= 0 && na <= p.K_src;
      col = na > 1 ? na - 1 : 0;
    }
    ok = ok && (!p.src_2d || col < p.K_src);
    if (ok) {
      int64_t v = load_index(p.src_idx, p.idx64, p.src_2d ? b * p.K_src + col : b);
      e.padded = v == p.pad;
      ok = e.padded || slot_ok(v, p.S);
      e.src = v;
    }
  } else {
    e.src = b;
  }
  if (ok && !e.padded && p.has_inter) {
    // without intermediate_state_indices the row is the entry number (never a pad)
    const int64_t ii = p.has_inter_idx ? load_index(p.inter_idx, p.idx64, b) : b;
    const bool skip = p.has_inter_idx && ii == p.pad;
    ok = skip || slot_ok(ii, p.I);
    if (ok && !skip) {
      e.to_inter = true;
      e.ii = ii;
    }
  }
  for (int64_t t = 0; ok && p.has_dst && t < e.len; ++t) {
    const StateWrite w = state_write(p, e, b, t);
    ok = !w.on || slot_ok(w.index, p.S);
  }
  if (!ok) {
    e.valid = false;
    e.to_inter = false;
    e.ii = -1;
    e.nan_lo = clamp_rows(e.row0, p.rows);
    e.nan_hi = clamp_rows(e.row0 + e.len, p.rows);
  }
  return e;
}

}  // namespace ssu

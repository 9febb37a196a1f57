"""Float64 NumPy oracle written directly from docs/semantics.md (loops, no vectorisation tricks).
Index values are handled as Python ints: any int32 / int64 value, no overflow.

oracle(**kwargs) takes the public arguments (NumPy or JAX arrays) and returns a dict:
  out           float64, shape of x (NaN where docs/semantics.md says NaN)
  state         float64 values of every slot after the call (written slots: unrounded fp32-math
                values from float64 math; other slots: the input decoded)
  written       bool per slot: did the call write it
  inter, inter_written    likewise for the intermediate buffer (rows x steps), or None
"""
import numpy as np


def _f(a):
    return None if a is None else np.asarray(a).astype(np.float64)


def _i(a):
    return None if a is None else np.asarray(a).astype(np.int64)


def oracle(state, x, dt, A, B, C, D, z=None, dt_bias=None, dt_softplus=False,
           state_batch_indices=None, pad_slot_id=-1, state_scale=None, out=None,
           disable_state_update=False, intermediate_states_buffer=None,
           intermediate_state_indices=None, intermediate_state_scales=None, rand_seed=None,
           philox_rounds=10, cache_steps=0, algorithm="auto", dst_state_batch_indices=None,
           cu_seqlens=None, num_accepted_tokens=None):
    st_dtype = np.asarray(state).dtype
    heads = np.ndim(state) == 4
    st = _f(state)
    if st_dtype == np.int16:
        sc = _f(state_scale).reshape(st.shape[:-1])
        st = st * sc[..., None]
    x_shape = np.shape(x)
    x, dt, B, C, z = _f(x), _f(dt), _f(B), _f(C), _f(z)
    A, D, bias = _f(A), _f(D), _f(dt_bias)
    if not heads:  # Mamba-1: insert H = G = 1
        st = st[:, None]
        x = x[..., None, :]
        dt = dt[..., None, :]
        B, C = B[..., None, :], C[..., None, :]
        z = None if z is None else z[..., None, :]
        A = A[None]
        D = None if D is None else D[None]
        bias = None if bias is None else bias[None]
    S, H, P, N = st.shape
    varlen = cu_seqlens is not None
    if varlen:
        cu = [int(v) for v in _i(cu_seqlens)]
        nb, TT = len(cu) - 1, x.shape[0]
    else:
        if x.ndim == 3:  # STP -> T = 1
            x, dt, B, C = x[:, None], dt[:, None], B[:, None], C[:, None]
            z = None if z is None else z[:, None]
        nb, T = x.shape[:2]
    G = B.shape[-2]
    sbi, dst = _i(state_batch_indices), _i(dst_state_batch_indices)
    nacc, iidx = _i(num_accepted_tokens), _i(intermediate_state_indices)
    inter = _f(intermediate_states_buffer)
    if inter is not None:
        if st_dtype == np.int16:
            inter = inter * _f(intermediate_state_scales).reshape(inter.shape[:-1])[..., None]
        if not heads:
            inter = inter[:, :, None]
        I, CS = inter.shape[:2]
        max_len = CS
    else:
        max_len = cache_steps
    pad = pad_slot_id
    new_state = st.copy()
    written = np.zeros(S, bool)
    inter_written = None if inter is None else np.zeros(inter.shape[:2], bool)
    y_all = np.zeros(x.shape[:-2] + (H, P)) if varlen else np.zeros((nb, T, H, P))

    if varlen:
        # docs/semantics.md, "Varlen bounds": the rows a sequence owns (none when cu
        # decreases), clipped to [0, TT);
        # sequences that own a common row are both invalid
        owned = [set(range(max(cu[b], 0), min(cu[b + 1], TT))) if cu[b + 1] >= cu[b] else set()
                 for b in range(nb)]
        meets = [any(owned[b] & owned[c] for c in range(nb) if c != b) for b in range(nb)]
    for b in range(nb):
        if varlen:
            a, e = cu[b], cu[b + 1]
            if a < 0 or e < a or e > TT or meets[b]:
                for r in owned[b]:
                    y_all[r] = np.nan
                continue
            tok = list(range(a, e))
        else:
            tok = [(b, t) for t in range(T)]
        L = len(tok)
        if L == 0:
            continue
        bad = bool(max_len) and L > max_len
        for idx in (sbi, dst):
            if idx is not None and idx.ndim == 2 and L > idx.shape[1]:
                bad = True
        padded = False
        src = b
        if sbi is not None and not bad:
            col = 0
            if nacc is not None:
                na = int(nacc[b])
                if not (0 <= na <= sbi.shape[1]):
                    bad = True
                col = max(na - 1, 0)
            if not bad:
                src = int(sbi[b, col] if sbi.ndim == 2 else sbi[b])
                padded = src == pad
                bad = bad or (not padded and not 0 <= src < S)
        # write targets per step
        dsts = [None] * L
        if not padded and not disable_state_update:
            for t in range(L):
                if dst is not None:
                    d = int(dst[b, t]) if dst.ndim == 2 else (int(dst[b]) if t == L - 1 else None)
                    if d is not None and d == pad:
                        d = None
                else:
                    d = src if t == L - 1 else None
                if d is not None and not 0 <= d < S:
                    bad = True
                dsts[t] = d
        ii = None
        if inter is not None and not padded:
            ii = int(iidx[b]) if iidx is not None else b
            if iidx is not None and ii == pad:
                ii = None
            elif not 0 <= ii < I:
                bad = True
        if bad:
            for t in range(L):
                y_all[tok[t]] = np.nan
            continue
        s = np.zeros((H, P, N)) if padded else st[src].copy()
        for t in range(L):
            xt, dtt, Bt, Ct = x[tok[t]], dt[tok[t]], B[tok[t]], C[tok[t]]
            for h in range(H):
                g = h // (H // G)
                d_ = dtt[h]  # scalar or (P,)
                d_ = d_ + (0 if bias is None else bias[h])
                d_ = np.broadcast_to(np.asarray(d_, np.float64), (P,)).copy()
                if dt_softplus:
                    d_ = np.where(d_ <= 20, np.log1p(np.exp(np.minimum(d_, 20))), d_)
                Ah = A[h] if A.ndim == 3 else np.full((P, N), A[h])
                dA = np.exp(Ah * d_[:, None])
                s[h] = s[h] * dA + (Bt[g][None, :] * d_[:, None]) * xt[h][:, None]
                y = (s[h] * Ct[g][None, :]).sum(-1)
                if D is not None:
                    y = y + D[h] * xt[h]
                if z is not None:
                    zt = z[tok[t]][h]
                    y = y * zt / (1 + np.exp(-zt))
                y_all[tok[t]][h] = y
            if dsts[t] is not None:
                new_state[dsts[t]] = s
                written[dsts[t]] = True
            if ii is not None:
                inter[ii, t] = s
                inter_written[ii, t] = True
    if not heads:
        new_state = new_state[:, 0]
        inter = None if inter is None else inter[:, :, 0]
    return dict(out=y_all.reshape(x_shape), state=new_state, written=written, inter=inter,
                inter_written=inter_written)

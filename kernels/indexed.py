"""Indexed layout: ``neg`` is the item table [I, d], row r's negatives are ``table[neg_idx[r, j]]``.

The row pass is the per-row template (:func:`kernels.per_row.rows_kernel` with ``INDEXED``): it
gathers the item vectors inside the kernel (never an R×N×d tensor) and, by default, scatters
∂/∂v with fp32 ``tl.atomic_add`` into the table gradient (the positives' g+·q too when they are
table rows, ``pos_idx``). Atomic order varies run to run, so the last bits may too.

``deterministic=True`` replaces the atomics by an item-segment pass, :func:`item_segment_kernel`.
The host side (torch, no synchronisation) builds a stably sorted inverse index of the E = R·N
(+ R with ``pos_idx``) references to table rows:

    keys   = concat(neg_idx.flatten(), pos_idx)      int64 [E]
    sorted_keys, order = sort(keys, stable=True)      int64 [E] each
    seg_end = searchsorted(sorted_keys, sorted_keys, right=True)   int64 [E]

(four int64 [E] buffers, i.e. O(R·N) integers — the only O(R·N) allocation of the triton backend,
made only in deterministic mode; no float R×N and nothing R×N×d). The forward's row pass saves
four floats per row (shift, coef, g+, uni), the backward's gradient pass computes ∂/∂q and ∂/∂p only,
and each segment head (the first reference to an item in sorted order) sums, in that fixed order,
g_e·q_{r(e)} over its references with g_e recomputed from the scores and the row scale:
∂/∂table[i] = Σ_{(r, j): neg_idx[r, j] = i} g_rj q_r + Σ_{r: pos_idx[r] = i} g+_r q_r.
A program holds BLOCK_E consecutive entries; its loop runs as long as the longest segment that
starts among them, so a very popular item serialises in one lane.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._rowmath import in_table, neg_phi, score_unit


@triton.jit
def item_segment_kernel(
    Q, NEG, SORTED_KEYS, ORDER, SEG_END, LOG_Q, MASK, HIT_POS, HIT_NEG, ROW_SCALE, ROW_SHIFT, ROW_COEF, ROW_GPOS,
    ROW_UNI, GRAD_NEG, E, RN, N_DIV, d, n_table, stride_qr, stride_qd, stride_nr, stride_nd, stride_l, stride_mr,
    stride_mn, stride_hr, stride_hn, inv_tau, margin,
    KIND: tl.constexpr, HAS_LOG_Q: tl.constexpr, HAS_MASK: tl.constexpr, HAS_HITS: tl.constexpr,
    SMOOTH: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Entries e of one block; a head lane (first entry of its item i) writes
    ∂/∂table[i] = Σ_{e in segment} G_e q_{r(e)}, entries e < R·N being negatives (r, j) = divmod(e, N)
    with G_e = row_coef_r·φ(s_rj; row_shift_r)·scale_r and entries e ≥ R·N positives r = e − R·N with
    G_e = row_gpos_r·scale_r (scale_r = row_scale_r/τ, RN = R·N, N_DIV = max(N, 1)). Keys outside
    [0, n_table) (ignore_index, padding) are never read or written."""
    pid = tl.program_id(0)
    e64 = pid.to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = e64 < E
    offs_d64 = tl.arange(0, BLOCK_D).to(tl.int64)
    dmask = offs_d64 < d
    key = tl.load(SORTED_KEYS + e64, mask=emask, other=-1)
    prev = tl.load(SORTED_KEYS + e64 - 1, mask=emask & (e64 > 0), other=-1)
    head = in_table(key, emask, n_table) & ((e64 == 0) | (prev != key))
    seg_len = tl.where(head, tl.load(SEG_END + e64, mask=head, other=0) - e64, 0)
    v = tl.load(NEG + key[:, None] * stride_nr + offs_d64[None, :] * stride_nd,
                mask=head[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    unit = score_unit(KIND)
    log_q = tl.zeros([BLOCK_E], dtype=tl.float32)
    if HAS_LOG_Q:
        log_q = tl.load(LOG_Q + key * stride_l, mask=head, other=0.0).to(tl.float32) * unit
    acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)
    for k in range(0, tl.max(seg_len, 0)):
        live = k < seg_len
        ent = tl.load(ORDER + e64 + k, mask=live, other=0)
        is_neg = ent < RN
        r = tl.where(is_neg, ent // N_DIV, ent - RN)
        j = ent % N_DIV
        q = tl.load(Q + r[:, None] * stride_qr + offs_d64[None, :] * stride_qd,
                    mask=live[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        s = tl.sum(q * v, 1) * (inv_tau * unit) - log_q
        keep = live & is_neg
        if HAS_MASK:
            keep &= tl.load(MASK + r * stride_mr + j * stride_mn, mask=keep, other=1) == 0
        if HAS_HITS:
            neg_id = tl.load(HIT_NEG + r * stride_hr + j * stride_hn, mask=keep, other=0)
            keep &= neg_id != tl.load(HIT_POS + r, mask=keep, other=0)
        scale = tl.load(ROW_SCALE + r, mask=live, other=0.0).to(tl.float32) * inv_tau
        shift = tl.load(ROW_SHIFT + r, mask=keep, other=0.0)
        coef = tl.load(ROW_COEF + r, mask=keep, other=0.0)
        g = coef * neg_phi(tl.where(keep, s, float("-inf")), shift, margin, KIND, INTERPRET)
        if SMOOTH:
            g += tl.load(ROW_UNI + r, mask=keep, other=0.0)
        g = tl.where(keep, g, 0.0)
        g += tl.load(ROW_GPOS + r, mask=live & (ent >= RN), other=0.0)
        g *= scale
        acc += g[:, None] * q
    tl.store(GRAD_NEG + key[:, None] * d + offs_d64[None, :], acc, mask=head[:, None] & dmask[None, :])

"""Per-row layout: row r has its own negatives, given pre-gathered as ``neg`` [R, N, d].

:func:`rows_kernel` is the template for every layout whose negatives differ per row. With
``INDEXED`` it is the indexed layout (``kernels/indexed.py``): the item vectors are gathered
inside the kernel as ``table[neg_idx[r, j]]`` and the item gradient is scatter-added into the
table gradient; without it the vectors are read at ``neg[r, j]`` and the gradient is stored at
``grad_neg[r, j]`` (no collisions). There is no reuse of an item across rows, so the scores
are a batched mat-vec (no ``tl.dot``): each program holds BLOCK_R rows and streams their
negatives in [BLOCK_R, BLOCK_N, BLOCK_D] tiles.

One loop, two modes (each reads the negatives once):

* state pass (the forward): the online row state (``_rowmath``), optionally acc_r = Σ_j φ_rj v_j
  with contrastive rescaling (loss and query gradient in one pass); writes L_r and, with
  SAVE_STATS, the four floats per row (shift, coef, g+, uni) that determine every gradient: O(R),
  saved for the backward.
* gradient pass (FROM_STATS, the backward): with the saved row stats and the backward's row scale,
  g_rj = coef_r·φ(s_rj; shift_r)·scale_r/τ is final in every tile, so one pass accumulates
  ∂/∂q_r = Σ_j g_rj v_j and writes ∂/∂v_rj = g_rj q_r (once, in ∂neg's dtype: the input's for the
  per-row layout, fp32 for the atomics of the indexed layout).

A forward + backward therefore reads the negatives twice.

K loop over d (``D_LOOP``, large or awkward d: ``kernels.config.gathered_block_d``): BLOCK_D is a
chunk of d, not all of it. Each negative tile's scores are a loop over the chunks (q and v chunks
loaded, only the last chunk masked), then — gradient pass — a second loop over the chunks adds
Σ_j g_rj v_rj,k into ∂/∂q_r,k and writes g_rj q_r,k into ∂/∂v (the tile's chunks are re-read from
L1/L2, not from HBM: a tile is BLOCK_R·BLOCK_N·BLOCK_D ≤ GATHER_TILE elements per chunk). Triton
has no register array indexable by a loop counter, so a [BLOCK_R, d] accumulator of arbitrary d
cannot stay in registers: it lives in the fp32 ∂q output rows, which only this program touches, as
a read-modify-write followed by a barrier (every thread sees the previous update whatever the
thread layout of the load and the store), so it is deterministic. The registers per thread are
then those of one [BLOCK_R, BLOCK_N, BLOCK_D] chunk, whatever d is. With D_LOOP the state pass
computes the loss and the row stats only; the planner always runs the gradient pass for gradients.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._rowmath import (
    finalize,
    in_table,
    init_state,
    kept_sum,
    load_block,
    neg_phi,
    positive_score,
    positive_vectors,
    score_unit,
    store_row_outputs,
    update_state,
)


@triton.jit
def gathered_keep(n0, offs_n, rows64, rmask, N, n_table, IDX, MASK, HIT_NEG, hit_pos, stride_ir, stride_in,
                  stride_mr, stride_mn, stride_hr, stride_hn, INDEXED: tl.constexpr, HAS_MASK: tl.constexpr,
                  HAS_HITS: tl.constexpr):
    """Columns n0.. of the block's rows: (cols64, in_bounds, keep, item), item = neg_idx (INDEXED).
    An index outside [0, n_table) (ignore_index, padding) is a masked negative, never dereferenced."""
    cols64 = n0 + offs_n.to(tl.int64)
    inb = rmask[:, None] & (cols64 < N)[None, :]
    item = cols64[None, :] + rows64[:, None] * 0
    keep = inb
    if INDEXED:
        item = tl.load(IDX + rows64[:, None] * stride_ir + cols64[None, :] * stride_in, mask=inb, other=0)
        item = item.to(tl.int64)
        keep = in_table(item, inb, n_table)
    if HAS_MASK:
        keep &= tl.load(MASK + rows64[:, None] * stride_mr + cols64[None, :] * stride_mn, mask=inb, other=1) == 0
    if HAS_HITS:
        neg_ids = tl.load(HIT_NEG + rows64[:, None] * stride_hr + cols64[None, :] * stride_hn, mask=inb, other=0)
        keep &= neg_ids != hit_pos[:, None]
    return cols64, inb, keep, item


@triton.jit
def gathered_offsets(rows64, cols64, item, stride_nr, stride_nn, stride_lr, stride_ln, INDEXED: tl.constexpr):
    """Offsets [BR, BN] of the negatives' vectors in NEG and of their logQ."""
    if INDEXED:
        return item * stride_nr, item * stride_lr
    pair = rows64[:, None] * stride_nr + cols64[None, :] * stride_nn
    return pair, rows64[:, None] * stride_lr + cols64[None, :] * stride_ln


@triton.jit
def gathered_vectors(NEG, item_off, keep, offs_d64, dmask, stride_nd):
    """The kept negatives' vectors [BR, BN, BD] (features ``offs_d64``) in fp32, 0 elsewhere."""
    return tl.load(NEG + item_off[:, :, None] + offs_d64[None, None, :] * stride_nd,
                   mask=keep[:, :, None] & dmask[None, None, :], other=0.0).to(tl.float32)


@triton.jit
def load_rows(X, rows64, rmask, offs_d64, dmask, stride_xr, stride_xd):
    """Features ``offs_d64`` of rows ``rows64`` of a matrix, in fp32 (0 outside)."""
    return tl.load(X + rows64[:, None] * stride_xr + offs_d64[None, :] * stride_xd,
                   mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)


@triton.jit
def gathered_scores(q, rows64, rmask, cols64, keep, item, offs_d64, dmask, Q, NEG, LOG_Q, d, stride_qr, stride_qd,
                    stride_nr, stride_nn, stride_nd, stride_lr, stride_ln, inv_tau, unit, INDEXED: tl.constexpr,
                    HAS_LOG_Q: tl.constexpr, BLOCK_D: tl.constexpr, D_LOOP: tl.constexpr):
    """(v, item_off, s): the kept negatives' vectors v [BR, BN, BD] (fp32; not loaded with D_LOOP, which
    loops over the chunks of d for the dot products), their offsets, and the scores [BR, BN] in the
    state's units (``score_unit``; −inf = excluded)."""
    item_off, lq_off = gathered_offsets(rows64, cols64, item, stride_nr, stride_nn, stride_lr, stride_ln, INDEXED)
    if D_LOOP:
        v = q
        dot = tl.zeros(keep.shape, dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            offs = d0 + offs_d64
            dm = offs < d
            q_k = load_rows(Q, rows64, rmask, offs, dm, stride_qr, stride_qd)
            dot += tl.sum(q_k[:, None, :] * gathered_vectors(NEG, item_off, keep, offs, dm, stride_nd), 2)
    else:
        v = gathered_vectors(NEG, item_off, keep, offs_d64, dmask, stride_nd)
        dot = tl.sum(q[:, None, :] * v, 2)
    s = dot * (inv_tau * unit)
    if HAS_LOG_Q:
        s -= tl.load(LOG_Q + lq_off, mask=keep, other=0.0).to(tl.float32) * unit
    return v, item_off, tl.where(keep, s, float("-inf"))


@triton.jit
def write_item_grad(g_item, GRAD_NEG, item, rows64, cols64, keep, inb, offs_d64, dmask, N, d, INDEXED: tl.constexpr):
    """∂/∂v_rj (features ``offs_d64``) = g_item: fp32 atomics into the table gradient (INDEXED), else
    stored at grad_neg[r, j] in its dtype."""
    if INDEXED:
        tl.atomic_add(GRAD_NEG + item[:, :, None] * d + offs_d64[None, None, :], g_item,
                      mask=keep[:, :, None] & dmask[None, None, :])
    else:
        off = (rows64[:, None] * N + cols64[None, :]) * d
        tl.store(GRAD_NEG + off[:, :, None] + offs_d64[None, None, :], g_item.to(GRAD_NEG.dtype.element_ty),
                 mask=inb[:, :, None] & dmask[None, None, :])


@triton.jit
def rows_kernel(
    Q, NEG, IDX, POS, POS_IDX, LOG_Q, POS_LOG_Q, MASK, HIT_POS, HIT_NEG, ROW_SCALE,
    LOSS, GRAD_Q, GRAD_P, GRAD_NEG, ROW_SHIFT, ROW_COEF, ROW_GPOS, ROW_UNI,
    R, N, d, n_table, stride_qr, stride_qd, stride_nr, stride_nn, stride_nd, stride_ir, stride_in, stride_pr,
    stride_pd, stride_lr, stride_ln, stride_mr, stride_mn, stride_hr, stride_hn,
    inv_tau, log2_eps, lam, mu, beta, margin, neg_weight, smooth, z_loss,
    INDEXED: tl.constexpr, KIND: tl.constexpr, HAS_POS: tl.constexpr, POS_FROM_TABLE: tl.constexpr,
    HAS_EPS: tl.constexpr, HAS_LOG_Q: tl.constexpr, HAS_POS_LOG_Q: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_HITS: tl.constexpr, NEG_SUM: tl.constexpr, NEED_GQ: tl.constexpr, NEED_GP: tl.constexpr,
    NEED_GN: tl.constexpr, SCATTER_POS: tl.constexpr, SAVE_STATS: tl.constexpr, FROM_STATS: tl.constexpr,
    SMOOTH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_LOOP: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Rows of one block, their N negatives each: s_rj = <q_r, v_rj>/τ − logq_rj (v_rj = neg[r, j]
    or table[neg_idx[r, j]]). State pass: writes L_r (∂/∂q_r, ∂/∂p_r when asked; the unscaled row
    stats with SAVE_STATS). Gradient pass (FROM_STATS): writes ∂/∂q_r, ∂/∂p_r and, with NEED_GN,
    ∂/∂v_rj = g_rj q_r (stored, or fp32 atomic-added into the table gradient when INDEXED;
    SCATTER_POS adds g+_r q_r into the table row of the positive). D_LOOP: d in BLOCK_D chunks (the
    module docstring); its state pass takes no gradient."""
    tl.static_assert(FROM_STATS or not (D_LOOP and (NEED_GQ or NEED_GP)))
    if D_LOOP:
        rows64 = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows64 < R
        offs_d64 = tl.arange(0, BLOCK_D).to(tl.int64)
        dmask = offs_d64 < BLOCK_D
        q = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)  # the chunks of q are loaded where needed
    else:
        rows64, rmask, offs_d64, dmask, q = load_block(Q, tl.program_id(0), R, d, stride_qr, stride_qd, BLOCK_R,
                                                       BLOCK_D)
        q = q.to(tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    unit = score_unit(KIND)
    s_pos = tl.zeros([BLOCK_R], dtype=tl.float32)
    if HAS_POS and not D_LOOP:
        s_pos = positive_score(q, POS, POS_IDX, NEG, rows64, rmask, offs_d64, dmask, stride_pr, stride_pd,
                               stride_tr=stride_nr, stride_td=stride_nd, n_table=n_table, POS_LOG_Q=POS_LOG_Q,
                               inv_tau=inv_tau, POS_FROM_TABLE=POS_FROM_TABLE, HAS_POS_LOG_Q=HAS_POS_LOG_Q)
    elif HAS_POS and not FROM_STATS:  # (a gradient pass uses the saved stats, not s+)
        for d0 in range(0, d, BLOCK_D):
            offs = d0 + offs_d64
            dm = offs < d
            s_pos += positive_score(load_rows(Q, rows64, rmask, offs, dm, stride_qr, stride_qd), POS, POS_IDX, NEG,
                                    rows64, rmask, offs, dm, stride_pr, stride_pd, stride_tr=stride_nr,
                                    stride_td=stride_nd, n_table=n_table, POS_LOG_Q=POS_LOG_Q, inv_tau=inv_tau,
                                    POS_FROM_TABLE=POS_FROM_TABLE, HAS_POS_LOG_Q=False)
        if HAS_POS_LOG_Q:
            s_pos -= tl.load(POS_LOG_Q + rows64, mask=rmask, other=0.0).to(tl.float32)
    hit_pos = rows64
    if HAS_HITS:
        hit_pos = tl.load(HIT_POS + rows64, mask=rmask, other=0)
    scale = tl.zeros([BLOCK_R], dtype=tl.float32)
    if NEED_GQ or NEED_GP or NEED_GN or FROM_STATS:
        scale = tl.load(ROW_SCALE + rows64, mask=rmask, other=0.0).to(tl.float32) * inv_tau

    m, a, b = init_state(s_pos, log2_eps, KIND, HAS_EPS)
    cnt = tl.zeros([BLOCK_R], dtype=tl.int32)
    shift = s_pos
    coef = s_pos
    g_pos = s_pos
    uni = tl.zeros([BLOCK_R], dtype=tl.float32)
    if FROM_STATS:
        shift = tl.load(ROW_SHIFT + rows64, mask=rmask, other=0.0)
        coef = tl.load(ROW_COEF + rows64, mask=rmask, other=0.0)
        g_pos = tl.load(ROW_GPOS + rows64, mask=rmask, other=0.0)
        if SMOOTH:
            uni = tl.load(ROW_UNI + rows64, mask=rmask, other=0.0)
        if D_LOOP:  # ∂q starts as g+_s·p_r in its output rows, ∂p is final
            looped_row_grads(rows64, rmask, offs_d64, d, g_pos * scale, Q, stride_qr, stride_qd, POS, stride_pr,
                             stride_pd, POS_IDX, NEG, stride_nr, stride_nd, n_table, GRAD_Q, GRAD_P, HAS_POS,
                             POS_FROM_TABLE, NEED_GQ, NEED_GP, BLOCK_D)
    coef_s = coef * scale
    ssum = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    vsum = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)  # label smoothing: Σ_j v_j over kept j
    for n0 in range(0, N, BLOCK_N):
        cols64, inb, keep, item = gathered_keep(n0, offs_n, rows64, rmask, N, n_table, IDX, MASK, HIT_NEG, hit_pos,
                                                stride_ir, stride_in, stride_mr, stride_mn, stride_hr, stride_hn,
                                                INDEXED, HAS_MASK, HAS_HITS)
        v, item_off, s = gathered_scores(q, rows64, rmask, cols64, keep, item, offs_d64, dmask, Q, NEG, LOG_Q, d,
                                         stride_qr, stride_qd, stride_nr, stride_nn, stride_nd, stride_lr, stride_ln,
                                         inv_tau, unit, INDEXED, HAS_LOG_Q, BLOCK_D, D_LOOP)
        if FROM_STATS:
            g = coef_s[:, None] * neg_phi(s, shift[:, None], margin, KIND, INTERPRET)
            if SMOOTH:
                g += (uni * scale)[:, None]
            g = tl.where(keep, g, 0.0)
            if D_LOOP:
                for d0 in range(0, d if (NEED_GQ or NEED_GN) else 0, BLOCK_D):
                    offs = d0 + offs_d64
                    dm = offs < d
                    if NEED_GQ:
                        gq_ptrs = GRAD_Q + rows64[:, None] * d + offs[None, :]
                        gq_mask = rmask[:, None] & dm[None, :]
                        v_k = gathered_vectors(NEG, item_off, keep, offs, dm, stride_nd)
                        tl.store(gq_ptrs, tl.load(gq_ptrs, mask=gq_mask) + tl.sum(g[:, :, None] * v_k, 1),
                                 mask=gq_mask)
                        tl.debug_barrier()  # the next tile's read of these rows sees the store (any thread layout)
                    if NEED_GN:
                        q_k = load_rows(Q, rows64, rmask, offs, dm, stride_qr, stride_qd)
                        write_item_grad(g[:, :, None] * q_k[:, None, :], GRAD_NEG, item, rows64, cols64, keep, inb,
                                        offs, dm, N, d, INDEXED)
            else:
                if NEED_GQ:
                    acc += tl.sum(g[:, :, None] * v, 1)
                if NEED_GN:
                    write_item_grad(g[:, :, None] * q[:, None, :], GRAD_NEG, item, rows64, cols64, keep, inb,
                                    offs_d64, dmask, N, d, INDEXED)
        else:
            cnt += tl.sum(keep.to(tl.int32), 1)
            m, a, b, alpha, phi = update_state(s, s_pos, m, a, b, margin, KIND, INTERPRET)
            if NEED_GQ:
                if KIND == 0:
                    acc = acc * alpha[:, None]
                acc += tl.sum(phi[:, :, None] * v, 1)
            if SMOOTH:
                ssum += kept_sum(s, SMOOTH)
                if NEED_GQ:
                    vsum += tl.sum(v, 1)  # v is 0 where not kept

    loss = s_pos
    if not FROM_STATS:
        loss, shift, coef, g_pos, uni = finalize(m, a, b, cnt, s_pos, ssum, log2_eps, lam, mu, beta, neg_weight,
                                                 smooth, z_loss, KIND, HAS_POS, HAS_EPS, NEG_SUM)
    store_row_outputs(rows64, rmask, offs_d64, dmask, d, acc, loss, shift, coef, g_pos, uni, vsum, scale,
                      Q=Q, stride_qr=stride_qr, stride_qd=stride_qd, POS=POS, stride_pr=stride_pr, stride_pd=stride_pd,
                      POS_IDX=POS_IDX, TABLE=NEG, stride_tr=stride_nr, stride_td=stride_nd, n_table=n_table,
                      LOSS=LOSS, GRAD_Q=GRAD_Q, GRAD_P=GRAD_P, ROW_SHIFT=ROW_SHIFT, ROW_COEF=ROW_COEF,
                      ROW_GPOS=ROW_GPOS, ROW_UNI=ROW_UNI, HAS_POS=HAS_POS, POS_FROM_TABLE=POS_FROM_TABLE,
                      NEED_GQ=NEED_GQ and not D_LOOP, NEED_GP=NEED_GP and not D_LOOP, SAVE_STATS=SAVE_STATS,
                      ACC_SCALED=FROM_STATS, STATS_SCALED=False, SMOOTH=SMOOTH)
    if SCATTER_POS:
        prow = tl.load(POS_IDX + rows64, mask=rmask, other=0).to(tl.int64)
        pmask = in_table(prow, rmask, n_table)
        if D_LOOP:
            for d0 in range(0, d, BLOCK_D):
                offs = d0 + offs_d64
                dm = offs < d
                tl.atomic_add(GRAD_NEG + prow[:, None] * d + offs[None, :],
                              (g_pos * scale)[:, None] * load_rows(Q, rows64, rmask, offs, dm, stride_qr, stride_qd),
                              mask=pmask[:, None] & dm[None, :])
        else:
            tl.atomic_add(GRAD_NEG + prow[:, None] * d + offs_d64[None, :], (g_pos * scale)[:, None] * q,
                          mask=pmask[:, None] & dmask[None, :])


@triton.jit
def looped_row_grads(rows64, rmask, offs_d64, d, g_pos_s, Q, stride_qr, stride_qd, POS, stride_pr, stride_pd,
                     POS_IDX, TABLE, stride_tr, stride_td, n_table, GRAD_Q, GRAD_P, HAS_POS: tl.constexpr,
                     POS_FROM_TABLE: tl.constexpr, NEED_GQ: tl.constexpr, NEED_GP: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """D_LOOP gradient pass, before the negatives: ∂/∂q_r ← g+_s·p_r (0 without a positive; the
    negatives' terms are added tile by tile) and ∂/∂p_r = g+_s·q_r, chunk by chunk."""
    for d0 in range(0, d if (NEED_GQ or NEED_GP) else 0, BLOCK_D):
        offs = d0 + offs_d64
        dm = offs < d
        out_off = rows64[:, None] * d + offs[None, :]
        out_mask = rmask[:, None] & dm[None, :]
        if NEED_GQ:
            gq = tl.zeros([rows64.shape[0], BLOCK_D], dtype=tl.float32)
            if HAS_POS:
                gq += g_pos_s[:, None] * positive_vectors(POS, POS_IDX, TABLE, rows64, rmask, offs, dm, stride_pr,
                                                          stride_pd, stride_tr, stride_td, n_table, POS_FROM_TABLE)
            tl.store(GRAD_Q + out_off, gq, mask=out_mask)
        if NEED_GP:
            q_k = load_rows(Q, rows64, rmask, offs, dm, stride_qr, stride_qd)
            tl.store(GRAD_P + out_off, (g_pos_s[:, None] * q_k).to(GRAD_P.dtype.element_ty), mask=out_mask)
    tl.debug_barrier()

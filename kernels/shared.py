"""Shared layout: every row scores the same N items (a sampled pool, in-batch items, the catalogue).

Two kernels, modelled on flash-attention's forward and its dK/dV backward:

* :func:`shared_rows_kernel` — one program per block of rows. It streams the items in tiles,
  S = Q·Vᵀ/τ − logq on the tensor cores, folds each tile into the online row state
  (max/sum-exp or pointwise sums, see ``_rowmath``) and, in the same pass, accumulates the
  query gradient Σ_j φ_rj v_j (rescaled by e^{m_old − m_new} for the contrastive family). It
  writes the row loss, ∂/∂q, ∂/∂p and three floats per row (``row_shift``, ``row_coef``,
  ``row_gpos``) for the item pass.
* :func:`shared_items_kernel` — one program per block of items (column-parallel). It walks
  every row block, recomputes the score tile with the saved row statistics, forms
  G = coef·φ(S) (plus g+ on the column of each row's positive when positives are table rows,
  ``pos_idx``), and accumulates ∂/∂V = Gᵀ·Q. Each item block is owned by one program, so the
  result is deterministic without atomics.

Neither kernel writes an R×N tile to memory.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._rowmath import finalize, init_state, load_block, mm, neg_phi, positive_score, store_row_outputs, update_state


@triton.jit
def shared_scores(dots, r_b, r_in, c_b, c_in, LOG_Q, MASK, HIT_NEG, hit_pos_b, stride_mr, stride_mn, inv_tau,
                  HAS_LOG_Q: tl.constexpr, MASK_MODE: tl.constexpr, HAS_HITS: tl.constexpr):
    """Scores s = <q_r, v_j>/τ − logq_j from a tile of dot products (−inf where excluded) and the
    keep mask. The tile may be [rows, items] or [items, rows]: r_b/c_b are the int64 row/item
    indices and r_in/c_in their bounds, shaped to broadcast against it ([BR, 1] and [1, BN], or
    the transposes); hit_pos_b are the rows' positive ids, shaped like r_b.

    MASK_MODE: 0 none, 1 neg_mask [N], 2 neg_mask [R, N]; HAS_HITS excludes j with
    hit_neg_ids[j] == hit_pos_ids[r] (accidental hits, the in-batch diagonal).
    """
    s = dots * inv_tau
    if HAS_LOG_Q:
        s -= tl.load(LOG_Q + c_b, mask=c_in, other=0.0).to(tl.float32)
    keep = r_in & c_in
    if MASK_MODE == 1:
        keep &= tl.load(MASK + c_b * stride_mn, mask=c_in, other=1) == 0
    if MASK_MODE == 2:
        keep &= tl.load(MASK + r_b * stride_mr + c_b * stride_mn, mask=keep, other=1) == 0
    if HAS_HITS:
        keep &= hit_pos_b != tl.load(HIT_NEG + c_b, mask=c_in, other=0)
    return tl.where(keep, s, float("-inf")), keep


@triton.jit
def shared_rows_kernel(
    Q, NEG, POS, POS_IDX, LOG_Q, POS_LOG_Q, MASK, HIT_POS, HIT_NEG, ROW_SCALE,
    LOSS, GRAD_Q, GRAD_P, ROW_SHIFT, ROW_COEF, ROW_GPOS,
    R, N, d, stride_qr, stride_qd, stride_nn, stride_nd, stride_pr, stride_pd, stride_mr, stride_mn,
    inv_tau, log_eps, lam, mu, beta, margin, neg_weight,
    KIND: tl.constexpr, HAS_POS: tl.constexpr, POS_FROM_TABLE: tl.constexpr, HAS_EPS: tl.constexpr,
    HAS_LOG_Q: tl.constexpr, HAS_POS_LOG_Q: tl.constexpr, MASK_MODE: tl.constexpr, HAS_HITS: tl.constexpr,
    NEG_SUM: tl.constexpr, NEED_GQ: tl.constexpr, NEED_GP: tl.constexpr, SAVE_STATS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DT: tl.constexpr,
    EMULATE_DOT: tl.constexpr,
):
    """Rows r of one block: s_rj = <q_r, v_j>/τ − logq_j over all N items, streamed.

    Online state per row (m, a, b), count n_r, and acc_r = Σ_j φ_rj v_j with the contrastive
    rescaling acc ← acc·e^{m_old − m_new}; at the end ∂L/∂q_r = (coef_r acc_r + g+_r p_r)·scale_r/τ.
    """
    rows64, rmask, offs_d64, dmask, q_raw = load_block(Q, tl.program_id(0), R, d, stride_qr, stride_qd, BLOCK_R,
                                                       BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    if HAS_POS:
        s_pos = positive_score(q_raw.to(tl.float32), POS, POS_IDX, NEG, rows64, rmask, offs_d64, dmask, stride_pr,
                               stride_pd, stride_nn, stride_nd, POS_LOG_Q, inv_tau, POS_FROM_TABLE, HAS_POS_LOG_Q)
    else:
        s_pos = tl.zeros([BLOCK_R], dtype=tl.float32)
    hit_pos = s_pos  # placeholder, replaced when accidental hits are removed
    if HAS_HITS:
        hit_pos = tl.load(HIT_POS + rows64, mask=rmask, other=0)

    m, a, b = init_state(s_pos, log_eps, KIND, HAS_EPS)
    cnt = tl.zeros([BLOCK_R], dtype=tl.int32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols64 = n0 + offs_n.to(tl.int64)
        cmask = cols64 < N
        v = tl.load(NEG + cols64[:, None] * stride_nn + offs_d64[None, :] * stride_nd,
                    mask=cmask[:, None] & dmask[None, :], other=0.0)
        s, keep = shared_scores(mm(q_raw, tl.trans(v), DOT_DT, EMULATE_DOT), rows64[:, None], rmask[:, None],
                                cols64[None, :], cmask[None, :], LOG_Q, MASK, HIT_NEG, hit_pos[:, None], stride_mr,
                                stride_mn, inv_tau, HAS_LOG_Q, MASK_MODE, HAS_HITS)
        cnt += tl.sum(keep.to(tl.int32), 1)
        m, a, b, alpha, phi = update_state(s, s_pos, m, a, b, margin, KIND)
        if NEED_GQ:
            if KIND == 0:
                acc = acc * alpha[:, None]
            acc += mm(phi, v, DOT_DT, EMULATE_DOT)

    loss, shift, coef, g_pos = finalize(m, a, b, cnt, s_pos, log_eps, lam, mu, beta, neg_weight, KIND, HAS_POS,
                                        HAS_EPS, NEG_SUM)
    scale = tl.zeros([BLOCK_R], dtype=tl.float32)
    if NEED_GQ or NEED_GP or SAVE_STATS:
        scale = tl.load(ROW_SCALE + rows64, mask=rmask, other=0.0).to(tl.float32) * inv_tau
    store_row_outputs(rows64, rmask, offs_d64, dmask, acc, loss, shift, coef, g_pos, scale, d, Q, POS, POS_IDX, NEG,
                      stride_qr, stride_qd, stride_pr, stride_pd, stride_nn, stride_nd, LOSS, GRAD_Q, GRAD_P,
                      ROW_SHIFT, ROW_COEF, ROW_GPOS, HAS_POS, POS_FROM_TABLE, NEED_GQ, NEED_GP, SAVE_STATS, False)


@triton.jit
def shared_items_kernel(
    Q, NEG, POS_IDX, LOG_Q, MASK, HIT_POS, HIT_NEG, ROW_SHIFT, ROW_COEF, ROW_GPOS, GRAD_NEG,
    R, N, d, stride_qr, stride_qd, stride_nn, stride_nd, stride_mr, stride_mn, inv_tau, margin,
    KIND: tl.constexpr, POS_FROM_TABLE: tl.constexpr, HAS_LOG_Q: tl.constexpr, MASK_MODE: tl.constexpr,
    HAS_HITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DT: tl.constexpr, EMULATE_DOT: tl.constexpr,
):
    """Items j of one block: ∂/∂v_j = Σ_r G_jr q_r with G_jr = row_coef_r·φ(s_rj; row_shift_r)
    (+ row_gpos_r where pos_idx_r = j). The transposed score tile Sᵀ = V·Qᵀ [items, rows] is
    recomputed for every row block, so both products have the items as their M dimension."""
    cols64, cmask, offs_d64, dmask, v = load_block(NEG, tl.program_id(0), N, d, stride_nn, stride_nd, BLOCK_N,
                                                   BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows64 = r0 + offs_r.to(tl.int64)
        rmask = rows64 < R
        q = tl.load(Q + rows64[:, None] * stride_qr + offs_d64[None, :] * stride_qd,
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        hit_pos = rows64
        if HAS_HITS:
            hit_pos = tl.load(HIT_POS + rows64, mask=rmask, other=0)
        s, keep = shared_scores(mm(v, tl.trans(q), DOT_DT, EMULATE_DOT), rows64[None, :], rmask[None, :],
                                cols64[:, None], cmask[:, None], LOG_Q, MASK, HIT_NEG, hit_pos[None, :], stride_mr,
                                stride_mn, inv_tau, HAS_LOG_Q, MASK_MODE, HAS_HITS)
        shift = tl.load(ROW_SHIFT + rows64, mask=rmask, other=0.0)
        coef = tl.load(ROW_COEF + rows64, mask=rmask, other=0.0)
        g = tl.where(keep, coef[None, :] * neg_phi(s, shift[None, :], margin, KIND), 0.0)
        if POS_FROM_TABLE:
            pos_col = tl.load(POS_IDX + rows64, mask=rmask, other=-1)
            g_pos = tl.load(ROW_GPOS + rows64, mask=rmask, other=0.0)
            g += tl.where(pos_col[None, :] == cols64[:, None], g_pos[None, :], 0.0)
        acc += mm(g, q, DOT_DT, EMULATE_DOT)
    tl.store(GRAD_NEG + cols64[:, None] * d + offs_d64[None, :], acc, mask=cmask[:, None] & dmask[None, :])

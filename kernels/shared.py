"""Shared layout: every row scores the same N items (a sampled pool, in-batch items, the catalogue).

Two kernels, modelled on flash-attention's forward and its dK/dV backward:

* :func:`shared_rows_kernel` — one program per block of rows. It streams the items in tiles,
  S = Q·Vᵀ on the tensor cores, scaled in one fused multiply-add into the row state's units
  (log2(e)/τ for the contrastive family, which then exponentiates with ``exp2``) plus a per-item
  bias (−logq, −inf past N or under a [N] mask), folds each tile into the online row state
  (max/sum-exp or pointwise sums, see ``_rowmath``) and, in the same pass, accumulates the query
  gradient Σ_j φ_rj v_j (rescaled by 2^{m_old − m_new} for the contrastive family). Per-(row, item)
  work beyond that — an [R, N] mask, accidental hits, and the count n_r they change — is compiled
  in only when such an option is on; otherwise n_r is counted once per item tile. It writes the row
  loss, ∂/∂q, ∂/∂p and three floats per row (``row_shift``, ``row_coef``, ``row_gpos``) for the
  item pass (a fourth, ``row_uni``, with label smoothing), and the largest |row_coef|, |row_gpos|,
  |row_uni| (one float, ``coef_max``, by atomic max). Label smoothing (SMOOTH) adds Σ_j t_rj and
  Σ_j v_j over the kept candidates (one more MMA per tile, with the keep indicator).
* :func:`shared_items_kernel` — one program per block of items (column-parallel). It walks
  every row block, recomputes the score tile with the saved row statistics, forms
  G = coef·φ(S) (plus g+ on the column of each row's positive when positives are table rows,
  ``pos_idx``) divided by ``coef_max``, so that the 16-bit MMA operand lies in [−1, 1] (the raw
  coefficient, ≈ 1/(Σexp·R·τ) at catalogue scale, is below fp16's smallest subnormal), and
  accumulates ∂/∂V = coef_max·(G/coef_max)ᵀ·Q in fp32. Each item block is owned by one program, so
  the result is deterministic without atomics.

Small R (flash-decoding): when the row blocks are at most half the SMs, the rows pass runs as a
grid (row blocks, S) with SPLIT, each program streaming one contiguous range of item tiles into fp32
partials (``_rowmath.save_partial``), and a second launch of the same template with MERGE folds
them in a fixed order and finishes the rows with the unsplit pass's epilogue. The items pass
keeps a 1-D grid over item blocks: every resident program walks Q in the same order, so there is
nothing a grouped program order would regroup (docs/roofline.md, "Program order").

Both passes have the tile's first dimension (rows, items) as the MMA M dimension, ≥ 64 for 16-bit
inputs so that sm_90 runs warp-group MMA (``kernels/config.py``). Neither writes an R×N tile to
memory.

Any d: up to 256 (16-bit) / 128 (fp32) the feature dimension lives in one register tile
(BLOCK_D = next_pow2(d)). Beyond, ``D_LOOP``: scores S = Σ_k Q_k·V_kᵀ over K chunks of BLOCK_DK
columns (``_rowmath.looped_dot``, fp32, a fixed order; column masks only when BLOCK_DK does not
divide d, ``EVEN_K``), and the gradient accumulator cut into output chunks of BLOCK_D columns,
one per program along an extra grid axis (rows pass: axis 2, items pass: axis 1). Each output-chunk
program recomputes the scores over all of d; the per-row values it derives are the same bits in
every chunk and only chunk 0 stores them (docs/roofline.md, "Shared layout: a K loop over d").
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._rowmath import (
    chunk_block,
    finalize,
    init_state,
    kept_sum,
    load_block,
    looped_dot,
    looped_positive_score,
    merge_partials,
    mm,
    neg_phi,
    positive_score,
    save_partial,
    score_unit,
    store_row_outputs,
    update_state,
)


@triton.jit
def item_bias(cols64, cmask, LOG_Q, MASK, stride_mn, unit, HAS_LOG_Q: tl.constexpr, MASK_MODE: tl.constexpr):
    """The per-item additive score term in the state's units: −logq_j·unit, −inf past N or where a
    [N] mask (MASK_MODE 1) excludes the item."""
    bias = tl.zeros(cols64.shape, dtype=tl.float32)
    if HAS_LOG_Q:
        bias -= tl.load(LOG_Q + cols64, mask=cmask, other=0.0).to(tl.float32) * unit
    keep = cmask
    if MASK_MODE == 1:
        keep &= tl.load(MASK + cols64 * stride_mn, mask=cmask, other=1) == 0
    return tl.where(keep, bias, float("-inf"))


@triton.jit
def pair_keep(r_b, r_in, c_b, c_in, MASK, HIT_NEG, hit_pos_b, stride_mr, stride_mn, MASK_MODE: tl.constexpr,
              HAS_HITS: tl.constexpr):
    """Per-(row, item) exclusions, True = kept: an [R, N] mask (MASK_MODE 2) and accidental hits
    (hit_neg_ids[j] == hit_pos_ids[r], the in-batch diagonal). The tile may be [rows, items] or
    [items, rows]: r_b/c_b are the int64 row/item indices and r_in/c_in their bounds, shaped to
    broadcast against it; hit_pos_b are the rows' positive ids, shaped like r_b."""
    keep = r_in & c_in
    if MASK_MODE == 2:
        keep &= tl.load(MASK + r_b * stride_mr + c_b * stride_mn, mask=keep, other=1) == 0
    if HAS_HITS:
        keep &= hit_pos_b != tl.load(HIT_NEG + c_b, mask=c_in, other=0)
    return keep


@triton.jit
def shared_rows_kernel(
    Q, NEG, POS, POS_IDX, LOG_Q, POS_LOG_Q, MASK, HIT_POS, HIT_NEG, ROW_SCALE,
    LOSS, GRAD_Q, GRAD_P, ROW_SHIFT, ROW_COEF, ROW_GPOS, ROW_UNI, COEF_MAX, WS, WS_ACC, WS_VSUM,
    R, N, d, split_n, n_splits, stride_qr, stride_qd, stride_nn, stride_nd, stride_pr, stride_pd, stride_mr,
    stride_mn, inv_tau, log2_eps, lam, mu, beta, margin, neg_weight, smooth, z_loss,
    KIND: tl.constexpr, HAS_POS: tl.constexpr, POS_FROM_TABLE: tl.constexpr, HAS_EPS: tl.constexpr,
    HAS_LOG_Q: tl.constexpr, HAS_POS_LOG_Q: tl.constexpr, MASK_MODE: tl.constexpr, HAS_HITS: tl.constexpr,
    NEG_SUM: tl.constexpr, NEED_GQ: tl.constexpr, NEED_GP: tl.constexpr, SAVE_STATS: tl.constexpr,
    SMOOTH: tl.constexpr, SPLIT: tl.constexpr, MERGE: tl.constexpr, LAZY_TH: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DT: tl.constexpr,
    INTERPRET: tl.constexpr, D_LOOP: tl.constexpr = False, BLOCK_DK: tl.constexpr = 16, EVEN_K: tl.constexpr = True,
):
    """Rows r of block program_id(0): t_rj = (<q_r, v_j>/τ − logq_j)·unit over the items, streamed.

    Online state per row (m, a, b), count n_r, and acc_r = Σ_j φ_rj v_j with the contrastive
    rescaling acc ← acc·2^{m_old − m_new} (with LAZY_TH > 0 only on the tiles where some row's
    reference max moved, see ``_rowmath.update_state``); at the end ∂L/∂q_r = (coef_r acc_r +
    g+_r p_r)·scale_r/τ.

    Small R (flash-decoding), two launches of this template. SPLIT: program (block, s) =
    (program_id(0), program_id(1)) streams only items [s·split_n, (s + 1)·split_n) from the empty
    state and stores its partial state (``save_partial``). MERGE: a 1-D grid over (smaller) row
    blocks, no item loop; each row starts from the positive's term, folds the ``n_splits`` partials
    in the fixed order s = 0, 1, … (``merge_partials``: no atomics, bit-identical run to run) and
    finishes as the unsplit pass does. The SPLIT grid is (row blocks, S) and CUDA issues
    program_id(0) fastest: the programs resident together are the row blocks of the same item
    range (split-major), so each range of V is fetched from HBM about once and served to every row
    block from L2, while the re-read operand is the small Q block.

    D_LOOP (d beyond the register tile): program (block, s, o) owns output chunk o — columns
    [o·BLOCK_D, (o + 1)·BLOCK_D) of ∂q (and of ∂p, Σ_j v_j): its scores are S = Σ_k Q_k·V_kᵀ over K
    chunks of BLOCK_DK (``looped_dot``, same order in every program), so the row state and loss are
    bit-identical across o and only o = 0 writes them (loss, row stats, coef_max, split state).
    MERGE with D_LOOP: program (block, 0, o) folds chunk o of the partial accumulators.
    """
    if D_LOOP:  # q is read in K chunks; the first output chunk writes the per-row values
        rows64, rmask, offs_d64, dmask = chunk_block(tl.program_id(0), R, tl.program_id(2), d, BLOCK_R, BLOCK_D)
        stats_mask = rmask & ((rows64 * 0 + tl.program_id(2)) == 0)  # (a block: the interpreter's masks)
    else:
        rows64, rmask, offs_d64, dmask, q_raw = load_block(Q, tl.program_id(0), R, d, stride_qr, stride_qd, BLOCK_R,
                                                           BLOCK_D)
        stats_mask = None  # every program writes its rows' values
    if HAS_POS and D_LOOP:
        s_pos = looped_positive_score(Q, POS, POS_IDX, NEG, rows64, rmask, d, stride_qr=stride_qr,
                                      stride_qd=stride_qd, stride_pr=stride_pr, stride_pd=stride_pd,
                                      stride_tr=stride_nn, stride_td=stride_nd, n_table=N, POS_LOG_Q=POS_LOG_Q,
                                      inv_tau=inv_tau, POS_FROM_TABLE=POS_FROM_TABLE, HAS_POS_LOG_Q=HAS_POS_LOG_Q,
                                      BLOCK_DK=BLOCK_DK)
    elif HAS_POS:
        s_pos = positive_score(q_raw.to(tl.float32), POS, POS_IDX, NEG, rows64, rmask, offs_d64, dmask, stride_pr,
                               stride_pd, stride_tr=stride_nn, stride_td=stride_nd, n_table=N, POS_LOG_Q=POS_LOG_Q,
                               inv_tau=inv_tau, POS_FROM_TABLE=POS_FROM_TABLE, HAS_POS_LOG_Q=HAS_POS_LOG_Q)
    else:
        s_pos = tl.zeros([BLOCK_R], dtype=tl.float32)
    m, a, b = init_state(s_pos, log2_eps, KIND, HAS_EPS and not SPLIT)  # split: the merge adds the positive
    if MERGE:
        m, a, b, cnt, ssum, acc, vsum = merge_partials(WS, WS_ACC, WS_VSUM, n_splits, R, rows64, rmask, offs_d64,
                                                       dmask, d, m, a, b, KIND, NEED_GQ, SMOOTH, BLOCK_D,
                                                       INTERPRET)
    else:
        n_lo = 0
        n_hi = N
        if SPLIT:
            n_lo = tl.program_id(1) * split_n
            n_hi = tl.minimum(N, n_lo + split_n)
        offs_n = tl.arange(0, BLOCK_N)
        unit = score_unit(KIND)
        score_mul = inv_tau * unit
        hit_pos = s_pos  # placeholder, replaced when accidental hits are removed
        if HAS_HITS:
            hit_pos = tl.load(HIT_POS + rows64, mask=rmask, other=0)
        cnt = tl.zeros([BLOCK_R], dtype=tl.int32)  # per-row count (pair masks), else one count for all rows
        cnt_items = 0
        ssum = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        vsum = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)  # label smoothing: Σ_j v_j over kept j
        vcol = tl.zeros([BLOCK_D], dtype=tl.float32)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            cols64 = n0 + offs_n.to(tl.int64)
            cmask = cols64 < n_hi
            v = tl.load(NEG + cols64[:, None] * stride_nn + offs_d64[None, :] * stride_nd,
                        mask=cmask[:, None] & dmask[None, :], other=0.0)  # (D_LOOP: the output chunk)
            bias = item_bias(cols64, cmask, LOG_Q, MASK, stride_mn, unit, HAS_LOG_Q, MASK_MODE)
            if D_LOOP:
                s = looped_dot(Q, NEG, rows64, rmask, cols64, cmask, d, stride_ar=stride_qr, stride_ad=stride_qd,
                               stride_br=stride_nn, stride_bd=stride_nd, BLOCK_DK=BLOCK_DK, EVEN_K=EVEN_K,
                               DOT_DT=DOT_DT, INTERPRET=INTERPRET)
            else:
                s = mm(q_raw, tl.trans(v), DOT_DT, INTERPRET)
            s = s * score_mul + bias[None, :]
            if MASK_MODE == 2 or HAS_HITS:
                keep = pair_keep(rows64[:, None], rmask[:, None], cols64[None, :], cmask[None, :], MASK, HIT_NEG,
                                 hit_pos[:, None], stride_mr, stride_mn, MASK_MODE, HAS_HITS)
                s = tl.where(keep, s, float("-inf"))
                cnt += tl.sum((s > float("-inf")).to(tl.int32), 1)  # kept pairs of kept columns (the bias)
            else:
                cnt_items += tl.sum((bias > float("-inf")).to(tl.int32), 0)
            m, a, b, alpha, phi = update_state(s, s_pos, m, a, b, margin, KIND, INTERPRET, LAZY_TH)
            if NEED_GQ:
                if KIND == 0:
                    if LAZY_TH > 0:
                        if tl.min(alpha, 0) < 1.0:  # a reference max moved in this tile
                            acc = acc * alpha[:, None]
                    else:
                        acc = acc * alpha[:, None]
                acc += mm(phi, v, DOT_DT, INTERPRET)
            if SMOOTH:
                ssum += kept_sum(s, SMOOTH)
                if NEED_GQ:
                    if MASK_MODE == 2 or HAS_HITS:  # per-row kept sets: one more MMA with the keep indicator
                        vsum += mm(tl.where(s > float("-inf"), 1.0, 0.0), v, DOT_DT, INTERPRET)
                    else:  # one kept set for every row: a column sum of the item tile
                        vcol += tl.sum(tl.where((bias > float("-inf"))[:, None], v.to(tl.float32), 0.0), 0)
        cnt += cnt_items
        if SMOOTH and not (MASK_MODE == 2 or HAS_HITS):
            vsum += vcol[None, :]

    if SPLIT:
        save_partial(WS, WS_ACC, WS_VSUM, tl.program_id(1), R, rows64, rmask, offs_d64, dmask, d, m, a, b, cnt, ssum,
                     acc, vsum, NEED_GQ, SMOOTH, STATE_MASK=stats_mask)
    else:
        loss, shift, coef, g_pos, uni = finalize(m, a, b, cnt, s_pos, ssum, log2_eps, lam, mu, beta, neg_weight,
                                                 smooth, z_loss, KIND, HAS_POS, HAS_EPS, NEG_SUM)
        scale = tl.zeros([BLOCK_R], dtype=tl.float32)
        if NEED_GQ or NEED_GP or SAVE_STATS:
            scale = tl.load(ROW_SCALE + rows64, mask=rmask, other=0.0).to(tl.float32) * inv_tau
        store_row_outputs(rows64, rmask, offs_d64, dmask, d, acc, loss, shift, coef, g_pos, uni, vsum, scale,
                          Q=Q, stride_qr=stride_qr, stride_qd=stride_qd, POS=POS, stride_pr=stride_pr,
                          stride_pd=stride_pd, POS_IDX=POS_IDX, TABLE=NEG, stride_tr=stride_nn, stride_td=stride_nd,
                          n_table=N, LOSS=LOSS, GRAD_Q=GRAD_Q, GRAD_P=GRAD_P, ROW_SHIFT=ROW_SHIFT,
                          ROW_COEF=ROW_COEF, ROW_GPOS=ROW_GPOS, ROW_UNI=ROW_UNI, HAS_POS=HAS_POS,
                          POS_FROM_TABLE=POS_FROM_TABLE, NEED_GQ=NEED_GQ, NEED_GP=NEED_GP, SAVE_STATS=SAVE_STATS,
                          ACC_SCALED=False, STATS_SCALED=True, SMOOTH=SMOOTH, STATS_MASK=stats_mask)
        if SAVE_STATS:
            big = tl.maximum(tl.maximum(tl.abs(coef * scale), tl.abs(g_pos * scale)), tl.abs(uni * scale))
            big_mask = rmask
            if D_LOOP:  # the first output chunk's programs only (coef_max starts at 0)
                big_mask = stats_mask
            tl.atomic_max(COEF_MAX, tl.max(tl.where(big_mask, big, 0.0), 0))


@triton.jit
def shared_items_kernel(
    Q, NEG, POS_IDX, LOG_Q, MASK, HIT_POS, HIT_NEG, ROW_SHIFT, ROW_COEF, ROW_GPOS, ROW_UNI, COEF_MAX, GRAD_NEG,
    R, N, d, stride_qr, stride_qd, stride_nn, stride_nd, stride_mr, stride_mn, inv_tau, margin,
    KIND: tl.constexpr, POS_FROM_TABLE: tl.constexpr, HAS_LOG_Q: tl.constexpr, MASK_MODE: tl.constexpr,
    HAS_HITS: tl.constexpr, SMOOTH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_DT: tl.constexpr, INTERPRET: tl.constexpr, D_LOOP: tl.constexpr = False,
    BLOCK_DK: tl.constexpr = 16, EVEN_K: tl.constexpr = True,
):
    """Items j of one block: ∂/∂v_j = Σ_r G_jr q_r with G_jr = row_coef_r·φ(t_rj; row_shift_r)
    (+ row_gpos_r where pos_idx_r = j). The transposed score tile Tᵀ = V·Qᵀ [items, rows] is
    recomputed for every row block, so both products have the items as their M dimension; the
    item bias is computed once, outside the loop. D_LOOP: program (block, o) owns columns
    [o·BLOCK_D, (o + 1)·BLOCK_D) of ∂V and recomputes Tᵀ over K chunks of BLOCK_DK (``looped_dot``)."""
    if D_LOOP:
        cols64, cmask, offs_d64, dmask = chunk_block(tl.program_id(0), N, tl.program_id(1), d, BLOCK_N, BLOCK_D)
    else:
        cols64, cmask, offs_d64, dmask, v = load_block(NEG, tl.program_id(0), N, d, stride_nn, stride_nd, BLOCK_N,
                                                       BLOCK_D)
    unit = score_unit(KIND)
    score_mul = inv_tau * unit
    bias = item_bias(cols64, cmask, LOG_Q, MASK, stride_mn, unit, HAS_LOG_Q, MASK_MODE)
    coef_max = tl.load(COEF_MAX)
    inv_max = tl.where(coef_max > 0.0, 1.0 / coef_max, 0.0)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows64 = r0 + offs_r.to(tl.int64)
        rmask = rows64 < R
        q = tl.load(Q + rows64[:, None] * stride_qr + offs_d64[None, :] * stride_qd,
                    mask=rmask[:, None] & dmask[None, :], other=0.0)  # (D_LOOP: the output chunk)
        if D_LOOP:
            s = looped_dot(NEG, Q, cols64, cmask, rows64, rmask, d, stride_ar=stride_nn, stride_ad=stride_nd,
                           stride_br=stride_qr, stride_bd=stride_qd, BLOCK_DK=BLOCK_DK, EVEN_K=EVEN_K, DOT_DT=DOT_DT,
                           INTERPRET=INTERPRET)
        else:
            s = mm(v, tl.trans(q), DOT_DT, INTERPRET)
        s = s * score_mul + bias[:, None]
        if MASK_MODE == 2 or HAS_HITS:
            hit_pos = rows64
            if HAS_HITS:
                hit_pos = tl.load(HIT_POS + rows64, mask=rmask, other=0)
            keep = pair_keep(rows64[None, :], rmask[None, :], cols64[:, None], cmask[:, None], MASK, HIT_NEG,
                             hit_pos[None, :], stride_mr, stride_mn, MASK_MODE, HAS_HITS)
            s = tl.where(keep, s, float("-inf"))
        # rows past R: shift +inf makes φ = 0 (and coef 0), no per-element row mask needed
        shift = tl.load(ROW_SHIFT + rows64, mask=rmask, other=float("inf"))
        coef = tl.load(ROW_COEF + rows64, mask=rmask, other=0.0) * inv_max
        g = coef[None, :] * neg_phi(s, shift[None, :], margin, KIND, INTERPRET)
        if SMOOTH:  # label smoothing's −α/n_r on every kept candidate
            uni = tl.load(ROW_UNI + rows64, mask=rmask, other=0.0) * inv_max
            g += tl.where(s > float("-inf"), uni[None, :], 0.0)
        if POS_FROM_TABLE:
            pos_col = tl.load(POS_IDX + rows64, mask=rmask, other=-1)
            g_pos = tl.load(ROW_GPOS + rows64, mask=rmask, other=0.0) * inv_max
            g += tl.where(pos_col[None, :] == cols64[:, None], g_pos[None, :], 0.0)
        acc += mm(g, q, DOT_DT, INTERPRET)
    tl.store(GRAD_NEG + cols64[:, None] * d + offs_d64[None, :], acc * coef_max, mask=cmask[:, None] & dmask[None, :])

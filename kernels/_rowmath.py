"""Row math shared by every kernel template: the per-kind formulas of SPEC §2, in fp32.

A row's negatives stream by in tiles ``s`` [rows, items] of scores (−inf = excluded). The state
of a row while they do is ``(m, a, b)``:

* contrastive (kind 0): scores are carried in log2 units, t = s·log2(e) (the kernels fold
  log2(e)/τ into the one multiply that scales the dot products, and exponentiate with ``exp2``):
  ``m`` is the running max of the log2-terms {t_rj} ∪ {log2 ε + t_r+} and ``a = Σ 2^{t − m}`` over
  them (online max/sum-exp, as in flash-attention); ``b`` is unused.
* pointwise (bpr 1, bce 2, ccl 3): ``a = Σ_j val(s_rj)`` (the negatives' loss terms) and
  ``b = Σ_j h(s_rj)`` with ``h = ∂val/∂s``; ``m`` is unused.

:func:`finalize` turns a state into the row loss and into gradient factors such that

    ∂L_r/∂s_rj = coef_r · φ(s_rj; shift_r),   ∂L_r/∂s_r+ = g_pos_r

with φ = 2^{t − shift} (contrastive, shift = final max in log2 units) or φ = h(s; s_r+) (pointwise,
natural units, shift = s_r+). :func:`score_unit` is the factor from s to the kind's units. Kernels
that must recompute scores (the item-side and gradient passes) only need ``(shift, coef, g_pos)``
per row (times the row scale/τ; a fourth, uni, with label smoothing): never an R×N buffer.
"""

from __future__ import annotations

import triton
import triton.language as tl

TINY: tl.constexpr = tl.constexpr(1.1754943508222875e-38)  # smallest normal fp32, as the torch backend
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def score_unit(KIND: tl.constexpr):
    """s → the units the row state uses: log2(e) for the contrastive family (exp2), 1 otherwise."""
    if KIND == 0:
        return LOG2E
    else:
        return 1.0


@triton.jit
def exp2(x, INTERPRET: tl.constexpr):
    """2^x in one MUFU.EX2: ``ex2.approx.ftz.f32`` (flush-to-zero; what ``tl.exp2`` lowers to is the
    non-ftz form, which ptxas wraps in a range test and two multiplies). 2^−inf = 0. The interpreter
    models the flush: a result below the smallest normal fp32 (x < −126) is 0, as on the GPU."""
    if INTERPRET:
        y = tl.exp2(x)
        y = tl.where(y < TINY, 0.0, y)
    else:
        y = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    return y


@triton.jit
def softplus(x):
    """log(1 + e^x) without overflow, exact for x = −inf, accurate for very negative x."""
    t = tl.exp(-tl.abs(x))
    log1p_t = tl.where(t < 1e-4, t * (1.0 - 0.5 * t), tl.log(1.0 + t))
    return tl.maximum(x, 0.0) + log1p_t


@triton.jit
def sigmoid(x):
    """σ(x) from t = e^{−|x|} (never overflows; one exp): 1/(1 + t) for x ≥ 0, t/(1 + t) otherwise.
    0 for x = −inf."""
    t = tl.exp(-tl.abs(x))
    return tl.where(x >= 0.0, 1.0, t) / (1.0 + t)


@triton.jit
def tf32_round(x):
    """fp32 → tf32 (10 explicit mantissa bits), to nearest, ties away: PTX ``cvt.rna.tf32.f32``."""
    return ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def tf32_truncate(x):
    """What a tf32 MMA reads from an fp32 register: the low 13 mantissa bits dropped."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def mm(a, b, DOT_DT: tl.constexpr, INTERPRET: tl.constexpr):
    """a @ b with an fp32 accumulator.

    bf16/fp16 (DOT_DT): both operands rounded to DOT_DT, one tensor-core MMA. fp32: the 3×TF32
    scheme (``input_precision="tf32x3"``): x = big + small with big = tf32(x), and
    a·b ≈ small_a·big_b + big_a·small_b + big_a·big_b on the tensor cores, ~fp32 accurate (the
    dropped small·small term is ~2⁻²² relative), without the register cost of IEEE FMA dots.

    INTERPRET (the CPU interpreter, whose ``tl.dot`` multiplies bf16 bit patterns as integers
    and ignores ``input_precision``) computes the same operand roundings explicitly and multiplies
    in fp32; products of bf16 or tf32 values are exact in fp32, so this is the tensor-core result
    up to the summation order. (The emulated 3×TF32 split follows the published scheme, big parts
    rounded, small parts truncated as an MMA reads them; Triton's own lowering was not compared
    bit for bit on a GPU.)
    """
    if tl.float32 == DOT_DT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        if INTERPRET:
            a_big = tf32_round(a)
            b_big = tf32_round(b)
            out = tl.dot(tf32_truncate(a - a_big), b_big, input_precision="ieee")
            out += tl.dot(a_big, tf32_truncate(b - b_big), input_precision="ieee")
            out += tl.dot(a_big, b_big, input_precision="ieee")
        else:
            out = tl.dot(a, b, input_precision="tf32x3")
    else:
        a = a.to(DOT_DT)
        b = b.to(DOT_DT)
        if INTERPRET:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            out = tl.dot(a, b)
    return out


@triton.jit
def item_terms(s, s_pos, margin, KIND: tl.constexpr):
    """Pointwise kinds: (val, h) = the negative's loss term and its derivative in s.

    bpr: softplus(s − s+), σ(s − s+);  bce: softplus(s), σ(s);  ccl: relu(s − m), [s − m > 0].
    Every term is 0 for an excluded negative (s = −inf).
    """
    if KIND == 1:
        x = s - s_pos
        val = softplus(x)
        h = sigmoid(x)
    elif KIND == 2:
        val = softplus(s)
        h = sigmoid(s)
    else:
        x = s - margin
        val = tl.maximum(x, 0.0)
        h = tl.where(x > 0.0, 1.0, 0.0)
    return val, h


@triton.jit
def init_state(s_pos, log2_eps, KIND: tl.constexpr, HAS_EPS: tl.constexpr):
    """Row state before any negative: the positive's log2-term log2 ε + t+ when it is in the LSE."""
    zero = tl.zeros_like(s_pos)
    if KIND == 0 and HAS_EPS:
        m = s_pos * LOG2E + log2_eps
        a = zero + 1.0
    else:
        m = zero + float("-inf")
        a = zero
    return m, a, zero


@triton.jit
def update_state(s, s_pos, m, a, b, margin, KIND: tl.constexpr, INTERPRET: tl.constexpr,
                 LAZY_TH: tl.constexpr = 0.0):
    """Fold a score tile s [rows, items] (in :func:`score_unit` units) into the row state.

    Returns (m, a, b, alpha, phi): a query-gradient accumulator Σ_j φ_rj v_j must be rescaled
    by alpha [rows] before adding this tile's Σ_j phi_rj v_j (alpha = 1 for pointwise kinds).

    LAZY_TH > 0 (contrastive, log2 units): ``m`` is a reference, not the running max — it moves
    (and alpha < 1) only for a row whose tile max exceeds it by more than LAZY_TH, FlashAttention-4
    style; otherwise alpha = 1 exactly, so a caller may skip the accumulator's rescale while every
    row of the tile has alpha = 1. Exact either way: a = Σ 2^{t − m} for the m returned, every
    t ≤ m + LAZY_TH, so φ ≤ 2^LAZY_TH (256 for 8: well inside bf16/fp16 for the MMA operand).
    """
    if KIND == 0:
        m_tile = tl.max(s, 1)
        if LAZY_TH > 0:
            m_new = tl.where(m_tile > m + LAZY_TH, m_tile, m)
        else:
            m_new = tl.maximum(m, m_tile)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = exp2(m - m_ref, INTERPRET)
        phi = exp2(s - m_ref[:, None], INTERPRET)
        a = a * alpha + tl.sum(phi, 1)
        m = m_new
    else:
        val, phi = item_terms(s, s_pos[:, None], margin, KIND)
        a += tl.sum(val, 1)
        b += tl.sum(phi, 1)
        alpha = tl.full(a.shape, 1.0, tl.float32)
    return m, a, b, alpha, phi


@triton.jit
def save_partial(WS, WS_ACC, WS_VSUM, split, R, rows64, rmask, offs_d64, dmask, d, m, a, b, cnt, ssum, acc, vsum,
                 NEED_GQ: tl.constexpr, SMOOTH: tl.constexpr, STATE_MASK=None):
    """Store the partial row state of one item range (split ``split`` of a split-N row pass) in fp32:
    WS [S, 5, R] holds (m, a, b, ssum, cnt — the int32 count bit-cast), WS_ACC / WS_VSUM [S, R, d]
    the query-gradient accumulator and label smoothing's Σ_j v_j (columns ``offs_d64``). O(S·R·d),
    never R×N. ``STATE_MASK`` (default ``rmask``) restricts the rows whose WS state this program writes
    (a K loop over d: only the first output chunk's program writes it)."""
    smask = rmask
    if STATE_MASK is not None:
        smask = STATE_MASK
    base = WS + split.to(tl.int64) * 5 * R + rows64
    tl.store(base, m, mask=smask)
    tl.store(base + R, a, mask=smask)
    tl.store(base + 2 * R, b, mask=smask)
    tl.store(base + 3 * R, ssum, mask=smask)
    tl.store(base + 4 * R, cnt.to(tl.float32, bitcast=True), mask=smask)
    if NEED_GQ:
        off = (split.to(tl.int64) * R + rows64)[:, None] * d + offs_d64[None, :]
        tl.store(WS_ACC + off, acc, mask=rmask[:, None] & dmask[None, :])
        if SMOOTH:
            tl.store(WS_VSUM + off, vsum, mask=rmask[:, None] & dmask[None, :])


@triton.jit
def merge_partials(WS, WS_ACC, WS_VSUM, n_splits, R, rows64, rmask, offs_d64, dmask, d, m, a, b,
                   KIND: tl.constexpr, NEED_GQ: tl.constexpr, SMOOTH: tl.constexpr, BLOCK_D: tl.constexpr,
                   INTERPRET: tl.constexpr):
    """Fold the ``n_splits`` partial states of :func:`save_partial` into the state (m, a, b) a row
    has before any negative (:func:`init_state`), in the fixed order s = 0, 1, … (deterministic).

    Contrastive: m = max(m, max_s m_s), a = a·2^{m_old − m} + Σ_s a_s·2^{m_s − m} and the same
    weights for the accumulators; pointwise kinds: plain sums. Returns (m, a, b, cnt, ssum, acc, vsum).

    The weights use the hot loops' flush-to-zero :func:`exp2`, not ``tl.exp2`` (a decision, tested by
    tests/test_triton_split.py::test_split_merge_flushes_subnormal_weights_like_the_unsplit_pass):
    a split whose max is more than 126 log2 units below the row's then contributes exactly 0, as
    its terms do in the unsplit pass, where each 2^{t − m} (or the rescale of the running sums)
    flushes; with the non-ftz form the split run kept subnormal ∂q terms (≈ 1e-40) that the unsplit
    run has as zeros. Normal weights are the same in both forms.
    """
    cnt = tl.zeros(rows64.shape, dtype=tl.int32)
    ssum = tl.zeros(rows64.shape, dtype=tl.float32)
    acc = tl.zeros([rows64.shape[0], BLOCK_D], dtype=tl.float32)
    vsum = tl.zeros([rows64.shape[0], BLOCK_D], dtype=tl.float32)
    out_mask = rmask[:, None] & dmask[None, :]
    m_all = m
    if KIND == 0:
        for s in range(0, n_splits):
            m_all = tl.maximum(m_all, tl.load(WS + rows64 + s * (5 * R), mask=rmask, other=0.0))
        m_ref = tl.where(m_all == float("-inf"), 0.0, m_all)
        a = a * exp2(m - m_ref, INTERPRET)
    for s in range(0, n_splits):
        base = WS + rows64 + s * (5 * R)  # int64: rows64; s·5·R < 2^31 for any split plan
        w = tl.full(rows64.shape, 1.0, tl.float32)
        if KIND == 0:
            w = exp2(tl.load(base, mask=rmask, other=float("-inf")) - m_ref, INTERPRET)
        a += tl.load(base + R, mask=rmask, other=0.0) * w
        b += tl.load(base + 2 * R, mask=rmask, other=0.0)
        ssum += tl.load(base + 3 * R, mask=rmask, other=0.0)
        cnt += tl.load(base + 4 * R, mask=rmask, other=0.0).to(tl.int32, bitcast=True)
        if NEED_GQ:
            off = (rows64 + s * R)[:, None] * d + offs_d64[None, :]
            acc += tl.load(WS_ACC + off, mask=out_mask, other=0.0) * w[:, None]
            if SMOOTH:
                vsum += tl.load(WS_VSUM + off, mask=out_mask, other=0.0)
    return m_all, a, b, cnt, ssum, acc, vsum


@triton.jit
def neg_phi(s, shift, margin, KIND: tl.constexpr, INTERPRET: tl.constexpr):
    """φ(s; shift) such that ∂L/∂s = coef·φ, recomputed from a score tile (in :func:`score_unit`
    units, shift broadcast)."""
    if KIND == 0:
        phi = exp2(s - shift, INTERPRET)
    else:
        _, phi = item_terms(s, shift, margin, KIND)
    return phi


@triton.jit
def pointwise_coef(cnt, neg_weight, KIND: tl.constexpr, NEG_SUM: tl.constexpr):
    """Pointwise kinds: 1/n_r (1 with neg_sum), times the ccl negative weight w."""
    if NEG_SUM:
        coef = tl.full(cnt.shape, 1.0, tl.float32)
    else:
        coef = 1.0 / tl.maximum(cnt.to(tl.float32), 1.0)
    if KIND == 3:
        coef = coef * neg_weight
    return coef


@triton.jit
def finalize(m, a, b, cnt, s_pos, ssum, log2_eps, lam, mu, beta, neg_weight, smooth, z_loss, KIND: tl.constexpr,
             HAS_POS: tl.constexpr, HAS_EPS: tl.constexpr, NEG_SUM: tl.constexpr):
    """Row loss and gradient factors (loss, shift, coef, g_pos, uni), see the module docstring.

    contrastive (m in log2 units, lse = ln 2·(m + log2 a)), with label smoothing α = ``smooth``
    over the n_r candidates (``ssum`` = Σ_j t_rj of the kept ones, log2 units) and z-loss z:
    L = λ(lse − μ log n) + z·lse² − α·mean_j s_rj − (1 − α)·s+;
    ∂L/∂s_rj = coef·2^{t − m} + uni with coef = (λ + 2z·lse)/a and uni = −α/n;
    g+ = coef·ε·2^{t+ − m} − (1 − α); a row with n_r = 0 has loss 0 and zero gradient.
    bpr: L = a/n, g+ = −b/n;  bce: L = β softplus(−s+) + a/n, g+ = −β σ(−s+);
    ccl: L = relu(1 − s+) + w a/n, g+ = −[s+ < 1]  (n → 1 with neg_sum).
    """
    zero = tl.zeros_like(a)
    uni = zero
    if KIND == 0:
        has_neg = cnt > 0
        n = tl.maximum(cnt.to(tl.float32), 1.0)
        shift = tl.where(m == float("-inf"), 0.0, m)
        a_safe = tl.maximum(a, TINY)
        lse = LN2 * (shift + tl.log2(a_safe))
        loss = lam * (lse - mu * tl.log(n)) + z_loss * lse * lse - smooth * (ssum * LN2) / n
        if HAS_POS:
            loss -= (1.0 - smooth) * s_pos
        loss = tl.where(has_neg, loss, zero)
        coef = tl.where(has_neg, (lam + 2.0 * z_loss * lse) / a_safe, zero)
        uni = tl.where(has_neg, -smooth / n, zero)
        if HAS_POS:
            if HAS_EPS:
                g_pos = coef * tl.exp2(s_pos * LOG2E + log2_eps - shift) - (1.0 - smooth)
            else:
                g_pos = zero - (1.0 - smooth)
            g_pos = tl.where(has_neg, g_pos, zero)
        else:
            g_pos = zero
    else:
        coef = pointwise_coef(cnt, neg_weight, KIND, NEG_SUM)
        shift = s_pos
        loss = a * coef
        if KIND == 1:
            g_pos = -b * coef
        elif KIND == 2:
            loss += beta * softplus(-s_pos)
            g_pos = -beta * sigmoid(-s_pos)
        else:
            loss += tl.maximum(1.0 - s_pos, 0.0)
            g_pos = tl.where(s_pos < 1.0, -1.0, 0.0)
    return loss, shift, coef, g_pos, uni


@triton.jit
def kept_sum(s, SMOOTH: tl.constexpr):
    """Σ_j of a score tile's kept entries (−inf = excluded), per row; 0 without label smoothing."""
    if SMOOTH:
        out = tl.sum(tl.where(s > float("-inf"), s, 0.0), 1)
    else:
        out = tl.zeros([s.shape[0]], dtype=tl.float32)
    return out


@triton.jit
def load_block(X, pid, n_rows, d, stride_xr, stride_xd, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Block ``pid`` of the rows of a [n_rows, d] matrix: int64 row offsets, row mask, int64 feature
    offsets, feature mask and the tile [BLOCK, BLOCK_D] (zeros outside), in the input dtype."""
    rows64 = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows64 < n_rows
    offs_d64 = tl.arange(0, BLOCK_D).to(tl.int64)
    dmask = offs_d64 < d
    x = tl.load(X + rows64[:, None] * stride_xr + offs_d64[None, :] * stride_xd,
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    return rows64, rmask, offs_d64, dmask, x


@triton.jit
def in_table(idx, valid, n_table):
    """Index entries that point into a table of ``n_table`` rows; anything else (a padding id such as
    −100, a stray id) is treated as masked and never dereferenced."""
    return valid & (idx >= 0) & (idx < n_table)


@triton.jit
def positive_vectors(POS, POS_IDX, TABLE, rows64, rmask, offs_d64, dmask, stride_pr, stride_pd, stride_tr, stride_td,
                     n_table, POS_FROM_TABLE: tl.constexpr):
    """Positive vectors p_r [rows, D] in fp32: POS[r] or, with POS_FROM_TABLE, TABLE[POS_IDX[r]]
    (zeros where pos_idx is outside the table)."""
    if POS_FROM_TABLE:
        prow = tl.load(POS_IDX + rows64, mask=rmask, other=0).to(tl.int64)
        valid = in_table(prow, rmask, n_table)
        ptrs = TABLE + prow[:, None] * stride_tr + offs_d64[None, :] * stride_td
    else:
        valid = rmask
        ptrs = POS + rows64[:, None] * stride_pr + offs_d64[None, :] * stride_pd
    return tl.load(ptrs, mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)


@triton.jit
def positive_score(q, POS, POS_IDX, TABLE, rows64, rmask, offs_d64, dmask, stride_pr, stride_pd, stride_tr, stride_td,
                   n_table, POS_LOG_Q, inv_tau, POS_FROM_TABLE: tl.constexpr, HAS_POS_LOG_Q: tl.constexpr):
    """s_r+ = <q_r, p_r>/τ − logq⁺_r (q in fp32, natural units)."""
    p = positive_vectors(POS, POS_IDX, TABLE, rows64, rmask, offs_d64, dmask, stride_pr, stride_pd, stride_tr,
                         stride_td, n_table, POS_FROM_TABLE)
    s_pos = tl.sum(q * p, 1) * inv_tau
    if HAS_POS_LOG_Q:
        s_pos -= tl.load(POS_LOG_Q + rows64, mask=rmask, other=0.0).to(tl.float32)
    return s_pos


@triton.jit
def store_row_outputs(rows64, rmask, offs_d64, dmask, d, acc, loss, shift, coef, g_pos, uni, vsum, scale,
                      Q, stride_qr, stride_qd, POS, stride_pr, stride_pd, POS_IDX, TABLE, stride_tr, stride_td, n_table,
                      LOSS, GRAD_Q, GRAD_P, ROW_SHIFT, ROW_COEF, ROW_GPOS, ROW_UNI,
                      HAS_POS: tl.constexpr, POS_FROM_TABLE: tl.constexpr, NEED_GQ: tl.constexpr,
                      NEED_GP: tl.constexpr, SAVE_STATS: tl.constexpr, ACC_SCALED: tl.constexpr,
                      STATS_SCALED: tl.constexpr, SMOOTH: tl.constexpr, STATS_MASK=None):
    """Write the row loss, ∂/∂q_r = coef_s·acc + uni_s·vsum + g+_s·p_r, ∂/∂p_r = g+_s·q_r and the
    saved stats.

    ``scale`` [rows] is row_scale_r/τ; coef_s = coef·scale, g+_s = g_pos·scale, uni_s = uni·scale
    (label smoothing's uniform term, times ``vsum`` = Σ_j v_j over the row's kept candidates). With
    ACC_SCALED the accumulator already holds the scaled gradient (Σ_j g_rj v_j · scale). The saved
    stats are (shift, coef_s, g+_s, uni_s) with STATS_SCALED (an item pass of the same call consumes
    them), else (shift, coef, g_pos, uni) (a later gradient pass scales them by its own row scale). The loss is
    not written when LOSS is None (a gradient pass from saved stats). q_r and p_r are re-read here
    rather than kept in registers across the item loop. ``STATS_MASK`` (default ``rmask``) restricts
    the rows whose loss and stats this program writes (a K loop over d: the gradients of columns
    ``offs_d64`` come from every output chunk's program, the per-row values from the first).
    """
    smask = rmask
    if STATS_MASK is not None:
        smask = STATS_MASK
    if LOSS is not None:
        tl.store(LOSS + rows64, loss, mask=smask)
    coef_s = coef * scale
    g_pos_s = g_pos * scale
    out_mask = rmask[:, None] & dmask[None, :]
    out_off = rows64[:, None] * d + offs_d64[None, :]
    if NEED_GQ:
        if ACC_SCALED:
            gq = acc
        else:
            gq = acc * coef_s[:, None]
            if SMOOTH:
                gq += (uni * scale)[:, None] * vsum
        if HAS_POS:
            p = positive_vectors(POS, POS_IDX, TABLE, rows64, rmask, offs_d64, dmask, stride_pr, stride_pd,
                                 stride_tr, stride_td, n_table, POS_FROM_TABLE)
            gq += g_pos_s[:, None] * p
        tl.store(GRAD_Q + out_off, gq.to(GRAD_Q.dtype.element_ty), mask=out_mask)
    if NEED_GP:
        q = tl.load(Q + rows64[:, None] * stride_qr + offs_d64[None, :] * stride_qd, mask=out_mask, other=0.0)
        tl.store(GRAD_P + out_off, (g_pos_s[:, None] * q.to(tl.float32)).to(GRAD_P.dtype.element_ty), mask=out_mask)
    if SAVE_STATS:
        tl.store(ROW_SHIFT + rows64, shift, mask=smask)
        if STATS_SCALED:
            tl.store(ROW_COEF + rows64, coef_s, mask=smask)
            tl.store(ROW_GPOS + rows64, g_pos_s, mask=smask)
            tl.store(ROW_UNI + rows64, uni * scale, mask=smask)
        else:
            tl.store(ROW_COEF + rows64, coef, mask=smask)
            tl.store(ROW_GPOS + rows64, g_pos, mask=smask)
            tl.store(ROW_UNI + rows64, uni, mask=smask)


@triton.jit
def chunk_block(pid, n_rows, pid_d, d, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Block ``pid`` of the rows of a [n_rows, d] matrix and output chunk ``pid_d`` of its columns (a K
    loop over d): int64 row offsets, row mask, int64 offsets of the chunk's BLOCK_D columns, their mask."""
    rows64 = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs_d64 = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    return rows64, rows64 < n_rows, offs_d64, offs_d64 < d


@triton.jit
def chunk_dot(A, B, a64, amask, b64, bmask, k0, d, stride_ar, stride_ad, stride_br, stride_bd, MASK_K: tl.constexpr,
              BLOCK_DK: tl.constexpr, DOT_DT: tl.constexpr, INTERPRET: tl.constexpr):
    """A[a, k0:k0+BLOCK_DK] · B[b, k0:k0+BLOCK_DK]ᵀ in fp32 (:func:`mm`); MASK_K: the columns are masked
    at d (a chunk may run past it)."""
    offs = k0 + tl.arange(0, BLOCK_DK).to(tl.int64)
    a_mask = amask[:, None]
    b_mask = bmask[:, None]
    if MASK_K:
        a_mask = a_mask & (offs < d)[None, :]
        b_mask = b_mask & (offs < d)[None, :]
    a = tl.load(A + a64[:, None] * stride_ar + offs[None, :] * stride_ad, mask=a_mask, other=0.0)
    b = tl.load(B + b64[:, None] * stride_br + offs[None, :] * stride_bd, mask=b_mask, other=0.0)
    return mm(a, tl.trans(b), DOT_DT, INTERPRET)


@triton.jit
def looped_dot(A, B, a64, amask, b64, bmask, d, stride_ar, stride_ad, stride_br, stride_bd, BLOCK_DK: tl.constexpr,
               EVEN_K: tl.constexpr, DOT_DT: tl.constexpr, INTERPRET: tl.constexpr):
    """S = A[a]·B[b]ᵀ [len(a), len(b)] over all of d, accumulated in fp32 over K chunks of BLOCK_DK in
    the fixed order k0 = 0, BLOCK_DK, …. EVEN_K (BLOCK_DK divides d, known to the planner): no column
    mask; otherwise the chunks are masked at d (only the last one has columns past it) — one loop body
    either way (a separate unmasked loop plus a masked tail chunk spilled on sm_80)."""
    s = tl.zeros([a64.shape[0], b64.shape[0]], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_DK):
        s += chunk_dot(A, B, a64, amask, b64, bmask, k0, d, stride_ar, stride_ad, stride_br, stride_bd,
                       MASK_K=not EVEN_K, BLOCK_DK=BLOCK_DK, DOT_DT=DOT_DT, INTERPRET=INTERPRET)
    return s


@triton.jit
def looped_positive_score(Q, POS, POS_IDX, TABLE, rows64, rmask, d, stride_qr, stride_qd, stride_pr, stride_pd,
                          stride_tr, stride_td, n_table, POS_LOG_Q, inv_tau, POS_FROM_TABLE: tl.constexpr,
                          HAS_POS_LOG_Q: tl.constexpr, BLOCK_DK: tl.constexpr):
    """:func:`positive_score` over d in chunks of BLOCK_DK (a K loop over d: q_r is not held in registers)."""
    offs_k = tl.arange(0, BLOCK_DK).to(tl.int64)
    s_pos = tl.zeros(rows64.shape, dtype=tl.float32)
    for k0 in range(0, d, BLOCK_DK):
        offs = k0 + offs_k
        dm = offs < d
        q = tl.load(Q + rows64[:, None] * stride_qr + offs[None, :] * stride_qd, mask=rmask[:, None] & dm[None, :],
                    other=0.0).to(tl.float32)
        s_pos += positive_score(q, POS, POS_IDX, TABLE, rows64, rmask, offs, dm, stride_pr, stride_pd,
                                stride_tr=stride_tr, stride_td=stride_td, n_table=n_table, POS_LOG_Q=POS_LOG_Q,
                                inv_tau=inv_tau, POS_FROM_TABLE=POS_FROM_TABLE, HAS_POS_LOG_Q=False)
    if HAS_POS_LOG_Q:
        s_pos -= tl.load(POS_LOG_Q + rows64, mask=rmask, other=0.0).to(tl.float32)
    return s_pos

"""Full-ranking evaluation over the whole catalogue without an R×I score matrix.

One template, :func:`ranking_kernel`: a program owns a block of rows and streams the catalogue in
item tiles, S = Q·Vᵀ/τ on the tensor cores (``mm`` of ``_rowmath``, as the loss kernels). What it
keeps per row depends on ``TOPK``:

* rank (``TOPK = False``): a count of the items ahead of the row's target, n_r = #{j ≠ t_r, j not
  excluded : s_rj > s_rt} (``TIES_BY_INDEX`` also counts s_rj = s_rt with j < t_r, the position in a
  stable descending sort). The target's own score comes from the same ``mm`` as every tile, so a
  tie with an identical item is a tie here too.
* top-k (``TOPK = True``): the row's best ``K_PAD`` items as int64 keys (:func:`rank_key`: the
  score's order-preserving bits above the inverted item id, so one integer order is "score
  descending, then id ascending"; every key is distinct), unsorted, and their minimum. A tile's
  keys above that minimum are inserted one at a time, each replacing the current minimum, so a
  tile costs one max-reduction when nothing enters (the common case once the list has filled) and
  one more step per entering item. No sorting network: the launcher sorts the [R, K_PAD] keys.

Excluded items (a row's history) come as sorted CSR lists; each row keeps a cursor into its list
and, per tile, a short loop masks the entries that fall inside the tile (as many steps as the
most excluded items any row of the block has in that tile).

Any d: up to 256 (16-bit) / 128 (fp32) the query block stays in registers (BLOCK_D = next_pow2(d));
beyond, ``D_LOOP``: every score tile (the target's too) is accumulated over K chunks of BLOCK_DK
columns (``_rowmath.looped_dot``, one fixed order, so a tie stays a tie), nothing d-long is kept.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._rowmath import load_block, looped_dot, mm

LOW_MASK: tl.constexpr = tl.constexpr(0xFFFFFFFF)
EMPTY_KEY: tl.constexpr = tl.constexpr(-(2**63))  # below every real key: "no item" (score −inf, id −1)


@triton.jit
def rank_key(s, cols64):
    """int64 key ordered as (score descending, item id ascending): sign-folded fp32 bits << 32 | ~id."""
    bits = s.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (LOW_MASK - cols64)


@triton.jit
def exclude_tile(keep, cols64, hi, nxt, ex_pos, ex_end, EX_IDX, n_items):
    """Mask (keep = False) each row's excluded items below ``hi`` (≤ n_items); ``nxt`` is the row's next
    excluded id (``n_items`` when its list is exhausted), ``ex_pos`` its cursor into EX_IDX."""
    active = nxt < hi
    while tl.max(active.to(tl.int32), 0) > 0:
        keep &= ~(active[:, None] & (cols64[None, :] == nxt[:, None]))
        ex_pos += active.to(tl.int64)
        more = active & (ex_pos < ex_end)
        nxt = tl.where(active, tl.load(EX_IDX + ex_pos, mask=more, other=n_items), nxt)
        active = nxt < hi
    return keep, nxt, ex_pos


@triton.jit
def insert_tile(best, worst, keys, K_PAD: tl.constexpr):
    """Fold a tile of keys [rows, items] into the unsorted best lists [rows, K_PAD] and their minima."""
    offs_k = tl.arange(0, K_PAD)
    cand = tl.where(keys > worst[:, None], keys, EMPTY_KEY)
    top = tl.max(cand, 1)
    while tl.max((top > worst).to(tl.int32), 0) > 0:
        slot = tl.argmin(best, 1)
        enter = (top > worst)[:, None] & (offs_k[None, :] == slot[:, None])
        best = tl.where(enter, top[:, None], best)
        cand = tl.where(cand == top[:, None], EMPTY_KEY, cand)
        worst = tl.min(best, 1)
        top = tl.max(cand, 1)
    return best, worst


@triton.jit
def ranking_kernel(
    Q, TABLE, TARGET, EX_PTR, EX_IDX, OUT_RANK, OUT_KEYS,
    R, N_ITEMS, d, stride_qr, stride_qd, stride_tr, stride_td, inv_tau,
    TOPK: tl.constexpr, HAS_EX: tl.constexpr, TIES_BY_INDEX: tl.constexpr,
    K_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DT: tl.constexpr, EMULATE_DOT: tl.constexpr, D_LOOP: tl.constexpr = False, BLOCK_DK: tl.constexpr = 16,
    EVEN_K: tl.constexpr = True,
):
    """Rows of one block against all N_ITEMS items: the target's rank [R] or the top-K_PAD keys [R, K_PAD]."""
    if D_LOOP:  # q is read in K chunks with every tile
        rows64 = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows64 < R
    else:
        rows64, rmask, offs_d64, dmask, q = load_block(Q, tl.program_id(0), R, d, stride_qr, stride_qd, BLOCK_R,
                                                       BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    target = tl.zeros([BLOCK_R], dtype=tl.int64) - 1
    s_t = tl.zeros([BLOCK_R], dtype=tl.float32)
    if not TOPK:
        target = tl.load(TARGET + rows64, mask=rmask, other=0).to(tl.int64)
        if D_LOOP:
            own = looped_dot(Q, TABLE, rows64, rmask, target, rmask, d, stride_ar=stride_qr, stride_ad=stride_qd,
                             stride_br=stride_tr, stride_bd=stride_td, BLOCK_DK=BLOCK_DK, EVEN_K=EVEN_K,
                             DOT_DT=DOT_DT, INTERPRET=EMULATE_DOT) * inv_tau
        else:
            t = tl.load(TABLE + target[:, None] * stride_tr + offs_d64[None, :] * stride_td,
                        mask=rmask[:, None] & dmask[None, :], other=0.0)
            own = mm(q, tl.trans(t), DOT_DT, EMULATE_DOT) * inv_tau  # [BR, BR]: the diagonal is s_rt
        diag = tl.arange(0, BLOCK_R)[:, None] == tl.arange(0, BLOCK_R)[None, :]
        s_t = tl.sum(tl.where(diag, own, 0.0), 1)
    nxt = tl.zeros([BLOCK_R], dtype=tl.int64)
    ex_pos = nxt
    ex_end = nxt
    if HAS_EX:
        ex_pos = tl.load(EX_PTR + rows64, mask=rmask, other=0)
        ex_end = tl.load(EX_PTR + rows64 + 1, mask=rmask, other=0)
        nxt = tl.load(EX_IDX + ex_pos, mask=ex_pos < ex_end, other=N_ITEMS)
    cnt = tl.zeros([BLOCK_R], dtype=tl.int64)
    best = tl.full([BLOCK_R, K_PAD], EMPTY_KEY, tl.int64)
    worst = tl.full([BLOCK_R], EMPTY_KEY, tl.int64)
    for n0 in range(0, N_ITEMS, BLOCK_N):
        cols64 = n0 + offs_n.to(tl.int64)
        cmask = cols64 < N_ITEMS
        if D_LOOP:
            s = looped_dot(Q, TABLE, rows64, rmask, cols64, cmask, d, stride_ar=stride_qr, stride_ad=stride_qd,
                           stride_br=stride_tr, stride_bd=stride_td, BLOCK_DK=BLOCK_DK, EVEN_K=EVEN_K, DOT_DT=DOT_DT,
                           INTERPRET=EMULATE_DOT) * inv_tau
        else:
            v = tl.load(TABLE + cols64[:, None] * stride_tr + offs_d64[None, :] * stride_td,
                        mask=cmask[:, None] & dmask[None, :], other=0.0)
            s = mm(q, tl.trans(v), DOT_DT, EMULATE_DOT) * inv_tau
        keep = rmask[:, None] & cmask[None, :] & (cols64[None, :] != target[:, None])
        if HAS_EX:
            keep, nxt, ex_pos = exclude_tile(keep, cols64, tl.minimum(n0 + BLOCK_N, N_ITEMS), nxt, ex_pos,
                                               ex_end, EX_IDX, N_ITEMS)
        if TOPK:
            best, worst = insert_tile(best, worst, tl.where(keep, rank_key(s, cols64[None, :]), EMPTY_KEY), K_PAD)
        else:
            ahead = s > s_t[:, None]
            if TIES_BY_INDEX:
                ahead |= (s == s_t[:, None]) & (cols64[None, :] < target[:, None])
            cnt += tl.sum((keep & ahead).to(tl.int64), 1)
    if TOPK:
        offs_k = tl.arange(0, K_PAD)
        tl.store(OUT_KEYS + rows64[:, None] * K_PAD + offs_k[None, :], best, mask=rmask[:, None])
    else:
        tl.store(OUT_RANK + rows64, cnt, mask=rmask)

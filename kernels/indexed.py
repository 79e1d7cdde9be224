"""Indexed layout: ``neg`` is the item table [I, d], row r's negatives are ``table[neg_idx[r, j]]``.

The row pass is the per-row template (:func:`kernels.per_row.rows_kernel` with ``INDEXED``): it
gathers the item vectors inside the kernel (never an R×N×d tensor) and, by default, scatters
∂/∂v with fp32 ``tl.atomic_add`` into the table gradient (the positives' g+·q too when they are
table rows, ``pos_idx``). Atomic order varies run to run, so the last bits may too.

``deterministic=True`` replaces the atomics by two item-segment passes. The host side (torch, no
synchronisation) builds a stably sorted inverse index of the E = R·N (+ R with ``pos_idx``)
references to table rows:

    keys   = concat(neg_idx.flatten(), pos_idx)      int64 [E]
    sorted_keys, order = sort(keys, stable=True)      int64 [E] each
    seg_end = searchsorted(sorted_keys, sorted_keys, right=True)   int64 [E]

(four int64 [E] buffers, i.e. O(R·N) integers — the only O(R·N) allocation of the triton backend,
made only in deterministic mode; no float R×N and nothing R×N×d). The forward's row pass saves
four floats per row (shift, coef, g+, uni), the backward's gradient pass computes ∂/∂q and ∂/∂p only,
and ∂/∂table[i] = Σ_{(r, j): neg_idx[r, j] = i} g_rj q_r + Σ_{r: pos_idx[r] = i} g+_r q_r is summed
over item i's segment of sorted references, with g recomputed from the scores and the row stats.

Chunked segments. The sorted references are cut into fixed chunks of CHUNK entries (chunk c =
entries [c·CHUNK, (c+1)·CHUNK)); a *piece* is a maximal run of one segment inside one chunk, so a
piece starts at a segment start or at a chunk start: there are at most E/CHUNK + (number of
segments) pieces and none is longer than CHUNK. :func:`item_segment_kernel` gives every piece
head a lane that sums its piece in sorted order (a program's loop runs ≤ CHUNK steps, however
popular the item). A segment that fits in one chunk is written straight to its table row; one
that crosses chunk boundaries leaves fp32 partial sums in a workspace of 2 slots per chunk —
``PARTIAL[2c]`` (lead: the piece at the start of chunk c of a segment begun earlier) and
``PARTIAL[2c + 1]`` (tail: the piece of a segment begun in chunk c that runs past its end; only
the last segment of a chunk can) — i.e. 2·⌈E/CHUNK⌉·d floats whatever the data.
:func:`segment_merge_kernel` then adds, per crossing segment, tail[c0] + lead[c0 + 1] + … +
lead[c1] in that fixed order. Every sum is in an order fixed by the sorted references and CHUNK
alone, so the result is bit-identical run to run and independent of the launch grid (BLOCK_E).

Large d (``D_LOOP``): the score is a K loop over d in BLOCK_D chunks and a piece's accumulator
lives in its destination row (a table row or a workspace slot, owned by one lane), updated chunk
by chunk with a barrier after each store, so the update is deterministic too.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._rowmath import in_table, neg_phi, score_unit


@triton.jit
def segment_coef(ent, live, s, RN, N_DIV, LOG_Q_E, MASK, HIT_POS, HIT_NEG, ROW_SCALE, ROW_SHIFT, ROW_COEF, ROW_GPOS,
                 ROW_UNI, stride_mr, stride_mn, stride_hr, stride_hn, inv_tau, margin, KIND: tl.constexpr,
                 HAS_MASK: tl.constexpr, HAS_HITS: tl.constexpr, SMOOTH: tl.constexpr, INTERPRET: tl.constexpr):
    """(r, G_e) of references ``ent``: the row r and ∂L/∂(its score)·scale_r/τ, from the raw dot
    product ``s`` (units of :func:`score_unit`, before logQ; ``LOG_Q_E`` = logq of the item in those
    units). Entries e < R·N are negatives (r, j) = divmod(e, N), the others positives r = e − R·N."""
    is_neg = ent < RN
    r = tl.where(is_neg, ent // N_DIV, ent - RN)
    j = ent % N_DIV
    keep = live & is_neg
    if HAS_MASK:
        keep &= tl.load(MASK + r * stride_mr + j * stride_mn, mask=keep, other=1) == 0
    if HAS_HITS:
        neg_id = tl.load(HIT_NEG + r * stride_hr + j * stride_hn, mask=keep, other=0)
        keep &= neg_id != tl.load(HIT_POS + r, mask=keep, other=0)
    scale = tl.load(ROW_SCALE + r, mask=live, other=0.0).to(tl.float32) * inv_tau
    shift = tl.load(ROW_SHIFT + r, mask=keep, other=0.0)
    coef = tl.load(ROW_COEF + r, mask=keep, other=0.0)
    g = coef * neg_phi(tl.where(keep, s - LOG_Q_E, float("-inf")), shift, margin, KIND, INTERPRET)
    if SMOOTH:
        g += tl.load(ROW_UNI + r, mask=keep, other=0.0)
    g = tl.where(keep, g, 0.0)
    g += tl.load(ROW_GPOS + r, mask=live & (ent >= RN), other=0.0)
    return r, g * scale


@triton.jit
def item_segment_kernel(
    Q, NEG, SORTED_KEYS, ORDER, SEG_END, LOG_Q, MASK, HIT_POS, HIT_NEG, ROW_SCALE, ROW_SHIFT, ROW_COEF, ROW_GPOS,
    ROW_UNI, GRAD_NEG, PARTIAL, E, RN, N_DIV, d, n_table, stride_qr, stride_qd, stride_nr, stride_nd, stride_l,
    stride_mr, stride_mn, stride_hr, stride_hn, inv_tau, margin,
    KIND: tl.constexpr, HAS_LOG_Q: tl.constexpr, HAS_MASK: tl.constexpr, HAS_HITS: tl.constexpr,
    SMOOTH: tl.constexpr, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, D_LOOP: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Entries e of one block; a piece head lane (the first entry of its item's segment in its chunk,
    see the module docstring) sums G_e q_{r(e)} over its piece (≤ CHUNK references, sorted order)
    into ∂/∂table[key] or a PARTIAL slot. Keys outside [0, n_table) (ignore_index, padding) are never
    read or written."""
    pid = tl.program_id(0)
    e64 = pid.to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = e64 < E
    key = tl.load(SORTED_KEYS + e64, mask=emask, other=-1)
    prev = tl.load(SORTED_KEYS + e64 - 1, mask=emask & (e64 > 0), other=-1)
    seg_head = (e64 == 0) | (prev != key)
    chunk = e64 // CHUNK
    chunk_end = tl.minimum(chunk * CHUNK + CHUNK, E)
    head = in_table(key, emask, n_table) & (seg_head | (e64 == chunk * CHUNK))
    seg_end = tl.load(SEG_END + e64, mask=head, other=0)
    n_refs = tl.where(head, tl.minimum(seg_end, chunk_end) - e64, 0)
    direct = head & seg_head & (seg_end <= chunk_end)  # the whole segment is this piece
    partial = head & ~direct
    slot = 2 * chunk + seg_head.to(tl.int64)  # lead 2c (a segment begun earlier), tail 2c + 1
    unit = score_unit(KIND)
    log_q = tl.zeros([BLOCK_E], dtype=tl.float32)
    if HAS_LOG_Q:
        log_q = tl.load(LOG_Q + key * stride_l, mask=head, other=0.0).to(tl.float32) * unit
    offs_d64 = tl.arange(0, BLOCK_D).to(tl.int64)
    if D_LOOP:
        for k in range(0, tl.max(n_refs, 0)):
            live = k < n_refs
            ent = tl.load(ORDER + e64 + k, mask=live, other=0)
            r = tl.where(ent < RN, ent // N_DIV, ent - RN)
            s = tl.zeros([BLOCK_E], dtype=tl.float32)
            for d0 in range(0, d, BLOCK_D):
                offs = d0 + offs_d64
                lm = live[:, None] & (offs < d)[None, :]
                q = tl.load(Q + r[:, None] * stride_qr + offs[None, :] * stride_qd, mask=lm, other=0.0)
                v = tl.load(NEG + key[:, None] * stride_nr + offs[None, :] * stride_nd, mask=lm, other=0.0)
                s += tl.sum(q.to(tl.float32) * v.to(tl.float32), 1)
            r, g = segment_coef(ent, live, s * (inv_tau * unit), RN, N_DIV, log_q, MASK, HIT_POS, HIT_NEG,
                                ROW_SCALE, ROW_SHIFT, ROW_COEF, ROW_GPOS, ROW_UNI, stride_mr, stride_mn, stride_hr,
                                stride_hn, inv_tau, margin, KIND, HAS_MASK, HAS_HITS, SMOOTH, INTERPRET)
            for d0 in range(0, d, BLOCK_D):
                offs = d0 + offs_d64
                dm = (offs < d)[None, :]
                q = tl.load(Q + r[:, None] * stride_qr + offs[None, :] * stride_qd, mask=live[:, None] & dm,
                            other=0.0).to(tl.float32)
                to_table = GRAD_NEG + key[:, None] * d + offs[None, :]
                to_slot = PARTIAL + slot[:, None] * d + offs[None, :]
                dm_table = (direct & live)[:, None] & dm
                dm_slot = (partial & live)[:, None] & dm
                acc = (tl.load(to_table, mask=dm_table & (k > 0), other=0.0)  # nothing stored yet at k = 0
                       + tl.load(to_slot, mask=dm_slot & (k > 0), other=0.0) + g[:, None] * q)
                tl.store(to_table, acc, mask=dm_table)
                tl.store(to_slot, acc, mask=dm_slot)
                tl.debug_barrier()  # the next reference's read of this row sees the store (any thread layout)
    else:
        dmask = offs_d64 < d
        v = tl.load(NEG + key[:, None] * stride_nr + offs_d64[None, :] * stride_nd,
                    mask=head[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)
        for k in range(0, tl.max(n_refs, 0)):
            live = k < n_refs
            ent = tl.load(ORDER + e64 + k, mask=live, other=0)
            r = tl.where(ent < RN, ent // N_DIV, ent - RN)
            q = tl.load(Q + r[:, None] * stride_qr + offs_d64[None, :] * stride_qd,
                        mask=live[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            r, g = segment_coef(ent, live, tl.sum(q * v, 1) * (inv_tau * unit), RN, N_DIV, log_q, MASK, HIT_POS,
                                HIT_NEG, ROW_SCALE, ROW_SHIFT, ROW_COEF, ROW_GPOS, ROW_UNI, stride_mr, stride_mn,
                                stride_hr, stride_hn, inv_tau, margin, KIND, HAS_MASK, HAS_HITS, SMOOTH, INTERPRET)
            acc += g[:, None] * q
        tl.store(GRAD_NEG + key[:, None] * d + offs_d64[None, :], acc, mask=direct[:, None] & dmask[None, :])
        tl.store(PARTIAL + slot[:, None] * d + offs_d64[None, :], acc, mask=partial[:, None] & dmask[None, :])


@triton.jit
def segment_merge_kernel(SORTED_KEYS, SEG_END, PARTIAL, GRAD_NEG, E, d, n_table, n_chunks, CHUNK: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Chunks c of one block: the segment begun in chunk c that runs past its end (if any) gets
    ∂/∂table[key] = tail[c] + lead[c + 1] + … + lead[c_last], summed in that order."""
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < n_chunks
    c_end = tl.minimum(c * CHUNK + CHUNK, E)
    key = tl.load(SORTED_KEYS + c_end - 1, mask=cmask, other=-1)
    seg_end = tl.load(SEG_END + c_end - 1, mask=cmask, other=0)
    before = tl.load(SORTED_KEYS + c * CHUNK - 1, mask=cmask & (c > 0), other=-1)
    own = in_table(key, cmask, n_table) & (seg_end > c_end) & ((c == 0) | (before != key))
    n_more = tl.where(own, (seg_end - 1) // CHUNK - c, 0)
    for d0 in range(0, d, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        dm = (offs < d)[None, :]
        acc = tl.load(PARTIAL + (2 * c + 1)[:, None] * d + offs[None, :], mask=own[:, None] & dm, other=0.0)
        for k in range(1, tl.max(n_more, 0) + 1):
            acc += tl.load(PARTIAL + (2 * (c + k))[:, None] * d + offs[None, :], mask=(k <= n_more)[:, None] & dm,
                           other=0.0)
        tl.store(GRAD_NEG + key[:, None] * d + offs[None, :], acc, mask=own[:, None] & dm)

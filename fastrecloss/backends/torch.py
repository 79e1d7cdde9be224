"""Chunked, memory-lean PyTorch backend (SPEC §6).

Rows are processed in chunks, and each chunk's N columns in item tiles: the whole row for the
per-row and indexed layouts, cache-sized column blocks of the catalogue for the shared layout.

1. Per tile: scores (a GEMM for the shared layout, a batched matvec for the gathered ones), the
   logQ correction and the masks (−inf), then the tile's row statistics while it is in cache —
   the contrastive kinds turn the tile into e^{s − m_t} with its own row max m_t and keep m_t and
   Σ e^{s − m_t} (an online log-sum-exp over tiles; Σ_j s_j too under label smoothing); the
   pointwise kinds add up their loss terms and turn the tile into the unscaled derivative
   (sigmoid / indicator).
2. The rows' losses and a per-row factor (λ e^{m_t − M} / Σ for the softmax, 1/n for a mean over
   negatives, times the upstream gradient and 1/τ); then the gradient GEMMs over the whole chunk,
   gq = f ⊙ (E V) and gV += Eᵀ (f ⊙ q), with the factor on their small operands.

A ``neg_idx`` entry outside [0, I) is a masked negative (gathered as row 0, then masked). Nothing
reads a tensor's value back to the host: the max shift is always taken (one amax per tile).

The chunk's scores live in one reused fp32 buffer [chunk, N] (a tile-sized one when no gradient
is wanted). Peak extra memory is O(chunk·N + chunk·N·d for gathered layouts + R·d + N·d); no R×N
or R×N×d tensor is formed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._problem import Problem
from .._spec import Kind, LossSpec, acc_dtype

# Elements of the per-chunk working set (score buffer, or gathered negatives for the per-row and
# indexed layouts). 2^20 fp32 = 4 MiB.
CHUNK_ELEMENTS = 1 << 20

# The shared layout's GEMMs lose much of their speed with few rows, so a large catalogue gets a
# larger score buffer (still O(chunk·N)) rather than thin GEMMs — up to MAX_SCORE_ELEMENTS
# (2^25 fp32 = 128 MiB), beyond which the rows per chunk shrink again.
MIN_GEMM_ROWS = 256
MAX_SCORE_ELEMENTS = 1 << 25

# Elements of one shared-layout score tile: 2^20 fp32 = 4 MiB, which stays in the development
# machine's caches (2 MiB L2 per core, 32 MiB L3) while its elementwise passes run.
TILE_ELEMENTS = 1 << 20



def chunk_rows(p: Problem) -> int:
    N = max(p.N, 1)
    if p.layout == "shared":
        rows = max(CHUNK_ELEMENTS // N, min(MIN_GEMM_ROWS, MAX_SCORE_ELEMENTS // N))
        return max(1, min(p.R, rows))
    return max(1, min(p.R, CHUNK_ELEMENTS // (N * p.d)))


def item_tiles(p: Problem, rows: int) -> list[tuple[int, int]]:
    """Column ranges [j0, j1) of a chunk of ``rows`` rows: cache-sized for the shared layout."""
    cols = max(1, TILE_ELEMENTS // rows) if p.layout == "shared" else max(p.N, 1)
    return [(j0, min(p.N, j0 + cols)) for j0 in range(0, max(p.N, 1), cols)]


def _softplus(x: Tensor, out: Tensor | None = None) -> Tensor:
    """log(1 + e^x) as logaddexp(x, 0), exact: F.softplus returns x itself above x = 20 (an error up to
    e^-20 ≈ 2e-9)."""
    return torch.logaddexp(x, x.new_zeros(()), out=out)


def _softplus_sum(s: Tensor, aux: Tensor | None) -> Tensor:
    """Σ_j softplus(s_j) per row, using ``aux`` (same shape as ``s``) as scratch when given."""
    return _softplus(s, aux).sum(dim=1)


def tile_pass(spec: LossSpec, s: Tensor, s_pos: Tensor | None, aux: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Pass 1 on a tile ``s`` [c, w] of scores (−inf = masked); rewrites it in place.

    Contrastive: s ← e^{s − m_t}; returns (m_t, Σ_j e^{s_j − m_t}), with m_t the tile's row max
    (−inf for a row whose tile is fully masked). Pointwise: s ← ∂ℓ/∂s_j unscaled; returns
    (Σ_j ℓ_j, Σ_j ∂ℓ/∂s_j for BPR, else None). ``aux`` is optional scratch shaped like ``s``.
    """
    if spec.kind == Kind.CONTRASTIVE:
        tile_max = s.amax(dim=1) if s.shape[1] else s.new_full(s.shape[:1], -math.inf)
        s.sub_(torch.where(torch.isfinite(tile_max), tile_max, 0)[:, None]).exp_()
        return tile_max, s.sum(dim=1)
    if spec.kind == Kind.BPR:
        s.sub_(s_pos[:, None])
        loss = _softplus_sum(s, aux)
        return loss, s.sigmoid_().sum(dim=1)
    if spec.kind == Kind.BCE:
        loss = _softplus_sum(s, aux)
        s.sigmoid_()
        return loss, None
    if spec.kind == Kind.CCL:
        s.sub_(spec.margin)
        loss = (s.clamp_min(0) if aux is None else torch.clamp_min(s, 0, out=aux)).sum(dim=1)
        torch.gt(s, 0, out=s)
        return loss, None
    raise ValueError(f"unknown loss kind {spec.kind!r}")


def finish_rows(spec: LossSpec, stats: list[tuple[Tensor, Tensor | None]], s_pos: Tensor | None, n: Tensor,
                lin: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """Row losses [c], g+ = ∂L/∂s+ [c] (or None), the factors [c, T] that turn each pass-1 tile
    into g = ∂L/∂s, and the constant [c] (or None) added to g at every unmasked negative, from the
    tiles' statistics. ``n`` [c] counts the unmasked negatives, ``lin`` [c] sums their scores
    (label smoothing)."""
    has_neg = n > 0
    zero = torch.zeros_like(n)
    if spec.kind == Kind.CONTRASTIVE:
        # log(ε e^{s+} + Σ_t e^{m_t} Σ_j e^{s_j − m_t}) around M = max(m_t, log ε + s+).
        tile_max = torch.stack([m for m, _ in stats], dim=1)
        tile_sum = torch.stack([t for _, t in stats], dim=1)
        pos_term = s_pos + math.log(spec.eps) if s_pos is not None and spec.eps > 0 else None
        row_max = tile_max.amax(dim=1)
        if pos_term is not None:
            row_max = torch.maximum(row_max, pos_term)
        row_max = torch.where(torch.isfinite(row_max), row_max, zero)
        tile_weight = torch.exp(tile_max - row_max[:, None])  # e^{m_t − M}; 0 for a masked tile
        sum_exp = (tile_sum * tile_weight).sum(dim=1)
        pos_exp = torch.exp(pos_term - row_max) if pos_term is not None else None
        if pos_exp is not None:
            sum_exp = sum_exp + pos_exp
        sum_exp = sum_exp.clamp_min(torch.finfo(n.dtype).tiny)
        lse = torch.log(sum_exp) + row_max
        alpha = spec.label_smoothing
        loss = spec.lam * (lse - spec.mu * torch.log(n.clamp(min=1))) + spec.z_loss * lse * lse
        g_const = None
        if alpha:  # α · (−mean of the unmasked scores); its gradient −α/n at each of them
            loss = loss - alpha * lin / n.clamp(min=1)
            g_const = torch.where(has_neg, -alpha / n.clamp(min=1), zero)
        if s_pos is not None:
            loss = loss - (1 - alpha) * s_pos
        # g_j = (λ + 2z·lse) softmax_j (− α/n) ; g+ = −(1 − α) + (λ + 2z·lse) ε-share.
        share = torch.where(has_neg, (spec.lam + 2 * spec.z_loss * lse) / sum_exp, zero)
        g_pos = None
        if s_pos is not None:
            g_pos = torch.where(has_neg, -(1 - alpha) + (pos_exp * share if pos_exp is not None else 0), zero)
        return torch.where(has_neg, loss, zero), g_pos, share[:, None] * tile_weight, g_const

    denom = torch.ones_like(n) if spec.neg_sum else n.clamp(min=1)
    neg_loss = sum(loss for loss, _ in stats) / denom
    factor = (1 / denom)[:, None]
    if spec.kind == Kind.BPR:
        return neg_loss, -sum(g for _, g in stats) / denom, factor, None
    if spec.kind == Kind.BCE:
        return spec.beta * _softplus(-s_pos) + neg_loss, -spec.beta * torch.sigmoid(-s_pos), factor, None
    if spec.kind == Kind.CCL:
        loss = F.relu(1 - s_pos) + spec.neg_weight * neg_loss
        return loss, -(s_pos < 1).to(n.dtype), spec.neg_weight * factor, None
    raise ValueError(f"unknown loss kind {spec.kind!r}")


class _Workspace:
    """Per-chunk buffers, allocated once and reused by every chunk (views are cut per chunk)."""

    def __init__(self, p: Problem, chunk: int, tiles: list[tuple[int, int]], dtype: torch.dtype, pointwise: bool,
                 keep_scores: bool) -> None:
        dev, N, d = p.query.device, p.N, p.d
        tile = max(j1 - j0 for j0, j1 in tiles) * chunk
        self.keep_scores = keep_scores
        self.scores = torch.empty(chunk * N if keep_scores else tile, dtype=dtype, device=dev)
        self.aux = torch.empty(tile, dtype=dtype, device=dev) if pointwise else None
        # Gathered negatives (indexed) or converted ones (per-row inputs not already in ``dtype``).
        gathered = p.layout == "indexed" or (p.layout == "per_row" and p.neg.dtype != dtype)
        self.negs = torch.empty(chunk * N * d, dtype=dtype, device=dev) if gathered else None
        self.hits = torch.empty(tile, dtype=torch.bool, device=dev) if p.hit_pos_ids is not None else None

    @staticmethod
    def view(buf: Tensor | None, *shape: int) -> Tensor | None:
        if buf is None:
            return None
        numel = 1
        for size in shape:
            numel *= size
        return buf[:numel].view(*shape)

    def tile(self, c: int, j0: int, j1: int, N: int) -> Tensor:
        """The scores of columns j0:j1 of a c-row chunk: a column slice of the row-major [c, N]
        buffer, or the one reused tile buffer when the scores are not kept for a second pass."""
        if self.keep_scores:
            return self.view(self.scores, c, N)[:, j0:j1]
        return self.view(self.scores, c, j1 - j0)


def _tile_mask(p: Problem, r0: int, r1: int, j0: int, j1: int, ws: _Workspace,
               outside: Tensor | None) -> Tensor | None:
    """Bool mask of excluded negatives for rows r0:r1, columns j0:j1 ([w] or [c, w]), or None.
    ``outside`` [c, N]: the chunk's ``neg_idx`` entries outside the table (indexed layout)."""
    mask = outside
    if p.neg_mask is not None:
        m = p.neg_mask[j0:j1] if p.neg_mask.dim() == 1 else p.neg_mask[r0:r1, j0:j1]
        mask = m if mask is None else mask | m
    if p.hit_pos_ids is not None:
        neg_ids = p.hit_neg_ids[j0:j1] if p.hit_neg_ids.dim() == 1 else p.hit_neg_ids[r0:r1, j0:j1]
        hits = ws.view(ws.hits, r1 - r0, j1 - j0)
        torch.eq(p.hit_pos_ids[r0:r1, None], neg_ids, out=hits)
        mask = hits if mask is None else hits.logical_or_(mask)
    return mask


def _chunk_indices(p: Problem, r0: int, r1: int) -> tuple[Tensor | None, Tensor | None]:
    """Indexed layout: (the chunk's neg_idx with entries outside [0, I) replaced by 0, their mask)."""
    if p.layout != "indexed":
        return None, None
    idx = p.neg_idx[r0:r1]
    outside = (idx < 0) | (idx >= p.neg.shape[0])
    return idx.masked_fill(outside, 0), outside


def forward_backward(
    p: Problem,
    spec: LossSpec,
    row_scale: Tensor | None,
    needs: tuple[bool, bool, bool],
    deterministic: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Row losses [R] and, when ``row_scale`` [R] is given, the gradients of
    Σ_r row_scale_r · L_r with respect to (query, pos, neg) where ``needs`` asks for them.

    Losses and gradients are in the accumulation dtype (fp32, or fp64 for fp64 inputs); the
    positives' gradient goes into ``grad_neg`` when they are rows of the table (``pos_idx``).
    Index gradients are accumulated with ``index_add_`` (sequential on CPU), or with
    ``index_put_(accumulate=True)`` (sorted, deterministic) on CUDA when ``deterministic``.
    """
    acc = acc_dtype(p.query.dtype)
    R, N, d = p.R, p.N, p.d
    dev = p.query.device
    inv_tau = 1.0 / p.temperature
    want_grad = row_scale is not None
    need_q, need_p, need_n = needs if want_grad else (False, False, False)

    table = p.neg.to(acc) if p.layout != "per_row" else None  # [N, d] or [I, d]; a view when already acc
    log_q = p.log_q.to(acc) if p.log_q is not None else None
    loss = torch.empty(R, dtype=acc, device=dev)
    grad_q = torch.empty(R, d, dtype=acc, device=dev) if need_q else None
    grad_p = torch.empty(R, d, dtype=acc, device=dev) if (need_p and p.pos is not None) else None
    grad_neg = None
    if need_n:  # per-row: every entry is written once; the tables accumulate
        grad_neg = (torch.empty if p.layout == "per_row" else torch.zeros)(p.neg.shape, dtype=acc, device=dev)

    chunk = chunk_rows(p)
    tiles = item_tiles(p, chunk)  # the same columns for every chunk: the buffers are sized for them
    ws = _Workspace(p, chunk, tiles, acc, pointwise=spec.kind != Kind.CONTRASTIVE, keep_scores=want_grad)
    smoothing = spec.kind == Kind.CONTRASTIVE and spec.label_smoothing > 0
    for r0 in range(0, R, chunk):
        r1 = min(R, r0 + chunk)
        c = r1 - r0
        q = p.query[r0:r1].to(acc)
        q_tau = q * inv_tau
        negs = ws.view(ws.negs, c, N, d)  # gathered / converted negatives of the chunk
        if p.layout == "per_row":
            negs = negs.copy_(p.neg[r0:r1]) if negs is not None else p.neg[r0:r1]
        idx, outside = _chunk_indices(p, r0, r1)
        if idx is not None:
            torch.index_select(table, 0, idx.reshape(-1), out=negs.view(c * N, d))

        pos = None
        s_pos = None
        if p.has_pos:
            pos = p.pos[r0:r1].to(acc) if p.pos is not None else table[p.pos_idx[r0:r1]]
            s_pos = (q_tau * pos).sum(dim=1)
            if p.pos_log_q is not None:
                s_pos = s_pos - p.pos_log_q[r0:r1].to(acc)

        # Pass 1: scores of each tile and its row statistics.
        n = torch.zeros(c, dtype=acc, device=dev)
        lin = torch.zeros(c, dtype=acc, device=dev) if smoothing else None
        stats = []
        for j0, j1 in tiles:
            s = ws.tile(c, j0, j1, N)
            if p.layout == "shared":
                torch.mm(q_tau, table[j0:j1].T, out=s)
            else:  # q as a row vector times the transposed negatives: the fast batched-GEMV orientation
                torch.bmm(q_tau[:, None, :], negs.transpose(1, 2), out=s[:, None, :])
            if log_q is not None:
                if p.layout == "shared":
                    s.sub_(log_q[j0:j1])
                elif p.layout == "per_row":
                    s.sub_(log_q[r0:r1])
                else:
                    s.sub_(log_q[idx])
            mask = _tile_mask(p, r0, r1, j0, j1, ws, outside)
            if lin is not None:
                lin += (s if mask is None else s.masked_fill(mask, 0)).sum(dim=1)
            if mask is not None:
                s.masked_fill_(mask, -math.inf)
                n += (j1 - j0) - mask.sum(dim=-1).to(acc)
            else:
                n += j1 - j0
            stats.append(tile_pass(spec, s, s_pos, ws.view(ws.aux, c, j1 - j0)))

        loss_c, g_pos, factor, g_const = finish_rows(spec, stats, s_pos, n, lin)
        loss[r0:r1] = loss_c
        if not want_grad:
            continue

        # Pass 2: g = factor ⊙ scores, with factor scaled by row_scale/τ (the chain rule through
        # s = <q, v>/τ), then the gradient GEMMs with the factor on their small operands:
        # gq = Σ_t f_t ⊙ (E_t V_t) and gV_t += E_tᵀ (f_t ⊙ q), one pair per item tile (each tile
        # was shifted by its own max, so each has its own factor; the tiles are column blocks of
        # the row-major buffer). A constant in g (label smoothing) is added in place first.
        scale = row_scale[r0:r1].to(acc) * inv_tau
        factor = factor * scale[:, None]
        g_pos = g_pos * scale if g_pos is not None else None
        if g_const is not None:
            for t, (j0, j1) in enumerate(tiles):
                tile = ws.tile(c, j0, j1, N).mul_(factor[:, t, None]).add_((g_const * scale)[:, None])
                mask = _tile_mask(p, r0, r1, j0, j1, ws, outside)
                if mask is not None:
                    tile.masked_fill_(mask, 0)
            factor = torch.ones_like(factor)
        gq = grad_q[r0:r1] if need_q else None
        if p.layout == "shared":
            for t, (j0, j1) in enumerate(tiles):
                g, f = ws.tile(c, j0, j1, N), factor[:, t if factor.shape[1] > 1 else 0, None]
                if gq is not None:
                    part = torch.mm(g, table[j0:j1], out=gq if t == 0 else None)
                    part.mul_(f) if t == 0 else gq.addcmul_(part, f)
                if need_n:
                    grad_neg[j0:j1].addmm_(g.T, f * q)
        else:  # one tile: the whole row
            g, f = ws.view(ws.scores, c, N), factor[:, :1]
            if gq is not None:
                torch.bmm(g[:, None, :], negs, out=gq[:, None, :])
                gq.mul_(f)
            if need_n and p.layout == "per_row":
                torch.mul(g[:, :, None], (f * q)[:, None, :], out=grad_neg[r0:r1])
            elif need_n:  # the gathered negatives are no longer needed: reuse their buffer
                torch.mul(g[:, :, None], (f * q)[:, None, :], out=negs)
                _scatter_add(grad_neg, idx.reshape(-1), negs.view(c * N, d), deterministic)
        if gq is not None and g_pos is not None:
            gq.add_(g_pos[:, None] * pos)
        if grad_p is not None:
            torch.mul(g_pos[:, None], q, out=grad_p[r0:r1])
        if need_n and p.pos_idx is not None and g_pos is not None:
            _scatter_add(grad_neg, p.pos_idx[r0:r1], g_pos[:, None] * q, deterministic)
    return loss, grad_q, grad_p, grad_neg


def _scatter_add(dst: Tensor, index: Tensor, src: Tensor, deterministic: bool) -> None:
    if deterministic and dst.is_cuda:
        dst.index_put_((index,), src, accumulate=True)
    else:
        dst.index_add_(0, index, src)

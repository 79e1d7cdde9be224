"""Chunked, memory-lean PyTorch backend (SPEC §6).

Rows are processed in chunks. For each chunk one reused fp32 score buffer [chunk, N] receives
the scores (a GEMM for the shared layout, a batched matvec for the per-row and indexed layouts),
the masks and logQ corrections are applied in place, and the same buffer is overwritten with the
score gradients g_rj = ∂L_r/∂s_rj. The query/positive gradients of the chunk and its
contribution to the negatives' gradient are then two GEMMs. Peak extra memory is
O(chunk·N + chunk·N·d for gathered layouts + R·d + N·d); no R×N or R×N×d tensor is formed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._problem import Problem
from ._spec import Kind, LossSpec, acc_dtype

# Elements of the per-chunk working set (score buffer, or gathered negatives for the per-row and
# indexed layouts). 2^20 fp32 = 4 MiB keeps a chunk's elementwise passes in the CPU caches.
CHUNK_ELEMENTS = 1 << 20


# The shared layout's GEMMs lose most of their speed below this many rows, so a large catalogue
# gets a larger score buffer (still O(chunk·N)) rather than thin GEMMs.
MIN_GEMM_ROWS = 64


def chunk_rows(p: Problem) -> int:
    if p.layout == "shared":
        return max(1, min(p.R, max(MIN_GEMM_ROWS, CHUNK_ELEMENTS // max(p.N, 1))))
    return max(1, min(p.R, CHUNK_ELEMENTS // (max(p.N, 1) * p.d)))


def _softplus_sum(s: Tensor, aux: Tensor | None) -> Tensor:
    """Σ_j softplus(s_j) per row, using ``aux`` (same shape as ``s``) as scratch when given."""
    if aux is None:
        return F.softplus(s).sum(dim=1)
    return torch.logaddexp(s, s.new_zeros(()), out=aux).sum(dim=1)


def row_math(spec: LossSpec, s: Tensor, s_pos: Tensor | None, n: Tensor,
             aux: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Row losses of a chunk; overwrites ``s`` [c, N] (scores, −inf = masked) with g = ∂L/∂s.

    Returns (loss [c], g_pos [c] or None). ``n`` [c] counts the unmasked negatives; ``aux`` is
    an optional scratch buffer shaped like ``s`` (the pointwise losses use it).
    """
    has_neg = n > 0
    if spec.kind == Kind.CONTRASTIVE:
        # log(ε e^{s+} + Σ_j e^{s_j}) with max-subtraction; masked entries are −inf → e^{…} = 0.
        pos_term = None
        if s_pos is not None and spec.eps > 0:
            pos_term = s_pos + math.log(spec.eps)
        row_max = s.amax(dim=1) if s.shape[1] else torch.full_like(n, -math.inf)
        if pos_term is not None:
            row_max = torch.maximum(row_max, pos_term)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        s.sub_(row_max[:, None]).exp_()
        sum_exp = s.sum(dim=1)
        pos_exp = torch.exp(pos_term - row_max) if pos_term is not None else None
        if pos_exp is not None:
            sum_exp = sum_exp + pos_exp
        sum_exp = sum_exp.clamp_min(torch.finfo(s.dtype).tiny)
        lse = torch.log(sum_exp) + row_max
        loss = spec.lam * (lse - spec.mu * torch.log(n.clamp(min=1)))
        if s_pos is not None:
            loss = loss - s_pos
        zero = torch.zeros_like(loss)
        loss = torch.where(has_neg, loss, zero)
        # g_j = λ softmax_j ; g+ = −1 + λ ε-share.
        share = torch.where(has_neg, spec.lam / sum_exp, zero)
        s.mul_(share[:, None])
        g_pos = None
        if s_pos is not None:
            g_pos = torch.where(has_neg, -1 + (pos_exp * share if pos_exp is not None else 0), zero)
        return loss, g_pos

    denom = torch.ones_like(n) if spec.neg_sum else n.clamp(min=1)
    if spec.kind == Kind.BPR:
        s.sub_(s_pos[:, None])
        loss = _softplus_sum(s, aux) / denom
        s.sigmoid_().div_(denom[:, None])
        return loss, -s.sum(dim=1)
    if spec.kind == Kind.BCE:
        loss = spec.beta * F.softplus(-s_pos) + _softplus_sum(s, aux) / denom
        s.sigmoid_().div_(denom[:, None])
        return loss, -spec.beta * torch.sigmoid(-s_pos)
    if spec.kind == Kind.CCL:
        s.sub_(spec.margin)
        loss = F.relu(1 - s_pos) + spec.neg_weight * s.clamp_min(0).sum(dim=1) / denom
        torch.gt(s, 0, out=s)
        s.mul_((spec.neg_weight / denom)[:, None])
        return loss, -(s_pos < 1).to(s.dtype)
    raise ValueError(f"unknown loss kind {spec.kind!r}")


class _Workspace:
    """Per-chunk buffers, allocated once and reused by every chunk (views are cut per chunk)."""

    def __init__(self, p: Problem, chunk: int, dtype: torch.dtype, pointwise: bool) -> None:
        dev, N, d = p.query.device, p.N, p.d
        self.scores = torch.empty(chunk * N, dtype=dtype, device=dev)
        self.aux = torch.empty(chunk * N, dtype=dtype, device=dev) if pointwise else None
        # Gathered negatives (indexed) or converted ones (per-row inputs not already in ``dtype``).
        gathered = p.layout == "indexed" or (p.layout == "per_row" and p.neg.dtype != dtype)
        self.negs = torch.empty(chunk * N * d, dtype=dtype, device=dev) if gathered else None
        has_mask = p.neg_mask is not None or p.hit_pos_ids is not None
        self.mask = torch.empty(chunk * N, dtype=torch.bool, device=dev) if has_mask else None
        self.hits = torch.empty(chunk * N, dtype=torch.bool, device=dev) if p.hit_pos_ids is not None else None

    @staticmethod
    def view(buf: Tensor | None, *shape: int) -> Tensor | None:
        if buf is None:
            return None
        numel = 1
        for size in shape:
            numel *= size
        return buf[:numel].view(*shape)


def _chunk_mask(p: Problem, r0: int, r1: int, ws: _Workspace) -> Tensor | None:
    """Bool [c, N] of excluded negatives for rows r0:r1 (in the workspace), or None."""
    if ws.mask is None:
        return None
    c, N = r1 - r0, p.N
    mask = ws.view(ws.mask, c, N)
    if p.neg_mask is not None:
        m = p.neg_mask
        mask.copy_(m[None, :].expand(c, N) if m.dim() == 1 else m[r0:r1])
    else:
        mask.zero_()
    if p.hit_pos_ids is not None:
        neg_ids = p.hit_neg_ids if p.hit_neg_ids.dim() == 1 else p.hit_neg_ids[r0:r1]
        hits = ws.view(ws.hits, c, N)
        torch.eq(p.hit_pos_ids[r0:r1, None], neg_ids, out=hits)
        mask.logical_or_(hits)
    return mask


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
    ws = _Workspace(p, chunk, acc, pointwise=spec.kind != Kind.CONTRASTIVE)
    for r0 in range(0, R, chunk):
        r1 = min(R, r0 + chunk)
        c = r1 - r0
        q = p.query[r0:r1].to(acc)
        s = ws.view(ws.scores, c, N)
        negs = ws.view(ws.negs, c, N, d)  # gathered / converted negatives of the chunk
        if p.layout == "shared":
            torch.mm(q, table.T, out=s)
        else:
            if p.layout == "per_row":
                negs = negs.copy_(p.neg[r0:r1]) if negs is not None else p.neg[r0:r1]
            else:
                torch.index_select(table, 0, p.neg_idx[r0:r1].reshape(-1), out=negs.view(c * N, d))
            # q as a row vector times the transposed negatives: the fast batched-GEMV orientation
            torch.bmm(q[:, None, :], negs.transpose(1, 2), out=s[:, None, :])
        s.mul_(inv_tau)
        if log_q is not None:
            if p.layout == "shared":
                s.sub_(log_q)
            elif p.layout == "per_row":
                s.sub_(log_q[r0:r1])
            else:
                s.sub_(log_q[p.neg_idx[r0:r1]])
        mask = _chunk_mask(p, r0, r1, ws)
        if mask is not None:
            s.masked_fill_(mask, -math.inf)
            n = (N - mask.sum(dim=1)).to(acc)
        else:
            n = torch.full((c,), float(N), dtype=acc, device=dev)

        pos = None
        s_pos = None
        if p.has_pos:
            pos = p.pos[r0:r1].to(acc) if p.pos is not None else table[p.pos_idx[r0:r1]]
            s_pos = (q * pos).sum(dim=1) * inv_tau
            if p.pos_log_q is not None:
                s_pos = s_pos - p.pos_log_q[r0:r1].to(acc)

        loss_c, g_pos = row_math(spec, s, s_pos, n, ws.view(ws.aux, c, N))
        loss[r0:r1] = loss_c
        if not want_grad:
            continue

        # Chain rule through s = <q, v>/τ: scale g by row_scale/τ once, then GEMMs.
        scale = row_scale[r0:r1].to(acc) * inv_tau
        s.mul_(scale[:, None])
        g_pos = g_pos * scale if g_pos is not None else None
        if need_q:
            gq = grad_q[r0:r1]
            if p.layout == "shared":
                torch.mm(s, table, out=gq)
            else:
                torch.bmm(s[:, None, :], negs, out=gq[:, None, :])
            if g_pos is not None:
                gq.add_(g_pos[:, None] * pos)
        if grad_p is not None:
            torch.mul(g_pos[:, None], q, out=grad_p[r0:r1])
        if need_n:
            if p.layout == "shared":
                grad_neg.addmm_(s.T, q)
            elif p.layout == "per_row":
                torch.mul(s[:, :, None], q[:, None, :], out=grad_neg[r0:r1])
            else:  # the gathered negatives are no longer needed: reuse their buffer
                torch.mul(s[:, :, None], q[:, None, :], out=negs)
                _scatter_add(grad_neg, p.neg_idx[r0:r1].reshape(-1), negs.view(c * N, d), deterministic)
            if p.pos_idx is not None and g_pos is not None:
                _scatter_add(grad_neg, p.pos_idx[r0:r1], g_pos[:, None] * q, deterministic)
    return loss, grad_q, grad_p, grad_neg


def _scatter_add(dst: Tensor, index: Tensor, src: Tensor, deterministic: bool) -> None:
    if deterministic and dst.is_cuda:
        dst.index_put_((index,), src, accumulate=True)
    else:
        dst.index_add_(0, index, src)

"""The oracle: a direct, naive transcription of SPEC §2.

It materialises the full R×N score matrix (and, for the indexed layout, the R×N×d gathered
negatives) and lets autograd differentiate it. It is written for clarity, not speed, and runs in
whatever dtype it is given (float64 for the test oracle). A ``neg_idx`` entry outside [0, I) is a
masked negative (it reads table row 0, whose score is then replaced by −inf).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._problem import Problem
from .._spec import Kind, LossSpec


def valid_neg_idx(p: Problem) -> tuple[Tensor, Tensor]:
    """(neg_idx with entries outside [0, I) replaced by 0, the bool mask of those entries)."""
    outside = (p.neg_idx < 0) | (p.neg_idx >= p.neg.shape[0])
    return p.neg_idx.masked_fill(outside, 0), outside


def negative_vectors(p: Problem) -> Tensor:
    """The negatives of every row as an explicit [R, N, d] tensor (or [N, d] when shared)."""
    if p.layout == "indexed":
        return p.neg[valid_neg_idx(p)[0]]
    return p.neg


def positive_vectors(p: Problem) -> Tensor | None:
    if p.pos is not None:
        return p.pos
    if p.pos_idx is not None:
        return p.neg[p.pos_idx]
    return None


def scores(p: Problem) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """Return (s_pos [R] or None, s [R, N] with −inf where masked, n [R] unmasked counts, the mask)."""
    tau = p.temperature
    negs = negative_vectors(p)
    if p.layout == "shared":
        s = p.query @ negs.T / tau
    else:
        s = torch.einsum("rd,rnd->rn", p.query, negs) / tau
    masked = torch.zeros_like(s, dtype=torch.bool)
    if p.log_q is not None:
        s = s - (p.log_q[valid_neg_idx(p)[0]] if p.layout == "indexed" else p.log_q)
    if p.layout == "indexed":
        masked = masked | valid_neg_idx(p)[1]
    if p.neg_mask is not None:
        masked = masked | p.neg_mask
    if p.hit_pos_ids is not None:
        masked = masked | (p.hit_pos_ids[:, None] == p.hit_neg_ids)
    s = s.masked_fill(masked, -math.inf)
    n = (~masked).sum(dim=1).to(s.dtype)

    pos = positive_vectors(p)
    s_pos = None
    if pos is not None:
        s_pos = (p.query * pos).sum(dim=1) / tau
        if p.pos_log_q is not None:
            s_pos = s_pos - p.pos_log_q
    return s_pos, s, n, masked


def softplus(x: Tensor) -> Tensor:
    """log(1 + e^x), exact: ``F.softplus`` returns x itself above x = 20 (an error up to e^-20 ≈ 2e-9, which a
    float64 oracle must not have; e.g. BPR at τ = 0.125)."""
    return torch.logaddexp(x, torch.zeros_like(x))


def row_losses(p: Problem, spec: LossSpec) -> Tensor:
    """Per-row loss L_r, shape [R], differentiable by autograd."""
    s_pos, s, n, masked = scores(p)
    has_neg = n > 0
    if spec.kind == Kind.CONTRASTIVE:
        # Rows without negatives get finite dummy scores so that autograd does not meet
        # logsumexp(−inf, …, −inf); their loss is overwritten with 0 below.
        terms = torch.where(has_neg[:, None], s, torch.zeros_like(s))
        if s_pos is not None and spec.eps > 0:
            terms = torch.cat([(s_pos + math.log(spec.eps))[:, None], terms], dim=1)
        lse = torch.logsumexp(terms, dim=1)
        loss = spec.lam * (lse - spec.mu * torch.log(n.clamp(min=1))) + spec.z_loss * lse ** 2
        if spec.label_smoothing:  # α · (−mean of the unmasked candidates' scores)
            mean_s = torch.where(masked, torch.zeros_like(s), s).sum(dim=1) / n.clamp(min=1)
            loss = loss - spec.label_smoothing * mean_s
        if s_pos is not None:
            loss = loss - (1 - spec.label_smoothing) * s_pos
        # A row without negatives has no negative term: its loss is defined as 0.
        return torch.where(has_neg, loss, torch.zeros_like(loss))

    denom = torch.ones_like(n) if spec.neg_sum else n.clamp(min=1)
    if spec.kind == Kind.BPR:
        return softplus(s - s_pos[:, None]).sum(dim=1) / denom
    if spec.kind == Kind.BCE:
        return spec.beta * softplus(-s_pos) + softplus(s).sum(dim=1) / denom
    if spec.kind == Kind.CCL:
        return F.relu(1 - s_pos) + spec.neg_weight * F.relu(s - spec.margin).sum(dim=1) / denom
    raise ValueError(f"unknown loss kind {spec.kind!r}")

"""The oracle: a direct, naive transcription of SPEC §2.

It materialises the full R×N score matrix (and, for the indexed layout, the R×N×d gathered
negatives) and lets autograd differentiate it. It is written for clarity, not speed, and runs in
whatever dtype it is given (float64 for the test oracle).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._problem import Problem
from .._spec import Kind, LossSpec


def negative_vectors(p: Problem) -> Tensor:
    """The negatives of every row as an explicit [R, N, d] tensor (or [N, d] when shared)."""
    if p.layout == "indexed":
        return p.neg[p.neg_idx]
    return p.neg


def positive_vectors(p: Problem) -> Tensor | None:
    if p.pos is not None:
        return p.pos
    if p.pos_idx is not None:
        return p.neg[p.pos_idx]
    return None


def scores(p: Problem) -> tuple[Tensor | None, Tensor, Tensor]:
    """Return (s_pos [R] or None, s [R, N] with −inf where masked, n [R] unmasked counts)."""
    tau = p.temperature
    negs = negative_vectors(p)
    if p.layout == "shared":
        s = p.query @ negs.T / tau
    else:
        s = torch.einsum("rd,rnd->rn", p.query, negs) / tau
    if p.log_q is not None:
        s = s - (p.log_q[p.neg_idx] if p.layout == "indexed" else p.log_q)
    masked = torch.zeros_like(s, dtype=torch.bool)
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
    return s_pos, s, n


def row_losses(p: Problem, spec: LossSpec) -> Tensor:
    """Per-row loss L_r, shape [R], differentiable by autograd."""
    s_pos, s, n = scores(p)
    has_neg = n > 0
    if spec.kind == Kind.CONTRASTIVE:
        # Rows without negatives get finite dummy scores so that autograd does not meet
        # logsumexp(−inf, …, −inf); their loss is overwritten with 0 below.
        terms = torch.where(has_neg[:, None], s, torch.zeros_like(s))
        if s_pos is not None and spec.eps > 0:
            terms = torch.cat([(s_pos + math.log(spec.eps))[:, None], terms], dim=1)
        log_term = torch.logsumexp(terms, dim=1) - spec.mu * torch.log(n.clamp(min=1))
        loss = spec.lam * log_term
        if s_pos is not None:
            loss = loss - s_pos
        # A row without negatives has no negative term: its loss is defined as 0.
        return torch.where(has_neg, loss, torch.zeros_like(loss))

    denom = torch.ones_like(n) if spec.neg_sum else n.clamp(min=1)
    if spec.kind == Kind.BPR:
        return F.softplus(s - s_pos[:, None]).sum(dim=1) / denom
    if spec.kind == Kind.BCE:
        return spec.beta * F.softplus(-s_pos) + F.softplus(s).sum(dim=1) / denom
    if spec.kind == Kind.CCL:
        return F.relu(1 - s_pos) + spec.neg_weight * F.relu(s - spec.margin).sum(dim=1) / denom
    raise ValueError(f"unknown loss kind {spec.kind!r}")

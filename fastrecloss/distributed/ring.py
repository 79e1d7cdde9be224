"""The ring variant of cross-rank negatives (Inf-CL style): the global pool is never held by one rank.

Each rank's block of negatives travels once around the ring (point-to-point send to the next rank,
receive from the previous); at every step a rank folds the visiting block into its rows' online
log-sum-exp with the fused primitive. The backward travels the ring again, the block carrying the
gradient accumulated for it, and one last hop brings that gradient home. Peak extra memory per
rank: two blocks (max_k N_k × d) instead of the gathered pool (Σ_k N_k × d).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import functional as F
from .._ops import divide_by_temperature
from .._problem import BACKENDS, _check_float, _check_shape, check_choice, check_flag, check_temperature
from .._spec import acc_dtype
from ._comm import Group, resolve_group, temperature_code, temperature_value
from .gather import pool_sizes
from .sharded import unmasked_counts


def _pass_on(parts: list[Tensor | None], shapes: list[tuple[int, ...]], g: Group) -> list[Tensor | None]:
    """Send ``parts`` to the next rank and receive the previous rank's (of ``shapes``); empty ones stay home."""
    nxt = dist.get_global_rank(g.group, (g.rank + 1) % g.world) if g.group is not None else (g.rank + 1) % g.world
    prv = dist.get_global_rank(g.group, (g.rank - 1) % g.world) if g.group is not None else (g.rank - 1) % g.world
    bufs = [None if t is None else t.new_empty(shape) for t, shape in zip(parts, shapes)]
    ops = [dist.P2POp(dist.isend, t.contiguous(), nxt, g.group) for t in parts if t is not None and t.numel()]
    ops += [dist.P2POp(dist.irecv, b, prv, g.group) for b in bufs if b is not None and b.numel()]
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return bufs


def _shapes(block: list[Tensor | None], n: int) -> list[tuple[int, ...]]:
    return [(n, *t.shape[1:]) if t is not None else () for t in block]


def _block_lse(query: Tensor, block: list[Tensor | None], pos_ids: Tensor | None, opts: dict[str, Any]) -> Tensor:
    """log Σ over one block's unmasked negatives [R] (−inf for a row that has none in it)."""
    neg, log_q, ids = block
    lse = F.sampled_logsumexp(query, neg, log_q=log_q, neg_ids=ids, pos_ids=pos_ids,
                              remove_accidental_hits=ids is not None, **opts)
    n = unmasked_counts(query.shape[0], neg.shape[0], None, pos_ids if ids is not None else None, ids, query.device)
    return torch.where(n > 0, lse.to(acc_dtype(query.dtype)), -math.inf)


class _RingLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, query: Tensor, neg: Tensor, log_q: Tensor | None, ids: Tensor | None,
                pos_ids: Tensor | None, g: Group, sizes: list[int], opts: dict[str, Any]) -> Tensor:
        acc = acc_dtype(query.dtype)
        shift = torch.full((query.shape[0],), -math.inf, dtype=acc, device=query.device)
        total = torch.zeros_like(shift)
        block: list[Tensor | None] = [neg, log_q, ids]
        for step in range(g.world):
            lse_b = _block_lse(query, block, pos_ids, opts)
            new = torch.maximum(shift, lse_b)
            safe = torch.where(torch.isfinite(new), new, 0.0)
            total = total * torch.exp(shift - safe) + torch.exp(lse_b - safe)
            shift = new
            if step < g.world - 1:  # the block of rank − step − 1 comes next
                block = _pass_on(block, _shapes(block, sizes[(g.rank - step - 1) % g.world]), g)
        has = total > 0
        lse = torch.where(has, torch.where(has, shift, 0.0) + torch.log(torch.where(has, total, 1.0)), 0.0)
        ctx.save_for_backward(query, neg, log_q, ids, pos_ids, lse, has)
        ctx.g, ctx.sizes, ctx.opts = g, sizes, opts
        return lse.to(query.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        query, neg, log_q, ids, pos_ids, lse, has = ctx.saved_tensors
        g, sizes = ctx.g, ctx.sizes
        acc = lse.dtype
        weight = torch.where(has, grad.to(acc), 0.0)
        gq = torch.zeros(query.shape, dtype=acc, device=query.device)
        block: list[Tensor | None] = [neg, log_q, ids, torch.zeros(neg.shape, dtype=acc, device=neg.device)]
        for step in range(g.world):
            with torch.enable_grad():
                q = query.detach().requires_grad_()
                k = block[0].detach().requires_grad_()
                lse_b = _block_lse(q, [k, block[1], block[2]], pos_ids, ctx.opts)
                share = torch.where(torch.isfinite(lse_b), torch.exp(lse_b.detach() - lse), 0.0)
                gq_b, gk_b = torch.autograd.grad(lse_b, (q, k), grad_outputs=weight * share, allow_unused=True)
            gq += gq_b if gq_b is not None else 0.0
            block[3] = block[3] + (gk_b.to(acc) if gk_b is not None else 0.0)
            src = (g.rank - step - 1) % g.world
            if step < g.world - 1:
                block = _pass_on(block, _shapes(block, sizes[src]), g)
            else:  # one more hop brings each block's gradient to its owner
                block[3] = _pass_on([block[3]], _shapes([block[3]], sizes[g.rank]), g)[0]
        return gq.to(query.dtype), block[3].to(neg.dtype), None, None, None, None, None, None


def ring_logsumexp(query: Tensor, neg: Tensor, *, ids: Tensor | None = None, pos_ids: Tensor | None = None,
                   log_q: Tensor | None = None, temperature: float | Tensor = 1.0, group: Any = None,
                   backend: str = "auto", deterministic: bool = False) -> Tensor:
    """log Σ_j e^{s_rj} of this rank's rows ``query`` [R_k, d] over every rank's negatives ``neg``
    [N_k, d] — what ``gather_negatives`` + ``functional.sampled_logsumexp`` give — without ever
    holding the global pool: the blocks travel a ring (Inf-CL). ``ids`` [N_k] with ``pos_ids``
    [R_k] remove accidental hits (a row's own in-batch column too); ``log_q`` [N_k] corrects the
    scores. Returns [R_k] (0 for a row without any negative). Gradients follow
    :func:`gather_negatives`' convention (∂neg_k sums every rank's loss). Communication: K−1 hops
    of one block forward, K hops of a block and its fp32 gradient backward.

    In-batch InfoNCE over the global batch: ``lse = ring_logsumexp(q, p, ids=item_ids,
    pos_ids=item_ids)`` then ``loss = (torch.logaddexp(s_pos, lse) - s_pos).sum() / global_rows``
    with ``s_pos = (q * p).sum(-1) / τ``.
    """
    g = resolve_group(group)

    def more() -> list[int]:
        _check_float("query", query, 2, "[R, d]")
        if query.shape[1] != neg.shape[1] or query.dtype != neg.dtype or query.device != neg.device:
            raise ValueError(f"query must be [R, d = {neg.shape[1]}] in neg's dtype {neg.dtype} on {neg.device}, got "
                             f"{tuple(query.shape)} {query.dtype} on {query.device}")
        _check_shape("pos_ids", pos_ids, (query.shape[0],), "[R]", kind="int", device=query.device)
        if (ids is None) != (pos_ids is None):
            raise ValueError("accidental-hit removal needs both ids [N] (the negatives') and pos_ids [R] (the rows')")
        # checked here, collectively: the ring's first failure inside the forward would leave the other ranks
        # waiting for its block (a hang)
        check_choice("backend", backend, BACKENDS)
        check_flag("deterministic", deterministic)
        tau = check_temperature(temperature, query.device)
        return [temperature_code(tau), BACKENDS.index(backend), deterministic]

    sizes = pool_sizes(g, neg, ids, log_q, more, ("temperature", "backend (as a code)", "deterministic"),
                       {"temperature": temperature_value})
    if isinstance(temperature, Tensor):  # q/τ with τ = 1: ∂τ is this rank's rows' part, as the query tower's
        query, temperature = divide_by_temperature(query, temperature), 1.0
    opts = {"temperature": temperature, "backend": backend, "deterministic": deterministic}
    if g.world == 1:
        return F.sampled_logsumexp(query, neg, log_q=log_q, neg_ids=ids, pos_ids=pos_ids,
                                   remove_accidental_hits=ids is not None, **opts)
    return _RingLSE.apply(query, neg, log_q, ids, pos_ids, g, sizes, opts)

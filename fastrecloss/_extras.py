"""Options that rewrite a loss call into the core one, so every backend gets them without a new kernel.

* ``table_grad="sparse"``: the loss runs on ``table[rows]`` (rows = the sorted distinct items that
  ``neg_idx`` / ``pos_idx`` reference, indices remapped, per-item ``log_q`` / ``neg_bias`` sliced) and
  the table receives a coalesced sparse COO gradient of those rows (``torch.optim.SparseAdam``);
  softmax_ce touches every row, so there it only changes the gradient's layout. One host sync
  (``torch.unique``).
* ``neg_bias`` / ``pos_bias`` (added, differentiable): one more feature column, q' = [q/τ, 1] and
  v' = [v, b], so s' = s + b on every backend; O((N or I)·d) for the concatenated copy and d + 1 features.
* ``pos_idx`` [R, P] (several positives, ``ignore_index`` padding), contrastive family:
  L_r = −log Σ_p e^{s_rp} + λ(log(ε Σ_p e^{s_rp} + Σ_j e^{s_rj}) − μ log n_r), every positive excluded
  from the negatives (softmax_ce: the catalogue keeps them, L_r = −log Σ_p e^{s_rp} + log Σ_i e^{s_ri},
  LogInCE's formula for distinct positives); the negatives' log-sum-exp is the core ``sampled_logsumexp``
  on any backend, the positives' scores O(R·P·d) in PyTorch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import _ops
from ._problem import IGNORE_INDEX, _check_range, check_choice, check_temperature
from ._spec import Kind, LossSpec, acc_dtype, result_dtype

OPTIONS = ("table_grad", "neg_bias", "pos_bias")
TABLE_GRADS = ("dense", "sparse")


def wanted(common: dict[str, Any]) -> bool:
    pos_idx = common.get("pos_idx")
    return any(common.get(k) is not None for k in OPTIONS) or (isinstance(pos_idx, Tensor) and pos_idx.dim() == 2)


class _SparseRows(torch.autograd.Function):
    """table[rows] (rows sorted and distinct; None = every row) whose gradient is a coalesced sparse COO."""

    @staticmethod
    def forward(ctx, table: Tensor, rows: Tensor | None) -> Tensor:
        ctx.shape = table.shape
        ctx.save_for_backward(rows if rows is not None else torch.arange(table.shape[0], device=table.device))
        return table[rows] if rows is not None else table.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (rows,) = ctx.saved_tensors
        sparse = torch.sparse_coo_tensor(rows.unsqueeze(0), grad, ctx.shape, is_coalesced=True, check_invariants=False)
        return sparse, None


def _sparse_table(fn: str, neg: Tensor, common: dict[str, Any]) -> Tensor:
    mode = common.pop("table_grad", None) or "dense"
    check_choice("table_grad", mode, TABLE_GRADS)
    if mode == "dense":
        return neg
    if fn == "softmax_ce":
        return _SparseRows.apply(neg, None)
    refs = [common[k] for k in ("neg_idx", "pos_idx") if isinstance(common.get(k), Tensor)]
    if common.get("neg_idx") is None:
        raise ValueError("table_grad='sparse' needs an item table: the indexed layout (neg_idx) or softmax_ce")
    num_items = neg.shape[0]
    flat = torch.cat([r.reshape(-1).to(torch.int64) for r in refs])
    rows = torch.unique(flat[(flat >= 0) & (flat < num_items)])
    for key in ("neg_idx", "pos_idx"):
        idx = common.get(key)
        if isinstance(idx, Tensor):
            inside = (idx >= 0) & (idx < num_items)
            common[key] = torch.where(inside, torch.searchsorted(rows, idx.to(torch.int64)), idx.to(torch.int64))
    for key in ("log_q", "neg_bias"):
        value = common.get(key)
        if isinstance(value, Tensor) and value.dim() == 1 and value.shape[0] == num_items:
            common[key] = value[rows]
    return _SparseRows.apply(neg, rows)


def _bias_column(query: Tensor, pos: Tensor | None, neg: Tensor | None, common: dict[str, Any]
                 ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    neg_bias, pos_bias = common.pop("neg_bias", None), common.pop("pos_bias", None)
    if neg_bias is None and pos_bias is None:
        return query, pos, neg
    for name, b in (("neg_bias", neg_bias), ("pos_bias", pos_bias)):
        if b is not None and (not isinstance(b, Tensor) or not b.is_floating_point()):
            raise TypeError(f"{name} must be a floating-point tensor, got {type(b).__name__}")
    R = query.shape[0]
    in_batch = bool(common.get("in_batch"))
    if pos_bias is not None and (pos is None or in_batch):
        raise ValueError("pos_bias needs pos [R, d]; with pos_idx or in_batch the positive's bias is its item's "
                         "neg_bias entry")
    if pos_bias is not None and tuple(pos_bias.shape) != (R,):
        raise ValueError(f"pos_bias must have shape [R] = ({R},), got {tuple(pos_bias.shape)}")
    table = pos if in_batch else neg
    if table is None:
        raise ValueError("neg_bias needs the negatives (neg, or pos with in_batch=True)")
    lead = tuple(table.shape[:-1])
    if neg_bias is not None and tuple(neg_bias.shape) != lead:
        raise ValueError(f"neg_bias must have one entry per candidate, shape {lead} (like the negatives without "
                         f"d: [N], [R, N] or the table's [I]), got {tuple(neg_bias.shape)}")
    query, common["temperature"] = _ops.divide_by_temperature(query, common.get("temperature", 1.0)), 1.0
    ones = torch.ones(R, 1, dtype=query.dtype, device=query.device)

    def column(x: Tensor, b: Tensor | None) -> Tensor:
        b = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device) if b is None else b.to(x.dtype)
        return torch.cat([x, b.unsqueeze(-1)], dim=-1)

    if in_batch:
        return torch.cat([query, ones], dim=1), column(pos, neg_bias), None
    pos = column(pos, pos_bias) if pos is not None else None
    return torch.cat([query, ones], dim=1), pos, column(neg, neg_bias)


def prepare(fn: str, query: Tensor, pos: Tensor | None, neg: Tensor | None, common: dict[str, Any]
            ) -> tuple[Tensor, Tensor | None, Tensor | None, dict[str, Any]]:
    """The core call's (query, pos, neg, common) with the options above applied (``common`` is copied)."""
    common = dict(common)
    if not isinstance(query, Tensor) or (neg is not None and not isinstance(neg, Tensor)):
        return query, pos, neg, common  # the core validation names the argument
    # a tensor τ is used below (bias column, several positives) before the core validates it
    common["temperature"] = check_temperature(common.get("temperature", 1.0), query.device)
    if neg is not None:
        neg = _sparse_table(fn, neg, common)
    elif common.pop("table_grad", None) not in (None, "dense"):
        raise ValueError("table_grad='sparse' needs an item table: the indexed layout (neg_idx) or softmax_ce")
    query, pos, neg = _bias_column(query, pos, neg, common)
    return query, pos, neg, common


def _in_rows(ids: Tensor, sets: Tensor) -> Tensor:
    """``ids[r, j] ∈ sets[r, :]`` as a bool [R, N], by a sorted search per row: O(R·N + R·P) memory,
    never the R×N×P comparison."""
    if sets.shape[1] == 0:
        return torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    ids, ordered = ids.to(torch.int64).contiguous(), sets.to(torch.int64).sort(dim=1).values
    at = torch.searchsorted(ordered, ids).clamp_max(sets.shape[1] - 1)
    return ordered.gather(1, at) == ids


def multi_positive(fn: str, spec: LossSpec, query: Tensor, neg: Tensor, common: dict[str, Any],
                   lse: Any) -> Tensor:
    """Several positives per row (``pos_idx`` [R, P]); ``lse`` is the core ``sampled_logsumexp`` per row, in the
    accumulation dtype."""
    pos_idx = common.pop("pos_idx")
    if spec.kind != Kind.CONTRASTIVE or fn == "sampled_logsumexp":
        raise ValueError(f"pos_idx of shape [R, P] (several positives) is for the contrastive losses, not {fn}")
    for key in ("in_batch", "pos_ids", "remove_accidental_hits", "neg_ids"):
        if common.get(key):
            raise ValueError(f"{key} is not accepted with several positives (each positive is excluded already)")
    if neg is None or pos_idx.is_floating_point() or pos_idx.shape[0] != query.shape[0]:
        raise ValueError(f"pos_idx [R, P] indexes the item table neg with R = {query.shape[0]} rows")
    num_items, R = neg.shape[0], query.shape[0]
    neg_idx = common.get("neg_idx")
    if neg_idx is not None and (not isinstance(neg_idx, Tensor) or neg_idx.dim() != 2 or neg_idx.shape[0] != R
                                or neg_idx.is_floating_point()):
        got = f"{neg_idx.dtype} {tuple(neg_idx.shape)}" if isinstance(neg_idx, Tensor) else type(neg_idx).__name__
        raise ValueError(f"neg_idx must be an int tensor of shape [R, N] with R = {R}, got {got}")
    ignore = common.pop("ignore_index", IGNORE_INDEX)
    ce = fn == "softmax_ce"  # its arguments are target / table
    _check_range("target" if ce else "pos_idx", pos_idx, num_items, "table" if ce else "neg", ignore)  # as one positive
    weight, reduction = common.pop("weight", None), common.pop("reduction", "mean")
    tau, log_q = common.get("temperature", 1.0), common.get("log_q")
    pos_log_q = common.pop("pos_log_q", None)
    valid = (pos_idx >= 0) & (pos_idx < num_items) & (pos_idx != (ignore if ignore is not None else -1))
    safe = torch.where(valid, pos_idx, 0).to(torch.int64)
    if spec.label_smoothing or spec.z_loss:
        raise ValueError("label_smoothing and z_loss are not implemented with several positives")
    acc = acc_dtype(query.dtype)
    s_pos = (query.unsqueeze(1).to(acc) * neg[safe].to(acc)).sum(-1) / tau
    if pos_log_q is None and isinstance(log_q, Tensor) and log_q.dim() == 1 and log_q.shape[0] == num_items:
        pos_log_q = log_q[safe]
    if pos_log_q is not None:
        s_pos = s_pos - pos_log_q
    counted = valid.any(1)  # a row without a positive is ignored; one without negatives has loss 0 (SPEC §2)
    # rows without a positive get finite scores so that no NaN enters the backward (anomaly mode stays clean)
    s_pos = torch.where(counted.unsqueeze(1), s_pos.masked_fill(~valid, -math.inf), 0.0)
    lse_pos = torch.logsumexp(s_pos, dim=1)
    mask = common.pop("neg_mask", None)
    if fn != "softmax_ce":  # every positive leaves the negatives
        if neg_idx is not None:
            hit = _in_rows(neg_idx, torch.where(valid, pos_idx, -1))
        else:
            hit = torch.zeros(R, num_items + 1, dtype=torch.bool, device=query.device)
            hit.scatter_(1, torch.where(valid, safe, num_items), True)
            hit = hit[:, :num_items]
        mask = hit if mask is None else (mask | hit)
    if neg_idx is not None:
        usable = (neg_idx >= 0) & (neg_idx < num_items) & (neg_idx != (ignore if ignore is not None else -1))
    else:
        usable = torch.ones(R, num_items, dtype=torch.bool, device=query.device)
    n = (usable & ~mask).sum(1) if mask is not None else usable.sum(1).expand(R)
    lse_neg = lse(query, neg, neg_mask=mask, ignore_index=ignore, **common).to(acc)
    has_neg = n > 0
    lse_neg = torch.where(has_neg, lse_neg, -math.inf)
    denom = lse_neg if spec.eps == 0 else torch.logaddexp(lse_neg, lse_pos + math.log(spec.eps))
    rows = -lse_pos + spec.lam * (denom - spec.mu * torch.log(n.clamp_min(1).to(acc)))
    rows = torch.where(counted & has_neg, rows, 0.0)
    w = counted.to(acc) if weight is None else weight * counted.to(weight.dtype)
    return _ops.reduce_rows(rows, w, reduction).to(result_dtype(query.dtype, neg.dtype, query.device))

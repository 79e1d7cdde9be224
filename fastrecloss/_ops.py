"""Binds the backends to autograd as ``torch.library`` custom ops (SPEC §4).

Two ops share one signature (the :class:`Problem` flattened into tensors and scalars):

* ``fastrecloss::loss_rows`` returns the per-row losses [R]; its backward recomputes the scores
  with the upstream gradient as the row scale (used for ``reduction='none'``).
* ``fastrecloss::loss_scalar`` returns Σ_r row_scale_r · L_r *and* the gradients it needs,
  computed in the same pass; its backward only multiplies them by the (scalar) upstream gradient.
* ``fastrecloss::loss_rows_state`` (triton backend, per-row and indexed layouts) returns the
  per-row losses and the [3, R] row stats of the same pass; its backward,
  ``fastrecloss::grad_from_state``, is one gradient pass over the negatives (two reads of them per
  forward+backward instead of three).

Both have fake implementations, so ``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from ._problem import Problem
from ._spec import LossSpec, acc_dtype

_BACKEND_MODULES = {"torch": "fastrecloss.backends.torch", "triton": "fastrecloss.backends.triton"}
_TENSOR_FIELDS = ("query", "neg", "pos", "pos_idx", "neg_idx", "log_q", "pos_log_q", "hit_pos_ids",
                  "hit_neg_ids", "neg_mask")


def _backend(name: str):
    return importlib.import_module(_BACKEND_MODULES[name])


def _problem(tensors: tuple, layout: str, temperature: float) -> Problem:
    return Problem(layout, temperature=temperature, **dict(zip(_TENSOR_FIELDS, tensors)))


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _cast(g: Tensor | None, like: Tensor | None, fallback: Tensor) -> Tensor:
    """A gradient in its input's dtype, or an empty placeholder (custom ops return tensors only)."""
    if g is None or like is None:
        return _empty(fallback)
    return g.to(like.dtype)


@torch.library.custom_op("fastrecloss::loss_rows", mutates_args=())
def loss_rows(
    query: Tensor, neg: Tensor, pos: Tensor | None, pos_idx: Tensor | None, neg_idx: Tensor | None,
    log_q: Tensor | None, pos_log_q: Tensor | None, hit_pos_ids: Tensor | None, hit_neg_ids: Tensor | None,
    neg_mask: Tensor | None, layout: str, temperature: float, kind: int, params: list[float], backend: str,
    deterministic: bool,
) -> Tensor:
    p = _problem((query, neg, pos, pos_idx, neg_idx, log_q, pos_log_q, hit_pos_ids, hit_neg_ids, neg_mask),
                 layout, temperature)
    rows, *_ = _backend(backend).forward_backward(p, LossSpec.from_params(kind, params), None,
                                                  (False, False, False), deterministic)
    return rows


@loss_rows.register_fake
def _(query, neg, pos, pos_idx, neg_idx, log_q, pos_log_q, hit_pos_ids, hit_neg_ids, neg_mask, layout,
      temperature, kind, params, backend, deterministic):
    return query.new_empty(query.shape[0], dtype=acc_dtype(query.dtype))


def _rows_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:10])
    ctx.static = inputs[10:]


def _rows_backward(ctx, grad_rows):
    tensors = ctx.saved_tensors
    query, pos = tensors[0], tensors[2]
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[2] and pos is not None, ctx.needs_input_grad[1]]
    # The recomputation goes through the loss_scalar op rather than the backend directly, so that
    # torch.compile traces it as an opaque op with a fake implementation (the triton backend cannot
    # launch kernels on the fake tensors of a trace).
    _, gq, gp, gn = loss_scalar(*tensors, *ctx.static, grad_rows.to(acc_dtype(query.dtype)), needs)
    grads = [None] * 16
    grads[0] = gq if needs[0] else None
    grads[1] = gn if needs[2] else None
    grads[2] = gp if needs[1] else None
    return tuple(grads)


loss_rows.register_autograd(_rows_backward, setup_context=_rows_setup)


@torch.library.custom_op("fastrecloss::loss_scalar", mutates_args=())
def loss_scalar(
    query: Tensor, neg: Tensor, pos: Tensor | None, pos_idx: Tensor | None, neg_idx: Tensor | None,
    log_q: Tensor | None, pos_log_q: Tensor | None, hit_pos_ids: Tensor | None, hit_neg_ids: Tensor | None,
    neg_mask: Tensor | None, layout: str, temperature: float, kind: int, params: list[float], backend: str,
    deterministic: bool, row_scale: Tensor, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    p = _problem((query, neg, pos, pos_idx, neg_idx, log_q, pos_log_q, hit_pos_ids, hit_neg_ids, neg_mask),
                 layout, temperature)
    row_scale = row_scale.to(acc_dtype(query.dtype))
    rows, gq, gp, gn = _backend(backend).forward_backward(
        p, LossSpec.from_params(kind, params), row_scale if any(needs) else None, tuple(needs), deterministic)
    total = (rows * row_scale).sum()
    return total, _cast(gq, query, query), _cast(gp, pos, query), _cast(gn, neg, query)


@loss_scalar.register_fake
def _(query, neg, pos, pos_idx, neg_idx, log_q, pos_log_q, hit_pos_ids, hit_neg_ids, neg_mask, layout,
      temperature, kind, params, backend, deterministic, row_scale, needs):
    return (query.new_empty((), dtype=acc_dtype(query.dtype)), *_fake_grads(query, pos, neg, needs))


def _scalar_setup(ctx, inputs, output):
    _, gq, gp, gn = output
    ctx.save_for_backward(gq, gp, gn)
    ctx.mark_non_differentiable(gq, gp, gn)
    ctx.set_materialize_grads(False)  # the gradient outputs get no upstream gradient: no zero tensors


def _scalar_backward(ctx, grad_total, *_unused):
    gq, gp, gn = ctx.saved_tensors
    grads = [None] * 18

    def scaled(g):
        return (g * grad_total).to(g.dtype) if (g.numel() and grad_total is not None) else None

    grads[0], grads[1], grads[2] = scaled(gq), scaled(gn), scaled(gp)
    return tuple(grads)


loss_scalar.register_autograd(_scalar_backward, setup_context=_scalar_setup)


def _saves_state(backend: str, layout: str) -> bool:
    return backend == "triton" and _backend("triton").saves_state(layout)


@torch.library.custom_op("fastrecloss::loss_rows_state", mutates_args=())
def loss_rows_state(
    query: Tensor, neg: Tensor, pos: Tensor | None, pos_idx: Tensor | None, neg_idx: Tensor | None,
    log_q: Tensor | None, pos_log_q: Tensor | None, hit_pos_ids: Tensor | None, hit_neg_ids: Tensor | None,
    neg_mask: Tensor | None, layout: str, temperature: float, kind: int, params: list[float], backend: str,
    deterministic: bool,
) -> tuple[Tensor, Tensor]:
    p = _problem((query, neg, pos, pos_idx, neg_idx, log_q, pos_log_q, hit_pos_ids, hit_neg_ids, neg_mask),
                 layout, temperature)
    return _backend(backend).forward_state(p, LossSpec.from_params(kind, params), deterministic)


@loss_rows_state.register_fake
def _(query, neg, pos, pos_idx, neg_idx, log_q, pos_log_q, hit_pos_ids, hit_neg_ids, neg_mask, layout,
      temperature, kind, params, backend, deterministic):
    R = query.shape[0]
    return query.new_empty(R, dtype=acc_dtype(query.dtype)), query.new_empty(3, R, dtype=torch.float32)


def _state_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:10], output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.static = inputs[10:]


def _state_backward(ctx, grad_rows, _grad_state):
    *tensors, state = ctx.saved_tensors
    query, pos = tensors[0], tensors[2]
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[2] and pos is not None, ctx.needs_input_grad[1]]
    gq, gp, gn = grad_from_state(*tensors, *ctx.static, state, grad_rows.to(acc_dtype(query.dtype)), needs)
    grads = [None] * 16
    grads[0] = gq if needs[0] else None
    grads[1] = gn if needs[2] else None
    grads[2] = gp if needs[1] else None
    return tuple(grads)


loss_rows_state.register_autograd(_state_backward, setup_context=_state_setup)


@torch.library.custom_op("fastrecloss::grad_from_state", mutates_args=())
def grad_from_state(
    query: Tensor, neg: Tensor, pos: Tensor | None, pos_idx: Tensor | None, neg_idx: Tensor | None,
    log_q: Tensor | None, pos_log_q: Tensor | None, hit_pos_ids: Tensor | None, hit_neg_ids: Tensor | None,
    neg_mask: Tensor | None, layout: str, temperature: float, kind: int, params: list[float], backend: str,
    deterministic: bool, state: Tensor, row_scale: Tensor, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    p = _problem((query, neg, pos, pos_idx, neg_idx, log_q, pos_log_q, hit_pos_ids, hit_neg_ids, neg_mask),
                 layout, temperature)
    gq, gp, gn = _backend(backend).backward_from_state(p, LossSpec.from_params(kind, params), state, row_scale,
                                                       tuple(needs), deterministic)
    return _cast(gq, query, query), _cast(gp, pos, query), _cast(gn, neg, query)


@grad_from_state.register_fake
def _(query, neg, pos, pos_idx, neg_idx, log_q, pos_log_q, hit_pos_ids, hit_neg_ids, neg_mask, layout,
      temperature, kind, params, backend, deterministic, state, row_scale, needs):
    return _fake_grads(query, pos, neg, needs)


def _fake_grads(query: Tensor, pos: Tensor | None, neg: Tensor, needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    def like(t, need):
        return torch.empty_like(t) if (need and t is not None) else (t if t is not None else query).new_empty(0)

    return like(query, needs[0]), like(pos, needs[1] and pos is not None), like(neg, needs[2])


def reduce_rows(rows: Tensor, weight: Tensor | None, reduction: str) -> Tensor:
    """Weighted reduction of per-row losses: 'none' → w_r·L_r, 'sum', 'mean' (÷ Σ w, or ÷ R)."""
    if weight is not None:
        rows = rows * weight.to(rows.dtype)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if weight is None:
        return total / max(rows.shape[0], 1)
    return total / weight.to(rows.dtype).sum().clamp_min(torch.finfo(rows.dtype).tiny)


def apply(p: Problem, spec: LossSpec, backend: str, deterministic: bool, weight: Tensor | None,
          reduction: str) -> Tensor:
    """Run a fused backend with autograd; returns the reduced loss in the query's dtype."""
    args = [getattr(p, f) for f in _TENSOR_FIELDS]
    static = [p.layout, p.temperature, int(spec.kind), spec.params, backend, deterministic]
    dtype = p.query.dtype
    grad_on = torch.is_grad_enabled()
    acc = acc_dtype(dtype)
    # The per-row op recomputes the scores in its backward. It serves reduction='none', a weight
    # that needs a gradient (∂loss/∂w_r = L_r), and the layouts whose negatives' gradient is large:
    # per-row (as large as the input) and indexed (the whole item table). There, recomputing the
    # scores costs less than keeping that gradient from the forward and scaling a copy of it by the
    # upstream gradient (which would hold the table gradient twice). Otherwise the fused scalar op
    # computes the gradients in the forward and treats the row scale as a constant.
    recompute = p.layout != "shared" or (weight is not None and weight.requires_grad and grad_on)
    if reduction == "none" or recompute:
        rows = loss_rows_state(*args, *static)[0] if _saves_state(backend, p.layout) else loss_rows(*args, *static)
        return reduce_rows(rows, weight, reduction).to(dtype)
    needs = [grad_on and p.query.requires_grad,
             grad_on and p.pos is not None and p.pos.requires_grad,
             grad_on and p.neg.requires_grad]
    row_scale = weight.to(acc) if weight is not None else torch.ones(p.R, dtype=acc, device=p.query.device)
    if reduction == "mean":
        row_scale = row_scale / row_scale.sum().clamp_min(torch.finfo(acc).tiny)
    total, *_ = loss_scalar(*args, *static, row_scale, needs)
    return total.to(dtype)

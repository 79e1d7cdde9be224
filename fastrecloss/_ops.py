"""Binds the backends to autograd (SPEC §4): one autograd rule, two bindings.

Two entry points share one signature (the :class:`Problem` flattened into tensors and scalars):

* ``loss_rows`` returns the per-row losses [R]; its backward recomputes the scores with the
  upstream gradient as the row scale (used for ``reduction='none'``).
* ``loss_scalar`` returns Σ_r row_scale_r · L_r *and* the gradients it needs, computed in the same
  pass and kept in the accumulation dtype (fp32); its backward multiplies them by the upstream
  gradient and only then casts each to its input's dtype, so a loss scale (GradScaler) protects
  small 16-bit gradients.
* ``loss_rows_state`` (triton backend, per-row and indexed layouts) returns the per-row losses and
  the [4, R] fp32 row stats of the same pass; its backward, ``grad_from_state``, is one gradient
  pass over the negatives (two reads of them per forward+backward instead of three).

Under ``torch.compile`` they are ``torch.library`` custom ops (``fastrecloss::loss_rows`` /
``::loss_scalar``) with fake implementations, so ``fullgraph=True`` traces through them. In eager
mode the same functions run as plain ``torch.autograd.Function``s: a custom op's first call
imports ``torch._dynamo`` (and with it inductor, sympy and triton), which an eager CPU user should
not pay for. Double backward (``create_graph=True``) is not implemented: the first-order
gradients come back carrying a node that raises a clear error if they are differentiated.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor
from torch._C import _functions as _autograd_nodes

from ._problem import Problem
from ._spec import LossSpec, acc_dtype

_BACKEND_MODULES = {"torch": "fastrecloss.backends.torch", "triton": "fastrecloss.backends.triton"}
_TENSOR_FIELDS = ("query", "neg", "pos", "pos_idx", "neg_idx", "log_q", "pos_log_q", "hit_pos_ids",
                  "hit_neg_ids", "neg_mask")
_DOUBLE_BACKWARD = (b"fastrecloss: double backward (create_graph=True, e.g. a gradient penalty) is not "
                    b"implemented for the fused losses; use backend='reference', whose autograd graph supports it")


def _backend(name: str):
    return importlib.import_module(_BACKEND_MODULES[name])


def _problem(tensors: tuple, layout: str, temperature: float) -> Problem:
    return Problem(layout, temperature=temperature, **dict(zip(_TENSOR_FIELDS, tensors)))


def _grad_or_empty(g: Tensor | None, fallback: Tensor) -> Tensor:
    """A gradient (accumulation dtype), or an empty placeholder (custom ops return tensors only)."""
    return fallback.new_empty(0) if g is None else g


def _rows_impl(
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


def _scalar_impl(
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
    return total, _grad_or_empty(gq, query), _grad_or_empty(gp, query), _grad_or_empty(gn, query)


def _state_impl(
    query: Tensor, neg: Tensor, pos: Tensor | None, pos_idx: Tensor | None, neg_idx: Tensor | None,
    log_q: Tensor | None, pos_log_q: Tensor | None, hit_pos_ids: Tensor | None, hit_neg_ids: Tensor | None,
    neg_mask: Tensor | None, layout: str, temperature: float, kind: int, params: list[float], backend: str,
    deterministic: bool,
) -> tuple[Tensor, Tensor]:
    p = _problem((query, neg, pos, pos_idx, neg_idx, log_q, pos_log_q, hit_pos_ids, hit_neg_ids, neg_mask),
                 layout, temperature)
    return _backend(backend).forward_state(p, LossSpec.from_params(kind, params), deterministic)


def _grad_state_impl(
    query: Tensor, neg: Tensor, pos: Tensor | None, pos_idx: Tensor | None, neg_idx: Tensor | None,
    log_q: Tensor | None, pos_log_q: Tensor | None, hit_pos_ids: Tensor | None, hit_neg_ids: Tensor | None,
    neg_mask: Tensor | None, layout: str, temperature: float, kind: int, params: list[float], backend: str,
    deterministic: bool, state: Tensor, row_scale: Tensor, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    p = _problem((query, neg, pos, pos_idx, neg_idx, log_q, pos_log_q, hit_pos_ids, hit_neg_ids, neg_mask),
                 layout, temperature)
    gq, gp, gn = _backend(backend).backward_from_state(p, LossSpec.from_params(kind, params), state, row_scale,
                                                       tuple(needs), deterministic)
    return _grad_or_empty(gq, query), _grad_or_empty(gp, query), _grad_or_empty(gn, query)


loss_rows = torch.library.custom_op("fastrecloss::loss_rows", mutates_args=())(_rows_impl)
loss_scalar = torch.library.custom_op("fastrecloss::loss_scalar", mutates_args=())(_scalar_impl)
loss_rows_state = torch.library.custom_op("fastrecloss::loss_rows_state", mutates_args=())(_state_impl)
grad_from_state = torch.library.custom_op("fastrecloss::grad_from_state", mutates_args=())(_grad_state_impl)


@loss_rows.register_fake
def _(query, neg, pos, pos_idx, neg_idx, log_q, pos_log_q, hit_pos_ids, hit_neg_ids, neg_mask, layout,
      temperature, kind, params, backend, deterministic):
    return query.new_empty(query.shape[0], dtype=acc_dtype(query.dtype))


def _fake_grads(query: Tensor, pos: Tensor | None, neg: Tensor, needs: list[bool],
                dtypes: tuple[torch.dtype, ...] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Fake gradients in the accumulation dtype (or ``dtypes`` per input), empty where not needed."""
    acc = acc_dtype(query.dtype)
    dq, dp, dn = dtypes or (acc, acc, acc)

    def like(t, need, dtype):
        return t.new_empty(t.shape, dtype=dtype) if (need and t is not None) else query.new_empty(0)

    return like(query, needs[0], dq), like(pos, needs[1] and pos is not None, dp), like(neg, needs[2], dn)


@loss_scalar.register_fake
def _(query, neg, pos, pos_idx, neg_idx, log_q, pos_log_q, hit_pos_ids, hit_neg_ids, neg_mask, layout,
      temperature, kind, params, backend, deterministic, row_scale, needs):
    return query.new_empty((), dtype=acc_dtype(query.dtype)), *_fake_grads(query, pos, neg, needs)


@loss_rows_state.register_fake
def _(query, neg, pos, pos_idx, neg_idx, log_q, pos_log_q, hit_pos_ids, hit_neg_ids, neg_mask, layout,
      temperature, kind, params, backend, deterministic):
    R = query.shape[0]
    return query.new_empty(R, dtype=acc_dtype(query.dtype)), query.new_empty(4, R, dtype=torch.float32)


@grad_from_state.register_fake
def _(query, neg, pos, pos_idx, neg_idx, log_q, pos_log_q, hit_pos_ids, hit_neg_ids, neg_mask, layout,
      temperature, kind, params, backend, deterministic, state, row_scale, needs):
    acc = acc_dtype(query.dtype)
    return _fake_grads(query, pos, neg, needs, (acc, acc, neg.dtype if layout == "per_row" else acc))


def _first_order_only(grads: list[Tensor | None]) -> tuple[Tensor | None, ...]:
    """With create_graph=True (grad mode on inside backward), the gradients get a node that raises
    when they are differentiated again, instead of silently carrying no graph."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return tuple(grads)
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return tuple(grads)
    guarded = _autograd_nodes.DelayedError(_DOUBLE_BACKWARD, len(present))(
        *[grads[i].detach().requires_grad_() for i in present])
    guarded = guarded if isinstance(guarded, tuple) else (guarded,)
    out = list(grads)
    for i, g in zip(present, guarded):
        out[i] = g
    return tuple(out)


def _rows_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:10])
    ctx.static = inputs[10:]


def _rows_backward(ctx, grad_rows):
    tensors = ctx.saved_tensors
    query, neg, pos = tensors[0], tensors[1], tensors[2]
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[2] and pos is not None, ctx.needs_input_grad[1]]
    # Under torch.compile the recomputation goes through the loss_scalar op rather than the backend
    # directly, so that it is traced as an opaque op with a fake implementation (the triton backend
    # cannot launch kernels on the fake tensors of a trace).
    scalar = _scalar_impl if getattr(ctx, "eager", False) else loss_scalar
    with torch.no_grad():
        _, gq, gp, gn = scalar(*tensors, *ctx.static, grad_rows.to(acc_dtype(query.dtype)), needs)
    grads: list[Tensor | None] = [None] * 16
    grads[0] = gq.to(query.dtype) if needs[0] else None
    grads[1] = gn.to(neg.dtype) if needs[2] else None
    grads[2] = gp.to(pos.dtype) if needs[1] else None
    return _first_order_only(grads)


def _scalar_setup(ctx, inputs, output):
    _, gq, gp, gn = output
    ctx.save_for_backward(gq, gp, gn)
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype, inputs[2].dtype if inputs[2] is not None else None)
    # an empty input (R = 0, N = 0, an empty table) has an empty gradient, as in autograd, not None
    ctx.empty = tuple(t.shape if t is not None and t.numel() == 0 else None for t in inputs[:3])
    ctx.mark_non_differentiable(gq, gp, gn)
    ctx.set_materialize_grads(False)  # the gradient outputs get no upstream gradient: no zero tensors


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph / create_graph); True outside one."""
    keeps = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keeps is None else bool(keeps())


def _scalar_backward(ctx, grad_total, *_unused):
    gq, gp, gn = ctx.saved_tensors
    dq, dn, dp = ctx.dtypes
    # The saved gradients belong to this node alone. When the graph is freed after this backward,
    # they are scaled in place: an item-table or per-row gradient is held once, not twice.
    in_place = getattr(ctx, "eager", False) and not _graph_kept()

    def scaled(g: Tensor, dtype: torch.dtype | None, i: int) -> Tensor | None:
        # fp32 × upstream first, then the input's dtype: a loss scale lifts small gradients above
        # the 16-bit underflow before the cast.
        if grad_total is None or not ctx.needs_input_grad[i]:
            return None
        if not g.numel():  # not computed, or an empty input's
            return None if ctx.empty[i] is None else g.new_zeros(ctx.empty[i], dtype=dtype)
        return (g.mul_(grad_total) if in_place else g * grad_total).to(dtype)

    grads: list[Tensor | None] = [None] * 18
    with torch.no_grad():
        grads[0], grads[1], grads[2] = scaled(gq, dq, 0), scaled(gn, dn, 1), scaled(gp, dp, 2)
    return _first_order_only(grads)


def _state_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:10], output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.static = inputs[10:]


def _state_backward(ctx, grad_rows, _grad_state):
    *tensors, state = ctx.saved_tensors
    query, neg, pos = tensors[0], tensors[1], tensors[2]
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[2] and pos is not None, ctx.needs_input_grad[1]]
    grad_op = _grad_state_impl if getattr(ctx, "eager", False) else grad_from_state
    with torch.no_grad():  # the row scale is the upstream gradient: these gradients are final
        gq, gp, gn = grad_op(*tensors, *ctx.static, state, grad_rows.to(acc_dtype(query.dtype)), needs)
    grads: list[Tensor | None] = [None] * 16
    grads[0] = gq.to(query.dtype) if needs[0] else None
    grads[1] = gn.to(neg.dtype) if needs[2] else None
    grads[2] = gp.to(pos.dtype) if needs[1] else None
    return _first_order_only(grads)


loss_rows.register_autograd(_rows_backward, setup_context=_rows_setup)
loss_scalar.register_autograd(_scalar_backward, setup_context=_scalar_setup)
loss_rows_state.register_autograd(_state_backward, setup_context=_state_setup)


def _eager_setup(setup):
    def setup_context(ctx, inputs, output):
        setup(ctx, inputs, output)
        ctx.eager = True

    return staticmethod(setup_context)


class _EagerRows(torch.autograd.Function):
    """``loss_rows`` outside torch.compile: the same implementation and autograd rule, no custom op."""

    forward = staticmethod(_rows_impl)
    setup_context = _eager_setup(_rows_setup)
    backward = staticmethod(_rows_backward)


class _EagerScalar(torch.autograd.Function):
    forward = staticmethod(_scalar_impl)
    setup_context = _eager_setup(_scalar_setup)
    backward = staticmethod(_scalar_backward)


class _EagerState(torch.autograd.Function):
    forward = staticmethod(_state_impl)
    setup_context = _eager_setup(_state_setup)
    backward = staticmethod(_state_backward)


def _saves_state(backend: str, layout: str) -> bool:
    """The triton backend's per-row and indexed forwards save row stats for a one-pass backward
    (plain Python: traced by torch.compile without importing the backend)."""
    return backend == "triton" and layout != "shared"


class _ScaleQuery(torch.autograd.Function):
    """query / τ for a 0-dim tensor τ, in the accumulation dtype, rounded once to the query's dtype.

    τ enters every loss only through s = <q, v>/τ (− logq, + a bias: terms that do not scale with τ),
    so the fused losses run on q' = q/τ with τ = 1 and ∂L/∂τ = −(1/τ) Σ_r <q'_r, ∂L/∂q'_r>: O(R·d), no
    new kernel, and the kernels read τ once, through q', without a host sync. The backward is made of
    differentiable ops, so it is as twice-differentiable as the gradient it is given."""

    @staticmethod
    def forward(ctx, query: Tensor, tau: Tensor) -> Tensor:
        ctx.save_for_backward(query, tau)
        acc = acc_dtype(query.dtype)
        return (query.to(acc) / tau.to(acc)).to(query.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        query, tau = ctx.saved_tensors
        acc = acc_dtype(query.dtype)
        g, t = grad.to(acc), tau.to(acc)
        grad_q = (g / t).to(query.dtype) if ctx.needs_input_grad[0] else None
        grad_tau = (-(query.to(acc) * g).sum() / (t * t)).to(tau.dtype) if ctx.needs_input_grad[1] else None
        return grad_q, grad_tau


def divide_by_temperature(query: Tensor, temperature: float | Tensor) -> Tensor:
    """q / τ: a float τ by plain division, a tensor τ by :class:`_ScaleQuery` (fp32 scale, fp32 ∂τ)."""
    return _ScaleQuery.apply(query, temperature) if isinstance(temperature, Tensor) else query / temperature


def reduce_rows(rows: Tensor, weight: Tensor | None, reduction: str) -> Tensor:
    """Weighted reduction of per-row losses: 'none' → w_r·L_r, 'sum', 'mean' (÷ Σ w, or ÷ R), in the wider
    of the two dtypes (a small fp32 weight does not flush to 0 against 16-bit rows)."""
    if weight is not None:
        wide = torch.promote_types(rows.dtype, weight.dtype)
        rows, weight = rows.to(wide), weight.to(wide)
        rows = rows * weight
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if weight is None:
        return total / max(rows.shape[0], 1)
    # Σ w = 0 (every row ignored): loss 0 and zero gradients, for the weights too (never 0/0 or L/tiny).
    wsum = weight.to(rows.dtype).sum()
    counted = wsum > 0
    return torch.where(counted, total / torch.where(counted, wsum, 1), 0)



def apply(p: Problem, spec: LossSpec, backend: str, deterministic: bool, weight: Tensor | None,
          reduction: str) -> Tensor:
    """Run a fused backend with autograd; returns the reduced loss in the accumulation dtype."""
    args = [getattr(p, f) for f in _TENSOR_FIELDS]
    static = [p.layout, p.temperature, int(spec.kind), spec.params, backend, deterministic]
    compiling = torch.compiler.is_compiling()
    rows_op = loss_rows if compiling else _EagerRows.apply
    scalar_op = loss_scalar if compiling else _EagerScalar.apply
    grad_on = torch.is_grad_enabled()
    acc = acc_dtype(p.query.dtype)
    # The per-row op recomputes the scores in its backward. It serves reduction='none' and a weight
    # that needs a gradient (∂loss/∂w_r = L_r). The triton backend's per-row and indexed forwards
    # save the row stats for a one-pass backward instead. Otherwise the fused scalar op computes the
    # gradients in the forward (one gather of the negatives, not two) and treats the row scale as a
    # constant; its backward scales them in place, so even the large ones (per-row: as large as the
    # input; indexed: the whole item table) are held once.
    recompute = weight is not None and weight.requires_grad and grad_on
    if reduction == "none" or recompute or _saves_state(backend, p.layout):
        if _saves_state(backend, p.layout):  # forward saves the row stats: a one-pass backward
            rows = (loss_rows_state if compiling else _EagerState.apply)(*args, *static)[0]
        else:
            rows = rows_op(*args, *static)
        return reduce_rows(rows, weight, reduction)
    needs = [grad_on and p.query.requires_grad,
             grad_on and p.pos is not None and p.pos.requires_grad,
             grad_on and p.neg.requires_grad]
    row_scale = weight.to(acc) if weight is not None else torch.ones(p.R, dtype=acc, device=p.query.device)
    if reduction == "mean":
        row_scale = row_scale / row_scale.sum().clamp_min(torch.finfo(acc).tiny)
    total, *_ = scalar_op(*args, *static, row_scale, needs)
    return total

"""The public functional API (SPEC §4): validate, then dispatch to a backend.

Every loss is a :class:`~fastrecloss._spec.LossSpec` handed to one core per layout; the
functions below only name the parameterisation. Common keywords:

``temperature`` τ (a float, or a 0-dim tensor whose gradient is returned: README "Learnable
temperature"); ``neg_idx`` [R, N] (indexed layout, ``neg`` is then the item table [I, d]);
``pos_idx`` [R] (positives as rows of ``neg``); ``log_q`` / ``pos_log_q`` sampling corrections
subtracted from the scores (``pos_log_q`` defaults to the positive's own ``log_q`` entry when the
positive is one of the candidates ``log_q`` corrects: in-batch, or ``pos_idx`` with a per-item
``log_q``); ``pos_ids`` / ``neg_ids`` with ``remove_accidental_hits=True`` mask negatives that
are the row's own positive; ``neg_mask`` (bool, True = excluded); ``in_batch=True`` uses ``pos``
as the shared negatives (row r's positive is column r, which is excluded); ``weight`` [R] per-row
weights (finite, ≥ 0; 0 ignores a row); ``reduction`` 'mean' (divides by the summed weight),
'sum' or 'none'; ``backend`` 'auto', 'reference', 'torch' or 'triton'; ``deterministic``
bit-identical item gradients run to run; ``ignore_index`` (−100) a ``pos_idx``/target equal to
it ignores the row, a ``neg_idx`` entry equal to it is a masked negative. README "Conventions".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from . import _extras, _ops
from ._problem import BACKENDS, IGNORE_INDEX, REDUCTIONS, Problem, build_problem, check_choice, check_flag, check_weight
from ._spec import Kind, LossSpec, acc_dtype, autocast_on, contrastive, neg_sum_flag, result_dtype
from .backends import reference

__all__ = [
    "sampled_logsumexp", "infonce", "infonce_plus", "dcl", "mine", "mine_plus", "softmax_ce",
    "bpr", "bce", "ccl", "compute_loss",
]

COMMON = ("temperature", "neg_idx", "pos_idx", "log_q", "pos_log_q", "pos_ids", "neg_ids", "remove_accidental_hits",
          "neg_mask", "in_batch", "weight", "reduction", "backend", "deterministic", "ignore_index",
          *_extras.OPTIONS)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, query: Tensor) -> str:
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "triton" if (query.is_cuda and triton_available()) else "torch"
    if backend == "triton" and not triton_available():
        raise ValueError("backend='triton' needs the triton package: pip install 'fastrecloss[triton]'")
    return backend


@contextlib.contextmanager
def _named(fn: str) -> Iterator[None]:
    """Prefix validation errors with the public function's name."""
    try:
        yield
    except (ValueError, TypeError) as e:
        if str(e).startswith(f"{fn}: "):
            raise
        raise type(e)(f"{fn}: {e}") from None


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that turns autocast off: the backends choose their own precision."""
    return torch.autocast(device.type, enabled=False) if autocast_on(device) else contextlib.nullcontext()


def compute_loss(
    spec: LossSpec,
    query: Tensor,
    pos: Tensor | None,
    neg: Tensor | None,
    *,
    temperature: float | Tensor = 1.0,
    neg_idx: Tensor | None = None,
    pos_idx: Tensor | None = None,
    log_q: Tensor | None = None,
    pos_log_q: Tensor | None = None,
    pos_ids: Tensor | None = None,
    neg_ids: Tensor | None = None,
    remove_accidental_hits: bool = False,
    neg_mask: Tensor | None = None,
    in_batch: bool = False,
    weight: Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    deterministic: bool = False,
    ignore_index: int | None = IGNORE_INDEX,
    _need_pos: bool = True,
    _name: str = "compute_loss",
    _names: Mapping[str, str] | None = None,
    _acc_out: bool = False,
) -> Tensor:
    """Any loss of SPEC §2 given as a :class:`LossSpec` (the named functions call this).

    Returns the loss in the inputs' dtype (float32 for mixed 16-bit/fp32 inputs, and under
    ``torch.autocast`` as ``F.cross_entropy`` does), accumulated in fp32 (fp64 for fp64 inputs)."""
    with _named(_name):
        check_choice("reduction", reduction, REDUCTIONS)
        check_flag("deterministic", deterministic)
        p = build_problem(query, pos, neg, temperature=temperature, neg_idx=neg_idx, pos_idx=pos_idx, log_q=log_q,
                          pos_log_q=pos_log_q, pos_ids=pos_ids, neg_ids=neg_ids,
                          remove_accidental_hits=remove_accidental_hits, neg_mask=neg_mask, in_batch=in_batch,
                          need_pos=_need_pos, ignore_index=ignore_index, names=_names)
        check_weight(weight, p.R, query.device)
        if spec.kind != Kind.CONTRASTIVE and not p.has_pos:
            raise ValueError("bpr/bce/ccl need a positive: pass pos [R, d] or pos_idx [R]")
        name = resolve_backend(backend, query)
    if p.keep is not None:  # rows whose target is ignore_index count with weight 0
        weight = p.keep.to(acc_dtype(p.query.dtype)) if weight is None else weight * p.keep.to(weight.dtype)
    # _acc_out: an intermediate for another formula (several positives) stays in the accumulation dtype
    out_dtype = acc_dtype(p.query.dtype) if _acc_out else result_dtype(p.query.dtype, None, p.query.device)
    if isinstance(p.temperature, Tensor) and name != "reference":  # a learnable τ: the kernels get q/τ and τ = 1
        p.query, p.temperature = _ops.divide_by_temperature(p.query, p.temperature), 1.0
    with _autocast_off(p.query.device):
        if name == "reference":
            rows = reference.row_losses(p, spec) if p.R else _empty_rows(p)
            loss = _ops.reduce_rows(rows, weight, reduction)
        else:
            loss = _ops.apply(p, spec, name, deterministic, weight, reduction)
    return loss.to(out_dtype)


def _empty_rows(p: Problem) -> Tensor:
    """The reference's [0] row losses of an empty batch, connected to every input that takes a gradient
    (zeros for the table or negatives, as autograd gives through a formula with no row)."""
    zero = sum(t.sum() * 0 for t in (p.neg, p.pos, p.temperature) if isinstance(t, Tensor) and t.is_floating_point())
    return p.query.sum(dim=1) * 0 + zero


_SPECS: dict[str, Callable[..., LossSpec]] = {
    "sampled_logsumexp": lambda: contrastive(0.0, 1.0, 0.0),
    "infonce": lambda: contrastive(1.0, 1.0, 0.0),
    "infonce_plus": lambda eps, lam: contrastive(eps, lam, 0.0),
    "dcl": lambda: contrastive(0.0, 1.0, 0.0),
    "mine": lambda: contrastive(0.0, 1.0, 1.0),
    "mine_plus": lambda lam: contrastive(0.0, lam, 1.0),
    "softmax_ce": lambda label_smoothing, z_loss: contrastive(0.0, 1.0, 0.0, label_smoothing=label_smoothing,
                                                              z_loss=z_loss),
    "bpr": lambda neg_reduction: LossSpec(Kind.BPR, neg_sum=neg_sum_flag(neg_reduction)),
    "bce": lambda beta, neg_reduction: LossSpec(Kind.BCE, beta=beta, neg_sum=neg_sum_flag(neg_reduction)),
    "ccl": lambda margin, neg_weight, neg_reduction: LossSpec(Kind.CCL, margin=margin, neg_weight=neg_weight,
                                                              neg_sum=neg_sum_flag(neg_reduction)),
}


def loss_spec(fn: str, _name: str | None = None, **hparams: Any) -> LossSpec:
    """The :class:`LossSpec` of the named loss with these hyper-parameters (errors name ``_name``, else ``fn``)."""
    with _named(_name or fn):
        return _SPECS[fn](**hparams)


def _loss(fn: str, query: Tensor, pos: Tensor | None, neg: Tensor | None, common: dict[str, Any],
          hparams: dict[str, Any] | None = None, **internal: Any) -> Tensor:
    """Run the named loss; errors name ``fn`` (and its own argument names)."""
    with _named(fn):
        unknown = sorted(set(common) - set(COMMON))
        if unknown:
            raise TypeError(f"got an unexpected keyword argument {unknown[0]!r}; the keywords are: "
                            f"{', '.join(COMMON)}")
    spec = loss_spec(fn, **(hparams or {}))
    if _extras.wanted(common):  # sparse table gradient, item bias, several positives
        with _named(fn):
            query, pos, neg, common = _extras.prepare(fn, query, pos, neg, common)
            pos_idx = common.get("pos_idx")
            if isinstance(pos_idx, Tensor) and pos_idx.dim() == 2:
                return _extras.multi_positive(fn, spec, query, neg, common, _row_logsumexp(fn))
    return compute_loss(spec, query, pos, neg, _name=fn, **internal, **common)


def _row_logsumexp(fn: str) -> Callable[..., Tensor]:
    """The per-row corrected log-sum-exp in the accumulation dtype (errors name ``fn``): a 16-bit result
    would round lse (|lse| ≈ 20 at τ = 0.05 → ±0.06 in bf16) before the difference that makes the loss."""
    def lse(query: Tensor, neg: Tensor, **common: Any) -> Tensor:
        return compute_loss(loss_spec("sampled_logsumexp"), query, None, neg, reduction="none", _need_pos=False,
                            _name=fn, _acc_out=True, **common)

    return lse


def sampled_logsumexp(query: Tensor, neg: Tensor, *, reduction: str = "none", **common: Any) -> Tensor:
    """Corrected log-sum-exp over the negatives, log Σ_j e^{s_rj}, per row [R] (0 for an empty row)."""
    return _loss("sampled_logsumexp", query, None, neg, {"reduction": reduction, **common}, _need_pos=False)


def infonce(query: Tensor, pos: Tensor | None, neg: Tensor | None, **common: Any) -> Tensor:
    """InfoNCE / sampled softmax: −s+ + log(e^{s+} + Σ_j e^{s_j}); with log_q = corrected SSM."""
    return _loss("infonce", query, pos, neg, common)


def infonce_plus(query: Tensor, pos: Tensor | None, neg: Tensor | None, *, eps: float = 0.0, lam: float = 1.1,
                 **common: Any) -> Tensor:
    """InfoNCE+ (Dong et al. 2023): −s+ + λ log(ε e^{s+} + Σ_j e^{s_j})."""
    return _loss("infonce_plus", query, pos, neg, common, {"eps": eps, "lam": lam})


def dcl(query: Tensor, pos: Tensor | None, neg: Tensor | None, **common: Any) -> Tensor:
    """Decoupled contrastive loss: −s+ + log Σ_j e^{s_j} (positive removed from the denominator)."""
    return _loss("dcl", query, pos, neg, common)


def mine(query: Tensor, pos: Tensor | None, neg: Tensor | None, **common: Any) -> Tensor:
    """MINE: −s+ + log mean_j e^{s_j}."""
    return _loss("mine", query, pos, neg, common)


def mine_plus(query: Tensor, pos: Tensor | None, neg: Tensor | None, *, lam: float = 1.1, **common: Any) -> Tensor:
    """MINE+ (Dong et al. 2023): −s+ + λ log mean_j e^{s_j}."""
    return _loss("mine_plus", query, pos, neg, common, {"lam": lam})


def softmax_ce(query: Tensor, table: Tensor, target: Tensor, *, label_smoothing: float = 0.0, z_loss: float = 0.0,
               **common: Any) -> Tensor:
    """Full-catalogue softmax cross-entropy: −s_target + log Σ_{i∈catalogue} e^{s_i}.

    ``table`` [I, d] is the whole catalogue, ``target`` int [R] the row's item (``ignore_index``,
    −100 by default, ignores a row). With ``log_q`` [I] this is ``F.cross_entropy(q @ tableᵀ/τ −
    log_q, target)``; ``label_smoothing`` and ``z_loss`` (a coefficient on lse², PaLM) as in
    ``F.cross_entropy``. Never builds the R×I logits in the torch/triton backends.
    """
    with _named("softmax_ce"):
        for key in ("pos_idx", "neg_idx", "in_batch"):
            if common.get(key) is not None and common.get(key) is not False:
                raise ValueError(f"takes the catalogue as table and target; {key} is not accepted")
        if target is None:
            raise ValueError("target is required: an integer tensor of shape [R]")
        if not isinstance(target, Tensor):
            raise TypeError(f"target must be an integer tensor of shape [R], got {type(target).__name__}")
        if table is None:
            raise ValueError("table is required: the catalogue's item vectors [I, d]")
        if isinstance(table, Tensor) and table.dim() != 2:
            raise ValueError(f"table must have shape [I, d] (the catalogue), got {tuple(table.shape)}")
    return _loss("softmax_ce", query, None, table, {**common, "pos_idx": target},
                 {"label_smoothing": label_smoothing, "z_loss": z_loss}, _names={"neg": "table", "pos_idx": "target"})


def bpr(query: Tensor, pos: Tensor | None, neg: Tensor | None, *, neg_reduction: str = "mean",
        **common: Any) -> Tensor:
    """BPR: agg_j softplus(s_j − s+) (mean over unmasked negatives, or sum)."""
    return _loss("bpr", query, pos, neg, common, {"neg_reduction": neg_reduction})


def bce(query: Tensor, pos: Tensor | None, neg: Tensor | None, *, beta: float = 1.0, neg_reduction: str = "mean",
        **common: Any) -> Tensor:
    """BCE / gBCE: β softplus(−s+) + agg_j softplus(s_j) (β ≠ 1 is gSASRec's gBCE)."""
    return _loss("bce", query, pos, neg, common, {"beta": beta, "neg_reduction": neg_reduction})


def ccl(query: Tensor, pos: Tensor | None, neg: Tensor | None, *, margin: float = 0.5, neg_weight: float = 1.0,
        neg_reduction: str = "mean", **common: Any) -> Tensor:
    """Cosine contrastive loss (SimpleX): relu(1 − s+) + w · agg_j relu(s_j − m)."""
    return _loss("ccl", query, pos, neg, common, {"margin": margin, "neg_weight": neg_weight,
                                                  "neg_reduction": neg_reduction})

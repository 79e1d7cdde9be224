"""The public functional API (SPEC §4): validate, then dispatch to a backend.

Every loss is a :class:`~fastrecloss._spec.LossSpec` handed to one core per layout; the
functions below only name the parameterisation. Common keywords:

``temperature`` τ; ``neg_idx`` [R, N] (indexed layout, ``neg`` is then the item table [I, d]);
``pos_idx`` [R] (positives as rows of ``neg``); ``log_q`` / ``pos_log_q`` sampling corrections
subtracted from the scores; ``pos_ids`` / ``neg_ids`` with ``remove_accidental_hits`` mask
negatives that are the row's own positive; ``neg_mask`` (bool, True = excluded);
``in_batch=True`` uses ``pos`` as the shared negatives (row r's positive is column r, which is
excluded); ``weight`` [R] per-row weights (0 ignores a row); ``reduction`` 'mean' (divides by
the summed weight), 'sum' or 'none'; ``backend`` 'auto', 'reference', 'torch' or 'triton';
``deterministic`` bit-identical item gradients run to run.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from . import _ops
from ._problem import BACKENDS, REDUCTIONS, _check_range, _check_shape, build_problem, check_choice, check_weight
from ._spec import Kind, LossSpec, contrastive, neg_sum_flag
from .backends import reference

__all__ = [
    "sampled_logsumexp", "infonce", "infonce_plus", "dcl", "mine", "mine_plus", "softmax_ce",
    "bpr", "bce", "ccl", "compute_loss",
]


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


def compute_loss(
    spec: LossSpec,
    query: Tensor,
    pos: Tensor | None,
    neg: Tensor | None,
    *,
    temperature: float = 1.0,
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
    _need_pos: bool = True,
) -> Tensor:
    """Any loss of SPEC §2 given as a :class:`LossSpec` (the named functions call this)."""
    check_choice("reduction", reduction, REDUCTIONS)
    p = build_problem(query, pos, neg, temperature=temperature, neg_idx=neg_idx, pos_idx=pos_idx, log_q=log_q,
                      pos_log_q=pos_log_q, pos_ids=pos_ids, neg_ids=neg_ids,
                      remove_accidental_hits=remove_accidental_hits, neg_mask=neg_mask, in_batch=in_batch,
                      need_pos=_need_pos)
    check_weight(weight, p.R, query.device)
    if spec.kind != Kind.CONTRASTIVE and not p.has_pos:
        raise ValueError("bpr/bce/ccl need a positive: pass pos [R, d] or pos_idx [R]")
    name = resolve_backend(backend, query)
    if name == "reference":
        if p.R == 0:
            return _ops.reduce_rows(query.sum(dim=1) * 0, weight, reduction)
        return _ops.reduce_rows(reference.row_losses(p, spec), weight, reduction)
    return _ops.apply(p, spec, name, deterministic, weight, reduction)


def sampled_logsumexp(query: Tensor, neg: Tensor, *, reduction: str = "none", **common: Any) -> Tensor:
    """Corrected log-sum-exp over the negatives, log Σ_j e^{s_rj}, per row [R] (0 for an empty row)."""
    return compute_loss(contrastive(0.0, 1.0, 0.0), query, None, neg, reduction=reduction, _need_pos=False,
                        **common)


def infonce(query: Tensor, pos: Tensor | None, neg: Tensor | None, **common: Any) -> Tensor:
    """InfoNCE / sampled softmax: −s+ + log(e^{s+} + Σ_j e^{s_j}); with log_q = corrected SSM."""
    return compute_loss(contrastive(1.0, 1.0, 0.0), query, pos, neg, **common)


def infonce_plus(query: Tensor, pos: Tensor | None, neg: Tensor | None, *, eps: float = 0.0, lam: float = 1.1,
                 **common: Any) -> Tensor:
    """InfoNCE+ (Dong et al. 2023): −s+ + λ log(ε e^{s+} + Σ_j e^{s_j})."""
    return compute_loss(contrastive(eps, lam, 0.0), query, pos, neg, **common)


def dcl(query: Tensor, pos: Tensor | None, neg: Tensor | None, **common: Any) -> Tensor:
    """Decoupled contrastive loss: −s+ + log Σ_j e^{s_j} (positive removed from the denominator)."""
    return compute_loss(contrastive(0.0, 1.0, 0.0), query, pos, neg, **common)


def mine(query: Tensor, pos: Tensor | None, neg: Tensor | None, **common: Any) -> Tensor:
    """MINE: −s+ + log mean_j e^{s_j}."""
    return compute_loss(contrastive(0.0, 1.0, 1.0), query, pos, neg, **common)


def mine_plus(query: Tensor, pos: Tensor | None, neg: Tensor | None, *, lam: float = 1.1, **common: Any) -> Tensor:
    """MINE+ (Dong et al. 2023): −s+ + λ log mean_j e^{s_j}."""
    return compute_loss(contrastive(0.0, lam, 1.0), query, pos, neg, **common)


def softmax_ce(query: Tensor, table: Tensor, target: Tensor, **common: Any) -> Tensor:
    """Full-catalogue softmax cross-entropy: −s_target + log Σ_{i∈catalogue} e^{s_i}.

    ``table`` [I, d] is the whole catalogue, ``target`` int [R] the row's item. Never builds the
    R×I logits in the torch/triton backends.
    """
    for key in ("pos_idx", "neg_idx", "in_batch"):
        if common.get(key) is not None and common.get(key) is not False:
            raise ValueError(f"softmax_ce takes the catalogue as table and target; {key} is not accepted")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be an integer tensor of shape [R], got {type(target).__name__}")
    # Checked here so that the errors name ``target`` (it is passed on as ``pos_idx``).
    if isinstance(query, Tensor) and query.dim() == 2:
        _check_shape("target", target, (query.shape[0],), "[R]", kind="int")
    if isinstance(table, Tensor) and table.dim() == 2:
        _check_range("target", target, table.shape[0], "the catalogue table")
    return compute_loss(contrastive(0.0, 1.0, 0.0), query, None, table, pos_idx=target, **common)


def bpr(query: Tensor, pos: Tensor | None, neg: Tensor | None, *, neg_reduction: str = "mean",
        **common: Any) -> Tensor:
    """BPR: agg_j softplus(s_j − s+) (mean over unmasked negatives, or sum)."""
    return compute_loss(LossSpec(Kind.BPR, neg_sum=neg_sum_flag(neg_reduction)), query, pos, neg, **common)


def bce(query: Tensor, pos: Tensor | None, neg: Tensor | None, *, beta: float = 1.0, neg_reduction: str = "mean",
        **common: Any) -> Tensor:
    """BCE / gBCE: β softplus(−s+) + agg_j softplus(s_j) (β ≠ 1 is gSASRec's gBCE)."""
    spec = LossSpec(Kind.BCE, beta=beta, neg_sum=neg_sum_flag(neg_reduction))
    return compute_loss(spec, query, pos, neg, **common)


def ccl(query: Tensor, pos: Tensor | None, neg: Tensor | None, *, margin: float = 0.5, neg_weight: float = 1.0,
        neg_reduction: str = "mean", **common: Any) -> Tensor:
    """Cosine contrastive loss (SimpleX): relu(1 − s+) + w · agg_j relu(s_j − m)."""
    spec = LossSpec(Kind.CCL, margin=margin, neg_weight=neg_weight, neg_sum=neg_sum_flag(neg_reduction))
    return compute_loss(spec, query, pos, neg, **common)

"""Full-ranking evaluation over the whole catalogue, history excluded, without an R×I score matrix.

Scores are s_rj = <q_r, v_j>/τ for every item j of ``table``. ``exclude`` is a CSR pair
``(indptr [R + 1], indices [nnz])`` of item ids per row (the user's history); excluded items never
count and are never returned.

* :func:`target_rank` → int64 [R]: the number of items other than the target and the excluded ones
  whose score is strictly greater than the target's (``ties="index"`` also counts the equal-score
  items with a lower id: the target's position in a stable descending sort).
* :func:`topk` → (scores [R, k] fp32, ids [R, k] int64), best first, ties by lower id; a row with
  fewer than k eligible items is padded with (−inf, −1).

Backends as the losses': ``"reference"`` materialises the R×I scores (the oracle), ``"torch"``
streams [256 rows × items] tiles of one reused 16 MiB buffer, ``"triton"`` runs
``kernels/ranking.py`` (one pass over the catalogue, a per-row count or top-k in registers),
``"auto"`` picks triton for CUDA tensors (torch for a top-k beyond the kernel's 256). Scores accumulate
in fp32 (fp64 inputs: fp64 for the reference and torch ranks; the top-k order key is always fp32), under
``torch.autocast`` too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._problem import (
    _check_float,
    _check_range,
    _check_shape,
    _promote,
    check_choice,
    check_positive_int,
    check_temperature,
)
from .backends import ranking as _rb
from .functional import _autocast_off, resolve_backend

__all__ = ["target_rank", "topk"]

TIES = ("strict", "index")

_RANK = {"reference": _rb.reference_rank, "torch": _rb.torch_rank, "triton": _rb.triton_rank}
_TOPK = {"reference": _rb.reference_topk, "torch": _rb.torch_topk, "triton": _rb.triton_topk}


def _problem(query: Tensor, table: Tensor, exclude: tuple[Tensor, Tensor] | None, temperature: float | Tensor
             ) -> _rb.RankProblem:
    _check_float("query", query, 2, "[R, d]")
    _check_float("table", table, 2, "[I, d]")
    R, d = query.shape
    if table.shape[1] != d:
        raise ValueError(f"table must have shape [I, d] with the query's d = {d}, got {tuple(table.shape)}")
    if table.device != query.device:
        raise ValueError(f"table is on {table.device} but query is on {query.device}")
    # a 16-bit query against an fp32 table (what autocast leaves) is ranked in fp32, as the losses compute it
    query, _, table = _promote(query, None, table, {"neg": "table"})
    # a 0-dim tensor τ is read once, float(τ) (a host sync for a CUDA tensor; ranking needs no ∂τ)
    temperature = check_temperature(temperature, query.device)
    ex_ptr = ex_idx = None
    if exclude is not None:
        if not (isinstance(exclude, (tuple, list)) and len(exclude) == 2):
            raise TypeError("exclude must be a CSR pair (indptr [R + 1], indices [nnz]) of item ids per row")
        indptr, indices = exclude
        _check_shape("exclude indptr", indptr, (R + 1,), "[R + 1]", kind="int")
        if not isinstance(indices, Tensor):
            raise TypeError(f"exclude indices must be a 1-D integer tensor [nnz], got {type(indices).__name__}")
        _check_shape("exclude indices", indices, (indices.numel(),), "[nnz]", kind="int")
        if indptr.device != query.device or indices.device != query.device:
            raise ValueError(f"exclude must be on the query's device {query.device}")
        steps = indptr[1:] - indptr[:-1]
        if int(indptr[0]) != 0 or int(indptr[-1]) != indices.numel() or bool((steps < 0).any()):
            raise ValueError(f"exclude indptr must rise from 0 to nnz = {indices.numel()} (CSR row pointers)")
        _check_range("exclude indices", indices, table.shape[0], "the catalogue table")
        ex_ptr, ex_idx = _rb.sort_exclusions(indptr, indices, table.shape[0])
    return _rb.RankProblem(query, table, None, ex_ptr, ex_idx, float(temperature))


@torch.no_grad()
def target_rank(query: Tensor, table: Tensor, target: Tensor, *, exclude: tuple[Tensor, Tensor] | None = None,
                temperature: float | Tensor = 1.0, ties: str = "strict", backend: str = "auto") -> Tensor:
    """Per row, how many items (not the target, not excluded) score strictly above the target: int64 [R].

    ``query`` [R, d], ``table`` [I, d] (same dtype and device), ``target`` int [R] item ids.
    """
    p = _problem(query, table, exclude, temperature)
    _check_shape("target", target, (p.R,), "[R]", kind="int")
    if target.device != query.device:
        raise ValueError(f"target is on {target.device} but query is on {query.device}")
    _check_range("target", target, p.num_items, "the catalogue table")
    check_choice("ties", ties, TIES)
    p.target, p.ties_by_index = target.to(torch.int64).contiguous(), ties == "index"
    with _autocast_off(query.device):  # the scores in fp32 whatever autocast would do to a matmul
        return _RANK[resolve_backend(backend, query)](p)


@torch.no_grad()
def topk(query: Tensor, table: Tensor, k: int, *, exclude: tuple[Tensor, Tensor] | None = None,
         temperature: float | Tensor = 1.0, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The k best items per row, excluded ones left out: (scores [R, k] fp32, ids [R, k] int64)."""
    p = _problem(query, table, exclude, temperature)
    p.k = check_positive_int("k", k)
    name = resolve_backend(backend, query)
    if backend == "auto" and name == "triton" and p.k > _rb.MAX_TOPK:  # beyond the kernel's widest list
        name = "torch"
    with _autocast_off(query.device):
        return _TOPK[name](p)

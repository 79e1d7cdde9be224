"""Argument validation and the normalised problem every backend consumes (SPEC §3, §5).

``build_problem`` turns the public keyword arguments into a :class:`Problem`: one of three
layouts, with positives given either as vectors (``pos``) or as rows of the item table
(``pos_idx``), and the accidental-hit ids resolved (in-batch mode and the indexed layout use the
indices themselves). Nothing here copies an embedding tensor; everything is checked for shape
and dtype and raises a ``ValueError``/``TypeError`` that names the argument.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch
from torch import Tensor

LAYOUTS = ("shared", "per_row", "indexed")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "reference", "torch", "triton")

# Index range checks cost a host sync on CUDA; they always run on CPU tensors and on CUDA only
# when FASTRECLOSS_DEBUG=1 (or ``fastrecloss.set_debug(True)``).
_DEBUG = os.environ.get("FASTRECLOSS_DEBUG", "0") not in ("", "0")


def set_debug(enabled: bool) -> None:
    """Check index ranges on CUDA tensors too (costs a host synchronisation per call)."""
    global _DEBUG
    _DEBUG = bool(enabled)


@dataclass
class Problem:
    """A validated loss problem. Shapes: R rows, N negatives per row, d features."""

    layout: str
    query: Tensor  # [R, d]
    neg: Tensor  # shared [N, d] | per_row [R, N, d] | indexed table [I, d]
    pos: Tensor | None = None  # [R, d]
    pos_idx: Tensor | None = None  # [R] int64, rows of ``neg`` (shared / indexed)
    neg_idx: Tensor | None = None  # [R, N] int64 (indexed)
    log_q: Tensor | None = None  # shared [N] | per_row [R, N] | indexed [I]
    pos_log_q: Tensor | None = None  # [R]
    hit_pos_ids: Tensor | None = None  # [R] ids of the positives, for accidental-hit removal
    hit_neg_ids: Tensor | None = None  # shared [N] | per_row / indexed [R, N]
    neg_mask: Tensor | None = None  # bool, True = excluded: shared [N] | [R, N]
    temperature: float = 1.0

    @property
    def R(self) -> int:
        return self.query.shape[0]

    @property
    def d(self) -> int:
        return self.query.shape[1]

    @property
    def N(self) -> int:
        if self.layout == "shared":
            return self.neg.shape[0]
        if self.layout == "per_row":
            return self.neg.shape[1]
        return self.neg_idx.shape[1]

    @property
    def has_pos(self) -> bool:
        return self.pos is not None or self.pos_idx is not None

    def tensors(self) -> dict[str, Tensor | None]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("layout", "temperature")}


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_float(name: str, t: Tensor, ndim: int, shape_desc: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_desc}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32/bfloat16/float16/float64), got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_desc}, got {tuple(t.shape)}")


def _check_shape(name: str, t: Tensor | None, shape: tuple[int, ...], desc: str, *, kind: str) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {desc}, got {type(t).__name__}")
    if kind == "int" and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor of shape {desc}, got {t.dtype}")
    if kind == "float" and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of shape {desc}, got {t.dtype}")
    if kind == "bool" and t.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = excluded) of shape {desc}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {desc} = {shape}, got {tuple(t.shape)}")


def _check_range(name: str, idx: Tensor, size: int, what: str) -> None:
    if idx.numel() == 0 or _is_compiling() or (idx.is_cuda and not _DEBUG):
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= size:
        raise ValueError(f"{name} has values in [{lo}, {hi}], out of range for {what} of size {size}")


def build_problem(
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
    need_pos: bool = True,
) -> Problem:
    """Validate the public arguments and return the normalised :class:`Problem`."""
    _check_float("query", query, 2, "[R, d]")
    R, d = query.shape
    if isinstance(temperature, Tensor) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a Python float, got {type(temperature).__name__}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    if in_batch:
        if neg is not None or neg_idx is not None or pos_idx is not None:
            raise ValueError("in_batch=True uses the positives as the negatives: pass neg=None, no neg_idx/pos_idx")
        if pos is None:
            raise ValueError("in_batch=True needs pos of shape [R, d]")
        _check_float("pos", pos, 2, "[R, d]")
        if pos.shape != query.shape:
            raise ValueError(f"pos must have shape [R, d] = {tuple(query.shape)}, got {tuple(pos.shape)}")
        if pos.dtype != query.dtype:
            raise TypeError(f"pos must have the query's dtype {query.dtype}, got {pos.dtype}")
        if pos.device != query.device:
            raise ValueError(f"pos is on {pos.device} but query is on {query.device}")
        # Row r's positive is column r; every column with the same id (itself included) is excluded.
        ids = pos_ids if pos_ids is not None else torch.arange(R, device=query.device)
        _check_shape("pos_ids", ids, (R,), "[R]", kind="int")
        if neg_ids is not None:
            raise ValueError("in_batch=True takes the negatives' ids from pos_ids; do not pass neg_ids")
        _check_shape("log_q", log_q, (R,), "[R] (one per in-batch item)", kind="float")
        _check_shape("pos_log_q", pos_log_q, (R,), "[R]", kind="float")
        _check_shape("neg_mask", neg_mask, (R,) if isinstance(neg_mask, Tensor) and neg_mask.dim() == 1 else (R, R),
                     "[R] or [R, R]", kind="bool")
        return Problem("shared", query, pos, None, torch.arange(R, device=query.device), None, log_q, pos_log_q,
                       ids, ids, neg_mask, float(temperature))

    if neg is None:
        raise ValueError("neg is required: [N, d] (shared), [R, N, d] (per-row) or the item table [I, d] with neg_idx")
    if not isinstance(neg, Tensor):
        raise TypeError(f"neg must be a torch.Tensor, got {type(neg).__name__}")
    if neg_idx is not None:
        layout = "indexed"
        _check_float("neg", neg, 2, "[I, d] (item table, indexed layout)")
        if not isinstance(neg_idx, Tensor) or neg_idx.dim() != 2 or neg_idx.shape[0] != R:
            got = tuple(neg_idx.shape) if isinstance(neg_idx, Tensor) else type(neg_idx).__name__
            raise ValueError(f"neg_idx must have shape [R, N] with R = {R}, got {got}")
        _check_shape("neg_idx", neg_idx, tuple(neg_idx.shape), "[R, N]", kind="int")
        N = neg_idx.shape[1]
    elif neg.dim() == 3:
        layout = "per_row"
        _check_float("neg", neg, 3, "[R, N, d] (per-row layout)")
        if neg.shape[0] != R:
            raise ValueError(f"neg must have shape [R, N, d] with R = {R}, got {tuple(neg.shape)}")
        N = neg.shape[1]
    else:
        layout = "shared"
        _check_float("neg", neg, 2, "[N, d] (shared layout) or [R, N, d] (per-row layout)")
        N = neg.shape[0]
    if neg.shape[-1] != d:
        raise ValueError(f"neg must have last dimension d = {d} (query is {tuple(query.shape)}), "
                         f"got {tuple(neg.shape)}")
    if neg.dtype != query.dtype:
        raise TypeError(f"neg must have the query's dtype {query.dtype}, got {neg.dtype}")
    if neg.device != query.device:
        raise ValueError(f"neg is on {neg.device} but query is on {query.device}")

    table_rows = neg.shape[0]
    if pos is not None and pos_idx is not None:
        raise ValueError("pass either pos [R, d] or pos_idx [R], not both")
    if pos is not None:
        _check_float("pos", pos, 2, "[R, d]")
        if pos.shape != query.shape:
            raise ValueError(f"pos must have shape [R, d] = {tuple(query.shape)}, got {tuple(pos.shape)}")
        if pos.dtype != query.dtype:
            raise TypeError(f"pos must have the query's dtype {query.dtype}, got {pos.dtype}")
    if pos_idx is not None:
        if layout == "per_row":
            raise ValueError("pos_idx indexes the item table and needs the shared or indexed layout; pass pos [R, d]")
        _check_shape("pos_idx", pos_idx, (R,), "[R]", kind="int")
        _check_range("pos_idx", pos_idx, table_rows, "neg")
    if need_pos and pos is None and pos_idx is None:
        raise ValueError("this loss needs a positive: pass pos [R, d] or pos_idx [R]")
    if not need_pos and (pos is not None or pos_idx is not None):
        raise ValueError("sampled_logsumexp takes no positive")

    score_shape, score_desc = {"shared": ((N,), "[N]"), "per_row": ((R, N), "[R, N]"),
                               "indexed": ((R, N), "[R, N]")}[layout]
    if layout == "indexed":
        _check_range("neg_idx", neg_idx, table_rows, "the item table neg")
        _check_shape("log_q", log_q, (table_rows,), "[I] (looked up by neg_idx)", kind="float")
    else:
        _check_shape("log_q", log_q, score_shape, score_desc, kind="float")
    _check_shape("pos_log_q", pos_log_q, (R,), "[R]", kind="float")
    if neg_mask is not None:
        if layout == "shared" and isinstance(neg_mask, Tensor) and neg_mask.dim() == 2:
            _check_shape("neg_mask", neg_mask, (R, N), "[R, N]", kind="bool")
        else:
            _check_shape("neg_mask", neg_mask, score_shape, score_desc, kind="bool")

    hit_pos_ids = hit_neg_ids = None
    if remove_accidental_hits:
        hit_pos_ids = pos_ids if pos_ids is not None else pos_idx
        if hit_pos_ids is None:
            raise ValueError("remove_accidental_hits=True needs pos_ids [R] (or pos_idx)")
        _check_shape("pos_ids", hit_pos_ids, (R,), "[R]", kind="int")
        if layout == "indexed":
            if neg_ids is not None:
                raise ValueError("the indexed layout uses neg_idx as the negatives' ids; do not pass neg_ids")
            hit_neg_ids = neg_idx
        else:
            if neg_ids is None:
                raise ValueError(f"remove_accidental_hits=True needs neg_ids {score_desc}")
            hit_neg_ids = neg_ids
            _check_shape("neg_ids", hit_neg_ids, score_shape, score_desc, kind="int")
    elif pos_ids is not None or neg_ids is not None:
        raise ValueError("pos_ids/neg_ids are only used with remove_accidental_hits=True")

    return Problem(layout, query, neg, pos, pos_idx, neg_idx, log_q, pos_log_q, hit_pos_ids, hit_neg_ids,
                   neg_mask, float(temperature))


def check_weight(weight: Tensor | None, R: int, device: torch.device) -> None:
    if weight is None:
        return
    _check_shape("weight", weight, (R,), "[R]", kind="float")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but query is on {device}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")

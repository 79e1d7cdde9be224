"""Argument validation and the normalised problem every backend consumes (SPEC §3, §5).

``build_problem`` turns the public keyword arguments into a :class:`Problem`: one of three
layouts, with positives given either as vectors (``pos``) or as rows of the item table
(``pos_idx``), and the accidental-hit ids resolved (in-batch mode and the indexed layout use the
indices themselves). The conventions every backend then gets for free are settled here:

* logQ on the positive: when the positive is one of the candidates ``log_q`` indexes (in-batch
  column r; a ``pos_idx`` row of the table), ``pos_log_q`` defaults to its entry of ``log_q``.
* ``ignore_index``: a ``pos_idx`` (target) equal to it — or, where no range check runs (CUDA
  without the debug flag), outside the table — is replaced by 0 and the row gets ``keep`` False
  (weight 0); a ``neg_idx`` entry equal to it is turned into −1 when it is a valid row, and every
  backend masks an ``neg_idx`` entry outside [0, I).
* mixed float dtypes (a 16-bit query against an fp32 table, as autocast leaves them) are promoted
  to float32 with autograd-aware casts, so each gradient comes back in its own input's dtype.

Nothing here copies an embedding tensor of the common dtype, nothing synchronises with the host
on CUDA (value checks run on CPU tensors, and on CUDA only under the debug flag), and every error
is a ``ValueError``/``TypeError`` naming the public argument (``names`` maps the internal names to
a function's own, e.g. ``neg`` → ``table``).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ._spec import unwrap_numpy

LAYOUTS = ("shared", "per_row", "indexed")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "reference", "torch", "triton")
IGNORE_INDEX = -100

# Value checks (index ranges, finite non-negative weights) cost a host sync on CUDA; they always run
# on CPU tensors and on CUDA only when FASTRECLOSS_DEBUG=1 (or ``fastrecloss.set_debug(True)``).
_DEBUG = os.environ.get("FASTRECLOSS_DEBUG", "0") not in ("", "0")


def set_debug(enabled: bool) -> None:
    """Check index ranges and weights on CUDA tensors too (costs a host synchronisation per call)."""
    global _DEBUG
    _DEBUG = bool(enabled)


@dataclass
class Problem:
    """A validated loss problem. Shapes: R rows, N negatives per row, d features."""

    layout: str
    query: Tensor  # [R, d]
    neg: Tensor  # shared [N, d] | per_row [R, N, d] | indexed table [I, d]
    pos: Tensor | None = None  # [R, d]
    pos_idx: Tensor | None = None  # [R] int, rows of ``neg`` (shared / indexed), every entry in range
    neg_idx: Tensor | None = None  # [R, N] int (indexed); an entry outside [0, I) is a masked negative
    log_q: Tensor | None = None  # shared [N] | per_row [R, N] | indexed [I]
    pos_log_q: Tensor | None = None  # [R]
    hit_pos_ids: Tensor | None = None  # [R] ids of the positives, for accidental-hit removal
    hit_neg_ids: Tensor | None = None  # shared [N] | per_row / indexed [R, N]
    neg_mask: Tensor | None = None  # bool, True = excluded: shared [N] | [R, N]
    temperature: float | Tensor = 1.0  # a 0-dim tensor reaches only the reference backend
    keep: Tensor | None = None  # [R] bool, False = the row's target was ignored (it counts with weight 0)

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


def values_checked(t: Tensor) -> bool:
    """Whether value checks run on ``t``: CPU tensors always, CUDA under the debug flag, never in a trace."""
    return not _is_compiling() and (not t.is_cuda or _DEBUG)


def check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}")


def check_positive_int(name: str, value: object) -> int:
    """``value`` as an int ≥ 1 (Python or numpy integers; not bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _array_desc(value: object) -> str:
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    return "" if shape is None or dtype is None else f" of shape {tuple(shape)} and dtype {dtype}"


def check_temperature(temperature: object, device: torch.device | None = None) -> float | Tensor:
    """τ as a float, or as a 0-dim floating-point tensor (learnable, e.g. an ``nn.Parameter``) on ``device``
    (the query's) when given. A tensor's value is checked (finite, > 0) only where that costs no host sync:
    CPU tensors, CUDA under the debug flag, never in a trace."""
    if isinstance(temperature, Tensor):
        if temperature.dim() != 0 or not temperature.is_floating_point():
            raise TypeError("temperature must be a float or a 0-dim floating-point tensor, got a "
                            f"{temperature.dtype} tensor of shape {tuple(temperature.shape)}")
        if device is not None and temperature.device != device:
            raise ValueError(f"temperature is on {temperature.device} but query is on {device} (a tensor "
                             "temperature must be on the inputs' device)")
        if values_checked(temperature):
            t = temperature.detach()
            if not bool(torch.isfinite(t) & (t > 0)):
                raise ValueError(f"temperature must be a finite number > 0, got {t.item()}")
        return temperature
    temperature = unwrap_numpy(temperature)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError("temperature must be a real number (a float) or a 0-dim floating-point tensor, got "
                        f"{type(temperature).__name__}{_array_desc(temperature)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def check_ignore_index(ignore_index: object) -> None:
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise TypeError(f"ignore_index must be an int (or None), got {ignore_index!r}")


def _check_float(name: str, t: Tensor, ndim: int, shape_desc: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_desc}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32/bfloat16/float16/float64), got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_desc}, got {tuple(t.shape)}")


def _check_shape(name: str, t: Tensor | None, shape: tuple[int, ...], desc: str, *, kind: str,
                 device: torch.device | None = None) -> None:
    """``t`` (unless None) is a tensor of ``kind`` ('int', 'float' or 'bool') and this exact shape, on
    ``device`` (the query's) when given."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {desc}, got {type(t).__name__}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but query is on {device}")
    if kind == "int" and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor of shape {desc}, got {t.dtype}")
    if kind == "float" and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of shape {desc}, got {t.dtype}")
    if kind == "bool" and t.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = excluded) of shape {desc}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {desc} = {shape}, got {tuple(t.shape)}")


def as_index(t: Tensor) -> Tensor:
    """An integer tensor as indices: int32/int64 stay, narrower ones (uint8, int8, int16 …; ``F.cross_entropy``
    takes uint8 targets) become int64 — torch would read a uint8 index tensor as a mask."""
    return t if t.dtype in (torch.int32, torch.int64) else t.to(torch.int64)


def _check_range(name: str, idx: Tensor, size: int, what: str, ignore_index: int | None = None) -> None:
    """Every entry of ``idx`` is in [0, size) or equal to ``ignore_index`` (CPU, or CUDA when debugging)."""
    if idx.numel() == 0 or not values_checked(idx):
        return
    bad = (idx < 0) | (idx >= size)
    if ignore_index is not None:
        bad &= idx != ignore_index
    if bool(bad.any()):
        vals = idx[bad]
        ignored = f" (ignore_index={ignore_index} excepted)" if ignore_index is not None else ""
        raise ValueError(f"{name} has values in [{int(vals.min())}, {int(vals.max())}], out of range for {what} "
                         f"of size {size}{ignored}")


def _promote(query: Tensor, pos: Tensor | None, neg: Tensor | None,
             names: Mapping[str, str]) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One compute dtype: equal dtypes stay; a mix of float32/bfloat16/float16 goes to float32."""
    others = [(k, t) for k, t in (("pos", pos), ("neg", neg)) if isinstance(t, Tensor) and t.is_floating_point()]
    if all(t.dtype == query.dtype for _, t in others):
        return query, pos, neg
    for k, t in others:
        if torch.float64 in (t.dtype, query.dtype) and t.dtype != query.dtype:
            raise TypeError(f"{names.get(k, k)} must have the query's dtype {query.dtype}, got {t.dtype} (float64 "
                            "is not mixed; float32, bfloat16 and float16 may be, and are computed in float32)")

    def up(t: Tensor | None) -> Tensor | None:
        return t.to(torch.float32) if isinstance(t, Tensor) and t.is_floating_point() else t

    return up(query), up(pos), up(neg)


def _safe_targets(pos_idx: Tensor, rows: int, ignore_index: int | None) -> tuple[Tensor, Tensor]:
    """(pos_idx with every ignored / out-of-range entry replaced by 0, keep [R] bool). O(R), no sync."""
    keep = (pos_idx >= 0) & (pos_idx < rows)
    if ignore_index is not None and ignore_index >= 0:
        keep &= pos_idx != ignore_index
    return torch.where(keep, pos_idx, 0), keep


def build_problem(
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
    need_pos: bool = True,
    ignore_index: int | None = IGNORE_INDEX,
    names: Mapping[str, str] | None = None,
) -> Problem:
    """Validate the public arguments and return the normalised :class:`Problem`."""
    names = names or {}

    def nm(key: str) -> str:
        return names.get(key, key)

    _check_float("query", query, 2, "[R, d]")
    R, d = query.shape
    dev = query.device
    temperature = check_temperature(temperature, dev)
    check_flag("remove_accidental_hits", remove_accidental_hits)
    check_flag("in_batch", in_batch)
    check_ignore_index(ignore_index)

    if in_batch:
        if neg is not None or neg_idx is not None or pos_idx is not None:
            raise ValueError("in_batch=True uses the positives as the negatives: pass neg=None, no neg_idx/pos_idx")
        if pos is None:
            raise ValueError("in_batch=True needs pos of shape [R, d]")
        _check_float("pos", pos, 2, "[R, d]")
        if pos.shape != query.shape:
            raise ValueError(f"pos must have shape [R, d] = {tuple(query.shape)}, got {tuple(pos.shape)}")
        if pos.device != query.device:
            raise ValueError(f"pos is on {pos.device} but query is on {query.device}")
        query, pos, _ = _promote(query, pos, None, names)
        if neg_ids is not None:
            raise ValueError("in_batch=True takes the negatives' ids from pos_ids; do not pass neg_ids")
        # Row r's positive is column r (always excluded); with remove_accidental_hits=True every
        # other column with the row's id in pos_ids is excluded too.
        ids = _hit_ids_in_batch(R, query.device, pos_ids, remove_accidental_hits)
        _check_shape("log_q", log_q, (R,), "[R] (one per in-batch item)", kind="float", device=dev)
        _check_shape("pos_log_q", pos_log_q, (R,), "[R]", kind="float", device=dev)
        _check_shape("neg_mask", neg_mask, (R,) if isinstance(neg_mask, Tensor) and neg_mask.dim() == 1 else (R, R),
                     "[R] or [R, R]", kind="bool", device=dev)
        pos_log_q = log_q if pos_log_q is None else pos_log_q  # column r is row r's positive
        return Problem("shared", query, pos, None, torch.arange(R, device=query.device), None, log_q, pos_log_q,
                       ids, ids, neg_mask, temperature)

    if neg is None:
        raise ValueError(f"{nm('neg')} is required: [N, d] (shared), [R, N, d] (per-row) or the item table [I, d] "
                         "with neg_idx")
    if not isinstance(neg, Tensor):
        raise TypeError(f"{nm('neg')} must be a torch.Tensor, got {type(neg).__name__}")
    if neg_idx is not None:
        layout = "indexed"
        _check_float(nm("neg"), neg, 2, "[I, d] (item table, indexed layout)")
        if not isinstance(neg_idx, Tensor) or neg_idx.dim() != 2 or neg_idx.shape[0] != R:
            got = tuple(neg_idx.shape) if isinstance(neg_idx, Tensor) else type(neg_idx).__name__
            raise ValueError(f"neg_idx must have shape [R, N] with R = {R}, got {got}")
        _check_shape("neg_idx", neg_idx, tuple(neg_idx.shape), "[R, N]", kind="int", device=dev)
        neg_idx = as_index(neg_idx)
        N = neg_idx.shape[1]
    elif neg.dim() == 3:
        layout = "per_row"
        _check_float(nm("neg"), neg, 3, "[R, N, d] (per-row layout)")
        if neg.shape[0] != R:
            raise ValueError(f"{nm('neg')} must have shape [R, N, d] with R = {R}, got {tuple(neg.shape)}")
        N = neg.shape[1]
    else:
        layout = "shared"
        _check_float(nm("neg"), neg, 2, "[N, d] (shared layout) or [R, N, d] (per-row layout)")
        N = neg.shape[0]
    if neg.shape[-1] != d:
        raise ValueError(f"{nm('neg')} must have last dimension d = {d} (query is {tuple(query.shape)}), "
                         f"got {tuple(neg.shape)}")
    if neg.device != query.device:
        raise ValueError(f"{nm('neg')} is on {neg.device} but query is on {query.device}")

    table_rows = neg.shape[0]
    if pos is not None and pos_idx is not None:
        raise ValueError(f"pass either pos [R, d] or {nm('pos_idx')} [R], not both")
    if pos is not None:
        _check_float("pos", pos, 2, "[R, d]")
        if pos.shape != query.shape:
            raise ValueError(f"pos must have shape [R, d] = {tuple(query.shape)}, got {tuple(pos.shape)}")
        if pos.device != dev:
            raise ValueError(f"pos is on {pos.device} but query is on {dev}")
    query, pos, neg = _promote(query, pos, neg, names)
    keep = None
    if pos_idx is not None:
        if layout == "per_row":
            raise ValueError("pos_idx indexes the item table and needs the shared or indexed layout; pass pos [R, d]")
        _check_shape(nm("pos_idx"), pos_idx, (R,), "[R]", kind="int", device=dev)
        pos_idx = as_index(pos_idx)
        _check_range(nm("pos_idx"), pos_idx, table_rows, nm("neg"), ignore_index)
        pos_idx, keep = _safe_targets(pos_idx, table_rows, ignore_index)
        if table_rows == 0:  # an empty table: every target is ignored and there is no row to gather
            pos, pos_idx = query.new_zeros(R, d), None
    if need_pos and pos is None and pos_idx is None:
        raise ValueError(f"this loss needs a positive: pass pos [R, d] or {nm('pos_idx')} [R]")
    if not need_pos and (pos is not None or pos_idx is not None):
        raise ValueError(f"takes no positive: pass neither pos nor {nm('pos_idx')}")

    score_shape, score_desc = {"shared": ((N,), "[N]"), "per_row": ((R, N), "[R, N]"),
                               "indexed": ((R, N), "[R, N]")}[layout]
    if layout == "indexed":
        _check_range("neg_idx", neg_idx, table_rows, f"the item table {nm('neg')}", ignore_index)
        if ignore_index is not None and ignore_index >= 0:  # a valid row: make it an out-of-range (masked) one
            neg_idx = torch.where(neg_idx == ignore_index, -1, neg_idx)
        _check_shape("log_q", log_q, (table_rows,), "[I] (looked up by neg_idx)", kind="float", device=dev)
    else:
        _check_shape("log_q", log_q, score_shape, score_desc, kind="float", device=dev)
    _check_shape("pos_log_q", pos_log_q, (R,), "[R]", kind="float", device=dev)
    if pos_log_q is None and log_q is not None and pos_idx is not None:
        pos_log_q = log_q[pos_idx]  # the positive is a row of the table log_q corrects
    if neg_mask is not None:
        if layout == "shared" and isinstance(neg_mask, Tensor) and neg_mask.dim() == 2:
            _check_shape("neg_mask", neg_mask, (R, N), "[R, N]", kind="bool", device=dev)
        else:
            _check_shape("neg_mask", neg_mask, score_shape, score_desc, kind="bool", device=dev)

    if layout == "indexed" and table_rows == 0:  # an empty table: every neg_idx entry is masked, the N = 0 rule
        neg_idx = neg_idx[:, :0]
        neg_mask = None if neg_mask is None else neg_mask[:, :0]
    hit_pos_ids, hit_neg_ids = _hit_ids(layout, R, score_shape, score_desc, pos_ids, neg_ids, pos_idx, neg_idx,
                                        remove_accidental_hits, nm, dev)
    return Problem(layout, query, neg, pos, pos_idx, neg_idx, log_q, pos_log_q, hit_pos_ids, hit_neg_ids,
                   neg_mask, temperature, keep)


def _hit_ids_in_batch(R: int, device: torch.device, pos_ids: Tensor | None, remove: bool) -> Tensor:
    if not remove:
        if pos_ids is not None:
            raise ValueError("pos_ids/neg_ids are only used with remove_accidental_hits=True (in_batch=True always "
                             "excludes the row's own column)")
        return torch.arange(R, device=device)
    if pos_ids is None:
        raise ValueError("remove_accidental_hits=True with in_batch=True needs pos_ids [R] (the items' ids)")
    _check_shape("pos_ids", pos_ids, (R,), "[R]", kind="int", device=device)
    return as_index(pos_ids)


def _hit_ids(layout: str, R: int, score_shape: tuple[int, ...], score_desc: str, pos_ids: Tensor | None,
             neg_ids: Tensor | None, pos_idx: Tensor | None, neg_idx: Tensor | None, remove: bool,
             nm, dev: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """The ids accidental-hit removal compares: (positives [R], negatives [N] or [R, N]), or (None, None)."""
    if not remove:
        if pos_ids is not None or neg_ids is not None:
            raise ValueError("pos_ids/neg_ids are only used with remove_accidental_hits=True")
        return None, None
    hit_pos_ids = pos_ids if pos_ids is not None else pos_idx
    if hit_pos_ids is None:
        raise ValueError(f"remove_accidental_hits=True needs pos_ids [R] (or {nm('pos_idx')})")
    _check_shape("pos_ids", hit_pos_ids, (R,), "[R]", kind="int", device=dev)
    if layout == "indexed":
        if neg_ids is not None:
            raise ValueError("the indexed layout uses neg_idx as the negatives' ids; do not pass neg_ids")
        return as_index(hit_pos_ids), neg_idx
    if neg_ids is None:
        raise ValueError(f"remove_accidental_hits=True needs neg_ids {score_desc}")
    _check_shape("neg_ids", neg_ids, score_shape, score_desc, kind="int", device=dev)
    return as_index(hit_pos_ids), as_index(neg_ids)


def check_weight(weight: Tensor | None, R: int, device: torch.device) -> None:
    if weight is None:
        return
    _check_shape("weight", weight, (R,), "[R]", kind="float", device=device)
    if weight.numel() and values_checked(weight):
        w = weight.detach()
        if not bool((torch.isfinite(w) & (w >= 0)).all()):
            bad = w[~(torch.isfinite(w) & (w >= 0))]
            raise ValueError(f"weight must be finite and >= 0 (0 ignores a row), got {bad[:3].tolist()}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")

"""The loss parameterisation shared by every backend (SPEC §2).

Every named loss is one :class:`LossSpec`: a kind (the contrastive ε/λ/μ family or one of the
pointwise/pairwise losses) plus its hyper-parameters. Kernels receive ``kind`` as a
``tl.constexpr`` and the floats as scalars; the torch backend and the oracle read the same fields.

``label_smoothing`` α and ``z_loss`` z (contrastive kind; ``softmax_ce`` exposes them) extend the
row loss to ``L_r = −(1−α)·s_r+ + λ·(lse_r − μ·log n_r) + z·lse_r² − α·mean_{j∈J_r} s_rj`` with
``lse_r = log(ε·e^{s_r+} + Σ_j e^{s_rj})``; for ``softmax_ce`` (ε = 0, λ = 1, μ = 0, J_r = the
catalogue, target included) that is ``F.cross_entropy(..., label_smoothing=α) + z·lse²`` (PaLM).
Their gradients: ``g_rj = (λ + 2z·lse_r)·e^{s_rj}/S_r − α/n_r`` for each unmasked j,
``g_r+ = −(1−α) + (λ + 2z·lse_r)·ε·e^{s_r+}/S_r``.
"""

from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass, fields
from enum import IntEnum

import torch


class Kind(IntEnum):
    """Loss family; the integer value is what kernels see as a constexpr."""

    CONTRASTIVE = 0  # L = -s+ + λ(log(ε e^{s+} + Σ e^{s_j}) - μ log n)
    BPR = 1  # agg_j softplus(s_j - s+)
    BCE = 2  # β softplus(-s+) + agg_j softplus(s_j)
    CCL = 3  # relu(1 - s+) + w agg_j relu(s_j - m)


def unwrap_numpy(value: object) -> object:
    """A 0-dim real numpy array (``np.array(0.1)``, a value read from a config) as its Python number; anything
    else unchanged (a 1-dim, bool or string array is then refused by the caller's type check)."""
    np = sys.modules.get("numpy")  # no import: an object can only be an ndarray once numpy is loaded
    if np is not None and isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "fiu":
        return value.item()
    return value


# name -> (lower bound or None, upper bound or None) for the float hyper-parameters.
_BOUNDS = {"eps": (0.0, None), "lam": (0.0, None), "mu": (None, None), "beta": (0.0, None),
           "margin": (None, None), "neg_weight": (0.0, None), "label_smoothing": (0.0, 1.0), "z_loss": (0.0, None)}
_WHY = {"eps": " (it weights e^(s+) inside a log)"}


@dataclass(frozen=True)
class LossSpec:
    kind: Kind
    eps: float = 0.0  # ε: weight of the positive inside the log-sum-exp
    lam: float = 1.0  # λ: weight of the log-sum-exp term
    mu: float = 0.0  # μ: 1 turns the LSE into a log-mean-exp
    beta: float = 1.0  # β of gBCE
    margin: float = 0.5  # CCL margin m
    neg_weight: float = 1.0  # CCL negative weight w
    neg_sum: bool = False  # pointwise losses: sum (True) or mean (False) over negatives
    label_smoothing: float = 0.0  # α (contrastive): F.cross_entropy's label smoothing over the candidates
    z_loss: float = 0.0  # z (contrastive): coefficient of lse² (PaLM's z-loss)

    def __post_init__(self) -> None:
        for name, (lo, hi) in _BOUNDS.items():
            value = unwrap_numpy(getattr(self, name))
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))  # numpy scalars, ints: plain floats
            if lo is not None and value < lo:
                raise ValueError(f"{name} must be >= {lo:g}{_WHY.get(name, '')}, got {value}")
            if hi is not None and value > hi:
                raise ValueError(f"{name} must be <= {hi:g}, got {value}")
        if not isinstance(self.neg_sum, bool):
            raise TypeError(f"neg_sum must be a bool, got {type(self.neg_sum).__name__}")
        if self.kind != Kind.CONTRASTIVE and (self.label_smoothing or self.z_loss):
            raise ValueError("label_smoothing and z_loss apply to the contrastive (softmax) losses only")

    @property
    def params(self) -> list[float]:
        """The hyper-parameters after ``kind`` in field order, as floats (what a custom op carries)."""
        return [float(getattr(self, f.name)) for f in fields(self)[1:]]

    @classmethod
    def from_params(cls, kind: int, params: list[float]) -> LossSpec:
        values = {f.name: (bool(v) if f.type in ("bool", bool) else v) for f, v in zip(fields(cls)[1:], params)}
        return cls(Kind(kind), **values)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 (so gradcheck is exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_on(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda", "xpu") and torch.is_autocast_enabled(device.type)


def result_dtype(query: torch.dtype, items: torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype a loss is returned in: the inputs' (float32 when 16-bit and fp32 are mixed), or its
    accumulation dtype under ``torch.autocast`` (as ``F.cross_entropy``)."""
    compute = query if items is None or items == query else torch.float32
    return acc_dtype(compute) if autocast_on(device) else compute


def contrastive(eps: float, lam: float, mu: float, **extra: float) -> LossSpec:
    return LossSpec(Kind.CONTRASTIVE, eps=eps, lam=lam, mu=mu, **extra)


def neg_sum_flag(neg_reduction: str) -> bool:
    if neg_reduction not in ("mean", "sum"):
        raise ValueError(f"neg_reduction must be 'mean' or 'sum', got {neg_reduction!r}")
    return neg_reduction == "sum"

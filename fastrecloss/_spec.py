"""The loss parameterisation shared by every backend (SPEC §2).

Every named loss is one :class:`LossSpec`: a kind (the contrastive ε/λ/μ family or one of the
pointwise/pairwise losses) plus its hyper-parameters. Kernels receive ``kind`` as a
``tl.constexpr`` and the floats as scalars; the torch backend and the oracle read the same fields.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass
from enum import IntEnum

import torch


class Kind(IntEnum):
    """Loss family; the integer value is what kernels see as a constexpr."""

    CONTRASTIVE = 0  # L = -s+ + λ(log(ε e^{s+} + Σ e^{s_j}) - μ log n)
    BPR = 1  # agg_j softplus(s_j - s+)
    BCE = 2  # β softplus(-s+) + agg_j softplus(s_j)
    CCL = 3  # relu(1 - s+) + w agg_j relu(s_j - m)


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

    def __post_init__(self) -> None:
        for name in ("eps", "lam", "mu", "beta", "margin", "neg_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0 (it weights e^(s+) inside a log), got {self.eps}")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.neg_weight < 0:
            raise ValueError(f"neg_weight must be >= 0, got {self.neg_weight}")

    @property
    def params(self) -> list[float]:
        """The float hyper-parameters in a fixed order (what a custom op carries)."""
        return [float(x) for x in astuple(self)[1:]]

    @classmethod
    def from_params(cls, kind: int, params: list[float]) -> LossSpec:
        *floats, neg_sum = params
        return cls(Kind(kind), *floats, neg_sum=bool(neg_sum))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 (so gradcheck is exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def contrastive(eps: float, lam: float, mu: float) -> LossSpec:
    return LossSpec(Kind.CONTRASTIVE, eps=eps, lam=lam, mu=mu)


def neg_sum_flag(neg_reduction: str) -> bool:
    if neg_reduction not in ("mean", "sum"):
        raise ValueError(f"neg_reduction must be 'mean' or 'sum', got {neg_reduction!r}")
    return neg_reduction == "sum"

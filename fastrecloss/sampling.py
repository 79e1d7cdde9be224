"""Negative samplers with their exact logQ correction: uniform or popularity pools, with or without replacement.

Every draw returns ``(ids, log_q)``. ``log_q`` is the sampling correction of SPEC §2 (Yi et al. 2019):
the log of the *expected number of times* item j appears in the draw. Subtracting it from the
scores makes ``Σ_{j drawn} e^{s_j − log_q_j}`` an unbiased estimate of the full-catalogue sum
``Σ_i e^{s_i}``, so a corrected sampled softmax approximates the full softmax.

* With replacement (``n`` independent draws from q): the expected count is ``n · q_j``.
* Without replacement (``n`` distinct ids): the expected count is the inclusion probability π_j.
  The pool is drawn by systematic sampling with probability proportional to size over a fresh
  random order of the items, whose inclusion probabilities are exactly ``π_j = min(1, c · q_j)``
  (c such that Σ π_j = n; items with ``n · q_j ≥ 1`` are always drawn). Without such a cap π_j is
  ``n · q_j``, the same correction as with replacement; uniform pools are uniformly random subsets.
  (``torch.multinomial(replacement=False)`` has no closed-form inclusion probability, so it is not
  used.) One draw costs O(I) (a permutation and a cumulative sum over the catalogue).

``log_q_table(n)`` gives the correction of every item [I] (the indexed layout looks it up by
``neg_idx``); :func:`in_batch_log_q` is the correction of in-batch negatives. The ids and tables
are on the CPU (where the generator is) unless a ``device`` is given.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ._problem import check_positive_int

KINDS = ("uniform", "popularity")


class Membership(Protocol):
    """What :meth:`NegativeSampler.sample_per_row` excludes: known (row, item) pairs, e.g.
    ``fastrecloss.recsys.sampling.UserItemSet``."""

    def contains(self, users: Tensor, items: Tensor) -> Tensor: ...


def _counts(item_counts: Tensor | np.ndarray | Sequence[float], num_items: int | None) -> Tensor:
    """``item_counts`` as float64 [num_items] on the CPU (any length when ``num_items`` is None), validated."""
    counts = torch.as_tensor(np.asarray(item_counts.detach().cpu() if isinstance(item_counts, Tensor) else item_counts),
                             dtype=torch.float64)
    want = "[num_items]" if num_items is None else f"[num_items] = ({num_items},)"
    what = f"item_counts must be finite and non-negative of shape {want}, got"
    if counts.dim() != 1 or (num_items is not None and counts.shape[0] != num_items):
        raise ValueError(f"{what} shape {tuple(counts.shape)}")
    if not bool(torch.isfinite(counts).all() & (counts >= 0).all()):
        raise ValueError(f"{what} a NaN, infinite or negative entry")
    return counts


class NegativeSampler:
    """Draws negatives from ``[low, num_items)``: ``'uniform'``, or ``'popularity'`` with q_j ∝ count_j^alpha.

    ``item_counts`` [num_items] (tensor, array or sequence) and ``alpha``: popularity only (``'uniform'``
    with either is a ValueError, not silently ignored; ``'popularity'`` with ``alpha=0`` is uniform over
    the items with a positive count). Items with a zero count, and ids below ``low`` (e.g. a padding
    id 0), are never drawn and their ``log_q`` is −inf.
    ``replacement=False`` draws shared pools of distinct ids (see the module docstring).
    ``generator`` makes the draws reproducible (its state is part of a training checkpoint); None
    uses torch's default generator, as ``torch.randint`` does.
    """

    def __init__(self, num_items: int, kind: str = "uniform",
                 item_counts: Tensor | np.ndarray | Sequence[float] | None = None, alpha: float = 1.0, *,
                 low: int = 0, replacement: bool = True, generator: torch.Generator | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))} (in-batch negatives need no "
                             f"sampler), got {kind!r}")
        num_items = check_positive_int("num_items", num_items)
        if isinstance(low, bool) or not isinstance(low, numbers.Integral) or not 0 <= low < num_items:
            raise ValueError(f"low must be an int in [0, num_items) = [0, {num_items}), got {low!r}")
        if not isinstance(replacement, bool):
            raise TypeError(f"replacement must be a bool, got {type(replacement).__name__}")
        low = int(low)
        self.num_items, self.kind, self.low, self.replacement = num_items, kind, low, replacement
        self.generator = generator
        weights = torch.zeros(num_items, dtype=torch.float64)
        if kind == "uniform":
            if item_counts is not None or not (isinstance(alpha, numbers.Real) and alpha == 1.0):
                raise ValueError("item_counts and alpha are for kind='popularity' (q_j ∝ count_j^alpha); "
                                 "kind='uniform' draws every id in [low, num_items) alike and takes neither "
                                 f"(got item_counts={'None' if item_counts is None else 'given'}, alpha={alpha!r}). "
                                 "Uniform over the items with a positive count: kind='popularity', alpha=0")
            weights[low:] = 1.0
        else:
            if item_counts is None:
                raise ValueError("kind='popularity' needs item_counts [num_items]")
            if isinstance(alpha, bool) or not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha >= 0):
                raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
            alpha = float(alpha)  # numpy scalars too
            counts = _counts(item_counts, num_items)
            weights = torch.where(counts > 0, counts.pow(alpha), 0.0)
            weights[:low] = 0.0
            if not weights.sum() > 0:
                raise ValueError(f"item_counts must have a positive entry at or above low = {low}")
        self.probs = weights / weights.sum()  # q [num_items], float64
        self._support = torch.nonzero(self.probs > 0).squeeze(1)
        self._inclusion: dict[int, Tensor] = {}
        self._tables: dict[int, Tensor] = {}

    def _check_n(self, n: int) -> None:
        check_positive_int("n", n)
        if not self.replacement and n > self._support.numel():
            raise ValueError(f"n = {n} exceeds the {self._support.numel()} items that can be drawn without "
                             "replacement")

    def inclusion(self, n: int) -> Tensor:
        """Expected count of each item in a draw of ``n`` [num_items] (float64): n·q_j with replacement,
        the inclusion probability π_j = min(1, c·q_j) without."""
        self._check_n(n)
        if n not in self._inclusion:
            self._inclusion[n] = self.probs * n if self.replacement else self._capped(n)
        return self._inclusion[n]

    def _capped(self, n: int) -> Tensor:
        capped = torch.zeros_like(self.probs, dtype=torch.bool)
        while True:  # cap the items with c·q_j ≥ 1 at 1 and spread the rest over the others
            free = (self.probs > 0) & ~capped
            pi = torch.where(capped, 1.0, self.probs * ((n - int(capped.sum())) / self.probs[free].sum()))
            over = free & (pi >= 1)
            if not over.any():
                return pi
            capped |= over

    def log_q_table(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """log of :meth:`inclusion`: the correction of every item [num_items] (float32) for a draw of ``n``."""
        if n not in self._tables:
            self._tables[n] = self.inclusion(n).log().to(torch.float32)
        return self._tables[n].to(device) if device is not None else self._tables[n]

    def _draw(self, count: int) -> Tensor:
        if self.kind == "uniform":
            return torch.randint(self.low, self.num_items, (count,), generator=self.generator)
        return torch.multinomial(self.probs, count, replacement=True, generator=self.generator)

    def _draw_distinct(self, n: int) -> Tensor:
        """Systematic sampling over a random order: the points u, u+1, …, u+n−1 fall into the items'
        consecutive intervals of length π_j ≤ 1, so each item is drawn at most once, with probability π_j."""
        pi = self.inclusion(n)
        order = self._support[torch.randperm(self._support.numel(), generator=self.generator)]
        ends = torch.cumsum(pi[order], 0)
        points = torch.rand((), dtype=torch.float64, generator=self.generator) + torch.arange(n, dtype=torch.float64)
        return order[torch.searchsorted(ends, points, right=True).clamp_max(order.numel() - 1)]

    def sample_shared(self, n: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """A pool of ``n`` ids shared by the batch [n] (int64) and its log_q [n] (float32)."""
        self._check_n(n)
        ids = self._draw(n) if self.replacement else self._draw_distinct(n)
        ids = ids.to(device) if device is not None else ids
        return ids, self.log_q_table(n, ids.device)[ids]

    def sample_per_row(self, users: Tensor, n: int, exclude: Membership | None = None,
                       max_rounds: int = 100) -> tuple[Tensor, Tensor]:
        """``neg_idx`` [R, n] drawn independently per row (with replacement) and its log_q [R, n].

        With ``exclude``, draws that hit a known item of the row's user (``exclude.contains(users,
        items)``) are redrawn; ``log_q`` stays that of the proposal.
        """
        if not self.replacement:
            raise ValueError("sample_per_row draws with replacement; replacement=False is for shared pools "
                             "(sample_shared)")
        if not isinstance(users, Tensor) or users.dim() != 1:
            raise ValueError(f"users must be a 1-D tensor [R], got {getattr(users, 'shape', type(users).__name__)}")
        self._check_n(n)
        R = users.shape[0]
        ids = self._draw(R * n).view(R, n)
        if exclude is not None:
            rows = users[:, None].expand(R, n)
            for _ in range(max_rounds):
                bad = exclude.contains(rows, ids)
                count = int(bad.sum())
                if count == 0:
                    break
                ids[bad] = self._draw(count)
            else:
                raise ValueError(f"could not draw negatives outside the users' positives in {max_rounds} rounds "
                                 "(does a user interact with (almost) every item?)")
        return ids, self.log_q_table(n)[ids]


def in_batch_log_q(items: Tensor, item_counts: Tensor | np.ndarray | Sequence[float]) -> Tensor:
    """logQ of in-batch negatives [R] (float32, on ``items``' device): log(R · p_j), p_j = item j's share
    of the training interactions (the probability that a batch row's positive is item j)."""
    if (not isinstance(items, Tensor) or items.dim() != 1 or items.is_floating_point() or items.is_complex()
            or items.dtype == torch.bool):
        got = f"{tuple(items.shape)} {items.dtype}" if isinstance(items, Tensor) else type(items).__name__
        raise ValueError(f"items must be a 1-D int tensor [R], got {got}")
    if isinstance(item_counts, Tensor) and item_counts.is_cuda:  # no host sync: the shape only
        counts = item_counts.to(items.device, torch.float64)
        if counts.dim() != 1:
            raise ValueError(f"item_counts must be of shape [num_items], got shape {tuple(counts.shape)}")
    else:
        counts = _counts(item_counts, None).to(items.device)
    if items.numel() and not items.is_cuda:  # checks that read the values: on the host only (no sync on CUDA)
        if bool(((items < 0) | (items >= counts.shape[0])).any()):
            raise ValueError(f"items has values in [{int(items.min())}, {int(items.max())}], out of range for "
                             f"item_counts of size {counts.shape[0]}")  # −1 would silently read the last item's count
        if not bool((counts[items] > 0).all()):
            raise ValueError("item_counts is 0 for an item of the batch: its probability of being a batch row's "
                             "positive cannot be 0 (log_q would be -inf)")
    return (counts[items] / counts.sum() * items.shape[0]).log().to(torch.float32)

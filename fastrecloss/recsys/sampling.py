"""Negative samplers for the reference models: uniform, popularity-proportional and in-batch.

Every sampler returns ``(ids, log_q)``. ``log_q`` is the matching logQ correction (Yi et al.
2019): the log of the *expected number of times* an item appears among the draws,
``log(n · q_j)`` for ``n`` draws from a proposal ``q``. Subtracting it from the scores makes
``Σ_j e^{s_j − log_q_j}`` an unbiased estimate of the full-catalogue sum ``Σ_i e^{s_i}``, so a
corrected sampled softmax approximates the full softmax. ``log_q_table(n)`` gives the same
values for the whole catalogue (the indexed layout looks it up by ``neg_idx``).

Excluding a user's own positives: per-row draws are resampled until no row holds one of its
user's known items (``log_q`` stays that of the proposal); for a shared pool or in-batch
negatives, :meth:`UserItemSet.mask` gives the ``neg_mask`` [R, N] to pass to the loss.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

SAMPLERS = ("uniform", "popularity", "in-batch")


class UserItemSet:
    """Membership test for (user, item) pairs, e.g. the training interactions."""

    def __init__(self, users: np.ndarray | Tensor, items: np.ndarray | Tensor, num_items: int) -> None:
        u = torch.as_tensor(np.asarray(users), dtype=torch.int64)
        i = torch.as_tensor(np.asarray(items), dtype=torch.int64)
        self.num_items = int(num_items)
        self.keys = torch.unique(u * self.num_items + i)  # sorted
        self.per_user = torch.bincount(u, minlength=int(u.max()) + 1 if u.numel() else 0)

    def contains(self, users: Tensor, items: Tensor) -> Tensor:
        """Bool tensor of ``items``' shape: is (users, items) a known pair? ``users`` broadcasts."""
        q = users * self.num_items + items
        if self.keys.numel() == 0:
            return torch.zeros_like(q, dtype=torch.bool)
        pos = torch.searchsorted(self.keys, q).clamp_max(self.keys.numel() - 1)
        return self.keys[pos] == q

    def mask(self, users: Tensor, ids: Tensor) -> Tensor:
        """neg_mask [R, N]: True where shared negative ``ids[j]`` is a known item of ``users[r]``."""
        return self.contains(users[:, None], ids[None, :])


class NegativeSampler:
    """Draws negatives with replacement from ``uniform`` or ``popularity`` (q_j ∝ count_j^alpha).

    ``generator`` makes the draws reproducible (its state is part of a training checkpoint).
    Items with a zero count are never drawn by the popularity sampler (their log_q is −inf).
    """

    def __init__(self, num_items: int, kind: str = "uniform", item_counts: np.ndarray | Tensor | None = None,
                 alpha: float = 1.0, generator: torch.Generator | None = None) -> None:
        if kind not in ("uniform", "popularity"):
            raise ValueError(f"kind must be 'uniform' or 'popularity' (in-batch needs no sampler), got {kind!r}")
        if not isinstance(num_items, int) or num_items < 1:
            raise ValueError(f"num_items must be a positive int, got {num_items!r}")
        self.num_items, self.kind = num_items, kind
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        if kind == "uniform":
            self.probs = torch.full((num_items,), 1.0 / num_items, dtype=torch.float64)
        else:
            if item_counts is None:
                raise ValueError("the popularity sampler needs item_counts [num_items]")
            counts = torch.as_tensor(np.asarray(item_counts), dtype=torch.float64)
            if counts.shape != (num_items,) or (counts < 0).any() or counts.sum() <= 0:
                raise ValueError(f"item_counts must be non-negative of shape [{num_items}] with a positive sum, "
                                 f"got shape {tuple(counts.shape)}")
            weights = counts.pow(alpha)
            self.probs = weights / weights.sum()
        self.log_probs = self.probs.log().to(torch.float32)

    def log_q_table(self, n: int) -> Tensor:
        """log(n · q_j) for every item [num_items] (float32): the correction for n draws."""
        return self.log_probs + math.log(n)

    def _draw(self, count: int) -> Tensor:
        if self.kind == "uniform":
            return torch.randint(self.num_items, (count,), generator=self.generator)
        return torch.multinomial(self.probs, count, replacement=True, generator=self.generator)

    def sample_shared(self, n: int) -> tuple[Tensor, Tensor]:
        """A pool of ``n`` ids shared by the batch and its log_q [n] (log(n·q_j))."""
        ids = self._draw(n)
        return ids, self.log_q_table(n)[ids]

    def sample_per_row(self, users: Tensor, n: int, exclude: UserItemSet | None = None,
                       max_rounds: int = 100) -> tuple[Tensor, Tensor]:
        """``neg_idx`` [R, n] drawn independently per row and its log_q [R, n] (log(n·q_j)).

        With ``exclude``, draws that hit a known item of the row's user are redrawn.
        """
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


def in_batch_log_q(items: Tensor, item_counts: np.ndarray | Tensor) -> Tensor:
    """logQ correction for in-batch negatives [R]: log(R · p_j), p_j = item j's share of the
    training interactions (the probability that a batch row's positive is item j)."""
    counts = torch.as_tensor(np.asarray(item_counts), dtype=torch.float64)
    p = counts / counts.sum()
    return (p[items].log() + math.log(items.shape[0])).to(torch.float32)

"""Negative sampling for the reference models: the samplers of :mod:`fastrecloss.sampling` (uniform and
popularity, with their logQ; re-exported here) and the known (user, item) pairs to exclude.

Excluding a user's own positives: per-row draws are resampled until no row holds one of its
user's known items (``log_q`` stays that of the proposal); for a shared pool or in-batch
negatives, :meth:`UserItemSet.mask` gives the ``neg_mask`` [R, N] to pass to the loss.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..sampling import NegativeSampler, in_batch_log_q

__all__ = ["SAMPLERS", "NegativeSampler", "UserItemSet", "in_batch_log_q"]

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

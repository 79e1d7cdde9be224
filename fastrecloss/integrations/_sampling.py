"""The negative pool both adapters draw: uniform or popularity-proportional, with its logQ.

``log_q`` follows the convention of the rest of the package (Yi et al. 2019): the log of the
expected number of times an item appears among ``n`` draws, ``log(n · q_j)``, so a corrected
sampled softmax estimates the full one.
"""

from __future__ import annotations

import torch
from torch import Tensor

NEGATIVES = ("uniform", "popularity")


class PoolSampler:
    """Draws a shared pool of ``num_negatives`` ids from ``[low, num_items)`` with replacement.

    ``kind='popularity'`` draws ∝ ``item_counts`` (``[num_items]``, ids below ``low`` get weight 0).
    """

    def __init__(self, num_items: int, num_negatives: int, kind: str = "uniform", *, low: int = 0,
                 item_counts: Tensor | None = None, generator: torch.Generator | None = None) -> None:
        if kind not in NEGATIVES:
            raise ValueError(f"negatives must be one of {', '.join(map(repr, NEGATIVES))}, got {kind!r}")
        if not isinstance(num_negatives, int) or num_negatives < 1:
            raise ValueError(f"num_negatives must be a positive int, got {num_negatives!r}")
        if not 0 <= low < num_items:
            raise ValueError(f"the catalogue [{low}, {num_items}) to sample negatives from is empty")
        self.num_items, self.n, self.kind, self.low, self.generator = num_items, num_negatives, kind, low, generator
        if kind == "popularity":
            if not isinstance(item_counts, Tensor) or tuple(item_counts.shape) != (num_items,):
                got = tuple(item_counts.shape) if isinstance(item_counts, Tensor) else type(item_counts).__name__
                raise ValueError(f"negatives='popularity' needs item_counts of shape [{num_items}], got {got}")
            counts = item_counts.detach().double().clone()
            counts[:low] = 0
            if not counts.sum() > 0:
                raise ValueError("item_counts must have a positive entry at or above the lowest sampled id")
            self.probs = counts / counts.sum()
        else:
            self.probs = torch.zeros(num_items, dtype=torch.float64)
            self.probs[low:] = 1.0 / (num_items - low)
        with torch.no_grad():
            self.log_q_table = (self.probs * num_negatives).log().float()  # [num_items], −inf below ``low``

    def draw(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(ids [N] int64, log_q [N] float32)`` on ``device``."""
        if self.kind == "uniform":
            ids = torch.randint(self.low, self.num_items, (self.n,), generator=self.generator)
        else:
            ids = torch.multinomial(self.probs, self.n, replacement=True, generator=self.generator)
        return ids.to(device), self.log_q_table.to(device)[ids.to(device)]

    def log_q(self, ids: Tensor) -> Tensor:
        """logQ of given ids (e.g. the positives, for the corrected softmax over pool ∪ positive)."""
        return self.log_q_table.to(ids.device)[ids]

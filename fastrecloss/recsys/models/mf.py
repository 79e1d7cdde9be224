"""Matrix factorisation trained with any loss of SPEC §2 in any negative layout.

A batch is ``(users [R], items [R])`` training pairs; the query is the user vector, the positive
the item vector. Layouts (where the negatives come from):

* ``shared``   — a pool of N sampled items shared by the batch (gathered [N, d]);
* ``per_row``  — N sampled items per row, gathered to [R, N, d] before the loss;
* ``indexed``  — N sampled item ids per row; the loss gathers from the item table itself;
* ``in_batch`` — the batch's own positives (row r's positive is column r);
* ``full``     — the whole catalogue (``softmax_ce`` always uses it; for the other losses the
  row's own positive is removed from the negatives).

Sampled negatives equal to the row's positive are always masked (accidental hits); with
``exclude`` every known item of the user is kept out of the negatives as well.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from ... import functional as F
from ..sampling import NegativeSampler, UserItemSet, in_batch_log_q

# name -> (function, hyper-parameters it accepts)
LOSSES: dict[str, tuple[Callable[..., Tensor], tuple[str, ...]]] = {
    "infonce": (F.infonce, ()),
    "infonce_plus": (F.infonce_plus, ("eps", "lam")),
    "dcl": (F.dcl, ()),
    "mine": (F.mine, ()),
    "mine_plus": (F.mine_plus, ("lam",)),
    "softmax_ce": (F.softmax_ce, ()),
    "bpr": (F.bpr, ()),
    "bce": (F.bce, ("beta",)),
    "ccl": (F.ccl, ("margin", "neg_weight")),
}
LAYOUTS = ("shared", "per_row", "indexed", "in_batch", "full")
SAMPLED_LAYOUTS = ("shared", "per_row", "indexed")


class MFBatch(NamedTuple):
    users: Tensor  # int64 [R]
    items: Tensor  # int64 [R]


def check_loss(loss_name: str, hparams: dict[str, float] | None = None) -> None:
    """Raise ValueError for an unknown loss or a hyper-parameter it does not take."""
    if loss_name not in LOSSES:
        raise ValueError(f"unknown loss {loss_name!r}; expected one of {', '.join(LOSSES)}")
    allowed = LOSSES[loss_name][1]
    for key in hparams or {}:
        if key not in allowed:
            takes = f"takes {', '.join(allowed)}" if allowed else "takes no hyper-parameter"
            raise ValueError(f"{key} does not apply to {loss_name} ({loss_name} {takes})")


def resolve_layout(loss_name: str, layout: str, sampler: str) -> str:
    """'auto' → full for softmax_ce, in_batch for the in-batch sampler, else indexed; validate the rest."""
    if layout == "auto":
        if loss_name == "softmax_ce":
            return "full"
        return "in_batch" if sampler == "in-batch" else "indexed"
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'auto' or one of {', '.join(LAYOUTS)}, got {layout!r}")
    if loss_name == "softmax_ce" and layout != "full":
        raise ValueError(f"softmax_ce ranks against the full catalogue: use layout 'full', not {layout!r}")
    if (layout == "in_batch") != (sampler == "in-batch") and layout in ("in_batch", *SAMPLED_LAYOUTS):
        raise ValueError(f"layout {layout!r} does not match sampler {sampler!r} (in_batch goes with 'in-batch')")
    return layout


class MF(nn.Module):
    """User and item embedding tables; score = <user, item> (cosine when ``normalize``)."""

    def __init__(self, num_users: int, num_items: int, dim: int = 64, *, normalize: bool = False,
                 init_std: float = 0.1) -> None:
        super().__init__()
        for name, value in (("num_users", num_users), ("num_items", num_items), ("dim", dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.user = nn.Embedding(num_users, dim)
        self.item = nn.Embedding(num_items, dim)
        nn.init.normal_(self.user.weight, std=init_std)
        nn.init.normal_(self.item.weight, std=init_std)
        self.normalize = normalize

    @property
    def num_items(self) -> int:
        return self.item.num_embeddings

    def _vec(self, t: Tensor) -> Tensor:
        return TF.normalize(t, dim=-1) if self.normalize else t

    def user_vectors(self, users: Tensor) -> Tensor:
        return self._vec(self.user(users))

    def item_table(self) -> Tensor:
        return self._vec(self.item.weight)

    def score(self, users: Tensor) -> Tensor:
        """Scores of every item for each user: [c, num_items] (what full ranking needs)."""
        return self.user_vectors(users) @ self.item_table().T

    def loss(self, batch: MFBatch, loss_name: str, layout: str = "indexed", *,
             sampler: NegativeSampler | None = None, num_negatives: int = 100, temperature: float = 1.0,
             hparams: dict[str, float] | None = None, log_q_correction: bool = False,
             exclude: UserItemSet | None = None, item_counts: np.ndarray | None = None,
             backend: str = "auto", deterministic: bool = False) -> Tensor:
        """Mean loss of the batch, routed to :mod:`fastrecloss.functional`.

        ``sampler`` draws the negatives of the sampled layouts; ``log_q_correction`` subtracts the
        sampler's log(n·q) (or, in-batch, log(R·p_j) from ``item_counts``); ``exclude`` keeps each
        user's known items out of the negatives.
        """
        check_loss(loss_name, hparams)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        users, items = batch
        fn = LOSSES[loss_name][0]
        kw: dict[str, Any] = dict(temperature=temperature, backend=backend, deterministic=deterministic,
                                  **(hparams or {}))
        q = self.user_vectors(users)
        if loss_name == "softmax_ce":
            if layout != "full":
                raise ValueError(f"softmax_ce ranks against the full catalogue: use layout 'full', not {layout!r}")
            mask = exclude.mask(users, torch.arange(self.num_items)) if exclude is not None else None
            if mask is not None:  # never mask the target itself
                mask[torch.arange(users.shape[0]), items] = False
            return fn(q, self.item_table(), items, neg_mask=mask, **kw)
        if layout == "in_batch":
            if log_q_correction:
                if item_counts is None:
                    raise ValueError("log_q_correction with in-batch negatives needs item_counts")
                kw["log_q"] = in_batch_log_q(items, item_counts)
            mask = exclude.mask(users, items) if exclude is not None else None
            return fn(q, self._vec(self.item(items)), None, in_batch=True, remove_accidental_hits=True, pos_ids=items,
                      neg_mask=mask, **kw)
        if layout == "full":
            table = self.item_table()
            mask = exclude.mask(users, torch.arange(self.num_items)) if exclude is not None else None
            return fn(q, None, table, pos_idx=items, remove_accidental_hits=True, pos_ids=items,
                      neg_ids=torch.arange(self.num_items), neg_mask=mask, **kw)
        if sampler is None:
            raise ValueError(f"layout {layout!r} needs a NegativeSampler (sampler=...)")
        if layout == "shared":
            ids, log_q = sampler.sample_shared(num_negatives)
            mask = exclude.mask(users, ids) if exclude is not None else None
            return fn(q, self._vec(self.item(items)), self._vec(self.item(ids)), remove_accidental_hits=True,
                      pos_ids=items, neg_ids=ids, neg_mask=mask, log_q=log_q if log_q_correction else None, **kw)
        neg_idx, log_q = sampler.sample_per_row(users, num_negatives, exclude=exclude)
        if layout == "per_row":
            return fn(q, self._vec(self.item(items)), self._vec(self.item(neg_idx)), remove_accidental_hits=True,
                      pos_ids=items, neg_ids=neg_idx, log_q=log_q if log_q_correction else None, **kw)
        table = self.item_table()
        return fn(q, None, table, pos_idx=items, neg_idx=neg_idx, remove_accidental_hits=True,
                  log_q=sampler.log_q_table(num_negatives) if log_q_correction else None, **kw)

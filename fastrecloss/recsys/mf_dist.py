"""MF under ``torchrun`` (``fastrecloss train mf --dist gather|shard``), on fastrecloss.distributed.

Every rank draws the same global batch and the same negatives (same seed, same generators) as
one process would, then:

* ``gather`` — data parallel. Rank k takes its slice of the global batch's rows; in-batch
  negatives (the batch's positives) or the shared sampled pool are embedded where they live and
  gathered with :func:`fastrecloss.distributed.gather_negatives`; each rank's loss is the sum over
  its rows divided by the global batch size, and the replicas' gradients are summed with an
  all-reduce, so every replica takes the step one process takes. Layouts: in_batch, shared,
  full (the catalogue replicated).
* ``shard`` — the item table is sharded by rows ([start, stop) per rank, in rank order); every
  rank sees the whole batch and the loss is the sharded ``softmax_ce`` or contrastive loss over
  the full catalogue (layout full); ∂user is complete on every rank, ∂item the shard's.

Evaluation runs on rank 0 (in ``shard`` mode after gathering the table) and its metrics are
broadcast, so early stopping decides the same everywhere. Checkpoints are not written and
``--resume`` is refused under torchrun.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import distributed as D
from .models.mf import LOSSES, MF, MFBatch
from .sampling import NegativeSampler, UserItemSet, in_batch_log_q

DIST_MODES = ("gather", "shard")
GATHER_LAYOUTS = ("in_batch", "shared", "full")
SHARD_LOSSES = ("infonce", "infonce_plus", "dcl", "mine", "mine_plus", "softmax_ce")


def _flat(kw: dict[str, Any]) -> dict[str, Any]:
    """MF.loss keywords → a loss function's: the hyper-parameters inline."""
    return {**{k: v for k, v in kw.items() if k != "hparams"}, **(kw.get("hparams") or {})}


def world_from_env() -> int:
    """The number of ranks: the initialised process group's, else torchrun's WORLD_SIZE (1 without)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def span(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s part [start, stop) of n things split as evenly as possible, in rank order."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class DistributedMF:
    """The distributed parts of one MF training run (see the module doc)."""

    def __init__(self, mode: str, loss_name: str, layout: str, device: torch.device | None = None) -> None:
        if mode not in DIST_MODES:
            raise ValueError(f"--dist must be one of {', '.join(DIST_MODES)}, got {mode!r}")
        if mode == "gather" and layout not in GATHER_LAYOUTS:
            raise ValueError(f"--dist gather takes the layouts {', '.join(GATHER_LAYOUTS)}, got {layout!r}")
        if mode == "shard" and (layout != "full" or loss_name not in SHARD_LOSSES):
            raise ValueError(f"--dist shard takes layout full and the losses {', '.join(SHARD_LOSSES)}, "
                             f"got {loss_name} with layout {layout!r}")
        self.owns_group = not dist.is_initialized()
        if self.owns_group:  # torchrun's environment (MASTER_ADDR, RANK, WORLD_SIZE, ...)
            dist.init_process_group("nccl" if device is not None and device.type == "cuda" else "gloo")
        self.mode, self.loss_name, self.layout = mode, loss_name, layout
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.item_shard: nn.Parameter | None = None

    def attach(self, model: MF) -> list[nn.Parameter]:
        """The parameters this rank optimises (shard mode: the user table and its item rows)."""
        self.model = model
        if self.mode == "gather":
            return list(model.parameters())
        self.shard = span(model.num_items, self.world, self.rank)
        self.item_shard = nn.Parameter(model.item.weight.detach()[slice(*self.shard)].clone())
        return [model.user.weight, self.item_shard]

    def loss(self, batch: MFBatch, *, sampler: NegativeSampler | None, num_negatives: int, log_q_correction: bool,
             exclude: UserItemSet | None, item_counts: np.ndarray, kw: dict[str, Any]) -> Tensor:
        """This rank's part of the global batch's mean loss (the parts sum to it over ranks)."""
        if self.mode == "shard":
            return self._shard_loss(batch, exclude, kw)
        model, (users, items), B = self.model, batch, batch.users.shape[0]
        fn = LOSSES[self.loss_name][0]
        rows = slice(*span(B, self.world, self.rank))
        u, i = users[rows], items[rows]
        if self.layout == "full":  # the catalogue is replicated: plain data parallel
            return model.loss(MFBatch(u, i), self.loss_name, "full", exclude=exclude, **kw) * (u.shape[0] / B)
        q, pos = model.user_vectors(u), model._vec(model.item(i))
        args: dict[str, Any] = dict(remove_accidental_hits=True, pos_ids=i, reduction="sum", **_flat(kw))
        if self.layout == "in_batch":
            lq = in_batch_log_q(items, item_counts)[rows] if log_q_correction else None
            neg, ids, lq_all = D.gather_negatives(pos, ids=i, log_q=lq)
            args.update(log_q=lq_all, pos_log_q=lq)  # logq⁺: the positive's own correction (SPEC §2)
        else:  # shared: the pool is drawn whole on every rank, embedded in parts, gathered
            ids, lq = sampler.sample_shared(num_negatives)
            part = slice(*span(num_negatives, self.world, self.rank))
            neg = D.gather_negatives(model._vec(model.item(ids[part])))[0]
            args.update(log_q=lq if log_q_correction else None)
        mask = exclude.mask(u, ids) if exclude is not None else None
        return fn(q, pos, neg, neg_ids=ids, neg_mask=mask, **args) / B

    def _shard_loss(self, batch: MFBatch, exclude: UserItemSet | None, kw: dict[str, Any]) -> Tensor:
        users, items = batch
        start, stop = self.shard
        kw = _flat(kw)
        q, table = self.model.user_vectors(users), self.model._vec(self.item_shard)
        cols = torch.arange(start, stop)
        mask = exclude.mask(users, cols) if exclude is not None else None
        fn = getattr(D, self.loss_name)
        if self.loss_name == "softmax_ce":
            if mask is not None:  # never mask the target itself
                own = (items >= start) & (items < stop)
                mask[own.nonzero().squeeze(1), items[own] - start] = False
            return fn(q, table, items, shard=self.shard, neg_mask=mask, **kw)
        return fn(q, None, table, pos_idx=items, shard=self.shard, remove_accidental_hits=True, pos_ids=items,
                  neg_ids=cols, neg_mask=mask, **kw)

    def sync_grads(self) -> None:
        """Gather mode: sum the replicas' gradients (each holds its rows' part)."""
        if self.mode == "gather":
            for p in self.model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)

    def total(self, loss: Tensor) -> float:
        """The global batch's loss (shard mode: already the same on every rank)."""
        value = loss.detach().clone().float()
        if self.mode == "gather":
            dist.all_reduce(value)
        return float(value)

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()

    def evaluate(self, fn: Callable[[], dict[str, float]], *, gather_table: bool = True) -> dict[str, float]:
        """Rank 0 evaluates the whole model (shard mode: after gathering the trained table rows into
        ``model.item``, unless ``gather_table`` is False); every rank gets its metrics."""
        if self.item_shard is not None and gather_table:
            with torch.no_grad():
                self.model.item.weight.copy_(D.gather_negatives(self.item_shard.detach())[0])
        box = [fn() if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

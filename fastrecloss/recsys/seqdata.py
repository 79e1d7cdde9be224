"""Sequence batching for the sequential models (ContrastVAE, SASRec).

Items are ids ``1..num_items`` (0 = padding). A batch is **left**-padded only to its own longest
sequence (never to ``max_len``), and users are bucketed by length so that a batch holds
sequences of similar lengths: on Amazon Office (7.9 training inputs per user on average, longest
93) a batch of random users pads to ~60 positions, a bucketed one to ~10.

Positions are the ones the sequence would have if it were left-padded to ``max_len`` (the last
item is always at position ``max_len - 1``), so per-batch padding changes nothing in the model.

Training example of a user (S3Rec/ContrastVAE protocol): the training prefix ``seq`` (from
:func:`fastrecloss.recsys.data.leave_one_out`) gives inputs ``seq[:-1]`` and next-item targets
``seq[1:]`` at every position, cut to the last ``max_len``.

Data augmentations (the "da" view of ContrastVAE), on one user's input list of length n, keep the
length n (so that the view stays aligned with the targets):

* crop: a random window of ``floor(eta·n)`` (≥ 1) consecutive items moved to the front, the rest
  of the row becomes padding (invisible to attention);
* mask: ``floor(gamma·n)`` random positions replaced by the mask token;
* reorder: a random window of ``floor(beta·n)`` items shuffled.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .sampling import NegativeSampler, UserItemSet

AUGMENTATIONS = ("crop", "mask", "reorder")


@dataclass
class SeqBatch:
    """One left-padded training batch. Shapes: B users, L = the batch's longest input."""

    users: Tensor  # [B] int64, index into the training users
    items: Tensor  # [B, L] int64 inputs (0 = padding)
    targets: Tensor  # [B, L] int64 next items (0 at padding)
    valid: Tensor  # [B, L] bool, True at real positions
    negatives: Tensor | None = None  # [B, L] int64, one sampled negative per position (0 at padding)
    aug_items: Tensor | None = None  # [B, L] int64, the augmented view (data augmentation)
    aug_valid: Tensor | None = None  # [B, L] bool, real positions of the augmented view
    aug_kind: Tensor | None = None  # [B] int64, index into AUGMENTATIONS

    @property
    def num_targets(self) -> int:
        return int(self.valid.sum())

    def to(self, device: torch.device | str) -> SeqBatch:
        """A copy with every tensor on ``device``."""
        moved = {f: (v.to(device) if isinstance(v, Tensor) else v) for f, v in vars(self).items()}
        return SeqBatch(**moved)


def left_pad(rows: Sequence[Tensor], length: int | None = None) -> tuple[Tensor, Tensor]:
    """Stack 1-D tensors left-padded with 0 (False for bool) to ``length`` (default: the longest row).

    Returns (padded [B, L] in the rows' dtype, valid [B, L] bool).
    """
    L = max((int(r.shape[0]) for r in rows), default=0) if length is None else length
    out = torch.zeros(len(rows), L, dtype=rows[0].dtype if rows else torch.int64)
    valid = torch.zeros(len(rows), L, dtype=torch.bool)
    for b, r in enumerate(rows):
        n = int(r.shape[0])
        if n:
            out[b, L - n:] = r
            valid[b, L - n:] = True
    return out, valid


def bucket_batches(lengths: Tensor, batch_size: int, pool_batches: int, generator: torch.Generator) -> list[Tensor]:
    """Index batches of a shuffled epoch, bucketed by length.

    Users are shuffled, cut into pools of ``pool_batches · batch_size``, each pool is sorted by
    length (ties stay in shuffled order) and cut into batches; the batch order is shuffled.
    ``pool_batches <= 1`` gives plain random batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = int(lengths.shape[0])
    perm = torch.randperm(n, generator=generator)
    pool = batch_size * max(1, pool_batches)
    batches: list[Tensor] = []
    for start in range(0, n, pool):
        idx = perm[start:start + pool]
        if pool_batches > 1:
            idx = idx[torch.argsort(lengths[idx], stable=True)]
        batches.extend(idx.split(batch_size))
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


# ----------------------------------------------------------------------------------------------
# Augmentations (one user's input list; ``generator`` makes them reproducible)


def _randint(high: int, generator: torch.Generator) -> int:
    """Uniform integer in [0, high]."""
    return int(torch.randint(high + 1, (1,), generator=generator))


def crop(seq: Tensor, generator: torch.Generator, eta: float = 0.6) -> tuple[Tensor, Tensor]:
    """(view, valid): a window of ``max(1, floor(eta·n))`` items at the front, padding after."""
    n = int(seq.shape[0])
    k = max(1, math.floor(n * eta))
    start = _randint(n - k, generator)
    out = torch.zeros_like(seq)
    out[:k] = seq[start:start + k]
    valid = torch.zeros(n, dtype=torch.bool)
    valid[:k] = True
    return out, valid


def mask(seq: Tensor, generator: torch.Generator, mask_id: int, gamma: float = 0.3) -> Tensor:
    """``floor(gamma·n)`` random positions replaced by ``mask_id``."""
    n = int(seq.shape[0])
    m = math.floor(n * gamma)
    out = seq.clone()
    if m:
        out[torch.randperm(n, generator=generator)[:m]] = mask_id
    return out


def reorder(seq: Tensor, generator: torch.Generator, beta: float = 0.6) -> Tensor:
    """A random window of ``floor(beta·n)`` items shuffled in place (on a copy)."""
    n = int(seq.shape[0])
    r = math.floor(n * beta)
    out = seq.clone()
    if r > 1:
        start = _randint(n - r, generator)
        out[start:start + r] = seq[start:start + r][torch.randperm(r, generator=generator)]
    return out


def augment(seq: Tensor, generator: torch.Generator, mask_id: int) -> tuple[Tensor, Tensor, int]:
    """One of crop / mask / reorder chosen uniformly at random: (view, valid, kind index)."""
    kind = int(torch.randint(len(AUGMENTATIONS), (1,), generator=generator))
    if kind == 0:
        view, valid = crop(seq, generator)
        return view, valid, kind
    view = mask(seq, generator, mask_id) if kind == 1 else reorder(seq, generator)
    return view, torch.ones(seq.shape[0], dtype=torch.bool), kind


# ----------------------------------------------------------------------------------------------
# Training batches


class SequenceBatcher:
    """Training batches of next-item examples, bucketed by length, reproducible per epoch.

    ``train`` holds each user's training prefix (ids 1..num_items). Users with fewer than 2 items
    have no target and are left out. ``negatives=True`` draws one negative per position uniformly
    from the items the user has not interacted with in ``train``; ``mask_id`` (not None) turns on
    the data-augmentation view. ``pad_to_max_len`` pads every batch to ``max_len`` (as the
    published code does) instead of to its longest sequence.
    """

    def __init__(self, train: Sequence[Sequence[int]], num_items: int, max_len: int, batch_size: int, *,
                 pool_batches: int = 32, negatives: bool = True, mask_id: int | None = None,
                 pad_to_max_len: bool = False) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.num_items, self.max_len, self.batch_size = num_items, max_len, batch_size
        self.pad_to = max_len if pad_to_max_len else None
        self.pool_batches, self.negatives, self.mask_id = pool_batches, negatives, mask_id
        self.users = [u for u, s in enumerate(train) if len(s) >= 2]
        if not self.users:
            raise ValueError("no training sequence has 2 or more items")
        self.inputs = [torch.as_tensor(list(train[u][:-1])[-max_len:], dtype=torch.int64) for u in self.users]
        self.targets = [torch.as_tensor(list(train[u][1:])[-max_len:], dtype=torch.int64) for u in self.users]
        self.lengths = torch.as_tensor([int(x.shape[0]) for x in self.inputs])
        rows = np.repeat(np.arange(len(self.users)), [len(train[u]) for u in self.users])
        cols = np.concatenate([np.asarray(train[u], dtype=np.int64) - 1 for u in self.users])
        self.known = UserItemSet(rows, cols, num_items)

    def __len__(self) -> int:
        """Batches per epoch."""
        pool = self.batch_size * max(1, self.pool_batches)
        n = len(self.users)
        full, rest = divmod(n, pool)
        return full * math.ceil(pool / self.batch_size) + math.ceil(rest / self.batch_size)

    @property
    def num_targets(self) -> int:
        return int(self.lengths.sum())

    def epoch(self, seed: int) -> Iterator[SeqBatch]:
        """The batches of one epoch; the same ``seed`` gives the same batches, negatives and views."""
        g = torch.Generator().manual_seed(seed)
        sampler = NegativeSampler(self.num_items, "uniform", generator=g) if self.negatives else None
        for idx in bucket_batches(self.lengths, self.batch_size, self.pool_batches, g):
            yield self.make_batch(idx, g, sampler)

    def make_batch(self, idx: Tensor, g: torch.Generator, sampler: NegativeSampler | None) -> SeqBatch:
        rows = idx.tolist()
        items, valid = left_pad([self.inputs[r] for r in rows], self.pad_to)
        targets, _ = left_pad([self.targets[r] for r in rows], self.pad_to)
        batch = SeqBatch(idx, items, targets, valid)
        if sampler is not None:
            row_of = idx[:, None].expand_as(valid)[valid]
            ids, _ = sampler.sample_per_row(row_of, 1, exclude=self.known)
            negatives = torch.zeros_like(items)
            negatives[valid] = ids[:, 0] + 1
            batch.negatives = negatives
        if self.mask_id is not None:
            views = [augment(self.inputs[r], g, self.mask_id) for r in rows]
            batch.aug_items, _ = left_pad([v for v, _, _ in views], items.shape[1])
            batch.aug_valid, _ = left_pad([m for _, m, _ in views], items.shape[1])
            batch.aug_kind = torch.as_tensor([k for _, _, k in views])
        return batch


def eval_order(inputs: Sequence[Sequence[int]]) -> list[int]:
    """User indices sorted by input length (stable): consecutive chunks then pad little."""
    return sorted(range(len(inputs)), key=lambda u: len(inputs[u]))


def eval_batch(inputs: Sequence[Sequence[int]], users: Sequence[int], max_len: int) -> tuple[Tensor, Tensor]:
    """(items [c, L], valid [c, L]) for the given users' inputs, each cut to its last ``max_len``."""
    return left_pad([torch.as_tensor(list(inputs[u])[-max_len:], dtype=torch.int64) for u in users])

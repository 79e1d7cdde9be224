"""Sequence batching: per-batch left padding, length bucketing, negatives, the augmentations."""

from __future__ import annotations

import math

import pytest
import torch

from fastrecloss.recsys.seqdata import (
    AUGMENTATIONS,
    SequenceBatcher,
    augment,
    bucket_batches,
    crop,
    eval_batch,
    eval_order,
    left_pad,
    mask,
    reorder,
)


def _train(num_users: int = 40, num_items: int = 30, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_users):
        n = int(torch.randint(2, 15, (1,), generator=g))
        out.append((torch.randperm(num_items, generator=g)[:n] + 1).tolist())
    return out


def test_left_pad() -> None:
    rows = [torch.tensor([5, 6, 7]), torch.tensor([9]), torch.tensor([], dtype=torch.int64)]
    padded, valid = left_pad(rows)
    assert padded.tolist() == [[5, 6, 7], [0, 0, 9], [0, 0, 0]]
    assert valid.tolist() == [[True] * 3, [False, False, True], [False] * 3]
    padded, _ = left_pad(rows[:2], 5)
    assert padded.tolist() == [[0, 0, 5, 6, 7], [0, 0, 0, 0, 9]]


@pytest.mark.parametrize("pool", [1, 4])
def test_bucket_batches_cover_every_user_once(pool: int) -> None:
    lengths = torch.randint(1, 50, (203,), generator=torch.Generator().manual_seed(1))
    batches = bucket_batches(lengths, 16, pool, torch.Generator().manual_seed(2))
    assert sorted(torch.cat(batches).tolist()) == list(range(203))
    assert all(1 <= b.numel() <= 16 for b in batches)
    again = bucket_batches(lengths, 16, pool, torch.Generator().manual_seed(2))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


def test_bucketing_reduces_padding() -> None:
    lengths = torch.randint(1, 100, (2048,), generator=torch.Generator().manual_seed(3))

    def padded(pool: int) -> int:
        batches = bucket_batches(lengths, 64, pool, torch.Generator().manual_seed(4))
        return sum(int(lengths[b].max()) * b.numel() for b in batches)

    assert padded(32) < 0.7 * padded(1)
    # a fully sorted epoch: every batch spans a narrow band of lengths
    for b in bucket_batches(lengths, 64, 32, torch.Generator().manual_seed(5)):
        assert int(lengths[b].max() - lengths[b].min()) <= 10


def test_batches_are_next_item_examples_padded_to_their_longest() -> None:
    train = _train()
    batcher = SequenceBatcher(train, 30, max_len=8, batch_size=7, pool_batches=2)
    seen = []
    for batch in batcher.epoch(0):
        B, L = batch.items.shape
        assert int(batch.valid.sum(dim=1).max()) == L  # padded to the batch's longest input, not max_len
        for row, r in enumerate(batch.users.tolist()):
            seq = train[batcher.users[r]]
            inputs, targets = seq[:-1][-8:], seq[1:][-8:]
            n = len(inputs)
            assert batch.items[row, L - n:].tolist() == inputs
            assert batch.targets[row, L - n:].tolist() == targets
            assert batch.valid[row].tolist() == [False] * (L - n) + [True] * n
            assert (batch.items[row, :L - n] == 0).all() and (batch.targets[row, :L - n] == 0).all()
            negs = batch.negatives[row]
            assert (negs[:L - n] == 0).all()
            assert all(1 <= x <= 30 and x not in seq for x in negs[L - n:].tolist())
            seen.append(r)
    assert sorted(seen) == list(range(len(batcher.users)))
    assert len(batcher) == len(list(batcher.epoch(1)))


def test_pad_to_max_len_left_pads_the_same_batches() -> None:
    """``pad_to_max_len``: the same users, negatives and views, left-padded to max_len."""
    kw = dict(max_len=10, batch_size=8, mask_id=31)
    short, full = (SequenceBatcher(_train(), 30, pad_to_max_len=p, **kw) for p in (False, True))
    for x, y in zip(short.epoch(2), full.epoch(2)):
        L = x.items.shape[1]
        assert y.items.shape[1] == 10 and torch.equal(x.users, y.users)
        for name in ("items", "targets", "valid", "negatives", "aug_items", "aug_valid"):
            assert torch.equal(getattr(y, name)[:, 10 - L:], getattr(x, name))
            assert not getattr(y, name)[:, :10 - L].any()


def test_epochs_are_reproducible_and_differ() -> None:
    batcher = SequenceBatcher(_train(), 30, max_len=10, batch_size=8, mask_id=31)
    a, b, c = list(batcher.epoch(3)), list(batcher.epoch(3)), list(batcher.epoch(4))
    for x, y in zip(a, b):
        for name in ("users", "items", "targets", "valid", "negatives", "aug_items", "aug_valid"):
            assert torch.equal(getattr(x, name), getattr(y, name))
    assert not all(torch.equal(x.users, y.users) for x, y in zip(a, c))


def test_users_without_a_target_are_left_out() -> None:
    batcher = SequenceBatcher([[1], [2, 3], [4, 5, 6]], 6, max_len=5, batch_size=4)
    assert batcher.users == [1, 2]
    with pytest.raises(ValueError, match="2 or more items"):
        SequenceBatcher([[1], [2]], 6, max_len=5, batch_size=4)


def test_crop_mask_reorder() -> None:
    g = torch.Generator().manual_seed(0)
    seq = torch.arange(1, 11)
    for _ in range(20):
        view, valid = crop(seq, g)
        k = math.floor(10 * 0.6)
        assert valid.tolist() == [True] * k + [False] * (10 - k)
        start = int(view[0]) - 1
        assert view[:k].tolist() == list(range(start + 1, start + k + 1)) and (view[k:] == 0).all()
        masked = mask(seq, g, mask_id=99)
        assert int((masked == 99).sum()) == 3 and torch.equal(masked[masked != 99], seq[masked != 99])
        shuffled = reorder(seq, g)
        assert sorted(shuffled.tolist()) == seq.tolist()
        changed = (shuffled != seq).nonzero().flatten()
        if changed.numel():
            assert int(changed.max() - changed.min()) < 6  # only a window of floor(0.6·10) items moves
    short = torch.tensor([4, 7])
    view, valid = crop(short, g)
    assert valid.tolist() == [True, False] and int(view[0]) in (4, 7)


def test_each_augmentation_is_reachable() -> None:
    g = torch.Generator().manual_seed(0)
    seq = torch.arange(1, 21)
    counts = [0, 0, 0]
    for _ in range(300):
        view, valid, kind = augment(seq, g, mask_id=50)
        counts[kind] += 1
        name = AUGMENTATIONS[kind]
        if name == "crop":
            assert not valid.all()
        elif name == "mask":
            assert (view == 50).sum() == 6 and valid.all()
        else:
            assert sorted(view.tolist()) == seq.tolist() and valid.all()
    assert all(60 < c < 140 for c in counts), counts
    batcher = SequenceBatcher(_train(200), 30, max_len=10, batch_size=50, mask_id=31)
    kinds = torch.cat([b.aug_kind for b in batcher.epoch(0)])
    assert set(kinds.tolist()) == {0, 1, 2}


def test_augmented_view_is_aligned_with_the_batch() -> None:
    batcher = SequenceBatcher(_train(), 30, max_len=10, batch_size=8, mask_id=31)
    for batch in batcher.epoch(0):
        assert batch.aug_items.shape == batch.items.shape
        assert not (batch.aug_valid & ~batch.valid).any()  # the view never extends into padding
        assert (batch.aug_items[~batch.aug_valid] == 0).all()
        assert (batch.aug_items[batch.aug_valid] > 0).all()


def test_eval_batches() -> None:
    inputs = [[3, 4, 5], [1], [2, 6]]
    assert eval_order(inputs) == [1, 2, 0]
    items, valid = eval_batch(inputs, [0, 2], max_len=2)
    assert items.tolist() == [[4, 5], [2, 6]] and valid.all()

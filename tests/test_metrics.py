"""Full-ranking metrics against hand-computed values (ties, several targets, masking, chunking)."""

from __future__ import annotations

import math

import pytest
import torch

from fastrecloss.recsys.metrics import full_ranking, mask_history, rank_metrics, target_ranks


def L(r: int) -> float:
    """DCG discount of 0-based rank r."""
    return 1.0 / math.log2(r + 2)


def test_hand_computed_several_targets() -> None:
    # Ranked list: item 1 (0.9), item 0 (0.5), item 2 (0.4), item 4 (0.3), item 3 (0.1).
    scores = torch.tensor([[0.5, 0.9, 0.4, 0.1, 0.3]])
    m = rank_metrics(scores, [[2, 3]], ks=(1, 3, 5))
    assert m["recall@1"].item() == 0.0 and m["hit@1"].item() == 0.0 and m["mrr@1"].item() == 0.0
    assert m["recall@3"].item() == pytest.approx(0.5)
    assert m["ndcg@3"].item() == pytest.approx(L(2) / (L(0) + L(1)))
    assert m["mrr@3"].item() == pytest.approx(1 / 3)
    assert m["recall@5"].item() == pytest.approx(1.0)
    assert m["ndcg@5"].item() == pytest.approx((L(2) + L(4)) / (L(0) + L(1)))
    assert m["hit@5"].item() == 1.0


def test_idcg_uses_min_of_targets_and_k() -> None:
    # Three targets ranked 0, 1, 2: perfect at K=2 although only 2 of the 3 fit.
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    m = rank_metrics(scores, [[0, 1, 2]], ks=(2,))
    assert m["ndcg@2"].item() == pytest.approx(1.0)
    assert m["recall@2"].item() == pytest.approx(2 / 3)


def test_ties_break_by_item_index() -> None:
    # All scores equal: the ranked list is 0, 1, 2, 3.
    scores = torch.zeros(1, 4)
    assert target_ranks(scores, torch.tensor([[3, 0, 2]])).tolist() == [[3, 0, 2]]
    m = rank_metrics(scores, [[2]], ks=(2, 3))
    assert m["hit@2"].item() == 0.0 and m["hit@3"].item() == 1.0
    assert m["ndcg@3"].item() == pytest.approx(L(2))
    # A tie with a higher-indexed item does not push the target down; a lower-indexed one does.
    scores = torch.tensor([[1.0, 2.0, 1.0, 2.0]])
    assert target_ranks(scores, torch.tensor([[2, 0, 3, 1]])).tolist() == [[3, 2, 1, 0]]


def test_ranks_equal_stable_sort() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (30, 40), generator=g).float()  # many ties
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    targets = torch.randint(0, 40, (30, 3), generator=g)
    expected = (order[:, :, None] == targets[:, None, :]).float().argmax(dim=1)
    assert torch.equal(target_ranks(scores, targets), expected)


def test_history_is_minus_inf_and_ranks_last() -> None:
    scores = torch.tensor([[5.0, 4.0, -1e30, 3.0]])
    masked = mask_history(scores, [[0, 1]])
    assert masked[0, 0] == -math.inf and masked[0, 1] == -math.inf
    assert scores[0, 0] == 5.0  # not modified in place
    # Item 2 (very negative but finite) beats the masked items.
    assert target_ranks(masked, torch.tensor([[2]])).item() == 1


def test_full_ranking_chunks_skip_and_mean() -> None:
    table = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 1.0]])
    # Scores per user: row of the table; user 1 has no targets and is skipped.
    targets = [[1], [], [3, 0]]
    history = [[0], [], [2]]
    users = [0, 1, 2]
    for chunk in (1, 2, 8):
        m = full_ranking(lambda u: table[u], users, targets, history, ks=(1, 2), chunk_size=chunk)
        # user 0: item 0 masked; list 1 (0.0 tie with 2,3 by index) -> target 1 at rank 0.
        # user 2: item 2 masked; list 3 (1.0), 0, 1 -> targets 3, 0 at ranks 0, 1.
        assert m["recall@1"] == pytest.approx((1.0 + 0.5) / 2)
        assert m["recall@2"] == pytest.approx(1.0)
        assert m["ndcg@1"] == pytest.approx(1.0)
        assert m["ndcg@2"] == pytest.approx(1.0)
        assert m["mrr@2"] == pytest.approx(1.0)


def test_k_larger_than_catalogue_names_k() -> None:
    with pytest.raises(ValueError, match="K = 5 is larger than the catalogue"):
        rank_metrics(torch.zeros(2, 4), [[0], [1]], ks=(5,))
    with pytest.raises(ValueError, match="K = 50"):
        full_ranking(lambda u: torch.zeros(len(u), 10), [0], [[1]], None, ks=(5, 50))


def test_user_without_target_is_nan_in_rank_metrics() -> None:
    m = rank_metrics(torch.zeros(2, 3), [[0], []], ks=(1,))
    assert m["hit@1"][0].item() == 1.0 and math.isnan(m["hit@1"][1].item())

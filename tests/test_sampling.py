"""Negative samplers (fastrecloss.sampling): empirical frequencies, logQ corrections with and without
replacement, exclusion of positives."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from fastrecloss import sampling
from fastrecloss.recsys.sampling import UserItemSet
from fastrecloss.sampling import NegativeSampler, in_batch_log_q


def chi2_critical(df: int, z: float = 3.719) -> float:
    """Wilson–Hilferty approximation of the chi-square quantile (z = 3.719: p ≈ 1e-4)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_matches(draws: Tensor, probs: Tensor) -> None:
    """Pearson chi-square goodness of fit over the categories with probability > 0."""
    counts = torch.bincount(draws.reshape(-1), minlength=probs.shape[0]).double()
    n = counts.sum()
    support = probs > 0
    assert counts[~support].sum() == 0, "drew an item with probability 0"
    expected = n * probs[support]
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    assert stat < chi2_critical(df), f"chi-square {stat:.1f} > critical {chi2_critical(df):.1f} (df {df})"


def assert_inclusion(pools: Tensor, pi: Tensor) -> None:
    """Pools [T, n] of distinct ids: each item's count over the T pools is Binomial(T, π_j); Pearson
    statistic over the items with 0 < π_j < 1 (the others must appear in no pool / every pool)."""
    T = pools.shape[0]
    assert all(row.unique().numel() == row.numel() for row in pools), "a pool repeats an id"
    counts = torch.bincount(pools.reshape(-1), minlength=pi.shape[0]).double()
    assert counts[pi == 0].sum() == 0, "drew an item with probability 0"
    assert torch.equal(counts[pi >= 1], torch.full_like(counts[pi >= 1], T)), "missed an item with π = 1"
    free = (pi > 0) & (pi < 1)
    expected, var = T * pi[free], T * pi[free] * (1 - pi[free])
    stat = float(((counts[free] - expected) ** 2 / var).sum())
    df = int(free.sum())
    assert stat < chi2_critical(df), f"chi-square {stat:.1f} > critical {chi2_critical(df):.1f} (df {df})"


def test_uniform_frequencies_and_log_q() -> None:
    s = NegativeSampler(40, "uniform", generator=torch.Generator().manual_seed(1))
    ids, log_q = s.sample_shared(100_000)
    assert_matches(ids, torch.full((40,), 1 / 40, dtype=torch.float64))
    assert torch.allclose(log_q, torch.full_like(log_q, math.log(100_000 / 40)))


def test_popularity_frequencies_and_log_q() -> None:
    counts = np.array([0, 1, 2, 3, 10, 20, 50, 4, 0, 10])
    for alpha in (1.0, 0.5):
        s = NegativeSampler(10, "popularity", counts, alpha=alpha, generator=torch.Generator().manual_seed(2))
        probs = torch.as_tensor(counts, dtype=torch.float64) ** alpha
        probs = probs / probs.sum()
        ids, log_q = s.sample_per_row(torch.zeros(500, dtype=torch.int64), 200)
        assert ids.shape == (500, 200) and log_q.shape == (500, 200)
        assert_matches(ids, probs)
        assert torch.allclose(log_q.double(), (probs[ids] * 200).log(), atol=1e-5)
        table = s.log_q_table(7)
        assert torch.allclose(table.exp().double().sum(), torch.tensor(7.0, dtype=torch.float64), rtol=1e-5)


def test_wrong_distribution_is_detected() -> None:
    # The goodness-of-fit check can fail: popularity draws do not pass as uniform.
    s = NegativeSampler(10, "popularity", np.arange(1, 11), generator=torch.Generator().manual_seed(3))
    with pytest.raises(AssertionError, match="chi-square"):
        assert_matches(s.sample_shared(20_000)[0], torch.full((10,), 0.1, dtype=torch.float64))


def test_corrected_sum_is_unbiased() -> None:
    # E[Σ_j exp(s_j − log_q_j)] over n draws = Σ_i exp(s_i): the logQ correction's promise.
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(30, generator=g, dtype=torch.float64)
    counts = np.random.default_rng(0).integers(1, 100, 30)
    s = NegativeSampler(30, "popularity", counts, generator=g)
    ids, log_q = s.sample_per_row(torch.zeros(20_000, dtype=torch.int64), 8)
    est = (scores[ids] - log_q.double()).exp().sum(dim=1)
    exact = scores.exp().sum()
    se = est.std() / math.sqrt(est.shape[0])
    assert abs(est.mean() - exact) < 4 * se


def test_exclusion_of_positives() -> None:
    users = np.array([0, 0, 0, 1, 1])
    items = np.array([0, 1, 2, 2, 3])
    known = UserItemSet(users, items, num_items=6)
    q = torch.tensor([[0, 1, 2, 3, 4, 5]])
    assert known.contains(torch.tensor([[0], [1]]), q).tolist() == [
        [True, True, True, False, False, False], [False, False, True, True, False, False]]
    mask = known.mask(torch.tensor([1, 0]), torch.tensor([3, 0, 5]))
    assert mask.tolist() == [[True, False, False], [False, True, False]]
    s = NegativeSampler(6, "uniform", generator=torch.Generator().manual_seed(5))
    batch_users = torch.tensor([0] * 300 + [1] * 300)
    ids, _ = s.sample_per_row(batch_users, 100, exclude=known)
    assert not known.contains(batch_users[:, None], ids).any()
    # Among the allowed items the draws stay uniform.
    assert_matches(ids[:300], torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.float64) / 3)
    assert_matches(ids[300:], torch.tensor([1, 1, 0, 0, 1, 1], dtype=torch.float64) / 4)


def test_exclusion_impossible_raises() -> None:
    known = UserItemSet(np.zeros(3, dtype=np.int64), np.arange(3), num_items=3)
    s = NegativeSampler(3, "uniform")
    with pytest.raises(ValueError, match="could not draw negatives"):
        s.sample_per_row(torch.zeros(2, dtype=torch.int64), 4, exclude=known, max_rounds=5)


def test_seeded_and_validated() -> None:
    a = NegativeSampler(50, generator=torch.Generator().manual_seed(9)).sample_shared(20)[0]
    b = NegativeSampler(50, generator=torch.Generator().manual_seed(9)).sample_shared(20)[0]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="item_counts"):
        NegativeSampler(5, "popularity")
    with pytest.raises(ValueError, match="kind"):
        NegativeSampler(5, "in-batch")


def test_uniform_refuses_item_counts_and_alpha_and_popularity_alpha_0_is_uniform_over_seen_items() -> None:
    """kind='uniform' used to ignore item_counts (and alpha) silently: a caller who meant 'uniform over the items
    that occur' got every id. Now an error names both, and its advice (popularity, alpha=0) does that."""
    counts = torch.tensor([0, 5, 0, 1, 2, 7])
    for kw in ({"item_counts": counts}, {"alpha": 0.5}, {"item_counts": counts, "alpha": 0.0}):
        with pytest.raises(ValueError, match=r"item_counts and alpha are for kind='popularity'.*alpha=0"):
            NegativeSampler(6, "uniform", **kw)
    NegativeSampler(6, "uniform", alpha=1)  # the default value, spelt as an int
    s = NegativeSampler(6, "popularity", counts, alpha=0.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(s.probs, torch.tensor([0, 1, 0, 1, 1, 1], dtype=torch.float64) / 4)
    ids, log_q = s.sample_shared(2000)
    assert_matches(ids, s.probs)
    assert torch.allclose(log_q, torch.full((2000,), math.log(2000 / 4)))


def test_in_batch_log_q() -> None:
    counts = np.array([1, 3, 6])
    items = torch.tensor([2, 0, 2, 1])
    expected = torch.log(torch.tensor([0.6, 0.1, 0.6, 0.3]) * 4)
    assert torch.allclose(in_batch_log_q(items, counts), expected)
    assert torch.allclose(in_batch_log_q(items, torch.tensor([1, 3, 6])), expected)
    with pytest.raises(ValueError, match="items must be a 1-D int tensor"):
        in_batch_log_q(items.float(), counts)


COUNTS = np.array([0, 1, 2, 3, 40, 5, 60, 4, 0, 10, 1, 1])  # n = 4 caps items 4 and 6: π = 1


def test_popularity_without_replacement_has_the_exact_inclusion_probabilities() -> None:
    s = NegativeSampler(12, "popularity", COUNTS, replacement=False, generator=torch.Generator().manual_seed(6))
    n, q = 4, torch.as_tensor(COUNTS, dtype=torch.float64) / COUNTS.sum()
    pi = s.inclusion(n)
    assert torch.allclose(pi.sum(), torch.tensor(4.0, dtype=torch.float64)) and bool((pi <= 1).all())
    assert pi[4] == pi[6] == 1 and torch.allclose(pi[pi < 1], q[pi < 1] * 2 / q[pi < 1].sum())  # capped, rescaled
    assert not torch.allclose(pi, n * q)  # so the correction is not n·q here
    pools = torch.stack([s.sample_shared(n)[0] for _ in range(3000)])
    assert_inclusion(pools, pi)
    ids, log_q = s.sample_shared(n)
    assert torch.equal(log_q, pi[ids].log().float()) and torch.equal(s.log_q_table(n), pi.log().float())


def test_inclusion_check_detects_successive_sampling() -> None:
    # torch.multinomial without replacement does not include item j with probability min(1, c·q_j)
    s = NegativeSampler(12, "popularity", COUNTS, replacement=False)
    g, q = torch.Generator().manual_seed(7), s.probs
    pools = torch.stack([torch.multinomial(q, 4, replacement=False, generator=g) for _ in range(3000)])
    with pytest.raises(AssertionError, match="chi-square|missed"):
        assert_inclusion(pools, s.inclusion(4))


def test_uniform_without_replacement_is_a_random_subset_above_low() -> None:
    s = NegativeSampler(9, "uniform", low=1, replacement=False, generator=torch.Generator().manual_seed(8))
    ids, log_q = s.sample_shared(3)
    assert torch.allclose(log_q, torch.full((3,), math.log(3 / 8)))
    assert s.log_q_table(3)[0] == -math.inf and bool((s.log_q_table(3)[1:] == log_q[0]).all())
    pools = torch.stack([s.sample_shared(3)[0] for _ in range(3000)])
    assert_inclusion(pools, s.inclusion(3))
    keys, subset = torch.unique(torch.sort(pools, dim=1).values @ torch.tensor([81, 9, 1]), return_inverse=True)
    assert keys.numel() == math.comb(8, 3)  # every 3-subset of the 8 ids, equally often
    assert_matches(subset, torch.full((56,), 1 / 56, dtype=torch.float64))


def test_corrected_sum_is_unbiased_without_replacement() -> None:
    # Horvitz–Thompson: E[Σ_{j ∈ pool} exp(s_j − log π_j)] = Σ_i exp(s_i)
    g = torch.Generator().manual_seed(9)
    scores = torch.randn(12, generator=g, dtype=torch.float64)
    s = NegativeSampler(12, "popularity", COUNTS + 1, replacement=False, generator=g)
    est = torch.stack([(scores[ids] - lq.double()).exp().sum() for ids, lq in
                       (s.sample_shared(5) for _ in range(3000))])
    se = est.std() / math.sqrt(est.shape[0])
    assert abs(est.mean() - scores.exp().sum()) < 4 * se


def test_sampler_arguments_are_validated() -> None:
    s = NegativeSampler(5, "popularity", [0, 1, 1, 0, 0], replacement=False)
    with pytest.raises(ValueError, match="n = 3 exceeds the 2 items"):
        s.sample_shared(3)
    with pytest.raises(ValueError, match="replacement=False is for shared pools"):
        s.sample_per_row(torch.zeros(2, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="n must be a positive int"):
        NegativeSampler(5).sample_shared(0)
    with pytest.raises(ValueError, match=r"low must be an int in \[0, num_items\)"):
        NegativeSampler(5, low=5)
    with pytest.raises(ValueError, match="alpha must be"):
        NegativeSampler(5, "popularity", [1] * 5, alpha=-1.0)
    with pytest.raises(ValueError, match=r"item_counts must be finite and non-negative of shape \[num_items\]"):
        NegativeSampler(5, "popularity", [1] * 4)
    with pytest.raises(ValueError, match="positive entry at or above low = 2"):
        NegativeSampler(5, "popularity", [1, 1, 0, 0, 0], low=2)
    with pytest.raises(TypeError, match="replacement must be a bool"):
        NegativeSampler(5, replacement="no")


def test_the_reference_models_use_the_public_sampler() -> None:
    import fastrecloss.recsys.sampling as old_path

    assert old_path.NegativeSampler is sampling.NegativeSampler and old_path.in_batch_log_q is sampling.in_batch_log_q

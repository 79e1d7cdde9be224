"""fastrecloss.ranking against a brute-force float64 ranking (Python loops over the catalogue).

Integer-valued embeddings make the scores exact in every dtype and backend, so ties are real ties
(the tie rules are checked exactly); exclusions are drawn around each target's score so that the
items just above, equal to and just below it (and the target itself) are excluded.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastrecloss import ranking
from fastrecloss.backends import ranking as ranking_backend

BACKENDS = ("reference", "torch", "triton")


def brute_scores(q: torch.Tensor, table: torch.Tensor, temperature: float) -> list[list[float]]:
    q64, t64 = q.double(), table.double()
    return [[float(q64[r] @ t64[j]) / temperature for j in range(table.shape[0])] for r in range(q.shape[0])]


def brute_rank(scores, target, excluded, ties: str) -> list[int]:
    out = []
    for r, row in enumerate(scores):
        t = int(target[r])
        ahead = [j for j, s in enumerate(row) if j != t and j not in excluded[r]
                 and (s > row[t] or (ties == "index" and s == row[t] and j < t))]
        out.append(len(ahead))
    return out


def brute_topk(scores, excluded, k: int) -> tuple[list[list[float]], list[list[int]]]:
    vals, ids = [], []
    for r, row in enumerate(scores):
        order = sorted((j for j in range(len(row)) if j not in excluded[r]), key=lambda j: (-row[j], j))[:k]
        pad = k - len(order)
        vals.append([row[j] for j in order] + [-math.inf] * pad)
        ids.append(order + [-1] * pad)
    return vals, ids


def make(gen: torch.Generator, R: int, n_items: int, d: int, integer: bool = True):
    if integer:
        q = torch.randint(-2, 3, (R, d), generator=gen).double()
        table = torch.randint(-2, 3, (n_items, d), generator=gen).double()
    else:
        q, table = torch.randn(R, d, generator=gen, dtype=torch.float64), torch.randn(n_items, d, generator=gen,
                                                                                        dtype=torch.float64)
    target = torch.randint(0, n_items, (R,), generator=gen)
    return q, table, target


def neighbour_exclusions(gen: torch.Generator, scores, target) -> list[list[int]]:
    """Per row: the items ranked just above and below the target, one with its score, sometimes the
    target itself, a random item and a duplicate — in a shuffled order."""
    out = []
    for r, row in enumerate(scores):
        t = int(target[r])
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        pos = order.index(t)
        ex = [order[i] for i in (pos - 2, pos - 1, pos + 1) if 0 <= i < len(order)]
        ex += [j for j in range(len(row)) if j != t and row[j] == row[t]][:1]
        if r % 3 == 0:
            ex.append(t)
        if r % 2 == 0 and len(row):
            ex.append(int(torch.randint(0, len(row), (1,), generator=gen)))
        ex += ex[:1]
        perm = torch.randperm(len(ex), generator=gen).tolist()
        out.append([ex[i] for i in perm])
    return out


def csr(lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    indptr = torch.tensor([0] + [len(x) for x in lists], dtype=torch.int64).cumsum(0)
    return indptr, torch.tensor([j for x in lists for j in x], dtype=torch.int64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("R", "n_items", "d"), [(1, 1, 1), (7, 101, 33), (40, 300, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_rank_matches_brute_force_with_ties_and_neighbour_exclusions(backend, R, n_items, d, dtype, gen):
    q, table, target = make(gen, R, n_items, d)
    scores = brute_scores(q, table, 0.5)
    excluded = neighbour_exclusions(gen, scores, target)
    for ties in ranking.TIES:
        got = ranking.target_rank(q.to(dtype), table.to(dtype), target, exclude=csr(excluded), temperature=0.5,
                                  ties=ties, backend=backend)
        assert got.dtype == torch.int64 and got.tolist() == brute_rank(scores, target, excluded, ties), ties
    plain = ranking.target_rank(q.to(dtype), table.to(dtype), target, backend=backend)
    assert plain.tolist() == brute_rank(brute_scores(q, table, 1.0), target, [[]] * R, "strict")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("R", "n_items", "d", "k"), [(1, 3, 1, 5), (7, 101, 33, 10), (20, 300, 64, 64),
                                                      (5, 200, 16, 100)])
def test_topk_matches_brute_force(backend, R, n_items, d, k, gen):
    q, table, target = make(gen, R, n_items, d)
    scores = brute_scores(q, table, 1.0)
    excluded = neighbour_exclusions(gen, scores, target)
    vals, ids = ranking.topk(q.float(), table.float(), k, exclude=csr(excluded), backend=backend)
    want_vals, want_ids = brute_topk(scores, excluded, k)
    assert ids.dtype == torch.int64 and vals.dtype == torch.float32 and vals.shape == (R, k)
    assert ids.tolist() == want_ids
    assert vals.tolist() == want_vals


@pytest.mark.parametrize(("dtype", "d"), [(torch.float32, 129), (torch.bfloat16, 320)])
def test_triton_loops_over_d_beyond_the_register_tile(dtype, d, gen):
    """d > 128 (fp32) / 256 (bf16): the kernel's K loop over d (16 × 9 chunks with a masked tail; 64 × 5),
    rank with ties by index and exclusions, and a top-k, exact against the brute force."""
    from fastrecloss.kernels import config

    assert config.ranking_config(d, dtype).block_dk == (16 if d == 129 else 64)
    q, table, target = make(gen, 6, 150, d)
    scores = brute_scores(q, table, 0.5)
    excluded = neighbour_exclusions(gen, scores, target)
    got = ranking.target_rank(q.to(dtype), table.to(dtype), target, exclude=csr(excluded), temperature=0.5,
                              ties="index", backend="triton")
    assert got.tolist() == brute_rank(scores, target, excluded, "index")
    vals, ids = ranking.topk(q.to(dtype), table.to(dtype), 10, exclude=csr(excluded), temperature=0.5,
                             backend="triton")
    want_vals, want_ids = brute_topk(scores, excluded, 10)
    assert ids.tolist() == want_ids and vals.tolist() == want_vals


@pytest.mark.parametrize("backend", BACKENDS)
def test_continuous_scores_and_non_contiguous_inputs(backend, gen):
    q, table, target = make(gen, 9, 257, 24, integer=False)
    scores = brute_scores(q, table, 0.1)
    excluded = neighbour_exclusions(gen, scores, target)
    q_nc = q.float().T.contiguous().T  # column-major views
    table_nc = torch.stack([table.float(), -table.float()], dim=2).flatten(1)[:, ::2]  # stride 2
    got = ranking.target_rank(q_nc, table_nc, target, exclude=csr(excluded), temperature=0.1, backend=backend)
    assert got.tolist() == brute_rank(scores, target, excluded, "strict")
    vals, ids = ranking.topk(q_nc, table_nc, 20, exclude=csr(excluded), temperature=0.1, backend=backend)
    want_vals, want_ids = brute_topk(scores, excluded, 20)
    assert ids.tolist() == want_ids
    torch.testing.assert_close(vals.double(), torch.tensor(want_vals, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_torch_backend_over_many_row_chunks_and_item_tiles(gen, monkeypatch):
    """Small tiles: targets, exclusions and top-k lists that straddle chunk and tile borders."""
    monkeypatch.setattr(ranking_backend, "CHUNK_ROWS", 4)
    monkeypatch.setattr(ranking_backend, "TILE_ELEMENTS", 4 * 7)
    q, table, target = make(gen, 11, 60, 8)
    scores = brute_scores(q, table, 1.0)
    excluded = neighbour_exclusions(gen, scores, target)
    got = ranking.target_rank(q, table, target, exclude=csr(excluded), ties="index", backend="torch")
    assert got.tolist() == brute_rank(scores, target, excluded, "index")
    vals, ids = ranking.topk(q, table, 9, exclude=csr(excluded), backend="torch")
    assert ids.tolist() == brute_topk(scores, excluded, 9)[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    q, table = torch.zeros(0, 4), torch.ones(5, 4)
    assert ranking.target_rank(q, table, torch.zeros(0, dtype=torch.int64), backend=backend).shape == (0,)
    vals, ids = ranking.topk(q, table, 3, exclude=csr([]), backend=backend)
    assert vals.shape == ids.shape == (0, 3)


def test_errors_name_the_argument():
    q, table, target = torch.zeros(3, 4), torch.zeros(10, 4), torch.zeros(3, dtype=torch.int64)
    cases = [
        (dict(table=torch.zeros(10, 5)), ValueError, "table"),
        (dict(table=torch.zeros(10, 4, dtype=torch.float64)), TypeError, "table"),
        (dict(target=torch.zeros(4, dtype=torch.int64)), ValueError, "target"),
        (dict(target=torch.zeros(3)), TypeError, "target"),
        (dict(target=torch.tensor([0, 1, 10])), ValueError, "target"),
        (dict(exclude=(torch.tensor([0, 1, 2]), torch.tensor([1, 2]))), ValueError, "indptr"),
        (dict(exclude=(torch.tensor([0, 1, 1, 3]), torch.tensor([1, 2]))), ValueError, "indptr"),
        (dict(exclude=(torch.tensor([0, 2, 1, 2]), torch.tensor([1, 2]))), ValueError, "indptr"),
        (dict(exclude=(torch.tensor([0, 1, 1, 2]), torch.tensor([1, 12]))), ValueError, "exclude indices"),
        (dict(exclude=(torch.tensor([0, 1, 1, 2]), torch.tensor([1.0, 2.0]))), TypeError, "exclude indices"),
        (dict(exclude=torch.tensor([0, 1])), TypeError, "exclude"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(ties="random"), ValueError, "ties"),
        (dict(backend="cuda"), ValueError, "backend"),
    ]
    for change, exc, word in cases:
        args = dict(query=q, table=table, target=target) | change
        query, tab, tgt = args.pop("query"), args.pop("table"), args.pop("target")
        with pytest.raises(exc, match=word):
            ranking.target_rank(query, tab, tgt, **args)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="k must"):
            ranking.topk(q, table, bad)
    with pytest.raises(ValueError, match="k <= 256"):
        ranking.topk(q, table, 300, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_evaluator_equals_the_materialising_one(backend, gen):
    """recsys.metrics.streaming_full_ranking == full_ranking (ties, several targets, targets in the
    history, users without targets), over several user chunks."""
    from fastrecloss.recsys.metrics import full_ranking, streaming_full_ranking

    users, n_items, d = 23, 80, 6
    user_vecs = torch.randint(-1, 2, (users, d), generator=gen).float()
    table = torch.randint(-1, 2, (n_items, d), generator=gen).float()  # many exact ties
    targets = [torch.randint(0, n_items, (int(torch.randint(0, 4, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(users)]
    history = [torch.randint(0, n_items, (int(torch.randint(0, 9, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(users)]
    history[1] += targets[1][:1]  # a target inside its own history is a miss in both
    ids = list(range(users))
    for hist in (history, None):
        old = full_ranking(lambda u: user_vecs[u] @ table.T, ids, targets, hist, ks=(1, 5, 20), chunk_size=7)
        new = streaming_full_ranking(lambda u: user_vecs[u], table, ids, targets, hist, ks=(1, 5, 20), chunk_size=7,
                                     backend=backend)
        assert new == old
        assert 0 < old["recall@20"] < 1

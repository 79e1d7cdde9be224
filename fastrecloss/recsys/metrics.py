"""Full-ranking evaluation: every user's scores over the whole catalogue, history masked with −inf.

Definitions (per user, ``T`` = the held-out target items, ``rank(t)`` 0-based position of t in
the user's ranked catalogue):

* ``recall@K`` = |{t ∈ T : rank(t) < K}| / |T|
* ``ndcg@K``   = Σ_{t: rank(t) < K} 1/log2(rank(t) + 2)  /  Σ_{i < min(|T|, K)} 1/log2(i + 2)
* ``hit@K``    = 1 if any target has rank < K else 0
* ``mrr@K``    = 1/(min_t rank(t) + 1) if that rank < K else 0

Ties are broken deterministically by item index: the ranked list is the stable descending sort
of the scores, i.e. ``rank(t) = #{j : s_j > s_t} + #{j < t : s_j = s_t}`` (among equal scores the
lower column comes first). History items get −inf, so they rank after every finite score; a
target that is also in the history is therefore ranked last (among the −inf items by index).
Users without targets are skipped; the reported values are means over the remaining users. ``T`` is a
set: an item listed twice among a user's targets counts once.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

METRICS = ("recall", "ndcg", "hit", "mrr")


def check_ks(ks: Sequence[int], num_items: int | None) -> tuple[int, ...]:
    """Validate cut-offs: positive ints no larger than the catalogue (``num_items`` None: not checked)."""
    if isinstance(ks, numbers.Integral):
        ks = (ks,)
    out = tuple(ks)
    if not out:
        raise ValueError("ks must name at least one cut-off K")
    for k in out:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"K must be a positive int, got {k!r}")
        if num_items is not None and k > num_items:
            raise ValueError(f"K = {k} is larger than the catalogue ({num_items} items)")
    return tuple(int(k) for k in out)  # numpy integers too: the metric names read 'recall@20


def _pad_targets(targets: Sequence[Sequence[int]] | Tensor, device: torch.device) -> Tensor:
    """[U, m] int64, padded with -1, every user's targets distinct (a repeated one becomes padding)."""
    if isinstance(targets, Tensor):
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise TypeError(f"targets must be an integer tensor [U] or [U, m] (padded with -1), got {targets.dtype}")
        if targets.dim() not in (1, 2):
            raise ValueError(f"targets must be an integer tensor [U] or [U, m] (padded with -1), got shape "
                             f"{tuple(targets.shape)}")
        t = targets.to(device=device, dtype=torch.int64)
        t = t.unsqueeze(1) if t.dim() == 1 else t.sort(dim=1).values
        if t.shape[1] > 1:  # sorted: a repeat sits right after its first copy
            t[:, 1:] = torch.where(t[:, 1:] == t[:, :-1], -1, t[:, 1:])
        return t
    lists = [list(dict.fromkeys(t)) for t in targets]
    m = max((len(t) for t in lists), default=0)
    out = torch.full((len(lists), max(m, 1)), -1, dtype=torch.int64)
    for u, t in enumerate(lists):
        if t:
            out[u, : len(t)] = torch.as_tensor(t, dtype=torch.int64)
    return out.to(device)


def target_ranks(scores: Tensor, targets: Tensor) -> Tensor:
    """0-based rank of each target (ties by item index), [U, m]; padding (-1) gets rank I."""
    U, num_items = scores.shape
    valid = targets >= 0
    safe = targets.clamp_min(0)
    ts = scores.gather(1, safe)  # [U, m]
    cols = torch.arange(num_items, device=scores.device)
    ranks = torch.empty_like(targets)
    for j in range(targets.shape[1]):  # one [U, I] comparison per target column: memory O(U·I)
        s = ts[:, j : j + 1]
        ahead = (scores > s) | ((scores == s) & (cols < safe[:, j : j + 1]))
        ranks[:, j] = ahead.sum(dim=1)
    return torch.where(valid, ranks, torch.full_like(ranks, num_items))


def rank_metrics(scores: Tensor, targets: Sequence[Sequence[int]] | Tensor, ks: Sequence[int] = (20,)
                 ) -> dict[str, Tensor]:
    """Per-user metrics from already-masked scores [U, I].

    ``targets``: a list of item-column lists per user, or an int tensor [U] / [U, m] padded with
    -1. Returns ``{'recall@K', 'ndcg@K', 'hit@K', 'mrr@K'}`` → float tensors [U] (NaN for a user
    with no target).
    """
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a tensor of shape [U, I], got {getattr(scores, 'shape', type(scores))}")
    U, num_items = scores.shape
    ks = check_ks(ks, num_items)
    t = _pad_targets(targets, scores.device)
    if t.shape[0] != U:
        raise ValueError(f"targets must have one entry per user (U = {U}), got {t.shape[0]}")
    if ((t < -1) | (t >= num_items)).any():
        raise ValueError(f"targets must be item columns in [0, {num_items}), got values outside")
    return metrics_from_ranks(target_ranks(scores, t), t >= 0, ks)


def metrics_from_ranks(ranks: Tensor, valid: Tensor, ks: Sequence[int]) -> dict[str, Tensor]:
    """Per-user metrics from 0-based target ranks [U, m] (``valid`` [U, m] marks the real targets).

    Returns ``{'recall@K', 'ndcg@K', 'hit@K', 'mrr@K'}`` → float64 tensors [U] (NaN for a user with no
    target); K is not checked against the catalogue here (see :func:`check_ks`).
    """
    ks = check_ks(ks, None)
    if not (isinstance(ranks, Tensor) and isinstance(valid, Tensor) and ranks.dim() == 2
            and ranks.shape == valid.shape and valid.dtype == torch.bool):
        raise ValueError(f"ranks [U, m] and valid [U, m] (bool) must have one shape, got "
                         f"{getattr(ranks, 'shape', type(ranks).__name__)} and "
                         f"{getattr(valid, 'shape', type(valid).__name__)}")
    U = ranks.shape[0]
    dev = ranks.device
    ranks = torch.where(valid, ranks, torch.iinfo(torch.int64).max)
    n_t = valid.sum(dim=1).to(torch.float64)
    discount = 1.0 / torch.log2(ranks.clamp(max=2**53).to(torch.float64) + 2.0)
    best = ranks.min(dim=1).values if ranks.shape[1] else torch.full((U,), 2**62, dtype=torch.int64, device=dev)
    nan = torch.full((U,), math.nan, dtype=torch.float64, device=dev)
    out: dict[str, Tensor] = {}
    for k in ks:
        inside = valid & (ranks < k)
        hits = inside.sum(dim=1).to(torch.float64)
        ideal = torch.cumsum(1.0 / torch.log2(torch.arange(k, dtype=torch.float64, device=dev) + 2.0), 0)
        idcg = ideal[(n_t.clamp(max=k) - 1).clamp_min(0).long()]
        has = n_t > 0
        out[f"recall@{k}"] = torch.where(has, hits / n_t.clamp_min(1), nan)
        out[f"ndcg@{k}"] = torch.where(has, (discount * inside).sum(dim=1) / idcg, nan)
        out[f"hit@{k}"] = torch.where(has, (hits > 0).to(torch.float64), nan)
        out[f"mrr@{k}"] = torch.where(has, torch.where(best < k, 1.0 / (best.to(torch.float64) + 1.0), 0.0), nan)
    return out


def _check_columns(name: str, lists: Sequence[Sequence[int]], num_items: int) -> None:
    """Every entry of ``lists`` is an item column in [0, num_items) (−1 would silently mean the last one)."""
    bad = [c for h in lists for c in h if not 0 <= c < num_items]
    if bad:
        raise ValueError(f"{name} must hold item columns in [0, {num_items}), got {bad[0]!r}")


def mask_history(scores: Tensor, history: Sequence[Sequence[int]]) -> Tensor:
    """A copy of ``scores`` [c, I] with each row's history columns (``history``: c lists) set to −inf."""
    if len(history) != scores.shape[0]:
        raise ValueError(f"history must have one list per row of scores ({scores.shape[0]}), got {len(history)}")
    _check_columns("history", history, scores.shape[1])
    rows = [r for r, h in enumerate(history) for _ in range(len(h))]
    if not rows:
        return scores.clone()
    cols = [c for h in history for c in h]
    idx_r = torch.as_tensor(rows, dtype=torch.int64, device=scores.device)
    idx_c = torch.as_tensor(cols, dtype=torch.int64, device=scores.device)
    return scores.index_put((idx_r, idx_c), torch.tensor(-math.inf, dtype=scores.dtype, device=scores.device))


@torch.no_grad()
def full_ranking(score_fn: Callable[[Tensor], Tensor], users: Sequence[int] | Tensor,
                 targets: Sequence[Sequence[int]], history: Sequence[Sequence[int]] | None,
                 ks: Sequence[int] = (20,), chunk_size: int = 1024) -> dict[str, float]:
    """Mean Recall/NDCG/Hit/MRR@K over users, ranking the whole catalogue in user chunks.

    ``score_fn(user_chunk: LongTensor[c]) -> Tensor[c, num_items]``; ``targets[n]`` and
    ``history[n]`` are the item columns of ``users[n]`` (history masked with −inf; None = no
    masking). Users without targets are skipped. Peak extra memory is O(chunk_size · num_items).
    """
    users_t = torch.as_tensor(users, dtype=torch.int64).reshape(-1)
    if len(targets) != users_t.shape[0]:
        raise ValueError(f"targets must have one list per user ({users_t.shape[0]}), got {len(targets)}")
    if history is not None and len(history) != users_t.shape[0]:
        raise ValueError(f"history must have one list per user ({users_t.shape[0]}), got {len(history)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    ks = check_ks(ks, None)  # against the catalogue with the first chunk's scores
    keep = [n for n in range(users_t.shape[0]) if len(targets[n]) > 0]
    sums: dict[str, float] = {}
    checked = False
    for start in range(0, len(keep), chunk_size):
        part = keep[start : start + chunk_size]
        scores = score_fn(users_t[part])
        if scores.dim() != 2 or scores.shape[0] != len(part):
            raise ValueError(f"score_fn must return [c, num_items] with c = {len(part)}, got {tuple(scores.shape)}")
        if not checked:
            ks = check_ks(ks, scores.shape[1])
            checked = True
        if history is not None:
            scores = mask_history(scores, [history[n] for n in part])
        for name, values in rank_metrics(scores, [targets[n] for n in part], ks).items():
            sums[name] = sums.get(name, 0.0) + float(values.sum())
    if not keep:
        return {f"{m}@{k}": math.nan for k in ks for m in METRICS}
    return {name: total / len(keep) for name, total in sums.items()}


@torch.no_grad()
def streaming_full_ranking(query_fn: Callable[[Tensor], Tensor], table: Tensor, users: Sequence[int] | Tensor,
                           targets: Sequence[Sequence[int]], history: Sequence[Sequence[int]] | None,
                           ks: Sequence[int] = (20,), chunk_size: int = 1024, backend: str = "auto"
                           ) -> dict[str, float]:
    """:func:`full_ranking` for dot-product scores ``query_fn(users) @ table.T``, never materialised.

    ``query_fn(user_chunk: LongTensor[c]) -> Tensor[c, d]``, ``table`` [num_items, d]. Each (user,
    target) pair is ranked by :func:`fastrecloss.ranking.target_rank` with the user's history excluded
    and ties by item index, and a target inside its user's history counts as a miss — the
    conventions of :func:`full_ranking`, so both give the same metrics (whenever K ≤ num_items −
    |history|, where a history target's rank there is ≥ K too). Peak extra memory is that of the
    ranking backend (O(chunk · d) plus one reused score tile), not O(chunk_size · num_items).
    """
    from ..ranking import target_rank

    users_t = torch.as_tensor(users, dtype=torch.int64).reshape(-1)
    n_users = users_t.shape[0]
    if len(targets) != n_users or (history is not None and len(history) != n_users):
        raise ValueError(f"targets and history must have one list per user ({n_users})")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(table, Tensor) or table.dim() != 2:
        raise ValueError(f"table must be a tensor [num_items, d], got {getattr(table, 'shape', type(table).__name__)}")
    num_items = table.shape[0]
    ks = check_ks(ks, num_items)
    _check_columns("targets", targets, num_items)
    if history is not None:
        _check_columns("history", history, num_items)
    targets = [list(dict.fromkeys(t)) for t in targets]  # a set per user, as full_ranking's
    keep = [n for n in range(n_users) if len(targets[n]) > 0]
    if not keep:
        return {f"{m}@{k}": math.nan for k in ks for m in METRICS}
    sums: dict[str, float] = {}
    for start in range(0, len(keep), chunk_size):
        part = keep[start : start + chunk_size]
        q = query_fn(users_t[part])
        if q.dim() != 2 or q.shape[0] != len(part):
            raise ValueError(f"query_fn must return [c, d] with c = {len(part)}, got {tuple(q.shape)}")
        row_of = [i for i, n in enumerate(part) for _ in targets[n]]
        pair_targets = [t for n in part for t in targets[n]]
        dev = q.device
        seen = [set(history[n]) if history is not None else set() for n in part]
        exclude = None
        if history is not None:
            lists = [history[part[i]] for i in row_of]
            indptr = torch.tensor([0] + [len(h) for h in lists], dtype=torch.int64).cumsum(0)
            indices = torch.tensor([c for h in lists for c in h], dtype=torch.int64)
            exclude = (indptr.to(dev), indices.to(dev))
        rows = torch.as_tensor(row_of, dtype=torch.int64, device=dev)
        ranks = target_rank(q[rows], table, torch.as_tensor(pair_targets, dtype=torch.int64, device=dev),
                            exclude=exclude, ties="index", backend=backend).cpu()
        in_history = torch.tensor([t in seen[i] for i, t in zip(row_of, pair_targets)], dtype=torch.bool)
        ranks = torch.where(in_history, num_items, ranks)
        width = max(len(targets[n]) for n in part)
        padded = torch.zeros(len(part), width, dtype=torch.int64)
        valid = torch.zeros(len(part), width, dtype=torch.bool)
        col = torch.tensor([j for n in part for j in range(len(targets[n]))], dtype=torch.int64)
        padded[torch.as_tensor(row_of), col] = ranks
        valid[torch.as_tensor(row_of), col] = True
        for name, values in metrics_from_ranks(padded, valid, ks).items():
            sums[name] = sums.get(name, 0.0) + float(values.sum())
    return {name: total / len(keep) for name, total in sums.items()}

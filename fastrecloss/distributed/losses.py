"""The named losses over a sharded table or pool (SPEC §4 names; ``neg`` / ``table_shard`` is this
rank's rows). Each is one parameterisation of :func:`~fastrecloss.distributed.sharded.sharded_loss`."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .sharded import sharded_loss


def sampled_logsumexp(query: Tensor, neg: Tensor, *, shard: tuple[int, int] | None = None, group: Any = None,
                      reduction: str = "none", **common: Any) -> Tensor:
    """log Σ_j e^{s_rj} over the negatives of every rank [R] (0 for a row without any), with ``neg`` this
    rank's [N_k, d]; ``shard``, ``group`` as in :func:`softmax_ce`."""
    return sharded_loss("sampled_logsumexp", dict(eps=0.0, lam=1.0, mu=0.0), query, None, neg, need_pos=False,
                        shard=shard, group=group, reduction=reduction, **common)


def infonce(query: Tensor, pos: Tensor | None, neg: Tensor, *, shard: tuple[int, int] | None = None,
            group: Any = None, **common: Any) -> Tensor:
    """InfoNCE over a pool sharded across ranks (``neg`` = this rank's part; ``pos`` [R, d] replicated,
    or ``pos_idx`` [R] global rows of the pool)."""
    return sharded_loss("infonce", dict(eps=1.0, lam=1.0, mu=0.0), query, pos, neg, shard=shard, group=group, **common)


def infonce_plus(query: Tensor, pos: Tensor | None, neg: Tensor, *, eps: float = 0.0, lam: float = 1.1,
                 shard: tuple[int, int] | None = None, group: Any = None, **common: Any) -> Tensor:
    """InfoNCE+ over a sharded pool (see :func:`infonce`)."""
    return sharded_loss("infonce_plus", dict(eps=eps, lam=lam, mu=0.0), query, pos, neg, shard=shard, group=group,
                        **common)


def dcl(query: Tensor, pos: Tensor | None, neg: Tensor, *, shard: tuple[int, int] | None = None,
        group: Any = None, **common: Any) -> Tensor:
    """DCL over a sharded pool (see :func:`infonce`)."""
    return sharded_loss("dcl", dict(eps=0.0, lam=1.0, mu=0.0), query, pos, neg, shard=shard, group=group, **common)


def mine(query: Tensor, pos: Tensor | None, neg: Tensor, *, shard: tuple[int, int] | None = None,
         group: Any = None, **common: Any) -> Tensor:
    """MINE over a sharded pool (the mean's count is merged across ranks; see :func:`infonce`)."""
    return sharded_loss("mine", dict(eps=0.0, lam=1.0, mu=1.0), query, pos, neg, shard=shard, group=group, **common)


def mine_plus(query: Tensor, pos: Tensor | None, neg: Tensor, *, lam: float = 1.1,
              shard: tuple[int, int] | None = None, group: Any = None, **common: Any) -> Tensor:
    """MINE+ over a sharded pool (see :func:`infonce`)."""
    return sharded_loss("mine_plus", dict(eps=0.0, lam=lam, mu=1.0), query, pos, neg, shard=shard, group=group,
                        **common)


def softmax_ce(query: Tensor, table_shard: Tensor, target: Tensor, *, shard: tuple[int, int] | None = None,
               group: Any = None, label_smoothing: float = 0.0, z_loss: float = 0.0, **common: Any) -> Tensor:
    """Full-catalogue softmax cross-entropy with the table sharded by rows across ranks.

    Rank k passes ``table_shard`` = rows [start, stop) of the catalogue (``shard=(start, stop)``;
    without it the shards are taken in rank order), the replicated ``query`` [R, d] and ``target``
    [R] (global ids; ``ignore_index`` marks ignored rows), and the shard's slice of the per-item
    arguments (``log_q``, ``neg_mask``). Every rank returns the same loss; ∂query is complete on
    every rank, ∂table_shard is the shard's. With a per-item ``log_q`` the target's own correction
    is subtracted from its score (SPEC §2 logq⁺) unless ``pos_log_q`` overrides it.
    ``label_smoothing`` α and ``z_loss`` z as in ``functional.softmax_ce`` (F.cross_entropy's
    smoothing over the unmasked catalogue; z·lse², PaLM): one more per-row sum crosses the wire.
    """
    for key in ("pos", "pos_idx", "neg_idx", "in_batch", "pos_ids", "neg_ids", "remove_accidental_hits"):
        if key in common:
            common["_" + key] = common.pop(key)  # refused inside, collectively
    knobs = dict(eps=0.0, lam=1.0, mu=0.0, label_smoothing=label_smoothing, z_loss=z_loss)
    return sharded_loss("softmax_ce", knobs, query, None, table_shard, pos_idx=target, target_name="target",
                        shard=shard, group=group, **common)

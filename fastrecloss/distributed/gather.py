"""Cross-rank negatives: every rank's candidates in one pool, gradients back to their owners."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from .._problem import _check_float, _check_shape
from ._comm import Group, agreed, dtype_code, exchange, resolve_group


def gather_negatives(neg: Tensor, *, ids: Tensor | None = None, log_q: Tensor | None = None,
                     group: Any = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """All-gather every rank's negatives ``neg`` [N_k, d] into ``neg_all`` [Σ_k N_k, d], in rank order.

    ``ids`` [N_k] (integer item ids, for accidental-hit removal) and ``log_q`` [N_k] (their
    sampling correction) are gathered alongside, without gradient; each comes back as None when
    not given. Sizes may differ per rank (a rank may hold none); ``d``, the dtype and which of
    ``ids`` / ``log_q`` are given must agree, else every rank raises the same ``ValueError``.

    Gradients flow back to the owners with the convention of torch's autograd all-gather
    (``torch.distributed._functional_collectives.all_gather_single``, as in OpenCLIP): the
    gradient of ``neg`` on rank k is ∂(Σ_ranks loss_rank)/∂neg_k, the sum of what every rank's loss
    sends it. So each rank computes the loss of its own rows with ``reduction="sum"`` divided by
    the global number of rows: the sum over ranks is then the mean over the global batch, and
    with the parameters' gradients summed over ranks (an all-reduce, or DDP with the loss scaled
    by the world size) training equals one process on the concatenated batch. Every rank must
    run the backward (a rank without rows too), since the backward is a collective, and its loss
    must depend on ``neg_all``: the torch and triton backends keep that dependency for zero rows,
    the reference backend's zero-row shortcut does not (add ``0 * neg_all.sum()`` there).

    Cross-rank in-batch negatives (each row's negatives are the positives of every rank; its own
    column and every duplicate of its item are removed by id, as ``in_batch=True`` does in one
    process)::

        pos_all, ids_all, log_q_all = gather_negatives(pos, ids=item_ids, log_q=log_q)
        loss = F.infonce(query, pos, pos_all, remove_accidental_hits=True, pos_ids=item_ids,
                         neg_ids=ids_all, log_q=log_q_all, pos_log_q=log_q, reduction="sum") / global_rows

    ``pos_log_q=log_q`` gives the positive its own correction (SPEC §2, logq⁺ in in-batch mode);
    drop both ``log_q`` arguments for the uncorrected loss. Communication: one all-gather of
    (max_k N_k)·d values per rank forward (sizes are padded to the largest) and the same volume
    backward, plus a small all-gather of the sizes.
    """
    g = resolve_group(group)
    sizes = pool_sizes(g, neg, ids, log_q)
    if g.world == 1:
        return neg, ids, log_q
    return (gather_rows(neg, sizes, g, differentiable=True),
            None if ids is None else gather_rows(ids, sizes, g),
            None if log_q is None else gather_rows(log_q, sizes, g))


def pool_sizes(g: Group, neg: Tensor, ids: Tensor | None, log_q: Tensor | None,
               more: Callable[[], list[int]] | None = None, more_what: tuple[str, ...] = (),
               decode: dict[str, Callable[[int], Any]] | None = None) -> list[int]:
    """Validate one rank's pool (``neg`` [N_k, d], ``ids`` / ``log_q`` [N_k]) against every rank's; return
    the sizes N_k in rank order (every rank raises the same error on a mismatch or a bad argument).
    ``more()`` validates further local arguments; its values (named by ``more_what``, shown in an error
    through ``decode[name]`` where given) must agree too."""

    def local() -> list[int]:
        _check_float("neg", neg, 2, "[N, d]")
        n = neg.shape[0]
        _check_shape("ids", ids, (n,), "[N] (one id per negative)", kind="int")
        _check_shape("log_q", log_q, (n,), "[N] (one correction per negative)", kind="float")
        for name, t in (("ids", ids), ("log_q", log_q)):
            if t is not None and t.device != neg.device:
                raise ValueError(f"{name} is on {t.device} but neg is on {neg.device}")
        return [n, neg.shape[1], dtype_code(neg.dtype), ids is not None, log_q is not None,
                dtype_code(log_q.dtype) if log_q is not None else -1, dtype_code(ids.dtype) if ids is not None else -1,
                *(more() if more else [])]

    device = neg.device if isinstance(neg, Tensor) else torch.device("cpu")
    rows = exchange(g, local, 7 + len(more_what), device)
    # ids' dtype too: the all-gather (and the ring's receive buffers) take the local dtype's size on every rank
    what = ("the negatives' dimension d (neg.shape[1])", "neg's dtype (as a code)", "whether ids is given",
            "whether log_q is given", "log_q's dtype (as a code)", "ids' dtype (as a code)", *more_what)
    for column, name in enumerate(what, start=1):
        agreed(rows, column, name, (decode or {}).get(name))
    return [r[0] for r in rows]


def gather_rows(x: Tensor, sizes: list[int], g: Group, *, differentiable: bool = False) -> Tensor:
    """Concatenate every rank's ``x`` [sizes[k], ...] in rank order (padded to the largest size on
    the wire); with ``differentiable`` the gradient of each piece is summed back to its owner."""
    most = max(sizes)
    if most == 0:
        return x[:0]
    pad = x.new_zeros((most - x.shape[0], *x.shape[1:]))
    padded = torch.cat([x, pad]) if pad.shape[0] else x.contiguous()
    if differentiable:  # torch's autograd all-gather: the backward reduce-scatters (sums) to the owners
        pieces = funcol.all_gather_single(padded, 0, g.group if g.group is not None else dist.group.WORLD)
        pieces = funcol.wait_tensor(pieces).chunk(len(sizes))
    else:
        pieces = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(pieces, padded.contiguous(), group=g.group)
    return torch.cat([p[:n] for p, n in zip(pieces, sizes)])

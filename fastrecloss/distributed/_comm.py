"""The torch.distributed plumbing of :mod:`fastrecloss.distributed`: the process group, the
configuration exchange that makes a bad call fail on every rank, and two autograd-aware
all-reduces for the replicated-loss convention of the sharded losses.

Nothing here talks over the wire except through ``torch.distributed`` collectives. When
torch.distributed is not initialised, everything degrades to one process (world size 1, no
communication), so the same code runs in a single-process job.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Group:
    """The process group of a call: ``group`` (None = the default group), this rank and the size."""

    group: Any
    rank: int
    world: int


def resolve_group(group: Any) -> Group:
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised (call init_process_group)")
        return Group(None, 0, 1)
    return Group(group, dist.get_rank(group), dist.get_world_size(group))


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8)


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def dtype_name(code: int) -> str:
    return str(_DTYPES[code]) if code < len(_DTYPES) else "another dtype"


def exchange(g: Group, local: Callable[[], list[int]], width: int, device: torch.device) -> list[list[int]]:
    """Run this rank's validation ``local()`` (a row of ``width`` ints describing its arguments),
    all-gather the rows, and return them in rank order.

    If ``local()`` raised on any rank, every rank raises: the same exception type, with the message
    of the first failing rank (so a bad argument on one rank never leaves the others waiting in a
    collective). One all-gather of ``width + 1`` int64 per rank, plus an object all-gather on the
    error path only.
    """
    error: BaseException | None = None
    try:
        row = [int(v) for v in local()]
        if len(row) != width:
            raise RuntimeError(f"internal: validation row of {len(row)} values, expected {width}")
    except Exception as e:  # noqa: BLE001 - any local failure must reach the other ranks
        error, row = e, [0] * width
    if error is not None and g.world == 1:
        raise error
    t = torch.tensor([int(error is not None), *row], dtype=torch.int64).to(device)
    if g.world > 1:
        out = [torch.empty_like(t) for _ in range(g.world)]
        dist.all_gather(out, t, group=g.group)
        rows = torch.stack(out).tolist()
    else:
        rows = [t.tolist()]
    failed = [k for k, r in enumerate(rows) if r[0]]
    if failed:
        payload = None if error is None else (type(error).__name__, str(error))
        messages: list[Any] = [payload]
        if g.world > 1:
            messages = [None] * g.world
            dist.all_gather_object(messages, payload, group=g.group)
        kind, text = messages[failed[0]]
        cls = {"TypeError": TypeError, "ValueError": ValueError}.get(kind, RuntimeError)
        where = f"rank {failed[0]}" + (f" (and ranks {failed[1:]})" if len(failed) > 1 else "")
        raise cls(f"{where} of {g.world}: {text}")
    return [r[1:] for r in rows]


def float_code(x: float) -> int:
    """A float as the int64 of its float64 bits (a configuration row holds ints)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def code_float(code: int) -> float:
    return struct.unpack("<d", struct.pack("<q", code))[0]


def temperature_code(tau: float | Tensor) -> int:
    """A validated τ for the configuration row: its float64 bits, or −1 (a NaN's, which no float τ is) for a
    tensor, whose value is not read (a host sync on CUDA)."""
    return -1 if isinstance(tau, Tensor) else float_code(tau)


def temperature_value(code: int) -> float | str:
    return "a tensor" if code == -1 else code_float(code)


def agreed(rows: list[list[int]], column: int, what: str, decode: Callable[[int], Any] | None = None) -> int:
    """The value of ``column`` that every rank must share; a ValueError naming ``what`` (the values shown
    through ``decode``) otherwise."""
    values = [r[column] for r in rows]
    if len(set(values)) > 1:
        shown = [decode(v) for v in values] if decode else values
        raise ValueError(f"{what} must be the same on every rank, got {shown} (rank order)")
    return values[0]


class _SumOverRanks(torch.autograd.Function):
    """Forward: Σ over ranks (every rank gets it). Backward: the upstream gradient unchanged.

    The sharded losses are replicated (every rank computes the same loss from the same merged
    statistics), so every rank holds the same ∂L/∂Σ, and ∂L/∂x_k = ∂L/∂Σ for its own x_k.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _SumGradOverRanks(torch.autograd.Function):
    """Forward: identity. Backward: Σ over ranks of the gradient, in fp32 or wider.

    Wraps the query of a sharded loss: each rank's backward yields its shard's part of ∂L/∂query,
    and the sum makes ∂query complete on every rank.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        wide = grad.to(torch.promote_types(grad.dtype, torch.float32)).contiguous().clone()
        dist.all_reduce(wide, group=ctx.group)
        return wide.to(grad.dtype), None


def sum_over_ranks(x: Tensor, g: Group) -> Tensor:
    return _SumOverRanks.apply(x, g.group) if g.world > 1 else x


def sum_grad_over_ranks(x: Tensor, g: Group) -> Tensor:
    return _SumGradOverRanks.apply(x, g.group) if g.world > 1 else x


def max_over_ranks(x: Tensor, g: Group) -> Tensor:
    """Element-wise max over ranks, outside autograd (used as a shift that cancels)."""
    out = x.detach().clone()
    if g.world > 1:
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=g.group)
    return out
